"""dlib's HOG frontal face detector (``get_frontal_face_detector()``) in JAX.

:func:`hog_detect` reproduces ``dlib.get_frontal_face_detector().run(img, upsample, adjust)``:

1. ``upsample`` times ``pyramid_up`` (bilinear, dlib's ``pyramid_down<2>`` geometry: an
   ``H x W`` image becomes ``(2H + 1) x (2W + 2)``);
2. the image pyramid ``pyramid_down<6>`` (each level ``floor(5/6)`` of the previous one,
   bilinear; levels while dlib's mapped rectangle stays >= 64 x 64);
3. per level, fHOG features (31 planes of 8x8 cells, dlib's ``extract_fhog_features``:
   the gradient of the RGB channel with the largest magnitude, 18 signed bins, bilinear
   splatting into cells, the 4 block normalizations truncated at 0.2);
4. the 5 detectors' 10x10-cell filters correlated with the planes, score = response -
   threshold, kept when >= ``adjust_threshold``;
5. windows mapped back to the image, sorted by score, dlib's greedy NMS
   (:func:`jaxface.faces.nms.nms` with the file's overlap thresholds), and, after
   upsampling, dlib's ``rect_down``.

The resizes (steps 1-2) run in NumPy: dlib rounds their float32 / float64
arithmetic in an order that changes the uint8 pixels, so they are reproduced
operation by operation (no fused multiply-add) on the host. The features and
filters (steps 3-4) are one jitted float32 program per *padded* level shape (each
level is zero-padded to a bucket of ~1/8 steps and its true size passed as an
argument, so many image sizes share programs); float32 is enough for scores within
1e-4 of dlib's (dlib itself computes in float32). Measured on the 180 images of
``shared/data/dlib_golden_hog``: identical rectangles and sub-detector indices at
upsample 0 and 1, scores within 1e-5.

Weights: ``data/frontal_face_detector.npz``, converted once from dlib's own
serialization (see ``data/PROVENANCE.md``).
"""

from __future__ import annotations

import functools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxface.faces import nms as _nms

_DATA = os.path.join(os.path.dirname(__file__), "data", "frontal_face_detector.npz")
CELL = 8
NUM_PLANES = 31
MAX_UPSAMPLE = 4

# dlib's 9 unsigned orientation directions (fhog.h), as float32.
_DIRS = np.array([[1.0000, 0.0000], [0.9397, 0.3420], [0.7660, 0.6428], [0.500, 0.8660],
                  [0.1736, 0.9848], [-0.1736, 0.9848], [-0.5000, 0.8660], [-0.7660, 0.6428],
                  [-0.9397, 0.3420]], np.float32)

_MODEL_LOCK = threading.Lock()
_MODEL: dict = {}


def load_model(path: str = _DATA) -> dict:
  """The converted detector: filters float32 [5, 31, 10, 10], thresholds float64 [5], settings."""
  with _MODEL_LOCK:
    if path not in _MODEL:
      with np.load(path, allow_pickle=False) as z:
        s = z["settings"]
        _MODEL[path] = dict(
            filters=np.asarray(z["filters"], np.float32), thresholds=np.asarray(z["thresholds"], np.float64),
            cell_size=int(s[0]), padding=int(s[1]), max_levels=int(s[4]), min_w=int(s[5]), min_h=int(s[6]),
            fh=int(s[7]), fw=int(s[8]), iou=float(z["overlap"][0]), covered=float(z["overlap"][1]))
      if _MODEL[path]["cell_size"] != CELL or _MODEL[path]["padding"] != 0:
        raise ValueError(f"{path}: only cell size 8 and padding 0 are supported")
    return _MODEL[path]


# --------------------------------------------------------------------------- resizing (host, exact)


