"""Data-parallel triplet training on 4 forced CPU devices vs one device.

JAX fixes its device count when it starts, so the multi-device checks run in
a subprocess (``tests/_parallel_worker.py``) started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxface import parallel
from jaxface.train import step as step_lib, triplet
from jaxface.train.config import TripletConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_parallel_worker.py")
TINY = TripletConfig(
    data="synthetic", synthetic_identities=12, synthetic_images=6, num_holdout=4,
    image_size=(32, 32), crop_size=(28, 28), P=4, K=3, stem_width=8, widths=(8, 16),
    depths=(1, 1), embedding_dim=16, num_steps=8, warmup_steps=2, log_every=2,
    checkpoint_every=2, eval_batch_size=16)


def run_worker(task: str, args: dict, devices: int, timeout: int = 300) -> dict:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, WORKER, task, json.dumps(args)], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-4000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def _indexed(d, prefix):
  keys = sorted((k for k in d.files if k.startswith(prefix) and k[len(prefix):].isdigit()),
                key=lambda k: int(k[len(prefix):]))
  return [d[k] for k in keys]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  """One worker run: P=8 identities x K=2 over 4 devices (2 identities per device)."""
  out = str(tmp_path_factory.mktemp("par") / "grads.npz")
  run_worker("grads", {"devices": 4, "config": {"P": 8, "K": 2}, "steps": 3, "out": out}, 4)
  return np.load(out)


def test_global_mining_loss_and_gradients_equal_one_device(four_devices):
  d = four_devices
  # Same math on the same global batch; only float32 summation order differs
  # (XLA splits the row reductions of BatchNorm, the distance matmul and the
  # gradient all-reduce over devices), so equality is to a few ulps of the
  # values, not bitwise.
  np.testing.assert_allclose(d["global_loss"], d["single_loss"], rtol=1e-5)
  single, glob = _indexed(d, "single_grad"), _indexed(d, "global_grad")
  assert len(single) == len(glob) > 10
  scale = max(np.abs(g).max() for g in single)
  assert scale > 1e-4  # a real gradient, not all zeros
  for a, b in zip(single, glob):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale)


def test_global_mining_train_steps_match_one_device_and_compile_once(four_devices):
  d = four_devices
  np.testing.assert_allclose(d["steps_mesh_loss"], d["steps_single_loss"], rtol=1e-5)
  one, mesh = _indexed(d, "steps_single"), _indexed(d, "steps_mesh")
  assert len(one) == len(mesh) > 10
  # Three Adam steps with augmentation: Adam divides by sqrt(v), so a few-ulp
  # gradient difference moves a weight by at most ~lr * 1e-4.
  for a, b in zip(one, mesh):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  assert int(d["compiles"]) == 1
  assert bool(d["param_sharding_replicated"])


def test_local_mining_is_the_mean_of_per_shard_single_device_losses(four_devices):
  d = four_devices
  shard_losses = d["shard_losses"]
  assert shard_losses.shape == (4,)
  np.testing.assert_allclose(d["local_loss"], shard_losses.mean(), rtol=1e-6)
  # Local mining sees fewer (and different) negatives than global mining.
  assert abs(float(d["local_loss"]) - float(d["global_loss"])) > 1e-6
  for g, shards in zip(_indexed(d, "local_grad"), _indexed(d, "shard_grad")):
    np.testing.assert_allclose(g, shards.mean(axis=0), rtol=1e-5, atol=1e-8)
  # BatchNorm statistics: each device's own batch, running averages averaged.
  rests = list(zip(_indexed(d, "local_rest"), _indexed(d, "shard_rest")))
  assert rests
  for r, shards in rests:
    np.testing.assert_allclose(r, shards.mean(axis=0), rtol=1e-5, atol=1e-7)


def test_batch_that_does_not_split_over_devices_is_refused():
  with pytest.raises(ValueError, match=r"^P=4: with K=3, 12 images per batch do not split evenly over 5"):
    step_lib.check_parallel_batch(TINY.data, TINY.loss, 5)
  step_lib.check_parallel_batch(TINY.data, TINY.loss, 4)  # 3 rows per device: fine for global mining
  local = TripletConfig(**{**TINY.to_dict(), "mining": "local"})
  with pytest.raises(ValueError, match=r"^P=4: mining='local' .* multiple of 3"):
    step_lib.check_parallel_batch(local.data, local.loss, 3)
  with pytest.raises(ValueError, match=r"1 identity per device, so no negatives"):
    step_lib.check_parallel_batch(local.data, local.loss, 4)
  step_lib.check_parallel_batch(local.data, local.loss, 2)
  step_lib.check_parallel_batch(local.data, local.loss, 1)  # one device: nothing to split


def test_more_devices_than_visible_is_refused_before_any_work(tmp_path):
  n = jax.device_count() + 1
  with pytest.raises(ValueError, match=f"num_devices={n} but only {n - 1} devices"):
    parallel.make_mesh(n)
  cfg = TripletConfig(**{**TINY.to_dict(), "num_devices": n})
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
    triplet.run(cfg, str(tmp_path), printer=lambda s: None)
  assert not (tmp_path / "checkpoints").exists()
  with pytest.raises(ValueError, match="num_devices must be an integer >= 0"):
    parallel.make_mesh(-1)


def test_bad_parallel_settings_are_named_by_validate():
  for key, value in (("mining", "everywhere"), ("num_devices", -1), ("distributed", "yes")):
    with pytest.raises(ValueError, match=f"^{key}="):
      TripletConfig(**{**TINY.to_dict(), key: value}).validate()


def test_one_device_mesh_helpers():
  mesh = parallel.make_mesh(1)
  assert mesh.axis_names == ("data",) and mesh.devices.size == 1
  assert parallel.process_rows(mesh, 12) == slice(0, 12)
  batch = parallel.global_batch(mesh, {"x": np.arange(12.0)}, 12)
  np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(12.0))
  with pytest.raises(ValueError, match="holds rows 0..11 of the global batch"):
    parallel.global_batch(mesh, {"x": np.arange(6.0)}, 12)
  tree = parallel.replicate({"w": np.ones((2, 3), np.float32), "n": 3}, mesh)
  assert tree["n"] == 3 and tree["w"].sharding.is_fully_replicated
  local = parallel.to_local(tree)
  np.testing.assert_array_equal(np.asarray(local["w"]), np.ones((2, 3)))
  with pytest.raises(ValueError, match="7 rows per device, not a multiple of 2"):
    parallel.check_batch(7, mesh, group=2)


def test_distributed_initialize_checks_its_arguments_before_starting():
  assert parallel.initialize("off") is False
  with pytest.raises(ValueError, match="must be one of off, on, auto"):
    parallel.initialize("maybe")
  with pytest.raises(ValueError, match="mode='off'"):
    parallel.initialize("off", coordinator_address="127.0.0.1:1234")
  with pytest.raises(ValueError, match="host:port"):
    parallel.initialize("on", coordinator_address="localhost", num_processes=2, process_id=0)
  with pytest.raises(ValueError, match="num_processes=0"):
    parallel.initialize("on", coordinator_address="127.0.0.1:1234")
  with pytest.raises(ValueError, match=r"process_id=2: must be in \[0, 2\)"):
    parallel.initialize("on", coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2)
  with pytest.raises(ValueError, match="need coordinator_address"):
    parallel.initialize("on", num_processes=2)
