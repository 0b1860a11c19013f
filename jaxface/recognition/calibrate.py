"""Choosing the verification threshold from labeled pairs (host NumPy, float64).

A pair is accepted ("same person") when ``distance <= threshold``; distances
are whatever the caller measures (the recognition code uses Euclidean
distances, dlib's default threshold being 0.6). Thresholds returned here lie
*between* observed distances (midpoints), like ``jaxface.metrics.best_threshold``:
on the calibration pairs they accept exactly the same set as the tight
value, and new pairs near the boundary are not decided by a float tie.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxface import metrics

__all__ = ["choose_cohort", "threshold_for_far", "best_accuracy_threshold", "rates_at", "per_identity_thresholds",
           "min_supported_far", "negatives_needed"]


def _check_far(target_far: Any) -> float:
  if isinstance(target_far, bool) or not isinstance(target_far, (int, float, np.integer, np.floating)) \
      or not 0.0 <= float(target_far) <= 1.0:
    raise ValueError(f"target_far: expected a number in [0, 1], got {target_far!r}")
  return float(target_far)


def _between(lo: float, hi: float) -> float:
  """A value in [lo, hi): the midpoint, or lo when the midpoint rounds onto hi."""
  mid = lo + (hi - lo) / 2.0
  return float(mid if mid < hi else lo)


def threshold_for_far(distances: Any, same: Any, target_far: float) -> float:
  """Loosest threshold whose false-accept rate on these pairs is <= ``target_far``.

  With N negative pairs at most ``floor(target_far * N)`` of them may be
  accepted (so ``target_far = 0`` means none). Tied distances are accepted
  or rejected together, so a tie that would exceed the budget is rejected
  as a whole. The result is the midpoint between the largest accepted
  distance and the next larger distance (any class); below everything when
  nothing may be accepted, half the distance range (or 1.0) beyond the
  largest distance when everything may.

  Args:
    distances: [M] float, both classes present in ``same``.
    same: [M] bool (or 0/1), True for same-identity pairs.
    target_far: in [0, 1].

  Returns:
    The threshold, a Python float.
  """
  d, s = metrics.check_scores(distances, same)
  far = _check_far(target_far)
  u, inv = np.unique(d, return_inverse=True)
  neg = np.bincount(inv[~s], minlength=u.shape[0])
  num_neg = int(neg.sum())
  # The relative slack absorbs float noise such as 0.001 * 3000 = 2.9999999.
  budget = math.floor(far * num_neg * (1.0 + 1e-12))
  fp = np.cumsum(neg)                           # false accepts when accepting u[:k+1]
  k = int(np.searchsorted(fp, budget, side="right"))  # number of unique values acceptable
  margin = (u[-1] - u[0]) / 2.0 if u.shape[0] > 1 else 1.0
  if k == 0:
    return float(u[0] - margin)
  if k == u.shape[0]:
    return float(u[-1] + margin)
  return _between(float(u[k - 1]), float(u[k]))


def min_supported_far(num_negatives: int) -> float:
  """The smallest nonzero FAR that ``num_negatives`` impostor pairs can measure: 1/N.

  A target below it can only be met by accepting no impostor pair at all, so
  a threshold labelled with that target would claim more than the pairs show.
  """
  if isinstance(num_negatives, bool) or not isinstance(num_negatives, (int, np.integer)) \
      or num_negatives < 1:
    raise ValueError(f"num_negatives: expected an int >= 1, got {num_negatives!r}")
  return 1.0 / int(num_negatives)


def negatives_needed(target_far: float) -> int:
  """The fewest impostor pairs whose :func:`min_supported_far` is <= ``target_far`` (in (0, 1])."""
  far = _check_far(target_far)
  if far == 0.0:
    raise ValueError("target_far: 0 is never measured by a finite number of pairs; expected > 0")
  # The relative slack keeps 1 / 1e-3 = 1000 (not 1001) despite float noise.
  return max(1, math.ceil(1.0 / far * (1.0 - 1e-12)))


def best_accuracy_threshold(distances: Any, same: Any) -> float:
  """Threshold maximizing the accuracy on these pairs (``metrics.best_threshold``).

  Returns:
    The threshold, a Python float (see :func:`rates_at` for the accuracy).
  """
  return metrics.best_threshold(distances, same)[0]


def rates_at(distances: Any, same: Any, threshold: float) -> dict[str, float]:
  """Verification rates of ``threshold`` on labeled pairs.

  Returns:
    {"far", "frr", "tar", "accuracy", "num_pos", "num_neg"}; a rate whose
    class is absent is NaN.
  """
  d, s = metrics.check_scores(distances, same, need_both=False)
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
      or math.isnan(float(threshold)):
    raise ValueError(f"threshold: expected a number, got {threshold!r}")
  acc = d <= float(threshold)
  num_pos, num_neg = int(s.sum()), int((~s).sum())
  tar = float((acc & s).sum() / num_pos) if num_pos else float("nan")
  far = float((acc & ~s).sum() / num_neg) if num_neg else float("nan")
  return {"far": far, "frr": 1.0 - tar, "tar": tar, "accuracy": float((acc == s).mean()),
          "num_pos": num_pos, "num_neg": num_neg}


def per_identity_thresholds(embeddings: Any, identity_ids: Any, *, global_threshold: float,
                            target_far: float = 0.0, negatives: Any = None, min_images: int = 2,
                            max_adjust: float = 0.1) -> dict[int, float]:
  """Own thresholds for identities with at least ``min_images`` enrolled embeddings.

  For identity i with genuine distances G (its embeddings pairwise) and
  impostor distances I (its embeddings against every other identity's and
  against ``negatives``):

  * ``bound`` = ``threshold_for_far`` on (G, I) with ``target_far``: the
    loosest threshold that keeps i's false accepts within budget;
  * ``need`` = the threshold that accepts all of G: max(G) (i's enrolled
    images must match each other);
  * t_i = min(bound, max(global_threshold, need)), clipped to
    [max(0, global - max_adjust), global + max_adjust].

  So an identity is loosened beyond the global threshold only as far as its
  own images require and its impostors allow, and tightened when an
  impostor comes closer than the global threshold.

  Args:
    embeddings: [M, D] float gallery embeddings.
    identity_ids: [M] int identity of each row.
    global_threshold: the calibrated global Euclidean threshold.
    target_far: per-identity false-accept budget in [0, 1] (0: no impostor
      distance of the calibration set may be accepted).
    negatives: optional [K, D] embeddings of people not in the gallery,
      extra impostors.
    min_images: identities with fewer embeddings get no own threshold.
    max_adjust: the largest change from the global threshold (>= 0).

  Returns:
    {identity id: threshold} for the qualifying identities (empty when there
    are none, or when there are no impostors at all).
  """
  emb = metrics.as_embeddings(embeddings, "embeddings")
  ids = np.asarray(identity_ids)
  if ids.shape != (emb.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"identity_ids: expected [{emb.shape[0]}] ints, got {ids.dtype}{list(ids.shape)}")
  if not np.isfinite(global_threshold) or global_threshold < 0:
    raise ValueError(f"global_threshold: expected a finite number >= 0, got {global_threshold!r}")
  far = _check_far(target_far)
  if isinstance(min_images, bool) or not isinstance(min_images, (int, np.integer)) or min_images < 2:
    raise ValueError(f"min_images: expected an int >= 2, got {min_images!r}")
  if not np.isfinite(max_adjust) or max_adjust < 0:
    raise ValueError(f"max_adjust: expected a finite number >= 0, got {max_adjust!r}")
  others = emb
  other_ids = ids.astype(np.int64)
  if negatives is not None:
    neg = metrics.as_embeddings(negatives, "negatives")
    if neg.shape[1] != emb.shape[1]:
      raise ValueError(f"negatives: {neg.shape[1]} dimensions, embeddings have {emb.shape[1]}")
    others = np.concatenate([emb, neg])
    # Negatives get an id no identity has.
    other_ids = np.concatenate([other_ids, np.full(neg.shape[0], other_ids.min() - 1, np.int64)])
  others_sq = (others * others).sum(1)
  uniq, counts = np.unique(ids, return_counts=True)
  out: dict[int, float] = {}
  lo, hi = max(0.0, global_threshold - max_adjust), global_threshold + max_adjust
  # One identity at a time keeps memory at [n_i, M] rather than [M, M]; this
  # is an offline step over the (few) identities with several images.
  for ident in uniq[counts >= min_images]:
    mine = ids == ident
    rows = emb[mine]
    # Norm expansion in float64 (error ~1e-15, far below any threshold step).
    d2 = (rows * rows).sum(1)[:, None] - 2.0 * rows @ others.T + others_sq[None, :]
    dist = np.sqrt(np.maximum(d2, 0.0))                                   # [n_i, M + K]
    n_i = rows.shape[0]
    # Genuine pairs: i < j within the identity (the diagonal is a self-match).
    self_cols = np.flatnonzero(mine)
    gi, gj = np.triu_indices(n_i, k=1)
    genuine = dist[gi, self_cols[gj]]
    impostor = dist[:, other_ids != ident].ravel()
    if impostor.size == 0:
      continue
    bound = threshold_for_far(np.concatenate([genuine, impostor]),
                              np.concatenate([np.ones(genuine.size, bool), np.zeros(impostor.size, bool)]),
                              far)
    need = float(genuine.max())
    out[int(ident)] = float(np.clip(min(bound, max(global_threshold, need)), lo, hi))
  return out


def choose_cohort(labels: Any, *, fraction: float = 1 / 3, exclude: Any = None, seed: int = 0) -> np.ndarray:
  """Whole identities set aside as an S-norm background cohort: a [N] bool row mask.

  Identities with one row go first (they can never be enrolled and probed in
  a one-shot simulation, so the cohort costs it the least), then the others,
  each group in a seeded random order, until the cohort holds at least
  ``fraction`` of the rows. Rows flagged in ``exclude`` (e.g. people enrolled
  in the gallery the cohort is for) and their identities are never chosen.

  Args:
    labels: [N] int identity of each row.
    fraction: share of the rows wanted in the cohort, in (0, 1).
    exclude: optional [N] bool, rows whose identity must stay out.
    seed: seed of the random order.
  """
  lab = np.asarray(labels)
  if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f"labels: expected [N] ints, got {lab.dtype}{list(lab.shape)}")
  if not 0 < fraction < 1:
    raise ValueError(f"fraction: expected in (0, 1), got {fraction!r}")
  banned = np.zeros(lab.shape, bool) if exclude is None else np.asarray(exclude, bool)
  if banned.shape != lab.shape:
    raise ValueError(f"exclude: expected [{lab.size}] bools, got shape {list(banned.shape)}")
  ids, counts = np.unique(lab, return_counts=True)
  allowed = ~np.isin(ids, lab[banned])
  rng = np.random.default_rng(seed)
  # Singletons first, random order within each group (lexsort: last key is primary).
  order = np.lexsort((rng.random(ids.size), counts > 1))
  order = order[allowed[order]]
  taken = np.cumsum(counts[order])
  need = math.ceil(fraction * lab.size)
  n_ids = int(np.searchsorted(taken, need)) + 1  # the fewest identities reaching ``need`` rows
  return np.isin(lab, ids[order[:n_ids]])
