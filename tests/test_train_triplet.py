"""Tests for jaxface.train.triplet, the trainer: run(), resume, health checks, reload."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface import checkpointing
from jaxface.train import step as step_lib, triplet
from jaxface.train.config import TripletConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = TripletConfig(
    data="synthetic", synthetic_identities=12, synthetic_images=6, num_holdout=4,
    image_size=(32, 32), crop_size=(28, 28), P=4, K=3, stem_width=8, widths=(8, 16),
    depths=(1, 1), embedding_dim=16, num_steps=8, warmup_steps=2, log_every=2,
    checkpoint_every=2, eval_batch_size=16)


def _params(workdir):
  model, cfg = triplet.load_params(workdir)
  from flax import nnx
  return jax.tree.map(np.asarray, nnx.state(model)), cfg


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  b = cfg.P * cfg.K
  return {"images": rng.integers(0, 256, (b, *cfg.image_size, cfg.channels), dtype=np.uint8),
          "labels": np.repeat(np.arange(cfg.P, dtype=np.int32), cfg.K)}


def test_run_stops_at_once_on_nan_loss_and_saves_nothing_after(tmp_path, monkeypatch):
  real = step_lib.triplet_loss
  monkeypatch.setattr(step_lib, "triplet_loss",
                      lambda e, l, **kw: (real(e, l, **kw)[0] * jnp.nan, real(e, l, **kw)[1]))
  with pytest.raises(triplet.TrainingError, match="non-finite loss or gradient at step 0"):
    triplet.run(TINY, str(tmp_path), printer=lambda s: None)
  ckdir = tmp_path / "checkpoints"
  assert not ckdir.exists() or not [d for d in os.listdir(ckdir) if d.isdigit()]


def test_run_end_to_end_writes_metrics_and_roc(tmp_path):
  lines = []
  res = triplet.run(TINY, str(tmp_path), printer=lines.append)
  out = "\n".join(lines)
  for word in ("step", "loss", "active", "img/s", "ETA", "eval (held-out identities"):
    assert word in out
  metrics = json.load(open(tmp_path / "metrics.json"))
  for key in ("eval/accuracy", "eval/auc", "eval/threshold", "eval/rank1"):
    assert key in metrics and np.isfinite(metrics[key])
  # 4 held-out identities give < 1000 negative pairs: TAR@FAR=1e-3 is undefined, stored as null.
  assert metrics["eval/tar@far=1e-3"] is None
  assert metrics == pytest.approx({k: v for k, v in res.items()})
  assert (tmp_path / "roc.png").stat().st_size > 1000
  log = [json.loads(l) for l in open(tmp_path / "train_log.jsonl")]
  assert [r["step"] for r in log] == [2, 4, 6, 8]
  assert all(k.startswith("train/") for r in log for k in r if k != "step")
  # A second run on the same workdir resumes at the end: no steps, same results.
  lines2 = []
  res2 = triplet.run(TINY, str(tmp_path), printer=lines2.append)
  assert any("resumed from" in l for l in lines2)
  assert not any(l.startswith("step ") for l in lines2)
  assert res2 == res


def test_resume_refuses_a_different_config(tmp_path):
  triplet.run(TINY, str(tmp_path), stop_after=2, printer=lambda s: None)
  other = TripletConfig(**{**TINY.to_dict(), "margin": 0.5})
  with pytest.raises(checkpointing.CheckpointError, match="margin: saved 0.2 vs now 0.5"):
    triplet.run(other, str(tmp_path), printer=lambda s: None)
  # Extending num_steps is allowed.
  longer = TripletConfig(**{**TINY.to_dict(), "num_steps": 10})
  triplet.run(longer, str(tmp_path), stop_after=4, printer=lambda s: None)


def test_stop_and_resume_in_process_is_bitwise_identical(tmp_path):
  triplet.run(TINY, str(tmp_path / "full"), printer=lambda s: None)
  triplet.run(TINY, str(tmp_path / "split"), stop_after=3, printer=lambda s: None)
  triplet.run(TINY, str(tmp_path / "split"), printer=lambda s: None)
  _assert_trees_equal(_params(str(tmp_path / "full"))[0], _params(str(tmp_path / "split"))[0])


def test_killed_process_resumes_to_bitwise_identical_parameters(tmp_path):
  """SIGKILL a real training process after its step-4 checkpoint, rerun, compare."""
  flags = ["--flagfile=experiments/configs/triplet_demo_tiny.flags", "--num_steps=10",
           "--checkpoint_every=2", "--log_every=1"]
  ref_dir, kill_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "experiments.triplet", *flags]
  subprocess.run(cmd + [f"--workdir={ref_dir}"], cwd=REPO, check=True, capture_output=True, timeout=300)
  proc = subprocess.Popen(cmd + [f"--workdir={kill_dir}"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  killed_at = None
  deadline = time.time() + 300
  for line in proc.stdout:
    if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 5:
      os.kill(proc.pid, signal.SIGKILL)
      killed_at = int(line.split()[1].split("/")[0])
      break
    assert time.time() < deadline
  proc.wait(timeout=60)
  assert killed_at is not None and proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(kill_dir, "metrics.json"))
  r = subprocess.run(cmd + [f"--workdir={kill_dir}"], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr
  assert "resumed from" in r.stderr  # progress on stderr; stdout holds the result files
  assert r.stdout.split() == [os.path.join(kill_dir, "metrics.json"), os.path.join(kill_dir, "roc.png")]
  _assert_trees_equal(_params(ref_dir)[0], _params(kill_dir)[0])
  assert json.load(open(os.path.join(ref_dir, "metrics.json"))) == \
      json.load(open(os.path.join(kill_dir, "metrics.json")))


def test_k_larger_than_a_class_is_an_error_before_training(tmp_path):
  cfg = TripletConfig(**{**TINY.to_dict(), "K": 7})
  with pytest.raises(ValueError, match="K"):
    triplet.run(cfg, str(tmp_path), printer=lambda s: None)
  assert not (tmp_path / "checkpoints").exists()


def test_fewer_than_two_identities_is_an_error(tmp_path):
  root = tmp_path / "data" / "only_one"
  root.mkdir(parents=True)
  from PIL import Image
  for i in range(4):
    Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
  cfg = TINY.replace(data="folder", data_path=str(tmp_path / "data"))
  with pytest.raises(ValueError, match="identit"):
    triplet.run(cfg, str(tmp_path / "w"), printer=lambda s: None)


def test_run_reads_a_tfds_dataset_through_data_source(tmp_path):
  import tensorflow_datasets as tfds
  cfg = TINY.replace(data="tfds", tfds_name="mnist", channels=1, image_size=(28, 28), crop_size=(24, 24),
                     num_steps=2, num_holdout=3, P=3, K=2)
  with tfds.testing.mock_data(num_examples=120, policy=tfds.testing.MockPolicy.USE_CODE):
    res = triplet.run(cfg, str(tmp_path), printer=lambda s: None)
  assert res["eval/num_identities"] == 3.0
  assert 0.0 <= res["eval/accuracy"] <= 1.0


def test_a_checkpoint_with_the_old_flat_config_resumes_bitwise_and_reloads(tmp_path):
  # Runs saved before the config had groups stored it flat (one key per flag).
  old = str(tmp_path / "old")
  _, _, state = step_lib.init_state(TINY)
  with checkpointing.Checkpointer(old, async_save=False) as ck:
    ck.save(0, state, {**TINY.to_flat(), "model_extras": triplet.model_extras(TINY, 0)}, force=True)
  model, cfg = triplet.load_params(old)
  assert cfg == TINY
  lines = []
  triplet.run(TINY, old, printer=lines.append)
  assert any(line.startswith("resumed from") for line in lines)
  triplet.run(TINY, str(tmp_path / "new"), printer=lambda s: None)
  _assert_trees_equal(_params(old)[0], _params(str(tmp_path / "new"))[0])
  with pytest.raises(checkpointing.CheckpointError, match="margin: saved 0.2 vs now 0.5"):
    with checkpointing.Checkpointer(str(tmp_path / "old2"), async_save=False) as ck:
      ck.save(0, state, {**TINY.to_flat(), "model_extras": triplet.model_extras(TINY, 0)}, force=True)
    triplet.run(TINY.replace(margin=0.5), str(tmp_path / "old2"), printer=lambda s: None)
