"""Parser for dlib's shape predictor files (``shape_predictor_5_face_landmarks.dat``,
``shape_predictor_68_face_landmarks.dat``), without dlib.

:func:`parse_shape_predictor` (bytes) and :func:`read_shape_predictor` (a path)
return a :class:`ShapePredictorModel` of NumPy arrays; the whole file is
tokenized at once with NumPy, and errors are
:class:`jaxface.formats.dlib.DlibFormatError` naming the file and byte offset.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxface.formats.dlib import DlibFormatError, Reader, read_file

# Version of :func:`convert`'s output layout (part of the weight cache's key, jaxface.pretrained).
CONVERTER_VERSION = "1"

# Specials of dlib's scalar float encoding (exponent values), as in formats.dlib.
_EXP_INF, _EXP_NINF, _EXP_NAN = 32000, 32001, 32002


@dataclasses.dataclass
class ShapePredictorModel:
  """A parsed shape predictor (all arrays NumPy, C cascades, T trees, F feature pixels, P parts).

  Attributes:
    initial_shape: [P, 2] float32, mean shape in box-normalized coordinates (x, y).
    split_idx: [C, T, S, 2] int32, feature pixel indices (idx1, idx2) of each split node
      (S = 2**depth - 1, nodes in breadth-first order: children of i are 2i+1, 2i+2).
    thresholds: [C, T, S] float32, go left when f[idx1] - f[idx2] > threshold.
    leaves: [C, T, S + 1, P, 2] float32, shape increments.
    anchor_idx: [C, F] int32, part each feature pixel is anchored to.
    deltas: [C, F, 2] float32, feature pixel offsets (x, y) from the anchor in
      mean-shape coordinates.
  """
  initial_shape: np.ndarray
  split_idx: np.ndarray
  thresholds: np.ndarray
  leaves: np.ndarray
  anchor_idx: np.ndarray
  deltas: np.ndarray

  @property
  def num_parts(self) -> int:
    return int(self.initial_shape.shape[0])

  @property
  def depth(self) -> int:
    return int(self.thresholds.shape[2] + 1).bit_length() - 1

  def to_dict(self) -> dict[str, np.ndarray]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d) -> ShapePredictorModel:
    m = cls(initial_shape=np.asarray(d["initial_shape"], np.float32),
            split_idx=np.asarray(d["split_idx"], np.int32),
            thresholds=np.asarray(d["thresholds"], np.float32),
            leaves=np.asarray(d["leaves"], np.float32),
            anchor_idx=np.asarray(d["anchor_idx"], np.int32),
            deltas=np.asarray(d["deltas"], np.float32))
    m.validate()
    return m

  def validate(self, path: str = "<shape predictor>") -> None:
    """Checks shapes and index ranges (ValueError naming the field)."""
    p = self.initial_shape.shape[0]
    c, t, s, _ = self.split_idx.shape
    f = self.anchor_idx.shape[1]
    want = {"initial_shape": (p, 2), "split_idx": (c, t, s, 2), "thresholds": (c, t, s),
            "leaves": (c, t, s + 1, p, 2), "anchor_idx": (c, f), "deltas": (c, f, 2)}
    for name, shape in want.items():
      if getattr(self, name).shape != shape:
        raise ValueError(f"{path}: {name} has shape {getattr(self, name).shape}, expected {shape}")
    if s + 1 & s or s < 1:
      raise ValueError(f"{path}: trees with {s} splits are not complete binary trees")
    if self.split_idx.size and (self.split_idx.min() < 0 or self.split_idx.max() >= f):
      raise ValueError(f"{path}: split_idx outside the {f} feature pixels")
    if self.anchor_idx.size and (self.anchor_idx.min() < 0 or self.anchor_idx.max() >= p):
      raise ValueError(f"{path}: anchor_idx outside the {p} parts")


# ---------------------------------------------------------------------------
# Vectorized tokenizer
# ---------------------------------------------------------------------------


def _token_starts(data: np.ndarray, start: int) -> np.ndarray:
  """Byte offsets of the chain of integer records from ``start`` to the end of ``data``.

  Decoding millions of records one at a time in Python is slow, so the whole
  file is tokenized at once with NumPy: an integer's control byte gives its
  length, so the token start positions are the chain ``p -> p + 1 + (byte[p] & 15)``
  from the first byte, which pointer doubling enumerates in O(n log n)
  vectorized steps.

  Returns int64 [K] (the last one may overrun the data: the caller checks).
  """
  n = data.size
  if start >= n:
    return np.zeros((0,), np.int64)
  # int32 positions halve the memory of the doubling steps (files here are far below 2 GiB).
  dtype = np.int32 if n < (1 << 31) - 16 else np.int64
  # nxt[i]: where the record starting at byte i would end; n is the absorbing end.
  nxt = np.arange(1, n + 2, dtype=dtype)
  nxt[:n] += data & 0x0F
  np.minimum(nxt, n, out=nxt)
  starts = np.array([start], dtype)
  jump = nxt  # jump = nxt composed len(starts) times
  while True:
    more = jump[starts]
    more = more[more < n]
    if more.size == 0:
      return starts.astype(np.int64)
    starts = np.concatenate([starts, more])
    if more.size < starts.size - more.size:  # chain ended in this round
      return starts.astype(np.int64)
    jump = jump[jump]


class _Tokens:
  """Decoded integer records with a cursor; errors carry the record's byte offset."""

  def __init__(self, r: Reader):
    self.path = r.path
    data = np.frombuffer(r.data, np.uint8)
    self.end = data.size
    offs = _token_starts(data, r.pos)
    if offs.size and offs[-1] < (1 << 31) - 16:
      offs = offs.astype(np.int32)  # the per-record arrays dominate memory: keep them small
    ctrl = data[offs] if offs.size else np.zeros((0,), np.uint8)
    nbytes = ctrl & 0x0F
    bad = (nbytes < 1) | (nbytes > 8) | ((ctrl & 0x70) != 0)
    over = offs + 1 + nbytes.astype(offs.dtype) > self.end
    self.stop_reason = None
    count = offs.size
    first_bad = np.flatnonzero(bad | over)
    del over
    if first_bad.size:
      k = int(first_bad[0])
      count = k
      if bad[k]:
        self.stop_reason = (int(offs[k]), f"bad control byte 0x{int(ctrl[k]):02x} for an integer record")
      else:
        self.stop_reason = (int(offs[k]), f"truncated: integer record needs {int(nbytes[k])} bytes, "
                            f"{self.end - int(offs[k]) - 1} left")
    del bad
    offs, ctrl, nbytes = offs[:count], ctrl[:count], nbytes[:count]
    # Magnitudes: little-endian bytes 1..nbytes after the control byte. Byte j is gathered only
    # for the records that have it (most records here are 1-3 bytes long).
    mag = data[offs + 1].astype(np.uint64) if count else np.zeros((0,), np.uint64)
    for j in range(1, 8):
      has = np.flatnonzero(nbytes > j)
      if has.size == 0:
        break
      mag[has] |= data[offs[has] + 1 + j].astype(np.uint64) << np.uint64(8 * j)
    huge = mag >= np.uint64(1 << 63)
    if huge.any():  # beyond any count or float mantissa we accept: stop the stream there
      k = int(np.flatnonzero(huge)[0])
      self.stop_reason = (int(offs[k]), "integer record too large")
      offs, ctrl, mag = offs[:k], ctrl[:k], mag[:k]
    vals = mag.view(np.int64)
    neg = np.flatnonzero(ctrl & 0x80)
    vals[neg] = -vals[neg]
    self.vals = vals
    self.offs = offs
    self.i = 0

  # -- errors -------------------------------------------------------------
  def offset(self, i: int) -> int:
    if i < self.offs.size:
      return int(self.offs[i])
    return self.stop_reason[0] if self.stop_reason else self.end

  def error(self, message: str, i: int | None = None) -> DlibFormatError:
    return DlibFormatError(self.path, self.offset(self.i if i is None else i), message)

  def _need(self, k: int, what: str) -> None:
    if k < 0 or self.i + k > self.vals.size:
      if self.stop_reason and self.i + k > self.vals.size:
        at, why = self.stop_reason
        raise DlibFormatError(self.path, at, f"{why} (reading {what})")
      raise self.error(f"truncated: {what} needs {k} records, {self.vals.size - self.i} left")

  # -- reads --------------------------------------------------------------
  def int(self, what: str) -> int:
    self._need(1, what)
    self.i += 1
    return int(self.vals[self.i - 1])

  def count(self, what: str, per_item: int) -> int:
    """A vector length, checked against the records that remain (``per_item`` each)."""
    at = self.i
    n = self.int(what)
    if n < 0 or n * per_item > self.vals.size - self.i:
      raise self.error(f"{what} = {n} does not fit the {self.vals.size - self.i} records left", at)
    return n

  def ints(self, n: int, what: str) -> np.ndarray:
    self._need(n, what)
    out = self.vals[self.i:self.i + n]
    self.i += n
    return out

  def floats(self, n: int, what: str) -> np.ndarray:
    """``n`` scalar floats -> float64 [n] (exact: mantissas are checked to fit 53 bits)."""
    at = self.i
    pairs = self.ints(2 * n, what).reshape(n, 2)
    return _decode_floats(self, pairs, at + 2 * np.arange(n), what)

  def matrix(self, what: str, *, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    """A float matrix record (rows/cols negative in the newer format) -> float64 [rows, cols]."""
    at = self.i
    r, c = abs(self.int(f"rows of {what}")), abs(self.int(f"cols of {what}"))
    if (rows is not None and r != rows) or (cols is not None and c != cols):
      raise self.error(f"{what} is {r}x{c}, expected {rows}x{cols}", at)
    if r * c * 2 > self.vals.size - self.i:
      raise self.error(f"{what} of {r}x{c} floats does not fit the records left", at)
    return self.floats(r * c, what).reshape(r, c)


def _decode_floats(tok: _Tokens, pairs: np.ndarray, rec: np.ndarray, what: str) -> np.ndarray:
  """[n, 2] (mantissa, exponent) record pairs -> float64 [n]; ``rec`` [n]: record index of each mantissa."""
  m, e = pairs[:, 0], pairs[:, 1]
  special = (e >= _EXP_INF) & (e <= _EXP_NAN)
  bad = ~special & ((np.abs(e) > 1100) | (np.abs(m) >= 1 << 53))
  if bad.any():
    k = int(np.flatnonzero(bad)[0])
    raise tok.error(f"{what}: float {k} (mantissa {int(m[k])}, exponent {int(e[k])}) is out of range",
                    int(rec[k]))
  with np.errstate(over="ignore"):
    out = np.ldexp(m.astype(np.float64), np.where(special, 0, e).astype(np.int32))
  out = np.where(e == _EXP_INF, np.inf, out)
  out = np.where(e == _EXP_NINF, -np.inf, out)
  return np.where(e == _EXP_NAN, np.nan, out)


# ---------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------

_MAX_PARTS = 1 << 12
_MAX_DEPTH = 16


def parse_shape_predictor(data: bytes, path: str = "<bytes>") -> ShapePredictorModel:
  """Parses the bytes of a dlib shape predictor file -> :class:`ShapePredictorModel`.

  Layout (all records are dlib integers; a scalar float is two integers,
  mantissa then exponent, value = mantissa * 2**exponent):

  * version ``1``;
  * initial shape: a float column matrix (rows, cols as integers, negative in
    the newer format, then rows*cols floats) holding x0, y0, x1, y1, ...;
  * forests: vector (length C) of vectors (length T) of regression trees; a tree
    is a vector of splits (idx1, idx2, threshold float) and a vector of leaves
    (each a float column matrix of the shape's size);
  * anchor indices: vector (C) of vectors (F) of integers (part index);
  * deltas: vector (C) of vectors (F) of 2-D float vectors (x, y).

  The 5-point model has C = 15 cascades of T = 500 depth-4 trees (15 splits, 16
  leaves of 10 floats) and F = 800 feature pixels, about 2.6 million integer
  records; the 68-point model has the same cascades with leaves of 136 floats
  (about 17 million floats, parsed in ~10 s): every record is tokenized at once (:func:`_token_starts`), then the
  structure is checked and sliced from the token array, one cascade at a time
  (trees must all share one shape, which every dlib model has).

  Consumes every byte; raises DlibFormatError(path, offset, message) otherwise,
  naming the byte offset of the offending record. No count is trusted before it
  is checked against the number of records that remain, so corrupt input can
  neither hang the parser nor make it allocate more than the file's size.
  """
  r = Reader(data, path)
  version = r.int("shape predictor version")
  if version != 1:
    raise r.error(f"not a dlib shape predictor (first record {version}, expected version 1)", 0)
  tok = _Tokens(r)

  init = tok.matrix("initial shape", cols=1)
  if init.shape[0] % 2 or not 2 <= init.shape[0] <= 2 * _MAX_PARTS:
    raise tok.error(f"initial shape has {init.shape[0]} values, expected 2 per part", 0)
  p2 = init.shape[0]
  parts = p2 // 2

  # Forests: C cascades of T trees, every tree the same shape (checked, vectorized).
  c_at = tok.i
  num_cascades = tok.count("number of cascades", 1)
  if num_cascades < 1:
    raise tok.error("the model has no cascades", c_at)
  split_idx, thresholds, leaves = [], [], []
  tree_layout = None
  for ci in range(num_cascades):
    t_at = tok.i
    num_trees = tok.count(f"number of trees in cascade {ci}", 1)
    if num_trees < 1:
      raise tok.error(f"cascade {ci} has no trees", t_at)
    if tree_layout is None:
      # Read the first tree's header to learn S (splits) and L (leaves).
      s_at = tok.i
      num_splits = tok.count("number of splits of a tree", 4)
      depth = (num_splits + 1).bit_length() - 1
      if num_splits < 1 or (num_splits + 1) & num_splits or depth > _MAX_DEPTH:
        raise tok.error(f"a tree with {num_splits} splits is not a complete binary tree", s_at)
      tree_layout = (num_splits, 1 + 4 * num_splits + 1 + (num_splits + 1) * (2 + 2 * p2))
      tok.i = s_at
    num_splits, stride = tree_layout
    if num_trees * stride > tok.vals.size - tok.i:
      raise tok.error(f"cascade {ci}: {num_trees} trees do not fit the records left", t_at)
    base = tok.i
    block = tok.ints(num_trees * stride, f"trees of cascade {ci}").reshape(num_trees, stride)
    # Header records that must agree across trees: split count, leaf count, leaf matrix dims.
    leaf0 = 1 + 4 * num_splits
    checks = [(0, num_splits, "split count"), (leaf0, num_splits + 1, "leaf count")]
    for k in range(num_splits + 1):
      at = leaf0 + 1 + k * (2 + 2 * p2)
      checks += [(at, p2, "leaf rows"), (at + 1, 1, "leaf cols")]
    cols = np.array([col for col, _, _ in checks])
    wants = np.array([want for _, want, _ in checks])
    bad = np.abs(block[:, cols]) != wants  # [T, len(checks)], tree-major = file order
    if bad.any():
      t, k = divmod(int(np.argmax(bad.reshape(-1))), len(checks))
      col, want, what = checks[k]
      raise tok.error(f"cascade {ci} tree {t}: {what} {int(block[t, col])}, expected {want} like the "
                      f"first tree (trees of different shapes are not supported)",
                      base + t * stride + col)
    splits = block[:, 1:leaf0].reshape(num_trees, num_splits, 4)
    idx = splits[:, :, :2]
    rec = base + np.arange(num_trees * stride).reshape(num_trees, stride)
    thr = _decode_floats(tok, splits[:, :, 2:].reshape(-1, 2),
                         rec[:, 1:leaf0].reshape(num_trees, num_splits, 4)[:, :, 2].reshape(-1),
                         f"split thresholds of cascade {ci}")
    lv = block[:, leaf0 + 1:].reshape(num_trees, num_splits + 1, 2 + 2 * p2)[:, :, 2:]
    lrec = rec[:, leaf0 + 1:].reshape(num_trees, num_splits + 1, 2 + 2 * p2)[:, :, 2::2]
    lv = _decode_floats(tok, lv.reshape(-1, 2), lrec.reshape(-1), f"leaf values of cascade {ci}")
    split_idx.append(idx)
    thresholds.append(thr.reshape(num_trees, num_splits))
    leaves.append(lv.reshape(num_trees, num_splits + 1, parts, 2))
  if len({a.shape[0] for a in split_idx}) != 1:
    raise tok.error("cascades have different numbers of trees (not supported)", c_at)

  a_at = tok.i
  n = tok.count("number of anchor-index cascades", 1)
  if n != num_cascades:
    raise tok.error(f"{n} anchor-index lists for {num_cascades} cascades", a_at)
  anchors = []
  for ci in range(num_cascades):
    f_at = tok.i
    f = tok.count(f"number of feature pixels of cascade {ci}", 1)
    if anchors and f != anchors[0].size:
      raise tok.error(f"cascade {ci} has {f} feature pixels, cascade 0 has {anchors[0].size}", f_at)
    a = tok.ints(f, f"anchor indices of cascade {ci}")
    bad = (a < 0) | (a >= parts)
    if bad.any():
      k = int(np.flatnonzero(bad)[0])
      raise tok.error(f"anchor index {int(a[k])} outside the {parts} parts", tok.i - f + k)
    anchors.append(a)
  num_features = anchors[0].size
  if num_features < 1:
    raise tok.error("the model has no feature pixels", a_at)

  d_at = tok.i
  n = tok.count("number of delta cascades", 1)
  if n != num_cascades:
    raise tok.error(f"{n} delta lists for {num_cascades} cascades", d_at)
  deltas = []
  for ci in range(num_cascades):
    f_at = tok.i
    f = tok.count(f"number of deltas of cascade {ci}", 4)
    if f != num_features:
      raise tok.error(f"cascade {ci} has {f} deltas for {num_features} feature pixels", f_at)
    deltas.append(tok.floats(2 * f, f"deltas of cascade {ci}").reshape(f, 2))

  if tok.i != tok.vals.size or tok.stop_reason is not None:
    at = tok.offset(tok.i)
    raise DlibFormatError(path, at, f"{tok.end - at} unexpected trailing bytes after the model")

  split_idx_arr = np.stack(split_idx)
  bad = (split_idx_arr < 0) | (split_idx_arr >= num_features)
  if bad.any():
    c, t, s, j = (int(v) for v in np.argwhere(bad)[0])
    raise DlibFormatError(path, 0, f"cascade {c} tree {t} split {s}: feature index "
                          f"{int(split_idx_arr[c, t, s, j])} outside the {num_features} feature pixels")
  model = ShapePredictorModel(
      initial_shape=init.reshape(parts, 2).astype(np.float32),
      split_idx=split_idx_arr.astype(np.int32),
      thresholds=np.stack(thresholds).astype(np.float32),
      leaves=np.stack(leaves).astype(np.float32),
      anchor_idx=np.stack(anchors).astype(np.int32),
      deltas=np.stack(deltas).astype(np.float32))
  model.validate(path)
  return model


def read_shape_predictor(path: str | os.PathLike) -> ShapePredictorModel:
  """Reads and parses a shape predictor ``.dat`` file (see :func:`parse_shape_predictor`)."""
  r = read_file(os.fspath(path))
  return parse_shape_predictor(bytes(r.data), r.path)


def convert(path: str) -> dict[str, np.ndarray]:
  """The weight cache's converter (``jaxface.pretrained.converted("shape5")`` and ``"shape68"``): file -> dict of
  NumPy arrays (see ShapePredictorModel)."""
  return read_shape_predictor(path).to_dict()
