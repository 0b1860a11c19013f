"""The one 1-D ``("data",)`` device mesh and the arrays that live on it.

Used by training, style transfer and the sharded gallery search. The batch
axis of every batch array is split over the mesh axis ``"data"``; parameters
and other constants are replicated. With several processes the mesh spans the
devices of all of them (see :func:`process_rows`, :func:`global_batch`).
Errors name the Python parameters (``num_devices``, ``devices``), not flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def select_devices(num_devices: int = 0) -> list:
  """The first ``num_devices`` devices of ``jax.devices()`` (0 = all, of every process).

  Raises:
    ValueError: ``num_devices`` not an integer >= 0, larger than the number of
      devices, or a subset in a multi-process run (each process must hold
      part of the batch).
  """
  available = jax.devices()  # every process's devices, grouped by process
  total = len(available)
  if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) \
      or num_devices < 0:
    raise ValueError(f"num_devices must be an integer >= 0 (0: all), got {num_devices!r}")
  n = total if num_devices == 0 else int(num_devices)
  if n > total:
    raise ValueError(f"num_devices={n} but only {total} devices are visible "
                     f"({available[0].platform}); on CPU, "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={n} makes more")
  if jax.process_count() > 1 and n != total:
    raise ValueError(f"num_devices={n}: a run of {jax.process_count()} processes splits the batch "
                     f"over all {total} devices of all processes; pass num_devices=0")
  return list(available[:n])


def mesh_over(devices: Sequence[Any]) -> Mesh:
  """A ``("data",)`` mesh over ``devices`` (distinct jax devices, at least one), in that order.

  Raises:
    ValueError: naming ``devices``: not a sequence of jax devices, empty, or
      with a device listed twice.
  """
  try:
    devs = list(devices)
  except TypeError:
    raise ValueError(f"devices: expected a sequence of jax devices, got {devices!r}") from None
  if not devs:
    raise ValueError("devices: expected at least one device, got an empty sequence")
  if not all(isinstance(d, jax.Device) for d in devs):
    raise ValueError(f"devices: expected jax devices (e.g. jax.devices()), got {devs!r}")
  if len({d.id for d in devs}) != len(devs):
    raise ValueError(f"devices: a device is listed twice: {devs}")
  return Mesh(np.array(devs), (DATA,))


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh with axis ``"data"`` over the first ``num_devices`` global devices.

  The training policy: always a mesh, one device included (compare
  :func:`split_mesh`, None for one device, and :func:`mesh_over`, an explicit
  device list as the search takes).

  Args:
    num_devices: 0 for every device of every process; else how many (a
      single process may use a subset; several processes must use all).

  Raises:
    ValueError: see :func:`select_devices`.
  """
  return mesh_over(select_devices(num_devices))


def split_mesh(num_devices: int, batch: int, *, what: str = "item(s)") -> Mesh | None:
  """The mesh that splits a batch of ``batch`` rows over ``num_devices`` (0 = all), or None
  for one device.

  Checked before any compute: padding the batch would spend device time on
  rows nobody asked for (and change batch means).

  Args:
    num_devices: as in :func:`select_devices`.
    batch: rows of the batch to split.
    what: what a row is, for the error message ("content image(s)").

  Raises:
    ValueError: see :func:`select_devices`; or ``batch`` not a multiple of the
      device count.
  """
  devices = select_devices(num_devices)
  n = len(devices)
  if batch % n:
    raise ValueError(
        f"num_devices={num_devices}: the batch of {batch} {what} does not split evenly over "
        f"{n} devices; give a batch that is a multiple of {n}, or a num_devices that divides "
        f"{batch}")
  return None if n == 1 else mesh_over(devices)


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
  devices together (``jax.devices()`` order), so each process loads only
  these rows (see :func:`global_batch`).

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
  """Assembles batch-sharded global arrays from this process's rows, without any
  process seeing the others' data.

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


def place(x: Any, sharding: NamedSharding) -> jax.Array:
  """One array (host or device), whose whole value every process holds, laid out as ``sharding``.

  One process: ``jax.device_put``. Several: an array already spread over the
  processes is kept (same sharding) or resharded by XLA (a collective: every
  process calls it); a host or process-local array goes through
  ``jax.make_array_from_callback``, so each process places only its own
  shards (``jax.device_put`` onto such a sharding would first gather the whole
  value from every process to check they agree, and refuses committed arrays).
  """
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.sharding == sharding:
      return x
    return jax.jit(_identity, out_shardings=sharding)(x)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _identity(x):
  return x


def to_host(x: Any) -> np.ndarray:
  """The whole value of ``x`` as a NumPy array, on every process.

  An array spread over several processes cannot be ``jax.device_get``; it is
  gathered with ``multihost_utils.process_allgather``, a collective that every
  process must call (in the same order).
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def describe(mesh: Mesh | None) -> str:
  """For a start-up line: where a batch runs ("1 device", "batch sharded over 4 cpu devices")."""
  if mesh is None:
    return "1 device"
  d = mesh.devices.flat[0]
  procs = len({dev.process_index for dev in mesh.devices.flat})
  where = f" in {procs} processes" if procs > 1 else ""
  return f"batch sharded over {mesh.devices.size} {d.platform} devices{where}"


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
