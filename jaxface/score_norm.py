"""Cohort score normalisation (symmetric S-norm) of squared-distance scores.

    s(i, j) = 0.5 * ((d_ij - mu_i) / sd_i + (d_ij - mu_j) / sd_j)

where mu_i, sd_i are the mean and standard deviation of image i's squared
distances to a cohort of faces of other people (adaptive S-norm: only to its
``top_k`` nearest cohort rows); see :func:`snorm` for why. Plain ``jnp``: jitted,
chunked over probes so memory stays bounded for large cohorts.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["cohort_stats", "snorm", "snorm_matrix", "snorm_identify"]

# Elements of the [chunk, M, D] difference block per chunk of probes.
_CHUNK_ELEMENTS = 1 << 22
# A cohort whose distances all coincide has sd 0; S-norm divides by at least this.
_MIN_STD = 1e-12


def _as_matrix(x, name: str) -> jax.Array:
  a = np.asarray(x)
  if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
    raise ValueError(f"{name}: expected a non-empty 2-D [N, D] array, got shape {a.shape}")
  if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
    raise ValueError(f"{name}: expected real numbers, got dtype {a.dtype}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name}: contains NaN or infinite values")
  return jnp.asarray(a, jnp.float32)


@partial(jax.jit, static_argnames=("top_k",))
def _stats_chunk(probes: jax.Array, cohort: jax.Array, top_k: int):
  # Differences, not the norm expansion: near-duplicate images must give ~0,
  # and the expansion's cancellation error would dominate small distances.
  d = jnp.sum(jnp.square(probes[:, None, :] - cohort[None, :, :]), axis=-1)  # [c, M]
  if top_k:
    d = -jax.lax.top_k(-d, top_k)[0]                                          # [c, k] nearest
  return jnp.mean(d, axis=1), jnp.std(d, axis=1)


def cohort_stats(probes, cohort, *, top_k: int = 0) -> tuple[jax.Array, jax.Array]:
  """Mean and standard deviation of each probe's squared distances to the cohort.

  Args:
    probes: ``[N, D]`` float embeddings.
    cohort: ``[M, D]`` float embeddings of people not among the probes, M >= 2.
    top_k: 0: all M cohort rows; else 2 <= top_k <= M: only each probe's
      ``top_k`` nearest rows (adaptive S-norm).

  Returns:
    ``(mean, std)``, each ``[N] float32``.

  Raises:
    ValueError: non-2-D, empty or non-finite inputs, mismatched D, M < 2 or a
      bad ``top_k``.
  """
  p = _as_matrix(probes, "probes")
  c = _as_matrix(cohort, "cohort")
  if p.shape[1] != c.shape[1]:
    raise ValueError(f"probes have dimension {p.shape[1]} but cohort has {c.shape[1]}")
  if c.shape[0] < 2:
    raise ValueError(f"cohort: needs at least 2 rows for a standard deviation, got {c.shape[0]}")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not (
      top_k == 0 or 2 <= top_k <= c.shape[0]):
    raise ValueError(f"top_k: expected 0 (whole cohort) or an int in [2, {c.shape[0]}], "
                     f"got {top_k!r}")
  n = p.shape[0]
  chunk = max(1, min(n, _CHUNK_ELEMENTS // (c.shape[0] * c.shape[1])))
  pad = (-n) % chunk
  # Padding to whole chunks keeps one compiled shape for every chunk.
  pp = jnp.concatenate([p, jnp.zeros((pad, p.shape[1]), p.dtype)]) if pad else p
  means, stds = [], []
  for lo in range(0, n + pad, chunk):
    m, s = _stats_chunk(pp[lo:lo + chunk], c, int(top_k))
    means.append(m)
    stds.append(s)
  return jnp.concatenate(means)[:n], jnp.concatenate(stds)[:n]


@jax.jit
def snorm(distances, mean_i, std_i, mean_j, std_j) -> jax.Array:
  """Symmetric S-norm of pair scores.

  A raw distance d(x1, x2) means different things for different images: a
  blurred, tilted or glare-covered photo sits far from *everyone*, so its genuine
  pairs look like impostor pairs at a global threshold. S-norm measures how far
  each image usually is from a *cohort* of faces of people known to be different
  (for a trained encoder: the training identities, never the people being
  verified; :func:`cohort_stats`) and rescales the score from both sides. Lower
  is still "more alike", so thresholds, ROC and k-fold accuracy apply unchanged;
  scores of different distance functions (an encoder's, a Fisherfaces
  projection's) become comparable and can be added (score-level fusion).

  Args:
    distances: ``[M]`` float squared distances d(i, j) of M pairs.
    mean_i, std_i: ``[M]`` float cohort statistics of each pair's first image.
    mean_j, std_j: ``[M]`` float the same for the second image.

  Returns:
    ``[M] float32`` ``0.5 * ((d - mean_i) / std_i + (d - mean_j) / std_j)``
    (std floored at 1e-12); lower means more alike.
  """
  d = jnp.asarray(distances, jnp.float32)
  si = jnp.maximum(jnp.asarray(std_i, jnp.float32), _MIN_STD)
  sj = jnp.maximum(jnp.asarray(std_j, jnp.float32), _MIN_STD)
  return 0.5 * ((d - mean_i) / si + (d - mean_j) / sj)


# --------------------------------------------------------------------------
# S-norm for 1:K identification
# --------------------------------------------------------------------------


def _normed(q, g, mq, sq, mg, sg) -> jax.Array:
  """[c, M] S-normed squared distances of query rows q [c, D] to gallery rows g [M, D]."""
  d = jnp.sum(jnp.square(q[:, None, :] - g[None, :, :]), axis=-1)
  sq = jnp.maximum(sq, _MIN_STD)[:, None]
  sg = jnp.maximum(sg, _MIN_STD)[None, :]
  return 0.5 * ((d - mq[:, None]) / sq + (d - mg[None, :]) / sg)


_snorm_block = jax.jit(_normed)


@partial(jax.jit, static_argnames=("k",))
def _snorm_topk_block(q, g, mq, sq, mg, sg, k: int):
  s = _normed(q, g, mq, sq, mg, sg)
  neg, idx = jax.lax.top_k(-s, k)                    # ties -> lower gallery row
  return -neg, idx


def _stats_arg(stats, m: int, name: str) -> tuple[jax.Array, jax.Array]:
  if not isinstance(stats, (tuple, list)) or len(stats) != 2:
    raise ValueError(f"{name}: expected (mean, std) from cohort_stats, got {type(stats).__name__}")
  out = []
  for part in stats:
    a = np.asarray(part)
    if a.shape != (m,) or not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
      raise ValueError(f"{name}: expected two finite float [{m}] arrays (cohort_stats of the "
                       f"{m} rows), got {a.dtype}{list(a.shape)}")
    out.append(jnp.asarray(a, jnp.float32))
  return out[0], out[1]


def _prepare(queries, gallery, cohort, top_k, gallery_stats):
  q = _as_matrix(queries, "queries")
  g = _as_matrix(gallery, "gallery")
  if q.shape[1] != g.shape[1]:
    raise ValueError(f"queries have dimension {q.shape[1]} but gallery has {g.shape[1]}")
  mq, sq = cohort_stats(q, cohort, top_k=top_k)
  if gallery_stats is None:
    mg, sg = cohort_stats(g, cohort, top_k=top_k)
  else:
    mg, sg = _stats_arg(gallery_stats, g.shape[0], "gallery_stats")
  return q, g, mq, sq, mg, sg


def _blocks(q, mq, sq, g):
  """Query blocks of one fixed size (the last one padded): one compiled shape per gallery."""
  n = q.shape[0]
  chunk = max(1, min(n, _CHUNK_ELEMENTS // (g.shape[0] * g.shape[1])))
  pad = (-n) % chunk
  if pad:
    q = jnp.concatenate([q, jnp.zeros((pad, q.shape[1]), q.dtype)])
    mq = jnp.concatenate([mq, jnp.zeros((pad,), mq.dtype)])
    sq = jnp.concatenate([sq, jnp.ones((pad,), sq.dtype)])
  return [(q[lo:lo + chunk], mq[lo:lo + chunk], sq[lo:lo + chunk]) for lo in range(0, n + pad, chunk)]


def snorm_matrix(queries, gallery, cohort, *, top_k: int = 0, gallery_stats=None) -> jax.Array:
  """Symmetric S-norm of every query against every gallery row.

  Args:
    queries: ``[Q, D]`` float embeddings.
    gallery: ``[M, D]`` float embeddings.
    cohort: ``[C, D]`` float embeddings of people neither enrolled nor
      searched for (C >= 2).
    top_k: cohort statistics over each row's ``top_k`` nearest cohort rows
      (0 = all), see :func:`cohort_stats`.
    gallery_stats: optional ``cohort_stats(gallery, cohort, top_k=top_k)``,
      computed once per gallery and passed to every search (the caller
      keeps it consistent with ``cohort`` and ``top_k``).

  Returns:
    ``[Q, M] float32`` S-normed squared distances; lower means more alike.
  """
  q, g, mq, sq, mg, sg = _prepare(queries, gallery, cohort, top_k, gallery_stats)
  out = [_snorm_block(bq, g, bm, bs, mg, sg) for bq, bm, bs in _blocks(q, mq, sq, g)]
  return jnp.concatenate(out)[:q.shape[0]]


def snorm_identify(queries, gallery, gallery_ids, cohort, *, k: int = 5, threshold, top_k: int = 0,
                   gallery_stats=None) -> dict[str, np.ndarray]:
  """1:K identification ranked and decided by S-norm score (``search.identify``'s keys).

  Args:
    queries, gallery, cohort, top_k, gallery_stats: see :func:`snorm_matrix`.
    gallery_ids: ``[M]`` int identity of each gallery row.
    k: candidates per query (rows, ascending S-norm score).
    threshold: S-norm threshold (may be negative), a number or ``[M]`` one
      per gallery row; a query is recognized when its best score is <= the
      best row's threshold.

  Returns:
    dict with ``ids`` [Q, k] int64 (-1 past M), ``index`` [Q, k] int64 rows,
    ``scores`` [Q, k] float32 S-norm ascending (+inf past M), ``distances``
    (the same array as ``scores``, so callers of ``search.identify`` can use
    it unchanged), ``best_id`` [Q] int64 (-1 = not recognized),
    ``best_distance`` / ``best_score`` [Q] float32 and ``threshold`` [Q]
    float32.
  """
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k: expected an int >= 1, got {k!r}")
  q, g, mq, sq, mg, sg = _prepare(queries, gallery, cohort, top_k, gallery_stats)
  ids = np.asarray(gallery_ids)
  if ids.shape != (g.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"gallery_ids: expected [{g.shape[0]}] ints, got {ids.dtype}{list(ids.shape)}")
  thr = np.asarray(threshold)
  if thr.shape not in ((), (g.shape[0],)) or not np.issubdtype(thr.dtype, np.number) \
      or np.issubdtype(thr.dtype, np.complexfloating) or not np.isfinite(thr).all():
    got = repr(threshold) if thr.ndim == 0 else f"shape {list(thr.shape)}"
    raise ValueError(f"threshold: expected a finite number or one per gallery row [{g.shape[0]}], got {got}")
  kk = min(int(k), g.shape[0])
  parts = [_snorm_topk_block(bq, g, bm, bs, mg, sg, kk) for bq, bm, bs in _blocks(q, mq, sq, g)]
  n = q.shape[0]
  scores = np.asarray(jnp.concatenate([p[0] for p in parts]))[:n]
  index = np.asarray(jnp.concatenate([p[1] for p in parts]))[:n].astype(np.int64)
  if kk < k:
    scores = np.concatenate([scores, np.full((n, k - kk), np.inf, np.float32)], axis=1)
    index = np.concatenate([index, np.full((n, k - kk), -1, np.int64)], axis=1)
  cand = np.where(index >= 0, ids.astype(np.int64)[np.maximum(index, 0)], -1)
  best_thr = (thr[index[:, 0]] if thr.ndim else np.full(n, thr)).astype(np.float32)
  best = scores[:, 0]
  return {"ids": cand, "index": index, "scores": scores, "distances": scores,
          "best_id": np.where(best <= best_thr, cand[:, 0], -1), "best_distance": best,
          "best_score": best, "threshold": best_thr}
