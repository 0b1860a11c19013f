"""jaxface.jit_cache: one jitted program per static key, compiled once per shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface import jit_cache, xla_options


def test_one_program_per_key_compiled_once_per_shape():
  traces, builds = [], []

  def build(key):
    builds.append(key)
    scale, offset = key

    def fn(x):
      traces.append(x.shape)  # runs once per trace, never per call
      return x * scale + offset

    return fn

  cache = jit_cache.JitCache(build)
  assert len(cache) == 0 and cache._cache_size() == 0   # nothing built at construction
  f = cache.get((2.0, 1.0))
  assert cache.get((2.0, 1.0)) is f and builds == [(2.0, 1.0)]
  np.testing.assert_array_equal(f(jnp.arange(3.0)), [1.0, 3.0, 5.0])
  np.testing.assert_array_equal(f(jnp.arange(3.0) + 1), [3.0, 5.0, 7.0])  # same shape: no trace
  assert traces == [(3,)] and cache._cache_size() == 1
  f(jnp.zeros((2, 2)))                                   # a new shape: one more program
  assert traces == [(3,), (2, 2)] and cache._cache_size() == 2
  g = cache.get((3.0, 0.0))                              # a new key: its own program
  np.testing.assert_array_equal(g(jnp.arange(3.0)), [0.0, 3.0, 6.0])
  assert len(cache) == 2 and cache._cache_size() == 3 and len(traces) == 3
  for _ in range(3):                                     # repeats compile nothing
    f(jnp.ones(3))
    g(jnp.ones(3))
  assert cache._cache_size() == 3 and len(traces) == 3


def test_jit_kwargs_and_compiler_options_are_passed(monkeypatch):
  seen = []
  real_jit = jax.jit

  def spy(fun, **kwargs):
    seen.append(kwargs)
    return real_jit(fun, **kwargs)

  monkeypatch.setattr(jax, "jit", spy)
  cache = jit_cache.JitCache(lambda key: lambda x, n: x * n, static_argnums=(1,))
  assert int(cache.get("k")(jnp.int32(3), 4)) == 12
  options = xla_options.cpu_compiler_options()
  assert seen[0].get("compiler_options") == options and seen[0]["static_argnums"] == (1,)
  jit_cache.JitCache(lambda key: lambda x: x, compiler_options=False).get("k")
  assert "compiler_options" not in seen[1]


def test_lazy_jit_compiles_on_first_call_and_runs_plain_inside_a_trace():
  traces = []

  def fn(x):
    traces.append(1)
    return jnp.sin(x) * 2

  lazy = jit_cache.lazy_jit(fn)
  assert lazy._cache_size() == 0 and len(lazy) == 0
  x = jnp.linspace(0, 1, 5)
  np.testing.assert_allclose(lazy(x), 2 * np.sin(np.linspace(0, 1, 5)), rtol=1e-6)
  lazy(x + 1)
  assert lazy._cache_size() == 1 and len(traces) == 1
  # Inside someone's trace: the plain function (traced by the outer transform), no new program.
  grad = jax.grad(lambda v: lazy(v).sum())(x)
  np.testing.assert_allclose(grad, 2 * np.cos(np.linspace(0, 1, 5)), rtol=1e-6)
  assert lazy._cache_size() == 1


def test_errors_of_the_function_propagate():
  lazy = jit_cache.lazy_jit(lambda a, b: a @ b)
  with pytest.raises(TypeError):
    lazy(jnp.ones((2, 3)), jnp.ones((2, 3)))
