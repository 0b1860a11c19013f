"""Nearest-neighbour decisions over a gallery of face embeddings (pure jnp, jitted).

1:K identification compares a batch of queries [Q, D] with the whole gallery
[M, D]. The gallery is cut into equal chunks of C rows (the last one padded),
kept on the device, and scanned with ``lax.scan``: per chunk the squared
distances come from the norm expansion ``||q||^2 - 2 q.g + ||g||^2`` (one
HIGHEST-precision matmul, no [Q, C, D] difference tensor) and a running top-k
is merged with the chunk's top-k. Peak memory is the gallery plus one
[Q, C] float32 block, so 1e6 x 128 embeddings (512 MB) against 256 queries
with C = 65536 needs ~64 MB on top of the gallery.

The norm expansion loses precision for near-identical vectors (absolute error
~1e-7 in d^2, i.e. ~3e-4 in d near 0), so the k winners' distances are then
recomputed exactly from differences ([Q, k, D], cheap) and re-sorted; the
returned distances are Euclidean (the dlib rule: same person if d <= 0.6).

Ties are broken towards the lower gallery row (``lax.top_k`` keeps the lower
index first and the running state always holds earlier rows than the chunk).
Recompilation: compiled shapes are (query bucket, number of chunks, chunk
rows, D, k); queries are padded to a power of two (>= 8, blocks of at most
1024 queries, so [Q, C] stays bounded for any Q) and the chunk rows
to a multiple of 256, so repeated calls against one gallery never recompile.

Several devices: ``SearchIndex(..., devices=jax.devices())`` shards the
gallery rows over them and merges the per-shard top-k
(:mod:`jaxface.recognition.sharded_search`), with the same results.

``approx=True`` takes each chunk's candidates with ``jax.lax.approx_max_k``
instead of ``lax.top_k``. On TPU that is the partial-reduce approximate
top-k of arXiv:2206.14286, where ``recall_target`` is the expected fraction
of the true top-k returned (an average under the algorithm's model of
random placement, not a per-query bound). On CPU and GPU, JAX lowers the op
to an exact sort ("fallback"), so the results equal the exact search
(recall 1.0, measured on CPU: 1e5 x 128 gallery, k = 5); it is only useful
there for testing the option. The exact distances of the returned rows are
recomputed either way.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SearchIndex", "identify", "verify", "brute_force", "distinct_candidates",
           "scan_topk", "layout", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 65536
_ROW_MULTIPLE = 256
_MIN_QUERY_BUCKET = 8
_MAX_QUERY_BLOCK = 1024

# Incremented each time a search kernel is traced; the tests use it to prove
# that a second call with the same shapes does not recompile.
trace_count = 0


def _check_matrix(x: Any, name: str, *, dim: int | None = None, allow_empty: bool = False) -> np.ndarray:
  """Validates a real 2-D array [N, D] -> float32 NumPy (no copy if already float32)."""
  if isinstance(x, jax.Array):
    x = np.asarray(x)
  arr = np.asarray(x)
  if arr.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D array [N, D], got shape {arr.shape}")
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"{name}: expected a real array, got dtype {arr.dtype}")
  if arr.shape[0] == 0 and not allow_empty:
    raise ValueError(f"{name}: empty array of shape {arr.shape}")
  if arr.shape[1] == 0:
    raise ValueError(f"{name}: zero-length embeddings, shape {arr.shape}")
  if dim is not None and arr.shape[1] != dim:
    raise ValueError(f"{name}: embeddings have {arr.shape[1]} dimensions, the gallery has {dim}")
  arr = arr.astype(np.float32, copy=False)
  if not np.isfinite(arr).all():
    bad = int((~np.isfinite(arr)).any(axis=1).sum())
    raise ValueError(f"{name}: {bad} row(s) contain NaN or infinite values")
  return arr


def _check_k(k: Any) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k: expected an int >= 1, got {k!r}")
  return int(k)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _query_bucket(q: int) -> int:
  return max(_MIN_QUERY_BUCKET, 1 << max(0, (q - 1).bit_length()))


def _check_recall(recall_target: Any) -> float:
  if isinstance(recall_target, bool) or not isinstance(recall_target, (int, float, np.floating)) \
      or not 0.0 < float(recall_target) <= 1.0:
    raise ValueError(f"recall_target: expected a number in (0, 1], got {recall_target!r}")
  return float(recall_target)


def scan_topk(queries: jax.Array, chunks: jax.Array, sq_norms: jax.Array, k: int, *,
              approx: bool = False, recall_target: float = 0.95
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Chunked running top-k of one gallery (a pure function, traced inside jit/shard_map).

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


@functools.partial(jax.jit, static_argnames=("k", "approx", "recall_target"))
def _search_kernel(queries: jax.Array, chunks: jax.Array, sq_norms: jax.Array, k: int,
                   approx: bool = False, recall_target: float = 0.95
                   ) -> tuple[jax.Array, jax.Array]:
  """k nearest gallery rows of each query (see :func:`scan_topk` for the arguments).

  Returns:
    (index [Q, k] int32 global gallery rows, dist [Q, k] float32 Euclidean,
    ascending); rows beyond the gallery come back as +inf distance.
  """
  global trace_count
  trace_count += 1
  _, index, exact = scan_topk(queries, chunks, sq_norms, k, approx=approx,
                              recall_target=recall_target)
  order = jnp.argsort(exact, axis=1, stable=True)
  return (jnp.take_along_axis(index, order, axis=1), jnp.take_along_axis(exact, order, axis=1))


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
    rows = _round_up(max(1, math.ceil(m / num_chunks)), _ROW_MULTIPLE)
  padded = np.zeros((num_chunks * rows, dim), np.float32)
  padded[:m] = emb
  sq = np.full((num_chunks * rows,), np.inf, np.float32)
  sq[:m] = np.einsum("md,md->m", emb, emb)
  return padded.reshape(num_chunks, rows, dim), sq.reshape(num_chunks, rows)


class SearchIndex:
  """A gallery laid out on the device(s) for repeated :meth:`identify` calls.

  Args:
    embeddings: [M, D] float gallery embeddings (M >= 1).
    identity_ids: [M] int identity of each row.
    chunk: maximum rows per scanned chunk (>= 1); bounds the [Q, chunk]
      distance block held in memory (per device when sharded).
    devices: None (the default device), or a sequence of distinct devices
      (e.g. ``jax.devices()``): the gallery rows are then split into
      ``len(devices)`` contiguous shards on a ``("data",)`` mesh, each device
      scans its shard and the per-shard top-k are merged
      (:mod:`jaxface.recognition.sharded_search`); same results as one device.
    approx: pick each chunk's candidates with ``jax.lax.approx_max_k``
      (faster on TPU, where it may miss true neighbours; on CPU and GPU JAX
      lowers it to an exact sort, so recall is 1). The exact distances of the
      returned rows are still recomputed; ties are not guaranteed to go to
      the lower row.
    recall_target: ``approx_max_k``'s expected fraction of the true top
      neighbours returned (an average under its random-placement model, not a
      per-query guarantee); ignored unless ``approx``.
  """

  def __init__(self, embeddings: Any, identity_ids: Any, *, chunk: int = DEFAULT_CHUNK,
               devices: Any = None, approx: bool = False, recall_target: float = 0.95):
    if np.ndim(embeddings) == 2 and np.shape(embeddings)[0] == 0:
      raise ValueError("gallery_emb: the gallery is empty; enroll at least one face first")
    emb = _check_matrix(embeddings, "gallery_emb")
    ids = np.asarray(identity_ids)
    if ids.ndim != 1 or ids.shape[0] != emb.shape[0]:
      raise ValueError(f"gallery_ids: expected [M] = [{emb.shape[0]}] ids, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"gallery_ids: expected integer ids, got dtype {ids.dtype}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
      raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    if not isinstance(approx, (bool, np.bool_)):
      raise ValueError(f"approx: expected a bool, got {approx!r}")
    self.approx = bool(approx)
    self.recall_target = _check_recall(recall_target)
    self.size, self.dim = emb.shape
    self.ids = ids.astype(np.int64)
    self.mesh = None
    if devices is None:
      chunks, sq = layout(emb, int(chunk))
      self._chunks = jax.device_put(chunks)
      self._sq_norms = jax.device_put(sq)
    else:
      from jaxface.recognition import sharded_search  # noqa: PLC0415 -- it imports this module
      self.mesh = sharded_search.make_mesh(devices)
      self._chunks, self._sq_norms, self._shard_rows = sharded_search.place(emb, int(chunk), self.mesh)
      self._replicated = sharded_search.replicated(self.mesh)

  def _kernel(self, block: np.ndarray, k: int) -> tuple[jax.Array, jax.Array]:
    if self.mesh is None:
      return _search_kernel(jnp.asarray(block), self._chunks, self._sq_norms, k,
                            self.approx, self.recall_target)
    from jaxface.recognition import sharded_search  # noqa: PLC0415
    return sharded_search.sharded_kernel(
        jax.device_put(block, self._replicated), self._chunks, self._sq_norms, k=k,
        approx=self.approx, recall_target=self.recall_target, shard_rows=self._shard_rows,
        mesh=self.mesh)

  def search(self, queries: Any, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """k nearest gallery rows: (row index [Q, k] int64, distance [Q, k] float32).

    Missing neighbours (k > M) have row -1 and distance +inf.
    """
    k = _check_k(k)
    q = _check_matrix(queries, "queries", dim=self.dim)
    blocks_i, blocks_d = [], []
    # Fixed-size query blocks bound the [block, C] distance tile (256 MB at
    # 1024 x 65536) however many queries come; each block reuses one compile.
    for lo in range(0, q.shape[0], _MAX_QUERY_BLOCK):
      block = q[lo:lo + _MAX_QUERY_BLOCK]
      num_q = block.shape[0]
      bucket = _query_bucket(num_q)
      if bucket != num_q:
        block = np.concatenate([block, np.zeros((bucket - num_q, self.dim), np.float32)])
      index, dist = self._kernel(block, k)
      blocks_i.append(np.asarray(index)[:num_q].astype(np.int64))
      blocks_d.append(np.asarray(dist)[:num_q])
    index = np.concatenate(blocks_i)
    dist = np.concatenate(blocks_d)
    index = np.where(np.isinf(dist), -1, index)
    return index, dist

  def identify(self, queries: Any, *, k: int = 5, threshold: Any) -> dict[str, np.ndarray]:
    """1:K decisions; see :func:`identify` for the arguments and result."""
    thr = _check_threshold(threshold, self.size)
    index, dist = self.search(queries, k)
    safe = np.maximum(index, 0)
    ids = np.where(index >= 0, self.ids[safe], -1)
    best_d = dist[:, 0]
    best_thr = thr[safe[:, 0]] if thr.ndim else thr
    accepted = best_d <= best_thr
    return {"ids": ids, "index": index, "distances": dist,
            "best_id": np.where(accepted, ids[:, 0], -1),
            "best_distance": best_d,
            "threshold": np.broadcast_to(best_thr, best_d.shape).astype(np.float32)}


def _check_threshold(threshold: Any, size: int) -> np.ndarray:
  thr = np.asarray(threshold)
  if thr.ndim == 0:
    if not np.issubdtype(thr.dtype, np.number) or not np.isfinite(thr) or thr < 0:
      raise ValueError(f"threshold: expected a finite number >= 0, got {threshold!r}")
    return thr.astype(np.float32)
  if thr.shape != (size,):
    raise ValueError(f"threshold: expected a number or one per gallery row [{size}], "
                     f"got shape {thr.shape}")
  if not np.issubdtype(thr.dtype, np.number) or not np.isfinite(thr).all() or (thr < 0).any():
    raise ValueError("threshold: per-row thresholds must be finite numbers >= 0")
  return thr.astype(np.float32)


def identify(queries: Any, gallery_emb: Any, gallery_ids: Any, *, k: int = 5, threshold: Any,
             chunk: int = DEFAULT_CHUNK, devices: Any = None, approx: bool = False,
             recall_target: float = 0.95) -> dict[str, np.ndarray]:
  """1:K identification with "not recognized".

  Args:
    queries: [Q, D] float query embeddings.
    gallery_emb: [M, D] float gallery embeddings, or a :class:`SearchIndex`
      (then ``gallery_ids`` may be None and ``chunk``, ``devices``, ``approx``
      and ``recall_target`` are ignored); build the index once when searching
      the same gallery repeatedly.
    gallery_ids: [M] int identity id of each gallery row.
    k: number of nearest gallery rows returned per query (rows, not distinct
      identities: see :func:`distinct_candidates`).
    threshold: Euclidean distance threshold, a number or [M] one per gallery
      row (per-identity thresholds expanded to rows). A query is recognized
      when its nearest row is within that row's threshold.
    chunk: rows per scanned gallery chunk.
    devices, approx, recall_target: see :class:`SearchIndex` (sharding the
      gallery over several devices; approximate per-chunk top-k).

  Returns:
    dict with ``ids`` [Q, k] int64 identity of each candidate (-1 where
    k > M), ``index`` [Q, k] int64 gallery rows, ``distances`` [Q, k] float32
    Euclidean ascending (+inf where missing), ``best_id`` [Q] int64 (-1 = not
    recognized), ``best_distance`` [Q] float32 and ``threshold`` [Q] float32
    (the threshold the decision used).

  Raises:
    ValueError: empty gallery, shape/dtype mismatch, non-finite values, bad k
      or threshold.
  """
  if isinstance(gallery_emb, SearchIndex):
    index = gallery_emb
  else:
    index = SearchIndex(gallery_emb, gallery_ids, chunk=chunk, devices=devices, approx=approx,
                        recall_target=recall_target)
  return index.identify(queries, k=k, threshold=threshold)


@jax.jit
def _min_distance(queries: jax.Array, claimed: jax.Array) -> jax.Array:
  """[Q] min Euclidean distance of each query [Q, D] to the claimed rows [N, D]."""
  global trace_count
  trace_count += 1
  diff = queries[:, None, :] - claimed[None, :, :]
  return jnp.sqrt(jnp.min(jnp.sum(diff * diff, axis=-1), axis=1))


def verify(query: Any, claimed_embs: Any, threshold: float) -> tuple[Any, Any, float]:
  """1:1 verification against a claimed identity's enrolled embeddings.

  Args:
    query: [D] or [Q, D] float query embedding(s).
    claimed_embs: [N, D] float embeddings of the claimed identity (N >= 1).
    threshold: Euclidean distance threshold (same person if distance <= it).

  Returns:
    (same, distance, threshold): for a [D] query a Python bool, float and
    float; for [Q, D] a [Q] bool array and a [Q] float32 array. The distance
    is the minimum over the claimed identity's embeddings.
  """
  single = np.asarray(query).ndim == 1
  q = _check_matrix(np.asarray(query)[None] if single else query, "query")
  claimed = _check_matrix(claimed_embs, "claimed_embs", dim=q.shape[1])
  if np.ndim(threshold) != 0:
    raise ValueError(f"threshold: expected one number, got shape {np.shape(threshold)}")
  thr = _check_threshold(threshold, 0)
  dist = np.asarray(_min_distance(jnp.asarray(q), jnp.asarray(claimed)))
  same = dist <= thr
  if single:
    return bool(same[0]), float(dist[0]), float(thr)
  return same, dist, float(thr)


def brute_force(queries: Any, gallery_emb: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Slow NumPy float64 reference: (row index [Q, k], Euclidean distance [Q, k]).

  Exact differences, stable sort (ties -> lower row), -1 / +inf past M.
  """
  q = np.asarray(queries, np.float64)
  g = np.asarray(gallery_emb, np.float64)
  d = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
  order = np.argsort(d, axis=1, kind="stable")[:, :k]
  dist = np.take_along_axis(d, order, axis=1)
  pad = k - order.shape[1]
  if pad > 0:
    order = np.concatenate([order, -np.ones((q.shape[0], pad), np.int64)], axis=1)
    dist = np.concatenate([dist, np.full((q.shape[0], pad), np.inf)], axis=1)
  return order, dist


