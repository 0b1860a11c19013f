r"""Benchmark of `jaxface.losses.triplet_loss` (time and peak memory).

Usage:
  python -m experiments.bench.triplet_loss [--max_b=2048] [--repeats=5] [--nonaive] [--notorch]

For each batch size B = min_b, 2 * min_b, ..., max_b (P x K batches of unit-norm
[B, --dim] float32 embeddings) and each strategy, it times the jitted
`value_and_grad` of jaxface's `triplet_loss` (O(B^2 * K) time, O(B^2) memory),
the naive [B, B, B] formulation and PyTorch's batch-all (optional: the `bench`
extra), each in a fresh subprocess. Ratios are naive / jaxface and torch /
jaxface (> 1: jaxface is faster).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

NAIVE_STRATEGIES = ("all", "all_active", "semihard")
TORCH_STRATEGIES = ("all", "all_active")
# Bytes per (anchor, positive, negative) element the naive formulation keeps
# alive at peak (values, masks, gradient): the measured peak RSS per element
# (BUILD.md, "Triplet loss") with ~25% headroom on top.
NAIVE_BYTES_PER_TRIPLET = {"all": 6, "all_active": 10, "semihard": 12}
TORCH_HINT = "pip install torch==2.13.0"


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def _peak_rss_mb() -> float:
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _inputs(b: int, dim: int, k: int, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, dim))
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  y = np.repeat(np.arange(b // k), k).astype(np.int32)
  rng.shuffle(y)
  return x, y


# ------------------------------------------------------------ naive (B^3)


def _naive_loss(x, y, margin: float, strategy: str):
  """Triplet loss through the full [B, B, B] (anchor, positive, negative) tensor (reference only).

  Skipped, with the estimated need printed, where the estimate exceeds
  --naive_max_gb (default: half of MemAvailable at start). Not run for "hard":
  batch-hard is naturally O(B^2), so its naive form is the implementation itself.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  sq = jnp.sum(x * x, axis=1)
  d = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
  b = y.shape[0]
  same = y[:, None] == y[None, :]
  pos = same & ~jnp.eye(b, dtype=bool)
  valid = pos[:, :, None] & ~same[:, None, :]
  gap = d[:, :, None] - d[:, None, :] + margin
  l3 = jnp.where(valid, jax.nn.relu(gap), 0.0)
  if strategy == "all":
    return jnp.sum(l3) / jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
  if strategy == "all_active":
    n = jnp.sum(valid & (gap > 0), dtype=jnp.float32)
    return jnp.sum(l3) / jnp.maximum(n, 1.0)
  # semihard: nearest negative in (d_ap, d_ap + margin), else the easiest.
  window = valid & (d[:, None, :] > d[:, :, None]) & (gap > 0)
  nearest = jnp.min(jnp.where(window, d[:, None, :], jnp.inf), axis=2)
  easiest = jnp.max(jnp.where(~same, d, -jnp.inf), axis=1)
  sel = jnp.where(jnp.any(window, axis=2), nearest, easiest[:, None])
  ok = pos & jnp.any(~same, axis=1)[:, None]
  per_pair = jnp.where(ok, jax.nn.relu(d - jnp.where(ok, sel, 0.0) + margin),
                       0.0)
  return jnp.sum(per_pair) / jnp.maximum(jnp.sum(ok, dtype=jnp.float32), 1.0)


def _naive_need_gb(b: int, strategy: str) -> float:
  return NAIVE_BYTES_PER_TRIPLET[strategy] * float(b) ** 3 / 2**30


# ------------------------------------------------------------------ torch


def _torch_batch_all(x, y, margin: float, strategy: str):
  """Batch-all triplet loss in PyTorch: same offset algorithm, autograd."""
  import torch  # pylint: disable=g-import-not-at-top

  y, order = torch.sort(y, stable=True)
  x = x[order]
  b = x.shape[0]
  sq = (x * x).sum(1)
  d = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)
  eye = torch.eye(b, dtype=torch.bool)
  d = torch.where(eye, torch.zeros((), dtype=d.dtype), d)
  start = torch.searchsorted(y, y, right=False)
  count = torch.searchsorted(y, y, right=True) - start
  neg = y[:, None] != y[None, :]
  has_neg = count < b
  idx = torch.arange(b)
  total = d.new_zeros(())
  n_active = 0
  for k in range(1, int(count.max())):
    partner = start + (idx - start + k) % count
    valid = (k < count) & has_neg
    l = torch.relu(d[idx, partner][:, None] - d + margin)
    l = l * (neg & valid[:, None])
    total = total + l.sum()
    n_active += int((l > 0).sum())
  n_valid = float(((count - 1) * (b - count)).sum())
  den = n_valid if strategy == "all" else float(n_active)
  return total / max(den, 1.0)


