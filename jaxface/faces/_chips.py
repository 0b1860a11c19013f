"""Aligned face chips from 5- or 68-point landmarks: dlib's ``get_face_chip`` (size 150, padding 0.25), in NumPy.

:func:`extract` reproduces dlib's chips: a least-squares similarity to the padded
5-point template (or, for 68-point landmarks, dlib's 68-point mean face on the
nose, eyes and outer/upper lips), a pyramid level for large faces, and bilinear
sampling in float64 in dlib's order of operations (its docstring gives the
steps); faces sampled straight from the image are vectorized in chunks of a few.
"""

from __future__ import annotations

import numpy as np

from jaxface.faces._landmarks import check_image

# dlib's 5-point mean face (x, y in [0, 1] before padding), in the landmark order of the 5-point model.
TEMPLATE_5 = np.array([
    (0.8595674595992, 0.2134981538014),
    (0.6460604764104, 0.2289674387677),
    (0.1205750620789, 0.2137274526848),
    (0.3340850613712, 0.2290642403242),
    (0.4901123135679, 0.6277975316475),
], np.float64)

# dlib's 68-point mean face (iBUG 300-W order), points 17..67, x and y in [0, 1] before padding.
# Data from dlib's get_face_chip_details (dlib/image_transforms/interpolation.h, dlib 19.x-20.x;
# Copyright Davis E. King, Boost Software License 1.0: https://www.boost.org/LICENSE_1_0.txt).
_MEAN_68_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689)
_MEAN_68_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182)
# dlib aligns 68-point faces on points 27..54 and 60..64: it skips the jaw (0-16), the
# eyebrows (17-26) and the lower lip (55-59, 65-67).
INDICES_68 = np.array([i for i in range(17, 68) if not (17 <= i <= 26 or 55 <= i <= 59 or 65 <= i <= 67)])
TEMPLATE_68 = np.stack([np.array(_MEAN_68_X), np.array(_MEAN_68_Y)], axis=1)[INDICES_68 - 17]

_PYR_OFFSET = np.array([1.25, 0.75])  # dlib's pyramid_down<2>: p_down = p / 2 - (1.25, 0.75)
_CHUNK_PIXELS = 2 * 150 * 150  # chip pixels sampled per vectorized call


# ---------------------------------------------------------------------------
# Geometry (float64, per face; small)
# ---------------------------------------------------------------------------


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Umeyama similarity src -> dst ([P, 2] each, float64): (2x2 s*R, translation [2])."""
  mean_src = src.mean(axis=0)
  mean_dst = dst.mean(axis=0)
  xs = src - mean_src
  yd = dst - mean_dst
  sigma = np.sum(xs * xs) / src.shape[0]
  a = np.sum(xs[:, 0] * yd[:, 0] + xs[:, 1] * yd[:, 1]) / src.shape[0]
  b = np.sum(xs[:, 0] * yd[:, 1] - xs[:, 1] * yd[:, 0]) / src.shape[0]
  m = np.array([[a, -b], [b, a]]) / sigma
  t = mean_dst - m @ mean_src
  return m, t


def chip_geometry(landmarks: np.ndarray, size: int, padding: float) -> tuple[np.ndarray, float]:
  """dlib's chip_details for one face: (rect [l, t, r, b] float64, angle in radians).

  ``landmarks`` [5, 2] or [68, 2]; with 68 points only :data:`INDICES_68` are used, as in dlib.
  """
  if landmarks.shape[0] == 68:
    template, dst = TEMPLATE_68, landmarks[INDICES_68]
  else:
    template, dst = TEMPLATE_5, landmarks
  src = (padding + template) / (2 * padding + 1) * size
  m, t = _similarity(src, dst.astype(np.float64))
  px, py = m[0, 0], m[1, 0]  # m @ (1, 0)
  angle = np.arctan2(py, px)
  scale = np.sqrt(px * px + py * py)
  cx = m[0, 0] * (size / 2.0) + m[0, 1] * (size / 2.0) + t[0]
  cy = m[1, 0] * (size / 2.0) + m[1, 1] * (size / 2.0) + t[1]
  half = (size * scale - 1) / 2
  return np.array([cx - half, cy - half, cx + half, cy + half]), float(angle)


def _area(rect: np.ndarray) -> float:
  """drectangle area: (r - l + 1) * (b - t + 1), 0 when empty."""
  w, h = rect[2] - rect[0] + 1, rect[3] - rect[1] + 1
  return 0.0 if rect[2] < rect[0] or rect[3] < rect[1] else w * h


def _rect_down(rect: np.ndarray) -> np.ndarray:
  return np.concatenate([rect[:2] / 2.0 - _PYR_OFFSET, rect[2:] / 2.0 - _PYR_OFFSET])


def _corners(rect: np.ndarray) -> np.ndarray:
  """tl, tr, bl, br of [l, t, r, b] -> [4, 2]."""
  l, t, r, b = rect
  return np.array([[l, t], [r, t], [l, b], [r, b]])


def _rotate(center: np.ndarray, pts: np.ndarray, angle: float) -> np.ndarray:
  """dlib's rotate_point: rotation by ``angle`` about ``center`` (float64)."""
  s, c = np.sin(angle), np.cos(angle)
  d = pts - center
  return np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], axis=1) + center


