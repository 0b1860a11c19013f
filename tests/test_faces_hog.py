"""dlib's HOG frontal face detector in JAX (jaxface.faces.hog) against dlib's own outputs."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from jaxface import faces
from jaxface.faces import hog

DATA = os.environ.get("JAXFACE_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
GOLDEN = os.path.join(DATA, "dlib_golden_hog", "golden.npz")
needs_golden = pytest.mark.skipif(
    not os.path.exists(GOLDEN),
    reason="needs shared/data/dlib_golden_hog/golden.npz (dlib 20.0.1's HOG detections; not in the repo)")


def _image(path: str) -> np.ndarray:
  from PIL import Image
  with Image.open(os.path.join(DATA, path)) as im:
    return np.asarray(im.convert("RGB"))  # as the golden set was made (face_recognition.load_image_file)


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN, allow_pickle=False) as z:
    return {k: z[k] for k in ("paths", "hog_image", "hog_upsample", "hog_rect", "hog_score", "hog_index")}


def _checked_images(paths) -> list[int]:
  """Every golden image with JAXFACE_HOG_GOLDEN=all (6 minutes on 2 cores); otherwise, for CI time,
  the photos of dlib_golden/images up to 0.6 megapixels (several faces, odd sizes) and every 8th
  LFW and AT&T image."""
  from PIL import Image
  if os.environ.get("JAXFACE_HOG_GOLDEN") == "all":
    return list(range(len(paths)))
  varied = [i for i, p in enumerate(paths) if str(p).startswith("dlib_golden/")]
  rest = [i for i in range(len(paths)) if i not in varied]
  small = []
  for i in varied:
    with Image.open(os.path.join(DATA, str(paths[i]))) as im:
      if im.size[0] * im.size[1] <= 600_000:
        small.append(i)
  return small + rest[::8]


@needs_golden
@pytest.mark.parametrize("upsample", [0, 1])
def test_matches_dlib_on_golden_images(golden, upsample):
  mismatched, max_err, n_dets, n_want = [], 0.0, 0, 0
  for i in _checked_images(golden["paths"]):
    path = golden["paths"][i]
    sel = (golden["hog_image"] == i) & (golden["hog_upsample"] == upsample)
    boxes, scores, index = hog.hog_detect(_image(str(path)), upsample)
    want_r, want_s, want_i = golden["hog_rect"][sel], golden["hog_score"][sel], golden["hog_index"][sel]
    n_want += len(want_r)
    if boxes.shape != want_r.shape or not (np.array_equal(boxes, want_r) and np.array_equal(index, want_i)):
      mismatched.append((str(path), boxes.tolist(), want_r.tolist()))
      continue
    n_dets += len(boxes)
    if len(scores):
      max_err = max(max_err, float(np.abs(scores - want_s).max()))
  assert not mismatched, f"{len(mismatched)} images differ from dlib: {mismatched[:3]}"
  assert max_err <= 1e-4, max_err
  assert n_dets == n_want > 20  # every expected face found (the checked images hold faces)


def test_pyramid_up_geometry():
  img = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
  up = hog.pyramid_up(img)
  assert up.shape == (11, 16, 3)  # dlib: (2H + 1) x (2W + 2)
  assert up[0, 0].tolist() == img[0, 0].tolist() and up[-1, -1].tolist() == img[-1, -1].tolist()
  assert hog.pyramid_up(img[..., 0]).shape == (11, 16)


def test_fhog_shape_and_range():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
  f = hog.fhog_features(img)
  assert f.shape == (31, 6, 8) and f.dtype == np.float32
  assert np.all(f >= 0) and np.all(f[:27] <= 0.8 + 1e-6)  # each truncated part <= 0.2 x 4 blocks
  assert hog.fhog_features(img[:10, :10]).shape == (31, 0, 0)


def test_jit_equals_eager_and_no_recompile():
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, size=(100, 90, 3), dtype=np.uint8)
  x, size = hog._padded(img)
  filters = hog.load_model()["filters"]
  with jax.disable_jit():
    eager = np.asarray(hog._level_scores(x, size, filters))
  jitted = np.asarray(hog._level_scores_jit(x, size, filters))
  np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-5)
  hog.hog_detect(img)
  n = hog._level_scores_jit._cache_size()
  hog.hog_detect(img)
  hog.hog_detect(img[::-1].copy())  # same shape: same programs
  assert hog._level_scores_jit._cache_size() == n


def test_grayscale_and_empty_and_errors():
  img = np.zeros((120, 100), np.uint8)
  b, s, d = hog.hog_detect(img)
  assert b.shape == (0, 4) and s.shape == (0,) and d.shape == (0,)
  assert hog.hog_detect(np.zeros((20, 20, 3), np.uint8))[0].shape == (0, 4)
  with pytest.raises(ValueError, match="uint8"):
    hog.hog_detect(np.zeros((50, 50, 3), np.float32))
  with pytest.raises(ValueError, match="upsample"):
    hog.hog_detect(np.zeros((50, 50, 3), np.uint8), upsample=5)


@needs_golden
def test_faces_detect_method_hog(golden):
  i = int(golden["hog_image"][(golden["hog_upsample"] == 1)][0])
  img = _image(str(golden["paths"][i]))
  boxes, scores = faces.detect(img, method="hog", return_scores=True)
  want, want_s, _ = hog.hog_detect(img, 1)
  np.testing.assert_array_equal(boxes, want)
  assert boxes.dtype == np.int64 and scores.dtype == np.float32
  np.testing.assert_allclose(scores, want_s, atol=1e-6)
  with pytest.raises(ValueError, match="method"):
    faces.detect(img, method="haar")