def distinct_candidates(ids: np.ndarray, distances: np.ndarray, k: int
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Collapses per-row candidates to distinct identities (first = nearest).

  Args:
    ids: [Q, K] int identity of each candidate row (-1 = none), ascending distance.
    distances: [Q, K] float.
    k: how many distinct identities to keep (<= K).

  Returns:
    ([Q, k] int64 ids, [Q, k] float distances), -1 / +inf where fewer than k
    distinct identities were among the K candidates. Ask :func:`identify` for
    K larger than k when identities have several enrolled embeddings.
  """
  ids = np.asarray(ids)
  distances = np.asarray(distances)
  k = _check_k(k)
  if ids.shape != distances.shape or ids.ndim != 2:
    raise ValueError(f"ids, distances: expected equal [Q, K] shapes, got {ids.shape} and {distances.shape}")
  # A candidate is kept when no earlier column of its row has the same identity.
  dup = (ids[:, :, None] == ids[:, None, :]) & np.tri(ids.shape[1], k=-1, dtype=bool).T[None]
  keep = ~dup.any(axis=1) & (ids >= 0)
  rank = np.cumsum(keep, axis=1) - 1
  out_ids = np.full((ids.shape[0], k), -1, np.int64)
  out_d = np.full((ids.shape[0], k), np.inf, distances.dtype if distances.dtype.kind == "f" else np.float64)
  rows, cols = np.nonzero(keep & (rank < k))
  out_ids[rows, rank[rows, cols]] = ids[rows, cols]
  out_d[rows, rank[rows, cols]] = distances[rows, cols]
  return out_ids, out_d
