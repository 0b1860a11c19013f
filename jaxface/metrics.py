"""Evaluation of face embeddings: verification (pairs) and identification.

Everything runs on the host in NumPy float64 after the embeddings are computed:
the inputs are at most ~1e4 images / ~1e6 pairs, sorting and exact integer
counting are what matter, and float64 keeps distance ties and threshold
midpoints exact for float32 embeddings. A pair is predicted "same identity" when
``distance <= threshold``; distances are squared Euclidean on the embeddings as
given (pass L2-normalized ones for the FaceNet convention: squared distances in
[0, 4]). FAR = false accepts / negative pairs, TAR = true accepts / positive
pairs (the ROC's ``fpr``/``tpr``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# All functions are vectorized; the only Python loops are over folds, thresholds asked for,
# or fixed-size memory chunks.
__all__ = [
    "all_pairs",
    "balanced_pairs",
    "stratified_folds",
    "pair_distances",
    "roc_curve",
    "roc_auc",
    "tar_at_far",
    "best_threshold",
    "kfold_verification",
    "identification",
    "evaluate_embeddings",
    "save_roc_png",
    "check_scores",
    "as_embeddings",
]

# Elements of a [rows, gallery] float64 distance block kept in memory at once
# (32 MiB), so that 1e4 x 1e4 identification never materializes 800 MB.
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------


def _as_labels(labels: Any, name: str = "labels") -> np.ndarray:
  arr = np.asarray(labels)
  if arr.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D integer array [N], got shape {arr.shape}")
  if arr.size == 0:
    raise ValueError(f"{name}: empty array")
  if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
    raise ValueError(f"{name}: expected integer labels, got dtype {arr.dtype}")
  return arr.astype(np.int64, copy=False)


def _as_same(same: Any, name: str = "same") -> np.ndarray:
  arr = np.asarray(same)
  if arr.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D bool array [M], got shape {arr.shape}")
  if arr.size == 0:
    raise ValueError(f"{name}: empty array")
  if arr.dtype != np.bool_:
    # 0/1 integer masks are common (e.g. read from a pairs file); anything else
    # is almost certainly a mix-up of arguments.
    if not np.issubdtype(arr.dtype, np.integer) or not np.isin(arr, (0, 1)).all():
      raise ValueError(f"{name}: expected bool (or 0/1) values, got dtype {arr.dtype}")
    arr = arr.astype(np.bool_)
  return arr


def check_scores(distances: Any, same: Any, *, need_both: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Validates labeled pair scores: (distances [M] real, same [M] bool or 0/1) -> float64 / bool copies.

  Raises ValueError naming the argument for a wrong shape or dtype, an empty,
  NaN or infinite ``distances``, mismatched lengths, and (with ``need_both``)
  when one class is missing.
  """
  d = np.asarray(distances)
  if d.ndim != 1:
    raise ValueError(f"distances: expected a 1-D array [M], got shape {d.shape}")
  if d.size == 0:
    raise ValueError("distances: empty array")
  if not (np.issubdtype(d.dtype, np.floating) or np.issubdtype(d.dtype, np.integer)):
    raise ValueError(f"distances: expected a real array, got dtype {d.dtype}")
  d = d.astype(np.float64)
  if np.isnan(d).any():
    raise ValueError(f"distances: contains {int(np.isnan(d).sum())} NaN value(s)")
  if not np.isfinite(d).all():
    raise ValueError("distances: contains infinite value(s)")
  s = _as_same(same)
  if s.shape != d.shape:
    raise ValueError(f"same: length {s.shape[0]} does not match distances length {d.shape[0]}")
  if need_both:
    num_pos = int(s.sum())
    if num_pos == 0 or num_pos == s.size:
      kind = "positive (True)" if num_pos == 0 else "negative (False)"
      raise ValueError(f"same: needs both classes, but there are no {kind} pairs "
                       f"among {s.size}")
  return d, s


def as_embeddings(x: Any, name: str) -> np.ndarray:
  """Validates [N, D] finite real embeddings (N, D >= 1) -> a float64 copy; errors name ``name``."""
  arr = np.asarray(x)
  if arr.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D array [N, D], got shape {arr.shape}")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"{name}: empty array of shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
    raise ValueError(f"{name}: expected a real array, got dtype {arr.dtype}")
  arr = arr.astype(np.float64)
  if not np.isfinite(arr).all():
    bad = int((~np.isfinite(arr)).any(axis=1).sum())
    raise ValueError(f"{name}: {bad} row(s) contain NaN or infinite values")
  return arr


def _check_seed(seed: Any) -> int:
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
  return int(seed)


# --------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------


