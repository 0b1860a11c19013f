"""Cohort S-norm against a float64 NumPy brute force."""

import jax
import numpy as np
import pytest

from jaxface.recognition import score_norm


def _data(n=23, m=41, d=8, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)).astype(np.float32),
          rng.normal(size=(m, d)).astype(np.float32))


def _ref_stats(p, c, top_k=0):
  p, c = p.astype(np.float64), c.astype(np.float64)
  mean, std = np.empty(len(p)), np.empty(len(p))
  for r in range(len(p)):
    d = np.array([np.sum((p[r] - c[k]) ** 2) for k in range(len(c))])
    if top_k:
      d = np.sort(d)[:top_k]
    mean[r], std[r] = d.mean(), d.std()
  return mean, std


# float32 distances of O(10) from float32 inputs: relative error ~1e-6 per
# value; the mean/std of <= 41 of them stay well inside 1e-5.
@pytest.mark.parametrize("top_k", [0, 2, 7, 41])
def test_cohort_stats_match_brute_force(top_k):
  p, c = _data()
  mean, std = score_norm.cohort_stats(p, c, top_k=top_k)
  assert mean.shape == std.shape == (23,) and mean.dtype == np.float32
  want_mean, want_std = _ref_stats(p, c, top_k)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-5)
  np.testing.assert_allclose(std, want_std, rtol=1e-5, atol=1e-6)


def test_top_k_of_whole_cohort_equals_all():
  p, c = _data()
  a = score_norm.cohort_stats(p, c, top_k=0)
  b = score_norm.cohort_stats(p, c, top_k=c.shape[0])
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  np.testing.assert_allclose(a[1], b[1], rtol=1e-5)


def test_chunking_with_a_ragged_last_chunk_changes_nothing(monkeypatch):
  p, c = _data(n=23)
  whole = score_norm.cohort_stats(p, c, top_k=5)
  # 3 probes per chunk: 23 = 7 * 3 + 2, so the last chunk is padded.
  monkeypatch.setattr(score_norm, "_CHUNK_ELEMENTS", 3 * c.shape[0] * c.shape[1])
  chunked = score_norm.cohort_stats(p, c, top_k=5)
  # Another block shape may vectorise the sums differently: 1 ulp apart.
  np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-6)
  np.testing.assert_allclose(whole[1], chunked[1], rtol=1e-5)


def test_identical_probe_and_cohort_row_gives_exact_zero_nearest():
  p, c = _data(n=4, m=6)
  c[2] = p[1]
  mean, std = score_norm.cohort_stats(p, c, top_k=2)
  d = np.sort(((p[1].astype(np.float64) - c.astype(np.float64)) ** 2).sum(1))[:2]
  assert d[0] == 0.0
  np.testing.assert_allclose(mean[1], d.mean(), rtol=1e-6)


def test_snorm_matches_formula_and_is_symmetric():
  rng = np.random.default_rng(3)
  d, mi, si, mj, sj = (rng.uniform(0.1, 3.0, size=50) for _ in range(5))
  got = score_norm.snorm(d, mi, si, mj, sj)
  want = 0.5 * ((d - mi) / si + (d - mj) / sj)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got, score_norm.snorm(d, mj, sj, mi, si))


def test_snorm_is_invariant_to_scaling_the_embedding_space():
  # Distances scale by c^2, and so do the cohort mean and std: the normalised
  # score is unchanged. This is what makes scores of different encoders addable.
  p, c = _data()
  i, j = np.triu_indices(p.shape[0], 1)

  def scores(scale):
    ps, cs = p * scale, c * scale
    m, s = score_norm.cohort_stats(ps, cs)
    d = ((ps[i] - ps[j]) ** 2).sum(1)
    return np.asarray(score_norm.snorm(d, m[i], s[i], m[j], s[j]))

  np.testing.assert_allclose(scores(1.0), scores(7.5), rtol=1e-4, atol=1e-5)


def test_snorm_std_floor_keeps_scores_finite():
  out = score_norm.snorm(np.array([1.0]), np.array([1.0]), np.array([0.0]),
                         np.array([0.5]), np.array([1.0]))
  assert np.all(np.isfinite(out))


def test_jit_equals_eager_and_no_recompile():
  p, c = _data()
  jitted = score_norm.cohort_stats(p, c, top_k=4)
  with jax.disable_jit():
    eager = score_norm.cohort_stats(p, c, top_k=4)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
  np.testing.assert_allclose(jitted[1], eager[1], rtol=1e-5)
  before = score_norm._stats_chunk._cache_size()
  p2, _ = _data(seed=9)
  score_norm.cohort_stats(p2, c, top_k=4)
  assert score_norm._stats_chunk._cache_size() == before


@pytest.mark.parametrize("probes,cohort,top_k,match", [
    (np.zeros((3, 4)), np.zeros((1, 4)), 0, "at least 2 rows"),
    (np.zeros((3, 4)), np.zeros((5, 3)), 0, "dimension 4 but cohort has 3"),
    (np.full((3, 4), np.nan), np.zeros((5, 4)), 0, "probes: contains NaN"),
    (np.zeros((3, 4)), np.zeros((5, 4)), 6, "top_k"),
    (np.zeros((3, 4)), np.zeros((5, 4)), 1, "top_k"),
    (np.zeros((3, 4)), np.zeros((5, 4)), True, "top_k"),
    (np.zeros((3,)), np.zeros((5, 4)), 0, "probes: expected a non-empty 2-D"),
    (np.zeros((3, 4)), np.zeros((0, 4)), 0, "cohort: expected a non-empty 2-D"),
])
def test_bad_input_names_itself(probes, cohort, top_k, match):
  with pytest.raises(ValueError, match=match):
    score_norm.cohort_stats(probes, cohort, top_k=top_k)
