"""5- and 68-point face landmarks from a face box: dlib's regression-tree cascade (Kazemi & Sullivan), in NumPy.

``predict(sp, image, boxes)`` reproduces dlib's ``shape_predictor`` with the
5-point and the 68-point (iBUG 300-W) models bit for bit, vectorized over faces and trees; it is NumPy rather
than JAX because exactness needs dlib's float64/float32 mix
(:func:`predict_shapes`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxface.formats import dlib_shape


@dataclasses.dataclass(frozen=True)
class ShapePredictor:
  """A loaded shape predictor (NumPy arrays; see :class:`dlib_shape.ShapePredictorModel`)."""
  model: dlib_shape.ShapePredictorModel

  @property
  def num_parts(self) -> int:
    return self.model.num_parts


SHAPE_MODELS = ("shape5", "shape68")


def load_shape_predictor(path: str | os.PathLike | None = None, *, name: str = "shape5") -> ShapePredictor:
  """Loads one of dlib's shape predictors.

  With ``path=None`` the file comes from the ``face-recognition-models``
  package and is converted once, then restored from the cache
  (``jaxface.pretrained.converted(name)``: ``"shape5"``, the 5-point model, or
  ``"shape68"``, the 68-point iBUG 300-W model); with a path, that file is
  parsed directly (slower: seconds; ~10 s for the 68-point model).
  """
  if path is not None:
    return ShapePredictor(dlib_shape.read_shape_predictor(path))
  if name not in SHAPE_MODELS:
    raise ValueError(f"name must be one of {SHAPE_MODELS}, got {name!r}")
  from jaxface import pretrained  # imported here: the package pulls in orbax
  tree = pretrained.converted(name)
  return ShapePredictor(dlib_shape.ShapePredictorModel.from_dict(tree))


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def check_image(image, name: str = "image") -> np.ndarray:
  """-> uint8 [H, W, 3] (a [H, W] grayscale image is repeated to 3 channels)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{name} must be uint8, got {image.dtype}")
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"{name} must be [H, W, 3] (or [H, W]) uint8, got shape {image.shape}")
  return image


def check_boxes(boxes, name: str = "boxes") -> np.ndarray:
  """-> int64 [N, 4] (left, top, right, bottom)."""
  boxes = np.asarray(boxes)
  if boxes.size == 0:
    return np.zeros((0, 4), np.int64)
  if boxes.ndim == 1 and boxes.shape[0] == 4:
    raise ValueError(f"{name} must be [N, 4]; wrap a single box as [box]")
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"{name} must be [N, 4] (left, top, right, bottom), got shape {boxes.shape}")
  if boxes.dtype.kind == "f":
    if not np.all(np.isfinite(boxes)) or np.any(boxes != np.round(boxes)):
      raise ValueError(f"{name} must hold integers (dlib boxes are integer pixel rectangles)")
  elif boxes.dtype.kind not in "iu":
    raise ValueError(f"{name} must be an integer array, got {boxes.dtype}")
  boxes = boxes.astype(np.int64)
  if np.any(np.abs(boxes) > 1 << 30):
    raise ValueError(f"{name} has coordinates beyond 2**30")
  return boxes


# ---------------------------------------------------------------------------
# The cascade
# ---------------------------------------------------------------------------


