"""The chunked running top-k scan of one gallery, shared by the single-device and sharded
searches (:mod:`jaxface.recognition.search`, :mod:`jaxface.recognition.sharded_search`).

Both build on this module and nothing here imports either, so the shared
pieces go one way: ``search -> sharded_search -> scan`` and ``search -> scan``.
``trace_count`` counts traces of every search kernel (the tests use it to prove
that a repeated call with the same shapes does not recompile); it reads as
``jaxface.recognition.search.trace_count`` too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ROW_MULTIPLE", "count_trace", "layout", "round_up", "scan_topk", "trace_count"]

ROW_MULTIPLE = 256

# Incremented each time a search kernel is traced (count_trace).
trace_count = 0


def count_trace() -> None:
  """Called from inside a kernel's Python body: runs once per trace, never per call."""
  global trace_count
  trace_count += 1


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def scan_topk(queries: jax.Array, chunks: jax.Array, sq_norms: jax.Array, k: int, *,
              approx: bool = False, recall_target: float = 0.95
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Chunked running top-k of one gallery (a pure function, traced inside jit/shard_map).

  Per chunk the squared distances come from the norm expansion
  ``||q||^2 - 2 q.g + ||g||^2`` (one HIGHEST-precision matmul, no [Q, C, D]
  difference tensor) and a running top-k is merged with the chunk's top-k. Ties
  go to the lower gallery row: ``lax.top_k`` keeps the lower index first and
  the running state always holds earlier rows than the chunk. The norm
  expansion loses precision for near-identical vectors (absolute error ~1e-7 in
  d^2, i.e. ~3e-4 in d near 0), so the k winners' distances are then recomputed
  exactly from differences ([Q, k, D], cheap).

  Args:
    queries: [Q, D] float32.
    chunks: [n, C, D] float32 gallery, padded rows anywhere after the real ones.
    sq_norms: [n, C] float32 ||g||^2, +inf on padded rows (so they never win).
    k: static number of neighbours.
    approx: take each chunk's candidates with ``jax.lax.approx_max_k`` (TPU's
      partial-reduce op; other backends lower it to an exact sort) instead
      of ``jax.lax.top_k``.
    recall_target: ``approx_max_k``'s expected recall (ignored unless approx).

  Returns:
    (d2 [Q, k] float32 norm-expansion squared distances, ascending, ties ->
    lower row; row [Q, k] int32 rows of ``chunks.reshape(-1, D)``; exact
    [Q, k] float32 Euclidean distances of those rows recomputed from
    differences, +inf where d2 is +inf), not re-sorted by ``exact``.
  """
  num_chunks, rows, dim = chunks.shape
  q_sq = jnp.sum(queries * queries, axis=1, keepdims=True)              # [Q, 1]
  kc = min(k, rows)

  def step(carry, xs):
    best_d, best_i = carry                                              # [Q, k] each
    g, g_sq, base = xs                                                  # [C, D], [C], []
    dots = jnp.matmul(queries, g.T, precision=jax.lax.Precision.HIGHEST)
    d2 = q_sq - 2.0 * dots + g_sq[None, :]                              # [Q, C]; +inf on pads
    if approx:
      neg, idx = jax.lax.approx_max_k(-d2, kc, recall_target=recall_target)
    else:
      neg, idx = jax.lax.top_k(-d2, kc)
    cand_d = jnp.concatenate([best_d, -neg], axis=1)
    cand_i = jnp.concatenate([best_i, idx.astype(jnp.int32) + base], axis=1)
    neg2, pick = jax.lax.top_k(-cand_d, k)
    return (-neg2, jnp.take_along_axis(cand_i, pick, axis=1)), None

  q = queries.shape[0]
  init = (jnp.full((q, k), jnp.inf, jnp.float32), jnp.zeros((q, k), jnp.int32))
  bases = jnp.arange(num_chunks, dtype=jnp.int32) * rows
  (approx_d, index), _ = jax.lax.scan(step, init, (chunks, sq_norms, bases))
  # Exact distances of the winners from differences.
  flat = chunks.reshape(num_chunks * rows, dim)
  diff = queries[:, None, :] - flat[index]                              # [Q, k, D]
  exact = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
  exact = jnp.where(jnp.isinf(approx_d), jnp.inf, exact)
  return approx_d, index, exact


def layout(emb: np.ndarray, chunk: int, num_chunks: int | None = None, rows: int | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
  """Pads [M, D] float32 into chunks: ([n, C, D] float32, [n, C] float32 ||g||^2, +inf on pads).

  ``num_chunks`` / ``rows`` force the layout (the sharded index gives every
  shard the same one); by default n = ceil(M / chunk) even chunks, rounded up
  to a lane-friendly multiple of 256 rows (< 256 wasted rows per chunk).
  """
  m, dim = emb.shape
  if num_chunks is None:
    num_chunks = max(1, math.ceil(m / chunk))
  if rows is None:
    rows = round_up(max(1, math.ceil(m / num_chunks)), ROW_MULTIPLE)
  padded = np.zeros((num_chunks * rows, dim), np.float32)
  padded[:m] = emb
  sq = np.full((num_chunks * rows,), np.inf, np.float32)
  sq[:m] = np.einsum("md,md->m", emb, emb)
  return padded.reshape(num_chunks, rows, dim), sq.reshape(num_chunks, rows)