def _center(rect: np.ndarray) -> np.ndarray:
  return np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])


def _dlib_round(x):
  return np.floor(np.asarray(x, np.float64) + 0.5).astype(np.int64)


def plan(landmarks: np.ndarray, image_hw: tuple[int, int], size: int = 150,
         padding: float = 0.25) -> dict:
  """Where one chip comes from: source crop, pyramid depth and the chip -> source affine map.

  Returns a dict with ``crop`` (int [l, t, r, b] inclusive, in the image),
  ``levels`` (number of pyramid steps applied to the crop, 0 = sample the
  crop directly) and ``affine`` (float64 [2, 3]: source (x, y) = A @ (col, row, 1)).
  """
  rect, angle = chip_geometry(landmarks, size, padding)
  return plan_rect(rect, angle, image_hw, size)


def plan_rect(rect: np.ndarray, angle: float, image_hw: tuple[int, int], size: int) -> dict:
  """:func:`plan` from dlib's chip_details: float64 rect [l, t, r, b] and angle (radians)."""
  h, w = image_hw
  chip_area = float(size * size)
  # Pyramid depth and crop margin (dlib: grow = 2, then grow*2 + 2 per extra level).
  depth, grow = 0, 2.0
  r = _rect_down(rect)
  while _area(r) > chip_area:
    r = _rect_down(r)
    depth += 1
    grow = grow * 2 + 2
  rot = _rotate(_center(rect), _corners(rect), angle)
  box = np.array([rot[:, 0].min() - grow, rot[:, 1].min() - grow, rot[:, 0].max() + grow,
                  rot[:, 1].max() + grow])
  box = np.array([max(box[0], 0), max(box[1], 0), min(box[2], w - 1), min(box[3], h - 1)])
  crop = _dlib_round(box)
  # Level used for sampling (-1: the crop itself), in crop coordinates.
  level = -1
  r = rect - np.array([crop[0], crop[1], crop[0], crop[1]], np.float64)
  while _area(_rect_down(r)) > chip_area:
    level += 1
    r = _rect_down(r)
  # Affine map from chip corners (0,0), (size-1,0), (0,size-1) to the rotated rect's corners.
  to = _rotate(_center(r), _corners(r)[:3], angle)
  n = float(size - 1)
  a = np.empty((2, 3))
  a[:, 0] = (to[1] - to[0]) / n
  a[:, 1] = (to[2] - to[0]) / n
  a[:, 2] = to[0]
  return {"crop": crop, "levels": level + 1, "affine": a, "empty": bool(crop[2] < crop[0] or
                                                                          crop[3] < crop[1])}


# ---------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------


