"""Runs a test module's worker in a subprocess with forced CPU host devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` only takes effect if it
is set before jax is imported, which the pytest process has already done; so
the sharded cases run in a child that writes ``<out>.npz`` (arrays) and
``<out>.npz.json`` (facts), and the comparisons happen in the parent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def forced_devices_env(devices: int, **extra: str) -> dict[str, str]:
  """The environment of a child with ``devices`` CPU devices that imports this checkout."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
              JAX_PLATFORMS="cpu", **extra)


def run_worker(script: str, out_path: str, devices: int, *, timeout: float = 240,
               drop_env: tuple[str, ...] = (), **extra_env: str) -> tuple[dict, dict]:
  """Runs ``python script out_path`` with forced devices; returns (npz arrays, JSON facts)."""
  env = forced_devices_env(devices, **extra_env)
  for name in drop_env:
    env.pop(name, None)
  r = subprocess.run([sys.executable, os.path.abspath(script), out_path], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out_path + ".json") as f:
    info = json.load(f)
  return dict(np.load(out_path)), info
