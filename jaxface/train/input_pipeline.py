"""Host-side training batches: the sampler's P x K rows, loaded one step ahead in a thread."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from jaxface.data import source as source_lib
from jaxface.data.sampler import PKSampler


class Batches:
  """``get(step) -> {"images", "labels"}``, the batch of ``step``; decoding overlaps compute.

  The batch of a step is a pure function of (sampler seed, step), so a
  resumed run loads exactly the batches an uninterrupted one does. With a
  mesh, this process loads only its rows of each global batch (the sampler
  gives every process the same global indices) and the rows are assembled
  into one batch-sharded global array. Use as a context manager (or
  :meth:`close`) to stop the loader thread.
  """

  def __init__(self, source: source_lib.ImageSource, sampler: PKSampler, mesh=None):
    self.source, self.sampler, self.mesh = source, sampler, mesh
    self.rows = slice(None)
    if mesh is not None:
      from jaxface import parallel
      self.rows = parallel.process_rows(mesh, sampler.batch_size)
    self.pool = ThreadPoolExecutor(max_workers=1)
    self.pending: dict[int, Future] = {}

  def _make(self, step: int) -> dict:
    idx = self.sampler.batch_indices(step)[self.rows]
    return {"images": self.source.get(idx), "labels": self.source.labels[idx].astype(np.int32)}

  def get(self, step: int) -> dict:
    fut = self.pending.pop(step, None)
    batch = fut.result() if fut is not None else self._make(step)
    self.pending[step + 1] = self.pool.submit(self._make, step + 1)
    if self.mesh is not None:
      from jaxface import parallel
      batch = parallel.global_batch(self.mesh, batch, self.sampler.batch_size)
    return batch

  def close(self) -> None:
    self.pool.shutdown(wait=False, cancel_futures=True)

  def __enter__(self) -> Batches:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
