"""Gatys neural style transfer costs, as in the lecture (plain ``jax.numpy``).

An activation ``a`` of one image at one layer is ``[nH, nW, nC]``; every
function also accepts leading batch axes ``[..., nH, nW, nC]`` and then returns
one cost per image ``[...]``. The total is ``J = alpha J_content + beta J_style
+ gamma TV`` (:func:`total_cost`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp


def content_cost(a_c: jax.Array, a_g: jax.Array, *, normalize: bool = False) -> jax.Array:
  """Content cost between ``[..., nH, nW, nC]`` activations -> ``[...]`` float32:
  ``J_content = 1/2 ||a(C) - a(G)||^2``, or with ``normalize``
  ``1/(4 nH nW nC) ||a(C) - a(G)||^2``."""
  if a_c.shape != a_g.shape:
    raise ValueError(f"a_c {a_c.shape} and a_g {a_g.shape} must have the same shape")
  n_h, n_w, n_c = a_g.shape[-3:]
  sq = jnp.sum(jnp.square(a_c - a_g), axis=(-3, -2, -1))
  return sq / (4.0 * n_h * n_w * n_c) if normalize else 0.5 * sq


def gram(a: jax.Array) -> jax.Array:
  """Gram matrix ``G_kk' = sum_ij a_ijk a_ijk'``: ``[..., nH, nW, nC] -> [..., nC, nC]``.

  Differentiable (a custom VJP: ``dL/da = a (dG + dG^T)``, one matmul instead
  of the two that autodiff of ``a^T a`` emits).
  """
  if a.ndim < 3:
    raise ValueError(f"a: expected [..., nH, nW, nC], got shape {a.shape}")
  return _gram_flat(a.reshape(a.shape[:-3] + (-1, a.shape[-1])))


# HIGHEST: on accelerators the default would drop to bf16 passes, and the
# style cost subtracts two large nearly equal Grams. (On CPU both are f32.)
_HIGHEST = jax.lax.Precision.HIGHEST


def _gram_chunks(p: int, c: int) -> int:
  """Row blocks for ``a^T a`` with ``a [p, c]``: XLA CPU runs a long, thin
  ``a^T a`` (p >> c) on one thread and slowly; a batch of ``nb`` block Grams
  summed afterwards runs faster (BUILD.md, "Neural style transfer"). Square-ish
  cases stay one matmul."""
  nb = 1
  while nb < 8 and p % (2 * nb) == 0 and p // (2 * nb) >= 16 * c:
    nb *= 2
  return nb


def _gram_value(flat: jax.Array) -> jax.Array:
  # [..., P, C] -> [..., C, C]
  p, c = flat.shape[-2:]
  nb = _gram_chunks(p, c)
  if nb == 1:
    return jnp.einsum("...pk,...pl->...kl", flat, flat, precision=_HIGHEST)
  blocks = flat.reshape(flat.shape[:-2] + (nb, p // nb, c))
  per_block = jnp.einsum("...bpk,...bpl->...bkl", blocks, blocks, precision=_HIGHEST)
  return jnp.sum(per_block, axis=-3)


@jax.custom_vjp
def _gram_flat(flat: jax.Array) -> jax.Array:
  return _gram_value(flat)


def _gram_fwd(flat):
  return _gram_value(flat), flat


def _gram_bwd(flat, d_gram):
  # G = F^T F  =>  dF = F (dG + dG^T): exact, one [P, C] x [C, C] matmul.
  sym = d_gram + jnp.swapaxes(d_gram, -1, -2)
  return (jnp.einsum("...pk,...kl->...pl", flat, sym, precision=_HIGHEST),)


_gram_flat.defvjp(_gram_fwd, _gram_bwd)


def style_layer_cost(gram_s: jax.Array, a_g: jax.Array) -> jax.Array:
  """``1/(2 nH nW nC)^2 ||G(S) - G(G)||_F^2`` for ``gram_s [..., nC, nC]``, ``a_g [..., nH, nW, nC]``.

  ``gram_s`` is the (precomputed, constant) style Gram of an image of the
  same ``nH, nW`` as the generated one; batch axes broadcast, so one style
  Gram ``[nC, nC]`` serves a batch of generated images ``[B, nH, nW, nC]``.
  Returns ``[...]`` float32.
  """
  n_h, n_w, n_c = a_g.shape[-3:]
  if gram_s.shape[-2:] != (n_c, n_c):
    raise ValueError(f"gram_s {gram_s.shape} does not match a_g channels {n_c}")
  diff = gram_s - gram(a_g)
  return jnp.sum(jnp.square(diff), axis=(-2, -1)) / jnp.square(2.0 * n_h * n_w * n_c)


def style_cost(grams_s: Mapping[str, jax.Array], acts_g: Mapping[str, jax.Array],
               lambdas: Mapping[str, float]) -> jax.Array:
  """``J_style = sum_l lambda_l J_style^l`` over the layers named in ``lambdas``."""
  total = 0.0
  for name, lam in lambdas.items():
    total = total + lam * style_layer_cost(grams_s[name], acts_g[name])
  return jnp.asarray(total, jnp.float32)


def total_variation(x: jax.Array) -> jax.Array:
  """Squared total variation of images ``[..., H, W, C] -> [...]`` float32:
  ``TV(x) = sum (x[i+1,j] - x[i,j])^2 + (x[i,j+1] - x[i,j])^2`` (the squared form
  jcjohnson/neural-style uses)."""
  dh = x[..., 1:, :, :] - x[..., :-1, :, :]
  dw = x[..., :, 1:, :] - x[..., :, :-1, :]
  return jnp.sum(jnp.square(dh), axis=(-3, -2, -1)) + jnp.sum(jnp.square(dw), axis=(-3, -2, -1))


def total_cost(j_content: jax.Array, j_style: jax.Array, tv: jax.Array, *, alpha: float,
               beta: float, gamma: float) -> jax.Array:
  """``J = alpha J_content + beta J_style + gamma TV``."""
  return alpha * j_content + beta * j_style + gamma * tv


def blend_grams(grams: Sequence[jax.Array], weights: Sequence[float]) -> jax.Array:
  """Weighted sum of style Grams (several style images): ``sum_s w_s G(S_s)``, weights summing to 1."""
  if len(grams) != len(weights) or not grams:
    raise ValueError(f"{len(grams)} Grams but {len(weights)} weights")
  w = jnp.asarray(weights, jnp.float32)
  w = w / jnp.sum(w)
  return jnp.tensordot(w, jnp.stack(grams), axes=1)
