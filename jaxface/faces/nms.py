"""Box overlap and greedy non-maximum suppression, dlib's rules, vectorized NumPy.

Boxes are dlib rectangles: ``int [N, 4]`` (left, top, right, bottom) with
*inclusive* right/bottom, so a box's width is ``right - left + 1`` and a box
with ``right < left`` (or ``bottom < top``) is empty (area 0).
"""

from __future__ import annotations

import numpy as np


def _as_boxes(boxes, name: str) -> np.ndarray:
  b = np.asarray(boxes)
  if b.ndim != 2 or b.shape[1] != 4:
    raise ValueError(f"{name} must have shape [N, 4] (left, top, right, bottom), got {b.shape}")
  if not (np.issubdtype(b.dtype, np.integer) or np.issubdtype(b.dtype, np.floating)):
    raise ValueError(f"{name} must be numeric, got dtype {b.dtype}")
  return b.astype(np.float64)


def box_area(boxes) -> np.ndarray:
  """Inclusive area of dlib rectangles: ``[N, 4] -> [N] float64`` (0 for empty boxes)."""
  b = _as_boxes(boxes, "boxes")
  w = b[:, 2] - b[:, 0] + 1
  h = b[:, 3] - b[:, 1] + 1
  return np.where((w > 0) & (h > 0), w * h, 0.0)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  # [N, 1, 4] vs [1, M, 4] -> [N, M] inclusive intersection areas.
  left = np.maximum(a[:, None, 0], b[None, :, 0])
  top = np.maximum(a[:, None, 1], b[None, :, 1])
  right = np.minimum(a[:, None, 2], b[None, :, 2])
  bottom = np.minimum(a[:, None, 3], b[None, :, 3])
  w = right - left + 1
  h = bottom - top + 1
  return np.where((w > 0) & (h > 0), w * h, 0.0)


def iou_matrix(a, b) -> np.ndarray:
  """Standard intersection-over-union of dlib rectangles: ``[N, 4], [M, 4] -> [N, M] float64``.

  (dlib's ``box_intersection_over_union``: inclusive areas, union = a + b - inner.)
  """
  a = _as_boxes(a, "a")
  b = _as_boxes(b, "b")
  inner = _intersection(a, b)
  union = box_area(a)[:, None] + box_area(b)[None, :] - inner
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(inner > 0, inner / np.where(union > 0, union, 1.0), 0.0)


def overlap_matrix(a, b, iou_threshold: float, covered_threshold: float = 1.0) -> np.ndarray:
  """dlib's ``test_box_overlap`` for every pair: ``[N, 4], [M, 4] -> bool [N, M]``.

  Two boxes overlap when intersection / area of the *bounding box of both* >
  ``iou_threshold`` (dlib divides by the smallest rectangle containing both
  boxes, not by the area of their union), or intersection / area of either box
  > ``covered_threshold`` (1.0 disables this test, as in the face detector's file).
  """
  a = _as_boxes(a, "a")
  b = _as_boxes(b, "b")
  inner = _intersection(a, b)
  left = np.minimum(a[:, None, 0], b[None, :, 0])
  top = np.minimum(a[:, None, 1], b[None, :, 1])
  right = np.maximum(a[:, None, 2], b[None, :, 2])
  bottom = np.maximum(a[:, None, 3], b[None, :, 3])
  outer = (right - left + 1) * (bottom - top + 1)
  area_a = box_area(a)[:, None]
  area_b = box_area(b)[None, :]
  safe = lambda x: np.where(x > 0, x, 1.0)  # noqa: E731 -- only read where inner > 0
  hit = ((inner / safe(outer) > iou_threshold)
         | (inner / safe(area_a) > covered_threshold)
         | (inner / safe(area_b) > covered_threshold))
  return (inner > 0) & hit


def nms(boxes, scores, iou_threshold: float, covered_threshold: float = 1.0,
        max_boxes: int | None = None) -> np.ndarray:
  """Greedy NMS with dlib's overlap rule (:func:`overlap_matrix`).

  Keeps the best-scoring box, drops every box overlapping it, and repeats; this
  equals dlib's "keep a box unless it overlaps a box already kept" scan over the
  boxes sorted by score.

  Args:
    boxes: ``int [N, 4]`` (left, top, right, bottom), inclusive.
    scores: ``float [N]``; higher is better.
    iou_threshold: boxes whose intersection / bounding-box-of-both exceeds this
      suppress each other.
    covered_threshold: boxes covered by more than this fraction suppress each other.
    max_boxes: stop after keeping this many (None: no limit).

  Returns:
    ``int64 [K]`` indices into ``boxes`` of the kept boxes, best score first
    (ties keep input order).
  """
  b = _as_boxes(boxes, "boxes")
  s = np.asarray(scores, dtype=np.float64)
  if s.shape != (b.shape[0],):
    raise ValueError(f"scores must have shape [{b.shape[0]}] to match boxes, got {s.shape}")
  if not 0 <= iou_threshold <= 1 or not 0 <= covered_threshold <= 1:
    raise ValueError(f"thresholds must lie in [0, 1], got iou_threshold={iou_threshold}, "
                     f"covered_threshold={covered_threshold}")
  order = np.argsort(-s, kind="stable")
  b = b[order]
  alive = np.ones(len(order), bool)
  keep: list[int] = []
  limit = len(order) if max_boxes is None else max_boxes
  # One iteration per *kept* box; each suppresses all later boxes it overlaps at once.
  i = 0
  while len(keep) < limit:
    rest = np.flatnonzero(alive[i:])
    if rest.size == 0:
      break
    i += int(rest[0])
    keep.append(i)
    alive[i] = False
    later = np.flatnonzero(alive[i + 1:]) + i + 1
    if later.size:
      hit = overlap_matrix(b[i:i + 1], b[later], iou_threshold, covered_threshold)[0]
      alive[later[hit]] = False
  return order[np.asarray(keep, dtype=np.int64)]
