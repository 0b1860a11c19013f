"""Face alignment of image-folder sources (jaxface.data.align, ImageFolderSource(align=...)).

The real-image tests need the AT&T/ORL data and dlib's models (the
``face-recognition-models`` package); they skip with a reason when either is absent.
"""

import importlib.util
import logging
import os

import numpy as np
import pytest
from PIL import Image

from jaxface import faces, paths
from jaxface.data import align, folder
from jaxface.train.config import TripletConfig

ORL = os.path.abspath(os.path.join(paths.data_root(), "faces", "att_orl"))


def _skip_reason():
  if not os.path.isdir(ORL):
    return f"AT&T/ORL data not found at {ORL} (set JAXFACE_DATA)"
  if importlib.util.find_spec("face_recognition_models") is None:
    return "face-recognition-models not installed (dlib's detector and landmark models)"
  return None


_REASON = _skip_reason()
real = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

# s31 was photographed at two distances: 1.pgm far, 3.pgm close-up (~1.3x larger face).
FAR, NEAR = os.path.join(ORL, "s31", "1.pgm"), os.path.join(ORL, "s31", "3.pgm")


def _eye_distance(marks):
  """Distance between the two eye centres of 5-point landmarks [5, 2]."""
  a = (marks[0] + marks[1]) / 2.0
  b = (marks[2] + marks[3]) / 2.0
  return float(np.hypot(*(a - b)))


@real
def test_align_one_finds_the_face_and_normalises_scale():
  outs = []
  ratios = []
  for f in (FAR, NEAR):
    img, found = align.align_one(f, (32, 32), channels=1)
    assert found and img.shape == (32, 32, 1) and img.dtype == np.uint8
    assert img.std() > 10  # a face, not an empty chip
    outs.append(img)
    rgb = faces.load_image(f)
    ratios.append(_eye_distance(faces.landmarks(rgb, faces.detect(rgb, upsample=1)[:1])[0]))
  # The raw photos differ in scale (eye distance), which alignment removes:
  # the landmarks found again on the two aligned chips (sampled larger) agree.
  assert ratios[1] / ratios[0] > 1.1  # 1.14
  chip_d = []
  for f in (FAR, NEAR):
    chip, _ = align.align_one(f, (112, 112), channels=3)
    chip_d.append(_eye_distance(faces.landmarks(chip, np.array([[0, 0, 111, 111]]))[0]))
  assert abs(chip_d[1] / chip_d[0] - 1.0) < 0.04, chip_d
  # Output = the dlib chip resized with the folder's own conversion.
  rgb = faces.load_image(FAR)
  marks = faces.landmarks(rgb, faces.detect(rgb, upsample=1)[:1])
  ref = folder.conform_array(faces.chips(rgb, marks, size=112, padding=0.25)[0], 1, (32, 32))
  np.testing.assert_array_equal(outs[0], ref)


def _tiny_orl(tmp_path, ids=("s31", "s32"), n=2):
  root = tmp_path / "orl"
  for ident in ids:
    (root / ident).mkdir(parents=True)
    for i in range(1, n + 1):
      os.symlink(os.path.join(ORL, ident, f"{i}.pgm"), root / ident / f"{i}.pgm")
  return root


@real
def test_folder_source_aligns_through_the_cache(tmp_path, monkeypatch):
  # Only the alignment cache moves (dlib's converted models stay in the user cache).
  monkeypatch.setattr(align, "default_cache_root", lambda: str(tmp_path / "cache" / "aligned"))
  root = _tiny_orl(tmp_path)
  a = folder.ImageFolderSource(root, image_size=(32, 32), channels=1, align="dlib")
  assert a.images.shape == (4, 32, 32, 1) and a.images.dtype == np.uint8
  assert a.align_missed == [] and list(a.labels) == [0, 0, 1, 1]
  entries = os.listdir(tmp_path / "cache" / "aligned")
  assert len(entries) == 4 and all(e.endswith(".npy") for e in entries)

  # Second load: every image from the cache (the aligner must not run), same arrays.
  def boom(*args, **kwargs):
    raise AssertionError("align_one called despite a cache hit")
  monkeypatch.setattr(align, "align_one", boom)
  b = folder.ImageFolderSource(root, image_size=(32, 32), channels=1, align="dlib")
  np.testing.assert_array_equal(a.images, b.images)
  # Another setting is another key: the aligner runs again.
  with pytest.raises(AssertionError, match="cache hit"):
    folder.ImageFolderSource(root, image_size=(32, 32), channels=1, align="dlib", align_padding=0.4)


