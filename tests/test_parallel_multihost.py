"""Two processes on 127.0.0.1 (CPU, 2 forced devices each) train one run under jax.distributed."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from jaxface.train import triplet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_parallel_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_resume_and_hold_identical_parameters(tmp_path):
  workdir = str(tmp_path / "run")
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  procs = []
  for pid in range(2):
    args = {"distributed": "on", "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
            "process_id": pid, "workdir": workdir, "config": {"num_steps": 4}, "stop_after": 2}
    procs.append(subprocess.Popen([sys.executable, WORKER, "run", json.dumps(args)], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  res = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert [r["process"] for r in res] == [0, 1]
  assert all(r["processes"] == 2 and r["devices"] == 4 for r in res)
  # Each process loaded only its half of the 12-image global batch.
  assert [r["rows"] for r in res] == [[0, 6], [6, 12]]
  assert res[0]["digest"] == res[1]["digest"]
  assert res[0]["accuracy"] == res[1]["accuracy"] is not None
  # Process 0 speaks (and resumed from the step-2 checkpoint); process 1 is silent.
  assert res[0]["resumed"] and res[0]["printed"] > 5 and res[1]["printed"] == 0
  assert "data parallel: 4 cpu devices in 2 process(es)" in outs[0][0]
  log = [json.loads(l) for l in open(os.path.join(workdir, "train_log.jsonl"))]
  assert [r["step"] for r in log] == [2, 4]  # written once, by process 0
  assert json.load(open(os.path.join(workdir, "metrics.json")))["eval/step"] == 4
  # The checkpoint holds the parameters both processes hold.
  model, _ = triplet.load_params(workdir)
  leaves = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]
  assert hashlib.sha256(b"".join(x.tobytes() for x in leaves)).hexdigest() == res[0]["digest"]
