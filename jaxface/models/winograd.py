"""Winograd convolution for stride-1 SAME 3x3 convolutions (NHWC / HWIO, float32).

:func:`transform_kernel` computes the kernel transform ``U = G g G^T`` once per
weight set; :func:`conv3x3` convolves with it, and :func:`conv3x3_vjp` also
takes the input gradient as one more Winograd convolution.
``jaxface.models.vgg19.input_grad_kernels`` chooses per layer between this and
XLA's convolution (speed: BUILD.md, "Neural style transfer").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Precision.HIGHEST: plain float32 products on every backend (accelerators
# would otherwise use bf16 passes). On CPU it is what XLA does anyway.
_HIGHEST = jax.lax.Precision.HIGHEST

# Output tile sizes with transforms below.
TILES = (2, 4)


@functools.cache
def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(AT [m, a], G [a, 3], BT [a, a])`` float64 of F(m, 3), ``a = m + 2``.

  Interpolation points 0, 1, -1 (, 2, -2) and infinity (Lavin & Gray, 2016).
  The 1-D identity ``AT @ ((G @ g) * (BT @ d)) == correlate(d, g)`` (valid,
  ``d`` of length ``a``) holds exactly; the 2-D form nests it.
  """
  if m == 2:
    at = [[1, 1, 1, 0],
          [0, 1, -1, -1]]
    g = [[1, 0, 0],
         [1 / 2, 1 / 2, 1 / 2],
         [1 / 2, -1 / 2, 1 / 2],
         [0, 0, 1]]
    bt = [[1, 0, -1, 0],
          [0, 1, 1, 0],
          [0, -1, 1, 0],
          [0, 1, 0, -1]]
  elif m == 4:
    at = [[1, 1, 1, 1, 1, 0],
          [0, 1, -1, 2, -2, 0],
          [0, 1, 1, 4, 4, 0],
          [0, 1, -1, 8, -8, 1]]
    g = [[1 / 4, 0, 0],
         [-1 / 6, -1 / 6, -1 / 6],
         [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6],
         [0, 0, 1]]
    bt = [[4, 0, -5, 0, 1, 0],
          [0, -4, -4, 1, 1, 0],
          [0, 4, -4, -1, 1, 0],
          [0, -2, -1, 2, 1, 0],
          [0, 2, -1, -2, 1, 0],
          [0, 4, 0, -5, 0, 1]]
  else:
    raise ValueError(f"m={m}: Winograd output tile must be one of {TILES}")
  return np.array(at, np.float64), np.array(g, np.float64), np.array(bt, np.float64)


def transform_kernel(kernel: jax.Array, m: int = 4) -> jax.Array:
  """``[3, 3, Cin, Cout] float32 -> U = G g G^T [a, a, Cin, Cout] float32`` (``a = m + 2``).

  Computed in float32 from exact float64 coefficients; do it once per weight set.
  """
  if kernel.ndim != 4 or kernel.shape[:2] != (3, 3):
    raise ValueError(f"kernel: expected [3, 3, Cin, Cout], got shape {kernel.shape}")
  _, g, _ = matrices(m)
  g = jnp.asarray(g, jnp.float32)
  return jnp.einsum("xi,yj,ijck->xyck", g, g, kernel.astype(jnp.float32), precision=_HIGHEST)


def _combine(terms, coeffs):
  """``sum_i coeffs[i] * terms[i]``, skipping zeros; +-1 as add / subtract (exact)."""
  out = None
  for c, t in zip(coeffs, terms):
    if c == 0:
      continue
    if c == 1:
      v, neg = t, False
    elif c == -1:
      v, neg = t, True
    else:
      v, neg = t * np.float32(c), False
    if out is None:
      out = -v if neg else v
    else:
      out = out - v if neg else out + v
  return out


