"""Procedural identities of spatial rank 1 and 3: EKG-like signals and CT-like volumes.

Same scheme as ``synthetic.py``'s faces: an identity is a fixed set of shape
parameters drawn from ``SeedSequence([seed, identity, 0, tag])``; each sample
of it adds nuisance drawn from ``[seed, identity, 1, tag]`` and noise from
``[seed, identity, 2, tag]`` (``tag`` keeps signal, volume and face streams
apart). So an identity looks the same whatever ``num_identities`` is, and its
first k samples do not depend on ``images_per_identity``. Rendering is
vectorized NumPy over chunks of samples.
"""

from __future__ import annotations

import numpy as np

from jaxface.data.source import ArraySource
from jaxface.data.synthetic import _ellipse_sdf, _grid, _soft

_TAG_SIGNAL = 1
_TAG_VOLUME = 3
# Values rendered per vectorized chunk (float32 temporaries of a few MB).
_CHUNK_VALUES = 1 << 19

# Mean position within a beat (phase in [0, 1)), width (phase units) and
# height of the P, Q, R, S and T waves, before per-identity variation.
_WAVE_CENTER = np.array([0.18, 0.36, 0.40, 0.44, 0.66], np.float32)
_WAVE_WIDTH = np.array([0.035, 0.010, 0.013, 0.010, 0.055], np.float32)
_WAVE_HEIGHT = np.array([0.15, -0.15, 1.0, -0.25, 0.3], np.float32)
_NUM_BLOBS = 5


def _check_int(name: str, v, lo: int) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
    raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
  return int(v)


def _noise_block(seed: int, identity: int, tag: int, shape: tuple[int, ...]) -> np.ndarray:
  """Standard normal noise of the first shape[0] samples of an identity (row-major draws)."""
  return np.random.default_rng([seed, identity, 2, tag]).standard_normal(shape, dtype=np.float32)


# --------------------------------------------------------------------------- 1-D signals


def _signal_identity(seed: int, identity: int, channels: int) -> dict[str, np.ndarray]:
  r = np.random.default_rng([seed, identity, 0, _TAG_SIGNAL])
  center = _WAVE_CENTER + r.uniform(-0.03, 0.03, 5)
  width = _WAVE_WIDTH * r.uniform(0.7, 1.5, 5)
  height = _WAVE_HEIGHT * r.uniform(0.6, 1.4, 5)
  # Lead c sees each wave with its own gain (a different projection of the
  # heart's dipole); a single lead keeps gain 1.
  gains = np.ones((channels, 5)) if channels == 1 else r.uniform(0.3, 1.3, (channels, 5))
  return dict(
      period=np.float32(r.uniform(0.22, 0.38)),  # fraction of the window per beat
      center=center.astype(np.float32), width=width.astype(np.float32),
      height=height.astype(np.float32), gains=gains.astype(np.float32))


def _signal_nuisance(seed: int, identity: int, n: int) -> dict[str, np.ndarray]:
  r = np.random.default_rng([seed, identity, 1, _TAG_SIGNAL])
  z = r.uniform(0.0, 1.0, (n, 8)).astype(np.float32)  # row j depends on j only
  lerp = lambda t, a, b: np.float32(a) + np.float32(b - a) * t
  return dict(
      phase=z[:, 0], rate=lerp(z[:, 1], 0.96, 1.04), amplitude=lerp(z[:, 2], 0.75, 1.25),
      offset=lerp(z[:, 3], -0.1, 0.1), wander=lerp(z[:, 4], 0.0, 0.15),
      wander_freq=lerp(z[:, 5], 0.3, 1.5), wander_phase=lerp(z[:, 6], 0.0, 2 * np.pi),
      noise=lerp(z[:, 7], 0.02, 0.08))


def _render_signals(p: dict[str, np.ndarray], q: dict[str, np.ndarray], length: int) -> np.ndarray:
  """p: identity params per sample ([n], [n, 5], [n, C, 5]); q: nuisance [n]. Returns [n, T, C] float32."""
  t = (np.arange(length, dtype=np.float32) / length)[None, :]  # window position in [0, 1)
  beat = q["phase"][:, None] + t / (p["period"] * q["rate"])[:, None]  # [n, T] in beats
  # Distance in phase to each wave's centre, wrapped to [-0.5, 0.5) so every beat has the wave.
  d = np.mod(beat[:, :, None] - p["center"][:, None, :] + 0.5, 1.0) - 0.5  # [n, T, 5]
  waves = p["height"][:, None, :] * np.exp(-0.5 * np.square(d / p["width"][:, None, :]))
  x = np.einsum("ntw,ncw->ntc", waves, p["gains"])
  baseline = q["offset"][:, None] + q["wander"][:, None] * np.sin(
      2 * np.pi * q["wander_freq"][:, None] * t + q["wander_phase"][:, None])
  return q["amplitude"][:, None, None] * x + baseline[:, :, None]


