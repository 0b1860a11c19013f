"""Smoke runs of the CPU benchmark scripts in experiments/bench at tiny sizes.

Benchmarks are not timed tests: these only check that each script still runs
end to end and prints its table, and where a script compares two programs on
the same input, that they still agree. (experiments.bench.gpu has its own
smoke test in test_bench_gpu.py.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", f"experiments.bench.{module}", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _bench(module, *args):
  r = _run(module, *args)
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]
  return r.stdout


def test_triplet_loss_bench_times_both_and_the_naive_loss_agrees():
  out = _bench("triplet_loss", "--min_b=16", "--max_b=16", "--repeats=1", "--notorch",
               "--strategies=all,semihard")
  rows = [line for line in out.splitlines() if re.match(r"\s+16 (all|semihard)\s", line)]
  assert len(rows) == 2, out
  for row in rows:
    cells = row.split("|")
    jax_ms, jax_mb = (float(x) for x in cells[1].split())
    naive = cells[2].split()
    assert jax_ms > 0 and jax_mb > 0
    # naive ms, peak MB, ratio, relative loss difference against jaxface.
    assert float(naive[0]) > 0 and naive[2].endswith("x")
    assert float(naive[3]) < 1e-4, row
  assert "baseline RSS" in out


def test_encoder_step_bench_prints_both_xla_variants():
  out = _bench("encoder_step", "--steps=1", "--config=tiny")
  rows = {line.split("  ")[0].strip(): line.split() for line in out.splitlines()
          if line.startswith("jax")}
  assert len(rows) == 2, out
  for cells in rows.values():
    ms, img_s, rel = (float(x) for x in cells[-3:])
    assert ms > 0 and img_s > 0 and rel > 0
  assert float(rows["jax (default XLA flags)"][-1]) == 1.0


def test_identify_bench_agrees_with_numpy_top1():
  out = _bench("identify", "--sizes=100", "--queries=4", "--min_time=0", "--min_reps=1")
  row = [line.split() for line in out.splitlines() if line.strip().startswith("100 ")]
  assert len(row) == 1, out
  assert "4/4" in row[0], out  # jaxface's top-1 equals NumPy's on every query
  assert float(row[0][3]) > 0  # jaxface queries/s


def test_faces_bench_without_dlib_labels_the_reference_as_not_measured():
  out = _bench("faces", "--batches=1", "--sizes=64", "--min_time=0", "--min_reps=1", "--nodlib",
               "--rounds=1")
  assert "NOT measured" in out and "disabled by --nodlib" in out
  emb = [line.split() for line in out.splitlines() if re.match(r"\s+1\s+\d", line)]
  det = [line.split() for line in out.splitlines() if line.strip().startswith("64x64")]
  assert len(emb) == 1 and float(emb[0][1]) > 0, out
  assert len(det) == 1 and float(det[0][1]) > 0, out


def test_triplet_loss_bench_rejects_an_unknown_strategy_by_name():
  r = _run("triplet_loss", "--strategies=all,nearest")
  assert r.returncode != 0 and "nearest" in r.stderr and "Traceback" not in r.stderr
