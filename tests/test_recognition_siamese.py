"""Siamese head: features, loss/gradient vs NumPy logistic regression, training, orbax round trip, pairs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxface.recognition import siamese


def _pairs(n=400, d=16, seed=0):
  """Synthetic embeddings: same pairs differ by small noise, different pairs are independent."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n, d)).astype(np.float32) * 0.3
  same = np.arange(n) < n // 2
  other = rng.normal(size=(n, d)).astype(np.float32) * 0.3
  e2 = np.where(same[:, None], base + 0.08 * rng.normal(size=(n, d)).astype(np.float32), other)
  return base, e2.astype(np.float32), same


def _np_features(a, b, kind):
  a, b = a.astype(np.float64), b.astype(np.float64)
  out = []
  if kind in ("abs", "abs+chi2"):
    out.append(np.abs(a - b))
  if kind in ("chi2", "abs+chi2"):
    out.append((a - b) ** 2 / (np.abs(a) + np.abs(b) + siamese.CHI2_EPS))
  return np.concatenate(out, axis=1)


def _np_loss_grad(w, b, x, y, l2):
  """Slow, obvious logistic regression: loss and gradient, element by element in float64."""
  n = x.shape[0]
  loss, gw, gb = 0.0, np.zeros_like(w), 0.0
  for i in range(n):
    z = float(x[i] @ w + b)
    p = 1.0 / (1.0 + np.exp(-z))
    loss += -(y[i] * np.log(p) + (1 - y[i]) * np.log(1 - p))
    gw += (p - y[i]) * x[i]
    gb += p - y[i]
  return loss / n + l2 * np.sum(w ** 2), gw / n + 2 * l2 * w, gb / n


@pytest.mark.parametrize("kind", siamese.FEATURES)
def test_pair_features_match_numpy(kind):
  a, b, _ = _pairs(20, 8)
  got = np.asarray(siamese.pair_features(a, b, kind))
  np.testing.assert_allclose(got, _np_features(a, b, kind), rtol=1e-5, atol=1e-7)
  assert got.shape == (20, siamese.num_features(kind, 8))
  jitted = jax.jit(lambda x, y: siamese.pair_features(x, y, kind))
  np.testing.assert_array_equal(np.asarray(jitted(a, b)), got)


def test_chi2_equals_lecture_form_for_nonnegative_features():
  a, b, _ = _pairs(10, 8)
  a, b = np.abs(a), np.abs(b)
  lecture = (a - b) ** 2 / (a + b + siamese.CHI2_EPS)
  np.testing.assert_allclose(np.asarray(siamese.pair_features(a, b, "chi2")), lecture, rtol=1e-5)


def test_loss_and_gradient_match_numpy_reference():
  a, b, same = _pairs(64, 8, seed=1)
  x = _np_features(a, b, "abs")
  y = same.astype(np.float64)
  rng = np.random.default_rng(3)
  w, bias, l2 = rng.normal(size=8), 0.3, 0.01
  head = siamese.build_head(8)
  head.w[...] = jnp.asarray(w, jnp.float32)
  head.b[...] = jnp.asarray(bias, jnp.float32)
  graphdef, params = nnx.split(head)
  loss, grads = jax.value_and_grad(lambda p: siamese.loss_fn(graphdef, p, jnp.asarray(x, jnp.float32),
                                                              jnp.asarray(y, jnp.float32), l2))(params)
  ref_loss, ref_gw, ref_gb = _np_loss_grad(w, bias, x, y, l2)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grads["w"][...]), ref_gw, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(grads["b"][...]), ref_gb, rtol=1e-4, atol=1e-6)


def test_training_reaches_the_numpy_optimum_and_separates_pairs():
  scipy_opt = pytest.importorskip("scipy.optimize")
  a, b, same = _pairs(300, 8, seed=2)
  cfg = siamese.SiameseConfig(features="abs", learning_rate=0.05, l2=1e-3, steps=3000, val_fraction=0.0)
  model = siamese.train(a, b, same, cfg)
  x = _np_features(a, b, "abs")
  y = same.astype(np.float64)

  def f(theta):
    loss, gw, gb = _np_loss_grad(theta[:-1], theta[-1], x, y, cfg.l2)
    return loss, np.append(gw, gb)

  res = scipy_opt.minimize(f, np.zeros(9), jac=True, method="L-BFGS-B", options={"maxiter": 500})
  w, bias = model.weights
  ref_p = 1 / (1 + np.exp(-(x @ res.x[:-1] + res.x[-1])))
  p = model.predict(a, b)
  assert p.shape == (300,) and p.dtype == np.float32
  np.testing.assert_allclose(p, ref_p, atol=2e-2)
  np.testing.assert_allclose(f(np.append(w, bias))[0], res.fun, rtol=1e-3)
  assert np.mean((p > 0.5) == same) > 0.95
  assert np.all(w < 0)  # a larger |difference| must lower p(same)


