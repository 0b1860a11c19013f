"""Tests for chunked 1:K identification and 1:1 verification (jaxface.recognition.search)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxface.recognition import search


def _unit(n, dim=128, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ref_distances(q, g):
  """Slow obviously-correct reference: every pair by a Python-level loop over queries."""
  q64, g64 = q.astype(np.float64), g.astype(np.float64)
  return np.stack([np.sqrt(((g64 - row) ** 2).sum(1)) for row in q64])


def _assert_matches_reference(index, dist, q, g, k, gap=1e-5):
  ref_d = _ref_distances(q, g)
  ref_i, ref_sorted = search.brute_force(q, g, k)
  finite = np.isfinite(ref_sorted)
  assert (np.isinf(dist) == ~finite).all() and (index[~finite] == -1).all()
  np.testing.assert_allclose(dist[finite], ref_sorted[finite], atol=2e-6, rtol=0)
  # Returned distances are the exact distances of the returned rows.
  rows = np.nonzero(finite)
  np.testing.assert_allclose(dist[rows], ref_d[rows[0], index[rows]], atol=2e-6, rtol=0)
  # Rows must agree wherever the reference's neighbours are separated by more
  # than float32 noise (genuine near-ties may swap).
  full = np.sort(ref_d, axis=1)
  nxt = np.concatenate([full[:, 1:], np.full((full.shape[0], 1), np.inf)], axis=1)[:, :k]
  prv = np.concatenate([np.full((full.shape[0], 1), -np.inf), full[:, :-1]], axis=1)[:, :k]
  pad = k - min(k, g.shape[0])
  nxt = np.pad(nxt, ((0, 0), (0, pad)), constant_values=np.inf)
  prv = np.pad(prv, ((0, 0), (0, pad)), constant_values=-np.inf)
  with np.errstate(invalid="ignore"):  # inf - inf past the gallery: not "clear"
    clear = finite & (nxt - ref_sorted > gap) & (ref_sorted - prv > gap)
  np.testing.assert_array_equal(index[clear], ref_i[clear])


@pytest.mark.parametrize("m,chunk,k", [
    (1037, 256, 5),     # several chunks, last one padded
    (1037, 100, 300),   # k larger than a chunk (chunk rounds up to 256 rows)
    (40, 65536, 64),    # k > M: -1 / inf padding
    (512, 256, 1),      # M a multiple of the chunk
])
def test_identify_matches_numpy_brute_force(m, chunk, k):
  g = _unit(m, seed=m)
  q = _unit(13, seed=99)
  q[0] = g[m // 2]           # an exact match: distance 0, first
  index, dist = search.SearchIndex(g, np.arange(m) * 10, chunk=chunk).search(q, k)
  assert index.shape == (13, k) and dist.shape == (13, k) and dist.dtype == np.float32
  _assert_matches_reference(index, dist, q, g, k)
  assert index[0, 0] == m // 2 and dist[0, 0] == 0.0
  for row in dist:
    assert (np.diff(row[np.isfinite(row)]) >= 0).all()


def test_ties_go_to_the_lower_row_across_chunks():
  base = _unit(300, seed=1)
  g = np.concatenate([base, base, base])     # every vector three times, in different chunks
  q = np.concatenate([base[:5], base[:5] + 1e-3 * _unit(5, seed=3)])
  index, dist = search.SearchIndex(g, np.arange(900), chunk=256).search(q, 3)
  for r in range(10):
    j = r % 5
    assert index[r].tolist() == [j, j + 300, j + 600]
    assert dist[r, 0] == dist[r, 1] == dist[r, 2]


def test_identify_decisions_scalar_and_per_row_thresholds():
  g = _unit(6, dim=8, seed=2)
  ids = np.array([7, 7, 8, 9, 9, 10])
  far = _unit(1, dim=8, seed=5)[0]
  q = np.stack([g[0] + 0.01 * far, g[2] + 0.3 * far, g[5] + 0.5 * far])
  out = search.identify(q, g, ids, k=2, threshold=0.2)
  ref = _ref_distances(q, g)
  np.testing.assert_allclose(out["best_distance"], ref.min(1), atol=2e-6)
  expect = np.where(ref.min(1) <= 0.2, ids[ref.argmin(1)], -1)
  assert out["best_id"].tolist() == expect.tolist() == [7, -1, -1]
  np.testing.assert_array_equal(out["ids"], ids[np.argsort(ref, axis=1)[:, :2]])
  np.testing.assert_array_equal(out["index"], np.argsort(ref, axis=1)[:, :2])
  # per-row thresholds: loosen identity 8 only
  thr = np.where(ids == 8, 0.4, 0.2).astype(np.float32)
  out = search.identify(q, g, ids, k=2, threshold=thr)
  assert out["best_id"].tolist() == [7, 8, -1]
  np.testing.assert_allclose(out["threshold"], [0.2, 0.4, 0.2])
  # the boundary is inclusive: distance == threshold is "same"
  d0 = float(out["best_distance"][0])
  assert search.identify(q[:1], g, ids, k=1, threshold=d0)["best_id"].tolist() == [7]


def test_jit_equals_eager_and_no_recompile():
  g = _unit(700, dim=16, seed=4)
  index = search.SearchIndex(g, np.arange(700), chunk=256)
  q = _unit(5, dim=16, seed=6)
  i1, d1 = index.search(q, 4)
  count = search.trace_count
  i2, d2 = index.search(_unit(7, dim=16, seed=7), 4)      # same query bucket (8), new values
  index.identify(_unit(3, dim=16, seed=8), k=4, threshold=0.5)
  assert search.trace_count == count
  padded = np.concatenate([q, np.zeros((3, 16), np.float32)])
  with jax.disable_jit():
    ei, ed = search._search_kernel(padded, index._chunks, index._sq_norms, 4)
  np.testing.assert_array_equal(np.asarray(ei)[:5], i1)
  np.testing.assert_allclose(np.asarray(ed)[:5], d1, atol=1e-6)


def test_verify_single_and_batch():
  claimed = _unit(3, dim=32, seed=10)
  q = _unit(4, dim=32, seed=11)
  q[1] = claimed[2]
  ref = _ref_distances(q, claimed).min(1)
  same, dist, thr = search.verify(q, claimed, 0.9)
  np.testing.assert_allclose(dist, ref, atol=1e-6)
  assert same.tolist() == (ref <= 0.9).tolist() and thr == pytest.approx(0.9)
  s1, d1, t1 = search.verify(q[1], claimed, 0.6)
  assert s1 is True and d1 == 0.0 and t1 == pytest.approx(0.6)
  s0, d0, _ = search.verify(q[0], claimed, 0.6)
  assert isinstance(s0, bool) and d0 == pytest.approx(ref[0], abs=1e-6) and s0 == (ref[0] <= 0.6)


def test_errors_name_the_input():
  g = _unit(10, dim=8)
  ids = np.arange(10)
  with pytest.raises(ValueError, match="gallery is empty"):
    search.identify(_unit(1, dim=8), np.zeros((0, 8), np.float32), np.zeros(0, int), threshold=0.6)
  with pytest.raises(ValueError, match="queries.*16 dimensions"):
    search.identify(_unit(1, dim=16), g, ids, threshold=0.6)
  with pytest.raises(ValueError, match="queries.*NaN"):
    search.identify(np.full((1, 8), np.nan, np.float32), g, ids, threshold=0.6)
  with pytest.raises(ValueError, match="gallery_ids"):
    search.identify(_unit(1, dim=8), g, ids[:5], threshold=0.6)
  with pytest.raises(ValueError, match="k:"):
    search.identify(_unit(1, dim=8), g, ids, k=0, threshold=0.6)
  with pytest.raises(ValueError, match="threshold"):
    search.identify(_unit(1, dim=8), g, ids, threshold=np.ones(3))
  with pytest.raises(ValueError, match="threshold"):
    search.identify(_unit(1, dim=8), g, ids, threshold=-1.0)
  with pytest.raises(ValueError, match="chunk"):
    search.SearchIndex(g, ids, chunk=0)
  with pytest.raises(ValueError, match="claimed_embs"):
    search.verify(_unit(1, dim=8)[0], np.zeros((0, 8), np.float32), 0.6)


def test_distinct_candidates_against_loop_reference():
  rng = np.random.default_rng(0)
  ids = rng.integers(-1, 4, size=(20, 8))
  dist = np.sort(rng.random((20, 8)), axis=1)
  out_i, out_d = search.distinct_candidates(ids, dist, 3)
  for r in range(20):
    seen, want_i, want_d = set(), [], []
    for c in range(8):
      if ids[r, c] >= 0 and ids[r, c] not in seen and len(want_i) < 3:
        seen.add(ids[r, c])
        want_i.append(ids[r, c])
        want_d.append(dist[r, c])
    want_i += [-1] * (3 - len(want_i))
    want_d += [np.inf] * (3 - len(want_d))
    assert out_i[r].tolist() == want_i
    np.testing.assert_array_equal(out_d[r], want_d)


def test_many_queries_are_searched_in_blocks(monkeypatch):
  monkeypatch.setattr(search, "_MAX_QUERY_BLOCK", 8)
  g = _unit(300, dim=16, seed=12)
  q = _unit(21, dim=16, seed=13)               # blocks of 8, 8 and 5 (padded to 8)
  index, dist = search.SearchIndex(g, np.arange(300), chunk=128).search(q, 3)
  assert index.shape == (21, 3)
  _assert_matches_reference(index, dist, q, g, 3)
