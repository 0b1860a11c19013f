"""Tests for the gallery sharded over devices (jaxface.recognition.sharded_search).

The sharded cases run in one subprocess with four forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax
is imported); it writes its results to an npz, and the comparisons with the
NumPy brute force and with the single-device index happen here.
"""

from __future__ import annotations

import json
import sys

import _forced_devices  # tests/: the forced-devices subprocess runner
import numpy as np
import pytest

DEVICES = 4
RECALL_TARGET = 0.95

# (name, rows, dim, chunk, k, shards): ragged shards, k > rows per shard, empty shards.
CASES = [
    ("ragged", 1037, 16, 256, 5, 4),        # 260 rows per shard, the last has 257; 2 chunks each
    ("k_over_shard", 1037, 16, 100, 300, 4),  # k = 300 > 260 rows per shard and > 256-row chunks
    ("tiny", 5, 8, 65536, 8, 4),            # shards of 2, 2, 1, 0 rows; k > M
    ("three", 700, 16, 128, 7, 3),          # 3 of the 4 devices
    ("one", 300, 16, 128, 4, 1),            # a mesh of one device
]


def _unit(n, dim, seed):
  x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _inputs(name, m, dim):
  g = _unit(m, dim, seed=m + dim)
  q = _unit(11, dim, seed=7)
  q[0] = g[m // 2]                              # an exact match, distance 0
  return g, q


def _ties():
  base = _unit(300, 16, seed=1)
  g = np.concatenate([base, base, base])        # rows j, j + 300, j + 600 equal: other shards
  q = np.concatenate([base[:5], base[:5] + 1e-3 * _unit(5, 16, seed=3)])
  return g, q


def _recall_data():
  return _unit(100_000, 32, seed=5), _unit(64, 32, seed=6)


def _worker(out_path):
  """Runs with 4 host devices: every sharded result into one npz."""
  import jax

  from jaxface.parallel import mesh as mesh_lib
  from jaxface.recognition import search, sharded_search
  assert len(jax.devices()) == DEVICES, jax.devices()
  out, info = {}, {}
  for name, m, dim, chunk, k, shards in CASES:
    g, q = _inputs(name, m, dim)
    index = search.SearchIndex(g, np.arange(m), chunk=chunk, devices=jax.devices()[:shards])
    out[f"{name}_i"], out[f"{name}_d"] = index.search(q, k)
    info[f"{name}_spec"] = str(index._chunks.sharding.spec)          # noqa: SLF001
    info[f"{name}_shards"] = len(index._chunks.sharding.device_set)  # noqa: SLF001
  g, q = _ties()
  index = search.SearchIndex(g, np.arange(900), chunk=128, devices=jax.devices())
  out["ties_i"], out["ties_d"] = index.search(q, 3)
  # No recompile for new query batches in the same bucket (16 rows); jit == eager.
  count = search.trace_count
  index.search(_unit(12, 16, seed=9), 3)
  index.identify(_unit(9, 16, seed=10), k=3, threshold=0.5)
  info["retraced"] = search.trace_count - count
  block = np.concatenate([q[:8]])
  jit_i, jit_d = sharded_search.sharded_kernel(
      jax.device_put(block, mesh_lib.replicated(index.mesh)), index._chunks,  # noqa: SLF001
      index._sq_norms, k=3, approx=False, recall_target=0.95, shard_rows=index._shard_rows,  # noqa: SLF001
      mesh=index.mesh)
  with jax.disable_jit():
    eager_i, eager_d = sharded_search.sharded_kernel(
        block, index._chunks, index._sq_norms, k=3, approx=False, recall_target=0.95,  # noqa: SLF001
        shard_rows=index._shard_rows, mesh=index.mesh)                                # noqa: SLF001
  info["jit_eq_eager_rows"] = bool((np.asarray(jit_i) == np.asarray(eager_i)).all())
  info["jit_eager_max_d"] = float(np.abs(np.asarray(jit_d) - np.asarray(eager_d)).max())
  # approx_max_k per chunk against the exact sharded search.
  g, q = _recall_data()
  exact = search.SearchIndex(g, np.arange(len(g)), devices=jax.devices())
  approx = search.SearchIndex(g, np.arange(len(g)), devices=jax.devices(), approx=True,
                              recall_target=RECALL_TARGET)
  out["recall_exact_i"], _ = exact.search(q, 5)
  out["recall_approx_i"], out["recall_approx_d"] = approx.search(q, 5)
  info["platform"] = jax.devices()[0].platform
  np.savez(out_path, **out)
  with open(out_path + ".json", "w") as f:
    json.dump(info, f)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sharded") / "out.npz")
  return _forced_devices.run_worker(__file__, path, DEVICES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sharded_equals_brute_force_and_single_device(sharded, case):
  from jaxface.recognition import search
  out, info = sharded
  name, m, dim, chunk, k, shards = case
  assert info[f"{name}_shards"] == shards and "data" in info[f"{name}_spec"]
  g, q = _inputs(name, m, dim)
  index, dist = out[f"{name}_i"], out[f"{name}_d"]
  single_i, single_d = search.SearchIndex(g, np.arange(m), chunk=chunk).search(q, k)
  np.testing.assert_array_equal(index, single_i)
  np.testing.assert_allclose(dist, single_d, atol=1e-6, rtol=0)
  ref_i, ref_d = search.brute_force(q, g, k)
  finite = np.isfinite(ref_d)
  assert (np.isinf(dist) == ~finite).all() and (index[~finite] == -1).all()
  np.testing.assert_allclose(dist[finite], ref_d[finite], atol=2e-6, rtol=0)
  # Random unit vectors: the reference's neighbours are separated far beyond float noise.
  np.testing.assert_array_equal(index, ref_i)
  assert index[0, 0] == m // 2 and dist[0, 0] == 0.0


def test_sharded_ties_go_to_the_lower_row_across_shards(sharded):
  out, _ = sharded
  index, dist = out["ties_i"], out["ties_d"]
  for r in range(10):
    j = r % 5
    assert index[r].tolist() == [j, j + 300, j + 600]
    assert dist[r, 0] == dist[r, 1] == dist[r, 2]


def test_sharded_no_recompile_and_jit_equals_eager(sharded):
  _, info = sharded
  assert info["retraced"] == 0
  assert info["jit_eq_eager_rows"] and info["jit_eager_max_d"] <= 1e-6


def test_approx_recall_meets_its_target(sharded):
  out, info = sharded
  exact, approx = out["recall_exact_i"], out["recall_approx_i"]
  recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx, exact)])
  assert recall >= RECALL_TARGET
  if info["platform"] in ("cpu", "gpu", "cuda"):
    # Documented: off TPU, JAX lowers approx_max_k to an exact sort.
    assert recall == 1.0
  # Distances of approximate winners are still exact.
  g, q = _recall_data()
  ref = np.sqrt(((q[:, None, :].astype(np.float64) - g[approx]) ** 2).sum(-1))
  np.testing.assert_allclose(out["recall_approx_d"], ref, atol=2e-6)


