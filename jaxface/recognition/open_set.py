"""One-shot open-set 1:K identification: FPIR thresholds and DIR (host NumPy, float64).

A *search* compares one probe with a gallery of K enrolled identities and keeps
its top-1 (nearest) row; it is accepted when that score is <= the threshold
(lower = more alike: Euclidean distances, or S-norm scores). A mated search (the
probe's identity is enrolled) counts towards the detection and identification
rate, DIR, when its top-1 is the right identity *and* accepted; the false positive
identification rate, FPIR, is the share of non-mated searches accepted (as anyone).
:func:`fpir_threshold` calibrates on simulated galleries of the deployed size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxface.recognition import calibrate

__all__ = ["threshold_for_fpir", "min_supported_fpir", "nonmated_needed", "dir_at_fpir", "rates_at",
           "simulate_one_shot", "fpir_threshold", "SCORES"]

SCORES = ("distance", "snorm")
# Rows per block when computing [rows, M] squared distances (bounds host memory).
_BLOCK_ELEMENTS = 1 << 22


def _check_fpir(target_fpir: Any) -> float:
  if isinstance(target_fpir, bool) or not isinstance(target_fpir, (int, float, np.integer, np.floating)) \
      or not 0.0 <= float(target_fpir) <= 1.0:
    raise ValueError(f"target_fpir: expected a number in [0, 1], got {target_fpir!r}")
  return float(target_fpir)


def _check_scores_1d(x: Any, name: str, *, allow_empty: bool = False) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
  if a.size == 0 and not allow_empty:
    raise ValueError(f"{name}: empty array")
  if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
    raise ValueError(f"{name}: expected real numbers, got dtype {a.dtype}")
  a = a.astype(np.float64)
  if not np.isfinite(a).all():
    raise ValueError(f"{name}: contains {int((~np.isfinite(a)).sum())} NaN or infinite value(s)")
  return a


def min_supported_fpir(num_nonmated: int) -> float:
  """The smallest nonzero FPIR that ``num_nonmated`` non-mated searches can measure: 1/Q."""
  if isinstance(num_nonmated, bool) or not isinstance(num_nonmated, (int, np.integer)) \
      or num_nonmated < 1:
    raise ValueError(f"num_nonmated: expected an int >= 1, got {num_nonmated!r}")
  return 1.0 / int(num_nonmated)


def nonmated_needed(target_fpir: float) -> int:
  """The fewest non-mated searches whose :func:`min_supported_fpir` is <= ``target_fpir`` (> 0)."""
  fpir = _check_fpir(target_fpir)
  if fpir == 0.0:
    raise ValueError("target_fpir: 0 is never measured by a finite number of searches; expected > 0")
  return max(1, math.ceil(1.0 / fpir * (1.0 - 1e-12)))


def threshold_for_fpir(nonmated_scores: Any, target_fpir: float) -> float:
  """Loosest threshold accepting at most ``floor(target_fpir * Q)`` of Q non-mated searches.

  Accept when ``score <= threshold``. Tied scores are accepted or rejected
  together; the result is the midpoint between the largest accepted score
  and the next larger one (below every score when none may be accepted), by
  :func:`jaxface.recognition.calibrate.threshold_for_far`.

  Args:
    nonmated_scores: [Q] top-1 scores of non-mated searches.
    target_fpir: 0 (accept none), or in [1/Q, 1].

  Raises:
    ValueError: bad scores, or ``0 < target_fpir < 1/Q``: Q searches cannot
      measure that rate (the message gives ``min_supported_fpir``).
  """
  s = _check_scores_1d(nonmated_scores, "nonmated_scores")
  fpir = _check_fpir(target_fpir)
  floor_fpir = min_supported_fpir(int(s.size))
  if 0.0 < fpir < floor_fpir * (1.0 - 1e-12):
    raise ValueError(f"target_fpir={fpir:g} is below min_supported_fpir={floor_fpir:g} of "
                     f"{s.size} non-mated searches; need >= {nonmated_needed(fpir)} of them "
                     f"(or use target_fpir=0 to accept none)")
  # calibrate.threshold_for_far needs both classes: one genuine score equal to the
  # smallest non-mated score adds no new distinct value, so the thresholds coincide.
  return calibrate.threshold_for_far(np.concatenate([s, [s.min()]]),
                                     np.concatenate([np.zeros(s.size, bool), [True]]), fpir)


def dir_at_fpir(mated_top1_ids: Any, mated_truth: Any, mated_top1_scores: Any,
                nonmated_top1_scores: Any, fpir: float) -> dict[str, Any]:
  """DIR of the mated searches at the threshold giving ``fpir`` on the non-mated ones.

  Args:
    mated_top1_ids: [P] int identity of each mated search's top-1 gallery row.
    mated_truth: [P] int true identity of each mated probe.
    mated_top1_scores: [P] top-1 scores of the mated searches.
    nonmated_top1_scores: [Q] top-1 scores of the non-mated searches.
    fpir: target FPIR (see :func:`threshold_for_fpir`).

  Returns:
    dict: ``threshold``; ``dir`` (top-1 right and accepted); ``rank1`` (top-1
    right, whatever the threshold); ``fpir_measured`` (non-mated accepted at
    the threshold, <= fpir); ``target_fpir``; ``num_mated``; ``num_nonmated``;
    ``min_supported_fpir`` (1/Q).
  """
  ids = np.asarray(mated_top1_ids)
  truth = np.asarray(mated_truth)
  ms = _check_scores_1d(mated_top1_scores, "mated_top1_scores")
  for name, a in (("mated_top1_ids", ids), ("mated_truth", truth)):
    if a.shape != ms.shape or not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"{name}: expected [{ms.size}] ints like mated_top1_scores, got {a.dtype}{list(a.shape)}")
  ns = _check_scores_1d(nonmated_top1_scores, "nonmated_top1_scores")
  thr = threshold_for_fpir(ns, fpir)
  right = ids == truth
  return {"threshold": thr, "dir": float(np.mean(right & (ms <= thr))), "rank1": float(np.mean(right)),
          "fpir_measured": float(np.mean(ns <= thr)), "target_fpir": float(fpir),
          "num_mated": int(ms.size), "num_nonmated": int(ns.size),
          "min_supported_fpir": min_supported_fpir(int(ns.size))}


def rates_at(mated_top1_ids: Any, mated_truth: Any, mated_top1_scores: Any,
             nonmated_top1_scores: Any, threshold: float) -> dict[str, float]:
  """DIR and FPIR of a fixed threshold (e.g. dlib's 0.6) on the same searches."""
  ids, truth = np.asarray(mated_top1_ids), np.asarray(mated_truth)
  ms = _check_scores_1d(mated_top1_scores, "mated_top1_scores")
  ns = _check_scores_1d(nonmated_top1_scores, "nonmated_top1_scores")
  if isinstance(threshold, bool) or not np.isfinite(float(threshold)):
    raise ValueError(f"threshold: expected a finite number, got {threshold!r}")
  return {"threshold": float(threshold), "dir": float(np.mean((ids == truth) & (ms <= threshold))),
          "fpir_measured": float(np.mean(ns <= threshold)), "num_mated": int(ms.size),
          "num_nonmated": int(ns.size)}


# --------------------------------------------------------------------------
# Simulated one-shot galleries
# --------------------------------------------------------------------------


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[n, m] float64 squared Euclidean distances (norm expansion in float64, error ~1e-15)."""
  d2 = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
  return np.maximum(d2, 0.0)


def _cohort_stats64(x: np.ndarray, cohort: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
  """Mean / std of each row's squared distances to the cohort (its top_k nearest when > 0)."""
  rows = max(1, _BLOCK_ELEMENTS // max(1, cohort.shape[0]))
  means, stds = [], []
  for lo in range(0, x.shape[0], rows):
    d2 = _sq_dists(x[lo:lo + rows], cohort)
    if top_k:
      d2 = np.partition(d2, top_k - 1, axis=1)[:, :top_k]
    means.append(d2.mean(1))
    stds.append(d2.std(1))
  return np.concatenate(means), np.concatenate(stds)


def _cohort_mask(cohort: Any, n: int) -> np.ndarray:
  if cohort is None:
    return np.zeros(n, bool)
  c = np.asarray(cohort)
  if c.dtype == np.bool_:
    if c.shape != (n,):
      raise ValueError(f"cohort: a boolean mask must have shape [{n}], got {list(c.shape)}")
    return c.copy()
  if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
    raise ValueError(f"cohort: expected a [N] bool mask or 1-D int row indexes, got {c.dtype}{list(c.shape)}")
  if c.size and (c.min() < 0 or c.max() >= n):
    raise ValueError(f"cohort: row indexes must lie in [0, {n}), got [{c.min()}, {c.max()}]")
  mask = np.zeros(n, bool)
  mask[c] = True
  return mask


def simulate_one_shot(embeddings: Any, labels: Any, gallery_size: int, *, rounds: int = 10, seed: int = 0,
                      score: str = "distance", cohort: Any = None, top_k: int = 0) -> dict[str, Any]:
  """Random one-shot galleries of K identities and the top-1 of every search against them.

  Each round draws ``gallery_size`` identities among those with >= 2 rows
  (outside the cohort), enrolls one random row of each, and searches:

  * mated probes: the other rows of the enrolled identities;
  * non-mated probes: every row of every identity not enrolled this round,
    cohort rows excluded.

  Args:
    embeddings: [N, D] float embeddings.
    labels: [N] int identity of each row.
    gallery_size: K >= 1 identities per gallery.
    rounds: number of random galleries (>= 1); results are pooled.
    seed: seed of the draws.
    score: ``"distance"`` (Euclidean) or ``"snorm"`` (symmetric S-norm of
      squared distances against the cohort, see
      :mod:`jaxface.score_norm`).
    cohort: None, a [N] bool mask or int row indexes: background faces never
      enrolled nor searched (required for ``"snorm"``, >= 2 rows). Whole
      identities only: an identity cannot be partly in the cohort.
    top_k: S-norm statistics over each row's ``top_k`` nearest cohort rows
      (0 = all).

  Returns:
    dict with pooled arrays ``mated_top1_ids``, ``mated_truth``,
    ``mated_top1_scores`` [P], ``nonmated_top1_ids``,
    ``nonmated_top1_scores`` [Q], ``mated_round`` [P] / ``nonmated_round``
    [Q] (the round of each search), ``mated_rows`` [P] / ``nonmated_rows``
    [Q] (the probe's row), ``galleries`` [rounds, K] (enrolled rows, by
    label), and counts ``gallery_size``,
    ``rounds``, ``eligible_identities``, ``cohort_rows``,
    ``mated_per_round`` / ``nonmated_per_round`` (lists), ``score``.

  Raises:
    ValueError: bad shapes, K larger than the identities with >= 2 rows, no
      non-mated probe left, a split cohort identity, or S-norm without a cohort.
  """
  emb = np.asarray(embeddings)
  if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
    raise ValueError(f"embeddings: expected a non-empty [N, D] array, got shape {emb.shape}")
  emb = emb.astype(np.float64)
  if not np.isfinite(emb).all():
    raise ValueError("embeddings: contains NaN or infinite values")
  lab = np.asarray(labels)
  if lab.shape != (emb.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f"labels: expected [{emb.shape[0]}] ints, got {lab.dtype}{list(lab.shape)}")
  lab = lab.astype(np.int64)
  if isinstance(gallery_size, bool) or not isinstance(gallery_size, (int, np.integer)) or gallery_size < 1:
    raise ValueError(f"gallery_size: expected an int >= 1, got {gallery_size!r}")
  if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
    raise ValueError(f"rounds: expected an int >= 1, got {rounds!r}")
  if score not in SCORES:
    raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
  in_cohort = _cohort_mask(cohort, emb.shape[0])
  split = np.intersect1d(lab[in_cohort], lab[~in_cohort])
  if split.size:
    raise ValueError(f"cohort: identities must be wholly in or out of the cohort; {split.size} are split "
                     f"(e.g. label {int(split[0])})")
  if score == "snorm":
    if in_cohort.sum() < 2:
      raise ValueError(f"score='snorm' needs a cohort of >= 2 rows, got {int(in_cohort.sum())}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not (
        top_k == 0 or 2 <= top_k <= in_cohort.sum()):
      raise ValueError(f"top_k: expected 0 or an int in [2, {int(in_cohort.sum())}], got {top_k!r}")

  rows = np.flatnonzero(~in_cohort)                       # searchable rows
  ids_all, counts = np.unique(lab[rows], return_counts=True)
  eligible = ids_all[counts >= 2]
  if gallery_size > eligible.size:
    raise ValueError(f"gallery_size={gallery_size} is larger than the {eligible.size} identities with "
                     f">= 2 images outside the cohort")
  if score == "snorm":
    mean, std = _cohort_stats64(emb, emb[in_cohort], int(top_k))
    std = np.maximum(std, 1e-12)
  rng = np.random.default_rng(seed)
  out = {k: [] for k in ("mated_top1_ids", "mated_truth", "mated_top1_scores", "nonmated_top1_ids",
                         "nonmated_top1_scores", "mated_round", "nonmated_round", "mated_rows",
                         "nonmated_rows", "galleries")}
  mated_n, nonmated_n = [], []
  for r in range(int(rounds)):
    chosen = rng.choice(eligible, gallery_size, replace=False)
    is_enrolled_id = np.isin(lab[rows], chosen)
    cand = rows[is_enrolled_id]
    # One random row per chosen identity: random keys, then the first row of each label.
    order = np.lexsort((rng.random(cand.size), lab[cand]))
    first = np.r_[True, lab[cand[order]][1:] != lab[cand[order]][:-1]]
    gallery = cand[order][first]                          # [K] rows, sorted by label
    mated = np.setdiff1d(cand, gallery)
    nonmated = rows[~is_enrolled_id]
    if nonmated.size == 0:
      raise ValueError(f"gallery_size={gallery_size} leaves no non-mated probe: every searchable "
                       f"identity is enrolled")
    probes = np.concatenate([mated, nonmated])
    g = emb[gallery]
    top_scores, top_rows = [], []
    block = max(1, _BLOCK_ELEMENTS // gallery.size)
    for lo in range(0, probes.size, block):
      p = probes[lo:lo + block]
      d2 = _sq_dists(emb[p], g)                           # [b, K]
      if score == "snorm":
        s = 0.5 * ((d2 - mean[p, None]) / std[p, None] + (d2 - mean[None, gallery]) / std[None, gallery])
      else:
        s = np.sqrt(d2)
      j = np.argmin(s, axis=1)                            # ties -> lower gallery row
      top_rows.append(j)
      top_scores.append(s[np.arange(p.size), j])
    top_ids = lab[gallery][np.concatenate(top_rows)]
    top_s = np.concatenate(top_scores)
    m = mated.size
    out["mated_top1_ids"].append(top_ids[:m])
    out["mated_truth"].append(lab[mated])
    out["mated_top1_scores"].append(top_s[:m])
    out["nonmated_top1_ids"].append(top_ids[m:])
    out["nonmated_top1_scores"].append(top_s[m:])
    out["mated_round"].append(np.full(m, r, np.int64))
    out["nonmated_round"].append(np.full(nonmated.size, r, np.int64))
    out["mated_rows"].append(mated)
    out["nonmated_rows"].append(nonmated)
    out["galleries"].append(gallery[None])
    mated_n.append(int(m))
    nonmated_n.append(int(nonmated.size))
  res: dict[str, Any] = {k: np.concatenate(v) for k, v in out.items()}
  res.update({"gallery_size": int(gallery_size), "rounds": int(rounds), "score": score,
              "eligible_identities": int(eligible.size), "cohort_rows": int(in_cohort.sum()),
              "mated_per_round": mated_n, "nonmated_per_round": nonmated_n})
  return res


def fpir_threshold(embeddings: Any, labels: Any, gallery_size: int, target_fpir: float, *,
                   rounds: int = 10, seed: int = 0, score: str = "distance", cohort: Any = None,
                   top_k: int = 0) -> tuple[float, dict[str, Any]]:
  """Threshold whose FPIR on simulated one-shot galleries of ``gallery_size`` is <= target.

  A per-pair false-accept rate is the wrong target for a gallery: a non-mated
  probe is accepted when *any* of the K enrolled faces is close enough, so at a
  fixed threshold FPIR grows with K (about K times the pair FAR for small
  rates); hence galleries of the size that will be deployed.

  Runs :func:`simulate_one_shot` and :func:`dir_at_fpir` on the pooled searches.

  Returns:
    (threshold, info): info is :func:`dir_at_fpir`'s dict plus the
    simulation's counts (``gallery_size``, ``rounds``, ``eligible_identities``,
    ``cohort_rows``, ``mated_per_round``, ``nonmated_per_round``, ``score``).

  Raises:
    ValueError: see :func:`simulate_one_shot`; ``target_fpir`` below the
      pooled searches' ``min_supported_fpir``.
  """
  sim = simulate_one_shot(embeddings, labels, gallery_size, rounds=rounds, seed=seed, score=score,
                          cohort=cohort, top_k=top_k)
  if sim["mated_truth"].size == 0:
    raise ValueError("no mated search: the enrolled identities have no other image")
  info = dir_at_fpir(sim["mated_top1_ids"], sim["mated_truth"], sim["mated_top1_scores"],
                     sim["nonmated_top1_scores"], target_fpir)
  info.update({k: v for k, v in sim.items() if not isinstance(v, np.ndarray)})
  return info["threshold"], info
