r"""Benchmark: 1:K identify() queries/s against NumPy brute force, same run, same data.

For each gallery size (default 1e3, 1e5, 1e6 random unit vectors, 128-D float32)
and a batch of 256 random unit queries it times ``SearchIndex.identify`` (gallery
laid out on the device once, its build time printed apart; each call includes the
query and result transfers and the exact re-ranking) and two NumPy variants
(:func:`numpy_topk`); the speed-up is over the *faster* NumPy variant. Results are
checked against each other (top-1 rows agree; only float near-ties, counted, may
differ). Calls are timed by ``experiments.bench.timing.timed``.

  python -m experiments.bench.identify [--sizes=1000,100000,1000000] [--queries=256] [--min_time=2]
"""

from __future__ import annotations

import time

from absl import app, flags

from experiments import flagutil
from experiments.bench import timing

flags.DEFINE_list("sizes", ["1000", "100000", "1000000"], "gallery sizes (embeddings)")
flags.DEFINE_integer("queries", 256, "queries per identify() call", lower_bound=1)
flags.DEFINE_integer("dim", 128, "embedding length", lower_bound=1)
flags.DEFINE_integer("k", 5, "candidates per query", lower_bound=1)
flags.DEFINE_integer("chunk", 65536, "gallery rows per chunk (jaxface and NumPy chunked)", lower_bound=1)
flags.DEFINE_float("numpy_full_max_gb", 4.0, "largest [Q, M] float32 block for the NumPy full variant")
flags.DEFINE_float("min_time", 2.0, "seconds of timed calls per configuration (after the first)")
flags.DEFINE_integer("min_reps", 3, "at least this many timed calls per configuration")
flags.DEFINE_integer("seed", 0, "random seed")
FLAGS = flags.FLAGS


def _unit(rng, n: int, dim: int):
  import numpy as np
  out = np.empty((n, dim), np.float32)
  step = 1 << 18  # bounded float64 temporaries
  for lo in range(0, n, step):
    x = rng.standard_normal((min(step, n - lo), dim), dtype=np.float32)
    out[lo:lo + step] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def numpy_topk(queries, gallery, g_sq, k: int, chunk: int | None):
  """NumPy brute force: (rows [Q, k], Euclidean distances [Q, k]), ascending.

  ``chunk=None`` ("NumPy full") does one [Q, M] matmul + argpartition, run only when the
  [Q, M] float32 block fits in ``--numpy_full_max_gb`` (the fastest NumPy when memory
  allows); otherwise ("NumPy chunked") the same algorithm as jaxface on the host: norm
  expansion, one matmul per chunk of ``--chunk`` rows, argpartition top-k, running merge.
  """
  import numpy as np
  q_sq = np.einsum("qd,qd->q", queries, queries)[:, None]
  m = gallery.shape[0]
  step = m if chunk is None else chunk
  best_d = np.full((queries.shape[0], 0), np.inf, np.float32)
  best_i = np.zeros((queries.shape[0], 0), np.int64)
  for lo in range(0, m, step):
    d2 = q_sq - 2.0 * (queries @ gallery[lo:lo + step].T) + g_sq[None, lo:lo + step]
    kk = min(k, d2.shape[1])
    part = np.argpartition(d2, kk - 1, axis=1)[:, :kk] if kk < d2.shape[1] else \
        np.broadcast_to(np.arange(d2.shape[1]), d2.shape)
    cand_d = np.concatenate([best_d, np.take_along_axis(d2, part, axis=1)], axis=1)
    cand_i = np.concatenate([best_i, part + lo], axis=1)
    keep = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
    best_d = np.take_along_axis(cand_d, keep, axis=1)
    best_i = np.take_along_axis(cand_i, keep, axis=1)
  return best_i, np.sqrt(np.maximum(best_d, 0.0))


def _peak_mb(dev) -> str:
  """Peak device memory so far (GPU/TPU allocators report it; CPU does not)."""
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if not stats or "peak_bytes_in_use" not in stats:
    return "n/a"
  return f"{stats['peak_bytes_in_use'] / 2**20:.0f}"


def main(argv):
  if len(argv) > 1:
    flagutil.fail(f"unexpected arguments: {argv[1:]}")
  flagutil.tune_cpu_xla()
  import jax
  import numpy as np

  from jaxface.recognition import search

  try:
    sizes = [int(float(s)) for s in FLAGS.sizes]
  except ValueError:
    flagutil.fail(f"--sizes: expected integers, got {FLAGS.sizes}")
  if any(s < 1 for s in sizes):
    flagutil.fail(f"--sizes: every size must be >= 1, got {sizes}")
  rng = np.random.default_rng(FLAGS.seed)
  queries = _unit(rng, FLAGS.queries, FLAGS.dim)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}); numpy {np.__version__}; "
        f"{FLAGS.queries} queries x {FLAGS.dim}-D, k={FLAGS.k}, chunk={FLAGS.chunk}, "
        f"median of >= {FLAGS.min_reps} calls / {FLAGS.min_time:g} s")
  header = (f"{'gallery':>9s} {'build s':>8s} {'first s':>8s} {'jaxface q/s':>12s} "
            f"{'np chunked q/s':>15s} {'np full q/s':>12s} {'speed-up':>9s} {'top-1 agree':>12s} "
            f"{'peak dev MB':>12s}")
  print(header)
  for m in sizes:
    gallery = _unit(rng, m, FLAGS.dim)
    ids = np.arange(m)
    t = time.perf_counter()
    index = search.SearchIndex(gallery, ids, chunk=FLAGS.chunk)
    jax.block_until_ready(index._chunks)  # noqa: SLF001 -- the build includes the device copy
    build = time.perf_counter() - t
    out, first, jx_t = timing.timed(lambda: index.identify(queries, k=FLAGS.k, threshold=0.6),
                              FLAGS.min_time, FLAGS.min_reps)
    jx_i, jx_d = out["index"], out["distances"]
    g_sq = np.einsum("md,md->m", gallery, gallery)
    (np_i, np_d), _, np_chunk_t = timing.timed(
        lambda: numpy_topk(queries, gallery, g_sq, FLAGS.k, FLAGS.chunk), FLAGS.min_time, FLAGS.min_reps)
    np_full_t = None
    if FLAGS.queries * m * 4 / 2**30 <= FLAGS.numpy_full_max_gb:
      _, _, np_full_t = timing.timed(lambda: numpy_topk(queries, gallery, g_sq, FLAGS.k, None),
                               FLAGS.min_time, FLAGS.min_reps)
    # Agreement: top-1 rows equal, or a float near-tie between the two answers.
    agree = jx_i[:, 0] == np_i[:, 0]
    near_tie = np.abs(jx_d[:, 0] - np_d[:, 0]) <= 1e-5
    if not (agree | near_tie).all():
      raise SystemExit(f"gallery {m}: jaxface and NumPy disagree on {(~(agree | near_tie)).sum()} "
                       f"queries beyond float noise")
    best_np = min(t for t in (np_chunk_t, np_full_t) if t is not None)
    q = FLAGS.queries
    full = f"{q / np_full_t:12.0f}" if np_full_t else f"{'(skipped)':>12s}"
    print(f"{m:9d} {build:8.2f} {first:8.2f} {q / jx_t:12.0f} {q / np_chunk_t:15.0f} {full} "
          f"{best_np / jx_t:8.1f}x {int(agree.sum()):>5d}/{q:<6d} {_peak_mb(dev):>12s}", flush=True)
    index = gallery = g_sq = None  # frees them before the next size (lambdas above read them)


if __name__ == "__main__":
  app.run(main, flags_parser=flagutil.parse_flags_exit2)
