"""Tests for jaxface.data.mix (synthetic identities appended to real training data) and its hook."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from jaxface.data import mix, synthetic
from jaxface.data.source import ArraySource
from jaxface.train import triplet
from jaxface.train.config import TripletConfig


def test_synthetic_like_is_a_cropped_resized_render():
  got = mix.synthetic_like(3, 2, (32, 26), 1, seed=4)
  assert got.images.shape == (6, 32, 26, 1) and got.images.dtype == np.uint8
  np.testing.assert_array_equal(got.labels, [0, 0, 1, 1, 2, 2])
  # Reference: render at 64, crop the centre 46 x 37 (46 = 0.72 * 64, 37 = 46 * 26 / 32), resize.
  ref = synthetic.synthetic_faces(3, 2, image_size=64, channels=1, seed=4).images[..., 0]
  for k in range(6):
    crop = ref[k, 9:55, 13:50]
    want = np.asarray(Image.fromarray(crop).resize((26, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got.images[k, ..., 0], want)
  rgb = mix.synthetic_like(2, 2, (20, 20), 3, seed=0)
  assert rgb.images.shape == (4, 20, 20, 3)
  with pytest.raises(ValueError, match="face_fraction"):
    mix.synthetic_like(2, 2, (20, 20), 1, face_fraction=0.0)


def test_concat_sources_offsets_labels_and_refuses_mismatches():
  rng = np.random.default_rng(0)
  a = ArraySource(rng.integers(0, 256, (4, 6, 5, 1), dtype=np.uint8), [0, 1, 1, 0], ["x", "y"])
  b = ArraySource(rng.integers(0, 256, (3, 6, 5, 1), dtype=np.uint8), [1, 0, 2], ["p", "q", "r"])
  c = mix.concat_sources(a, b)
  np.testing.assert_array_equal(c.labels, [0, 1, 1, 0, 3, 2, 4])
  assert c.identity_names == ["x", "y", "p", "q", "r"]
  np.testing.assert_array_equal(c.get(np.arange(7)), np.concatenate([a.images, b.images]))
  with pytest.raises(ValueError, match="shapes"):
    mix.concat_sources(a, ArraySource(np.zeros((2, 6, 4, 1), np.uint8), [0, 1]))
  with pytest.raises(ValueError, match="collide"):
    mix.concat_sources(a, ArraySource(np.zeros((2, 6, 5, 1), np.uint8), [0, 1], ["y", "z"]))


def _folder(root, num_ids=4, per_id=3):
  rng = np.random.default_rng(1)
  for i in range(num_ids):
    (root / f"p{i}").mkdir(parents=True)
    for j in range(per_id):
      Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8)).save(root / f"p{i}" / f"{j}.png")


def test_prepare_data_appends_synthetic_identities_to_the_training_side_only(tmp_path):
  _folder(tmp_path / "faces")
  cfg = TripletConfig(data="folder", data_path=str(tmp_path / "faces"), num_holdout=2,
                      image_size=(24, 20), crop_size=(20, 16), channels=1, P=2, K=2,
                      extra_synthetic=3, synthetic_images=4).validate()
  train, holdout, _ = triplet.prepare_data(cfg)
  assert train.identity_names[:2] == ["p0", "p1"] and len(train.identity_names) == 5
  assert len(train) == 2 * 3 + 3 * 4 and train.image_shape == (24, 20, 1)
  assert holdout.identity_names == ["p2", "p3"] and len(holdout) == 6
  plain, _, _ = triplet.prepare_data(dataclasses.replace(cfg, extra_synthetic=0))
  np.testing.assert_array_equal(train.get(np.arange(6)), plain.get(np.arange(6)))
  with pytest.raises(ValueError, match="extra_synthetic"):
    dataclasses.replace(cfg, extra_synthetic=-1).validate()
  with pytest.raises(ValueError, match="extra_synthetic"):
    TripletConfig(extra_synthetic=3).validate()  # --data=synthetic already is synthetic
