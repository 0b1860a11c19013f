"""Auxiliary training heads for metric learning: a CosFace classifier over the training identities.

Triplet losses see only the P x K identities of one batch; a softmax over all
training identities adds a global signal (every step pulls each embedding
towards its identity's prototype and away from all others), the "BNNeck" /
CosFace combination used in re-identification. The classifier is discarded
at evaluation: held-out identities are compared by embedding distance only.
"""

from __future__ import annotations

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
