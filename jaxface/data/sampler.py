"""P x K batch sampler whose batches are a pure function of (seed, step).

A resumed run only needs the step number to reproduce its data stream: the
sampler keeps no state between calls. Randomness comes from raw PCG64 words of
a ``SeedSequence([seed, step])``, both of whose algorithms NumPy documents as
stable, and selection is done by sorting random keys (not by ``Generator``
methods, whose algorithms NumPy may change between versions).
"""

from __future__ import annotations

import numpy as np

# Separates this sampler's streams from other users of SeedSequence([seed, step]).
_STREAM_TAG = 0x504B  # "PK"


class PKSampler:
  """Draws batches of P distinct identities with K distinct images each.

  Only identities with at least K images are ever drawn.

  Args:
    labels: [N] integer identity label per image (``source.labels``).
    P: identities per batch, >= 1.
    K: images per identity, >= 1.
    seed: non-negative integer seed.
  """

  def __init__(self, labels, P: int, K: int, seed: int):
    lab = np.asarray(labels)
    if lab.ndim != 1 or (lab.size and not np.issubdtype(lab.dtype, np.integer)):
      raise ValueError(f"labels must be a 1-D integer array, got shape {lab.shape} dtype {lab.dtype}")
    if lab.size and lab.min() < 0:
      raise ValueError(f"labels must be non-negative, got min {lab.min()}")
    for name, v in (("P", P), ("K", K)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    self.labels = lab.astype(np.int64)
    self.P, self.K, self.seed = int(P), int(K), int(seed)
    counts = np.bincount(self.labels) if lab.size else np.zeros(0, np.int64)
    self.eligible = np.flatnonzero(counts >= self.K)
    if self.eligible.size < self.P:
      raise ValueError(
          f"PKSampler needs P={self.P} identities with at least K={self.K} images each, "
          f"but only {self.eligible.size} of {counts.size} identities have that many")
    # Image indices grouped by identity: members of identity i are
    # _by_label[_start[i]:_start[i] + counts[i]], in index order.
    self._by_label = np.argsort(self.labels, kind="stable")
    self._start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    self._count = counts.astype(np.int64)

  @property
  def batch_size(self) -> int:
    return self.P * self.K

  def _raw_words(self, step: int) -> np.random.PCG64:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return np.random.PCG64(np.random.SeedSequence([self.seed, int(step), _STREAM_TAG]))

  def batch_indices(self, step: int) -> np.ndarray:
    """Image indices of the batch at ``step``.

    Returns:
      [P * K] int64, identity-major: entries ``p*K .. p*K + K - 1`` are K
      distinct images of the p-th drawn identity; the P identities are distinct.
    """
    bits = self._raw_words(step)
    id_keys = bits.random_raw(self.eligible.size)
    ids = self.eligible[np.argsort(id_keys, kind="stable")[: self.P]]
    counts = self._count[ids]
    # Every image of the drawn identities, tagged with its slot p.
    slot = np.repeat(np.arange(self.P), counts)
    seg_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(slot.size) - seg_start[slot]
    members = self._by_label[self._start[ids][slot] + pos]
    img_keys = bits.random_raw(members.size)
    # Sort by slot, then by random key, and keep the first K of each slot.
    order = np.lexsort((img_keys, slot))
    keep = (np.arange(order.size) - seg_start[slot[order]]) < self.K
    return members[order[keep]].astype(np.int64)

  def batch_labels(self, step: int) -> np.ndarray:
    """Labels of the batch at ``step``. [P * K] int32."""
    return self.labels[self.batch_indices(step)].astype(np.int32)
