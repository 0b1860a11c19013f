"""Tests for jaxface.faces._landmarks (faces.landmarks): golden parity with dlib, a slow reference, edge cases.

Golden data: ``data_root()/dlib_golden`` (dlib 20.0.1 outputs). The entry
``skimage_astronaut`` has no image in that folder; it is checked only when
scikit-image is installed (``skimage.data.astronaut()``), otherwise skipped.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxface import pretrained
from jaxface.faces import _landmarks as L

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sp() -> L.ShapePredictor:
  try:
    path = pretrained.model_file("shape5")
  except pretrained.PretrainedNotFoundError as e:
    pytest.skip(f"weights package not installed: {e}")
  return L.load_shape_predictor(path)  # direct parse: leaves the user's cache alone



# --------------------------------------------------------------------------- slow reference


def ref_similarity(src, dst):
  """Umeyama's SVD route, literally (float64) -> 2x2 c*R."""
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  ms, md = src.mean(0), dst.mean(0)
  sigma = np.mean(np.sum((src - ms) ** 2, axis=1))
  cov = np.mean([np.outer(d - md, s - ms) for s, d in zip(src, dst)], axis=0)
  u, dvals, vt = np.linalg.svd(cov)
  s = np.eye(2)
  if np.linalg.det(cov) < 0 or (np.linalg.det(cov) == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
    if dvals[1] < dvals[0]:
      s[1, 1] = -1
    else:
      s[0, 0] = -1
  r = u @ s @ vt
  c = np.trace(np.diag(dvals) @ s) / sigma
  return c * r


def ref_predict_one(sp: L.ShapePredictor, image: np.ndarray, box) -> np.ndarray:
  """One face, loops over feature pixels and trees, dlib's float32/float64 steps spelled out."""
  m = sp.model
  left, top, right, bottom = (float(v) for v in box)
  h, w = image.shape[:2]
  f32 = np.float32
  shape = m.initial_shape.astype(f32).copy()
  for c in range(m.thresholds.shape[0]):
    t = ref_similarity(m.initial_shape, shape).astype(f32)
    feats = np.zeros(m.anchor_idx.shape[1], f32)
    for i in range(feats.size):
      dx, dy = m.deltas[c, i]
      ax, ay = shape[m.anchor_idx[c, i]]
      px = f32(f32(f32(t[0, 0] * dx) + f32(t[0, 1] * dy)) + ax)
      py = f32(f32(f32(t[1, 0] * dx) + f32(t[1, 1] * dy)) + ay)
      x = int(np.floor(left + float(px) * (right - left) + 0.5))
      y = int(np.floor(top + float(py) * (bottom - top) + 0.5))
      if 0 <= x < w and 0 <= y < h:
        r, g, b = (int(v) for v in image[y, x])
        feats[i] = (r + g + b) // 3
    for tree in range(m.thresholds.shape[1]):
      node = 0
      while node < m.thresholds.shape[2]:
        i1, i2 = m.split_idx[c, tree, node]
        node = 2 * node + 1 if feats[i1] - feats[i2] > m.thresholds[c, tree, node] else 2 * node + 2
      shape = (shape + m.leaves[c, tree, node - m.thresholds.shape[2]]).astype(f32)
  out = np.empty((shape.shape[0], 2), np.int64)
  for p, (u, v) in enumerate(shape):
    out[p] = (np.floor(left + float(u) * (right - left) + 0.5),
              np.floor(top + float(v) * (bottom - top) + 0.5))
  return out


# --------------------------------------------------------------------------- golden parity


def test_golden_landmarks_exact(sp, golden, golden_images):
  checked, skipped = 0, []
  for name, image in golden_images.items():
    sel = np.flatnonzero(golden["names"] == name)
    if image is None:
      skipped.append(name)
      continue
    got = L.predict(sp, image, golden["rects"][sel])
    assert got.shape == (sel.size, 5, 2) and got.dtype == np.int64
    bad = np.flatnonzero(np.any(got != golden["landmarks5"][sel], axis=(1, 2)))
    assert bad.size == 0, f"{name}: faces {sel[bad].tolist()} differ from dlib"
    checked += sel.size
  n_skipped = int(np.isin(golden["names"], skipped).sum())
  assert checked + n_skipped == golden["names"].size
  assert checked >= 80, f"only {checked} faces had images"


def test_matches_slow_reference(sp, golden, golden_images):
  name = "dlib_2008_002470.jpg"  # several faces, one near the image border
  image = golden_images[name]
  boxes = golden["rects"][golden["names"] == name][:3]
  boxes = np.concatenate([boxes, [[-30, 40, 60, 130], [image.shape[1] - 50, image.shape[0] - 40,
                                                       image.shape[1] + 40, image.shape[0] + 50]]])
  got = L.predict(sp, image, boxes)
  for i, box in enumerate(boxes):
    np.testing.assert_array_equal(got[i], ref_predict_one(sp, image, box), err_msg=f"box {box}")


def test_batch_equals_one_by_one(sp, golden, golden_images):
  name = "dlib_bald_guys.jpg"
  image = golden_images[name]
  boxes = golden["rects"][golden["names"] == name][:6]
  together = L.predict(sp, image, boxes)
  for i in range(len(boxes)):
    np.testing.assert_array_equal(L.predict(sp, image, boxes[i:i + 1])[0], together[i])


def test_similarity_closed_form_matches_svd():
  rng = np.random.default_rng(0)
  src = rng.normal(size=(5, 2))
  dst = np.stack([rng.normal(size=(5, 2)) for _ in range(20)]
                 + [(src @ np.array([[0.3, 2.0], [-2.0, 0.3]]).T) + 4]  # exact similarity
                 + [src * [1, -1]])  # a reflection: Umeyama picks the best proper rotation
  got = L.similarity_2x2(src, dst)
  for k in range(dst.shape[0]):
    np.testing.assert_allclose(got[k], ref_similarity(src, dst[k]), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(got[20], [[0.3, 2.0], [-2.0, 0.3]], rtol=1e-12)


# --------------------------------------------------------------------------- edge cases


def test_outside_pixels_read_zero(sp, golden, golden_images):
  """Padding the image with zeros and shifting the boxes changes nothing: outside reads 0."""
  name = "fr_obama_and_biden.jpg"
  image = golden_images[name]
  boxes = golden["rects"][golden["names"] == name]
  # Boxes pushed over the image corner so many feature pixels fall outside.
  boxes = np.concatenate([boxes, [[-40, -30, 60, 70], [image.shape[1] - 60, 10, image.shape[1] + 60, 130]]])
  k = 37
  padded = np.pad(image, ((k, k), (k + 5, k + 5), (0, 0)))
  base = L.predict(sp, image, boxes)
  shifted = L.predict(sp, padded, boxes + [k + 5, k, k + 5, k])
  np.testing.assert_array_equal(shifted, base + [k + 5, k])


def test_box_outside_image_is_defined(sp):
  image = np.full((60, 80, 3), 200, np.uint8)
  box = np.array([[500, 500, 600, 600], [-300, -300, -200, -200]])
  got = L.predict(sp, image, box)
  # Every feature pixel reads 0, as on a black image: the same shape for both boxes (shifted).
  black = L.predict(sp, np.zeros_like(image), box)
  np.testing.assert_array_equal(got, black)
  np.testing.assert_array_equal(got[0] - [500, 500], got[1] - [-300, -300])
  assert np.all(got[0] >= 500) and np.all(got[0] <= 600)


def test_grayscale_and_empty(sp):
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, (120, 100), dtype=np.uint8)
  box = [[10, 20, 90, 100]]
  rgb = np.repeat(gray[..., None], 3, 2)
  np.testing.assert_array_equal(L.predict(sp, gray, box), L.predict(sp, rgb, box))
  out = L.predict(sp, gray, np.zeros((0, 4), np.int64))
  assert out.shape == (0, 5, 2) and out.dtype == np.int64


@pytest.mark.parametrize("image, boxes, match", [
    (np.zeros((10, 10, 3), np.float32), [[0, 0, 5, 5]], "uint8"),
    (np.zeros((10, 10, 4), np.uint8), [[0, 0, 5, 5]], r"\[H, W, 3\]"),
    (np.zeros((10, 10, 3), np.uint8), [0, 0, 5, 5], "wrap a single box"),
    (np.zeros((10, 10, 3), np.uint8), [[0, 0, 5]], r"\[N, 4\]"),
    (np.zeros((10, 10, 3), np.uint8), [[0, 0, 5.5, 5]], "integers"),
    (np.zeros((10, 10, 3), np.uint8), [["a", "b", "c", "d"]], "integer"),
])
def test_bad_inputs(sp, image, boxes, match):
  with pytest.raises(ValueError, match=match):
    L.predict(sp, image, boxes)


def test_bad_predictor():
  with pytest.raises(ValueError, match="ShapePredictor"):
    L.predict(object(), np.zeros((4, 4, 3), np.uint8), [[0, 0, 1, 1]])


def test_load_through_cache(tmp_path, monkeypatch, sp):
  """load_shape_predictor() converts once into the cache, then restores the same arrays."""
  monkeypatch.setenv("JAXFACE_CACHE", str(tmp_path))
  first = L.load_shape_predictor()
  assert any(p.name.startswith("shape5-") for p in tmp_path.iterdir())
  again = L.load_shape_predictor()
  for name, want in sp.model.to_dict().items():
    np.testing.assert_array_equal(getattr(first.model, name), want, err_msg=name)
    np.testing.assert_array_equal(getattr(again.model, name), want, err_msg=name)
    assert getattr(again.model, name).dtype == want.dtype


def test_load_unknown_model_name():
  with pytest.raises(ValueError, match="shape68"):
    L.load_shape_predictor(name="shape7")


# --------------------------------------------------------------------------- 68 points (dlib_golden_hog)


@pytest.fixture(scope="module")
def sp68() -> L.ShapePredictor:
  try:
    path = pretrained.model_file("shape68")
  except pretrained.PretrainedNotFoundError as e:
    pytest.skip(f"weights package not installed: {e}")
  return L.load_shape_predictor(path)  # direct parse (~10 s): leaves the user's cache alone


def _hog_image(root, path):
  import os

  from PIL import Image
  with Image.open(os.path.join(root, str(path))) as im:
    return np.asarray(im.convert("RGB"))


def test_golden_68_and_5_point_landmarks_exact(sp, sp68, hog_golden):
  """Every face of dlib_golden_hog (247 HOG boxes on 180 photos): the 68- and 5-point
  models' integer points equal dlib's."""
  g, root = hog_golden
  assert sp68.num_parts == 68
  checked = 0
  for i in np.unique(g["lm_image"]):
    sel = np.flatnonzero(g["lm_image"] == i)
    image = _hog_image(root, g["paths"][i])
    got68 = L.predict(sp68, image, g["lm_rect"][sel])
    got5 = L.predict(sp, image, g["lm_rect"][sel])
    assert got68.shape == (sel.size, 68, 2) and got68.dtype == np.int64
    bad = np.flatnonzero(np.any(got68 != g["lm68"][sel], axis=(1, 2)) | np.any(got5 != g["lm5"][sel], axis=(1, 2)))
    assert bad.size == 0, f"{g['paths'][i]}: faces {sel[bad].tolist()} differ from dlib"
    checked += sel.size
  assert checked == g["lm68"].shape[0] == 247


def test_68_point_matches_slow_reference(sp68, hog_golden):
  g, root = hog_golden
  image = _hog_image(root, g["paths"][g["lm_image"][0]])
  box = g["lm_rect"][0]
  boxes = np.array([box, box - [box[0] + 20, 0, box[0] + 20, 0]])  # and one cut by the left border
  got = L.predict(sp68, image, boxes)
  for i, b in enumerate(boxes):
    np.testing.assert_array_equal(got[i], ref_predict_one(sp68, image, b), err_msg=f"box {b}")
