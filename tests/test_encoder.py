"""Tests for jaxface.models.encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxface.models import encoder as enc

SMALL = dict(stem_width=8, widths=(8, 16), depths=(1, 1), embedding_dim=16)


@pytest.mark.parametrize("rank,shape", [(1, (3, 40, 2)), (2, (3, 24, 20, 3)), (3, (2, 12, 12, 12, 1))])
def test_shapes_and_unit_norm_for_every_spatial_rank(rank, shape):
  m = enc.build_encoder(enc.EncoderSpec(spatial_rank=rank, in_channels=shape[-1], **SMALL))
  x = jax.random.uniform(jax.random.key(0), shape)
  for train in (False, True):
    e = m(x, train=train)
    assert e.shape == (shape[0], 16) and e.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(e), axis=-1), 1.0, atol=1e-5)


def test_without_l2_normalization_norms_vary():
  m = enc.build_encoder(enc.EncoderSpec(l2_normalize=False, **SMALL))
  e = np.asarray(m(jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))))
  assert np.ptp(np.linalg.norm(e, axis=-1)) > 1e-4


def test_wrong_input_shape_is_a_clear_error():
  m = enc.build_encoder(enc.EncoderSpec(**SMALL))
  with pytest.raises(ValueError, match=r"got shape \(2, 16, 16, 1\)"):
    m(jnp.zeros((2, 16, 16, 1)))
  with pytest.raises(ValueError, match="rank 4"):
    m(jnp.zeros((16, 16, 3)))


@pytest.mark.parametrize("kwargs", [dict(spatial_rank=4), dict(widths=(8,), depths=(1, 1)),
                                    dict(embedding_dim=0)])
def test_bad_spec_is_rejected(kwargs):
  with pytest.raises(ValueError):
    enc.EncoderSpec(**{**SMALL, **kwargs})


def test_functional_apply_matches_module_jit_equals_eager_and_no_recompile():
  m = enc.build_encoder(enc.EncoderSpec(**SMALL), seed=3)
  x = jax.random.uniform(jax.random.key(2), (5, 20, 20, 3))
  ref = np.asarray(m(x, train=False))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  eager, _ = enc.apply(graphdef, params, rest, x)
  traces = []

  def f(p, r, x):
    traces.append(1)
    return enc.apply(graphdef, p, r, x)[0]

  jf = jax.jit(f)
  a = jf(params, rest, x)
  b = jf(params, rest, x + 0.1)
  # Float32 convolutions compiled vs op-by-op may differ in summation order only.
  np.testing.assert_allclose(np.asarray(eager), ref, atol=1e-6)
  np.testing.assert_allclose(np.asarray(a), ref, atol=2e-5)
  assert len(traces) == 1 and not np.allclose(a, b)


def test_train_mode_updates_batch_stats_and_eval_mode_does_not():
  m = enc.build_encoder(enc.EncoderSpec(**SMALL))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  x = jax.random.uniform(jax.random.key(4), (6, 16, 16, 3))
  _, rest_eval = enc.apply(graphdef, params, rest, x, train=False)
  _, rest_train = enc.apply(graphdef, params, rest, x, train=True)
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), rest, rest_eval)
  assert all(jax.tree.leaves(same))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), rest, rest_train)
  assert any(jax.tree.leaves(changed))


def test_vmap_over_single_examples_equals_batched_eval():
  m = enc.build_encoder(enc.EncoderSpec(**SMALL), seed=5)
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  x = jax.random.uniform(jax.random.key(6), (4, 16, 16, 3))
  batched = enc.apply(graphdef, params, rest, x)[0]
  one = lambda xi: enc.apply(graphdef, params, rest, xi[None])[0][0]
  looped = jnp.stack([one(xi) for xi in x])
  np.testing.assert_allclose(np.asarray(jax.vmap(one)(x)), np.asarray(batched), atol=2e-5)
  np.testing.assert_allclose(np.asarray(looped), np.asarray(batched), atol=2e-5)


def test_gradients_are_finite_for_constant_input():
  m = enc.build_encoder(enc.EncoderSpec(**SMALL))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  g = jax.grad(lambda p: jnp.sum(enc.apply(graphdef, p, rest, jnp.zeros((3, 16, 16, 3)), True)[0]))(params)
  assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(g))


def test_parse_ints():
  assert enc.parse_ints("32, 64,128") == (32, 64, 128)
  with pytest.raises(ValueError, match="comma-separated"):
    enc.parse_ints("3x")


def test_flatten_pool_keeps_layout_and_checks_input_size():
  spec = enc.EncoderSpec(pool="flatten", input_size=(20, 16), stem_stride=2, **SMALL)
  assert spec.feature_size() == (5, 4)  # 20x16 -> stem /2 -> 10x8 -> stage 2 /2 -> 5x4
  m = enc.build_encoder(spec)
  x = jax.random.uniform(jax.random.key(7), (3, 20, 16, 3))
  assert m(x).shape == (3, 16)
  avg = enc.build_encoder(enc.EncoderSpec(**SMALL))
  assert avg.head.in_features == 16 and m.head.in_features == 16 * 5 * 4
  with pytest.raises(ValueError, match="built for input size"):
    m(jnp.zeros((1, 24, 16, 3)))
  with pytest.raises(ValueError, match="needs input_size"):
    enc.EncoderSpec(pool="flatten", **SMALL)
