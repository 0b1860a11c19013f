"""Jitted programs built on first use, one per static key, with jaxface's CPU compiler options.

Inference code (the MMOD detector, dlib's ResNet) wants what a module-level
``jax.jit`` does not give: a program created lazily (the per-program XLA
options of :func:`jaxface.xla_options.cpu_compiler_options` depend on the
backend), static parts closed over once per key, and a count of compiled
programs. See :class:`JitCache` and :func:`lazy_jit`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax

from jaxface import xla_options

__all__ = ["JitCache", "LazyJit", "lazy_jit"]


class JitCache:
  """``get(key)`` -> ``jax.jit(build(key), **jit_kwargs)``, built once per key.

  The program is created lazily, since the per-program XLA options depend on
  the backend, which importing a module must not start. What is static (an NNX
  graphdef, a pytree's treedef) is closed over once per key instead of being
  hashed and flattened on every call (a measurable part of a batch-1 ResNet
  call: BUILD.md, "dlib face pipeline"), so a call passes only arrays. Within
  each key, JAX's own cache compiles once per argument shape/dtype;
  ``_cache_size`` counts the compiled programs, for "no recompile on repeat"
  tests::

    cache = JitCache(lambda key: make_fn(*key))      # key -> the Python function to jit
    fn = cache.get((graphdef, treedef))               # the same jitted fn for an equal key
    out = fn(leaves, x)                               # compiled once per argument shape

  Args:
    build: ``key -> function`` to jit; called once per distinct key.
    compiler_options: add :func:`jaxface.xla_options.cpu_compiler_options`
      (YNN fusion off on CPU where it applies) to every program.
    **jit_kwargs: passed to ``jax.jit`` (``static_argnums``, ``donate_argnums``...).
  """

  def __init__(self, build: Callable[[Hashable], Callable], *, compiler_options: bool = True,
               **jit_kwargs: Any):
    self._build = build
    self._compiler_options = compiler_options
    self._jit_kwargs = jit_kwargs
    self._fns: dict[Hashable, Callable] = {}

  def get(self, key: Hashable = None) -> Callable:
    """The jitted program of ``key`` (created on the first request)."""
    fn = self._fns.get(key)
    if fn is None:
      kwargs = dict(self._jit_kwargs)
      options = xla_options.cpu_compiler_options() if self._compiler_options else None
      if options:
        kwargs["compiler_options"] = options
      fn = jax.jit(self._build(key), **kwargs)
      self._fns[key] = fn
    return fn

  def __len__(self) -> int:
    """Keys seen so far."""
    return len(self._fns)

  def _cache_size(self) -> int:
    """Compiled programs over all keys (``jax.jit``'s ``_cache_size`` summed)."""
    return sum(fn._cache_size() for fn in self._fns.values())  # noqa: SLF001


class LazyJit(JitCache):
  """One function, jitted on its first call (:class:`JitCache` with a single key)::

    scores = lazy_jit(_scores)
    scores(graphdef, state, x)

  Called inside someone else's trace (``jax.grad``, an outer ``jax.jit``), it
  runs the plain function: compiler options only apply to top-level programs,
  and the outer trace compiles everything anyway.
  """

  def __init__(self, fun: Callable, **kwargs: Any):
    super().__init__(lambda _: fun, **kwargs)
    self.fun = fun

  def __call__(self, *args: Any) -> Any:
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args)):
      return self.fun(*args)
    return self.get()(*args)


def lazy_jit(fun: Callable, **kwargs: Any) -> LazyJit:
  """``LazyJit(fun, **kwargs)``: ``fun`` jitted on first call, with the CPU compiler options."""
  return LazyJit(fun, **kwargs)
