"""Tests for jaxface.losses.distances against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.losses import pairwise_sq_distances, sq_distance

# float32 inputs of norm ~1-10: the matmul expansion |a|^2 + |b|^2 - 2ab loses
# a few ulp of |a|^2 (~1e-6 absolute at |a|^2 ~ 10), hence atol 1e-5; rtol
# 1e-5 covers the large entries.
RTOL = 1e-5
ATOL = 1e-5


def _np_pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a.astype(np.float64)
  b = b.astype(np.float64)
  return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _rand(shape, seed=0, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(
      np.float32)


def test_pairwise_matches_numpy_two_inputs():
  a = _rand((7, 16), 0)
  b = _rand((5, 16), 1)
  out = pairwise_sq_distances(a, b)
  assert out.shape == (7, 5) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _np_pairwise(a, b), rtol=RTOL, atol=ATOL)


def test_pairwise_self_matches_numpy_and_zero_diagonal():
  # Large norms make the expansion's diagonal residue nonzero in float32; it
  # must still come out exactly 0.
  a = _rand((9, 32), 2, scale=30.0)
  out = np.asarray(pairwise_sq_distances(a))
  np.testing.assert_array_equal(np.diag(out), np.zeros(9, np.float32))
  ref = _np_pairwise(a, a)
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL * ref.max())
  np.testing.assert_allclose(out, out.T, rtol=0, atol=ATOL * ref.max())


def test_pairwise_clamped_non_negative_for_duplicates():
  # Identical rows in different positions: the expansion can round below 0.
  rng = np.random.default_rng(3)
  base = (rng.normal(size=(4, 64)) * 17.0).astype(np.float32)
  a = np.concatenate([base, base, base], axis=0)
  out = np.asarray(pairwise_sq_distances(a, a[::-1]))
  assert (out >= 0).all()
  out_self = np.asarray(pairwise_sq_distances(a))
  assert (out_self >= 0).all()
  # Off-diagonal duplicates are ~0 relative to |a|^2.
  scale = float((base.astype(np.float64) ** 2).sum(1).max())
  assert abs(out_self[0, 4]) <= 1e-6 * scale


def test_pairwise_gradient_matches_analytic_with_duplicates():
  # f = sum_ij W_ij d_ij; df/dx_i = 2 sum_k (W_ik + W_ki) (x_i - x_k), which is
  # finite (and well defined) at zero distance.
  rng = np.random.default_rng(4)
  x = rng.normal(size=(6, 8)).astype(np.float32)
  x[3] = x[0]
  x[5] = x[0]
  w = rng.normal(size=(6, 6)).astype(np.float32)
  g = jax.grad(lambda e: jnp.sum(w * pairwise_sq_distances(e)))(x)
  assert np.isfinite(np.asarray(g)).all()
  x64 = x.astype(np.float64)
  ws = (w + w.T).astype(np.float64)
  ref = 2.0 * (ws.sum(1)[:, None] * x64 - ws @ x64)
  np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4)


def test_pairwise_gradient_two_inputs():
  a = _rand((4, 3), 5)
  b = _rand((6, 3), 6)
  w = _rand((4, 6), 7)
  ga, gb = jax.grad(lambda p, q: jnp.sum(w * pairwise_sq_distances(p, q)),
                    argnums=(0, 1))(a, b)
  a64, b64, w64 = (v.astype(np.float64) for v in (a, b, w))
  ref_a = 2.0 * (w64.sum(1)[:, None] * a64 - w64 @ b64)
  ref_b = 2.0 * (w64.sum(0)[:, None] * b64 - w64.T @ a64)
  np.testing.assert_allclose(ga, ref_a, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gb, ref_b, rtol=1e-4, atol=1e-4)


def test_pairwise_gradient_at_identical_inputs_is_zero():
  x = _rand((5, 4), 8)
  # Only the zero-distance pair (2, 2) is weighted: its gradient
  # 2 (e_2 - x_2) vanishes at e = x.
  onehot = np.zeros((5, 5), np.float32)
  onehot[2, 2] = 1.0
  g = jax.grad(lambda e: jnp.sum(onehot * pairwise_sq_distances(e, x)))(x)
  assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_allclose(g, 0.0, atol=1e-5)


def test_pairwise_jit_equals_eager():
  a = _rand((8, 12), 9)
  b = _rand((3, 12), 10)
  np.testing.assert_allclose(jax.jit(pairwise_sq_distances)(a, b),
                             pairwise_sq_distances(a, b), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(pairwise_sq_distances)(a),
                             pairwise_sq_distances(a), rtol=1e-6, atol=1e-6)


def test_sq_distance_matches_numpy_and_pairwise_diagonal():
  x1 = _rand((10, 16), 11)
  x2 = _rand((10, 16), 12)
  out = sq_distance(x1, x2)
  assert out.shape == (10,) and out.dtype == jnp.float32
  ref = ((x1.astype(np.float64) - x2) ** 2).sum(1)
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(out, np.diag(pairwise_sq_distances(x1, x2)),
                             rtol=RTOL, atol=ATOL)


def test_sq_distance_identical_rows_zero_with_zero_gradient():
  x = _rand((3, 5), 13, scale=20.0)
  np.testing.assert_array_equal(sq_distance(x, x), np.zeros(3, np.float32))
  g1, g2 = jax.grad(lambda a, b: jnp.sum(sq_distance(a, b)),
                    argnums=(0, 1))(x, x)
  np.testing.assert_array_equal(g1, np.zeros_like(x))
  np.testing.assert_array_equal(g2, np.zeros_like(x))


def test_sq_distance_vmap_equals_loop():
  x1 = _rand((4, 6, 3), 14)
  x2 = _rand((4, 6, 3), 15)
  batched = jax.vmap(sq_distance)(x1, x2)
  looped = np.stack([sq_distance(x1[i], x2[i]) for i in range(4)])
  np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "args, name",
    [
        ((np.zeros(4, np.float32),), "a"),
        ((np.zeros((2, 3, 4), np.float32),), "a"),
        ((np.zeros((2, 4), np.float32), np.zeros(4, np.float32)), "b"),
        ((np.zeros((2, 4), np.float32), np.zeros((3, 5), np.float32)), "b"),
    ])
def test_pairwise_bad_input_raises(args, name):
  with pytest.raises(ValueError, match=name):
    pairwise_sq_distances(*args)


@pytest.mark.parametrize(
    "x1, x2, name",
    [
        (np.zeros(4, np.float32), np.zeros((1, 4), np.float32), "x1"),
        (np.zeros((2, 4), np.float32), np.zeros((2, 4, 1), np.float32), "x2"),
        (np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32), "x2"),
    ])
def test_sq_distance_bad_input_raises(x1, x2, name):
  with pytest.raises(ValueError, match=name):
    sq_distance(x1, x2)