def conv3x3(x: jax.Array, u: jax.Array) -> jax.Array:
  """SAME, stride-1 3x3 cross-correlation (no bias) by Winograd F(m x m, 3 x 3).

  An ``m x m`` output tile from an ``a x a`` input tile (``a = m + 2``) is
  ``Y = A^T [ (G g G^T) * (B^T d B) ] A`` with ``*`` elementwise: ``a^2``
  multiplies per tile and channel pair instead of ``9 m^2``. Over channels the
  elementwise products become ``a^2`` independent matrix products
  ``[tiles, Cin] x [Cin, Cout]``, which is where the time goes; F(4x4, 3x3) does
  36 of them for 16 outputs (4x fewer multiplies than a direct convolution),
  F(2x2, 3x3) 16 for 4 (2.25x fewer). The input and output transforms are sums
  of strided slices with small constant coefficients, written out so that XLA
  fuses them into a few memory-bound loops.

  Rounding: the transforms mix values with coefficients up to 5 (B), 8 (A) and
  1/24 (G) in F(4x4, 3x3), so float32 results differ from the exact convolution
  by up to about 1e-5 of the output's largest magnitude (rms 2e-6 .. 3e-6 for
  64 .. 512 input channels; a direct float32 convolution: about 5e-7;
  ``tests/test_winograd.py`` bounds it). F(2x2, 3x3) only uses coefficients 0,
  +-1 and 1/2 and is about as exact as a direct convolution.

  Args:
    x: ``[N, H, W, Cin] float32`` (any H, W >= 1; padded up to whole tiles).
    u: ``transform_kernel(kernel, m)`` ``[a, a, Cin, Cout] float32``; ``m = a - 2``.

  Returns:
    ``[N, H, W, Cout] float32``, equal to
    ``lax.conv_general_dilated(x, kernel, (1, 1), "SAME", ("NHWC", "HWIO", "NHWC"))``
    up to float32 rounding.
  """
  if x.ndim != 4:
    raise ValueError(f"x: expected [N, H, W, Cin], got shape {x.shape}")
  if u.ndim != 4 or u.shape[0] != u.shape[1] or u.shape[0] - 2 not in TILES:
    raise ValueError(f"u: expected [a, a, Cin, Cout] with a - 2 in {TILES}, got shape {u.shape}")
  if u.shape[2] != x.shape[3]:
    raise ValueError(f"u has {u.shape[2]} input channels, x has {x.shape[3]}")
  a = u.shape[0]
  m = a - 2
  at, _, bt = matrices(m)
  n, h, w, c = x.shape
  k = u.shape[3]
  th, tw = -(-h // m), -(-w // m)
  # SAME padding 1, plus whatever completes the last tile row / column.
  xp = jnp.pad(x, ((0, 0), (1, th * m + 1 - h), (1, tw * m + 1 - w), (0, 0)))
  # Input transform V = B^T d B of every tile: tile (i, j) starts at padded
  # (i m, j m), so "row p of every tile" is a strided slice. Rows first, then
  # columns on all a row-transforms at once (a small program: XLA's compile
  # time grows with the number of distinct fused expressions).
  rows = [xp[:, p: p + m * (th - 1) + 1: m] for p in range(a)]  # a x [N, th, W', C]
  r = jnp.stack([_combine(rows, bt[i]) for i in range(a)])  # [a, N, th, W', C]
  cols = [r[:, :, :, q: q + m * (tw - 1) + 1: m] for q in range(a)]  # a x [a, N, th, tw, C]
  v = jnp.stack([_combine(cols, bt[j]) for j in range(a)], axis=1)  # [a, a, N, th, tw, C]
  # a^2 independent products [tiles, Cin] x [Cin, Cout].
  prod = jnp.einsum("xtc,xck->xtk", v.reshape(a * a, n * th * tw, c), u.reshape(a * a, c, k),
                    precision=_HIGHEST).reshape(a, a, n, th, tw, k)
  # Output transform Y = A^T M A (columns, then rows), then tiles back in place.
  z = jnp.stack([_combine([prod[:, j] for j in range(a)], at[s]) for s in range(m)], axis=1)
  y = jnp.stack([_combine([z[i] for i in range(a)], at[r]) for r in range(m)])  # [m, m, N, th, tw, K]
  y = jnp.transpose(y, (2, 3, 0, 4, 1, 5)).reshape(n, th * m, tw * m, k)
  return y[:, :h, :w]


@jax.custom_vjp
def conv3x3_vjp(x: jax.Array, u: jax.Array, u_t: jax.Array) -> jax.Array:
  """``conv3x3(x, u)`` whose input gradient is ``conv3x3(dy, u_t)``.

  ``u_t = transform_kernel(flipped, in/out-swapped kernel)`` (see
  ``jaxface.models.vgg19.input_grad_kernel``): the input gradient of a SAME
  stride-1 3x3 convolution is the SAME convolution of the output gradient with
  that kernel, so the backward pass is one more Winograd convolution. (JAX's
  own autodiff of ``conv3x3`` is the exact adjoint of the same computation, but
  XLA runs it, strided-slice transposes and overlapping tiles added back, many
  times slower than the forward pass on CPU.) ``u`` and ``u_t`` get zero
  cotangents (only the input is optimised).
  """
  return conv3x3(x, u)


def _vjp_fwd(x, u, u_t):
  return conv3x3(x, u), (u, u_t)


def _vjp_bwd(res, dy):
  u, u_t = res
  return conv3x3(dy, u_t), jnp.zeros_like(u), jnp.zeros_like(u_t)


conv3x3_vjp.defvjp(_vjp_fwd, _vjp_bwd)
