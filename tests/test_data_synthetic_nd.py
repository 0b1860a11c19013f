"""Tests for jaxface.data.synthetic_nd: synthetic 1-D signals and 3-D volumes."""

import math

import numpy as np
import pytest

from jaxface.data import synthetic_nd as snd
from jaxface.data.source import ArraySource, split_by_identity


def _pair_separation(features: np.ndarray, labels: np.ndarray) -> float:
  """Mean different-identity distance minus mean same-identity distance, in units of their spread."""
  d = np.linalg.norm(features[:, None] - features[None], axis=-1)
  iu = np.triu_indices(len(labels), 1)
  same = (labels[:, None] == labels[None])[iu]
  d = d[iu]
  return float((d[~same].mean() - d[same].mean()) / d.std())


# --------------------------------------------------------------------------- signals


def test_signals_shapes_labels_names_and_range():
  s = snd.synthetic_signals(5, 3, length=64, channels=2)
  assert isinstance(s, ArraySource) and s.spatial_rank == 1
  assert s.images.shape == (15, 64, 2) and s.images.dtype == np.uint8
  assert s.image_shape == (64, 2)
  np.testing.assert_array_equal(s.labels, np.repeat(np.arange(5), 3))
  assert s.identity_names == [f"signal_{i:04d}" for i in range(5)]
  big = snd.synthetic_signals(40, 4)
  # Uses the 8-bit range without clipping much (a flat or saturated signal would fail).
  assert big.images.std() > 8
  assert np.mean((big.images == 0) | (big.images == 255)) < 1e-3
  # Every sample differs from the others of its identity (per-sample nuisance).
  a = big.images[:4].astype(int)
  assert min(np.abs(a[i] - a[j]).mean() for i in range(4) for j in range(i)) > 2


def test_signals_deterministic_seeded_and_independent_of_dataset_size():
  a = snd.synthetic_signals(4, 3, length=64, seed=1)
  np.testing.assert_array_equal(a.images, snd.synthetic_signals(4, 3, length=64, seed=1).images)
  assert np.abs(a.images.astype(int) - snd.synthetic_signals(4, 3, length=64, seed=2).images).mean() > 3
  np.testing.assert_array_equal(a.images, snd.synthetic_signals(7, 3, length=64, seed=1).images[:12])
  many = snd.synthetic_signals(4, 5, length=64, seed=1)
  np.testing.assert_array_equal(a.images, many.images[np.array([0, 1, 2, 5, 6, 7, 10, 11, 12, 15, 16, 17])])


def _slow_signal(p, q, length):
  """One signal, one value at a time, straight from the model's description."""
  c_count = p["gains"].shape[0]
  out = np.zeros((length, c_count))
  for t in range(length):
    beats = q["phase"] + (t / length) / (p["period"] * q["rate"])
    baseline = q["offset"] + q["wander"] * math.sin(
        2 * math.pi * q["wander_freq"] * t / length + q["wander_phase"])
    for c in range(c_count):
      v = 0.0
      for w in range(5):
        frac = (beats - p["center"][w]) % 1.0
        d = frac if frac < 0.5 else frac - 1.0  # nearest occurrence of wave w
        v += p["gains"][c, w] * p["height"][w] * math.exp(-0.5 * (d / p["width"][w]) ** 2)
      out[t, c] = q["amplitude"] * v + baseline
  return out


def test_signal_rendering_matches_a_slow_reference():
  ps = [snd._signal_identity(0, i, 3) for i in range(2)]
  qs = [snd._signal_nuisance(0, i, 2) for i in range(2)]
  p = {k: np.stack([ps[0][k], ps[0][k], ps[1][k], ps[1][k]]) for k in ps[0]}
  q = {k: np.concatenate([qs[0][k], qs[1][k]]) for k in qs[0]}
  got = snd._render_signals(p, q, 48)
  assert got.shape == (4, 48, 3) and got.dtype == np.float32
  for j in range(4):
    ref = _slow_signal({k: v[j].astype(np.float64) for k, v in p.items()},
                       {k: float(v[j]) for k, v in q.items()}, 48)
    np.testing.assert_allclose(got[j], ref, atol=2e-5)
  # And the uint8 codes are that rendering plus the identity's noise, quantized.
  s = snd.synthetic_signals(2, 2, length=48, channels=3)
  noise = np.concatenate([snd._noise_block(0, i, snd._TAG_SIGNAL, (2, 48, 3)) for i in range(2)])
  x = got + noise * q["noise"][:, None, None]
  np.testing.assert_array_equal(s.images, np.clip(np.rint(255 * (0.3 + 0.35 * x)), 0, 255))


def test_signal_identities_are_recognisable_by_a_phase_free_feature():
  s = snd.synthetic_signals(12, 6)
  # |FFT| ignores the random phase: same-identity signals must be closer than others.
  spec = np.abs(np.fft.rfft(s.images[..., 0].astype(np.float32), axis=1))[:, 1:40]
  # Shuffled labels give |separation| < ~0.1; the true ones about 1.2.
  assert _pair_separation(np.log1p(spec), s.labels) > 0.5


@pytest.mark.parametrize("kw,match", [
    (dict(num_identities=0), "num_identities must be an integer >= 1"),
    (dict(images_per_identity=2.0), "images_per_identity must be an integer"),
    (dict(length=16), "length must be an integer >= 32"),
    (dict(channels=13), "channels must be 1..12"),
    (dict(seed=-1), "seed must be"),
])
def test_signal_validation(kw, match):
  args = dict(num_identities=2, images_per_identity=2) | kw
  with pytest.raises(ValueError, match=match):
    snd.synthetic_signals(**args)


