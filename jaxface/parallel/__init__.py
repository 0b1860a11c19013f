"""Data parallelism over JAX device meshes, on one host or many.

``mesh``: the one 1-D ``("data",)`` mesh module (training, style transfer and
the sharded search use it): device-selection policies, batch and replicated
shardings, and moving arrays on and off the mesh, including assembly of a
global batch from the rows each process loads. ``distributed``: a thin,
checked wrapper around ``jax.distributed.initialize`` for multi-process runs
(TPU pod slices, GPU clusters, or several CPU processes on one machine for
tests).
"""

from jaxface.parallel.distributed import DistributedError, initialize, is_primary
from jaxface.parallel.mesh import (
  DATA,
  batch_sharding,
  check_batch,
  describe,
  global_batch,
  make_mesh,
  mesh_over,
  place,
  process_rows,
  replicate,
  replicated,
  select_devices,
  split_mesh,
  to_host,
  to_local,
)

__all__ = ["DATA", "DistributedError", "batch_sharding", "check_batch", "describe", "global_batch",
           "initialize", "is_primary", "make_mesh", "mesh_over", "place", "process_rows",
           "replicate", "replicated", "select_devices", "split_mesh", "to_host", "to_local"]
