"""Running per-unit top-k vs. a NumPy reference over the whole stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.visualize import topk


def _reference(acts, k):
  """Slow, obvious: per unit, sort all images by their spatial maximum (earlier image first on ties)."""
  n, h, w, u = acts.shape
  val = np.empty((u, k), np.float32)
  img = np.empty((u, k), np.int64)
  ys = np.empty((u, k), np.int64)
  xs = np.empty((u, k), np.int64)
  for unit in range(u):
    per_image = []
    for i in range(n):
      m = acts[i, :, :, unit]
      pos = int(np.argmax(m))  # first in row-major order among ties
      per_image.append((-m.flat[pos], i, pos // w, pos % w))
    per_image.sort(key=lambda t: (t[0], t[1]))
    for j, (v, i, y, x) in enumerate(per_image[:k]):
      val[unit, j], img[unit, j], ys[unit, j], xs[unit, j] = -v, i, y, x
  return val, img, ys, xs


def _stream(acts, k, batch, fn):
  n, h, w, u = acts.shape
  state = topk.init(u, k)
  for start in range(0, n, batch):
    chunk = acts[start:start + batch]
    ids = np.arange(start, start + len(chunk), dtype=np.int32)
    if len(chunk) < batch:  # pad the last batch, as the runner does
      pad = batch - len(chunk)
      chunk = np.concatenate([chunk, np.full((pad, h, w, u), 1e6, np.float32)])
      ids = np.concatenate([ids, np.full(pad, -1, np.int32)])
    state = fn(state, jnp.asarray(chunk), jnp.asarray(ids))
  return jax.tree.map(np.asarray, state)


@pytest.mark.parametrize("batch", [1, 4, 7])
def test_streamed_top_k_equals_reference(batch):
  rng = np.random.default_rng(0)
  acts = rng.normal(size=(23, 5, 6, 4)).astype(np.float32)
  acts[3, 2, 2, 1] = acts[9, 4, 1, 1] = 50.0  # tie across images: the earlier image ranks first
  s = _stream(acts, 9, batch, topk.update)
  val, img, ys, xs = _reference(acts, 9)
  np.testing.assert_array_equal(s["value"], val)
  np.testing.assert_array_equal(s["image"], img)
  np.testing.assert_array_equal(s["y"], ys)
  np.testing.assert_array_equal(s["x"], xs)
  assert s["image"][1, 0] == 3 and s["image"][1, 1] == 9
  # The padding rows (value 1e6) were never selected, and every unit's images are distinct.
  assert s["value"].max() < 1e6
  assert all(len(set(row)) == 9 for row in s["image"])
  np.testing.assert_allclose(s["total"], acts.max(axis=(1, 2)).sum(axis=0), rtol=1e-5)


def test_fewer_images_than_k_leaves_empty_slots():
  acts = np.random.default_rng(1).normal(size=(3, 2, 2, 2)).astype(np.float32)
  s = _stream(acts, 5, 4, topk.update)
  assert (s["image"][:, 3:] == -1).all() and np.isneginf(s["value"][:, 3:]).all()
  assert sorted(s["image"][0, :3]) == [0, 1, 2]


def test_jit_equals_eager_and_second_call_does_not_recompile():
  acts = np.random.default_rng(2).normal(size=(12, 3, 4, 3)).astype(np.float32)
  eager = _stream(acts, 4, 4, topk.update_impl)
  # A fresh function: jit caches are shared by every jit of the same function object.
  jitted = jax.jit(lambda s, a, i: topk.update_impl(s, a, i), donate_argnums=0)
  got = _stream(acts, 4, 4, jitted)
  for key in eager:
    np.testing.assert_array_equal(got[key], eager[key])
  assert jitted._cache_size() == 1


def test_spatial_max_positions():
  a = np.zeros((2, 3, 4, 2), np.float32)
  a[0, 2, 1, 0] = 5
  a[1, 0, 3, 1] = 7
  val, y, x = topk.spatial_max(jnp.asarray(a))
  assert (np.asarray(y)[0, 0], np.asarray(x)[0, 0]) == (2, 1)
  assert (np.asarray(y)[1, 1], np.asarray(x)[1, 1]) == (0, 3)
  assert np.asarray(val)[1, 1] == 7


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_units"):
    topk.init(0, 9)
  with pytest.raises(ValueError, match="k must"):
    topk.init(3, 0)
  with pytest.raises(ValueError, match=r"\[B, H, W, U\]"):
    topk.spatial_max(jnp.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="values must be"):
    topk.merge(topk.init(3, 2), jnp.zeros((4, 5)), jnp.zeros(4, jnp.int32),
               jnp.zeros((4, 5), jnp.int32), jnp.zeros((4, 5), jnp.int32))
