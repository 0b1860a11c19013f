"""Tests for jaxface.data.augment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.data import augment as aug
from jaxface.data.augment import _affine_crop, _random_erase


def _images(b=6, h=12, w=10, c=3, seed=0, lo=0.0, hi=1.0):
  return np.random.default_rng(seed).uniform(lo, hi, (b, h, w, c)).astype(np.float32)


def _find_crop(img, out):
  """All (top, left, flipped) whose NumPy crop of img equals out exactly."""
  ch, cw = out.shape[:2]
  hits = []
  for oy in range(img.shape[0] - ch + 1):
    for ox in range(img.shape[1] - cw + 1):
      window = img[oy:oy + ch, ox:ox + cw]
      for flipped, cand in ((False, window), (True, window[:, ::-1])):
        if np.array_equal(cand, out):
          hits.append((oy, ox, flipped))
  return hits


def test_to_float():
  x = np.array([[0, 1, 128, 255]], np.uint8)
  y = aug.to_float(x)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), x / 255.0, rtol=1e-7)
  with pytest.raises(ValueError, match="uint8"):
    aug.to_float(np.zeros(3, np.float32))


def test_center_crop_matches_numpy():
  x = _images(2, 9, 8, 1)
  np.testing.assert_array_equal(aug.center_crop(x, (5, 4)), x[:, 2:7, 2:6])
  np.testing.assert_array_equal(np.asarray(aug.center_crop(jnp.asarray(x), (9, 8))), x)
  with pytest.raises(ValueError, match=r"crop_size=\(10, 4\) does not fit"):
    aug.center_crop(x, (10, 4))


def test_crop_at_matches_numpy_slicing():
  x = _images(4, 12, 10, 3)
  offsets = np.array([[0, 0], [4, 3], [2, 5], [5, 0]], np.int32)
  for fn in (aug.crop_at, jax.jit(aug.crop_at, static_argnums=2)):
    out = np.asarray(fn(jnp.asarray(x), jnp.asarray(offsets), (7, 5)))
    for i, (oy, ox) in enumerate(offsets):
      np.testing.assert_array_equal(out[i], x[i, oy:oy + 7, ox:ox + 5])
  with pytest.raises(ValueError, match=r"offsets must be \[B, 2\]"):
    aug.crop_at(jnp.asarray(x), jnp.zeros((3, 2), jnp.int32), (7, 5))


def test_vmap_equals_loop_and_determinism():
  x = jnp.asarray(_images(5))
  rng = jax.random.key(3)
  kw = dict(crop_size=(8, 7), flip=True, brightness=0.2, contrast=0.3)
  out = aug.augment(rng, x, **kw)
  assert out.shape == (5, 8, 7, 3) and out.dtype == jnp.float32
  keys = jax.random.split(rng, 5)
  loop = jnp.stack([aug.augment_single(keys[i], x[i], **kw) for i in range(5)])
  # Same ops per image; only the per-image mean reduction order may differ under vmap.
  np.testing.assert_allclose(np.asarray(out), np.asarray(loop), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(aug.augment(rng, x, **kw)))
  assert not np.allclose(out, aug.augment(jax.random.key(4), x, **kw))
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_crop_only_is_a_numpy_crop_at_varied_offsets():
  x = _images(16, 12, 10, 2, seed=1)
  out = np.asarray(aug.augment(jax.random.key(0), jnp.asarray(x), crop_size=(7, 6), flip=False,
                               brightness=0.0, contrast=0.0))
  offsets = set()
  for i in range(16):
    hits = [h for h in _find_crop(x[i], out[i]) if not h[2]]
    assert hits, f"image {i} is not an unflipped crop of its input"
    offsets.add(hits[0][:2])
  assert len(offsets) > 4  # 30 possible offsets; 16 draws hitting <= 4 would mean a broken sampler


def test_flip_happens_about_half_the_time():
  x = _images(32, 8, 8, 1, seed=2)
  out = np.asarray(aug.augment(jax.random.key(1), jnp.asarray(x), crop_size=(8, 8), flip=True,
                               brightness=0.0, contrast=0.0))
  flipped = []
  for i in range(32):
    if np.array_equal(out[i], x[i]):
      flipped.append(False)
    else:
      np.testing.assert_array_equal(out[i], x[i, :, ::-1])
      flipped.append(True)
  assert 0 < sum(flipped) < 32  # P(all same) = 2**-31


def test_brightness_is_a_constant_shift():
  # Inputs in [0.3, 0.7] so a shift of at most 0.2 never clips.
  x = _images(8, 6, 5, 3, seed=3, lo=0.3, hi=0.7)
  out = np.asarray(aug.augment(jax.random.key(2), jnp.asarray(x), crop_size=(6, 5), flip=False,
                               brightness=0.2, contrast=0.0))
  delta = (out - x).reshape(8, -1)
  np.testing.assert_allclose(delta, delta[:, :1] * np.ones_like(delta), atol=1e-6)
  assert np.abs(delta[:, 0]).max() <= 0.2 + 1e-6
  assert np.std(delta[:, 0]) > 0.01


def test_contrast_scales_deviation_from_channel_mean():
  x = _images(8, 6, 5, 3, seed=4, lo=0.4, hi=0.6)
  out = np.asarray(aug.augment(jax.random.key(5), jnp.asarray(x), crop_size=(6, 5), flip=False,
                               brightness=0.0, contrast=0.3))
  dev_in = x - x.mean(axis=(1, 2), keepdims=True)
  dev_out = out - out.mean(axis=(1, 2), keepdims=True)
  factor = (dev_out * dev_in).sum(axis=(1, 2, 3)) / (dev_in ** 2).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(dev_out, factor[:, None, None, None] * dev_in, atol=1e-5)
  np.testing.assert_allclose(out.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-5)
  assert ((factor >= 0.7 - 1e-5) & (factor <= 1.3 + 1e-5)).all() and np.std(factor) > 0.02


def test_clipped_to_unit_range():
  x = jnp.asarray(_images(8, 6, 6, 3, seed=5))
  out = aug.augment(jax.random.key(6), x, crop_size=(6, 6), brightness=1.0, contrast=0.9)
  assert float(out.min()) == 0.0 and float(out.max()) == 1.0


def test_no_recompile_on_second_call():
  x = jnp.asarray(_images(4, 10, 10, 3))
  kw = dict(crop_size=(8, 8), flip=True, brightness=0.1, contrast=0.1)
  aug.augment(jax.random.key(0), x, **kw)
  before = aug._augment_jit._cache_size()
  aug.augment(jax.random.key(1), x + 0.0, **kw)
  aug.augment(jax.random.key(2), jnp.asarray(_images(4, 10, 10, 3, seed=9)), **dict(kw, crop_size=[8, 8]))
  assert aug._augment_jit._cache_size() == before
  # Also inside a caller's jit: traced once.
  traces = []

  @jax.jit
  def step(rng, images):
    traces.append(1)
    return aug.augment(rng, images, **kw).mean()

  step(jax.random.key(0), x)
  step(jax.random.key(1), x * 0.5)
  assert len(traces) == 1


def test_augment_validation():
  x = jnp.asarray(_images(2, 6, 6, 3))
  with pytest.raises(ValueError, match="use to_float"):
    aug.augment(jax.random.key(0), jnp.zeros((2, 6, 6, 3), jnp.uint8), crop_size=(4, 4))
  with pytest.raises(ValueError, match=r"crop_size=\(7, 4\) does not fit"):
    aug.augment(jax.random.key(0), x, crop_size=(7, 4))
  with pytest.raises(ValueError, match="crop_size must be a pair"):
    aug.augment(jax.random.key(0), x, crop_size=4)
  with pytest.raises(ValueError, match="contrast must be in"):
    aug.augment(jax.random.key(0), x, crop_size=(4, 4), contrast=1.0)
  with pytest.raises(ValueError, match=r"images must be \[B, H, W, C\]"):
    aug.augment(jax.random.key(0), x[0], crop_size=(4, 4))


def _brute_affine(image, oy, ox, crop, s, theta):
  """Bilinear sampling with edge clamping, one output pixel at a time."""
  h, w, c = image.shape
  ch, cw = crop
  out = np.zeros((ch, cw, c))
  for i in range(ch):
    for j in range(cw):
      y, x = i - (ch - 1) / 2, j - (cw - 1) / 2
      sy = oy + (ch - 1) / 2 + (np.cos(theta) * y - np.sin(theta) * x) / s
      sx = ox + (cw - 1) / 2 + (np.sin(theta) * y + np.cos(theta) * x) / s
      y0, x0 = int(np.floor(sy)), int(np.floor(sx))
      fy, fx = sy - y0, sx - x0
      for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                          (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        out[i, j] += wgt * image[min(max(y0 + dy, 0), h - 1), min(max(x0 + dx, 0), w - 1)]
  return out


def test_affine_crop_matches_brute_force_bilinear_sampling():
  rng = np.random.default_rng(0)
  image = rng.random((12, 10, 2)).astype(np.float32)
  key = jax.random.key(3)
  got = np.asarray(_affine_crop(key, jnp.asarray(image), 1, 2, (8, 6), 0.3, 30.0))
  k_s, k_r = jax.random.split(key)
  s = float(jax.random.uniform(k_s, (), jnp.float32, 0.7, 1.3))
  theta = float(np.deg2rad(jax.random.uniform(k_r, (), jnp.float32, -30.0, 30.0)))
  # float32 trigonometry and coordinates vs float64 reference: a few ulps of a [0, 1] pixel.
  np.testing.assert_allclose(got, _brute_affine(image, 1, 2, (8, 6), s, theta), atol=2e-5)


def test_scale_and_rotate_change_images_but_zero_strength_is_a_plain_crop():
  images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
  kw = dict(crop_size=(12, 12), flip=False, brightness=0.0, contrast=0.0)
  plain = aug.augment(jax.random.key(1), images, **kw)
  warped = aug.augment(jax.random.key(1), images, scale=0.2, rotate=20.0, **kw)
  assert warped.shape == plain.shape and not np.allclose(plain, warped)
  assert float(warped.min()) >= 0.0 and float(warped.max()) <= 1.0
  with pytest.raises(ValueError, match="rotate"):
    aug.augment(jax.random.key(1), images, rotate=90.0, **kw)
  with pytest.raises(ValueError, match="scale"):
    aug.augment(jax.random.key(1), images, scale=0.9, **kw)


def test_random_erase_replaces_one_rectangle_and_prob_zero_or_one_behaves():
  image = jnp.full((20, 16, 1), 0.5, jnp.float32)
  changed_fracs = []
  for i in range(20):
    out = np.asarray(_random_erase(jax.random.key(i), image, 1.0))[..., 0]
    changed = out != 0.5
    ys, xs = np.nonzero(changed)
    assert ys.size > 0
    # The changed pixels fill their bounding box (one axis-aligned rectangle; a noise
    # value equal to 0.5 exactly has probability ~0).
    box = changed[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert box.all()
    changed_fracs.append(changed.mean())
  # Area 2-25% of the image (clipping at the border can only shrink it; rounding to
  # whole pixels can add up to one row and column).
  assert 0.0 < min(changed_fracs) and max(changed_fracs) <= 0.25 + (20 + 16) / 320
  untouched = np.asarray(_random_erase(jax.random.key(0), image, 0.0))
  np.testing.assert_array_equal(untouched, np.asarray(image))
  with pytest.raises(ValueError, match="erase"):
    aug.augment(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), crop_size=(8, 8), erase=1.5)