@functools.lru_cache(maxsize=256)
def _resize_tables(nr: int, nc: int, onr: int, onc: int):
  """Row and column sampling tables of dlib's bilinear ``resize_image`` (RGB/gray fast paths).

  Rows: y accumulates ``y_scale`` in float64. Columns: 4-wide float32 SIMD lanes whose
  x accumulates ``float(4 * x_scale)`` in float32 (truncated to int), until the right
  neighbour of lane 3 leaves the image; the remaining columns use float64 (floor).
  """
  xs = (nc - 1) / max(onc - 1, 1)
  ys = (nr - 1) / max(onr - 1, 1)
  y = np.add.accumulate(np.concatenate([[-ys], np.full(onr, ys)]))[1:]  # -ys, then += ys per row
  top = np.floor(y).astype(np.int64)
  bottom = np.minimum(top + 1, nr - 1)
  tb = y - top
  # SIMD columns.
  x0 = -4 * xs
  lanes = np.array([x0, x0 + xs, x0 + 2 * xs, x0 + 3 * xs], np.float64).astype(np.float32)
  step = np.float32(4 * xs)
  kmax = onc // 4 + 2
  xs_f = np.add.accumulate(np.concatenate([lanes[None], np.full((kmax, 4), step, np.float32)]), axis=0,
                           dtype=np.float32)[1:]
  left = xs_f.astype(np.int32)  # truncation (cvttps)
  ok = left[:, 3] + 1 < nc
  nsimd = int(np.argmin(ok)) if not ok.all() else kmax
  # dlib writes 4 columns per SIMD step without checking c < onc; the step runs while lane 3's
  # right neighbour is inside the input, which keeps c + 3 < onc - 1.
  c_tail = 4 * nsimd
  s_left = left[:nsimd].reshape(-1)[:max(0, min(c_tail, onc))]
  s_lr = (xs_f[:nsimd] - left[:nsimd].astype(np.float32)).reshape(-1)[:s_left.size]
  c_tail = s_left.size
  nt = onc - c_tail
  xt = np.add.accumulate(np.concatenate([[-xs + c_tail * xs], np.full(nt, xs)]))[1:]
  t_left = np.floor(xt).astype(np.int64)
  t_right = np.minimum(t_left + 1, nc - 1)
  t_lr = xt - t_left
  return top, bottom, tb, s_left.astype(np.int64), s_lr.astype(np.float32), t_left, t_right, t_lr


def _resize(img: np.ndarray, onr: int, onc: int) -> np.ndarray:
  """dlib's ``resize_image(in, out, interpolate_bilinear())`` for uint8 RGB [H, W, 3] or gray [H, W]."""
  nr, nc = img.shape[:2]
  top, bottom, tb, s_left, s_lr, t_left, t_right, t_lr = _resize_tables(nr, nc, onr, onc)
  gray = img.ndim == 2
  src = img[..., None] if gray else img
  out = np.empty((onr, onc, src.shape[2]), np.uint8)
  f32 = np.float32
  # SIMD part: float32 weights and sums, evaluated in dlib's order.
  tbf = tb.astype(f32)[:, None, None]
  itbf = (1 - tb).astype(f32)[:, None, None]
  lr = s_lr[None, :, None]
  ilr = (f32(1) - s_lr)[None, :, None]
  tlf, trf, blf, brf = itbf * ilr, itbf * lr, tbf * ilr, tbf * lr
  sl, sr = s_left, s_left + 1
  tl = src[top][:, sl].astype(f32)
  tr = src[top][:, sr].astype(f32)
  bl = src[bottom][:, sl].astype(f32)
  br = src[bottom][:, sr].astype(f32)
  v = ((tlf * tl + trf * tr) + blf * bl) + brf * br
  n = s_left.size
  if gray:
    out[:, :n] = (v + f32(0.5)).astype(np.int32).astype(np.uint8)
  else:
    out[:, :n] = v.astype(np.int32).astype(np.uint8)
  # Tail: float64 (RGB) / mixed (gray) scalar code.
  if t_left.size:
    tbd = tb[:, None, None]
    lrd = t_lr[None, :, None]
    tl = src[top][:, t_left].astype(np.float64)
    tr = src[top][:, t_right].astype(np.float64)
    bl = src[bottom][:, t_left].astype(np.float64)
    br = src[bottom][:, t_right].astype(np.float64)
    if gray:
      lrd = lrd.astype(f32).astype(np.float64)
      inner1 = ((f32(1) - lrd.astype(f32)) * tl.astype(f32) + lrd.astype(f32) * tr.astype(f32)).astype(np.float64)
      inner2 = ((f32(1) - lrd.astype(f32)) * bl.astype(f32) + lrd.astype(f32) * br.astype(f32)).astype(np.float64)
      t = ((1 - tbd) * inner1 + tbd * inner2).astype(f32)
      out[:, n:] = np.clip(np.round(t), 0, 255).astype(np.uint8)
    else:
      t = (1 - tbd) * ((1 - lrd) * tl + lrd * tr) + tbd * ((1 - lrd) * bl + lrd * br)
      out[:, n:] = t.astype(np.int64).astype(np.uint8)
  return out[..., 0] if gray else out