def similarity_2x2(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Least-squares similarity (Umeyama, no reflection) from ``src`` to ``dst``, 2x2 part only.

  Args:
    src: [P, 2] points; dst: [N, P, 2] points (any float dtype; computed in float64).
  Returns:
    float64 [N, 2, 2] = s * R. In 2-D the fit has the closed form
    [[a, -b], [b, a]] / sum|src_c|^2 with a = sum(src_c . dst_c), b = sum(src_c x dst_c)
    (centred points), the same matrix Umeyama's SVD route gives.
  """
  src = np.asarray(src, np.float64)
  dst = np.asarray(dst, np.float64)
  xs = src - src.mean(axis=0)
  yd = dst - dst.mean(axis=1, keepdims=True)
  sigma = np.sum(xs * xs)
  a = np.sum(xs[:, 0] * yd[..., 0] + xs[:, 1] * yd[..., 1], axis=-1)
  b = np.sum(xs[:, 0] * yd[..., 1] - xs[:, 1] * yd[..., 0], axis=-1)
  sigma = sigma or 1.0  # a source without spread: no meaningful fit (not reached by real models)
  m = np.empty(a.shape + (2, 2))
  m[..., 0, 0] = a / sigma
  m[..., 0, 1] = -b / sigma
  m[..., 1, 0] = b / sigma
  m[..., 1, 1] = a / sigma
  return m


def _round(x: np.ndarray) -> np.ndarray:
  """dlib's float -> integer point conversion: floor(x + 0.5)."""
  return np.floor(x + 0.5).astype(np.int64)


def _box_map(boxes: np.ndarray, u: np.ndarray) -> np.ndarray:
  """Box-normalized float32 [N, ..., 2] -> image coordinates float64 (left + u * (right - left))."""
  n = boxes.shape[0]
  lt = boxes[:, :2].astype(np.float64).reshape((n,) + (1,) * (u.ndim - 2) + (2,))
  wh = (boxes[:, 2:] - boxes[:, :2]).astype(np.float64).reshape(lt.shape)
  return u.astype(np.float64) * wh + lt


def predict_shapes(sp: ShapePredictor, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """The cascade: uint8 [H, W, 3] image, int [N, 4] boxes -> float32 [N, P, 2] normalized shapes.

  Every face and every tree of a cascade is evaluated at once (a depth-4 tree is
  4 vectorized gathers), so the Python work is a loop over the cascades and tree
  levels only. NumPy rather than JAX because exactness needs dlib's mixed
  precision: the similarity transform between the mean shape and the current
  shape is fitted in float64 and then cast to a float32 2x2 matrix; feature-pixel
  offsets are then transformed in float32, mapped into the box in float64 and
  rounded; the 500 tree outputs of a cascade are added to the float32 shape one
  after the other (a sequential float32 sum: ``np.add.accumulate``; a pairwise
  sum would round differently and could flip a later split). JAX without x64
  cannot do the float64 steps, and the work is small (15 x 800 feature pixels
  and 15 x 500 x 4 comparisons per face).

  Conventions (dlib): a box is (left, top, right, bottom), inclusive; box-
  normalized u maps to ``left + u * (right - left)``; feature pixels and the
  returned landmarks are rounded with ``floor(x + 0.5)``; the intensity of an
  RGB pixel is ``(r + g + b) // 3``; pixels outside the image read 0.
  """
  m = sp.model
  n = boxes.shape[0]
  h, w = image.shape[:2]
  num_cascades, num_trees, num_splits = m.thresholds.shape
  depth = (num_splits + 1).bit_length() - 1
  trees = np.arange(num_trees)
  # Intensities are computed only at the pixels read (a big photo would cost more than the cascade).
  flat_rgb = image.reshape(-1, 3)
  shape = np.broadcast_to(m.initial_shape, (n,) + m.initial_shape.shape).astype(np.float32)
  for c in range(num_cascades):
    # Feature pixels: float32 similarity (mean shape -> current shape) applied to the deltas.
    tform = similarity_2x2(m.initial_shape, shape).astype(np.float32)  # [N, 2, 2]
    d = m.deltas[c]  # [F, 2]
    anchor = shape[:, m.anchor_idx[c]]  # [N, F, 2]
    px = (tform[:, None, 0, 0] * d[:, 0] + tform[:, None, 0, 1] * d[:, 1]) + anchor[..., 0]
    py = (tform[:, None, 1, 0] * d[:, 0] + tform[:, None, 1, 1] * d[:, 1]) + anchor[..., 1]
    xy = _round(_box_map(boxes, np.stack([px, py], axis=-1)))  # [N, F, 2]
    x, y = xy[..., 0], xy[..., 1]
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    rgb = flat_rgb[np.where(inside, y * w + x, 0)].astype(np.int32)  # [N, F, 3]
    f = np.where(inside, rgb.sum(axis=-1) // 3, 0).astype(np.float32)  # outside the image reads 0
    # All trees at once: walk `depth` levels with one node index per (face, tree). Gathers go
    # through flat 1-D views (tree t's node k is row t*S + k), which NumPy does fastest.
    i1, i2 = m.split_idx[c, :, :, 0].reshape(-1), m.split_idx[c, :, :, 1].reshape(-1)
    thr = m.thresholds[c].reshape(-1)
    f_flat = f.reshape(-1)
    face_base = (np.arange(n) * f.shape[1])[:, None]
    node = np.broadcast_to(trees * num_splits, (n, num_trees))  # flat row of the current node
    for _ in range(depth):
      diff = f_flat[face_base + i1[node]] - f_flat[face_base + i2[node]]
      local = node - trees * num_splits
      node = trees * num_splits + 2 * local + np.where(diff > thr[node], 1, 2)
    leaf_rows = trees * (num_splits + 1) + (node - trees * num_splits - num_splits)
    leaf = m.leaves[c].reshape(num_trees * (num_splits + 1), -1)[leaf_rows]  # [N, T, P*2]
    leaf = leaf.reshape(n, num_trees, -1, 2)
    # dlib adds the trees' outputs one by one in float32: a sequential accumulate, not a pairwise sum.
    steps = np.concatenate([shape[:, None], leaf], axis=1)
    shape = np.add.accumulate(steps, axis=1, dtype=np.float32)[:, -1]
  return shape


def predict(sp: ShapePredictor, image, boxes) -> np.ndarray:
  """Landmarks (5 or 68 points, as ``sp``) of the faces in ``boxes``.

  Args:
    sp: from :func:`load_shape_predictor`.
    image: uint8 [H, W, 3] RGB (or [H, W] grayscale).
    boxes: int [N, 4] (left, top, right, bottom), inclusive pixel rectangles
      (e.g. from the detector); boxes may extend past the image.
  Returns:
    int64 [N, P, 2] landmarks (x, y) in image pixels; for the 5-point model the
    parts are: right eye outer/inner corner, left eye outer/inner corner
    (subject's right/left as in dlib), bottom of the nose; the 68-point model
    gives the iBUG 300-W points (jaw 0-16, eyebrows 17-26, nose 27-35, eyes
    36-47, mouth 48-67).
  """
  if not isinstance(sp, ShapePredictor):
    raise ValueError(f"sp must be a ShapePredictor (load_shape_predictor()), got {type(sp).__name__}")
  image = check_image(image)
  boxes = check_boxes(boxes)
  if boxes.shape[0] == 0:
    return np.zeros((0, sp.num_parts, 2), np.int64)
  shapes = predict_shapes(sp, image, boxes)
  return _round(_box_map(boxes, shapes))
