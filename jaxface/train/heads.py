"""Auxiliary training heads for metric learning: a CosFace classifier over the training identities.

Triplet losses see only the P x K identities of one batch; a softmax over all
training identities adds a global signal (every step pulls each embedding
towards its identity's prototype and away from all others), the "BNNeck" /
CosFace combination used in re-identification. The classifier is discarded
at evaluation: held-out identities are compared by embedding distance only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def init_cosface_weights(key: jax.Array, embedding_dim: int, num_classes: int) -> jax.Array:
  """``[D, C] float32`` prototype directions, one column per training identity."""
  if embedding_dim < 1 or num_classes < 2:
    raise ValueError(f"cosface head needs embedding_dim >= 1 and num_classes >= 2, "
                     f"got {embedding_dim}, {num_classes}")
  return jax.random.normal(key, (embedding_dim, num_classes), jnp.float32) / jnp.sqrt(embedding_dim)


def cosface_loss(emb: jax.Array, weights: jax.Array, labels: jax.Array, *, margin: float,
                 scale: float) -> tuple[jax.Array, jax.Array]:
  """Large-margin cosine (CosFace) softmax loss.

  Args:
    emb: ``[B, D] float32`` embeddings (normalised here; need not be unit norm).
    weights: ``[D, C] float32`` class prototypes (normalised per column here).
    labels: ``[B] int32`` class indices in ``[0, C)``.
    margin: subtracted from the true class's cosine (``m`` in CosFace).
    scale: logit scale ``s``.

  Returns:
    (mean cross-entropy ``[] float32``, accuracy of the plain cosine argmax ``[] float32``).
  """
  if emb.ndim != 2 or weights.ndim != 2 or emb.shape[1] != weights.shape[0]:
    raise ValueError(f"emb [B, D] and weights [D, C] must agree, got {emb.shape} and {weights.shape}")
  if labels.shape != emb.shape[:1]:
    raise ValueError(f"labels must be [B]={emb.shape[:1]}, got {labels.shape}")
  e = emb * jax.lax.rsqrt(jnp.sum(emb * emb, axis=1, keepdims=True) + 1e-12)
  w = weights * jax.lax.rsqrt(jnp.sum(weights * weights, axis=0, keepdims=True) + 1e-12)
  cos = e @ w                                                     # [B, C]
  onehot = jax.nn.one_hot(labels, weights.shape[1], dtype=cos.dtype)
  logits = scale * (cos - margin * onehot)
  loss = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits, axis=1), axis=1))
  acc = jnp.mean((jnp.argmax(cos, axis=1) == labels).astype(jnp.float32))
  return loss, acc


MARGIN_KINDS = ("cosface", "arcface")


def margin_softmax_loss(emb: jax.Array, weights: jax.Array, labels: jax.Array, *, kind: str,
                        margin: float, scale: float, smoothing: float = 0.0
                        ) -> tuple[jax.Array, jax.Array]:
  """Large-margin softmax over class prototypes: CosFace or ArcFace, optional label smoothing.

  ``kind="cosface"``: the true class's logit is ``s * (cos - m)`` (equals
  :func:`cosface_loss` when ``smoothing=0``). ``kind="arcface"``: additive
  angular margin, ``s * cos(theta + m)`` with ``theta = arccos(cos)``; where
  ``theta + m`` would pass pi (cos(theta + m) stops decreasing) the logit
  continues linearly as ``s * (cos - m * sin(m))`` so the penalty stays monotone
  (the usual ArcFace fallback). ``smoothing`` spreads that much of the target
  mass uniformly over all classes, which keeps the logits of few, memorised
  training identities from saturating.

  Args:
    emb: ``[B, D] float32`` embeddings (normalised here).
    weights: ``[D, C] float32`` class prototypes (normalised per column here).
    labels: ``[B] int32`` class indices in ``[0, C)``.
    kind: "cosface" or "arcface".
    margin: ``m`` (cosine units for CosFace, radians for ArcFace).
    scale: logit scale ``s``.
    smoothing: label smoothing in [0, 1).

  Returns:
    (mean cross-entropy ``[] float32``, accuracy of the plain cosine argmax ``[] float32``).
  """
  if kind not in MARGIN_KINDS:
    raise ValueError(f"kind must be one of {', '.join(MARGIN_KINDS)}, got {kind!r}")
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
  if emb.ndim != 2 or weights.ndim != 2 or emb.shape[1] != weights.shape[0]:
    raise ValueError(f"emb [B, D] and weights [D, C] must agree, got {emb.shape} and {weights.shape}")
  if labels.shape != emb.shape[:1]:
    raise ValueError(f"labels must be [B]={emb.shape[:1]}, got {labels.shape}")
  e = emb * jax.lax.rsqrt(jnp.sum(emb * emb, axis=1, keepdims=True) + 1e-12)
  w = weights * jax.lax.rsqrt(jnp.sum(weights * weights, axis=0, keepdims=True) + 1e-12)
  cos = e @ w                                                     # [B, C]
  num_classes = weights.shape[1]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=cos.dtype)
  if kind == "cosface":
    target = cos - margin
  else:
    # Clipped away from +-1: d/dcos of sqrt(1 - cos^2) is infinite there.
    c = jnp.clip(cos, -1.0 + 1e-6, 1.0 - 1e-6)
    sin = jnp.sqrt(1.0 - c * c)
    shifted = c * math.cos(margin) - sin * math.sin(margin)      # cos(theta + m)
    target = jnp.where(c > math.cos(math.pi - margin), shifted, c - margin * math.sin(margin))
  logits = scale * jnp.where(onehot > 0, target, cos)
  soft = (1.0 - smoothing) * onehot + smoothing / num_classes
  loss = -jnp.mean(jnp.sum(soft * jax.nn.log_softmax(logits, axis=1), axis=1))
  acc = jnp.mean((jnp.argmax(cos, axis=1) == labels).astype(jnp.float32))
  return loss, acc


def standardize(x: jax.Array, eps: float = 1e-3) -> jax.Array:
  """Per-sample standardisation: ``[B, *spatial, C]`` -> same shape, zero mean and unit std per sample.

  Removes global brightness and contrast, which vary between the sessions of a
  face dataset more than between people. ``eps`` (in variance units of [0, 1]
  pixels) keeps a flat image finite.
  """
  axes = tuple(range(1, x.ndim))
  mean = jnp.mean(x, axis=axes, keepdims=True)
  var = jnp.var(x, axis=axes, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)