# ----------------------------------------------------------------- worker


def _worker(impl: str, strategy: str, b: int, args) -> dict:
  """Runs one configuration in this (fresh) process; returns the record.

  Timing: median wall time of --repeats calls after the compiling call and one
  more warm-up call, each ending in `block_until_ready` (PyTorch: after
  `backward()` returns). Peak memory: this process's
  `resource.getrusage(RUSAGE_SELF).ru_maxrss` (peak resident set size: arrays,
  XLA compilation and the runtime) just before exiting; JAX offers no memory
  statistics on CPU (`memory_stats()` is None), so RSS is the only reliable
  figure. The baseline (imports plus input arrays, no computation) is recorded
  so it can be subtracted.
  """
  x_np, y_np = _inputs(b, args.dim, args.k)
  if impl == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    if args.threads > 0:
      torch.set_num_threads(args.threads)
    x0 = torch.from_numpy(x_np)
    y = torch.from_numpy(y_np).long()
    base = _rss_mb()

    def call():
      x = x0.clone().requires_grad_(True)
      loss = _torch_batch_all(x, y, args.margin, strategy)
      loss.backward()
      return float(loss.detach()), x.grad
  else:
    import jax  # pylint: disable=g-import-not-at-top

    from jaxface.losses import triplet_loss  # pylint: disable=g-import-not-at-top
    x = jax.device_put(x_np)
    y = jax.device_put(y_np)
    base = _rss_mb()
    if impl == "jaxface":
      fn = lambda e, l: triplet_loss(e, l, margin=args.margin,
                                     strategy=strategy)[0]
    else:
      fn = lambda e, l: _naive_loss(e, l, args.margin, strategy)
    step = jax.jit(jax.value_and_grad(fn))

    def call():
      loss, grad = jax.block_until_ready(step(x, y))
      return float(loss), grad

  t0 = time.perf_counter()
  loss, _ = call()
  first_s = time.perf_counter() - t0
  if args.repeats > 1:
    call()  # second warm-up: allocator and thread pools settle
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return {
      "impl": impl, "strategy": strategy, "b": b, "loss": loss,
      "first_s": first_s, "median_s": statistics.median(times),
      "base_mb": base, "peak_mb": _peak_rss_mb(),
  }


def _run_child(impl: str, strategy: str, b: int, args) -> dict:
  """Runs one (implementation, strategy, B) in a fresh subprocess; returns its record.

  --threads (default 1) caps both frameworks (OMP_NUM_THREADS and
  torch.set_num_threads for PyTorch; XLA_FLAGS intra-op threads for JAX): on a
  shared machine PyTorch's OpenMP barriers collapse when the cores are
  oversubscribed (BUILD.md, "Triplet loss"), which would make the comparison
  meaningless; --threads 0 keeps each library's default.
  """
  cmd = [sys.executable, "-m", "experiments.bench.triplet_loss",
         f"--worker={impl}:{strategy}:{b}", f"--repeats={args.repeats}",
         f"--dim={args.dim}", f"--k={args.k}", f"--margin={args.margin}",
         f"--threads={args.threads}"]
  env = dict(os.environ)
  if args.threads > 0:
    n = str(args.threads)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = n
    xla = f"--xla_cpu_multi_thread_eigen={str(args.threads > 1).lower()} "
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla
                        + f"intra_op_parallelism_threads={n}").strip()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        env=env)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}


# ------------------------------------------------------------------- main


def _mem_available_gb() -> float:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) / 2**20
  return 8.0


def _torch_available() -> bool:
  try:
    import torch  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _fmt_ms(rec: dict | None) -> str:
  if rec is None:
    return "-"
  if "skip" in rec:
    return rec["skip"]
  if "error" in rec:
    return "error"
  return f"{rec['median_s'] * 1e3:.1f}"


def _fmt_mb(rec: dict | None) -> str:
  if rec is None or "median_s" not in rec:
    return "-"
  return f"{rec['peak_mb']:.0f}"


def _ratio(rec: dict | None, ref: dict) -> str:
  if rec is None or "median_s" not in rec or "median_s" not in ref:
    return "-"
  return f"{rec['median_s'] / ref['median_s']:.1f}x"


def _check(rec: dict | None, ref: dict) -> str:
  """|loss - loss_jaxface| / |loss_jaxface| on identical inputs: a guard that the compared
  programs compute the same loss."""
  if rec is None or "loss" not in rec or "loss" not in ref:
    return "-"
  return f"{abs(rec['loss'] - ref['loss']) / max(abs(ref['loss']), 1e-12):.0e}"


