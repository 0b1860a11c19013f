"""Squared Euclidean distances for embedding losses.

Both functions return *squared* distances. The square root is deliberately
never taken: its derivative is infinite at zero distance, which produces NaN
gradients for duplicate embeddings (common in face batches that contain the
same image twice, or when an encoder collapses early in training).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["pairwise_sq_distances", "sq_distance"]


def _check_2d(name: str, x: jax.Array) -> None:
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")


def pairwise_sq_distances(a: jax.Array, b: jax.Array | None = None) -> jax.Array:
  """All-pairs squared Euclidean distances.

  Uses the matmul expansion |a|^2 + |b|^2 - 2 a.b, which is O(N*M) memory
  instead of the O(N*M*D) of broadcasting the differences.

  Args:
    a: `[N, D]` float32 embeddings.
    b: `[M, D]` float32 embeddings, or None to compare `a` with itself.

  Returns:
    `[N, M]` float32, `out[i, j] = |a_i - b_j|^2`, always >= 0. With `b=None`
    the diagonal is exactly 0. Gradients are finite everywhere, including at
    zero distance.

  Raises:
    ValueError: if `a` or `b` is not 2-D, or their feature sizes differ.
  """
  a = jnp.asarray(a)
  _check_2d("a", a)
  same = b is None
  if same:
    b = a
  else:
    b = jnp.asarray(b)
    _check_2d("b", b)
    if a.shape[1] != b.shape[1]:
      raise ValueError(
          f"a and b must have the same feature size, got a {tuple(a.shape)} "
          f"and b {tuple(b.shape)}")
  sq_a = jnp.sum(a * a, axis=-1)
  sq_b = jnp.sum(b * b, axis=-1)
  # HIGHEST: on TPU/GPU the default matmul precision rounds inputs to
  # bfloat16/tf32, and the cancellation in |a|^2 + |b|^2 - 2ab would then
  # swamp small distances (exactly the hard pairs a triplet loss cares about).
  dot = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  d = sq_a[:, None] + sq_b[None, :] - 2.0 * dot
  # Rounding can make the expansion slightly negative for (near-)identical
  # rows. The clamp has zero gradient there, which matches the true gradient
  # 2 (a_i - b_j) = 0 of the squared distance at coincident points.
  d = jnp.maximum(d, 0.0)
  if same:
    # The expansion leaves O(eps * |a|^2) residue on the diagonal; the true
    # value is exactly 0, and a constant keeps its gradient exactly 0 too.
    n = a.shape[0]
    d = jnp.where(jnp.eye(n, dtype=bool), jnp.zeros((), d.dtype), d)
  return d


def sq_distance(x1: jax.Array, x2: jax.Array) -> jax.Array:
  """Row-wise squared Euclidean distance between paired embeddings.

  Computed from the differences (not the matmul expansion), so it is exact up
  to one rounding per term and exactly 0 for identical rows.

  Args:
    x1: `[B, D]` float32.
    x2: `[B, D]` float32, same shape as `x1`.

  Returns:
    `[B]` float32, `out[i] = |x1_i - x2_i|^2`.

  Raises:
    ValueError: if the inputs are not 2-D or their shapes differ.
  """
  x1 = jnp.asarray(x1)
  x2 = jnp.asarray(x2)
  _check_2d("x1", x1)
  _check_2d("x2", x2)
  if x1.shape != x2.shape:
    raise ValueError(
        f"x1 and x2 must have the same shape, got x1 {tuple(x1.shape)} and "
        f"x2 {tuple(x2.shape)}")
  diff = x1 - x2
  return jnp.sum(diff * diff, axis=-1)
