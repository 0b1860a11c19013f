"""Nearest-neighbour decisions over a gallery of face embeddings (pure jnp, jitted).

1:K identification compares a batch of queries [Q, D] with the whole gallery
[M, D] (:class:`SearchIndex`, :func:`identify`) by a chunked running top-k
(:func:`jaxface.recognition.scan.scan_topk`), on one device or sharded over
several (:mod:`jaxface.recognition.sharded_search`) with the same results;
:func:`verify` is the 1:1 decision. Imports go one way: this module ->
sharded_search -> scan.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxface.parallel import mesh as mesh_lib
from jaxface.recognition import scan, sharded_search
from jaxface.recognition.scan import layout, scan_topk

__all__ = ["SearchIndex", "identify", "verify", "brute_force", "distinct_candidates",
           "scan_topk", "layout", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 65536
_MIN_QUERY_BUCKET = 8
_MAX_QUERY_BLOCK = 1024



def __getattr__(name: str) -> Any:
  # ``trace_count``: traces of every search kernel so far (kept in ``scan``, which all
  # kernels share); the tests use it to prove that a repeated call does not recompile.
  if name == "trace_count":
    return scan.trace_count
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _query_bucket(q: int) -> int:
  return max(_MIN_QUERY_BUCKET, 1 << max(0, (q - 1).bit_length()))


def _check_recall(recall_target: Any) -> float:
  if isinstance(recall_target, bool) or not isinstance(recall_target, (int, float, np.floating)) \
      or not 0.0 < float(recall_target) <= 1.0:
    raise ValueError(f"recall_target: expected a number in (0, 1], got {recall_target!r}")
  return float(recall_target)


@functools.partial(jax.jit, static_argnames=("k", "approx", "recall_target"))
def _search_kernel(queries: jax.Array, chunks: jax.Array, sq_norms: jax.Array, k: int,
                   approx: bool = False, recall_target: float = 0.95
                   ) -> tuple[jax.Array, jax.Array]:
  """k nearest gallery rows of each query (see :func:`scan_topk` for the arguments).

  Returns:
    (index [Q, k] int32 global gallery rows, dist [Q, k] float32 Euclidean,
    ascending); rows beyond the gallery come back as +inf distance.
  """
  scan.count_trace()
  _, index, exact = scan_topk(queries, chunks, sq_norms, k, approx=approx,
                              recall_target=recall_target)
  order = jnp.argsort(exact, axis=1, stable=True)
  return (jnp.take_along_axis(index, order, axis=1), jnp.take_along_axis(exact, order, axis=1))


class SearchIndex:
  """A gallery laid out on the device(s) for repeated :meth:`identify` calls.

  Args:
    embeddings: [M, D] float gallery embeddings (M >= 1).
    identity_ids: [M] int identity of each row.
    chunk: maximum rows per scanned chunk (>= 1); bounds the [Q, chunk]
      distance block held in memory (per device when sharded). The gallery is
      cut into equal chunks (the last one padded) kept on the device and
      scanned with ``lax.scan`` (:func:`scan_topk`): peak memory is the gallery
      plus one [Q, C] float32 block, so 1e6 x 128 embeddings (512 MB) against
      256 queries with C = 65536 need ~64 MB on top of the gallery.
    devices: None (the default device), or a sequence of distinct devices
      (e.g. ``jax.devices()``): the gallery rows are then split into
      ``len(devices)`` contiguous shards on a ``("data",)`` mesh, each device
      scans its shard and the per-shard top-k are merged
      (:mod:`jaxface.recognition.sharded_search`); same results as one device.
    approx: pick each chunk's candidates with ``jax.lax.approx_max_k``
      (faster on TPU, where it is the partial-reduce approximate top-k of
      arXiv:2206.14286 and may miss true neighbours; on CPU and GPU JAX lowers
      it to an exact sort ("fallback"), so recall is 1 and the option is only
      useful there for testing it). The exact distances of the returned rows
      are still recomputed; ties are not guaranteed to go to the lower row.
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
      self.mesh = mesh_lib.mesh_over(devices)
      self._chunks, self._sq_norms, self._shard_rows = sharded_search.place(emb, int(chunk), self.mesh)
      self._replicated = mesh_lib.replicated(self.mesh)

  def _kernel(self, block: np.ndarray, k: int) -> tuple[jax.Array, jax.Array]:
    if self.mesh is None:
      return _search_kernel(jnp.asarray(block), self._chunks, self._sq_norms, k,
                            self.approx, self.recall_target)
    return sharded_search.sharded_kernel(
        jax.device_put(block, self._replicated), self._chunks, self._sq_norms, k=k,
        approx=self.approx, recall_target=self.recall_target, shard_rows=self._shard_rows,
        mesh=self.mesh)

  def search(self, queries: Any, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """k nearest gallery rows: (row index [Q, k] int64, distance [Q, k] float32).

    Distances are Euclidean (the dlib rule: same person if d <= 0.6), ascending;
    ties go to the lower gallery row. Missing neighbours (k > M) have row -1 and
    distance +inf. Compiled shapes are (query bucket, number of chunks, chunk
    rows, D, k); queries are padded to a power of two (>= 8, blocks of at most
    1024 queries, so [Q, C] stays bounded for any Q) and the chunk rows to a
    multiple of 256, so repeated calls against one gallery never recompile.
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
  scan.count_trace()
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