def pyramid_up(img: np.ndarray) -> np.ndarray:
  """dlib's ``pyramid_up(img, out, pyramid_down<2>())``: [H, W] -> [2H + 1, 2W + 2], bilinear."""
  nr, nc = img.shape[:2]
  # pyramid_down<2>::rect_up maps the image rectangle's corners p -> (p + (1.25, 0.75)) * 2, so
  # its bottom-right corner becomes (2W + 0.5, 2H - 0.5), rounded (lround) to (2W + 1, 2H).
  return _resize(img, 2 * nr + 1, 2 * nc + 2)


def _pyramid_levels(nr: int, nc: int, model: dict) -> int:
  """Number of pyramid levels dlib's ``create_fhog_pyramid`` builds for an nr x nc image."""
  l, t, r, b = 0.0, 0.0, float(nc - 1), float(nr - 1)
  levels = 0
  while True:
    # pyramid_down<6>::rect_down: (p - 0.3) * 5/6, then rounded to a rectangle (lround).
    l, t, r, b = (float(_lround((v - 0.3) * (5.0 / 6.0))) for v in (l, t, r, b))
    levels += 1
    if not (r - l + 1 >= model["min_w"] and b - t + 1 >= model["min_h"] and levels < model["max_levels"]):
      return levels


def _lround(x):
  """C's lround: halves away from zero."""
  x = np.asarray(x, np.float64)
  return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


# --------------------------------------------------------------------------- fHOG (device)


