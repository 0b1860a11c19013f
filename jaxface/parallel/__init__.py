"""Data parallelism over JAX device meshes, on one host or many.

``mesh``: a 1-D ``("data",)`` mesh over the (global) devices, batch and
replicated shardings, and assembly of a global batch from the rows each
process loads. ``distributed``: a thin, checked wrapper around
``jax.distributed.initialize`` for multi-process runs (TPU pod slices, GPU
clusters, or several CPU processes on one machine for tests).
"""

from jaxface.parallel.distributed import DistributedError, initialize, is_primary
from jaxface.parallel.mesh import (DATA, batch_sharding, check_batch, global_batch, make_mesh,
                                   process_rows, replicate, replicated, to_local)

__all__ = ["DATA", "DistributedError", "batch_sharding", "check_batch", "global_batch",
           "initialize", "is_primary", "make_mesh", "process_rows", "replicate", "replicated",
           "to_local"]