def all_pairs(labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All unordered pairs of images.

  Args:
    labels: [N] int identity of each image.

  Returns:
    (i, j, same): [M] int64, [M] int64, [M] bool with M = N (N - 1) / 2, every
    i < j exactly once in row-major order (sorted by i, then j). Memory is
    O(N^2): for N = 1e4 that is 5e7 pairs (~0.85 GB); prefer `balanced_pairs`.
  """
  lab = _as_labels(labels)
  i, j = np.triu_indices(lab.shape[0], k=1)
  return i.astype(np.int64), j.astype(np.int64), lab[i] == lab[j]


def _label_groups(lab: np.ndarray):
  """Sorted-by-label view: order [N], group start/end of each sorted position."""
  order = np.argsort(lab, kind="stable")
  _, first, counts = np.unique(lab[order], return_index=True, return_counts=True)
  group = np.repeat(np.arange(first.shape[0]), counts)
  start = first[group]
  end = start + counts[group]
  return order, start, end, counts


def _unrank(t: np.ndarray, per_position: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Maps linear pair indices to (a, b) in sorted positions.

  Sorted position a owns `per_position[a]` consecutive pair indices whose
  partners are `base[a], base[a] + 1, ...`. Unranking lets us sample pairs
  uniformly without replacement without enumerating all O(N^2) of them.
  """
  cum = np.cumsum(per_position)
  a = np.searchsorted(cum, t, side="right")
  offset = t - (cum[a] - per_position[a])
  return a, base[a] + offset


def balanced_pairs(labels: Any, seed: int, max_pairs: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All positive pairs plus an equal number of random negative pairs (LFW style).

  Positives are all same-identity pairs i < j; if `max_pairs` is given and
  there are more than ``max_pairs // 2`` of them, a uniformly random subset of
  that size is kept. The same number of distinct negative pairs is drawn
  uniformly without replacement from all different-identity pairs (if there
  are fewer negatives than that, all negatives are used and the positives are
  subsampled to match, so the result is always exactly balanced). Sampling is
  exact and O(result) in memory: pairs are drawn as linear indices and
  unranked, never enumerating all N^2 pairs.

  Args:
    labels: [N] int identity of each image.
    seed: non-negative int; the result is a deterministic function of
      (labels, seed, max_pairs).
    max_pairs: optional cap on the total number of pairs (>= 2).

  Returns:
    (i, j, same): [2K] int64, [2K] int64, [2K] bool with i < j; the K positive
    pairs come first, then the K negatives (each block in a fixed
    label-sorted order).

  Raises:
    ValueError: if no identity has two images (no positive pairs) or all
      images share one identity (no negative pairs).
  """
  lab = _as_labels(labels)
  seed = _check_seed(seed)
  if max_pairs is not None:
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, (int, np.integer)) or max_pairs < 2:
      raise ValueError(f"max_pairs: expected None or an int >= 2, got {max_pairs!r}")
  n = lab.shape[0]
  order, start, end, counts = _label_groups(lab)
  positions = np.arange(n, dtype=np.int64)
  pos_per = positions - start          # partners in [start, a) within the group
  neg_per = n - end                    # partners in [end, n): later groups
  num_pos = int(pos_per.sum())
  num_neg = int(neg_per.sum())
  if num_pos == 0:
    raise ValueError(f"labels: no identity has two images among {n}, so there are no positive pairs")
  if num_neg == 0:
    raise ValueError(f"labels: all {n} images have the same identity, so there are no negative pairs")
  k = min(num_pos, num_neg)
  if max_pairs is not None:
    k = min(k, int(max_pairs) // 2)
  rng = np.random.default_rng(seed)
  t_pos = np.arange(num_pos) if k == num_pos else np.sort(rng.choice(num_pos, size=k, replace=False))
  t_neg = np.arange(num_neg) if k == num_neg else np.sort(rng.choice(num_neg, size=k, replace=False))
  # Positive unranking uses the *second* element as owner: position b pairs
  # with a in [start[b], b), so base is start.
  b, a = _unrank(t_pos, pos_per, start)
  a2, b2 = _unrank(t_neg, neg_per, end)
  ia = order[np.concatenate([a, a2])]
  ib = order[np.concatenate([b, b2])]
  i = np.minimum(ia, ib).astype(np.int64)
  j = np.maximum(ia, ib).astype(np.int64)
  return i, j, lab[i] == lab[j]


def stratified_folds(same: Any, num_folds: int = 10, seed: int = 0) -> np.ndarray:
  """Random fold id for each pair, balanced per class.

  Positives and negatives are each shuffled (by `seed`) and dealt round-robin
  into `num_folds` folds, so every fold holds floor or ceil of P/F positives
  and of N/F negatives, like LFW's 10 folds of 300 + 300.

  Args:
    same: [M] bool.
    num_folds: int >= 2, at most M.
    seed: non-negative int.

  Returns:
    [M] int64 fold ids in [0, num_folds).
  """
  s = _as_same(same)
  seed = _check_seed(seed)
  if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
    raise ValueError(f"num_folds: expected an int >= 2, got {num_folds!r}")
  if num_folds > s.shape[0]:
    raise ValueError(f"num_folds: {num_folds} folds but only {s.shape[0]} pairs")
  rng = np.random.default_rng(seed)
  folds = np.empty(s.shape[0], dtype=np.int64)
  offset = 0
  for cls in (True, False):
    idx = np.flatnonzero(s == cls)
    idx = idx[rng.permutation(idx.shape[0])]
    # Continue the round-robin across classes so the fold sizes also differ by
    # at most one in total.
    folds[idx] = (np.arange(idx.shape[0]) + offset) % num_folds
    offset += idx.shape[0]
  return folds


def pair_distances(embeddings: Any, i: Any, j: Any) -> np.ndarray:
  """Squared Euclidean distance of each pair.

  Args:
    embeddings: [N, D] float (any real dtype; computed in float64).
    i, j: [M] int indices into embeddings.

  Returns:
    [M] float64 distances ||e[i] - e[j]||^2 (computed as differences, not via
    the norm expansion, so identical embeddings give exactly 0).
  """
  emb = as_embeddings(embeddings, "embeddings")
  ii = np.asarray(i)
  jj = np.asarray(j)
  if ii.ndim != 1 or jj.shape != ii.shape:
    raise ValueError(f"i, j: expected equal-length 1-D index arrays, got {ii.shape} and {jj.shape}")
  if ii.size and (min(ii.min(), jj.min()) < 0 or max(ii.max(), jj.max()) >= emb.shape[0]):
    raise ValueError(f"i, j: indices out of range for {emb.shape[0]} embeddings")
  out = np.empty(ii.shape[0], dtype=np.float64)
  step = max(1, _CHUNK_ELEMENTS // emb.shape[1])
  for lo in range(0, ii.shape[0], step):
    diff = emb[ii[lo:lo + step]] - emb[jj[lo:lo + step]]
    out[lo:lo + step] = np.einsum("md,md->m", diff, diff)
  return out


# --------------------------------------------------------------------------
# Verification metrics
# --------------------------------------------------------------------------


def _grouped_counts(d: np.ndarray, s: np.ndarray):
  """Unique distances ascending [K], #positives and #negatives at each [K] int64."""
  u, inv = np.unique(d, return_inverse=True)
  pos = np.bincount(inv[s], minlength=u.shape[0]).astype(np.int64)
  neg = np.bincount(inv[~s], minlength=u.shape[0]).astype(np.int64)
  return u, inv, pos, neg


def roc_curve(distances: Any, same: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Exact ROC curve of a distance-based verifier.

  Point k predicts "same" for every pair with ``distance <= thresholds[k]``.
  Thresholds are **ascending**: ``thresholds[0] = -inf`` (nothing accepted,
  fpr = tpr = 0), followed by every unique distance, the last of which accepts
  everything (fpr = tpr = 1). Tied distances are one threshold, so a tie
  between positives and negatives is a single diagonal step; the trapezoidal
  area under this curve is exactly `roc_auc`.

  Args:
    distances: [M] float; both classes must occur in `same`.
    same: [M] bool, True for same-identity pairs.

  Returns:
    (fpr, tpr, thresholds): three [K + 1] float64 arrays, fpr and tpr
    non-decreasing.
  """
  d, s = check_scores(distances, same)
  u, _, pos, neg = _grouped_counts(d, s)
  tp = np.concatenate([[0], np.cumsum(pos)])
  fp = np.concatenate([[0], np.cumsum(neg)])
  thresholds = np.concatenate([[-np.inf], u])
  return fp / fp[-1], tp / tp[-1], thresholds


def roc_auc(distances: Any, same: Any) -> float:
  """Area under the ROC curve, computed exactly from integer counts.

  Equals the Mann-Whitney probability that a random positive pair has a
  smaller distance than a random negative pair, ties counting 1/2:
  ``(#{d_pos < d_neg} + #{d_pos == d_neg} / 2) / (P * N)``.

  Args:
    distances: [M] float.
    same: [M] bool with both classes present.

  Returns:
    AUC as a Python float in [0, 1].
  """
  d, s = check_scores(distances, same)
  _, _, pos, neg = _grouped_counts(d, s)
  tp = np.cumsum(pos)
  tp_before = tp - pos
  # Trapezoids in integer arithmetic: each negative at a value beats every
  # earlier positive and ties with the positives at the same value.
  twice_area = int(np.sum(neg * (tp_before + tp)))
  return twice_area / (2.0 * int(tp[-1]) * int(neg.sum()))


def tar_at_far(distances: Any, same: Any, far: float) -> tuple[float, float]:
  """Largest TAR whose FAR is at most `far`.

  The operating point is the largest threshold (a distance value, accept when
  ``distance <= threshold``) that accepts at most ``floor(far * N)`` of the N
  negative pairs. If that admits no positive pair the threshold is -inf and
  TAR 0.

  When ``far * N < 1`` the requested FAR is finer than one negative pair can
  resolve (only FAR = 0 would be measurable, which says nothing about `far`);
  then ``(nan, nan)`` is returned rather than a misleading number. Use more
  negative pairs (e.g. >= 1000 for far=1e-3) to get a value.

  Args:
    distances: [M] float.
    same: [M] bool with both classes present.
    far: target false accept rate in (0, 1].

  Returns:
    (tar, threshold) as Python floats.
  """
  d, s = check_scores(distances, same)
  if not isinstance(far, (int, float, np.integer, np.floating)) or not 0.0 < float(far) <= 1.0:
    raise ValueError(f"far: expected a number in (0, 1], got {far!r}")
  u, _, pos, neg = _grouped_counts(d, s)
  num_neg = int(neg.sum())
  # The relative slack absorbs float noise such as 0.001 * 3000 = 2.9999999.
  max_fp = math.floor(float(far) * num_neg * (1.0 + 1e-12))
  if max_fp < 1:
    return float("nan"), float("nan")
  fp = np.concatenate([[0], np.cumsum(neg)])
  tp = np.concatenate([[0], np.cumsum(pos)])
  k = int(np.searchsorted(fp, max_fp, side="right")) - 1
  threshold = -np.inf if k == 0 else float(u[k - 1])
  return float(tp[k] / tp[-1]), threshold


def _best_from_counts(u: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
  """Best accuracy threshold given unique distances [K] and per-value class counts [K]."""
  num_neg = int(neg.sum())
  total = int(pos.sum()) + num_neg
  # Threshold between u[k] and u[k+1] accepts exactly the pairs with d <= u[k].
  correct = np.concatenate([[num_neg], np.cumsum(pos) + (num_neg - np.cumsum(neg))])
  if u.shape[0] > 1:
    lo, hi = u[:-1], u[1:]
    mid = lo + (hi - lo) / 2.0
    # For adjacent float64 values the midpoint can round up onto hi, which
    # would accept hi too; fall back to lo, which accepts the same set.
    mid = np.where(mid < hi, mid, lo)
    margin = (u[-1] - u[0]) / 2.0
  else:
    mid = np.empty(0)
    margin = 1.0
  candidates = np.concatenate([[u[0] - margin], mid, [u[-1] + margin]])
  best = int(np.argmax(correct))
  return float(candidates[best]), float(correct[best] / total)


def best_threshold(distances: Any, same: Any) -> tuple[float, float]:
  """Threshold maximizing verification accuracy.

  Candidates are the midpoints between consecutive sorted unique distances,
  plus one below the minimum (reject all) and one above the maximum (accept
  all), each half the distance range away (1.0 if all distances are equal).
  Accuracy of every candidate comes from cumulative class counts in one pass.
  Among equally accurate candidates the smallest threshold wins.

  Args:
    distances: [M] float.
    same: [M] bool with both classes present.

  Returns:
    (threshold, accuracy): accept when ``distance <= threshold``; accuracy is
    the fraction of the M pairs classified correctly.
  """
  d, s = check_scores(distances, same)
  u, _, pos, neg = _grouped_counts(d, s)
  return _best_from_counts(u, pos, neg)


def kfold_verification(distances: Any, same: Any, num_folds: int = 10, seed: int = 0, *,
                       folds: Any = None) -> dict[str, Any]:
  """LFW protocol: per fold, pick the threshold on the other folds, test on it.

  For each fold f, `best_threshold` is computed on the pairs of all other folds
  and the fraction of fold-f pairs classified correctly with it is recorded.

  Args:
    distances: [M] float.
    same: [M] bool.
    num_folds: number of random folds (see `stratified_folds`, seeded by
      `seed`); ignored when `folds` is given.
    seed: non-negative int for the random folds.
    folds: optional [M] int fold id per pair (e.g. ``np.repeat(np.arange(10),
      600)`` for LFW's pairs.txt order); the folds are its distinct values
      (>= 2 of them).

  Returns:
    dict with ``accuracy`` (mean of fold accuracies), ``accuracy_std``
    (population std, ddof=0, as LFW results are usually reported),
    ``threshold`` (mean of the chosen thresholds), ``fold_accuracies`` [F]
    float64 and ``fold_thresholds`` [F] float64.

  Raises:
    ValueError: bad inputs, or a fold whose complement lacks one of the classes.
  """
  d, s = check_scores(distances, same)
  if folds is None:
    fold_ids = stratified_folds(s, num_folds, seed)
  else:
    fold_ids = np.asarray(folds)
    if fold_ids.ndim != 1 or not np.issubdtype(fold_ids.dtype, np.integer):
      raise ValueError(f"folds: expected a 1-D int array, got shape {fold_ids.shape} "
                       f"dtype {fold_ids.dtype}")
    if fold_ids.shape != d.shape:
      raise ValueError(f"folds: length {fold_ids.shape[0]} does not match distances length {d.shape[0]}")
  fold_values, fold_ids = np.unique(fold_ids, return_inverse=True)
  if fold_values.shape[0] < 2:
    raise ValueError(f"folds: need at least 2 distinct folds, got {fold_values.tolist()}")
  # One sort for all folds: per-fold class counts per unique value via bincount.
  u, inv, _, _ = _grouped_counts(d, s)
  accs, thrs = [], []
  for f in range(fold_values.shape[0]):
    test = fold_ids == f
    train = ~test
    pos = np.bincount(inv[train & s], minlength=u.shape[0])
    neg = np.bincount(inv[train & ~s], minlength=u.shape[0])
    if pos.sum() == 0 or neg.sum() == 0:
      raise ValueError(f"folds: the pairs outside fold {fold_values[f]} lack "
                       f"{'positives' if pos.sum() == 0 else 'negatives'}; cannot choose a threshold")
    # Only values present in the training folds are candidates, exactly as if
    # best_threshold were called on the training pairs alone.
    present = (pos + neg) > 0
    thr, _ = _best_from_counts(u[present], pos[present], neg[present])
    accs.append(float(np.mean((d[test] <= thr) == s[test])))
    thrs.append(thr)
  fold_acc = np.asarray(accs)
  fold_thr = np.asarray(thrs)
  return {
      "accuracy": float(fold_acc.mean()),
      "accuracy_std": float(fold_acc.std()),
      "threshold": float(fold_thr.mean()),
      "fold_accuracies": fold_acc,
      "fold_thresholds": fold_thr,
  }


# --------------------------------------------------------------------------
# Identification
# --------------------------------------------------------------------------


def identification(gallery: Any, gallery_labels: Any, queries: Any, query_labels: Any,
                   threshold: float, k: int = 5) -> dict[str, float]:
  """Closed- and open-set identification by nearest gallery identity.

  Distances are squared Euclidean. A gallery identity's distance to a query is
  the minimum over that identity's gallery images, so identities (not images)
  are ranked. A query is "known" when its label occurs in `gallery_labels`.
  Equal distances are ordered arbitrarily (a measure-zero event for real
  embeddings).

  Definitions (each a fraction; nan when its denominator is 0):
    rank1:  known queries whose nearest identity is their own (closed set).
    top_k:  known queries whose identity is among the k nearest identities
            (k is capped at the number of gallery identities).
    dir:    detection-and-identification rate: known queries with rank-1
            correct AND nearest distance <= threshold.
    frr:    false reject rate: known queries with nearest distance > threshold
            (rejected as unknown). 1 - dir - frr is the rate of known queries
            accepted as the wrong identity.
    far:    false accept rate: unknown queries with nearest distance <=
            threshold (wrongly accepted as someone enrolled).

  Args:
    gallery: [G, D] float embeddings.
    gallery_labels: [G] int identities (several images per identity allowed).
    queries: [Q, D] float embeddings.
    query_labels: [Q] int identities.
    threshold: accept when the nearest distance is <= threshold.
    k: int >= 1 for top_k.

  Returns:
    dict with float ``rank1, top_k, dir, frr, far`` and int ``k, num_known,
    num_unknown``.
  """
  g = as_embeddings(gallery, "gallery")
  q = as_embeddings(queries, "queries")
  gl = _as_labels(gallery_labels, "gallery_labels")
  ql = _as_labels(query_labels, "query_labels")
  if gl.shape[0] != g.shape[0]:
    raise ValueError(f"gallery_labels: length {gl.shape[0]} does not match gallery rows {g.shape[0]}")
  if ql.shape[0] != q.shape[0]:
    raise ValueError(f"query_labels: length {ql.shape[0]} does not match queries rows {q.shape[0]}")
  if q.shape[1] != g.shape[1]:
    raise ValueError(f"queries: dimension {q.shape[1]} does not match gallery dimension {g.shape[1]}")
  if not isinstance(threshold, (int, float, np.integer, np.floating)) or not math.isfinite(threshold):
    raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k: expected an int >= 1, got {k!r}")

  order = np.argsort(gl, kind="stable")
  g = g[order]
  g_sq = np.einsum("gd,gd->g", g, g)

  def distance_rows(lo: int, hi: int) -> np.ndarray:
    qc = q[lo:hi]
    d2 = np.einsum("qd,qd->q", qc, qc)[:, None] + g_sq[None, :] - 2.0 * (qc @ g.T)
    return np.maximum(d2, 0.0)  # the norm expansion can dip below 0 by rounding

  return _identify(distance_rows, q.shape[0], gl[order], ql, threshold, k)


def _identify(distance_rows: Callable[[int, int], np.ndarray], num_queries: int,
              gallery_labels: np.ndarray, ql: np.ndarray, threshold: float, k: int
              ) -> dict[str, float]:
  """`identification` from distances: ``distance_rows(lo, hi)`` gives queries lo..hi-1
  against every gallery row ``[hi - lo, G]``; ``gallery_labels`` [G] must be sorted."""
  gl = gallery_labels
  ids, starts = np.unique(gl, return_index=True)
  num_ids = ids.shape[0]
  kk = min(int(k), num_ids)
  true_idx = np.minimum(np.searchsorted(ids, ql), num_ids - 1)
  known = ids[true_idx] == ql

  nearest = np.empty(num_queries, dtype=np.int64)
  nearest_d = np.empty(num_queries, dtype=np.float64)
  in_top = np.empty(num_queries, dtype=bool)
  rows = max(1, _CHUNK_ELEMENTS // gl.shape[0])
  for lo in range(0, num_queries, rows):
    hi = min(lo + rows, num_queries)
    d2 = np.asarray(distance_rows(lo, hi), dtype=np.float64)
    id_d = np.minimum.reduceat(d2, starts, axis=1)              # [q, C]
    if kk < num_ids:
      top = np.argpartition(id_d, kk - 1, axis=1)[:, :kk]        # [q, kk] unordered
    else:
      top = np.broadcast_to(np.arange(num_ids), id_d.shape)
    top_d = np.take_along_axis(id_d, top, axis=1)
    first = np.argmin(top_d, axis=1)
    r = np.arange(hi - lo)
    nearest[lo:hi] = top[r, first]
    nearest_d[lo:hi] = top_d[r, first]
    in_top[lo:hi] = (top == true_idx[lo:hi, None]).any(axis=1)

  accepted = nearest_d <= threshold
  correct = known & (nearest == true_idx)
  num_known = int(known.sum())
  num_unknown = int(num_queries - num_known)

  def frac(mask: np.ndarray, denom: int) -> float:
    return float(mask.sum() / denom) if denom else float("nan")

  return {
      "rank1": frac(correct, num_known),
      "top_k": frac(known & in_top, num_known),
      "dir": frac(correct & accepted, num_known),
      "frr": frac(known & ~accepted, num_known),
      "far": frac(~known & accepted, num_unknown),
      "k": kk,
      "num_known": num_known,
      "num_unknown": num_unknown,
  }


# --------------------------------------------------------------------------
# Full held-out evaluation
# --------------------------------------------------------------------------


def evaluate_embeddings(embeddings: Any, labels: Any, *, seed: int = 0, num_folds: int = 10,
                        gallery_fraction: float = 0.5, max_pairs: int | None = None,
                        pair_distance: Callable[[np.ndarray, np.ndarray], Any] | None = None
                        ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Held-out evaluation of face embeddings (verification + identification).

  Verification, on ``balanced_pairs(labels, seed, max_pairs)`` with squared
  Euclidean distances:
    eval/accuracy, eval/accuracy_std: `kfold_verification` (stratified random
      folds from `seed`).
    eval/auc: `roc_auc`.
    eval/tar@far=1e-2, eval/tar@far=1e-3: `tar_at_far` (nan if there are too
      few negative pairs to resolve that FAR).
    eval/threshold: `best_threshold` on all the pairs.
  Identification (gallery = one image per identity: the first image of that
  identity in a seeded random permutation of the images; queries = every
  other image):
    eval/rank1, eval/top5: closed set with ALL identities enrolled (nan if
      no identity has a second image).
    eval/open_set/*: a seeded random ``round(gallery_fraction * C)`` (>= 1)
      identities are enrolled, the rest are unknown; queries are all images
      not in that gallery. rank1 (known queries), and dir/frr/far at
      eval/threshold as defined in `identification`. All nan when fewer than
      2 identities are unknown.
  Counts: eval/num_pairs, eval/num_identities.

  Args:
    embeddings: [N, D] float32 (or any real dtype).
    labels: [N] int identities.
    seed: non-negative int; all randomness derives from it.
    num_folds: folds for eval/accuracy.
    gallery_fraction: fraction of identities enrolled for open set, in (0, 1].
    max_pairs: optional cap on the number of verification pairs.
    pair_distance: optional ``(i [M] int, j [M] int) -> [M] float`` score of
      row pairs, lower = more alike (e.g. S-normed or fused distances,
      `jaxface.score_norm`); it replaces the squared Euclidean
      distance everywhere above, identification included (an identity's
      score is then the minimum over its gallery rows). Default: squared
      Euclidean distance of ``embeddings`` rows.

  Returns:
    (metrics, roc): metrics maps the names above to Python floats; roc is
    dict(fpr, tpr, thresholds) of float64 arrays from `roc_curve`.
  """
  emb = as_embeddings(embeddings, "embeddings")
  lab = _as_labels(labels)
  if lab.shape[0] != emb.shape[0]:
    raise ValueError(f"labels: length {lab.shape[0]} does not match embeddings rows {emb.shape[0]}")
  seed = _check_seed(seed)
  if not isinstance(gallery_fraction, (int, float, np.floating)) or not 0.0 < gallery_fraction <= 1.0:
    raise ValueError(f"gallery_fraction: expected a number in (0, 1], got {gallery_fraction!r}")

  def scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if pair_distance is None:
      return pair_distances(emb, a, b)
    d = np.asarray(pair_distance(a, b), dtype=np.float64)
    if d.shape != a.shape:
      raise ValueError(f"pair_distance: returned shape {d.shape} for {a.shape[0]} pairs")
    if not np.all(np.isfinite(d)):
      raise ValueError("pair_distance: returned NaN or infinite scores")
    return d

  def identify(gallery_idx: np.ndarray, gallery_labels: np.ndarray, query_idx: np.ndarray):
    if pair_distance is None:
      return identification(emb[gallery_idx], gallery_labels, emb[query_idx], lab[query_idx],
                            threshold=threshold, k=5)
    order = np.argsort(gallery_labels, kind="stable")
    g_idx = gallery_idx[order]

    def distance_rows(lo: int, hi: int) -> np.ndarray:
      q_idx = query_idx[lo:hi]
      return scores(np.repeat(q_idx, g_idx.shape[0]),
                    np.tile(g_idx, q_idx.shape[0])).reshape(q_idx.shape[0], g_idx.shape[0])

    return _identify(distance_rows, query_idx.shape[0], gallery_labels[order], lab[query_idx],
                     threshold, 5)

  i, j, same = balanced_pairs(lab, seed, max_pairs)
  dist = scores(i, j)
  kf = kfold_verification(dist, same, num_folds, seed)
  fpr, tpr, thresholds = roc_curve(dist, same)
  threshold, _ = best_threshold(dist, same)
  tar2, _ = tar_at_far(dist, same, 1e-2)
  tar3, _ = tar_at_far(dist, same, 1e-3)

  # Independent streams for the gallery image and the enrolled identities, so
  # changing one choice does not reshuffle the other.
  perm = np.random.default_rng((seed, 1)).permutation(lab.shape[0])
  ids, first = np.unique(lab[perm], return_index=True)
  gallery_idx = perm[first]                       # [C], aligned with ids
  num_ids = ids.shape[0]
  is_gallery = np.zeros(lab.shape[0], dtype=bool)
  is_gallery[gallery_idx] = True
  nan = float("nan")
  closed = {"rank1": nan, "top_k": nan}
  if (~is_gallery).any():
    closed = identify(gallery_idx, ids, np.flatnonzero(~is_gallery))

  num_enrolled = min(num_ids, max(1, int(round(gallery_fraction * num_ids))))
  open_set = {"rank1": nan, "dir": nan, "frr": nan, "far": nan}
  if num_ids - num_enrolled >= 2:
    enrolled = np.zeros(num_ids, dtype=bool)
    enrolled[np.random.default_rng((seed, 2)).permutation(num_ids)[:num_enrolled]] = True
    in_gallery = np.zeros(lab.shape[0], dtype=bool)
    in_gallery[gallery_idx[enrolled]] = True
    open_set = identify(gallery_idx[enrolled], ids[enrolled], np.flatnonzero(~in_gallery))

  metrics = {
      "eval/accuracy": kf["accuracy"],
      "eval/accuracy_std": kf["accuracy_std"],
      "eval/auc": roc_auc(dist, same),
      "eval/tar@far=1e-2": tar2,
      "eval/tar@far=1e-3": tar3,
      "eval/threshold": threshold,
      "eval/rank1": float(closed["rank1"]),
      "eval/top5": float(closed["top_k"]),
      "eval/open_set/rank1": float(open_set["rank1"]),
      "eval/open_set/far": float(open_set["far"]),
      "eval/open_set/dir": float(open_set["dir"]),
      "eval/open_set/frr": float(open_set["frr"]),
      "eval/num_pairs": float(dist.shape[0]),
      "eval/num_identities": float(num_ids),
  }
  return metrics, {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}


# --------------------------------------------------------------------------
# ROC plot
# --------------------------------------------------------------------------

_SIZE = 480
# Plot area in pixels (left, top, right, bottom); fpr 0..1 maps to left..right,
# tpr 0..1 to bottom..top. Tests read this to locate the curve.
_PLOT_BOX = (70, 44, 460, 420)
_CURVE_RGB = (20, 60, 200)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
    return ImageFont.load_default()


def save_roc_png(fpr: Any, tpr: Any, path: str | os.PathLike, title: str = "ROC",
                 auc: float | None = None) -> None:
  """Draws an ROC curve (linear axes) as a 480x480 PNG with PIL.

  Args:
    fpr: [K] float in [0, 1], x axis (false accept rate).
    tpr: [K] float in [0, 1], y axis (true accept rate).
    path: output file; must end in .png and its folder must exist.
    title: plot title; ``(AUC = x.xxxx)`` is appended when `auc` is given.
    auc: optional area to show in the title.

  Raises:
    ValueError: bad arrays, a path that is not .png, a missing folder, or a
      file that cannot be written.
  """
  x = np.asarray(fpr, dtype=np.float64)
  y = np.asarray(tpr, dtype=np.float64)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"fpr: expected a non-empty 1-D array, got shape {x.shape}")
  if y.shape != x.shape:
    raise ValueError(f"tpr: shape {y.shape} does not match fpr shape {x.shape}")
  for name, arr in (("fpr", x), ("tpr", y)):
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
      raise ValueError(f"{name}: values must be finite and within [0, 1]")
  if auc is not None and not (isinstance(auc, (int, float, np.floating)) and math.isfinite(auc)):
    raise ValueError(f"auc: expected None or a finite number, got {auc!r}")
  path_s = os.fspath(path)
  if not path_s.lower().endswith(".png"):
    raise ValueError(f"path: {path_s!r} must end in .png")
  folder = os.path.dirname(os.path.abspath(path_s))
  if not os.path.isdir(folder):
    raise ValueError(f"path: folder {folder!r} of {path_s!r} does not exist")

  left, top, right, bottom = _PLOT_BOX
  img = Image.new("RGB", (_SIZE, _SIZE), "white")
  draw = ImageDraw.Draw(img)
  small, big = _font(12), _font(15)

  for t in np.linspace(0.0, 1.0, 6):
    px = left + t * (right - left)
    py = bottom - t * (bottom - top)
    draw.line([(px, top), (px, bottom)], fill=(225, 225, 225))
    draw.line([(left, py), (right, py)], fill=(225, 225, 225))
    draw.line([(px, bottom), (px, bottom + 5)], fill="black")
    draw.line([(left - 5, py), (left, py)], fill="black")
    label = f"{t:.1f}"
    draw.text((px, bottom + 8), label, fill="black", font=small, anchor="mt")
    draw.text((left - 8, py), label, fill="black", font=small, anchor="rm")
  # Dashed chance diagonal.
  for a in np.arange(0.0, 1.0, 0.04):
    b = min(a + 0.02, 1.0)
    draw.line([(left + a * (right - left), bottom - a * (bottom - top)),
               (left + b * (right - left), bottom - b * (bottom - top))], fill=(150, 150, 150))
  draw.rectangle([left, top, right, bottom], outline="black")

  px = np.rint(left + x * (right - left)).astype(np.int64)
  py = np.rint(bottom - y * (bottom - top)).astype(np.int64)
  # Consecutive points on the same pixel add nothing; dropping them keeps the
  # polyline short for million-point curves without changing the picture.
  keep = np.ones(px.shape[0], dtype=bool)
  keep[1:] = (np.diff(px) != 0) | (np.diff(py) != 0)
  keep[-1] = True
  points = list(zip(px[keep].tolist(), py[keep].tolist()))
  if len(points) == 1:
    draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2],
                 fill=_CURVE_RGB)
  else:
    draw.line(points, fill=_CURVE_RGB, width=2)

  full_title = title if auc is None else f"{title} (AUC = {float(auc):.4f})"
  draw.text((_SIZE / 2, top / 2), full_title, fill="black", font=big, anchor="mm")
  draw.text(((left + right) / 2, _SIZE - 14), "False accept rate", fill="black", font=small,
            anchor="mm")
  ylabel = Image.new("RGB", (200, 18), "white")
  ImageDraw.Draw(ylabel).text((100, 9), "True accept rate", fill="black", font=small, anchor="mm")
  ylabel = ylabel.rotate(90, expand=True)
  img.paste(ylabel, (6, int((top + bottom) / 2 - ylabel.height / 2)))

  try:
    img.save(path_s, format="PNG")
  except OSError as e:
    raise ValueError(f"path: cannot write {path_s!r}: {e}") from e
