"""Reader for dlib's serialized HOG object detectors (``object_detector<scan_fhog_pyramid<pyramid_down<6>>>``).

:func:`read_fhog_detector` parses what ``dlib.get_frontal_face_detector().save(path)``
writes (layout: dlib's ``object_detector.h``, ``scan_fhog_pyramid.h``, ``serialize.h``)
into an :class:`FhogDetector` of NumPy arrays; errors are
:class:`jaxface.formats.dlib.DlibFormatError` naming the file and byte offset.

:func:`effective_filters` gives the filters dlib actually correlates with the
fHOG planes: dlib splits each plane's filter into rank-1 parts (SVD, dropping
singular values below ``max(1e-4, 0.001 * max)``) and uses the separable parts
when there are few of them, the full filters otherwise (``apply_filters_to_fhog``).

Run as a script to convert once into the ``.npz`` shipped with jaxface::

  python -m jaxface.formats.dlib_fhog frontal_face_detector.svm frontal_face_detector.npz
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys

import numpy as np

from jaxface.formats.dlib import DlibFormatError, Reader, read_file

NUM_PLANES = 31  # fHOG: 18 signed + 9 unsigned orientations + 4 energies


@dataclasses.dataclass
class FhogDetector:
  """A parsed dlib HOG detector (D detectors, filters [D, 31, fh, fw]).

  Attributes:
    weights: [D, 31 * fh * fw] float64, each detector's weight vector (plane-major, then row, col).
    thresholds: [D] float64, subtracted from the filter response (score = response - threshold).
    cell_size, padding, window_width, window_height: scanner settings (pixels / cells).
    max_pyramid_levels, min_pyramid_layer_width, min_pyramid_layer_height: pyramid settings.
    iou_thresh, percent_covered_thresh: NMS (dlib's ``test_box_overlap``).
  """
  weights: np.ndarray
  thresholds: np.ndarray
  cell_size: int
  padding: int
  window_width: int
  window_height: int
  max_pyramid_levels: int
  min_pyramid_layer_width: int
  min_pyramid_layer_height: int
  iou_thresh: float
  percent_covered_thresh: float

  @property
  def fhog_window(self) -> tuple[int, int]:
    """(height, width) of the filters in cells (dlib's ``compute_fhog_window_size``)."""
    def span(n):
      lo = -(n // 2)
      hi = lo + n - 1
      to_cell = lambda p: int((p - 1) / self.cell_size) - 1  # C++ division truncates toward zero
      return to_cell(hi) - to_cell(lo) + 1 + 2 * self.padding
    return span(self.window_height), span(self.window_width)

  def filters(self) -> np.ndarray:
    """[D, 31, fh, fw] float64 filters."""
    fh, fw = self.fhog_window
    return self.weights.reshape(-1, NUM_PLANES, fh, fw)


def _fail(r: Reader, offset: int, message: str) -> DlibFormatError:
  return r.error(message, offset)


def parse_fhog_detector(r: Reader) -> FhogDetector:
  """Parses one detector from `r` (the whole remaining input)."""
  start = r.pos
  version = r.int("object_detector version")
  if version != 2:
    raise _fail(r, start, f"unsupported object_detector version {version} (expected 2: dlib >= 18.x)")
  start = r.pos
  sv = r.int("scan_fhog_pyramid version")
  if sv != 1:
    raise _fail(r, start, f"unsupported scan_fhog_pyramid version {sv} (expected 1)")
  start = r.pos
  max_size, size = r.uint("feats max size"), r.uint("feats size")
  if size or max_size:
    raise _fail(r, start, "expected an empty feature pyramid in a saved detector")
  cell_size = r.uint("cell_size", limit=1 << 10)
  padding = r.uint("padding", limit=1 << 10)
  window_width = r.uint("window_width", limit=1 << 14)
  window_height = r.uint("window_height", limit=1 << 14)
  max_levels = r.uint("max_pyramid_levels", limit=1 << 31)
  min_w = r.uint("min_pyramid_layer_width", limit=1 << 31)
  min_h = r.uint("min_pyramid_layer_height", limit=1 << 31)
  r.float("nuclear_norm_regularization_strength")
  start = r.pos
  dims = r.uint("num_dimensions", limit=1 << 26)
  if cell_size < 1 or window_width < 1 or window_height < 1:
    raise _fail(r, start, f"bad scanner settings: cell {cell_size}, window {window_width}x{window_height}")
  iou = r.float("iou_thresh")
  cov = r.float("percent_covered_thresh")
  start = r.pos
  n = r.uint("number of detectors", limit=1 << 16)
  if n < 1:
    raise _fail(r, start, "no detectors in the file")
  weights, thresholds = [], []
  for i in range(n):
    start = r.pos
    nr, nc = r.int(f"rows of w[{i}]"), r.int(f"cols of w[{i}]")
    nr, nc = abs(nr), abs(nc)  # dlib writes -nr, -nc (newer format); older files nr, nc
    if nc != 1 or nr != dims + 1:
      raise _fail(r, start, f"w[{i}] has shape {nr}x{nc}, expected {dims + 1}x1")
    if 2 * nr > r.remaining:  # each float takes at least 2 bytes: checked before the loop
      raise _fail(r, r.pos, f"truncated: w[{i}] needs {nr} floats, {r.remaining} bytes left")
    v = np.array([r.float(f"w[{i}][{j}]") for j in range(nr)], np.float64)
    if not np.isfinite(v).all():
      raise _fail(r, start, f"w[{i}] has non-finite values")
    weights.append(v[:-1])
    thresholds.append(v[-1])
  r.finish()
  det = FhogDetector(np.stack(weights), np.array(thresholds), cell_size, padding, window_width,
                     window_height, max_levels, min_w, min_h, iou, cov)
  fh, fw = det.fhog_window
  if NUM_PLANES * fh * fw != dims:
    raise r.error(f"num_dimensions {dims} != 31 * {fh} * {fw} for a {window_width}x{window_height} window", 0)
  return det


def read_fhog_detector(path: str | os.PathLike) -> FhogDetector:
  """Reads a saved dlib HOG detector (``.svm``) file."""
  return parse_fhog_detector(read_file(os.fspath(path)))


def effective_filters(det: FhogDetector) -> tuple[np.ndarray, bool]:
  """The float32 filters dlib correlates with, [D, 31, fh, fw], and whether dlib uses the separable path.

  dlib (``build_fhog_filterbank``) keeps, per plane, the SVD components whose
  singular value is >= max(1e-4, 0.001 * largest) as float32 row/column filters;
  ``apply_filters_to_fhog`` uses them when their total count is <= 31 * min(fh, fw) / 3,
  else the full filters cast to float32. Both are returned as full 2-D filters (the
  separable ones as the sum of outer products of the float32 parts).
  """
  f = det.filters()
  fh, fw = det.fhog_window
  out = np.zeros(f.shape, np.float32)
  separable = []
  for d in range(f.shape[0]):
    parts = []
    count = 0
    for p in range(NUM_PLANES):
      u, s, vt = np.linalg.svd(f[d, p])
      thresh = max(1e-4, s.max() * 0.001) if s.size else 1e-4
      keep = s >= thresh  # dlib's round_zeros zeroes |w| < thresh
      cols = (u[:, keep] * np.sqrt(s[keep])).astype(np.float32)
      rows = (vt[keep].T * np.sqrt(s[keep])).astype(np.float32)
      parts.append((cols, rows))
      count += int(keep.sum())
    use_sep = not count > NUM_PLANES * min(fh, fw) / 3.0
    separable.append(use_sep)
    for p in range(NUM_PLANES):
      if use_sep:
        cols, rows = parts[p]
        out[d, p] = (cols.astype(np.float64) @ rows.astype(np.float64).T).astype(np.float32)
      else:
        out[d, p] = f[d, p].astype(np.float32)
  if len(set(separable)) != 1:
    raise ValueError("detectors disagree on the separable path; not supported")
  return out, separable[0]


def convert(src: str | os.PathLike, out: str | os.PathLike) -> dict[str, str]:
  """Converts a dlib ``.svm`` HOG detector into an ``.npz`` (no pickles); returns the sha256s."""
  det = read_fhog_detector(src)
  filt, sep = effective_filters(det)
  fh, fw = det.fhog_window
  np.savez_compressed(out, filters=filt, thresholds=det.thresholds,
           settings=np.array([det.cell_size, det.padding, det.window_width, det.window_height,
                              det.max_pyramid_levels, det.min_pyramid_layer_width,
                              det.min_pyramid_layer_height, fh, fw, int(sep)], np.int64),
           overlap=np.array([det.iou_thresh, det.percent_covered_thresh], np.float64))
  sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
  return {"source": sha(src), "output": sha(out)}


if __name__ == "__main__":  # pragma: no cover - one-off conversion
  if len(sys.argv) != 3:
    sys.exit("usage: python -m jaxface.formats.dlib_fhog SRC.svm OUT.npz")
  for k, v in convert(sys.argv[1], sys.argv[2]).items():
    print(f"{k} sha256 {v}")