def synthetic_signals(
    num_identities: int,
    images_per_identity: int,
    length: int = 256,
    channels: int = 1,
    seed: int = 0,
) -> ArraySource:
  """EKG-like 1-D signals of ``num_identities`` identities.

  An identity is a heartbeat template: five Gaussian waves (P, Q, R, S, T, in that
  order within a beat) whose positions, widths and heights are the identity's, a
  heart rate (beat period) and, for C > 1, per-lead gains of each wave. A sample is
  the template repeated at the identity's rate, starting at a random phase, with a
  random rate jitter (+-4%), amplitude (x0.75..1.25), baseline offset and wander (a
  slow sinusoid) and Gaussian noise. Values are stored as 8-bit codes,
  ``uint8 = round(255 * (0.3 + 0.35 * x))`` clipped, i.e. an 8-bit ADC with a
  mid-scale baseline.

  Args:
    num_identities: number of identities (named ``signal_0000``, ...).
    images_per_identity: signals (samples) of each identity.
    length: T, samples per signal (>= 32).
    channels: C, leads per signal, 1..12.
    seed: non-negative seed; everything is a deterministic function of it.

  Returns:
    ArraySource (``spatial_rank`` 1) with signals [N, T, C] uint8 and labels
    [N] int32 (identity-major: ``label = index // images_per_identity``).
  """
  num_identities = _check_int("num_identities", num_identities, 1)
  per = _check_int("images_per_identity", images_per_identity, 1)
  length = _check_int("length", length, 32)
  seed = _check_int("seed", seed, 0)
  channels = _check_int("channels", channels, 1)
  if channels > 12:
    raise ValueError(f"channels must be 1..12 (leads), got {channels}")
  ids = np.arange(num_identities)
  params = [_signal_identity(seed, int(i), channels) for i in ids]
  stacked = {k: np.stack([pp[k] for pp in params]) for k in params[0]}
  nuis = [_signal_nuisance(seed, int(i), per) for i in ids]
  nuisance = {k: np.concatenate([q[k] for q in nuis]) for k in nuis[0]}
  labels = np.repeat(ids, per).astype(np.int32)
  n_total = labels.shape[0]
  out = np.empty((n_total, length, channels), np.uint8)
  chunk = max(per, _CHUNK_VALUES // (length * 5 * channels)) // per * per  # whole identities
  for start in range(0, n_total, chunk):
    sl = slice(start, min(start + chunk, n_total))
    lab = labels[sl]
    x = _render_signals({k: v[lab] for k, v in stacked.items()},
                        {k: v[sl] for k, v in nuisance.items()}, length)
    noise = np.concatenate([_noise_block(seed, int(i), _TAG_SIGNAL, (per, length, channels))
                            for i in np.unique(lab)])
    x += noise * nuisance["noise"][sl][:, None, None]
    out[sl] = np.clip(np.rint(255.0 * (0.3 + 0.35 * x)), 0, 255).astype(np.uint8)
  return ArraySource(out, labels, [f"signal_{i:04d}" for i in ids], spatial_rank=1)


# --------------------------------------------------------------------------- 3-D volumes


def _volume_identity(seed: int, identity: int, channels: int) -> dict[str, np.ndarray]:
  r = np.random.default_rng([seed, identity, 0, _TAG_VOLUME])
  return dict(
      center=r.uniform(-0.5, 0.5, (_NUM_BLOBS, 3)).astype(np.float32),
      radii=r.uniform(0.12, 0.3, (_NUM_BLOBS, 3)).astype(np.float32),
      intensity=r.uniform(0.35, 1.0, (_NUM_BLOBS, channels)).astype(np.float32))


def _volume_nuisance(seed: int, identity: int, n: int) -> dict[str, np.ndarray]:
  r = np.random.default_rng([seed, identity, 1, _TAG_VOLUME])
  z = r.uniform(0.0, 1.0, (n, 8 + 3 * _NUM_BLOBS)).astype(np.float32)  # row j depends on j only
  lerp = lambda t, a, b: np.float32(a) + np.float32(b - a) * t
  return dict(
      shift=lerp(z[:, 0:3], -0.1, 0.1), angle=lerp(z[:, 3], -np.pi / 12, np.pi / 12),
      scale=lerp(z[:, 4], 0.92, 1.08), gain=lerp(z[:, 5], 0.8, 1.2),
      background=lerp(z[:, 6], 0.05, 0.2), noise=lerp(z[:, 7], 0.02, 0.06),
      jitter=lerp(z[:, 8:], -0.035, 0.035).reshape(n, _NUM_BLOBS, 3))


def _render_volumes(p: dict[str, np.ndarray], q: dict[str, np.ndarray],
                    size: tuple[int, int, int]) -> np.ndarray:
  """p: identity params per sample; q: nuisance. Returns [n, D, H, W, C] float32 without noise."""
  n = q["angle"].shape[0]
  e = lambda a: np.asarray(a, np.float32).reshape(n, 1, 1, 1)
  gz, gy, gx = (g[None] for g in _grid(size))
  # Body coordinates: undo the shift, the rotation in the H-W plane and the scale.
  z, y, x = gz - e(q["shift"][:, 0]), gy - e(q["shift"][:, 1]), gx - e(q["shift"][:, 2])
  cos, sin, s = np.cos(e(q["angle"])), np.sin(e(q["angle"])), e(q["scale"])
  y, x = (cos * y + sin * x) / s, (-sin * y + cos * x) / s
  z = z / s
  pix = (2.0 / min(size)) / s
  channels = p["intensity"].shape[-1]
  vol = np.broadcast_to(e(q["background"])[..., None], (n, *size, channels)).copy()
  centers = p["center"] + q["jitter"]
  for b in range(_NUM_BLOBS):
    c, r = centers[:, b], p["radii"][:, b]
    alpha = _soft(_ellipse_sdf([z, y, x], [e(c[:, 0]), e(c[:, 1]), e(c[:, 2])],
                               [e(r[:, 0]), e(r[:, 1]), e(r[:, 2])]), pix)
    colour = p["intensity"][:, b].reshape(n, 1, 1, 1, channels)
    vol += alpha[..., None] * (colour - vol)
  return vol * e(q["gain"])[..., None]


def synthetic_volumes(
    num_identities: int,
    images_per_identity: int,
    size: int | tuple[int, int, int] = 24,
    channels: int = 1,
    seed: int = 0,
) -> ArraySource:
  """CT-like 3-D volumes of ``num_identities`` blob arrangements.

  An identity is an arrangement of five soft-edged ellipsoidal blobs (centres,
  radii per axis and per-channel intensities). A sample places the arrangement
  with a random shift (+-0.1 of the half-width per axis), rotation in the H-W
  plane (+-15 degrees, as a patient lies differently in a scanner), scale
  (x0.92..1.08) and per-blob displacement (0.02), over a random background level,
  with an intensity scale and Gaussian noise.

  Args:
    num_identities: number of identities (named ``volume_0000``, ...).
    images_per_identity: volumes of each identity.
    size: (D, H, W), or one int for a cube; each >= 8.
    channels: C, 1..12 (e.g. imaging modalities).
    seed: non-negative seed; everything is a deterministic function of it.

  Returns:
    ArraySource (``spatial_rank`` 3) with volumes [N, D, H, W, C] uint8 and
    labels [N] int32 (identity-major).
  """
  num_identities = _check_int("num_identities", num_identities, 1)
  per = _check_int("images_per_identity", images_per_identity, 1)
  seed = _check_int("seed", seed, 0)
  channels = _check_int("channels", channels, 1)
  if channels > 12:
    raise ValueError(f"channels must be 1..12, got {channels}")
  dims = (size,) * 3 if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else size
  try:
    dims = tuple(dims)
  except TypeError:
    raise ValueError(f"size must be an int or (D, H, W), got {size!r}") from None
  if isinstance(size, str) or len(dims) != 3:
    raise ValueError(f"size must be an int or (D, H, W), got {size!r}")
  dims = tuple(_check_int("size", d, 8) for d in dims)
  ids = np.arange(num_identities)
  params = [_volume_identity(seed, int(i), channels) for i in ids]
  stacked = {k: np.stack([pp[k] for pp in params]) for k in params[0]}
  nuis = [_volume_nuisance(seed, int(i), per) for i in ids]
  nuisance = {k: np.concatenate([q[k] for q in nuis]) for k in nuis[0]}
  labels = np.repeat(ids, per).astype(np.int32)
  n_total = labels.shape[0]
  out = np.empty((n_total, *dims, channels), np.uint8)
  chunk = max(1, _CHUNK_VALUES // (int(np.prod(dims)) * channels))
  noise_rngs: dict[int, np.random.Generator] = {}
  for start in range(0, n_total, chunk):
    sl = slice(start, min(start + chunk, n_total))
    lab = labels[sl]
    vol = _render_volumes({k: v[lab] for k, v in stacked.items()},
                          {k: v[sl] for k, v in nuisance.items()}, dims)
    # Noise drawn sample by sample from each identity's own stream.
    noise = np.empty_like(vol)
    for j, i in enumerate(lab.tolist()):
      if i not in noise_rngs:
        noise_rngs[i] = np.random.default_rng([seed, i, 2, _TAG_VOLUME])
      noise[j] = noise_rngs[i].standard_normal(vol.shape[1:], dtype=np.float32)
    vol += noise * nuisance["noise"][sl].reshape(-1, 1, 1, 1, 1)
    out[sl] = np.clip(np.rint(vol * 255.0), 0, 255).astype(np.uint8)
  return ArraySource(out, labels, [f"volume_{i:04d}" for i in ids], spatial_rank=3)
