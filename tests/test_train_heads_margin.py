"""Tests for heads.margin_softmax_loss (CosFace / ArcFace, label smoothing) and its config flags."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.train import heads, triplet
from jaxface.train.config import TripletConfig
from tests.test_train_triplet import TINY, _batch


def _reference(emb, w, labels, kind, margin, scale, smoothing):
  """Slow loops, float64: the ArcFace / CosFace definitions term by term."""
  emb, w = np.asarray(emb, np.float64), np.asarray(w, np.float64)
  c_count = w.shape[1]
  losses = []
  for i in range(emb.shape[0]):
    e = emb[i] / np.linalg.norm(emb[i])
    cos = np.array([e @ (w[:, c] / np.linalg.norm(w[:, c])) for c in range(c_count)])
    logits = scale * cos
    t = labels[i]
    if kind == "cosface":
      logits[t] = scale * (cos[t] - margin)
    else:
      theta = math.acos(min(max(cos[t], -1.0), 1.0))
      if theta + margin < math.pi:
        logits[t] = scale * math.cos(theta + margin)
      else:
        logits[t] = scale * (cos[t] - margin * math.sin(margin))
    logz = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
    logp = logits - logz
    target = np.full(c_count, smoothing / c_count)
    target[t] += 1.0 - smoothing
    losses.append(-np.sum(target * logp))
  return np.mean(losses)


@pytest.mark.parametrize("kind,margin,scale,smoothing", [
    ("arcface", 0.5, 32.0, 0.0), ("arcface", 0.3, 16.0, 0.1), ("arcface", 0.0, 4.0, 0.0),
    ("cosface", 0.35, 16.0, 0.2)])
def test_margin_loss_matches_reference_and_jit(kind, margin, scale, smoothing):
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(11, 5)).astype(np.float32) * 2
  w = rng.normal(size=(5, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 11).astype(np.int32)
  # Two rows pointing away from their prototype: theta + m passes pi (ArcFace's fallback branch).
  emb[0] = -w[:, labels[0]]
  emb[1] = -w[:, labels[1]] + 0.05
  ref = _reference(emb, w, labels, kind, margin, scale, smoothing)
  loss, acc = heads.margin_softmax_loss(jnp.asarray(emb), jnp.asarray(w), jnp.asarray(labels),
                                        kind=kind, margin=margin, scale=scale, smoothing=smoothing)
  np.testing.assert_allclose(float(loss), ref, rtol=2e-4)
  f = jax.jit(lambda e, w, l: heads.margin_softmax_loss(e, w, l, kind=kind, margin=margin,
                                                        scale=scale, smoothing=smoothing))
  jl, jacc = f(emb, w, labels)
  f(emb + 1, w, labels)
  np.testing.assert_allclose(float(jl), float(loss), rtol=1e-5)
  assert float(jacc) == float(acc)
  assert f._cache_size() == 1


def test_cosface_kind_equals_cosface_loss_and_arcface_is_monotone_in_margin():
  rng = np.random.default_rng(1)
  emb, w = rng.normal(size=(8, 6)), rng.normal(size=(6, 5))
  labels = np.arange(8, dtype=np.int32) % 5
  a, _ = heads.cosface_loss(emb, w, labels, margin=0.35, scale=16.0)
  b, _ = heads.margin_softmax_loss(emb, w, labels, kind="cosface", margin=0.35, scale=16.0)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  losses = [float(heads.margin_softmax_loss(emb, w, labels, kind="arcface", margin=m,
                                            scale=16.0)[0]) for m in (0.0, 0.2, 0.5, 0.8)]
  assert all(x < y for x, y in zip(losses, losses[1:]))


def test_arcface_gradient_is_finite_at_the_prototype():
  w = jnp.eye(3, 4)
  emb = w.T[:3]  # each row equals its class prototype: cos = 1 exactly
  labels = jnp.arange(3, dtype=jnp.int32)
  g = jax.grad(lambda e: heads.margin_softmax_loss(e, w, labels, kind="arcface", margin=0.5,
                                                   scale=32.0)[0])(emb)
  assert np.all(np.isfinite(np.asarray(g)))


def test_bad_inputs_are_refused():
  emb, w = np.ones((4, 3)), np.ones((3, 2))
  labels = np.zeros(4, np.int32)
  with pytest.raises(ValueError, match="kind"):
    heads.margin_softmax_loss(emb, w, labels, kind="sphereface", margin=0.1, scale=8.0)
  with pytest.raises(ValueError, match="smoothing"):
    heads.margin_softmax_loss(emb, w, labels, kind="arcface", margin=0.1, scale=8.0, smoothing=1.0)
  with pytest.raises(ValueError, match="weights"):
    heads.margin_softmax_loss(emb, w.T, labels, kind="arcface", margin=0.1, scale=8.0)
  with pytest.raises(ValueError, match="cls_type"):
    TripletConfig(cls_type="sphereface").validate()
  with pytest.raises(ValueError, match="cls_smoothing"):
    TripletConfig(cls_smoothing=-0.1).validate()


def test_arcface_head_trains_in_the_step():
  cfg = TripletConfig(**{**TINY.to_dict(), "cls_weight": 1.0, "cls_type": "arcface",
                         "cls_margin": 0.5, "cls_scale": 32.0, "cls_smoothing": 0.1})
  graphdef, tx, state = triplet.init_state(cfg, num_classes=TINY.P)
  step = triplet.make_train_step(graphdef, tx, cfg)
  batch = _batch(cfg)
  cls0 = np.asarray(state["cls"])
  for _ in range(2):  # the warm-up's first step has a learning rate of 0
    state, m = step(state, batch)
  assert np.isfinite(float(m["train/cls_loss"])) and float(m["train/cls_loss"]) > 0
  assert not np.allclose(np.asarray(state["cls"]), cls0)  # the prototypes are trained
