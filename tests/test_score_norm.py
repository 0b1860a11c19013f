"""Cohort S-norm against a float64 NumPy brute force."""

import jax
import numpy as np
import pytest

from jaxface import score_norm


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


# ---- S-norm for 1:K identification (snorm_matrix, snorm_identify)


def _ref_snorm_matrix(q, g, c, top_k=0):
  mq, sq = _ref_stats(q, c, top_k)
  mg, sg = _ref_stats(g, c, top_k)
  q64, g64 = q.astype(np.float64), g.astype(np.float64)
  out = np.empty((len(q), len(g)))
  for a in range(len(q)):
    for b in range(len(g)):
      d = np.sum((q64[a] - g64[b]) ** 2)
      out[a, b] = 0.5 * ((d - mq[a]) / sq[a] + (d - mg[b]) / sg[b])
  return out


def _id_data(seed=4):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(13, 8)).astype(np.float32), rng.normal(size=(9, 8)).astype(np.float32),
          rng.normal(size=(30, 8)).astype(np.float32))


@pytest.mark.parametrize("top_k", [0, 5])
def test_snorm_matrix_matches_loop(top_k):
  q, g, c = _id_data()
  got = score_norm.snorm_matrix(q, g, c, top_k=top_k)
  assert got.shape == (13, 9) and got.dtype == np.float32
  # Scores are O(1) differences of O(10) values: float32 cancellation ~1e-5 absolute.
  np.testing.assert_allclose(got, _ref_snorm_matrix(q, g, c, top_k), rtol=1e-4, atol=2e-5)
  # Precomputed gallery statistics give the same scores.
  stats = score_norm.cohort_stats(g, c, top_k=top_k)
  np.testing.assert_array_equal(score_norm.snorm_matrix(q, g, c, top_k=top_k, gallery_stats=stats), got)
  # Consistent with the pairwise snorm.
  mq, sq = score_norm.cohort_stats(q, c, top_k=top_k)
  i, j = np.meshgrid(np.arange(13), np.arange(9), indexing="ij")
  d = ((q[i.ravel()] - g[j.ravel()]) ** 2).sum(1)
  pair = score_norm.snorm(d, mq[i.ravel()], sq[i.ravel()], stats[0][j.ravel()], stats[1][j.ravel()])
  np.testing.assert_allclose(np.asarray(got).ravel(), pair, rtol=1e-5, atol=1e-5)


def test_snorm_matrix_chunked_equals_whole(monkeypatch):
  q, g, c = _id_data()
  whole = score_norm.snorm_matrix(q, g, c)
  monkeypatch.setattr(score_norm, "_CHUNK_ELEMENTS", 4 * g.shape[0] * g.shape[1])  # 13 = 3 * 4 + 1
  np.testing.assert_allclose(score_norm.snorm_matrix(q, g, c), whole, rtol=1e-6, atol=1e-6)


def _ref_identify(q, g, ids, c, k, thr):
  s = _ref_snorm_matrix(q, g, c)
  order = np.argsort(s, axis=1, kind="stable")[:, :k]
  sc = np.take_along_axis(s, order, axis=1)
  best = np.where(sc[:, 0] <= thr, ids[order[:, 0]], -1)
  return order, sc, best


def test_snorm_identify_matches_loop_and_search_keys():
  from jaxface.recognition import search
  q, g, c = _id_data()
  ids = np.array([5, 5, 7, 8, 9, 10, 11, 12, 13])
  ref_order, ref_sc, _ = _ref_identify(q, g, ids, c, 3, 0.0)
  thr = float(np.median(ref_sc[:, 0]))  # about half the queries recognized
  r = score_norm.snorm_identify(q, g, ids, c, k=3, threshold=thr)
  want = search.identify(q, g, ids, k=3, threshold=0.6)
  assert set(want) <= set(r) and {"scores", "best_score"} <= set(r)
  np.testing.assert_array_equal(r["index"], ref_order)
  np.testing.assert_array_equal(r["ids"], ids[ref_order])
  np.testing.assert_allclose(r["scores"], ref_sc, rtol=1e-4, atol=2e-5)
  assert r["distances"] is r["scores"]
  accepted = ref_sc[:, 0] <= thr
  assert 0 < accepted.sum() < len(q)
  np.testing.assert_array_equal(r["best_id"], np.where(accepted, ids[ref_order[:, 0]], -1))
  np.testing.assert_array_equal(r["best_distance"], r["scores"][:, 0])
  assert r["threshold"].shape == (13,) and np.all(r["threshold"] == np.float32(thr))
  # Per-row thresholds: a very loose one on row 0 only.
  per_row = np.full(9, -100.0)
  per_row[0] = 100.0
  r2 = score_norm.snorm_identify(q, g, ids, c, k=3, threshold=per_row)
  np.testing.assert_array_equal(r2["best_id"], np.where(ref_order[:, 0] == 0, 5, -1))


def test_snorm_identify_k_beyond_gallery_pads():
  q, g, c = _id_data()
  r = score_norm.snorm_identify(q, g[:2], np.array([1, 2]), c, k=4, threshold=0.0)
  assert r["ids"].shape == (13, 4)
  assert np.all(r["ids"][:, 2:] == -1) and np.all(np.isinf(r["scores"][:, 2:]))
  assert np.all(r["index"][:, 2:] == -1) and np.all(np.isfinite(r["scores"][:, :2]))


def test_snorm_identify_jit_equals_eager_and_no_recompile():
  q, g, c = _id_data()
  ids = np.arange(9)
  stats = score_norm.cohort_stats(g, c)
  jitted = score_norm.snorm_identify(q, g, ids, c, k=3, threshold=0.0, gallery_stats=stats)
  with jax.disable_jit():
    eager = score_norm.snorm_identify(q, g, ids, c, k=3, threshold=0.0, gallery_stats=stats)
  np.testing.assert_array_equal(jitted["index"], eager["index"])
  np.testing.assert_allclose(jitted["scores"], eager["scores"], rtol=1e-5, atol=1e-5)
  score_norm.snorm_matrix(q, g, c, gallery_stats=stats)
  before = (score_norm._snorm_topk_block._cache_size(), score_norm._snorm_block._cache_size())
  q2 = np.random.default_rng(11).normal(size=q.shape).astype(np.float32)
  score_norm.snorm_identify(q2, g, ids, c, k=3, threshold=0.5, gallery_stats=stats)
  score_norm.snorm_matrix(q2, g, c, gallery_stats=stats)
  assert (score_norm._snorm_topk_block._cache_size(), score_norm._snorm_block._cache_size()) == before


@pytest.mark.parametrize("kwargs,match", [
    ({"k": 0}, "k: expected"),
    ({"threshold": float("nan")}, "threshold"),
    ({"threshold": np.zeros(3)}, r"threshold.*\[9\]"),
    ({"gallery_ids": np.zeros(8, int)}, "gallery_ids"),
    ({"gallery_stats": (np.zeros(8, np.float32), np.ones(8, np.float32))}, "gallery_stats"),
])
def test_snorm_identify_errors(kwargs, match):
  q, g, c = _id_data()
  args = {"k": 2, "threshold": 0.0, "gallery_ids": np.arange(9)}
  args.update(kwargs)
  ids = args.pop("gallery_ids")
  with pytest.raises(ValueError, match=match):
    score_norm.snorm_identify(q, g, ids, c, **args)
