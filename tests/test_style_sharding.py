"""Tests for a content batch sharded over devices (jaxface.style.sharding, --num_devices).

The multi-device cases run in one subprocess with four forced host devices
(the XLA flag must be set before jax is imported); it writes an npz + JSON
that the tests below check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import _forced_devices  # tests/: the forced-devices subprocess runner
import numpy as np
import pytest

DEVICES = 4
STEPS = 5


def _cfg(**kw):
  from jaxface.style.config import NSTConfig
  # Two convolutions and 16 px: compiles in a second or two.
  base = NSTConfig(content="builtin:scene,builtin:checker,builtin:checker,builtin:scene", size=16,
                   num_scales=1, steps=(6,), content_layer="relu1_2", style_layers="relu1_1,relu1_2",
                   log_every=3, checkpoint_every=3, beta=1e4, tv_weight=1e-2, init="content_noise",
                   seed=3)
  return dataclasses.replace(base, **kw)


def _worker(out_path):
  import jax

  from jaxface.style import sharding, transfer
  assert len(jax.devices()) == DEVICES, jax.devices()
  out, info = {}, {}
  cfg = _cfg()
  problem = transfer.prepare(cfg)
  graphdef, vgg, prep, _ = transfer.build_network(cfg, None)
  tx = transfer.make_optimizer(cfg)
  consts = transfer.scale_consts(cfg, problem, 0, vgg, transfer.make_targets(graphdef, cfg, prep))
  contents, _ = transfer.scale_images(cfg, problem, 0)

  def fresh():
    return transfer.new_state(tx, transfer.initial_image(cfg, contents), step=0, scale_index=0,
                              seed=cfg.seed)

  # The same batch: one device (make_step as is) vs sharded over 4.
  state, one = fresh(), transfer.make_step(graphdef, tx, cfg, prep)
  losses = []
  for _ in range(STEPS):
    state, m = one(state, consts)
    losses.append(float(m["train/loss"]))
  out["single_image"], out["single_loss"] = np.asarray(state["image"]), np.array(losses)
  mesh = sharding.make_mesh(DEVICES, 4)
  step = sharding.jit_step(transfer.make_step(graphdef, tx, cfg, prep, jit=False), mesh)
  state, c4 = sharding.place_state(fresh(), mesh), sharding.place_consts(consts, mesh)
  info["const_specs"] = {k: sorted({str(x.sharding.spec) for x in jax.tree.leaves(v)})
                         for k, v in c4.items()}
  losses = []
  for _ in range(STEPS):
    state, m = step(state, c4)
    losses.append(float(m["train/loss"]))
  out["sharded_image"], out["sharded_loss"] = np.asarray(state["image"]), np.array(losses)
  info["compiles"] = step._cache_size()  # noqa: SLF001
  info["image_spec"] = str(state["image"].sharding.spec)
  info["image_devices"] = len(state["image"].sharding.device_set)
  info["opt_specs"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state["opt_state"])})
  info["step_spec"] = str(state["step"].sharding.spec)
  # Whole runs: sharded uninterrupted, sharded stopped + resumed, and one device.
  quiet = lambda s: None
  work = os.path.dirname(out_path)
  # Two scales (8 then 16 px): the upsampled state is placed on the mesh again;
  # stopped mid second scale, so the restore lands in a sharded template.
  two = dict(num_scales=2, steps=(3, 3), checkpoint_every=2)
  full = transfer.run(_cfg(num_devices=0, **two), os.path.join(work, "full"), printer=quiet)
  assert transfer.run(_cfg(num_devices=4, **two), os.path.join(work, "resumed"), stop_after=4,
                      printer=quiet) == {}
  resumed = transfer.run(_cfg(num_devices=4, **two), os.path.join(work, "resumed"), printer=quiet)
  single = transfer.run(_cfg(num_devices=1, **two), os.path.join(work, "single"), printer=quiet)
  out["run_full"], out["run_resumed"], out["run_single"] = (
      full["images"], resumed["images"], single["images"])
  errors = {}
  for name, kw in {"uneven": {"content": "builtin:scene,builtin:checker,builtin:scene"},
                   "too_many": {"num_devices": 8}}.items():
    try:
      transfer.run(_cfg(**{"num_devices": 4, **kw}), os.path.join(work, name), printer=quiet)
      errors[name] = "no error"
    except ValueError as e:
      errors[name] = str(e)
    errors[name + "_wrote"] = os.path.exists(os.path.join(work, name))
  info["errors"] = errors
  np.savez(out_path, **out)
  with open(out_path + ".json", "w") as f:
    json.dump(info, f)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("nst_sharded") / "out.npz")
  # Random weights, never the developer's cache.
  return _forced_devices.run_worker(__file__, path, DEVICES, drop_env=("JAXFACE_VGG19",),
                                    JAXFACE_CACHE=str(tmp_path_factory.mktemp("cache")))


def test_sharded_batch_step_equals_the_one_device_batched_step(sharded):
  out, info = sharded
  assert info["compiles"] == 1
  assert info["image_spec"] == "P('data',)" and info["image_devices"] == DEVICES
  assert info["opt_specs"] == ["P('data',)"] and info["step_spec"] == "P()"
  specs = info["const_specs"]
  assert specs.pop("content") == ["P('data',)"]
  assert set(specs) == {"vgg", "grams", "grad_kernels"}
  assert all(v == ["P()"] for v in specs.values()), specs
  # Not bitwise: each device convolves 1 image instead of 4, which may round
  # differently (measured max |diff| ~6e-8 after 5 Adam steps); Adam's step is
  # lr * m / sqrt(v), so rounding in the gradient moves pixels by ~lr * 1e-6 at most
  # except where a gradient is at noise level -- 1e-5 leaves room for that.
  np.testing.assert_allclose(out["sharded_image"], out["single_image"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["sharded_loss"], out["single_loss"], rtol=1e-5)
  assert out["single_loss"][-1] < out["single_loss"][0]      # it optimises at all


def test_sharded_run_resumes_bitwise_and_matches_one_device(sharded):
  out, _ = sharded
  np.testing.assert_array_equal(out["run_resumed"], out["run_full"])
  np.testing.assert_allclose(out["run_full"], out["run_single"], atol=1e-5, rtol=0)
  assert out["run_full"].shape == (4, 16, 16, 3)


def test_uneven_batch_and_missing_devices_fail_before_any_compute(sharded):
  _, info = sharded
  err = info["errors"]
  assert "batch of 3 content image(s) does not split evenly over 4 devices" in err["uneven"]
  assert "num_devices=8 but only 4 devices are visible (cpu)" in err["too_many"]
  assert not err["uneven_wrote"] and not err["too_many_wrote"]


def test_one_device_needs_no_mesh_and_config_checks_num_devices():
  from jaxface.style import sharding
  assert sharding.make_mesh(1, 3) is None
  assert sharding.make_mesh(0, 5) is None          # this process has one CPU device
  with pytest.raises(ValueError, match="num_devices"):
    sharding.make_mesh(-1, 4)
  with pytest.raises(ValueError, match="num_devices=-1"):
    _cfg(num_devices=-1).validate()
  state = {"image": np.zeros(2)}
  assert sharding.place_state(state, None) is state


if __name__ == "__main__":
  _worker(sys.argv[1])
