"""The known-faces disk cache: round trip, keys, atomic writes, damaged files."""

import os

import numpy as np
import pytest

from jaxface.recognition import known_cache

FP = {"model": "fake", "weights_sha256": "0" * 64, "preprocessing": "none", "dim": 4}
SHA_A, SHA_B = "a" * 64, "b" * 64


def _faces(n, seed=0):
  rng = np.random.default_rng(seed)
  return (np.arange(4 * n, dtype=np.int64).reshape(n, 4),
          rng.standard_normal((n, 4)).astype(np.float32), (240, 320))


def test_round_trip_including_images_without_faces(tmp_path):
  c = known_cache.KnownFaceCache(FP, 0, folder=str(tmp_path))
  assert len(c) == 0 and c.get(SHA_A) is None
  boxes, embs, hw = _faces(2)
  c.put(SHA_A, boxes, embs, hw)
  c.put(SHA_B, np.zeros((0, 4)), np.zeros((0, 4)), (5, 7))
  c.save()
  assert os.path.isfile(c.path) and [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []
  again = known_cache.KnownFaceCache(FP, 0, folder=str(tmp_path))
  assert len(again) == 2 and SHA_A in again
  b, e, size = again.get(SHA_A)
  np.testing.assert_array_equal(b, boxes)
  np.testing.assert_array_equal(e, embs)  # bit-exact float32
  assert size == (240, 320)
  b, e, size = again.get(SHA_B)
  assert b.shape == (0, 4) and e.shape == (0, 4) and size == (5, 7)
  with pytest.raises(ValueError, match="image_hw"):
    again.put(SHA_A, boxes, embs, (0, 3))


def test_encoder_and_upsample_are_part_of_the_key(tmp_path):
  c = known_cache.KnownFaceCache(FP, 0, folder=str(tmp_path))
  c.put(SHA_A, *_faces(1))
  c.save()
  assert known_cache.KnownFaceCache(FP, 1, folder=str(tmp_path)).get(SHA_A) is None
  other = {**FP, "weights_sha256": "1" * 64}
  assert known_cache.KnownFaceCache(other, 0, folder=str(tmp_path)).get(SHA_A) is None
  assert known_cache.KnownFaceCache(dict(reversed(FP.items())), 0, folder=str(tmp_path)).get(SHA_A) is not None


def test_damaged_file_is_reported_and_rebuilt(tmp_path):
  c = known_cache.KnownFaceCache(FP, 0, folder=str(tmp_path))
  c.put(SHA_A, *_faces(1))
  c.save()
  with open(c.path, "r+b") as f:
    f.truncate(40)
  warnings = []
  d = known_cache.KnownFaceCache(FP, 0, folder=str(tmp_path), warn=warnings.append)
  assert len(d) == 0 and len(warnings) == 1
  assert c.path in warnings[0] and "rebuilding" in warnings[0]
  d.put(SHA_B, *_faces(1, seed=3))
  d.save()
  warnings.clear()
  e = known_cache.KnownFaceCache(FP, 0, folder=str(tmp_path), warn=warnings.append)
  assert warnings == [] and SHA_B in e and SHA_A not in e


def test_a_file_written_for_another_key_is_not_trusted(tmp_path):
  c = known_cache.KnownFaceCache(FP, 0, folder=str(tmp_path))
  c.put(SHA_A, *_faces(1))
  c.save()
  other = known_cache.KnownFaceCache({**FP, "model": "other"}, 0, folder=str(tmp_path))
  os.replace(c.path, other.path)  # as if two keys' digests collided
  warnings = []
  again = known_cache.KnownFaceCache({**FP, "model": "other"}, 0, folder=str(tmp_path), warn=warnings.append)
  assert len(again) == 0 and "another encoder" in warnings[0]


def test_save_is_skipped_when_nothing_changed_and_default_dir(tmp_path, monkeypatch):
  c = known_cache.KnownFaceCache(FP, 0, folder=str(tmp_path / "sub"))
  c.save()
  assert not os.path.exists(tmp_path / "sub")  # nothing to write, no folder made
  monkeypatch.setenv("JAXFACE_CACHE", str(tmp_path / "cache"))
  assert known_cache.default_dir() == str(tmp_path / "cache" / "known_faces")
  assert known_cache.KnownFaceCache(FP, 0).path.startswith(str(tmp_path / "cache" / "known_faces"))


def test_bad_arguments_name_the_parameter(tmp_path):
  with pytest.raises(ValueError, match="upsample"):
    known_cache.KnownFaceCache(FP, -1, folder=str(tmp_path))
  with pytest.raises(ValueError, match="fingerprint"):
    known_cache.KnownFaceCache("fake", 0, folder=str(tmp_path))
  c = known_cache.KnownFaceCache(FP, 0, folder=str(tmp_path))
  with pytest.raises(ValueError, match="sha256"):
    c.put("abc", *_faces(1))
  with pytest.raises(ValueError, match="embeddings"):
    c.put(SHA_A, np.zeros((1, 4)), np.zeros((2, 4)), (9, 9))
  with pytest.raises(ValueError, match="embeddings"):
    c.put(SHA_A, np.zeros((1, 4)), np.zeros((1, 5)), (9, 9))
