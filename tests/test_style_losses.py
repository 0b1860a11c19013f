"""Tests for jaxface.losses.style against brute-force NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.losses import style


def _np_gram(a):
  n_h, n_w, n_c = a.shape
  g = np.zeros((n_c, n_c), np.float64)
  for k in range(n_c):
    for kk in range(n_c):
      for i in range(n_h):
        for j in range(n_w):
          g[k, kk] += a[i, j, k] * a[i, j, kk]
  return g


def _np_content(c, g, normalize):
  n_h, n_w, n_c = c.shape
  s = sum((float(c[i, j, k]) - float(g[i, j, k])) ** 2
          for i in range(n_h) for j in range(n_w) for k in range(n_c))
  return s / (4 * n_h * n_w * n_c) if normalize else 0.5 * s


def _np_style_layer(s_act, g_act):
  n_h, n_w, n_c = g_act.shape
  gs, gg = _np_gram(s_act), _np_gram(g_act)
  return sum((gs[k, kk] - gg[k, kk]) ** 2 for k in range(n_c) for kk in range(n_c)) / (
      2 * n_h * n_w * n_c) ** 2


def _np_tv(x):
  h, w, c = x.shape
  t = 0.0
  for i in range(h):
    for j in range(w):
      for k in range(c):
        if i + 1 < h:
          t += (float(x[i + 1, j, k]) - float(x[i, j, k])) ** 2
        if j + 1 < w:
          t += (float(x[i, j + 1, k]) - float(x[i, j, k])) ** 2
  return t


RNG = np.random.default_rng(0)


def test_gram_matches_loops_and_is_symmetric():
  a = RNG.normal(size=(5, 4, 6)).astype(np.float32)
  g = np.asarray(style.gram(jnp.asarray(a)))
  np.testing.assert_allclose(g, _np_gram(a), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(g, g.T)
  batched = np.asarray(style.gram(jnp.stack([a, 2 * a])))
  np.testing.assert_allclose(batched[1], 4 * _np_gram(a), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("normalize", [False, True])
def test_content_cost_matches_loops(normalize):
  c, g = RNG.normal(size=(2, 3, 4, 5)).astype(np.float32)
  got = float(style.content_cost(jnp.asarray(c), jnp.asarray(g), normalize=normalize))
  np.testing.assert_allclose(got, _np_content(c, g, normalize), rtol=1e-5)
  assert float(style.content_cost(jnp.asarray(c), jnp.asarray(c))) == 0.0


def test_style_layer_and_weighted_style_cost_match_loops():
  s1, g1 = RNG.normal(size=(2, 4, 3, 5)).astype(np.float32)
  s2, g2 = RNG.normal(size=(2, 2, 2, 3)).astype(np.float32)
  one = float(style.style_layer_cost(style.gram(jnp.asarray(s1)), jnp.asarray(g1)))
  np.testing.assert_allclose(one, _np_style_layer(s1, g1), rtol=1e-5)
  grams = {"a": style.gram(jnp.asarray(s1)), "b": style.gram(jnp.asarray(s2))}
  acts = {"a": jnp.asarray(g1), "b": jnp.asarray(g2)}
  got = float(style.style_cost(grams, acts, {"a": 0.3, "b": 1.7}))
  want = 0.3 * _np_style_layer(s1, g1) + 1.7 * _np_style_layer(s2, g2)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_style_cost_broadcasts_one_gram_over_a_batch():
  s = RNG.normal(size=(3, 3, 4)).astype(np.float32)
  gs = RNG.normal(size=(3, 3, 3, 4)).astype(np.float32)
  got = np.asarray(style.style_layer_cost(style.gram(jnp.asarray(s)), jnp.asarray(gs)))
  assert got.shape == (3,)
  np.testing.assert_allclose(got, [_np_style_layer(s, g) for g in gs], rtol=1e-5)


def test_total_variation_matches_loops():
  x = RNG.uniform(size=(2, 5, 4, 3)).astype(np.float32)
  got = np.asarray(style.total_variation(jnp.asarray(x)))
  np.testing.assert_allclose(got, [_np_tv(x[0]), _np_tv(x[1])], rtol=1e-5)
  assert float(style.total_variation(jnp.ones((4, 4, 3)))) == 0.0


def test_total_cost_and_blend():
  assert float(style.total_cost(2.0, 3.0, 5.0, alpha=10, beta=40, gamma=0.5)) == 20 + 120 + 2.5
  g1, g2 = jnp.ones((2, 2)), 3 * jnp.ones((2, 2))
  np.testing.assert_allclose(np.asarray(style.blend_grams([g1, g2], [1.0, 3.0])), 2.5 * np.ones((2, 2)))


def test_jit_equals_eager_and_mismatched_shapes_raise():
  c, g = RNG.normal(size=(2, 4, 4, 8)).astype(np.float32)
  f = lambda c, g: style.content_cost(c, g) + style.style_layer_cost(style.gram(c), g)
  np.testing.assert_allclose(float(jax.jit(f)(c, g)), float(f(c, g)), rtol=1e-6)
  with pytest.raises(ValueError, match="same shape"):
    style.content_cost(jnp.zeros((2, 2, 3)), jnp.zeros((2, 3, 3)))
  with pytest.raises(ValueError, match="channels"):
    style.style_layer_cost(jnp.zeros((4, 4)), jnp.zeros((2, 2, 3)))


@pytest.mark.parametrize("shape", [(5, 4, 6), (64, 32, 4), (2, 64, 32, 4)])
def test_gram_value_and_custom_gradient_match_numpy(shape):
  # (64, 32, 4): 2048 positions x 4 channels takes the row-blocked path.
  a = RNG.normal(size=shape).astype(np.float32)
  c = shape[-1]
  target = RNG.normal(size=(c, c)).astype(np.float32)
  flat = a.reshape(shape[:-3] + (-1, c)).astype(np.float64)
  want_g = np.einsum("...pk,...pl->...kl", flat, flat)
  got_g = np.asarray(style.gram(jnp.asarray(a)))
  np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-3)
  # L = sum((T - G)^2): dL/dG = -2 (T - G), dL/dF = F (dL/dG + dL/dG^T).
  loss = lambda x: jnp.sum(jnp.square(target - style.gram(x)))
  d_g = -2.0 * (target.astype(np.float64) - want_g)
  want = (flat @ (d_g + np.swapaxes(d_g, -1, -2))).reshape(shape)
  got = np.asarray(jax.grad(loss)(jnp.asarray(a)))
  scale = np.abs(want).max()
  np.testing.assert_allclose(got / scale, want / scale, atol=2e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(a))), got, rtol=1e-5,
                             atol=1e-5 * scale)
