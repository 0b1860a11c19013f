"""Tests for jaxface.train.heads (CosFace head, standardisation) and their use in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.train import heads, triplet
from jaxface.train.config import TripletConfig
from jaxface.train.evaluators.verification import VerificationEvaluator
from tests.test_train_triplet import TINY, _batch


def _cosface_reference(emb, w, labels, margin, scale):
  """Slow loops, float64: the CosFace definition term by term."""
  emb, w = np.asarray(emb, np.float64), np.asarray(w, np.float64)
  losses, hits = [], []
  for i in range(emb.shape[0]):
    e = emb[i] / np.linalg.norm(emb[i])
    cos = np.array([e @ (w[:, c] / np.linalg.norm(w[:, c])) for c in range(w.shape[1])])
    logits = scale * cos
    logits[labels[i]] -= scale * margin
    logz = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
    losses.append(logz - logits[labels[i]])
    hits.append(float(np.argmax(cos) == labels[i]))
  return np.mean(losses), np.mean(hits)


@pytest.mark.parametrize("margin,scale", [(0.0, 1.0), (0.35, 16.0), (0.2, 30.0)])
def test_cosface_loss_matches_reference_and_jit(margin, scale):
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(9, 5)).astype(np.float32) * 3
  w = rng.normal(size=(5, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 9).astype(np.int32)
  ref_loss, ref_acc = _cosface_reference(emb, w, labels, margin, scale)
  loss, acc = heads.cosface_loss(jnp.asarray(emb), jnp.asarray(w), jnp.asarray(labels),
                                 margin=margin, scale=scale)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  assert float(acc) == pytest.approx(ref_acc)
  f = jax.jit(lambda e, w, l: heads.cosface_loss(e, w, l, margin=margin, scale=scale))
  jl, _ = f(emb, w, labels)
  f(emb + 1, w, labels)
  np.testing.assert_allclose(float(jl), float(loss), rtol=1e-6)
  assert f._cache_size() == 1


def test_cosface_margin_raises_the_loss_and_bad_shapes_are_refused():
  rng = np.random.default_rng(1)
  emb, w = rng.normal(size=(6, 3)), rng.normal(size=(3, 4))
  labels = np.arange(6, dtype=np.int32) % 4
  lo, _ = heads.cosface_loss(emb, w, labels, margin=0.0, scale=8.0)
  hi, _ = heads.cosface_loss(emb, w, labels, margin=0.5, scale=8.0)
  assert float(hi) > float(lo)
  with pytest.raises(ValueError, match="weights"):
    heads.cosface_loss(emb, w.T, labels, margin=0.1, scale=8.0)
  with pytest.raises(ValueError, match="labels"):
    heads.cosface_loss(emb, w, labels[:3], margin=0.1, scale=8.0)
  with pytest.raises(ValueError, match="num_classes"):
    heads.init_cosface_weights(jax.random.key(0), 8, 1)


def test_standardize_matches_numpy_and_keeps_flat_images_finite():
  rng = np.random.default_rng(2)
  x = rng.uniform(size=(3, 5, 4, 2)).astype(np.float32)
  x[2] = 0.7  # a flat image
  got = np.asarray(heads.standardize(jnp.asarray(x)))
  for i in range(3):
    ref = (x[i] - x[i].mean()) / np.sqrt(x[i].var() + 1e-3)
    np.testing.assert_allclose(got[i], ref, atol=1e-5)
  assert np.all(np.isfinite(got[2])) and np.all(got[2] == 0)
  np.testing.assert_allclose(got[0].std(), 1.0, atol=0.02)


def test_cosface_head_trains_jointly_and_resumes(tmp_path):
  cfg = TripletConfig(**{**TINY.to_dict(), "cls_weight": 1.0, "standardize": True, "num_steps": 4})
  graphdef, tx, state = triplet.init_state(cfg, num_classes=TINY.P)
  assert state["cls"].shape == (cfg.embedding_dim, TINY.P)
  step = triplet.make_train_step(graphdef, tx, cfg)
  batch = _batch(cfg)
  w0 = np.asarray(state["cls"])
  losses = []
  for _ in range(10):
    state, m = step(state, batch)
    losses.append(float(m["train/cls_loss"]))
  assert not np.allclose(np.asarray(state["cls"]), w0)  # the head is trained
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  assert step._cache_size() == 1
  # run(): checkpoints hold the head (and its class count); a stopped run resumes.
  triplet.run(cfg, str(tmp_path), stop_after=2, printer=lambda s: None)
  lines = []
  res = triplet.run(cfg, str(tmp_path), printer=lines.append)
  assert any("resumed from" in l for l in lines) and res["eval/step"] == 4
  assert 0.0 <= res["eval/accuracy"] <= 1.0
  from jaxface import checkpointing
  with checkpointing.Checkpointer(str(tmp_path)) as ck:
    assert ck.restore_config()["model_extras"]["num_classes"] == 8  # 12 - 4 held out
  model, loaded = triplet.load_params(str(tmp_path))
  assert loaded == cfg


def test_standardize_makes_the_embedding_ignore_brightness_and_contrast():
  images = _batch(TINY)["images"] // 2 + 40                           # [40, 167]
  brighter = np.round(images.astype(np.float32) * 1.5 - 20).astype(np.uint8)  # [40, 230]
  diffs = {}
  for standardize in (True, False):
    cfg = TripletConfig(**{**TINY.to_dict(), "standardize": standardize, "eval_flip": False})
    graphdef, _, state = triplet.init_state(cfg)
    embed = triplet.make_embed_fn(graphdef, cfg)
    a = np.asarray(embed(state["params"], state["rest"], images))
    b = np.asarray(embed(state["params"], state["rest"], brighter))
    diffs[standardize] = np.abs(a - b).max()
  assert diffs[True] < 5e-3 and diffs[False] > 20 * diffs[True], diffs


@pytest.mark.parametrize("field,value,match", [
    ("cls_weight", -1.0, "^cls_weight=-1.0"), ("cls_margin", 1.0, "^cls_margin=1.0"),
    ("cls_scale", 0.0, "^cls_scale=0.0"), ("num_steps", -1, "^num_steps=-1"),
    ("init", "imagenet", "^init='imagenet'"),
])
def test_bad_head_settings_name_the_parameter(field, value, match):
  with pytest.raises(ValueError, match=match):
    TripletConfig(**{**TINY.to_dict(), field: value}).validate()


def test_eval_crops_average_the_centre_and_corner_views():
  cfg = TripletConfig(**{**TINY.to_dict(), "eval_crops": 5, "eval_flip": False})
  graphdef, _, state = triplet.init_state(cfg)
  images = _batch(cfg)["images"]
  got = np.asarray(triplet.make_embed_fn(graphdef, cfg)(state["params"], state["rest"], images))
  # Reference: embed each of the 5 crops with the plain model, sum, renormalise.
  from flax import nnx
  model = nnx.merge(graphdef, state["params"], state["rest"])
  x = images.astype(np.float32) / 255.0
  (h, w), (ch, cw) = x.shape[1:3], cfg.crop_size
  total = 0
  for top, left in (((h - ch) // 2, (w - cw) // 2), (0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
    total = total + np.asarray(model(jnp.asarray(x[:, top:top + ch, left:left + cw]), train=False))
  ref = total / np.linalg.norm(total, axis=1, keepdims=True)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  centre_only = triplet.make_embed_fn(graphdef, TripletConfig(**{**cfg.to_dict(), "eval_crops": 1}))
  assert not np.allclose(np.asarray(centre_only(state["params"], state["rest"], images)), got, atol=1e-4)
  with pytest.raises(ValueError, match="^eval_crops=3"):
    TripletConfig(**{**TINY.to_dict(), "eval_crops": 3}).validate()


def test_ensemble_trains_members_and_evaluates_their_concatenation(tmp_path):
  cfg = TripletConfig(**{**TINY.to_dict(), "ensemble": 2, "num_steps": 2, "log_every": 1,
                         "checkpoint_every": 1, "roc_png": False})
  assert triplet.run(cfg, str(tmp_path), stop_after=1, printer=lambda s: None) == {}
  lines = []
  res = triplet.run(cfg, str(tmp_path), printer=lines.append)
  assert any(l.startswith("[member 0] resumed from") for l in lines)
  assert any(l.startswith("ensemble of 2: member accuracies") for l in lines)
  members = []
  for i in range(2):
    model, mcfg = triplet.load_params(str(tmp_path / f"member{i}"))
    assert mcfg.seed == cfg.seed + i and mcfg.ensemble == 1
    members.append((model, mcfg))
  # Reference: concatenate the members' own (flip-averaged) embeddings of the held-out
  # images; every member saw the ensemble seed's data (synthetic data depends on the seed).
  _, holdout, _ = triplet.prepare_data(cfg)
  from flax import nnx
  parts = []
  for model, mcfg in members:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    parts.append(triplet.embed_source(triplet.make_embed_fn(graphdef, mcfg), params, rest, holdout, 16))
  emb = np.concatenate(parts, axis=1) / np.sqrt(2)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  ref = VerificationEvaluator(None, holdout, cfg.eval, seed=cfg.seed).metrics(emb)
  assert res["eval/accuracy"] == pytest.approx(ref["eval/accuracy"])
  assert res["eval/auc"] == pytest.approx(ref["eval/auc"], abs=1e-6)
  assert "eval/member_accuracy_mean" in res