def test_early_stopping_keeps_best_validation_params():
  a, b, same = _pairs(200, 8, seed=4)
  cfg = siamese.SiameseConfig(features="abs+chi2", steps=400, val_fraction=0.25, patience=20, seed=1)
  model = siamese.train(a, b, same, cfg)
  h = model.history
  assert h["num_val"] == 50 and h["num_train"] == 150
  assert 1 <= h["best_step"] <= h["steps"] <= 400
  assert model.predict(a, b).shape == (200,)


def test_train_rejects_bad_input():
  a, b, same = _pairs(20, 4)
  with pytest.raises(ValueError, match="both same and different"):
    siamese.train(a, b, np.ones(20, np.bool_))
  with pytest.raises(ValueError, match="same: expected bool"):
    siamese.train(a, b, same.astype(np.int64))
  with pytest.raises(ValueError, match="e1, e2"):
    siamese.train(a, b[:, :3], same)
  with pytest.raises(ValueError, match="features"):
    siamese.train(a, b, same, siamese.SiameseConfig(features="cosine"))


def test_save_load_round_trip(tmp_path):
  a, b, same = _pairs(100, 8, seed=5)
  model = siamese.train(a, b, same, siamese.SiameseConfig(features="chi2", steps=50, val_fraction=0))
  model.meta = {"fingerprint": {"model": "m", "dim": 8}}
  siamese.save(model, str(tmp_path / "head"))
  back = siamese.load(str(tmp_path / "head"))
  assert back.config == model.config and back.dim == 8 and back.meta == model.meta
  np.testing.assert_array_equal(back.predict(a, b), model.predict(a, b))
  with pytest.raises(FileExistsError):
    siamese.save(model, str(tmp_path / "head"))
  siamese.save(back, str(tmp_path / "head"), overwrite=True)
  np.testing.assert_array_equal(siamese.load(str(tmp_path / "head")).predict(a, b), model.predict(a, b))
  with pytest.raises(FileNotFoundError, match="no siamese head"):
    siamese.load(str(tmp_path / "nothing"))


def test_folder_pairs_balanced_and_seeded(tmp_path):
  for person, n in (("ann", 3), ("bob", 2), ("cy", 1)):
    os.makedirs(tmp_path / person)
    for k in range(n):
      (tmp_path / person / f"{k}.jpg").write_bytes(b"x")
  (tmp_path / "ann" / "notes.txt").write_text("not an image")
  p1, p2, same = siamese.folder_pairs(str(tmp_path), seed=0)
  assert same.sum() == 4 and (~same).sum() == 4  # 3 + 1 same pairs, as many different
  for x, y, s in zip(p1, p2, same):
    assert (os.path.dirname(x) == os.path.dirname(y)) == s and x != y
  assert len(set(zip(p1, p2))) == 8
  q1, q2, qs = siamese.folder_pairs(str(tmp_path), seed=0)
  assert (q1, q2) == (p1, p2) and np.array_equal(qs, same)  # seeded: reproducible
  p1b, _, sb = siamese.folder_pairs(str(tmp_path), max_pairs=2, seed=0)
  assert sb.sum() == 1 and (~sb).sum() == 1
  with pytest.raises(ValueError, match="at least 2 identity"):
    siamese.folder_pairs(str(tmp_path / "ann"))


def test_train_step_is_pure_and_compiles_once():
  a, b, same = _pairs(32, 8, seed=6)
  x = jnp.asarray(_np_features(a, b, "abs"), jnp.float32)
  y = jnp.asarray(same, jnp.float32)
  graphdef, params = nnx.split(siamese.build_head(8))
  tx = optax.adam(0.1)
  step = siamese.make_train_step(graphdef, tx, 1e-3)
  opt = tx.init(params)
  p1, o1, l1, v1 = step(params, opt, x, y, x, y)
  p2, _, l2, _ = step(params, opt, x, y, x, y)  # same inputs, same outputs: no hidden state
  np.testing.assert_array_equal(np.asarray(p1["w"][...]), np.asarray(p2["w"][...]))
  assert float(l1) == float(l2) and float(v1) < float(l1)  # one Adam step lowers the (unpenalized) loss
  step(p1, o1, x, y, x, y)
  assert step._cache_size() == 1
  eager = siamese.pair_features(a, b, "abs+chi2")
  with jax.disable_jit():
    np.testing.assert_allclose(np.asarray(siamese.pair_features(a, b, "abs+chi2")), np.asarray(eager), rtol=1e-6)
