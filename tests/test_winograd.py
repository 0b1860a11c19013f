"""Tests for jaxface.models.winograd against float64 NumPy convolutions.

Tolerances, relative to the output's largest magnitude: a direct float32
convolution is off by a few 1e-7 here. Winograd F(2x2, 3x3) transforms use only
0, +-1 and 1/2 and stay at that level (bound 3e-6). F(4x4, 3x3) mixes values
with coefficients up to 5 (B^T), 8 (A^T) and 1/24 (G), so the rounding of its
transformed operands is amplified: measured 4e-6 .. 1e-5 of the output scale
for 64 .. 512 input channels (rms 2e-6 .. 3e-6), bounded here by 3e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.models import winograd

TOL = {2: 3e-6, 4: 3e-5}


def _np_conv_same(x, k):
  # x [N, H, W, Cin], k [3, 3, Cin, Cout], float64: cross-correlation, zero padding 1.
  _, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(xp[:, i:i + h, j:j + w] @ k[i, j] for i in range(3) for j in range(3))


def _np_conv_input_grad(dy, k):
  # Adjoint of _np_conv_same in x, tap by tap: y[i, j] += x[i + di - 1, j + dj - 1] @ k[di, dj].
  n, h, w, _ = dy.shape
  dxp = np.zeros((n, h + 2, w + 2, k.shape[2]))
  for di in range(3):
    for dj in range(3):
      dxp[:, di:di + h, dj:dj + w] += dy @ k[di, dj].T
  return dxp[:, 1:-1, 1:-1]


def _rel_err(got, want):
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("m", winograd.TILES)
def test_1d_identity_is_exact(m):
  at, g, bt = winograd.matrices(m)
  a = m + 2
  assert at.shape == (m, a) and g.shape == (a, 3) and bt.shape == (a, a)
  rng = np.random.default_rng(m)
  for _ in range(5):
    d, k = rng.normal(size=a), rng.normal(size=3)
    np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), np.correlate(d, k, "valid"), atol=1e-13)


@pytest.mark.parametrize("m", winograd.TILES)
@pytest.mark.parametrize("shape", [(1, 8, 8, 3, 5), (2, 13, 10, 16, 24), (1, 1, 3, 4, 2)])
def test_conv_matches_numpy_at_any_size(m, shape):
  # Odd and non-multiple sizes (padded up to whole tiles, cropped back), batch > 1, H = 1.
  n, h, w, c, k = shape
  rng = np.random.default_rng(h * w)
  x = rng.normal(size=(n, h, w, c)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, c, k)).astype(np.float32)
  want = _np_conv_same(x.astype(np.float64), kernel.astype(np.float64))
  got = winograd.conv3x3(jnp.asarray(x), winograd.transform_kernel(jnp.asarray(kernel), m))
  assert got.shape == (n, h, w, k) and got.dtype == jnp.float32
  assert _rel_err(got, want) < TOL[m]
  # And against XLA's convolution, within the same bound.
  lax = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert _rel_err(got, np.asarray(lax, np.float64)) < TOL[m]


def test_kernel_transform_matches_numpy():
  kernel = np.random.default_rng(0).normal(size=(3, 3, 2, 3))
  _, g, _ = winograd.matrices(4)
  u = np.asarray(winograd.transform_kernel(jnp.asarray(kernel, jnp.float32), 4))
  assert u.shape == (6, 6, 2, 3) and u.dtype == np.float32
  for ci in range(2):
    for co in range(3):
      np.testing.assert_allclose(u[:, :, ci, co], g @ kernel[:, :, ci, co] @ g.T, rtol=1e-6,
                                 atol=1e-6)


@pytest.mark.parametrize("m", winograd.TILES)
def test_vjp_input_gradient_matches_numpy_adjoint_and_jits_once(m):
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 9, 6, 8)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 8, 12)).astype(np.float32)
  w = rng.normal(size=(2, 9, 6, 12)).astype(np.float32)
  k_t = jnp.transpose(jnp.asarray(kernel)[::-1, ::-1], (0, 1, 3, 2))
  u = winograd.transform_kernel(jnp.asarray(kernel), m)
  u_t = winograd.transform_kernel(k_t, m)
  loss = lambda x, u, u_t: jnp.sum(winograd.conv3x3_vjp(x, u, u_t) * w)
  f = jax.jit(jax.value_and_grad(loss))
  value, dx = f(jnp.asarray(x), u, u_t)
  want_y = _np_conv_same(x.astype(np.float64), kernel.astype(np.float64))
  want_dx = _np_conv_input_grad(w.astype(np.float64), kernel.astype(np.float64))
  np.testing.assert_allclose(float(value), np.sum(want_y * w), rtol=TOL[m])
  assert _rel_err(dx, want_dx) < TOL[m]
  # Eager gives the same numbers; a second call with new values does not recompile.
  e_value, e_dx = jax.value_and_grad(loss)(jnp.asarray(x), u, u_t)
  np.testing.assert_allclose(float(e_value), float(value), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(e_dx), np.asarray(dx), rtol=1e-5, atol=1e-5 * np.abs(dx).max())
  f(jnp.asarray(x) + 1, u, u_t)
  assert f._cache_size() == 1
  # Plain conv3x3 differentiates too (JAX's own adjoint of the same computation).
  dx_auto = jax.grad(lambda x: jnp.sum(winograd.conv3x3(x, u) * w))(jnp.asarray(x))
  assert _rel_err(dx_auto, want_dx) < TOL[m]


def test_bad_inputs_raise_value_error():
  u = winograd.transform_kernel(jnp.zeros((3, 3, 4, 5)), 4)
  with pytest.raises(ValueError, match="x: expected"):
    winograd.conv3x3(jnp.zeros((8, 8, 4)), u)
  with pytest.raises(ValueError, match="4 input channels, x has 3"):
    winograd.conv3x3(jnp.zeros((1, 8, 8, 3)), u)
  with pytest.raises(ValueError, match="u: expected"):
    winograd.conv3x3(jnp.zeros((1, 8, 8, 4)), jnp.zeros((5, 5, 4, 5)))
  with pytest.raises(ValueError, match="kernel: expected"):
    winograd.transform_kernel(jnp.zeros((5, 5, 4, 5)))
  with pytest.raises(ValueError, match="m=3"):
    winograd.matrices(3)