@real
def test_corrupt_cache_entry_is_rebuilt(tmp_path, caplog):
  cache = str(tmp_path / "cache")
  first = align.align_files([FAR], (32, 32), cache_root=cache)
  (entry,) = os.listdir(cache)
  with open(os.path.join(cache, entry), "wb") as f:
    f.write(b"not an npy file")
  with caplog.at_level(logging.WARNING, logger="jaxface.data.align"):
    again = align.align_files([FAR], (32, 32), cache_root=cache)
  assert again.cache_hits == 0 and entry in caplog.text and "rebuilding" in caplog.text
  np.testing.assert_array_equal(first.images, again.images)
  # Wrong shape inside a valid .npy: also rebuilt.
  np.save(os.path.join(cache, entry), np.zeros(7, np.uint8))
  third = align.align_files([FAR], (32, 32), cache_root=cache)
  assert third.cache_hits == 0
  np.testing.assert_array_equal(first.images, third.images)
  assert align.align_files([FAR], (32, 32), cache_root=cache).cache_hits == 1


@real
def test_no_face_falls_back_to_the_centre_crop(tmp_path):
  rng = np.random.default_rng(0)
  blank = rng.integers(0, 40, size=(112, 92), dtype=np.uint8)  # dark noise, no face
  path = str(tmp_path / "blank.png")
  Image.fromarray(blank).save(path)
  res = align.align_files([path, FAR], (32, 32), cache_root=str(tmp_path / "c"))
  assert res.missed == [path] and list(res.found) == [False, True]
  ref = folder.conform_array(blank[10:102, :], 1, (32, 32))  # centre 92x92 square
  np.testing.assert_array_equal(res.images[0], ref)


def test_centre_square_matches_slicing():
  for h, w in [(112, 92), (40, 60), (7, 7), (5, 8)]:
    x = np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3)
    s = min(h, w)
    t, l = (h - s) // 2, (w - s) // 2
    got = align.centre_square(x)
    assert got.shape == (s, s, 3)
    for i in range(s):
      for j in range(s):
        assert (got[i, j] == x[t + i, l + j]).all()


def test_bad_align_settings_are_clear_errors(tmp_path):
  (tmp_path / "a").mkdir()
  Image.new("L", (20, 20), 50).save(tmp_path / "a" / "0.png")
  with pytest.raises(ValueError, match="align must be one of none, dlib, got 'mtcnn'"):
    folder.ImageFolderSource(tmp_path, image_size=(16, 16), channels=1, align="mtcnn")
  with pytest.raises(ValueError, match="needs image_size"):
    folder.ImageFolderSource(tmp_path, channels=1, align="dlib")
  with pytest.raises(ValueError, match="align_padding"):
    folder.ImageFolderSource(tmp_path, image_size=(16, 16), channels=1, align="dlib",
                             align_padding=-1)
  with pytest.raises(ValueError, match=r"^align='box': must be none or dlib"):
    TripletConfig(data="folder", data_path="x", align="box").validate()
  with pytest.raises(ValueError, match=r"^align='dlib': needs a folder source"):
    TripletConfig(align="dlib").validate()


def test_cache_key_follows_file_and_settings(tmp_path):
  p = tmp_path / "x.png"
  Image.new("L", (8, 8), 1).save(p)
  k = align.cache_key(str(p), (32, 32), 1, 0.25, 1)
  assert k == align.cache_key(str(p), (32, 32), 1, 0.25, 1)
  others = {align.cache_key(str(p), (32, 28), 1, 0.25, 1), align.cache_key(str(p), (32, 32), 3, 0.25, 1),
            align.cache_key(str(p), (32, 32), 1, 0.4, 1), align.cache_key(str(p), (32, 32), 1, 0.25, 0)}
  assert k not in others and len(others) == 4
  Image.new("L", (9, 8), 1).save(p)  # new size and mtime
  assert align.cache_key(str(p), (32, 32), 1, 0.25, 1) != k
