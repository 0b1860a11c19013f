"""A batch of content images sharded over several devices (``--num_devices``).

Style transfer optimises B independent images with one vmapped step
(:func:`jaxface.style.transfer.make_step`). With ``num_devices`` = N > 1
the batch axis is split over a one-axis ``("data",)`` mesh of the first N
devices: ``state["image"] [B, H, W, 3]``, every leaf of the per-image
optimizer state ``[B, ...]`` and the content activations ``[B, h, w, c]``
are sharded on "data" (B / N images per device); the VGG weights, their
input-gradient kernels, the style Grams and the scalar counters are
replicated. The step itself is unchanged (the same pure function, jitted
with these shardings as its output layout and the state donated): each
device runs the vmapped step on its own images and nothing but the
batch-mean metrics and the all-finite flag crosses devices.

B must be a multiple of N: a clear ValueError says so before any compute
(padding the batch with dummy images would spend device time on images
nobody asked for and change the batch-mean metrics).

Each image's result does not depend on N beyond float rounding (a device
convolves B / N images instead of B, which may pick other kernels); a run
resumed with the same N is bitwise the uninterrupted one.

Several processes (``jax.distributed``, e.g. the hosts of a TPU pod slice):
the mesh spans every device of every process (``--num_devices=0``), so each
process's devices hold a contiguous block of B / processes images. Every
process loads all the (small) content and style images and computes the same
host values; arrays are placed with ``jax.make_array_from_callback``, which
transfers only the shards on the process's own devices (``jax.device_put``
onto such a sharding first checks, with a cross-process gather of the whole
value, that all processes passed equal data; and refuses committed arrays).
Images are brought back to the host with :func:`to_host` (a collective: every
process must call it).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["make_mesh", "batch_sharding", "replicated", "place_state", "place_consts", "place",
           "jit_step", "state_shardings", "describe", "to_host"]

AXIS = "data"


def make_mesh(num_devices: int, batch: int) -> Mesh | None:
  """The ``("data",)`` mesh for ``num_devices`` (0 = all), or None for one device.

  With several processes (``jax.distributed``) the devices are those of all
  processes and the mesh must use every one of them.

  Raises:
    ValueError: more devices asked for than present, a subset of the devices
      in a multi-process run, or ``batch`` (content images) not a multiple of
      the device count.
  """
  available = jax.devices()  # every process's devices, grouped by process
  if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) \
      or num_devices < 0:
    raise ValueError(f"--num_devices={num_devices!r}: expected an int >= 0 (0 = all devices)")
  n = len(available) if num_devices == 0 else int(num_devices)
  if n > len(available):
    raise ValueError(f"--num_devices={num_devices}: only {len(available)} "
                     f"{available[0].platform} device(s) are available")
  if jax.process_count() > 1 and n != len(available):
    raise ValueError(
        f"--num_devices={num_devices}: a run of {jax.process_count()} processes splits the batch "
        f"over all {len(available)} devices of all processes; pass --num_devices=0")
  if batch % n:
    raise ValueError(
        f"--num_devices={num_devices}: the batch of {batch} content image(s) does not split evenly "
        f"over {n} devices; give a number of content images that is a multiple of {n}, or a "
        f"--num_devices that divides {batch}")
  if n == 1:
    return None
  return Mesh(np.array(available[:n]), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``"data"``."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def _shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
  return batch_sharding(mesh), replicated(mesh)


def state_shardings(mesh: Mesh) -> dict:
  """Sharding prefix tree of the run state (``transfer.new_state``'s keys)."""
  batch, rep = _shardings(mesh)
  return {"image": batch, "opt_state": batch, "step": rep, "scale_index": rep, "seed": rep,
          "bad_step": rep}


def place(x, sharding: NamedSharding) -> jax.Array:
  """One array (host or device) laid out as ``sharding``.

  One process: ``jax.device_put``. Several: an array already spread over the
  processes is kept (same sharding) or resharded by XLA; a host or
  process-local array, whose whole value every process holds, goes through
  ``jax.make_array_from_callback`` so each process places only its own shards.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.sharding == sharding:
      return x
    return jax.jit(_identity, out_shardings=sharding)(x)  # every process calls: a collective
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _identity(x):
  return x


def place_state(state: dict, mesh: Mesh | None) -> dict:
  """``state`` with images and optimizer state split over the batch; unchanged when mesh is None."""
  if mesh is None:
    return state
  shard = state_shardings(mesh)
  return {key: jax.tree.map(lambda x, s=shard[key]: place(x, s), value)
          for key, value in state.items()}


def place_consts(consts: dict, mesh: Mesh | None) -> dict:
  """Step constants: content activations ``[B, h, w, c]`` split over the batch, the rest replicated."""
  if mesh is None:
    return consts
  batch, rep = _shardings(mesh)
  return {key: jax.tree.map(lambda x, s=(batch if key == "content" else rep): place(x, s), value)
          for key, value in consts.items()}


def to_host(x) -> np.ndarray:
  """The whole value of ``x`` as a NumPy array, on every process.

  An array spread over several processes cannot be ``jax.device_get``; it is
  gathered with ``multihost_utils.process_allgather``, a collective that every
  process must call (in the same order).
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def jit_step(step: Callable, mesh: Mesh) -> Callable:
  """Jits ``transfer.make_step(..., jit=False)`` for the mesh: state donated, the output
  state kept in the same layout as :func:`place_state` (so the next call reuses the
  compile), metrics replicated."""
  _, rep = _shardings(mesh)
  return jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings(mesh), rep))


def describe(mesh: Mesh | None) -> str:
  """For the start-up line: where the batch runs."""
  if mesh is None:
    return "1 device"
  d = mesh.devices.flat[0]
  procs = len({dev.process_index for dev in mesh.devices.flat})
  where = f" in {procs} processes" if procs > 1 else ""
  return f"batch sharded over {mesh.devices.size} {d.platform} devices{where}"
