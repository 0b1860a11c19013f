"""Tests for jaxface.faces._chips (faces.chips): golden parity with dlib's get_face_chip, a slow reference, edges.

The ``skimage_astronaut`` golden entry has no image in the data folder; it is
checked only when scikit-image is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from jaxface.faces import _chips as C

# --------------------------------------------------------------------------- slow reference


def ref_similarity(src, dst):
  """Umeyama via SVD (float64): (c*R, t)."""
  ms, md = src.mean(0), dst.mean(0)
  sigma = np.mean(np.sum((src - ms) ** 2, axis=1))
  cov = np.mean([np.outer(d - md, s - ms) for s, d in zip(src, dst)], axis=0)
  u, dv, vt = np.linalg.svd(cov)
  s = np.eye(2)
  if np.linalg.det(cov) < 0:
    s[1, 1] = -1
  cr = np.trace(np.diag(dv) @ s) / sigma * (u @ s @ vt)
  return cr, md - cr @ ms


def ref_pyramid_down(img):
  """2-D 5x5 binomial correlation (outer product kernel) on the valid region, every 2nd pixel."""
  k1 = np.array([1, 4, 6, 4, 1])
  k = np.outer(k1, k1)
  out = []
  for ch in range(img.shape[2]):
    full = ndimage.correlate(img[..., ch].astype(np.int64), k, mode="constant")
    valid = full[2:img.shape[0] - 2, 2:img.shape[1] - 2]  # kernel fully inside
    out.append(valid[::2, ::2][:(img.shape[0] - 3) // 2, :(img.shape[1] - 3) // 2] // 256)
  return np.stack(out, -1).astype(np.uint8)


def ref_chip(image, lm, size=150, padding=0.25):
  """get_face_chip for one face, written out step by step with per-pixel loops."""
  h, w = image.shape[:2]
  template = C.TEMPLATE_5
  if lm.shape[0] == 68:  # dlib aligns on the nose, eyes and outer/upper-inner lips only
    template, lm = C.TEMPLATE_68, lm[C.INDICES_68]
  src = (padding + template) / (2 * padding + 1) * size
  cr, t = ref_similarity(src, lm.astype(np.float64))
  angle = np.arctan2(cr[1, 0], cr[0, 0])
  scale = np.sqrt(cr[0, 0] ** 2 + cr[1, 0] ** 2)
  cx, cy = cr @ [size / 2, size / 2] + t
  half = (size * scale - 1) / 2
  rect = np.array([cx - half, cy - half, cx + half, cy + half])
  area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
  down = lambda r: np.array([r[0] / 2 - 1.25, r[1] / 2 - 0.75,  # noqa: E731
                             r[2] / 2 - 1.25, r[3] / 2 - 0.75])
  rot = lambda ctr, p: ctr + np.array([[np.cos(angle), -np.sin(angle)],  # noqa: E731
                                       [np.sin(angle), np.cos(angle)]]) @ (p - ctr)
  grow, r = 2.0, down(rect)
  while area(r) > size * size:
    r, grow = down(r), grow * 2 + 2
  ctr = np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])
  pts = np.array([rot(ctr, np.array(p)) for p in [(rect[0], rect[1]), (rect[2], rect[1]),
                                                  (rect[0], rect[3]), (rect[2], rect[3])]])
  l = int(np.floor(max(pts[:, 0].min() - grow, 0) + 0.5))
  tp = int(np.floor(max(pts[:, 1].min() - grow, 0) + 0.5))
  rr = int(np.floor(min(pts[:, 0].max() + grow, w - 1) + 0.5))
  b = int(np.floor(min(pts[:, 1].max() + grow, h - 1) + 0.5))
  if rr < l or b < tp:
    return np.zeros((size, size, 3), np.uint8)
  src_img = image[tp:b + 1, l:rr + 1]
  r = rect - [l, tp, l, tp]
  while area(down(r)) > size * size:
    r = down(r)
    src_img = ref_pyramid_down(src_img)
  ctr = np.array([(r[0] + r[2]) / 2, (r[1] + r[3]) / 2])
  to = [rot(ctr, np.array(p)) for p in [(r[0], r[1]), (r[2], r[1]), (r[0], r[3])]]
  # Affine through 3 point pairs, solved as a linear system.
  a = np.linalg.solve(np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1]], np.float64),
                      np.array(to)).T
  sh, sw = src_img.shape[:2]
  out = np.zeros((size, size, 3), np.uint8)
  for row in range(size):
    for col in range(size):
      x, y = a @ [col, row, 1]
      x0, y0 = int(np.floor(x)), int(np.floor(y))
      if x0 < 0 or y0 < 0 or x0 + 1 >= sw or y0 + 1 >= sh:
        continue
      fx, fy = x - x0, y - y0
      q = src_img[y0:y0 + 2, x0:x0 + 2].astype(np.float64)
      v = (1 - fy) * ((1 - fx) * q[0, 0] + fx * q[0, 1]) + fy * ((1 - fx) * q[1, 0] + fx * q[1, 1])
      out[row, col] = np.clip(v, 0, 255).astype(np.uint8)
  return out


# --------------------------------------------------------------------------- golden parity


def test_golden_chips_exact_including_pyramid_path(golden, golden_images):
  checked, pyramid, skipped = 0, [], 0
  for name, image in golden_images.items():
    sel = np.flatnonzero(golden["names"] == name)
    if image is None:
      skipped += sel.size
      continue
    got = C.extract(image, golden["landmarks5"][sel])
    assert got.shape == (sel.size, 150, 150, 3) and got.dtype == np.uint8
    for j, i in enumerate(sel):
      diff = np.abs(got[j].astype(np.int32) - golden["chips"][i])
      assert diff.max() == 0, f"{name} face {i}: {int((diff > 0).sum())} values differ, max {diff.max()}"
      if C.plan(golden["landmarks5"][i], image.shape[:2])["levels"] > 0:
        pyramid.append(int(i))
    checked += sel.size
  assert checked + skipped == golden["names"].size and checked >= 80
  # The large-face path (one pyramid level) is exercised by real golden faces.
  assert len(pyramid) >= 5, pyramid


def test_matches_slow_reference(golden, golden_images):
  cases = []
  name = "dlib_2008_002470.jpg"
  image = golden_images[name]
  lm = golden["landmarks5"][golden["names"] == name][:2]
  cases.append((image, lm))
  # A face partly outside the image (shift the landmarks over the left edge).
  cases.append((image, lm[:1] - [lm[0, :, 0].min() + 10, 0]))
  # A large face (pyramid path) cut by the image border.
  name = "fr_obama2.jpg"
  image = golden_images[name]
  lm = golden["landmarks5"][golden["names"] == name]
  cut = int(lm[0, :, 0].min()) - 60  # the crop's left edge falls inside the face's square
  cases.append((image[:, cut:], lm - [cut, 0]))
  assert C.plan(cases[-1][1][0], cases[-1][0].shape[:2])["levels"] == 1
  for image, lm in cases:
    got = C.extract(image, lm)
    for k in range(lm.shape[0]):
      np.testing.assert_array_equal(got[k], ref_chip(image, lm[k]))


def test_68_point_template_is_dlibs():
  # dlib's get_face_chip_details: points 27..54 and 60..64 of its mean face (17..67).
  assert C.INDICES_68.tolist() == list(range(27, 55)) + list(range(60, 65))
  assert C.TEMPLATE_68.shape == (33, 2)
  np.testing.assert_array_equal(C.TEMPLATE_68[0], [0.490127, 0.203352])  # point 27, top of the nose
  np.testing.assert_array_equal(C.TEMPLATE_68[3], [0.490127, 0.515625])  # point 30, tip of the nose
  np.testing.assert_array_equal(C.TEMPLATE_68[9], [0.121737, 0.216423])  # point 36, outer eye corner
  np.testing.assert_array_equal(C.TEMPLATE_68[-1], [0.689874, 0.784792])  # point 64, inner mouth corner


def test_68_point_chips_match_slow_reference(hog_golden):
  """68-point chips (get_face_chip_details' 68-point branch): the vectorized path, the
  pyramid path and a face cut by the border against the per-pixel reference. (Parity with
  dlib itself is checked through face_recognition's 'large' encodings, tests/test_face_recognition.py.)"""
  import os

  from PIL import Image
  g, root = hog_golden

  def face(j):
    with Image.open(os.path.join(root, str(g["paths"][g["lm_image"][j]]))) as im:
      return np.asarray(im.convert("RGB")), g["lm68"][j:j + 1].astype(np.int64)

  image, lm = face(0)
  big_image, big_lm = face(int(np.argmax(g["lm_rect"][:, 2] - g["lm_rect"][:, 0])))  # the largest face
  cases = [(image, lm), (image, lm - [lm[0, :, 0].min() + 10, 0]), (big_image, big_lm)]
  assert C.plan(lm[0], image.shape[:2])["levels"] == 0
  assert C.plan(big_lm[0], big_image.shape[:2])["levels"] >= 1  # the pyramid path
  for img, pts in cases:
    got = C.extract(img, pts)
    assert got.shape == (1, 150, 150, 3)
    np.testing.assert_array_equal(got[0], ref_chip(img, pts[0]))
  # The 68-point and 5-point alignments of one face agree closely (different templates).
  lm5 = g["lm5"][:1]
  r68, _ = C.chip_geometry(lm[0], 150, 0.25)
  r5, _ = C.chip_geometry(lm5[0], 150, 0.25)
  assert np.abs(r68 - r5).max() < 0.1 * (r5[2] - r5[0])


def test_batch_equals_one_by_one(golden, golden_images):
  name = "dlib_bald_guys.jpg"
  image = golden_images[name]
  lm = golden["landmarks5"][golden["names"] == name][:5]
  together = C.extract(image, lm)
  for i in range(lm.shape[0]):
    np.testing.assert_array_equal(C.extract(image, lm[i:i + 1])[0], together[i])


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("shape", [(5, 5, 3), (6, 9, 3), (23, 31, 3), (40, 17, 1)])
def test_pyramid_down_matches_reference(shape):
  rng = np.random.default_rng(shape[0])
  img = rng.integers(0, 256, shape, dtype=np.uint8)
  got = C.pyramid_down(img)
  assert got.shape == ((shape[0] - 3) // 2, (shape[1] - 3) // 2, shape[2])
  np.testing.assert_array_equal(got, ref_pyramid_down(img))
  assert C.pyramid_down(np.full((4, 9, 3), 7, np.uint8)).shape == (0, 3, 3)


def test_pyramid_down_of_constant_is_constant():
  # 16 * 16 * 255 / 256 = 255 exactly: no rounding loss at the top of the range.
  np.testing.assert_array_equal(C.pyramid_down(np.full((11, 12, 3), 255, np.uint8)), 255)


# --------------------------------------------------------------------------- edge cases


def _face(cx, cy, s):
  """Landmarks of an upright face of inter-ocular scale ``s`` centred near (cx, cy)."""
  return np.round(np.array([cx, cy]) + (C.TEMPLATE_5 - 0.5) * s).astype(np.int64)[None]


def test_face_at_border_is_zero_outside():
  image = np.full((200, 200, 3), 180, np.uint8)
  chip = C.extract(image, _face(5, 100, 60))[0]  # centred on the left edge
  # Left part of the chip maps outside the image: exactly 0; the right part reads the image.
  assert np.all(chip[:, :40] == 0)
  assert np.all(chip[:, -40:] >= 179)
  np.testing.assert_array_equal(chip, ref_chip(image, _face(5, 100, 60)[0]))


def test_face_outside_image_gives_black_chip():
  image = np.full((50, 60, 3), 255, np.uint8)
  for lm in (_face(-500, 20, 40), _face(30, 900, 40), _face(2000, 2000, 400),
             _face(-10**8, 25, 10**7), _face(30, 25, 10**8)):  # the last: huge face over a tiny image
    chip = C.extract(image, lm)
    assert chip.shape == (1, 150, 150, 3) and not chip.any()


def test_other_sizes_and_padding(golden, golden_images):
  name = "fr_obama2.jpg"
  image = golden_images[name]
  lm = golden["landmarks5"][golden["names"] == name]
  for size, padding in ((80, 0.25), (200, 0.4), (150, 0.0)):
    got = C.extract(image, lm, size=size, padding=padding)
    assert got.shape == (1, size, size, 3)
    np.testing.assert_array_equal(got[0], ref_chip(image, lm[0], size, padding))


def test_grayscale_float_landmarks_and_empty():
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (120, 130), dtype=np.uint8)
  lm = _face(60, 60, 50)
  np.testing.assert_array_equal(C.extract(gray, lm), C.extract(np.repeat(gray[..., None], 3, 2), lm))
  np.testing.assert_array_equal(C.extract(gray, lm.astype(np.float32)), C.extract(gray, lm))
  assert C.extract(gray, np.zeros((0, 5, 2))).shape == (0, 150, 150, 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"landmarks": np.zeros((1, 17, 2))}, r"\[N, 5, 2\] or \[N, 68, 2\]"),
    ({"landmarks": np.zeros((1, 68, 2))}, "all one point"),
    ({"landmarks": np.arange(68 * 2).reshape(1, 68, 2) * (np.arange(68) < 27)[None, :, None]}, "all one point"),
    ({"landmarks": np.full((1, 5, 2), np.nan)}, "finite"),
    ({"landmarks": np.full((1, 5, 2), 1e200)}, "finite"),
    ({"landmarks": np.full((2, 5, 2), 7)}, "all one point"),
    ({"size": 1}, "size"),
    ({"size": 150.0}, "size"),
    ({"padding": -0.1}, "padding"),
    ({"image": np.zeros((10, 10, 3), np.float32)}, "uint8"),
])
def test_bad_inputs(kwargs, match):
  args = {"image": np.zeros((100, 100, 3), np.uint8), "landmarks": _face(50, 50, 30)} | kwargs
  with pytest.raises(ValueError, match=match):
    C.extract(**args)
