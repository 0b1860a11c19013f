"""1:K search with the gallery sharded by rows over several devices (``jax.shard_map``).

Used through ``SearchIndex(..., devices=jax.devices())`` or
``identify(..., devices=...)``: :func:`place` splits the gallery into one
contiguous shard per device of a ``("data",)`` mesh, queries are replicated, and
:func:`sharded_kernel` scans every shard and merges the per-shard top-k, with the
same results as the single-device index.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxface.parallel import mesh as mesh_lib
from jaxface.recognition import scan

__all__ = ["place", "sharded_kernel"]

AXIS = mesh_lib.DATA


def place(emb: np.ndarray, chunk: int, mesh: Mesh) -> tuple[jax.Array, jax.Array, int]:
  """Lays the gallery out as shards on ``mesh``.

  The M gallery rows are cut into S = ``len(devices)`` contiguous shards of
  R = ceil(M / S) rows (the last shards may hold fewer real rows, even none),
  every shard padded to the same [n, C, D] chunk layout as the single-device
  index, and the stacked [S * n, C, D] array is placed with
  ``NamedSharding(mesh, P("data"))``, so each device holds exactly its shard.

  Args:
    emb: [M, D] float32 gallery (checked).
    chunk: maximum rows per scanned chunk within a shard.
    mesh: the ``("data",)`` mesh of S devices (``jaxface.parallel.mesh.mesh_over``).

  Returns:
    (chunks [S * n, C, D] float32, sq_norms [S * n, C] float32 with +inf on
    padded rows, both sharded on "data"; R, the gallery rows per shard).
  """
  m, dim = emb.shape
  shards = mesh.devices.size
  shard_rows = math.ceil(m / shards)
  num_chunks = max(1, math.ceil(shard_rows / chunk))
  rows = scan.round_up(math.ceil(shard_rows / num_chunks), scan.ROW_MULTIPLE)
  sharding = mesh_lib.batch_sharding(mesh)

  def shard(s):
    return scan.layout(emb[s * shard_rows:(s + 1) * shard_rows], chunk, num_chunks, rows)

  parts = [shard(s) for s in range(shards)]
  # Each device receives only its own shard (no full host->every-device copy).
  devs = list(mesh.devices.flat)
  chunks = jax.make_array_from_single_device_arrays(
      (shards * num_chunks, rows, dim), sharding,
      [jax.device_put(p[0], d) for p, d in zip(parts, devs)])
  sq = jax.make_array_from_single_device_arrays(
      (shards * num_chunks, rows), sharding,
      [jax.device_put(p[1], d) for p, d in zip(parts, devs)])
  return chunks, sq, shard_rows


@functools.partial(jax.jit, static_argnames=("k", "approx", "recall_target", "shard_rows", "mesh"))
def sharded_kernel(queries: jax.Array, chunks: jax.Array, sq_norms: jax.Array, *, k: int,
                   approx: bool, recall_target: float, shard_rows: int, mesh: Mesh
                   ) -> tuple[jax.Array, jax.Array]:
  """k nearest gallery rows over all shards.

  Every device runs the single-device chunked scan over its shard and returns
  k candidates (norm-expansion d2, global row = shard * R + local row, exact
  distance). The S * k candidates are merged with one ``top_k`` on d2 in shard
  order, so equal distances keep the lower global row exactly as the
  single-device running merge does, and the winners are re-sorted by their
  exact distance (stable). The candidates are [S, Q, k] -- the only data that
  crosses devices. Same results as the single-device index up to float
  near-ties: the d2 of a row may differ in the last bits when the chunk shapes
  differ, which can swap rows whose distances agree to ~1e-6. Compiled shapes:
  (query bucket, S * n, C, D, k, approx, recall_target, mesh); repeated calls
  never recompile.

  Args:
    queries: [Q, D] float32, replicated.
    chunks: [S * n, C, D] float32, sharded on "data" (from :func:`place`).
    sq_norms: [S * n, C] float32, sharded likewise.
    k, approx, recall_target: as in ``scan.scan_topk``.
    shard_rows: R, gallery rows per shard (global row = shard * R + local).
    mesh: the mesh the gallery lives on.

  Returns:
    (index [Q, k] int32 global gallery rows, dist [Q, k] float32 Euclidean,
    ascending; +inf past the gallery), replicated.
  """
  scan.count_trace()
  num_q = queries.shape[0]

  def per_shard(q, c, s):
    d2, local, exact = scan.scan_topk(q, c, s, k, approx=approx, recall_target=recall_target)
    # Local rows run over this shard's padded [n * C] layout; real rows are < R.
    base = jax.lax.axis_index(AXIS) * shard_rows
    return d2[None], (local + base)[None], exact[None]

  d2, rows, exact = jax.shard_map(
      per_shard, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
      out_specs=(P(AXIS), P(AXIS), P(AXIS)),
      # The scan's initial carry is built inside the body (not varying over
      # "data") while its output is; the per-shard code has no collectives.
      check_vma=False)(queries, chunks, sq_norms)   # [S, Q, k] each
  # Shard-major candidate order: on equal d2 top_k keeps the lower global row.
  flat = lambda a: jnp.moveaxis(a, 0, 1).reshape(num_q, -1)              # [Q, S * k]
  d2, rows, exact = flat(d2), flat(rows), flat(exact)
  neg, pick = jax.lax.top_k(-d2, k)
  rows = jnp.take_along_axis(rows, pick, axis=1)
  exact = jnp.where(jnp.isinf(neg), jnp.inf, jnp.take_along_axis(exact, pick, axis=1))
  order = jnp.argsort(exact, axis=1, stable=True)
  return jnp.take_along_axis(rows, order, axis=1), jnp.take_along_axis(exact, order, axis=1)
