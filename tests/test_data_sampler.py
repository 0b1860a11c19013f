"""Tests for jaxface.data.sampler.PKSampler."""

import numpy as np
import pytest

from jaxface.data.sampler import PKSampler


def _labels(counts, seed=0):
  """Labels with counts[i] images of identity i, in shuffled image order."""
  lab = np.repeat(np.arange(len(counts)), counts)
  return lab[np.random.default_rng(seed).permutation(lab.size)].astype(np.int32)


def _reference(labels, P, K, seed, step):
  """Slow, loop-based statement of the sampling rule the sampler documents."""
  bits = np.random.PCG64(np.random.SeedSequence([seed, step, 0x504B]))
  counts = np.bincount(labels)
  eligible = [i for i in range(counts.size) if counts[i] >= K]
  keys = bits.random_raw(len(eligible))
  chosen = [eligible[j] for j in sorted(range(len(eligible)), key=lambda j: (keys[j], j))][:P]
  members = [[j for j in range(labels.size) if labels[j] == i] for i in chosen]
  keys2 = iter(bits.random_raw(sum(len(m) for m in members)).tolist())
  out = []
  for m in members:
    k = [next(keys2) for _ in m]
    out += [m[j] for j in sorted(range(len(m)), key=lambda j: (k[j], j))][:K]
  return np.array(out)


def test_batch_structure():
  labels = _labels([5, 2, 7, 3, 9, 1, 4])
  s = PKSampler(labels, P=3, K=3, seed=7)
  for step in range(20):
    idx = s.batch_indices(step)
    assert idx.dtype == np.int64 and idx.shape == (9,)
    lab = labels[idx].reshape(3, 3)
    assert (lab == lab[:, :1]).all()  # identity-major
    assert len(set(lab[:, 0])) == 3  # P distinct identities
    assert all(len(set(row)) == 3 for row in idx.reshape(3, 3))  # K distinct images
    assert not set(lab[:, 0]) & {1, 5}  # identities with < K images never drawn
    np.testing.assert_array_equal(s.batch_labels(step), labels[idx])
  assert s.batch_size == 9
  np.testing.assert_array_equal(s.eligible, [0, 2, 3, 4, 6])


def test_matches_loop_reference():
  labels = _labels([5, 2, 7, 3, 9, 1, 4, 6], seed=1)
  s = PKSampler(labels, P=4, K=2, seed=11)
  for step in (0, 1, 2, 99, 12345):
    np.testing.assert_array_equal(s.batch_indices(step), _reference(labels, 4, 2, 11, step))


def test_pure_function_of_seed_and_step():
  labels = _labels([6] * 12)
  a = PKSampler(labels, P=4, K=3, seed=5)
  b = PKSampler(labels, P=4, K=3, seed=5)
  forward = [a.batch_indices(t) for t in range(10)]
  backward = [b.batch_indices(t) for t in reversed(range(10))][::-1]
  for x, y in zip(forward, backward):
    np.testing.assert_array_equal(x, y)
  assert len({tuple(x) for x in forward}) == 10  # steps differ
  other = PKSampler(labels, P=4, K=3, seed=6)
  assert not np.array_equal(other.batch_indices(0), forward[0])


def test_sampling_is_uniform():
  # 10 identities with 8 images; P=2, K=2 over 4000 steps. Each identity is drawn with
  # probability P/10 = 0.2 per step (800 expected, binomial sd 25.3); each image with
  # probability 0.2 * K/8 = 0.05 (200 expected, sd 13.8). Bounds at 6 sd.
  counts = [8] * 10
  labels = _labels(counts, seed=2)
  s = PKSampler(labels, P=2, K=2, seed=0)
  idx = np.stack([s.batch_indices(t) for t in range(4000)])
  id_hits = np.bincount(labels[idx[:, ::2]].ravel(), minlength=10)
  assert np.abs(id_hits - 800).max() < 6 * 25.3
  img_hits = np.bincount(idx.ravel(), minlength=labels.size)
  assert np.abs(img_hits - 200).max() < 6 * 13.8


@pytest.mark.parametrize("kwargs, match", [
    (dict(P=4, K=3), r"P=4 identities with at least K=3 images .* only 3 of 5"),
    (dict(P=0, K=1), "P must be a positive integer"),
    (dict(P=2, K=1.5), "K must be a positive integer"),
    (dict(P=2, K=1, seed=-1), "seed must be a non-negative integer"),
])
def test_validation(kwargs, match):
  labels = _labels([3, 3, 2, 5, 1])
  kwargs.setdefault("seed", 0)
  with pytest.raises(ValueError, match=match):
    PKSampler(labels, **kwargs)


def test_bad_labels_and_steps():
  with pytest.raises(ValueError, match="labels must be a 1-D integer array"):
    PKSampler(np.zeros((2, 2), np.int32), P=1, K=1, seed=0)
  with pytest.raises(ValueError, match="labels must be non-negative"):
    PKSampler(np.array([0, -1]), P=1, K=1, seed=0)
  s = PKSampler(np.array([0, 0, 1, 1]), P=2, K=2, seed=0)
  with pytest.raises(ValueError, match="step must be a non-negative integer"):
    s.batch_indices(-1)
