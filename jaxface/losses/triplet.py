"""Triplet loss with in-batch mining, O(B^2) memory.

L(a, p, n) = max(d(a, p) - d(a, n) + margin, 0) with d the squared Euclidean
distance (FaceNet, Schroff et al. 2015). A triplet (a, p, n) is *valid* when
a != p, label[a] == label[p] and label[a] != label[n]. :func:`triplet_loss`
never builds the B^3 triplet tensor (how: `_offset_loop`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxface.losses.distances import pairwise_sq_distances, sq_distance

__all__ = ["STRATEGIES", "triplet_loss"]

STRATEGIES = ("all", "all_active", "hard", "semihard")

_State = tuple[jax.Array, ...]


def _validate(embeddings: jax.Array, labels: jax.Array, margin: float,
              strategy: str) -> None:
  if embeddings.ndim != 2:
    raise ValueError(
        f"embeddings must be 2-D [B, D], got shape {tuple(embeddings.shape)}")
  if not jnp.issubdtype(embeddings.dtype, jnp.floating):
    raise ValueError(
        f"embeddings must be floating point, got dtype {embeddings.dtype}")
  if embeddings.shape[0] == 0:
    raise ValueError("embeddings must hold at least one row, got shape "
                     f"{tuple(embeddings.shape)}")
  if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
    raise ValueError(
        f"labels must be 1-D [B] with B = embeddings.shape[0] = "
        f"{embeddings.shape[0]}, got shape {tuple(labels.shape)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if strategy not in STRATEGIES:
    raise ValueError(
        f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  # A traced margin (e.g. a jit argument) cannot be inspected; only concrete
  # values are checked.
  if not isinstance(margin, jax.core.Tracer):
    m = np.asarray(margin)
    if m.ndim != 0 or not np.issubdtype(m.dtype, np.number):
      raise ValueError(f"margin must be a real scalar, got {margin!r}")
    m = float(m)
    if not (m >= 0.0 and m < float("inf")):
      raise ValueError(f"margin must be finite and >= 0, got {m}")


def _offset_loop(
    start: jax.Array, count: jax.Array, has_neg: jax.Array,
    body: Callable[[jax.Array, jax.Array, _State], _State],
    init: _State) -> _State:
  """Runs `body(partner, pair_valid, state)` once per positive offset.

  How the B^3 triplet tensor is avoided: the batch is first sorted by label, so
  each identity occupies a contiguous segment [start, start + count). For an
  offset k = 1 .. K_max - 1 (K_max the largest class count in the batch),
  pairing every anchor i with start_i + (i - start_i + k) mod count_i
  enumerates every ordered positive pair (a, p), a != p, exactly once over all
  offsets. Each offset is one [B, B] pass over (anchor, negative), so the whole
  loss is O(B^2 * K_max) time and O(B^2) memory; for the usual P x K batches
  K_max = K is small (4 to 16). With few large classes (worst case two classes
  of B/2) the time approaches B^3 / 4, but the memory stays O(B^2).

  The loop is a `lax.while_loop` with a data-dependent trip count, which JAX
  cannot reverse-differentiate. It therefore only *counts*, on stop-gradient
  distances: since the loss is piecewise linear in the distances,

    sum over active (a, p, n) of (d_ap - d_an + margin)
        = sum_{a, j} W[a, j] * d[a, j] + margin * (number of active triplets),

  with W[a, p] = #active negatives of the pair (a, p) and W[a, n] = -#positives
  p for which (a, p, n) is active. W is constant on each linear piece, so the
  gradient of the right-hand side with respect to the (differentiable)
  distance matrix is exactly W; between pieces (measure zero) it is one of the
  one-sided gradients, like `relu` at 0. Semi-hard mining uses the same loop
  and weights (two entries per mined triplet). Batch-hard mines with one
  [B, B] pass and recomputes the two mined distances per anchor from the
  embeddings.

  Args:
    start: `[B] int32` first (label-sorted) index of each row's class.
    count: `[B] int32` size of each row's class.
    has_neg: `[B] bool` whether the row has at least one negative.
    body: maps `partner [B] int32` (the positive paired with each anchor at
      this offset), `pair_valid [B] bool` (the pair exists and the anchor has
      a negative) and the state to the new state.
    init: initial state.

  Returns:
    The final state.
  """
  idx = jnp.arange(start.shape[0], dtype=start.dtype)
  k_max = jnp.max(count)

  def step(carry):
    k, state = carry
    partner = start + (idx - start + k) % count
    valid = (k < count) & has_neg
    return k + 1, body(partner, valid, state)

  _, state = lax.while_loop(lambda c: c[0] < k_max, step,
                            (jnp.asarray(1, start.dtype), init))
  return state


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)


def triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.2,
    strategy: str = "all_active",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Triplet loss over all in-batch triplets with the chosen mining strategy.

  Distances are squared Euclidean (`pairwise_sq_distances`); no square root is
  taken, so gradients stay finite for duplicate embeddings. Labels may be any
  integers, in any order, with any class sizes.

  Strategies:
    "all": mean of the loss over ALL valid triplets (inactive ones count as 0).
    "all_active": batch-all averaged over the triplets with positive loss only
      (in-batch hard mining: easy triplets do not dilute the gradient). If no
      triplet is active the loss is 0 with zero gradient.
    "hard": batch-hard (Hermans et al. 2017): per anchor the hardest positive
      (max d) and hardest negative (min d); mean over anchors with at least one
      positive and one negative. At exact ties the lowest index (in
      label-sorted order) is mined and receives the gradient.
    "semihard": FaceNet. For every valid (anchor, positive) pair, the negative
      with the smallest d_an such that d_ap < d_an and d_ap - d_an + margin > 0
      (i.e. d_an < d_ap + margin). Fallback when no such negative exists: the
      *easiest* negative of the anchor (largest d_an), as in TF-Addons'
      `triplet_semihard_loss`; it avoids the collapse FaceNet reports for
      hardest-negative mining early in training. Its loss is then 0 unless
      every negative is at most as far as the positive. Mean over valid
      (a, p) pairs (a != p, same label, anchor has a negative).

  Complexity: O(B^2 * K_max) time and O(B^2) memory, K_max being the size of
  the largest class in the batch (see `_offset_loop`); no B^3 tensor.
  For "hard" the K_max factor only comes from counting "active_fraction";
  its loss and gradient are O(B^2) and O(B * D).

  Args:
    embeddings: `[B, D]` float32.
    labels: `[B]` int32 identity labels.
    margin: non-negative finite float.
    strategy: one of `STRATEGIES`.

  Returns:
    `(loss, metrics)`: `loss` a float32 scalar; `metrics` a dict of float32
    scalars (not differentiated):
      "mean_d_ap": mean d(a, p) over the positive distances the strategy uses:
        all valid (a, p) pairs for "all", "all_active" and "semihard"; the
        hardest positive per valid anchor for "hard".
      "mean_d_an": mean d(a, n) likewise: all valid (a, n) pairs (anchor has a
        positive) for "all"/"all_active"; the hardest negative per valid
        anchor for "hard"; the selected negative per valid (a, p) pair for
        "semihard".
      "active_fraction": fraction of ALL valid triplets with positive loss,
        whatever the strategy (comparable across strategies; 0 if none).
      "num_valid": number of valid triplets (float32: it can exceed 2^31).

  Raises:
    ValueError: `embeddings` not 2-D floating with B >= 1, `labels` not 1-D
      integers of length B, unknown `strategy`, or a concrete `margin` that is
      negative or not finite.
  """
  embeddings = jnp.asarray(embeddings)
  labels = jnp.asarray(labels)
  _validate(embeddings, labels, margin, strategy)
  f32 = jnp.float32
  b = embeddings.shape[0]

  # Label-sorted order makes every class a contiguous segment; the loss is
  # invariant to the permutation and autodiff routes gradients back through
  # the gather.
  order = jnp.argsort(labels, stable=True)
  lab = labels[order]
  emb = embeddings[order]
  d = pairwise_sq_distances(emb)
  d_ng = lax.stop_gradient(d).astype(f32)

  idx = jnp.arange(b, dtype=jnp.int32)
  start = jnp.searchsorted(lab, lab, side="left").astype(jnp.int32)
  count = jnp.searchsorted(lab, lab, side="right").astype(jnp.int32) - start
  has_pos = count > 1
  has_neg = count < b
  same = lab[:, None] == lab[None, :]
  neg = ~same
  pos = same & (idx[:, None] != idx[None, :])
  num_valid = jnp.sum((count - 1).astype(f32) * (b - count).astype(f32))
  # Pairs that take part in at least one valid triplet.
  ap_mask = pos & has_neg[:, None]
  an_mask = neg & has_pos[:, None]
  num_ap = jnp.sum(ap_mask, dtype=f32)
  mean_ap_all = _safe_div(jnp.sum(jnp.where(ap_mask, d_ng, 0.0)), num_ap)

  def active(d_ap: jax.Array, valid: jax.Array) -> jax.Array:
    """`[B, B] bool`: (a, partner_a, n) is a valid triplet with loss > 0."""
    return neg & valid[:, None] & ((d_ap[:, None] - d_ng + margin) > 0)

  def metrics(mean_d_ap, mean_d_an, num_active):
    return {
        "mean_d_ap": mean_d_ap.astype(f32),
        "mean_d_an": mean_d_an.astype(f32),
        "active_fraction": _safe_div(num_active, num_valid).astype(f32),
        "num_valid": num_valid,
    }

  if strategy in ("all", "all_active"):
    def body(partner, valid, state):
      w_pos, c_neg = state
      act = active(d_ng[idx, partner], valid)
      w_pos = w_pos.at[idx, partner].add(jnp.sum(act, axis=1, dtype=f32))
      return w_pos, c_neg + act.astype(f32)

    zeros = jnp.zeros((b, b), f32)
    w_pos, c_neg = _offset_loop(start, count, has_neg, body, (zeros, zeros))
    num_active = jnp.sum(w_pos)
    total = jnp.sum((w_pos - c_neg) * d) + margin * num_active
    den = num_valid if strategy == "all" else num_active
    loss = _safe_div(total, den)
    mean_an = _safe_div(jnp.sum(jnp.where(an_mask, d_ng, 0.0)),
                        jnp.sum(an_mask, dtype=f32))
    return loss.astype(f32), metrics(mean_ap_all, mean_an, num_active)

  if strategy == "hard":
    valid_anchor = has_pos & has_neg
    # Mine on the stop-gradient matrix, then recompute the two chosen
    # distances from the embeddings: the backward pass is then O(B * D)
    # instead of pushing a dense [B, B] cotangent through the matmul.
    hardest_p = jnp.argmax(jnp.where(pos, d_ng, -jnp.inf), axis=1)
    hardest_n = jnp.argmin(jnp.where(neg, d_ng, jnp.inf), axis=1)
    d_hp = sq_distance(emb, emb[hardest_p])
    d_hn = sq_distance(emb, emb[hardest_n])
    per_anchor = jnp.where(valid_anchor,
                           jax.nn.relu(d_hp - d_hn + margin), 0.0)
    num_anchors = jnp.sum(valid_anchor, dtype=f32)
    loss = _safe_div(jnp.sum(per_anchor), num_anchors)

    def count_body(partner, valid, state):
      (n,) = state
      return (n + jnp.sum(active(d_ng[idx, partner], valid), dtype=f32),)

    (num_active,) = _offset_loop(start, count, has_neg, count_body,
                                 (jnp.zeros((), f32),))
    d_hp, d_hn = lax.stop_gradient(d_hp), lax.stop_gradient(d_hn)
    return loss.astype(f32), metrics(
        _safe_div(jnp.sum(jnp.where(valid_anchor, d_hp, 0.0)), num_anchors),
        _safe_div(jnp.sum(jnp.where(valid_anchor, d_hn, 0.0)), num_anchors),
        num_active)

  # semihard
  easiest = jnp.argmax(jnp.where(neg, d_ng, -jnp.inf), axis=1).astype(
      jnp.int32)

  def semi_body(partner, valid, state):
    w, n_act_pairs, sum_d_sel, n_act = state
    d_ap = d_ng[idx, partner]
    gap = d_ap[:, None] - d_ng + margin
    window = neg & (d_ng > d_ap[:, None]) & (gap > 0)
    nearest = jnp.argmin(jnp.where(window, d_ng, jnp.inf), axis=1).astype(
        jnp.int32)
    sel = jnp.where(jnp.any(window, axis=1), nearest, easiest)
    d_sel = d_ng[idx, sel]
    act = (valid & (d_ap - d_sel + margin > 0)).astype(f32)
    w = w.at[idx, partner].add(act).at[idx, sel].add(-act)
    n_tri = jnp.sum(neg & valid[:, None] & (gap > 0), dtype=f32)
    return (w, n_act_pairs + jnp.sum(act),
            sum_d_sel + jnp.sum(jnp.where(valid, d_sel, 0.0)), n_act + n_tri)

  zero = jnp.zeros((), f32)
  w, n_act_pairs, sum_d_sel, num_active = _offset_loop(
      start, count, has_neg, semi_body,
      (jnp.zeros((b, b), f32), zero, zero, zero))
  loss = _safe_div(jnp.sum(w * d) + margin * n_act_pairs, num_ap)
  return loss.astype(f32), metrics(mean_ap_all, _safe_div(sum_d_sel, num_ap),
                                   num_active)
