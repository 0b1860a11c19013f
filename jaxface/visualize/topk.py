"""Running top-k per unit over a stream of activation maps (pure jnp).

For each unit (channel) the visualizer keeps the k images whose strongest
response is largest, with the position of that response (state: :func:`init`).
Each image contributes at most once per unit (its spatial maximum), so the k
patches of a unit come from k different images, as in Zeiler & Fergus' figures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TopK = dict[str, jax.Array]


def init(num_units: int, k: int) -> TopK:
  """Empty running top-k for ``num_units`` units.

  State (a dict pytree): ``value`` ``[U, k]`` float32 (``-inf`` where empty),
  ``image`` ``[U, k]`` int32 (global image index, -1 where empty), ``y`` / ``x``
  ``[U, k]`` int32 (position in the activation map), and ``total`` ``[U]``
  float32, the sum over images of each unit's spatial maximum (to rank units
  by how active they are). O(U * k): only one batch of activations is alive at
  a time.
  """
  if not isinstance(num_units, int) or num_units < 1:
    raise ValueError(f"num_units must be a positive int, got {num_units!r}")
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}")
  shape = (num_units, k)
  return {
      "value": jnp.full(shape, -jnp.inf, jnp.float32),
      "image": jnp.full(shape, -1, jnp.int32),
      "y": jnp.zeros(shape, jnp.int32),
      "x": jnp.zeros(shape, jnp.int32),
      "total": jnp.zeros((num_units,), jnp.float32),
  }


def spatial_max(acts: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per image and unit, the largest activation and where it is.

  Args:
    acts: ``[B, H, W, U]`` activations.

  Returns:
    (values ``[B, U]`` float32, y ``[B, U]`` int32, x ``[B, U]`` int32); ties
    go to the first position in row-major order.
  """
  if acts.ndim != 4:
    raise ValueError(f"acts must be [B, H, W, U], got shape {acts.shape}")
  b, h, w, u = acts.shape
  flat = acts.reshape(b, h * w, u).astype(jnp.float32)
  pos = jnp.argmax(flat, axis=1).astype(jnp.int32)
  val = jnp.take_along_axis(flat, pos[:, None, :], axis=1)[:, 0, :]
  return val, pos // w, pos % w


def merge(state: TopK, values: jax.Array, image: jax.Array, y: jax.Array, x: jax.Array) -> TopK:
  """Merges one batch's per-image maxima into the running top-k.

  Args:
    state: running top-k.
    values: ``[B, U]`` float32 per-image maxima; entries of padding images
      should be ``-inf`` (see ``update``).
    image: ``[B]`` int32 global image indices.
    y, x: ``[B, U]`` int32 positions of the maxima.

  Returns:
    The new state (``total`` unchanged), each unit's values sorted descending;
    among equal values the earlier-held entry (then the earlier image in the
    batch) ranks first, so results do not depend on batch boundaries.
  """
  u, k = state["value"].shape
  if values.ndim != 2 or values.shape[1] != u:
    raise ValueError(f"values must be [B, {u}], got shape {values.shape}")
  b = values.shape[0]
  cat = lambda held, new: jnp.concatenate([held, new], axis=1)  # [U, k + B]
  all_val = cat(state["value"], values.T.astype(jnp.float32))
  all_img = cat(state["image"], jnp.broadcast_to(image.astype(jnp.int32)[None, :], (u, b)))
  all_y = cat(state["y"], y.T.astype(jnp.int32))
  all_x = cat(state["x"], x.T.astype(jnp.int32))
  # lax.top_k is stable (lower index first among ties), so held entries win ties.
  top_val, idx = jax.lax.top_k(all_val, k)
  take = lambda a: jnp.take_along_axis(a, idx, axis=1)
  # An empty (-inf) slot keeps image -1 even if it was filled from padding.
  empty = top_val == -jnp.inf
  return {
      "value": top_val,
      "image": jnp.where(empty, -1, take(all_img)),
      "y": take(all_y),
      "x": take(all_x),
      "total": state["total"],
  }


def update_impl(state: TopK, acts: jax.Array, image: jax.Array) -> TopK:
  """Running top-k after one batch of activation maps.

  Args:
    state: running top-k.
    acts: ``[B, H, W, U]`` activations of a batch.
    image: ``[B]`` int32 global image indices; a negative index marks a
      padding image (a short last batch), which is never selected.

  Returns:
    The new state.
  """
  val, y, x = spatial_max(acts)
  real = (image >= 0)[:, None]
  new = merge(state, jnp.where(real, val, -jnp.inf), image, y, x)
  new["total"] = state["total"] + jnp.sum(jnp.where(real, val, 0.0), axis=0)
  return new


# Jitted and donating the state: the buffers are reused batch after batch.
update = jax.jit(update_impl, donate_argnums=0)

