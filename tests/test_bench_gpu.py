"""Smoke test of the prepared accelerator benchmark (experiments.bench.gpu) on CPU, tiny sizes.

Two forced host devices, so the sharded NST and identify rows run too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--train_P=2", "--train_K=2", "--train_widths=8", "--train_depths=1", "--train_image=16,16",
        "--train_steps=1", "--nst_size=16", "--nst_batch=2", "--nst_steps=1",
        "--nst_content_layer=relu1_2", "--nst_style_layers=relu1_1", "--gallery=3000",
        "--queries=8", "--min_time=0", "--min_reps=1"]


def _bench(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("JAXFACE_VGG19", None)
  return subprocess.run([sys.executable, "-m", "experiments.bench.gpu", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_every_row_is_measured_and_printed():
  r = _bench(*TINY)
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]
  out = r.stdout
  assert re.search(r"# device: cpu .*\(x2\); jax \d", out) and "UTC" in out
  rows = {}
  for line in out.splitlines():
    m = re.match(r"\| (\w+)\s+\| (.+?)\s+\|\s+([\d.]+) (\S+)", line)
    if m:
      rows.setdefault(m.group(1), []).append((m.group(2), float(m.group(3)), m.group(4)))
  assert [u for _, _, u in rows["train"]] == ["images/s"]
  assert [w for w, _, _ in rows["nst"]] == ["16px, batch 1, 1 device", "16px, batch 2, 1 device",
                                            "16px, batch 2, sharded over 2 devices"]
  assert len(rows["identify"]) == 3 and rows["identify"][1][0].endswith("sharded over 2 devices")
  assert "approx_max_k" in rows["identify"][2][0]
  # approx_max_k lowers to an exact sort on CPU: full recall against the exact search.
  assert re.search(r"approx_max_k.*recall@5 vs exact 1\.0000", out)
  assert all(v > 0 for sec in rows.values() for _, v, _ in sec)


def test_a_failing_section_is_reported_and_exits_non_zero():
  r = _bench("--sections=nst", "--nst_size=8")    # too small for relu5_1: fails before compiling
  assert r.returncode == 1
  assert "FAILED nst: ValueError: image too small" in r.stdout
  assert "error: 1 section(s) failed: nst" in r.stderr
  r = _bench("--sections=bogus")
  assert r.returncode == 2 and "--sections" in r.stderr
