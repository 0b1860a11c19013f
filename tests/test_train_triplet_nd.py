"""Triplet training on 1-D signals and 3-D volumes: config rules, pure step, embedding."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.models import encoder as encoder_lib
from jaxface.train import triplet
from jaxface.train.config import TripletConfig

SIGNALS = TripletConfig(
    data="synthetic", spatial_rank=1, synthetic_identities=10, synthetic_images=4, num_holdout=4,
    image_size=(64,), crop_size=(56,), channels=2, flip=False, eval_flip=False, noise=0.02,
    P=4, K=3, stem_width=8, widths=(8, 16), depths=(1, 1), embedding_dim=16, num_steps=8,
    warmup_steps=2, log_every=2, checkpoint_every=4, eval_batch_size=16)
VOLUMES = dataclasses.replace(
    SIGNALS, spatial_rank=3, image_size=(12, 12, 12), crop_size=(10, 10, 10), channels=1,
    flip=True, eval_flip=True, stem_width=4, widths=(4, 8))


@pytest.mark.parametrize("cfg,changes,match", [
    (SIGNALS, dict(flip=True), "^flip=True: flipping a signal reverses time"),
    (SIGNALS, dict(eval_flip=True), "^eval_flip=True"),
    (SIGNALS, dict(image_size=(64, 64), crop_size=(56, 56)), r"^image_size=\(64, 64\): must be T"),
    (SIGNALS, dict(crop_size=(56, 56)), r"^crop_size=\(56, 56\): must be T \(1 entries"),
    (SIGNALS, dict(image_size=(16,), crop_size=(16,)), "signals need T >= 32"),
    (SIGNALS, dict(channels=13), "^channels=13: must be 1..12 for signals"),
    (SIGNALS, dict(noise=0.7), "^noise=0.7"),
    (VOLUMES, dict(rotate=10.0), "^rotate=10.0: is an image"),
    (VOLUMES, dict(scale=0.1), "^scale=0.1: is an image"),
    (VOLUMES, dict(erase=0.5), "^erase=0.5: is an image"),
    (VOLUMES, dict(data="folder", data_path="/x"), "^kind='folder': spatial_rank=3 data comes from synthetic"),
    (VOLUMES, dict(crop_size=(10, 10)), "must be D,H,W"),
    (VOLUMES, dict(spatial_rank=4), "^spatial_rank=4"),
])
def test_rank_rules_name_the_parameter(cfg, changes, match):
  with pytest.raises(ValueError, match=match):
    cfg.replace(**changes).validate()


def test_valid_configs_build_the_right_encoder_and_source():
  for cfg, shape in ((SIGNALS, (64, 2)), (VOLUMES, (12, 12, 12, 1))):
    cfg.validate()
    assert cfg.encoder_spec().spatial_rank == cfg.spatial_rank
    train, held, sampler = triplet.prepare_data(cfg)
    assert train.image_shape == shape and held.image_shape == shape
    assert train.num_identities == 6 and held.num_identities == 4
    assert train.get(sampler.batch_indices(0)).shape == (12, *shape)
  # Old configs (saved before spatial_rank and noise existed) read back as 2-D images.
  old = {k: v for k, v in TripletConfig().to_flat().items() if k not in ("spatial_rank", "noise")}
  assert TripletConfig.from_dict(old) == TripletConfig()


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return {"images": rng.integers(0, 256, (cfg.P * cfg.K, *cfg.image_size, cfg.channels), np.uint8),
          "labels": np.repeat(np.arange(cfg.P, dtype=np.int32), cfg.K)}


def test_volume_train_step_compiles_once_and_lowers_the_loss():
  # (Signals train in test_signal_run_trains_resumes_and_evaluates.)
  cfg = VOLUMES
  graphdef, tx, state = triplet.init_state(cfg)
  step = triplet.make_train_step(graphdef, tx, cfg)
  batch = _batch(cfg)
  losses = []
  for _ in range(10):
    state, m = step(state, batch)
    losses.append(float(m["train/loss"]))
  assert step._cache_size() == 1
  assert int(state["step"]) == 10 and int(state["bad_step"]) == -1
  assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])


def test_volume_embedding_with_eval_flip_averages_the_mirror_along_w():
  cfg = VOLUMES
  graphdef, _, state = triplet.init_state(cfg)
  images = _batch(cfg)["images"][:5]
  emb = np.asarray(triplet.make_embed_fn(graphdef, cfg)(state["params"], state["rest"], images))
  assert emb.shape == (5, cfg.embedding_dim) and emb.dtype == np.float32
  # Reference: crop by slicing, embed both views eagerly, add, renormalise in NumPy.
  x = images[:, 1:11, 1:11, 1:11].astype(np.float32) / 255.0
  e1, _ = encoder_lib.apply(graphdef, state["params"], state["rest"], jnp.asarray(x))
  e2, _ = encoder_lib.apply(graphdef, state["params"], state["rest"], jnp.asarray(x[:, :, :, ::-1]))
  ref = np.asarray(e1) + np.asarray(e2)
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(emb, ref, atol=2e-5)
  assert not np.allclose(np.asarray(e1), np.asarray(e2), atol=1e-4)  # the flip does something


def test_signal_run_trains_resumes_and_evaluates(tmp_path):
  assert triplet.run(SIGNALS, str(tmp_path), stop_after=4, printer=lambda s: None) == {}
  lines = []
  res = triplet.run(SIGNALS, str(tmp_path), printer=lines.append)
  assert any(line.startswith(f"resumed from {tmp_path}") for line in lines)
  assert res["eval/step"] == 8 and 0.0 <= res["eval/accuracy"] <= 1.0
  assert (tmp_path / "metrics.json").exists()