def test_bad_devices_and_approx_arguments():
  from jaxface.recognition import search
  g = _unit(10, 8, seed=0)
  with pytest.raises(ValueError, match="devices: expected at least one"):
    search.SearchIndex(g, np.arange(10), devices=[])
  with pytest.raises(ValueError, match="devices: expected jax devices"):
    search.SearchIndex(g, np.arange(10), devices=["cpu:0"])
  import jax
  with pytest.raises(ValueError, match="listed twice"):
    search.SearchIndex(g, np.arange(10), devices=[jax.devices()[0]] * 2)
  with pytest.raises(ValueError, match="recall_target"):
    search.SearchIndex(g, np.arange(10), approx=True, recall_target=0.0)
  with pytest.raises(ValueError, match="approx"):
    search.identify(g[:1], g, np.arange(10), threshold=0.6, approx="yes")


def test_single_device_approx_option_matches_exact():
  import jax

  from jaxface.recognition import search
  if jax.devices()[0].platform == "tpu":
    pytest.skip("on TPU approx_max_k is approximate by design")
  g = _unit(2000, 16, seed=2)
  q = _unit(9, 16, seed=3)
  ei, ed = search.SearchIndex(g, np.arange(2000), chunk=512).search(q, 6)
  ai, ad = search.SearchIndex(g, np.arange(2000), chunk=512, approx=True).search(q, 6)
  np.testing.assert_array_equal(ai, ei)      # CPU: approx_max_k lowers to an exact sort
  np.testing.assert_allclose(ad, ed, atol=1e-6)


if __name__ == "__main__":
  _worker(sys.argv[1])
