"""Multi-process start-up: ``jax.distributed.initialize`` with clear errors.

Call :func:`initialize` before anything touches a device (``jax.devices()``,
creating an array): JAX fixes its backends at first use, and a process that
has already started them alone can no longer join a cluster.
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger(__name__)

MODES = ("off", "on", "auto")


class DistributedError(RuntimeError):
  """The process could not join (or was asked to join wrongly) a multi-process cluster."""


def initialize(mode: str = "off", *, coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, timeout_s: int = 300) -> bool:
  """Joins the multi-process cluster described by the arguments.

  Args:
    mode: ``"off"``: single process, nothing is done. ``"on"``: join a
      cluster; with ``coordinator_address`` (and ``num_processes``,
      ``process_id``) those are used, without, JAX detects them from the
      environment (Cloud TPU VM pod slices, SLURM, Open MPI,
      ``JAX_COORDINATOR_ADDRESS``...); failure is an error. ``"auto"``: like
      ``"on"`` when an address is given or the environment names a cluster,
      else a single process.
    coordinator_address: ``host:port`` of process 0's coordinator; ``""``
      lets JAX detect it.
    num_processes: processes in the cluster, > 0 with an explicit address;
      0 lets JAX detect it.
    process_id: this process's rank in ``[0, num_processes)``; -1 lets JAX
      detect it.
    timeout_s: seconds to wait for all processes to connect.

  On CPU the cross-process collectives are gloo's (TCP), the only
  implementation that needs no extra installation.

  Returns:
    Whether ``jax.distributed`` is initialized (now or before this call).

  Raises:
    ValueError: a bad argument, named.
    DistributedError: the cluster could not be joined (mode ``"on"``), with
      JAX's reason.
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode must be one of {', '.join(MODES)}, got {mode!r}")
  if mode == "off":
    if coordinator_address:
      raise ValueError(f"coordinator_address={coordinator_address!r} is given but "
                       "mode='off'; use mode='on' (or 'auto')")
    return False
  explicit = bool(coordinator_address)
  if explicit:
    if ":" not in coordinator_address:
      raise ValueError(f"coordinator_address={coordinator_address!r}: must be host:port")
    if num_processes < 1:
      raise ValueError(f"num_processes={num_processes}: an explicit coordinator_address "
                       "needs the number of processes (>= 1)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id}: must be in [0, {num_processes}) with "
                       "an explicit coordinator_address")
  elif num_processes or process_id >= 0:
    raise ValueError("num_processes/process_id need coordinator_address (leave all three "
                     "unset to let JAX detect the cluster)")
  if jax.distributed.is_initialized():
    return True
  try:
    # gloo is jax 0.10's default for CPU; set explicitly so an older default
    # ("none": no cross-process collectives on CPU) cannot silently apply.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception as e:  # an option this jax build does not know
    log.warning("could not select gloo CPU collectives: %s", e)
  kwargs = dict(initialization_timeout=int(timeout_s))
  if explicit:
    kwargs.update(coordinator_address=coordinator_address, num_processes=int(num_processes),
                  process_id=int(process_id))
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    # Raised before any state changes when nothing names a cluster.
    if mode == "auto" and not explicit and "coordinator_address" in str(e):
      return False
    raise DistributedError(
        f"jax.distributed.initialize failed: {e}. Outside a detected cluster pass "
        "coordinator_address='host:port', num_processes=N and process_id=I") from e
  except RuntimeError as e:
    if "before" in str(e) and "backend" in str(e).lower():
      raise DistributedError(
          "jax.distributed.initialize must run before JAX touches any device; "
          f"call it first thing in the program ({e})") from e
    raise DistributedError(f"jax.distributed.initialize failed: {e}") from e
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """Whether this process writes files and prints (process 0; True without a cluster)."""
  return jax.process_index() == 0
