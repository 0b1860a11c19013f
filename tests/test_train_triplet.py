"""Tests for jaxface.train.triplet: the pure step, resume, health checks, run()."""

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
from jaxface.train import triplet
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


def test_train_step_compiles_once_lowers_loss_and_donates_state():
  graphdef, tx, state = triplet.init_state(TINY)
  step = triplet.make_train_step(graphdef, tx, TINY)
  batch = _batch(TINY)
  old_leaf = jax.tree.leaves(state["params"])[0]
  losses = []
  for _ in range(12):
    state, m = step(state, batch)
    losses.append(float(m["train/loss"]))
  assert old_leaf.is_deleted()  # donated
  assert step._cache_size() == 1  # one compile for all steps
  assert int(state["step"]) == 12 and int(state["bad_step"]) == -1
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  assert 0.0 <= float(m["train/active_fraction"]) <= 1.0


def test_non_finite_step_keeps_previous_state_and_records_the_step():
  graphdef, tx, state = triplet.init_state(TINY)
  step = triplet.make_train_step(graphdef, tx, TINY)
  state, _ = step(state, _batch(TINY))
  poisoned = jax.tree.map(lambda x: x, state)
  head = poisoned["params"]["head"]["kernel"]
  head[...] = head[...].at[0, 0].set(jnp.nan)
  before = jax.tree.map(np.asarray, poisoned["params"])
  after, m = step(poisoned, _batch(TINY))
  assert int(after["bad_step"]) == 1 and int(after["step"]) == 2
  _assert_trees_equal(jax.tree.map(np.asarray, after["params"]), before)
  with pytest.raises(triplet.TrainingError, match="non-finite loss or gradient at step 1"):
    triplet._check_health(after, {"train/embedding_spread": 1.0}, 2)


def test_collapsed_embeddings_stop_training():
  graphdef, tx, state = triplet.init_state(TINY)
  for name in ("kernel", "bias"):
    v = state["params"]["head"][name]
    v[...] = jnp.zeros_like(v[...])
  step = triplet.make_train_step(graphdef, tx, TINY)
  state, m = step(state, _batch(TINY))
  host = {k: float(v) for k, v in m.items()}
  assert host["train/embedding_spread"] < 1e-6
  with pytest.raises(triplet.TrainingError, match="collapsed"):
    triplet._check_health(state, host, 1)


def test_run_stops_at_once_on_nan_loss_and_saves_nothing_after(tmp_path, monkeypatch):
  real = triplet.triplet_loss
  monkeypatch.setattr(triplet, "triplet_loss",
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
  cfg = TripletConfig(**{**TINY.to_dict(), "data": "folder", "data_path": str(tmp_path / "data")})
  with pytest.raises(ValueError, match="identit"):
    triplet.run(cfg, str(tmp_path / "w"), printer=lambda s: None)


def test_eval_flip_embeds_an_image_and_its_mirror_identically():
  graphdef, _, state = triplet.init_state(TINY)
  images = _batch(TINY)["images"]
  mirror = images[:, :, ::-1, :].copy()
  with_flip = triplet.make_embed_fn(graphdef, TINY)
  cfg_plain = TripletConfig(**{**TINY.to_dict(), "eval_flip": False})
  plain = triplet.make_embed_fn(graphdef, cfg_plain)
  a = np.asarray(with_flip(state["params"], state["rest"], images))
  b = np.asarray(with_flip(state["params"], state["rest"], mirror))
  np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, atol=1e-5)
  p1 = np.asarray(plain(state["params"], state["rest"], images))
  p2 = np.asarray(plain(state["params"], state["rest"], mirror))
  assert not np.allclose(p1, p2, atol=1e-4)


def test_run_reads_a_tfds_dataset_through_data_source(tmp_path):
  import tensorflow_datasets as tfds
  cfg = TripletConfig(**{**TINY.to_dict(), "data": "tfds", "tfds_name": "mnist",
                         "channels": 1, "image_size": (28, 28), "crop_size": (24, 24),
                         "num_steps": 2, "num_holdout": 3, "P": 3, "K": 2})
  with tfds.testing.mock_data(num_examples=120, policy=tfds.testing.MockPolicy.USE_CODE):
    res = triplet.run(cfg, str(tmp_path), printer=lambda s: None)
  assert res["eval/num_identities"] == 3.0
  assert 0.0 <= res["eval/accuracy"] <= 1.0


def test_ema_follows_the_polyak_recurrence_and_is_what_evaluation_uses():
  cfg = TripletConfig(**{**TINY.to_dict(), "ema_decay": 0.5})
  graphdef, tx, state = triplet.init_state(cfg)
  step = triplet.make_train_step(graphdef, tx, cfg)
  expected = jax.tree.map(np.asarray, state["params"])
  for i in range(3):
    state, _ = step(state, _batch(cfg, seed=i))
    live = jax.tree.map(np.asarray, state["params"])
    expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, expected, live)
  ema = jax.tree.map(np.asarray, state["ema"])
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert triplet.eval_params(state) is state["ema"]
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(live)))
