"""Procedural face-like identities for tests and quick experiments.

:func:`synthetic_faces` draws each identity's shape and colour parameters and
each image's nuisance (pose, expression, lighting, background, noise) from
seeded streams, so an identity looks the same whatever the number of identities
or images; rendering is vectorized NumPy.
"""

from __future__ import annotations

import numpy as np

from jaxface.data.source import ArraySource

# Pixels rendered per vectorized chunk: small enough that the float32
# temporaries (a few MB each) stay in cache, large enough to amortize Python.
_CHUNK_PIXELS = 1 << 18


# Rendering: every part is a soft mask computed from an approximate signed distance over
# a per-image coordinate grid, and parts are alpha-composited in order. The pieces take a
# grid of any rank (_grid, _ellipse_sdf), so other ranks could reuse this split later.
def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
  """Pixel-centre coordinates in [-1, 1] along each axis. len(shape) arrays, each of ``shape``."""
  axes = [(np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0 for n in shape]
  return list(np.meshgrid(*axes, indexing="ij"))


def _ellipse_sdf(coords: list[np.ndarray], center: list, radii: list) -> np.ndarray:
  """Approximate signed distance to an axis-aligned ellipse/ellipsoid (negative inside)."""
  r2 = sum(np.square((c - c0) / r) for c, c0, r in zip(coords, center, radii))
  rmin = radii[0]
  for r in radii[1:]:
    rmin = np.minimum(rmin, r)
  return (np.sqrt(r2) - 1.0) * rmin


def _soft(sdf: np.ndarray, pix) -> np.ndarray:
  """Antialiased coverage in [0, 1] of the region sdf < 0, one pixel wide edge."""
  return np.clip(0.5 - sdf / pix, 0.0, 1.0)


def _over(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
  """Composites ``colour`` [n,3,1,1] over ``img`` [n,3,H,W] (in place) with coverage ``alpha`` [n,H,W].

  Channels come first so that broadcasting ``alpha`` keeps the inner loop long.
  """
  tmp = np.subtract(colour, img, dtype=np.float32)
  tmp *= alpha[:, None]
  img += tmp
  return img


def _identity_params(seed: int, identity: int) -> dict[str, np.ndarray]:
  """Shape and colour parameters of one identity (scalars and RGB triples)."""
  r = np.random.default_rng([seed, identity, 0])
  u = r.uniform
  tone = u(0.0, 1.0)
  skin = (1 - tone) * np.array([0.36, 0.23, 0.16]) + tone * np.array([0.96, 0.80, 0.68])
  skin = np.clip(skin + r.normal(0, 0.03, 3), 0, 1)
  hair_base = [np.array(c) for c in ([0.08, 0.06, 0.05], [0.35, 0.2, 0.1], [0.85, 0.7, 0.4],
                                     [0.6, 0.25, 0.1], [0.7, 0.7, 0.7])]
  hair = np.clip(hair_base[r.integers(5)] * u(0.7, 1.2) + r.normal(0, 0.04, 3), 0, 1)
  iris_base = [np.array(c) for c in ([0.25, 0.15, 0.08], [0.2, 0.4, 0.7], [0.3, 0.5, 0.3])]
  iris = np.clip(iris_base[r.integers(3)] + r.normal(0, 0.05, 3), 0, 1)
  lips = np.clip(0.6 * skin + 0.4 * np.array([0.7, 0.25, 0.3]) + r.normal(0, 0.03, 3), 0, 1)
  p = dict(
      skin=skin, hair=hair, iris=iris, lips=lips,
      head_w=u(0.46, 0.62), head_h=u(0.62, 0.80),
      hair_thick=u(0.0, 0.16) * (u() > 0.1), hair_len=u(-0.25, 0.55), hairline=u(-0.62, -0.32),
      hair_curve=u(-0.4, 0.6),
      ear_size=u(0.07, 0.12),
      eye_y=u(-0.2, -0.05), eye_dx=u(0.16, 0.27), eye_rx=u(0.055, 0.095), eye_ry=u(0.028, 0.05),
      iris_r=u(0.45, 0.75),
      brow_gap=u(0.07, 0.14), brow_thick=u(0.012, 0.035), brow_tilt=u(-0.35, 0.35), brow_len=u(0.8, 1.3),
      nose_len=u(0.14, 0.28), nose_w=u(0.035, 0.075), nose_shade=u(0.72, 0.9),
      mouth_y=u(0.27, 0.42), mouth_w=u(0.11, 0.22), lip_thick=u(0.018, 0.04),
      glasses=float(u() < 0.25), glasses_r=u(1.3, 1.8),
      glasses_col=np.clip(np.array([0.1, 0.1, 0.1]) + u(0, 0.5) * r.uniform(0, 1, 3), 0, 1),
      beard=float(u() < 0.2), beard_top=u(0.05, 0.25),
  )
  return {k: np.asarray(v, np.float32) for k, v in p.items()}


_NUISANCE = ("tx", "ty", "rot", "scale", "yaw", "mouth_open", "smile", "eye_open", "brow_raise",
             "light", "grad_x", "grad_y", "tint_r", "tint_g", "tint_b", "bg_r", "bg_g", "bg_b",
             "bg_grad", "noise")


def _nuisance(seed: int, identity: int, n: int) -> dict[str, np.ndarray]:
  """Per-image pose, expression and lighting of the first ``n`` images of an identity. [n] each."""
  r = np.random.default_rng([seed, identity, 1])
  # Row-major draws: image j's row does not depend on n.
  z = r.uniform(0.0, 1.0, (n, len(_NUISANCE))).astype(np.float32)
  c = dict(zip(_NUISANCE, z.T))
  lerp = lambda t, a, b: a + (b - a) * t
  return dict(
      tx=lerp(c["tx"], -0.1, 0.1), ty=lerp(c["ty"], -0.08, 0.08),
      rot=lerp(c["rot"], -0.15, 0.15), scale=lerp(c["scale"], 0.85, 1.08),
      yaw=lerp(c["yaw"], -0.07, 0.07),
      mouth_open=c["mouth_open"] ** 2, smile=lerp(c["smile"], -0.5, 1.0),
      eye_open=lerp(c["eye_open"], 0.55, 1.1), brow_raise=lerp(c["brow_raise"], -0.02, 0.03),
      light=lerp(c["light"], 0.7, 1.2), grad_x=lerp(c["grad_x"], -0.3, 0.3),
      grad_y=lerp(c["grad_y"], -0.3, 0.3),
      tint=np.stack([lerp(c[k], -0.05, 0.05) for k in ("tint_r", "tint_g", "tint_b")], -1),
      bg=np.stack([lerp(c[k], 0.05, 0.95) for k in ("bg_r", "bg_g", "bg_b")], -1),
      bg_grad=lerp(c["bg_grad"], -0.25, 0.25), noise=lerp(c["noise"], 0.01, 0.05),
  )


def _render(p: dict[str, np.ndarray], q: dict[str, np.ndarray], size: int) -> np.ndarray:
  """Renders n faces. p: identity params per image ([n] or [n, 3]); q: nuisance [n].

  Returns:
    [n, 3, size, size] float32 (channels first), unclipped, without noise.
  """
  n = q["tx"].shape[0]
  e = lambda a: np.asarray(a, np.float32).reshape(n, 1, 1)  # [n] -> [n, 1, 1]
  col = lambda a: np.asarray(a, np.float32).reshape(n, 3, 1, 1)
  py, px = _grid((size, size))
  py, px = py[None], px[None]
  # Face coordinates: undo the per-image similarity transform.
  cos, sin, s = np.cos(e(q["rot"])), np.sin(e(q["rot"])), e(q["scale"])
  dx, dy = px - e(q["tx"]), py - e(q["ty"])
  x = (cos * dx + sin * dy) / s
  y = (-sin * dx + cos * dy) / s
  pix = (2.0 / size) / s
  # Features slide sideways relative to the head outline, as when a head turns.
  fx = x - e(q["yaw"])

  img = col(q["bg"]) * (1.0 + e(q["bg_grad"]) * ((px + py) * 0.5))[:, None]
  hw, hh, hc = e(p["head_w"]), e(p["head_h"]), np.float32(0.05)
  skin, hair = col(p["skin"]), col(p["hair"])

  # Hair behind the head, cut off at the hair length.
  ht = e(p["hair_thick"])
  back = _soft(_ellipse_sdf([x, y], [0.0, hc - 0.3 * ht], [hw + ht, hh + ht]), pix)
  back = back * _soft(y - e(p["hair_len"]), pix) * (ht > 0.005)
  img = _over(img, back, hair)
  # Ears at eye height.
  ear_y, er = e(p["eye_y"]) + 0.06, e(p["ear_size"])
  for side in (-1.0, 1.0):
    ear = _soft(_ellipse_sdf([x, y], [side * hw, ear_y], [0.55 * er, er]), pix)
    img = _over(img, ear, skin * 0.92)
  head_sdf = _ellipse_sdf([x, y], [0.0, hc], [hw, hh])
  head = _soft(head_sdf, pix)
  img = _over(img, head, skin)

  # Beard: the face below a per-identity line (the lips are drawn over it later).
  my, mw = e(p["mouth_y"]), e(p["mouth_w"])
  beard = head * _soft(my - e(p["beard_top"]) - y, pix) * e(p["beard"])
  img = _over(img, beard, hair * 0.9)
  # Fringe: hair inside the head above a curved hairline.
  fringe = head * _soft(y - (e(p["hairline"]) + e(p["hair_curve"]) * x * x), pix) * (ht > 0.005)
  img = _over(img, fringe, hair)

  ey, edx = e(p["eye_y"]), e(p["eye_dx"])
  erx, ery = e(p["eye_rx"]), e(p["eye_ry"]) * e(q["eye_open"])
  white = col(np.full((n, 3), 0.93))
  for side in (-1.0, 1.0):
    cx = side * edx
    # Brow: a thin tilted bar above the eye.
    by = ey - e(p["brow_gap"]) - e(q["brow_raise"])
    ty = y - by - side * e(p["brow_tilt"]) * (fx - cx) * 0.4
    brow = _soft(_ellipse_sdf([fx, ty], [cx, 0.0], [erx * e(p["brow_len"]), e(p["brow_thick"])]), pix)
    img = _over(img, brow, hair * 0.7)
    eye = _soft(_ellipse_sdf([fx, y], [cx, ey], [erx, ery]), pix)
    img = _over(img, eye, white)
    ir = erx * e(p["iris_r"]) * 0.6
    iris = eye * _soft(_ellipse_sdf([fx, y], [cx, ey], [ir, ir]), pix)
    img = _over(img, iris, col(p["iris"]))
    pupil = eye * _soft(_ellipse_sdf([fx, y], [cx, ey], [0.45 * ir, 0.45 * ir]), pix)
    img = _over(img, pupil, col(np.full((n, 3), 0.03)))
    # Glasses: a ring around each eye plus the bridge.
    gr = erx * e(p["glasses_r"])
    ring = _soft(np.abs(_ellipse_sdf([fx, y], [cx, ey], [gr, 0.8 * gr])) - 0.012, pix) * e(p["glasses"])
    img = _over(img, ring, col(p["glasses_col"]))
  bridge = (_soft(np.abs(y - ey) - 0.01, pix) * _soft(np.abs(fx) - (edx - erx * e(p["glasses_r"])), pix)
            * e(p["glasses"]))
  img = _over(img, bridge, col(p["glasses_col"]))

  # Nose: a shaded vertical ellipse between the eyes and the mouth.
  nl = e(p["nose_len"])
  nose = _soft(_ellipse_sdf([fx, y], [0.0, ey + 0.5 * nl + 0.02], [e(p["nose_w"]), 0.5 * nl]), pix)
  img = _over(img, nose, skin * e(p["nose_shade"])[:, None])
  # Mouth: lips bent by the smile, opening to a dark inside.
  mfy = y - my + e(q["smile"]) * 0.08 * ((fx / mw) ** 2 - 0.5)
  lip_ry = e(p["lip_thick"]) + 0.035 * e(q["mouth_open"])
  lips = _soft(_ellipse_sdf([fx, mfy], [0.0, 0.0], [mw, lip_ry]), pix)
  img = _over(img, lips, col(p["lips"]))
  inner = lips * _soft(_ellipse_sdf([fx, mfy], [0.0, 0.0], [0.8 * mw, 0.03 * e(q["mouth_open"]) + 1e-4]), pix)
  img = _over(img, inner, col(np.full((n, 3), 0.12)))

  # Lighting: overall brightness, a linear gradient and a colour tint.
  light = e(q["light"]) * (1.0 + e(q["grad_x"]) * px + e(q["grad_y"]) * py)
  return img * light[:, None] + col(q["tint"])


def synthetic_faces(
    num_identities: int,
    images_per_identity: int,
    image_size: int = 64,
    channels: int = 3,
    seed: int = 0,
) -> ArraySource:
  """Procedurally generated face-like images of ``num_identities`` people.

  Each identity is a fixed set of shape and colour parameters (head, hair, ears,
  eyes, brows, nose, mouth, optional glasses and beard) drawn from
  ``SeedSequence([seed, identity, 0])``; each image of it adds nuisance drawn from
  ``[seed, identity, 1]`` and pixel noise from ``[seed, identity, 2]``: pose
  (shift, rotation, scale, a yaw-like sideways shift of the features),
  expression (mouth opening and smile, eye opening, brow raise), lighting
  (brightness, gradient, tint), a random background and Gaussian noise. So an
  identity looks the same whatever ``num_identities`` is, and its first k images
  do not depend on ``images_per_identity``.

  Args:
    num_identities: number of identities (named ``synthetic_0000``, ...).
    images_per_identity: images of each identity.
    image_size: height and width in pixels (>= 16).
    channels: 3 (RGB) or 1 (luminance).
    seed: non-negative seed; everything is a deterministic function of it.

  Returns:
    ArraySource with images [N, image_size, image_size, channels] uint8 and
    labels [N] int32 (identity-major: ``label = index // images_per_identity``).
  """
  for name, v, lo in (("num_identities", num_identities, 1), ("images_per_identity", images_per_identity, 1),
                      ("image_size", image_size, 16), ("seed", seed, 0)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
      raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  ids = np.arange(num_identities)
  params = [_identity_params(seed, int(i)) for i in ids]
  stacked = {k: np.stack([pp[k] for pp in params]) for k in params[0]}
  nuis = [_nuisance(seed, int(i), images_per_identity) for i in ids]
  nuisance = {k: np.concatenate([q[k] for q in nuis]) for k in nuis[0]}
  labels = np.repeat(ids, images_per_identity).astype(np.int32)
  n_total = labels.shape[0]
  out = np.empty((n_total, image_size, image_size, channels), np.uint8)
  chunk = max(1, _CHUNK_PIXELS // (image_size * image_size))
  noise_rngs: dict[int, np.random.Generator] = {}
  for start in range(0, n_total, chunk):
    sl = slice(start, min(start + chunk, n_total))
    lab = labels[sl]
    img = _render({k: v[lab] for k, v in stacked.items()}, {k: v[sl] for k, v in nuisance.items()},
                  image_size)
    if channels == 1:
      img = np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), img, axes=(0, 1))[:, None]
    img = np.ascontiguousarray(img.transpose(0, 2, 3, 1))
    # Noise drawn identity by identity so each identity's stream is its own.
    noise = np.empty_like(img)
    for j, i in enumerate(lab.tolist()):
      if i not in noise_rngs:
        noise_rngs[i] = np.random.default_rng([seed, i, 2])
      noise[j] = noise_rngs[i].standard_normal(img.shape[1:], dtype=np.float32)
    img = img + noise * nuisance["noise"][sl].reshape(-1, 1, 1, 1)
    out[sl] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
  names = [f"synthetic_{i:04d}" for i in ids]
  return ArraySource(out, labels, names)
