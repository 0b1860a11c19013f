"""A 1-D data-parallel mesh and the arrays that live on it.

The batch axis of every training array is split over the mesh axis
``"data"``; parameters and optimizer state are replicated (every device holds
all of them). With several processes (``jax.distributed``) the mesh spans the
devices of all processes, in ``jax.devices()`` order, so each process's
devices hold a contiguous block of batch rows: :func:`process_rows` says which
rows a process must load, and :func:`global_batch` assembles the global array
from those rows without any process seeing the others' data.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh with axis ``"data"`` over the first ``num_devices`` global devices.

  Args:
    num_devices: 0 for every device of every process; else how many (a
      single process may use a subset; several processes must use all).

  Raises:
    ValueError: ``num_devices`` negative, larger than ``jax.device_count()``,
      or a subset in a multi-process run.
  """
  total = jax.device_count()
  if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) \
      or num_devices < 0:
    raise ValueError(f"num_devices must be an integer >= 0 (0: all), got {num_devices!r}")
  n = total if num_devices == 0 else int(num_devices)
  if n > total:
    raise ValueError(f"num_devices={n} but only {total} devices are visible "
                     f"({jax.devices()[0].platform}); on CPU, "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={n} makes more")
  if jax.process_count() > 1 and n != total:
    raise ValueError(f"num_devices={n}: a run of {jax.process_count()} processes uses all "
                     f"{total} devices (pass 0)")
  return Mesh(np.asarray(jax.devices()[:n]), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``"data"``, other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch(batch_size: int, mesh: Mesh, *, group: int = 1, what: str = "batch") -> None:
  """Checks that ``batch_size`` rows split evenly into whole ``group``-row blocks per device.

  Raises:
    ValueError: naming ``what``, the sizes and the device count.
  """
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{what} of {batch_size} rows does not split evenly over {n} devices")
  if (batch_size // n) % group:
    raise ValueError(f"{what} of {batch_size} rows gives {batch_size // n} rows per device, "
                     f"not a multiple of {group}")


def process_rows(mesh: Mesh, batch_size: int) -> slice:
  """The rows of a ``[batch_size, ...]`` batch-sharded array held by this process's devices.

  They are one contiguous block because the mesh lists each process's
  devices together (``jax.devices()`` order).

  Raises:
    ValueError: the rows do not split evenly, or this process's rows are not contiguous.
  """
  check_batch(batch_size, mesh)
  index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  starts = sorted({idx[0].indices(batch_size)[0] for idx in index_map.values()})
  per = batch_size // mesh.devices.size
  if starts != list(range(starts[0], starts[0] + per * len(starts), per)):
    raise ValueError(f"this process's devices hold non-contiguous batch rows {starts}")
  return slice(starts[0], starts[0] + per * len(starts))


def global_batch(mesh: Mesh, local: Any, batch_size: int) -> Any:
  """Assembles batch-sharded global arrays from this process's rows.

  Args:
    mesh: the data mesh.
    local: pytree of host arrays ``[rows, ...]`` holding rows
      ``process_rows(mesh, batch_size)`` of the global batch.
    batch_size: global rows.

  Returns:
    The same pytree of ``[batch_size, ...]`` ``jax.Array`` sharded on ``"data"``.
  """
  sharding = batch_sharding(mesh)
  rows = process_rows(mesh, batch_size)
  n_local = rows.stop - rows.start

  def leaf(x):
    x = np.asarray(x)
    if x.shape[0] != n_local:
      raise ValueError(f"this process holds rows {rows.start}..{rows.stop - 1} of the global "
                       f"batch ({n_local} rows), got an array of {x.shape[0]} rows")
    return jax.make_array_from_process_local_data(sharding, x, (batch_size,) + x.shape[1:])

  return jax.tree.map(leaf, local)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies every array leaf of ``tree`` to every device of ``mesh``.

  Every process must pass equal values (e.g. built from the same seed): each
  process provides the copies on its own devices.
  """
  sharding = replicated(mesh)

  def leaf(x):
    if not isinstance(x, (jax.Array, np.ndarray)):
      return x
    host = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, host, host.shape)

  return jax.tree.map(leaf, tree)


def to_local(tree: Any) -> Any:
  """Replicated (possibly multi-process) arrays -> arrays on one local device.

  For work each process does alone on small data (evaluation): the local
  copy is a view of the first addressable shard, no communication.

  Raises:
    ValueError: a leaf is not fully replicated.
  """
  def leaf(x):
    if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
      return x
    if not x.is_fully_replicated:
      raise ValueError(f"to_local needs replicated arrays, got sharding {x.sharding}")
    return x.addressable_data(0)

  return jax.tree.map(leaf, tree)