def _fhog(img: jax.Array, size: jax.Array) -> jax.Array:
  """dlib's ``extract_fhog_features`` (cell 8) of the top-left ``size = (nr, nc)`` of uint8 [R, C, ch].

  ``img`` may be zero-padded beyond ``size`` (so that one program serves many sizes):
  returns float32 [31, R // 8 - 2, C // 8 - 2] whose first ``cells_r - 2`` rows and
  ``cells_c - 2`` columns are dlib's features, zeros elsewhere.
  """
  pr_, pc_ = img.shape[:2]
  nr, nc = size[0], size[1]
  cr = jnp.floor(nr.astype(jnp.float32) / CELL + 0.5).astype(jnp.int32)  # dlib: (int)(nr / 8.0f + 0.5)
  cc = jnp.floor(nc.astype(jnp.float32) / CELL + 0.5).astype(jnp.int32)
  hr, hc = cr - 2, cc - 2
  vis_r = jnp.minimum(cr * CELL, nr) - 1
  vis_c = jnp.minimum(cc * CELL, nc) - 1
  # Static sizes: the padded image's cell grid.
  CR, CC = pr_ // CELL, pc_ // CELL
  HR, HC = CR - 2, CC - 2
  x = img.astype(jnp.int32)
  gx = x[1:-1, 2:] - x[1:-1, :-2]  # [R-2, C-2, ch] at pixel (y, x) = (i + 1, j + 1)
  gy = x[2:, 1:-1] - x[:-2, 1:-1]
  ln = gx * gx + gy * gy
  cols = jnp.arange(1, pc_ - 1)
  if img.shape[2] == 3:
    r_, g_, b_ = (ln[..., i] for i in range(3))
    # 8-wide SIMD columns (x < x_tail): red if r > g else green, then blue unless that > b;
    # scalar tail: red, replaced by green if g > r, then by blue if b > the best.
    pick_r = r_ > g_
    t_len = jnp.where(pick_r, r_, g_)
    pick_t = t_len > b_
    simd_ch = jnp.where(pick_t, jnp.where(pick_r, 0, 1), 2)
    best1 = jnp.where(g_ > r_, 1, 0)
    best1_len = jnp.where(g_ > r_, g_, r_)
    scal_ch = jnp.where(b_ > best1_len, 2, best1)
    n_simd = jnp.maximum(0, -((8 - vis_c) // 8))  # ceil((vis_c - 8) / 8), at least 0
    x_tail = 1 + 8 * n_simd
    ch = jnp.where(cols[None, :] < x_tail, simd_ch, scal_ch)
    take = lambda a: jnp.take_along_axis(a, ch[..., None], axis=2)[..., 0]
    gx, gy, ln = take(gx), take(gy), take(ln)
  else:
    gx, gy, ln = gx[..., 0], gy[..., 0], ln[..., 0]
  gxf = gx.astype(jnp.float32)
  gyf = gy.astype(jnp.float32)
  d = jnp.asarray(_DIRS)
  dots = gxf[..., None] * d[:, 0] + gyf[..., None] * d[:, 1]  # [.., 9]
  seq = jnp.stack([dots, -dots], axis=-1).reshape(dots.shape[:-1] + (18,))  # o, -o, o+1, ...
  k = jnp.argmax(seq, axis=-1)
  best = jnp.max(seq, axis=-1)
  label = jnp.where(best > 0, k // 2 + 9 * (k % 2), 0)
  v = jnp.sqrt(ln.astype(jnp.float32))
  ys = jnp.arange(1, pr_ - 1)[:, None]
  v = jnp.where((ys < vis_r) & (cols[None, :] < vis_c), v, 0.0)
  m = jax.nn.one_hot(label, 18, dtype=jnp.float32) * v[..., None]  # [R-2, C-2, 18]
  # Bilinear splat into cells: pixel y goes to hist rows a = (y + 4) // 8 (weight 1 - f) and
  # a + 1 (weight f), f = ((y + 4) % 8 + 0.5) / 8; same for columns. hist: [CR + 2, CC + 2, 18].
  full = jnp.pad(m, ((5, CELL * (CR + 1) - 5 - (pr_ - 2)), (5, CELL * (CC + 1) - 5 - (pc_ - 2)), (0, 0)))
  blocks = full.reshape(CR + 1, CELL, CC + 1, CELL, 18)
  f = (np.arange(CELL, dtype=np.float32) + np.float32(0.5)) / np.float32(CELL)
  w = jnp.asarray(np.stack([1 - f, f]))  # [2, 8]: weight to block a, to block a + 1
  s = jnp.einsum("akbjo,pk,qj->pqabo", blocks, w, w, precision=jax.lax.Precision.HIGHEST)
  hist = jnp.zeros((CR + 2, CC + 2, 18), jnp.float32)
  hist = hist.at[:-1, :-1].add(s[0, 0]).at[1:, :-1].add(s[1, 0]).at[:-1, 1:].add(s[0, 1]).at[1:, 1:].add(s[1, 1])
  cells = hist[1:CR + 1, 1:CC + 1]
  norm = jnp.sum((cells[..., :9] + cells[..., 9:]) ** 2, axis=-1)  # [CR, CC]
  blk = ((norm[:-1, :-1] + norm[:-1, 1:]) + norm[1:, :-1]) + norm[1:, 1:]  # block at (i, j): [CR-1, CC-1]
  nn = jnp.float32(0.2) * jnp.sqrt(blk + jnp.float32(0.0001))
  n = jnp.float32(0.1) / nn
  # Lanes for hog cell (y, x): blocks (y+1, x+1), (y, x+1), (y+1, x), (y, x).
  lane = lambda a, dy, dx: a[dy:dy + HR, dx:dx + HC]
  nns = [lane(nn, 1, 1), lane(nn, 0, 1), lane(nn, 1, 0), lane(nn, 0, 0)]
  ns = [lane(n, 1, 1), lane(n, 0, 1), lane(n, 1, 0), lane(n, 0, 0)]
  h = hist[2:CR, 2:CC]  # [HR, HC, 18]
  hu = h[..., :9] + h[..., 9:]
  parts = [jnp.minimum(h, nns[i][..., None]) * ns[i][..., None] for i in range(4)]
  signed = (parts[0] + parts[1]) + (parts[2] + parts[3])
  uparts = [jnp.minimum(hu, nns[i][..., None]) * ns[i][..., None] for i in range(4)]
  unsigned = (uparts[0] + uparts[1]) + (uparts[2] + uparts[3])
  energy = jnp.stack([jnp.sum(p, axis=-1) for p in parts], axis=-1) * jnp.float32(2 * 0.2357)
  feats = jnp.concatenate([signed, unsigned, energy], axis=-1)  # [HR, HC, 31]
  inside = (jnp.arange(HR)[:, None] < hr) & (jnp.arange(HC)[None, :] < hc)
  feats = jnp.where(inside[..., None], feats, 0.0)
  return jnp.transpose(feats, (2, 0, 1))


def _level_scores(img: jax.Array, size: jax.Array, filters: jax.Array) -> jax.Array:
  """Filter responses float32 [D, HR, HC] of one (padded) pyramid level; dlib's saliency at
  fHOG cell (i + 5, j + 5) for i < cells_r - 2, j < cells_c - 2."""
  feats = _fhog(img, size)
  fh, fw = filters.shape[2:]
  return jax.lax.conv_general_dilated(
      feats[None], filters, window_strides=(1, 1),
      padding=[((fh - 1) // 2, fh // 2), ((fw - 1) // 2, fw // 2)],
      dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=jax.lax.Precision.HIGHEST)[0]


_level_scores_jit = jax.jit(_level_scores)
_fhog_jit = jax.jit(_fhog)


def fhog_features(img) -> np.ndarray:
  """dlib's fHOG of a uint8 image ([H, W, 3] or [H, W]) without padding: float32 [31, cells_r - 2, cells_c - 2]."""
  a = np.asarray(img, np.uint8)
  a = a[..., None] if a.ndim == 2 else a
  cr, cc = int(a.shape[0] / CELL + 0.5), int(a.shape[1] / CELL + 0.5)
  if cr < 3 or cc < 3:
    return np.zeros((NUM_PLANES, 0, 0), np.float32)
  x, size = _padded(a)
  return np.asarray(_fhog_jit(x, size))[:, :cr - 2, :cc - 2]


def _bucket(n: int) -> int:
  """Padded side for an n-pixel side: a multiple of 8 with >= 1 spare cell, rounded up to ~1/8 steps."""
  need = CELL * (int(n / CELL + 0.5) + 1)
  need = max(need, n + CELL)
  step = CELL * max(1, 2 ** max(0, (need // CELL).bit_length() - 4))
  return -(-need // step) * step


def _padded(a: np.ndarray):
  """Zero-pads uint8 [nr, nc, ch] to its bucket shape; returns (padded, int32 [2] true size)."""
  nr, nc = a.shape[:2]
  R, C = _bucket(nr), _bucket(nc)
  out = np.zeros((R, C, a.shape[2]), np.uint8)
  out[:nr, :nc] = a
  return out, np.array([nr, nc], np.int32)


# --------------------------------------------------------------------------- detection


def _fhog_to_image(p: np.ndarray) -> np.ndarray:
  """dlib's ``fhog_to_image`` per coordinate (cell 8, filter padding 10)."""
  q = (p + 1 - 4) * CELL + 1
  return q + np.where(q >= 0, CELL // 2, -(CELL // 2))


def _detect_single(img: np.ndarray, adjust_threshold: float, model: dict):
  nr, nc = img.shape[:2]
  filters = jnp.asarray(model["filters"])
  thr = model["thresholds"]
  boxes, scores, index = [], [], []
  levels = _pyramid_levels(nr, nc, model)
  cur = img
  fh, fw = model["fh"], model["fw"]
  for lev in range(levels):
    if lev:
      cur = _resize(cur, (5 * cur.shape[0]) // 6, (5 * cur.shape[1]) // 6)
    cr = int(cur.shape[0] / CELL + 0.5)
    cc = int(cur.shape[1] / CELL + 0.5)
    if cr - 2 < 1 or cc - 2 < 1:
      continue
    x, size = _padded(cur[..., None] if cur.ndim == 2 else cur)
    sal = np.asarray(_level_scores_jit(x, size, filters), np.float32)[:, :cr - 2, :cc - 2]  # [D, hr, hc]
    dd, ii, jj = np.nonzero(sal.astype(np.float64) >= (thr + adjust_threshold)[:, None, None])
    if dd.size == 0:
      continue
    r = ii + (fh // 2)
    c = jj + (fw // 2)
    rect = np.stack([_fhog_to_image(c - fw // 2), _fhog_to_image(r - fh // 2),
                     _fhog_to_image(c - fw // 2 + fw - 1), _fhog_to_image(r - fh // 2 + fh - 1)], 1)
    rect = rect.astype(np.float64)
    for _ in range(lev):  # pyramid_down<6>::rect_up: p * 6/5 + 0.3 per level, then lround
      rect = rect * (6.0 / 5.0) + 0.3
    boxes.append(_lround(rect))
    scores.append(sal[dd, ii, jj].astype(np.float64) - thr[dd])
    index.append(dd)
  if not boxes:
    return np.zeros((0, 4), np.int64), np.zeros((0,), np.float64), np.zeros((0,), np.int64)
  b = np.concatenate(boxes)
  s = np.concatenate(scores)
  d = np.concatenate(index).astype(np.int64)
  # dlib sorts each detector's hits, then all of them, by score (descending).
  order = np.lexsort((np.arange(len(s)), d))  # detector-major, then level / position order
  b, s, d = b[order], s[order], d[order]
  keep = _nms.nms(b, s, model["iou"], model["covered"])
  return b[keep], s[keep], d[keep]


def hog_detect(image, upsample: int = 0, adjust_threshold: float = 0.0, *, model_path: str = _DATA):
  """Faces in `image` with dlib's HOG frontal face detector.

  Args:
    image: uint8 [H, W, 3] RGB or [H, W] grayscale.
    upsample: times the image is doubled with dlib's ``pyramid_up`` first (0..4).
    adjust_threshold: added to every detector's threshold (dlib's ``adjust_threshold``).

  Returns:
    ``(boxes int64 [N, 4] (left, top, right, bottom) inclusive as dlib,
    scores float64 [N], detector index int64 [N])``, highest score first.
  """
  img = np.asarray(image)
  if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
    raise ValueError(f"image: expected uint8 [H, W, 3] or [H, W], got {img.dtype} {img.shape}")
  if isinstance(upsample, bool) or not isinstance(upsample, (int, np.integer)) or not 0 <= upsample <= MAX_UPSAMPLE:
    raise ValueError(f"upsample: expected an int in [0, {MAX_UPSAMPLE}], got {upsample!r}")
  model = load_model(model_path)
  for _ in range(int(upsample)):
    img = pyramid_up(img)
  b, s, d = _detect_single(img, float(adjust_threshold), model)
  if upsample and len(b):
    bd = b.astype(np.float64)
    for _ in range(int(upsample)):  # pyramid_down<2>::rect_down on points: p / 2 - (1.25, 0.75)
      bd = bd / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])
    b = _lround(bd)
  return b, s, d