# --------------------------------------------------------------------------- volumes


def test_volumes_shapes_labels_names_and_split():
  v = snd.synthetic_volumes(6, 2, size=(12, 10, 8), channels=2)
  assert v.spatial_rank == 3 and v.image_shape == (12, 10, 8, 2)
  assert v.images.dtype == np.uint8 and v.images.shape == (12, 12, 10, 8, 2)
  np.testing.assert_array_equal(v.labels, np.repeat(np.arange(6), 2))
  assert v.identity_names[-1] == "volume_0005"
  cube = snd.synthetic_volumes(2, 1, size=9)
  assert cube.image_shape == (9, 9, 9, 1)
  # The identity machinery (subsets, splits) is rank-agnostic.
  train, held = split_by_identity(v, num_holdout=2)
  assert held.get(np.arange(len(held))).shape == (4, 12, 10, 8, 2)
  assert held.identity_names == ["volume_0004", "volume_0005"]


def test_volumes_deterministic_and_independent_of_dataset_size():
  a = snd.synthetic_volumes(3, 2, size=10)
  np.testing.assert_array_equal(a.images, snd.synthetic_volumes(5, 2, size=10).images[:6])
  many = snd.synthetic_volumes(3, 3, size=10)
  np.testing.assert_array_equal(a.images, many.images[np.array([0, 1, 3, 4, 6, 7])])
  assert np.abs(a.images.astype(int) - snd.synthetic_volumes(3, 2, size=10, seed=5).images).mean() > 3


def _slow_volume(p, q, size):
  """One volume, voxel by voxel: the same model written with scalars."""
  d_, h_, w_ = size
  channels = p["intensity"].shape[-1]
  out = np.zeros((d_, h_, w_, channels))
  ca, sa = math.cos(q["angle"]), math.sin(q["angle"])
  pix = (2.0 / min(size)) / q["scale"]
  for i in range(d_):
    for j in range(h_):
      for k in range(w_):
        z = (i + 0.5) / d_ * 2 - 1 - q["shift"][0]
        y = (j + 0.5) / h_ * 2 - 1 - q["shift"][1]
        x = (k + 0.5) / w_ * 2 - 1 - q["shift"][2]
        y, x = (ca * y + sa * x) / q["scale"], (-sa * y + ca * x) / q["scale"]
        z = z / q["scale"]
        v = np.full(channels, q["background"])
        for b in range(p["center"].shape[0]):
          c = p["center"][b] + q["jitter"][b]
          r = p["radii"][b]
          rho = math.sqrt(((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2)
          sdf = (rho - 1.0) * min(r)
          alpha = min(max(0.5 - sdf / pix, 0.0), 1.0)
          v = v + alpha * (p["intensity"][b] - v)
        out[i, j, k] = v * q["gain"]
  return out


def test_volume_rendering_matches_a_slow_reference():
  p1 = snd._volume_identity(0, 1, 2)
  q1 = snd._volume_nuisance(0, 1, 2)
  p = {k: np.stack([v, v]) for k, v in p1.items()}
  size = (7, 8, 9)
  got = snd._render_volumes(p, q1, size)
  assert got.shape == (2, 7, 8, 9, 2) and got.dtype == np.float32
  for j in range(2):
    ref = _slow_volume({k: v[j].astype(np.float64) for k, v in p.items()},
                       {k: np.asarray(v[j], np.float64) for k, v in q1.items()}, size)
    np.testing.assert_allclose(got[j], ref, atol=2e-5)
  assert got.std() > 0.05  # the blobs are inside the field of view


def test_volume_identities_are_recognisable_by_a_coarse_feature():
  v = snd.synthetic_volumes(10, 4, size=16)
  # 4x4x4 block means: robust to the small shifts and rotations of one identity.
  coarse = v.images[..., 0].astype(np.float32).reshape(40, 4, 4, 4, 4, 4, 4).mean(axis=(2, 4, 6))
  # Shuffled labels give |separation| < ~0.15; the true ones about 0.4.
  assert _pair_separation(coarse.reshape(40, -1), v.labels) > 0.25


@pytest.mark.parametrize("kw,match", [
    (dict(size=7), "size must be an integer >= 8"),
    (dict(size=(8, 8)), r"size must be an int or \(D, H, W\)"),
    (dict(size="big"), r"size must be an int or \(D, H, W\)"),
    (dict(channels=0), "channels must be an integer >= 1"),
    (dict(num_identities=True), "num_identities must be"),
])
def test_volume_validation(kw, match):
  args = dict(num_identities=2, images_per_identity=2) | kw
  with pytest.raises(ValueError, match=match):
    snd.synthetic_volumes(**args)


def test_array_source_spatial_rank_checks_the_layout():
  ok = ArraySource(np.zeros((3, 20, 2), np.uint8), [0, 1, 1], spatial_rank=1)
  assert ok.image_shape == (20, 2) and ok.spatial_rank == 1
  with pytest.raises(ValueError, match=r"images must be \[N, D, H, W, C\] for spatial_rank=3"):
    ArraySource(np.zeros((3, 8, 8, 2), np.uint8), [0, 1, 1], spatial_rank=3)
  with pytest.raises(ValueError, match="spatial_rank must be None, 1, 2 or 3"):
    ArraySource(np.zeros((3, 8, 2), np.uint8), [0, 1, 1], spatial_rank=4)
