"""Tests for jaxface.data.augment on 1-D signals [B, T, C] and 3-D volumes [B, D, H, W, C]."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.data import augment as aug


def _uniform(shape, seed=0, lo=0.0, hi=1.0):
  return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


def _windows(x, crop):
  """Every (offset, window) of sample x [*spatial, C] with window size crop, by slicing."""
  ranges = [range(n - c + 1) for n, c in zip(x.shape[:-1], crop)]
  for off in itertools.product(*ranges):
    yield off, x[tuple(slice(o, o + c) for o, c in zip(off, crop))]


def test_center_crop_and_crop_at_match_numpy_slicing():
  sig = _uniform((3, 20, 2))
  np.testing.assert_array_equal(aug.center_crop(sig, (15,)), sig[:, 2:17])
  vol = _uniform((2, 9, 8, 7, 1))
  np.testing.assert_array_equal(aug.center_crop(vol, (5, 4, 6)), vol[:, 2:7, 2:6, 0:6])
  off = np.array([[0, 1, 0], [4, 4, 1]], np.int32)
  out = np.asarray(aug.crop_at(jnp.asarray(vol), jnp.asarray(off), (5, 4, 6)))
  for i, (a, b, c) in enumerate(off):
    np.testing.assert_array_equal(out[i], vol[i, a:a + 5, b:b + 4, c:c + 6])
  out = np.asarray(aug.crop_at(jnp.asarray(sig), jnp.asarray([[0], [5], [2]], np.int32), (15,)))
  np.testing.assert_array_equal(out[1], sig[1, 5:20])
  with pytest.raises(ValueError, match=r"offsets must be \[B, 3\]"):
    aug.crop_at(jnp.asarray(vol), jnp.zeros((2, 2), jnp.int32), (5, 4, 6))
  with pytest.raises(ValueError, match=r"images must be \[B, T, C\]"):
    aug.center_crop(vol, (5,))


@pytest.mark.parametrize("shape,crop", [((12, 30, 2), (22,)), ((10, 7, 6, 5, 1), (5, 4, 4))])
def test_crop_only_is_a_numpy_window_at_varied_offsets(shape, crop):
  x = _uniform(shape, seed=1)
  out = np.asarray(aug.augment(jax.random.key(0), jnp.asarray(x), crop_size=crop, flip=False,
                               brightness=0.0, contrast=0.0))
  assert out.shape == (shape[0], *crop, shape[-1])
  offsets = set()
  for i in range(shape[0]):
    hits = [off for off, w in _windows(x[i], crop) if np.array_equal(w, out[i])]
    assert hits, f"sample {i} is not a crop of its input"
    offsets.add(hits[0])
  assert len(offsets) > 3


def test_volume_flip_mirrors_the_last_spatial_axis_about_half_the_time():
  x = _uniform((32, 4, 5, 6, 2), seed=2)
  out = np.asarray(aug.augment(jax.random.key(1), jnp.asarray(x), crop_size=(4, 5, 6), flip=True,
                               brightness=0.0, contrast=0.0))
  flipped = []
  for i in range(32):
    if np.array_equal(out[i], x[i]):
      flipped.append(False)
    else:
      np.testing.assert_array_equal(out[i], x[i, :, :, ::-1])
      flipped.append(True)
  assert 0 < sum(flipped) < 32


def test_signal_amplitude_scale_and_offset():
  # contrast scales each channel about its mean (amplitude), brightness shifts it (baseline).
  x = _uniform((8, 40, 2), seed=3, lo=0.4, hi=0.6)
  out = np.asarray(aug.augment(jax.random.key(5), jnp.asarray(x), crop_size=(40,), flip=False,
                               brightness=0.1, contrast=0.3))
  dev_in = x - x.mean(axis=1, keepdims=True)
  dev_out = out - out.mean(axis=1, keepdims=True)
  factor = (dev_out * dev_in).sum(axis=(1, 2)) / (dev_in ** 2).sum(axis=(1, 2))
  np.testing.assert_allclose(dev_out, factor[:, None, None] * dev_in, atol=1e-5)
  assert ((factor >= 0.7 - 1e-5) & (factor <= 1.3 + 1e-5)).all() and np.std(factor) > 0.02
  shift = out.mean(axis=1) - x.mean(axis=1)  # [8, 2]: one offset per sample, both channels
  np.testing.assert_allclose(shift[:, 0], shift[:, 1], atol=1e-5)
  assert np.abs(shift).max() <= 0.1 + 1e-5 and np.std(shift[:, 0]) > 0.01


def test_noise_has_the_requested_spread_and_zero_is_off():
  x = _uniform((4, 2000, 1), seed=4, lo=0.45, hi=0.55)
  kw = dict(crop_size=(2000,), flip=False, brightness=0.0, contrast=0.0)
  same = np.asarray(aug.augment(jax.random.key(0), jnp.asarray(x), noise=0.0, **kw))
  np.testing.assert_array_equal(same, x)
  noisy = np.asarray(aug.augment(jax.random.key(0), jnp.asarray(x), noise=0.05, **kw))
  resid = noisy - x
  # 8000 draws: the std estimate is within ~2% of 0.05, the mean within ~0.002 of 0.
  assert 0.046 < resid.std() < 0.054 and abs(resid.mean()) < 0.003
  assert not np.allclose(resid[0], resid[1])  # each sample draws its own noise


def test_vmap_equals_loop_for_volumes_and_no_recompile():
  x = jnp.asarray(_uniform((3, 6, 7, 8, 2), seed=5))
  rng = jax.random.key(3)
  kw = dict(crop_size=(5, 5, 6), flip=True, brightness=0.2, contrast=0.3, noise=0.02)
  out = aug.augment(rng, x, **kw)
  keys = jax.random.split(rng, 3)
  loop = jnp.stack([aug.augment_single(keys[i], x[i], **kw) for i in range(3)])
  np.testing.assert_allclose(np.asarray(out), np.asarray(loop), atol=1e-6)
  before = aug._augment_jit._cache_size()
  aug.augment(jax.random.key(4), x * 0.5, **kw)
  assert aug._augment_jit._cache_size() == before


@pytest.mark.parametrize("images,kw,match", [
    ((2, 20, 1), dict(crop_size=(16,), scale=0.1), "image \\(2-D\\) augmentations"),
    ((2, 8, 8, 8, 1), dict(crop_size=(6, 6, 6), rotate=5.0), "image \\(2-D\\) augmentations"),
    ((2, 8, 8, 8, 1), dict(crop_size=(6, 6, 6), erase=0.5), "image \\(2-D\\) augmentations"),
    ((2, 20, 1), dict(crop_size=(16, 16)), r"images must be \[B, H, W, C\]"),
    ((2, 20, 1), dict(crop_size=(21,)), r"crop_size=\(21,\) does not fit"),
    ((2, 20, 1), dict(crop_size=(16,), noise=0.6), "noise must be in"),
    ((2, 20, 1), dict(crop_size=(1, 2, 3, 4)), "crop_size must be a pair"),
])
def test_rank_specific_validation(images, kw, match):
  with pytest.raises(ValueError, match=match):
    aug.augment(jax.random.key(0), jnp.zeros(images, jnp.float32), **kw)