flags.DEFINE_integer("min_b", 128, "smallest batch size", lower_bound=1)
flags.DEFINE_integer("max_b", 2048, "largest batch size (powers of two from --min_b)", lower_bound=1)
flags.DEFINE_list("strategies", None, "strategies to time (default: every one of "
                  "jaxface.losses.STRATEGIES)")
flags.DEFINE_integer("repeats", 5, "timed calls per configuration", lower_bound=1)
flags.DEFINE_integer("dim", 128, "embedding length", lower_bound=1)
flags.DEFINE_integer("k", 4, "images per identity", lower_bound=1)
flags.DEFINE_float("margin", 0.2, "triplet margin")
flags.DEFINE_integer("threads", 1, "CPU threads per framework; 0: library defaults", lower_bound=0)
flags.DEFINE_float("naive_max_gb", None, "skip naive runs estimated above this (default: half "
                   "of MemAvailable)")
flags.DEFINE_bool("naive", True, "time the naive [B, B, B] formulation")
flags.DEFINE_bool("torch", True, "time PyTorch when it is installed")
flags.DEFINE_string("worker", "", "internal: run one IMPL:STRATEGY:B configuration, print JSON")
FLAGS = flags.FLAGS


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  if args.worker:
    impl, strategy, b = args.worker.split(":")
    print(json.dumps(_worker(impl, strategy, int(b), args)), flush=True)
    return

  from jaxface.losses.triplet import STRATEGIES  # the loss owns them (imports JAX: after parsing)
  strategies = [s for s in (args.strategies or STRATEGIES) if s]
  bad = [s for s in strategies if s not in STRATEGIES]
  if bad:
    raise app.UsageError(f"--strategies: unknown {bad}, expected {STRATEGIES}")
  sizes = []
  b = args.min_b
  while b <= args.max_b:
    sizes.append(b)
    b *= 2
  if not sizes or any(s % args.k for s in sizes):
    raise app.UsageError(f"--min_b/--max_b: need sizes divisible by --k={args.k}")
  naive_max = (args.naive_max_gb if args.naive_max_gb is not None
               else 0.5 * _mem_available_gb())
  use_torch = args.torch and _torch_available()
  print(f"triplet_loss benchmark: D={args.dim}, K={args.k} per identity, "
        f"margin={args.margin}, median of {args.repeats} jitted "
        f"value_and_grad calls, threads={args.threads or 'default'}, "
        f"cpus={os.cpu_count()}")
  if args.torch and not use_torch:
    print(f"PyTorch not installed: torch columns skipped ({TORCH_HINT}).")
  print(f"naive B^3 runs limited to an estimated {naive_max:.1f} GB.")

  baselines = {}
  header = (f"{'B':>5} {'strategy':<10} | {'jax ms':>8} {'peak MB':>7} | "
            f"{'naive ms':>24} {'peak MB':>7} {'naive/jax':>9} {'check':>6} | "
            f"{'torch ms':>8} {'peak MB':>7} {'torch/jax':>9} {'check':>6}")
  print(header)
  print("-" * len(header))
  for b in sizes:
    for strategy in strategies:
      ours = _run_child("jaxface", strategy, b, args)
      naive = None
      if args.naive and strategy in NAIVE_STRATEGIES:
        need = _naive_need_gb(b, strategy)
        if need > naive_max:
          naive = {"skip": f"skipped (needs {need:.0f} GB)"}
        else:
          naive = _run_child("naive", strategy, b, args)
      torch_rec = None
      if use_torch and strategy in TORCH_STRATEGIES:
        torch_rec = _run_child("torch", strategy, b, args)
      for name, rec in (("jax", ours), ("torch", torch_rec)):
        if rec and "base_mb" in rec:
          baselines.setdefault(name, rec["base_mb"])
      if "error" in ours:
        print(f"{b:>5} {strategy:<10} | error: {ours['error']}")
        continue
      print(f"{b:>5} {strategy:<10} | {_fmt_ms(ours):>8} {_fmt_mb(ours):>7} | "
            f"{_fmt_ms(naive):>24} {_fmt_mb(naive):>7} "
            f"{_ratio(naive, ours):>9} {_check(naive, ours):>6} | "
            f"{_fmt_ms(torch_rec):>8} {_fmt_mb(torch_rec):>7} "
            f"{_ratio(torch_rec, ours):>9} {_check(torch_rec, ours):>6}",
            flush=True)
      for rec in (naive, torch_rec):
        if rec and "error" in rec:
          print(f"      {rec['error']}")
  print("baseline RSS before any computation (imports + inputs), MB: "
        + ", ".join(f"{k} {v:.0f}" for k, v in baselines.items()))


if __name__ == "__main__":
  from experiments import flagutil as _flagutil
  app.run(main, flags_parser=_flagutil.parse_flags_exit2)
