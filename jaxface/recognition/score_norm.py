"""Cohort score normalisation (symmetric S-norm) of squared-distance scores.

A raw distance d(x1, x2) means different things for different images: a
blurred, tilted or glare-covered photo sits far from *everyone*, so its genuine
pairs look like impostor pairs at a global threshold. S-norm measures how far
each image usually is from a *cohort* of faces of people known to be
different (for a trained encoder: the training identities, never the people
being verified) and rescales the score from both sides:

    s(i, j) = 0.5 * ((d_ij - mu_i) / sd_i + (d_ij - mu_j) / sd_j)

where mu_i, sd_i are the mean and standard deviation of image i's squared
distances to the cohort (adaptive S-norm: only to its ``top_k`` nearest cohort
rows). Lower is still "more alike", so thresholds, ROC and k-fold accuracy
apply unchanged. Scores of different distance functions (an encoder's, a
Fisherfaces projection's) become comparable after S-norm and can be added
(score-level fusion).

Plain ``jnp``: jitted, chunked over probes so memory stays bounded for large cohorts.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["cohort_stats", "snorm"]

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

