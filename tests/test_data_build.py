"""Tests for jaxface.data.build: DataConfig's checks and the train / held-out data of a run."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxface.data import build, source as source_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = build.DataConfig(synthetic_identities=12, synthetic_images=6, num_holdout=4, image_size=(32, 32),
                        crop_size=(28, 28), P=4, K=3)


def test_importing_build_loads_neither_jax_nor_pil_and_checking_a_config_no_jax():
  code = ("import sys\nfrom jaxface.data import build\nprint('jax' in sys.modules, 'PIL' in sys.modules)\n"
          "build.DataConfig(kind='folder', data_path='x')\nprint('jax' in sys.modules)")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert r.stdout.split() == ["False", "False", "False"], r.stderr[-2000:]


def test_data_config_reads_tuples_from_json_lists_and_flag_strings():
  assert build.DataConfig(image_size=[24, 20], crop_size="20,16").crop_size == (20, 16)
  assert build.DataConfig.from_dict(TINY.to_dict()) == TINY
  with pytest.raises(ValueError, match=r"^image_size=\(64, 64, 64\): must be H,W \(2 entries"):
    build.DataConfig(image_size=(64, 64, 64))
  with pytest.raises(ValueError, match="^extra_synthetic=3: adds synthetic faces to real 2-D image data"):
    build.DataConfig(extra_synthetic=3)


def test_prepare_data_splits_identities_and_seeds_the_sampler():
  train, holdout, sampler = build.prepare_data(TINY, seed=0)
  assert (train.num_identities, holdout.num_identities) == (8, 4)
  assert not set(train.identity_names) & set(holdout.identity_names)
  assert train.image_shape == (32, 32, 3) and sampler.batch_size == 12
  again = build.prepare_data(TINY, seed=0)[2]
  np.testing.assert_array_equal(sampler.batch_indices(3), again.batch_indices(3))
  other = build.prepare_data(TINY, seed=1)
  assert not np.array_equal(train.get(np.arange(4)), other[0].get(np.arange(4)))  # synthetic: the seed's
  seeded = build.prepare_data(dataclasses.replace(TINY, holdout_seed=5), seed=0)[1]
  assert seeded.identity_names != holdout.identity_names


def _folder(root, counts):
  rng = np.random.default_rng(0)
  for i, n in enumerate(counts):
    (root / f"p{i}").mkdir(parents=True)
    for j in range(n):
      Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / f"p{i}" / f"{j}.png")
  return root


def test_small_identities_name_the_parameters_and_drop_small_leaves_them_out(tmp_path):
  root = _folder(tmp_path / "faces", [3, 3, 1, 3, 3, 3, 3])
  data = build.DataConfig(kind="folder", data_path=str(root), image_size=(16, 16), crop_size=(12, 12),
                          channels=1, num_holdout=2, P=2, K=3)
  with pytest.raises(source_lib.SmallIdentitiesError, match=r"^K=3 is larger than the number of images "
                     r"of 1 of 5 training identities: p2 \(1\)\. Lower K, or set drop_small") as e:
    build.prepare_data(data, seed=0)
  assert (e.value.K, e.value.names, e.value.num_identities) == (3, ["p2"], 5)
  said = []
  train, holdout, _ = build.prepare_data(dataclasses.replace(data, drop_small=True), 0, printer=said.append)
  assert said == ["drop_small: left out 1 of 7 identities (1 of 19 images) with fewer than K=3 images; "
                  "6 identities (18 images) remain"]
  assert "p2" not in train.identity_names + holdout.identity_names and holdout.num_identities == 2
  with pytest.raises(ValueError, match=r"^drop_small=True: only 6 of 7 identities have at least K=3 "
                     r"images; training needs P=5 identities plus num_holdout=2 held out \(7\)"):
    build.prepare_data(dataclasses.replace(data, drop_small=True, P=5), seed=0)