def pyramid_down(image: np.ndarray) -> np.ndarray:
  """dlib's pyramid_down<2> on uint8 [H, W, C]: 5x5 [1 4 6 4 1]^2 / 256 (floor), valid region, stride 2.

  Returns uint8 [(H - 3) // 2, (W - 3) // 2, C] (empty when H or W < 5):
  out[r, c] = floor(sum_{i,j} k_i k_j in[2r + i, 2c + j] / 256).
  """
  h, w = image.shape[:2]
  oh, ow = max((h - 3) // 2, 0), max((w - 3) // 2, 0)
  if oh == 0 or ow == 0:
    return np.zeros((oh, ow) + image.shape[2:], np.uint8)
  x = image.astype(np.int32)
  k = (1, 4, 6, 4, 1)
  horiz = sum(kj * x[:, j:j + 2 * ow - 1:2] for j, kj in enumerate(k))  # [H, ow, C]
  vert = sum(ki * horiz[i:i + 2 * oh - 1:2] for i, ki in enumerate(k))  # [oh, ow, C]
  return (vert >> 8).astype(np.uint8)


def _sample(src: np.ndarray, affine: np.ndarray, size: int, crops: np.ndarray | None = None) -> np.ndarray:
  """Bilinear sampling of uint8 [H, W, 3] ``src`` on K chip grids -> uint8 [K, size, size, 3].

  ``affine`` [K, 2, 3] maps chip (col, row, 1) into the coordinates of face k's source
  window; ``crops`` int [K, 4] (l, t, r, b) are those windows inside ``src`` (default: all of
  ``src``). A pixel whose 2x2 neighbourhood leaves its window is 0.
  """
  h, w = src.shape[:2]
  k = affine.shape[0]
  if crops is None:
    crops = np.tile(np.array([0, 0, w - 1, h - 1], np.int64), (k, 1))
  ox, oy = crops[:, 0, None, None], crops[:, 1, None, None]
  cw, ch = (crops[:, 2] - crops[:, 0] + 1)[:, None, None], (crops[:, 3] - crops[:, 1] + 1)[:, None, None]
  grid = np.arange(size, dtype=np.float64)
  col, row = grid[None, None, :], grid[None, :, None]
  x = affine[:, 0, 0, None, None] * col + affine[:, 0, 1, None, None] * row + affine[:, 0, 2, None, None]
  y = affine[:, 1, 0, None, None] * col + affine[:, 1, 1, None, None] * row + affine[:, 1, 2, None, None]
  left, top = np.floor(x), np.floor(y)
  ok = (left >= 0) & (top >= 0) & (left + 1 < cw) & (top + 1 < ch)
  base = (np.where(ok, top, 0).astype(np.int64) + oy) * w + np.where(ok, left, 0).astype(np.int64) + ox
  base = np.where(ok, base, 0)
  # One gather of the 2x2 neighbourhoods: [K, size, size, 4, C] (tl, tr, bl, br).
  quad = base[..., None] + np.array([0, 1, w, w + 1])
  quad[~ok] = 0
  q = src.reshape(-1, src.shape[2])[quad].astype(np.float64)
  lr = (x - left)[..., None]
  tb = (y - top)[..., None]
  # dlib's expression, same association and rounding: (1-tb)*((1-lr)*tl + lr*tr) + tb*((1-lr)*bl + lr*br);
  # the in-place steps perform exactly those IEEE operations with fewer temporaries.
  one_lr = 1 - lr
  upper = one_lr * q[..., 0, :]
  upper += lr * q[..., 1, :]
  lower = one_lr * q[..., 2, :]
  lower += lr * q[..., 3, :]
  upper *= 1 - tb
  lower *= tb
  upper += lower
  np.clip(upper, 0, 255, out=upper)
  v = upper.astype(np.uint8)  # truncation, as dlib's assign_pixel
  v[~ok] = 0
  return v


def extract(image, landmarks, size: int = 150, padding: float = 0.25) -> np.ndarray:
  """Aligned face chips, as dlib's ``get_face_chip(img, shape, size, padding)`` per face.

  Per face (each face is extracted as by its own ``get_face_chip`` call):

  1. Fit a least-squares similarity from the padded 5-point template (in chip
     pixels) to the landmarks: scale ``s`` and angle ``theta``. With 68-point
     landmarks the template is dlib's 68-point mean face restricted to
     :data:`INDICES_68` (nose, eyes, outer and upper inner lip: 33 points).
  2. The chip is the square of side ``size * s`` centred at the image of the chip
     centre, rotated by ``theta`` (dlib's ``chip_details``: a rectangle with
     half-width ``(size * s - 1) / 2`` and an angle).
  3. Large faces (the square, halved once, still covers more than size**2
     pixels) are sampled from a half-size pyramid level instead of the image:
     dlib crops the rotated square's bounding box grown by 6 pixels per level
     step (clipped to the image, rounded), then filters it with dlib's
     ``pyramid_down<2>`` (5x5 binomial [1 4 6 4 1]^2 kernel, integer floor of
     /256, no border padding, output (n - 3) // 2) and maps coordinates by
     ``p / 2 - (1.25, 0.75)`` per level.
  4. Bilinear sampling in float64 from the floor neighbours, with the value
     truncated to uint8; an output pixel with any neighbour outside the
     (cropped) source is 0.

  The float64 steps follow dlib's order of operations, since truncation to uint8
  turns 1-ulp differences on flat regions into 1-level differences.

  Args:
    image: uint8 [H, W, 3] RGB (or [H, W] grayscale, repeated to 3 channels).
    landmarks: [N, 5, 2] or [N, 68, 2] (x, y) landmarks (int or float) of dlib's
      5- or 68-point model, e.g. from :func:`jaxface.faces._landmarks.predict`.
    size: chip side in pixels (>= 2).
    padding: margin around the template face, as a fraction of its size (>= 0).
  Returns:
    uint8 [N, size, size, 3]; chip pixels whose source neighbourhood leaves
    the image are 0.
  """
  image = check_image(image)
  lm = np.asarray(landmarks)
  if lm.dtype.kind not in "iuf":
    raise ValueError(f"landmarks must be numeric, got {lm.dtype}")
  if lm.ndim != 3 or lm.shape[1:] not in ((5, 2), (68, 2)):
    raise ValueError(f"landmarks must be [N, 5, 2] or [N, 68, 2] (x, y), got shape {lm.shape}")
  if not np.all(np.isfinite(lm)) or np.any(np.abs(lm) > 1 << 30):
    raise ValueError("landmarks must be finite and within +-2**30")
  used = lm[:, INDICES_68] if lm.shape[1] == 68 else lm  # the points the alignment uses
  flat_faces = np.flatnonzero(np.all(used == used[:, :1], axis=(1, 2)))
  if flat_faces.size:
    raise ValueError(f"landmarks of face {int(flat_faces[0])} are all one point: no alignment exists")
  if not isinstance(size, (int, np.integer)) or not 2 <= size <= 4096:
    raise ValueError(f"size must be an integer in [2, 4096], got {size!r}")
  if not np.isfinite(padding) or padding < 0:
    raise ValueError(f"padding must be >= 0, got {padding!r}")
  if lm.shape[0] == 0:
    return np.zeros((0, size, size, 3), np.uint8)
  return _render(image, [plan(lm[i], image.shape[:2], size, padding) for i in range(lm.shape[0])], size)


def extract_rotated(image, rects, angles, size: int) -> np.ndarray:
  """Chips of dlib's ``chip_details(rect, chip_dims(size, size), angle)`` (``extract_image_chip``).

  Args:
    image: uint8 [H, W, 3] (or [H, W]).
    rects: float [N, 4] (l, t, r, b) source rectangles (dlib drectangles: inclusive, so a
      rectangle of side ``size`` at scale 1 spans ``r - l = size - 1``).
    angles: float [N], rotation of each rectangle about its centre (radians).
    size: chip side in pixels.
  Returns:
    uint8 [N, size, size, 3], sampled as :func:`extract` samples.
  """
  image = check_image(image)
  rects = np.asarray(rects, np.float64).reshape(-1, 4)
  angles = np.asarray(angles, np.float64).reshape(-1)
  if rects.shape[0] != angles.shape[0]:
    raise ValueError(f"rects and angles disagree: {rects.shape[0]} vs {angles.shape[0]}")
  if rects.shape[0] == 0:
    return np.zeros((0, size, size, 3), np.uint8)
  return _render(image, [plan_rect(r, float(a), image.shape[:2], size) for r, a in zip(rects, angles)], size)


def _render(image: np.ndarray, plans: list[dict], size: int) -> np.ndarray:
  """Samples the chips of :func:`plan` / :func:`plan_rect` results -> uint8 [len(plans), size, size, 3]."""
  out = np.zeros((len(plans), size, size, 3), np.uint8)
  # Faces sampled straight from the image: one vectorized call. dlib reads them from a crop
  # (the rotated square grown by 2 px, clipped): neighbours outside that crop count as outside.
  direct = [i for i, p in enumerate(plans) if p["levels"] == 0 and not p["empty"]]
  # Chunks of a few faces: each face's float64 intermediates take ~5 MB at size 150, and
  # staying near cache size is faster than one call over all faces (timings: BUILD.md,
  # "dlib face pipeline"). A large face is sampled from its own pyramid crop below.
  step = max(1, _CHUNK_PIXELS // (size * size))
  for s in range(0, len(direct), step):
    idx = direct[s:s + step]
    out[idx] = _sample(image, np.stack([plans[i]["affine"] for i in idx]), size,
                       np.stack([plans[i]["crop"] for i in idx]))
  for i, p in enumerate(plans):
    if p["levels"] == 0 or p["empty"]:
      continue
    l, t, r, b = p["crop"]
    src = image[t:b + 1, l:r + 1]
    for _ in range(p["levels"]):
      src = pyramid_down(src)
    if src.size:  # a crop that shrinks to nothing leaves the chip black, as every sample is outside
      out[i] = _sample(src, p["affine"][None], size)[0]
  return out
