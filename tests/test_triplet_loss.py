"""Tests for jaxface.losses.triplet_loss.

Values are checked against float64 NumPy brute force (a literal triple loop
for small batches, a per-anchor vectorized loop for B = 512); gradients
against `jax.grad` of a naive jnp formulation that materializes every
(anchor, positive, negative) triplet, and against finite differences of the
float64 reference.
"""

import functools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxface.losses import STRATEGIES, triplet_loss

# Values: float32 distances of unit-norm embeddings carry ~1e-7 absolute
# error (|x|^2 = 1), and the loss is a mean of such terms, so 1e-5 leaves two
# orders of magnitude of headroom while still catching any wrong triplet
# (each contributes >= 1 / num_triplets ~ 1e-4 .. 1e-1 at these sizes).
RTOL = 1e-5
ATOL = 1e-5
METRIC_KEYS = ("mean_d_ap", "mean_d_an", "active_fraction", "num_valid")


# ----------------------------------------------------------------- fixtures


def _embeddings(b: int, d: int, seed: int) -> np.ndarray:
  x = np.random.default_rng(seed).normal(size=(b, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _mixed_labels(b: int, seed: int) -> np.ndarray:
  """Irregular class sizes including a singleton class (label 1000)."""
  y = np.random.default_rng(seed).integers(0, max(2, b // 5), size=b)
  y[0] = 1000
  return y.astype(np.int32)


# --------------------------------------------------------- NumPy references


def _np_distances(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def _ref_loop(x, y, margin, strategy):
  """Literal triple loop in float64; returns (loss, metrics)."""
  d = _np_distances(x)
  b = len(y)
  tri = []  # (d_ap, d_an, loss) of every valid triplet
  for a in range(b):
    for p in range(b):
      if p == a or y[p] != y[a]:
        continue
      for n in range(b):
        if y[n] != y[a]:
          tri.append((d[a, p], d[a, n], max(d[a, p] - d[a, n] + margin, 0.0)))
  num_valid = len(tri)
  losses = np.array([t[2] for t in tri])
  num_active = int((losses > 0).sum())
  ap_pairs, an_pairs, per_item, used_ap, used_an = [], [], [], [], []
  for a in range(b):
    pos = [p for p in range(b) if p != a and y[p] == y[a]]
    neg = [n for n in range(b) if y[n] != y[a]]
    if neg:
      ap_pairs += [d[a, p] for p in pos]
    if pos:
      an_pairs += [d[a, n] for n in neg]
    if not (pos and neg):
      continue
    if strategy == "hard":
      hp = max(d[a, p] for p in pos)
      hn = min(d[a, n] for n in neg)
      per_item.append(max(hp - hn + margin, 0.0))
      used_ap.append(hp)
      used_an.append(hn)
    elif strategy == "semihard":
      for p in pos:
        window = [d[a, n] for n in neg
                  if d[a, p] < d[a, n] and d[a, p] - d[a, n] + margin > 0]
        dn = min(window) if window else max(d[a, n] for n in neg)
        per_item.append(max(d[a, p] - dn + margin, 0.0))
        used_ap.append(d[a, p])
        used_an.append(dn)
  mean = lambda v: float(np.mean(v)) if len(v) else 0.0
  if strategy == "all":
    loss = mean(losses)
  elif strategy == "all_active":
    loss = mean(losses[losses > 0])
  else:
    loss = mean(per_item)
  if strategy in ("all", "all_active"):
    used_ap, used_an = ap_pairs, an_pairs
  metrics = {
      "mean_d_ap": mean(used_ap),
      "mean_d_an": mean(used_an),
      "active_fraction": num_active / num_valid if num_valid else 0.0,
      "num_valid": float(num_valid),
  }
  return loss, metrics


def _ref_vectorized(x, y, margin, strategy):
  """Per-anchor vectorized float64 reference (for B in the hundreds)."""
  d = _np_distances(x)
  b = len(y)
  tot = cnt = act = nval = 0.0
  sum_ap = n_ap = sum_an = n_an = 0.0
  for a in range(b):
    pos = (y == y[a]) & (np.arange(b) != a)
    neg = y != y[a]
    if not (pos.any() and neg.any()):
      continue
    dp, dn = d[a, pos], d[a, neg]
    l = np.maximum(dp[:, None] - dn[None, :] + margin, 0.0)
    act += (l > 0).sum()
    nval += l.size
    if strategy in ("all", "all_active"):
      tot += l.sum()
      cnt += l.size if strategy == "all" else (l > 0).sum()
      sum_ap, n_ap = sum_ap + dp.sum(), n_ap + dp.size
      sum_an, n_an = sum_an + dn.sum(), n_an + dn.size
    elif strategy == "hard":
      tot += max(dp.max() - dn.min() + margin, 0.0)
      cnt += 1
      sum_ap, n_ap = sum_ap + dp.max(), n_ap + 1
      sum_an, n_an = sum_an + dn.min(), n_an + 1
    else:
      gap = dp[:, None] - dn[None, :] + margin
      window = (dn[None, :] > dp[:, None]) & (gap > 0)
      nearest = np.where(window, dn[None, :], np.inf).min(1)
      sel = np.where(window.any(1), nearest, dn.max())
      tot += np.maximum(dp - sel + margin, 0.0).sum()
      cnt += dp.size
      sum_ap, n_ap = sum_ap + dp.sum(), n_ap + dp.size
      sum_an, n_an = sum_an + sel.sum(), n_an + sel.size
  div = lambda u, v: u / v if v else 0.0
  return div(tot, cnt), {
      "mean_d_ap": div(sum_ap, n_ap),
      "mean_d_an": div(sum_an, n_an),
      "active_fraction": div(act, nval),
      "num_valid": nval,
  }


# --------------------------------------------------- naive jnp (gradients)


def _naive_anchor(row, pos, neg, margin, strategy):
  """Sum of the loss and number of averaged items for one anchor.

  Materializes the anchor's full [B, B] (positive, negative) grid, i.e. the
  B^3 formulation when vmapped over anchors.
  """
  valid = pos[:, None] & neg[None, :]
  gap = row[:, None] - row[None, :] + margin
  l = jnp.where(valid, jax.nn.relu(gap), 0.0)
  has_both = jnp.any(pos) & jnp.any(neg)
  if strategy == "all":
    return jnp.sum(l), jnp.sum(valid, dtype=jnp.float32)
  if strategy == "all_active":
    return jnp.sum(l), jnp.sum(valid & (gap > 0), dtype=jnp.float32)
  if strategy == "hard":
    hp = jnp.max(jnp.where(pos, row, -jnp.inf))
    hn = jnp.min(jnp.where(neg, row, jnp.inf))
    hp, hn = jnp.where(has_both, hp, 0.0), jnp.where(has_both, hn, 0.0)
    return (jnp.where(has_both, jax.nn.relu(hp - hn + margin), 0.0),
            has_both.astype(jnp.float32))
  window = valid & (row[None, :] > row[:, None]) & (gap > 0)
  nearest = jnp.min(jnp.where(window, row[None, :], jnp.inf), axis=1)
  easiest = jnp.max(jnp.where(neg, row, -jnp.inf))
  sel = jnp.where(jnp.any(window, axis=1), nearest, easiest)
  ok = pos & jnp.any(neg)
  sel = jnp.where(ok, sel, 0.0)
  per_pair = jnp.where(ok, jax.nn.relu(row - sel + margin), 0.0)
  return jnp.sum(per_pair), jnp.sum(ok, dtype=jnp.float32)


def _naive_loss(x, y, margin, strategy, use_map=False):
  diff = x[:, None, :] - x[None, :, :]
  d = jnp.sum(diff * diff, axis=-1)
  b = y.shape[0]
  same = y[:, None] == y[None, :]
  pos = same & ~jnp.eye(b, dtype=bool)
  fn = lambda args: _naive_anchor(*args, margin, strategy)
  if use_map:
    sums, counts = jax.lax.map(fn, (d, pos, ~same))
  else:
    sums, counts = jax.vmap(fn)((d, pos, ~same))
  n = jnp.sum(counts)
  return jnp.where(n > 0, jnp.sum(sums) / jnp.maximum(n, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("strategy", "use_map"))
def _naive_grad(x, y, margin, strategy, use_map=False):
  return jax.grad(_naive_loss)(x, y, margin, strategy, use_map)


@functools.partial(jax.jit, static_argnames=("strategy",))
def _loss(x, y, margin, strategy):
  return triplet_loss(x, y, margin=margin, strategy=strategy)


@functools.partial(jax.jit, static_argnames=("strategy",))
def _loss_and_grad(x, y, margin, strategy):
  return jax.value_and_grad(
      lambda e: triplet_loss(e, y, margin=margin, strategy=strategy),
      has_aux=True)(x)


# -------------------------------------------------------------------- tests


def _check(out, ref, rtol=RTOL, atol=ATOL):
  (loss, metrics), (ref_loss, ref_metrics) = out, ref
  assert loss.shape == () and loss.dtype == jnp.float32
  assert set(metrics) == set(METRIC_KEYS)
  np.testing.assert_allclose(loss, ref_loss, rtol=rtol, atol=atol)
  for k in METRIC_KEYS:
    assert metrics[k].shape == (), k
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=rtol,
                               atol=atol, err_msg=k)


LABEL_CASES = {
    "pk_4x4": np.repeat(np.arange(4), 4),
    "mixed_with_singleton": np.array([3, 1, 3, 7, 1, 1, 9, 3, 7, 1, 3, 2]),
    "two_classes_unbalanced": np.array([0] * 9 + [5] * 3),
    "shuffled_pk": np.random.default_rng(0).permutation(np.repeat(np.arange(5),
                                                                  3)),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", sorted(LABEL_CASES))
@pytest.mark.parametrize("margin", [0.0, 0.2, 1.5])
def test_value_matches_triple_loop(strategy, case, margin):
  y = LABEL_CASES[case].astype(np.int32)
  x = _embeddings(len(y), 8, seed=len(y) + int(margin * 10))
  out = _loss(x, y, margin, strategy)
  _check(out, _ref_loop(x, y, margin, strategy))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_gradient_matches_naive(strategy, case):
  y = LABEL_CASES[case].astype(np.int32)
  x = _embeddings(len(y), 8, seed=7)
  (loss, _), g = _loss_and_grad(x, y, 0.5, strategy)
  g_ref = _naive_grad(x, y, 0.5, strategy)
  np.testing.assert_allclose(loss, _naive_loss(x, y, 0.5, strategy),
                             rtol=RTOL, atol=ATOL)
  assert np.abs(np.asarray(g_ref)).max() > 1e-3  # the check is not vacuous
  # Same math in float32, different summation order: 1e-5 relative to the
  # gradient scale (entries are O(1)) covers the reordering.
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradient_matches_finite_differences_of_numpy_reference(strategy):
  y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3], np.int32)
  x = _embeddings(len(y), 4, seed=11)
  _, g = _loss_and_grad(x, y, 0.3, strategy)
  eps = 1e-5
  fd = np.zeros(x.shape)
  x64 = x.astype(np.float64)
  for i in range(x.shape[0]):
    for j in range(x.shape[1]):
      hi, lo = x64.copy(), x64.copy()
      hi[i, j] += eps
      lo[i, j] -= eps
      fd[i, j] = (_ref_loop(hi, y, 0.3, strategy)[0]
                  - _ref_loop(lo, y, 0.3, strategy)[0]) / (2 * eps)
  assert np.abs(fd).max() > 1e-2
  # Central differences in float64 are accurate to ~1e-9 away from kinks;
  # the float32 gradient carries ~1e-6 relative error.
  np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_medium_batch_matches_references(strategy):
  # B = 512 with irregular classes (a singleton, sizes ~1..15): many offset
  # loop iterations and a realistic count of triplets (~10^6).
  b = 512
  y = _mixed_labels(b, seed=1)
  x = _embeddings(b, 32, seed=2)
  (loss, metrics), g = _loss_and_grad(x, y, 0.2, strategy)
  # Summing ~10^6 float32 terms: relative error up to ~1e-6 * log2(terms).
  _check((loss, metrics), _ref_vectorized(x, y, 0.2, strategy), rtol=2e-5,
         atol=1e-6)
  if strategy in ("all", "all_active"):
    # Each triplet weighs 1/num_valid ~ 1e-6, so rare float32 flips of a
    # triplet at the margin boundary move entries by < 1e-6.
    g_ref = _naive_grad(x, y, 0.2, strategy, use_map=True)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


def test_one_image_class_contributes_only_as_negative():
  y = np.array([0, 0, 1, 1, 2], np.int32)
  x = _embeddings(5, 6, seed=3)
  for strategy in STRATEGIES:
    (loss, metrics), g = _loss_and_grad(x, y, 0.4, strategy)
    _check((loss, metrics), _ref_loop(x, y, 0.4, strategy))
    # 4 anchors with one positive and 3 negatives each; the singleton is
    # never an anchor.
    assert float(metrics["num_valid"]) == 12.0
    np.testing.assert_allclose(g, _naive_grad(x, y, 0.4, strategy),
                               rtol=1e-5, atol=1e-5, err_msg=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("y", [np.zeros(6, np.int32),
                               np.arange(6, dtype=np.int32)],
                         ids=["one_class", "all_distinct"])
def test_no_valid_triplets_gives_zero_loss_and_grad(strategy, y):
  x = _embeddings(6, 4, seed=4)
  (loss, metrics), g = _loss_and_grad(x, y, 0.2, strategy)
  assert float(loss) == 0.0
  assert float(metrics["num_valid"]) == 0.0
  assert float(metrics["active_fraction"]) == 0.0
  for k in METRIC_KEYS:
    assert np.isfinite(float(metrics[k])), k
  np.testing.assert_array_equal(g, np.zeros_like(x))


@pytest.mark.parametrize("strategy", ["all", "all_active"])
def test_no_active_triplet_gives_zero_loss_and_grad(strategy):
  # Two tight, far-apart clusters: every d_an - d_ap >> margin.
  y = np.array([0, 0, 0, 1, 1, 1], np.int32)
  x = np.zeros((6, 3), np.float32)
  x[:3, 0] = [0.0, 0.01, 0.02]
  x[3:, 0] = [10.0, 10.01, 10.02]
  (loss, metrics), g = _loss_and_grad(x, y, 0.2, strategy)
  assert float(loss) == 0.0
  assert float(metrics["active_fraction"]) == 0.0
  assert float(metrics["num_valid"]) == 6 * 2 * 3
  np.testing.assert_array_equal(g, np.zeros_like(x))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_duplicate_embeddings_have_finite_correct_gradients(strategy):
  # Zero distances both within a class (0 == 2) and across classes (1 == 4).
  y = np.array([0, 0, 0, 1, 1, 1, 2, 2], np.int32)
  x = _embeddings(8, 5, seed=5)
  x[2] = x[0]
  x[4] = x[1]
  x[7] = x[6]
  (loss, metrics), g = _loss_and_grad(x, y, 0.3, strategy)
  assert np.isfinite(np.asarray(g)).all()
  _check((loss, metrics), _ref_loop(x, y, 0.3, strategy))
  if strategy in ("all", "all_active"):
    # Ties in hard/semihard selection make the subgradient non-unique (the
    # naive max/min splits it), so only the batch-all gradients are unique.
    np.testing.assert_allclose(g, _naive_grad(x, y, 0.3, strategy),
                               rtol=1e-5, atol=1e-5)


def _d(x, i, j):
  return float(((x[i].astype(np.float64) - x[j]) ** 2).sum())


def test_semihard_fallback_uses_easiest_negative():
  # 1-D points; classes {0, 1} and {2, 3}. Anchor 0 (positive 1, d = 1) has
  # both negatives closer than its positive (d = 0.25, 0.64): no semi-hard
  # negative, so the fallback takes the easiest one (d = 0.64). The other
  # three anchors fall back too, each to a negative beyond the margin (loss 0).
  x = np.array([[0.0], [1.0], [-0.5], [-0.8]], np.float32)
  y = np.array([0, 0, 1, 1], np.int32)
  m = 0.1
  loss, metrics = triplet_loss(x, y, margin=m, strategy="semihard")
  np.testing.assert_allclose(loss, (_d(x, 0, 1) - _d(x, 0, 3) + m) / 4,
                             rtol=1e-5)
  easiest = [_d(x, 0, 3), _d(x, 1, 3), _d(x, 2, 1), _d(x, 3, 1)]
  np.testing.assert_allclose(metrics["mean_d_an"], np.mean(easiest),
                             rtol=1e-5)
  # A hardest-negative fallback would give a clearly different value.
  hardest = (_d(x, 0, 1) - _d(x, 0, 2) + m) / 4
  assert abs(float(loss) - hardest) > 0.05


def test_semihard_picks_nearest_negative_inside_window():
  # Anchor 0 (positive 1, d = 1): negatives at d = 1.21 and 1.44, both inside
  # the window (1, 1.5); the nearest is chosen. The other anchors have no
  # negative in their window and fall back to losses of 0.
  x = np.array([[0.0], [1.0], [-1.1], [-1.2]], np.float32)
  y = np.array([0, 0, 1, 1], np.int32)
  m = 0.5
  loss, metrics = triplet_loss(x, y, margin=m, strategy="semihard")
  np.testing.assert_allclose(loss, (_d(x, 0, 1) - _d(x, 0, 2) + m) / 4,
                             rtol=1e-5)
  selected = [_d(x, 0, 2), _d(x, 1, 3), _d(x, 2, 1), _d(x, 3, 1)]
  np.testing.assert_allclose(metrics["mean_d_an"], np.mean(selected),
                             rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_jit_equals_eager(strategy):
  y = LABEL_CASES["mixed_with_singleton"].astype(np.int32)
  x = _embeddings(len(y), 8, seed=6)
  eager = triplet_loss(x, y, margin=0.3, strategy=strategy)
  jitted = jax.jit(functools.partial(triplet_loss, margin=0.3,
                                     strategy=strategy))(x, y)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6, atol=1e-7)
  for k in METRIC_KEYS:
    np.testing.assert_allclose(jitted[1][k], eager[1][k], rtol=1e-6,
                               atol=1e-7, err_msg=k)


def test_no_recompile_on_second_call_with_new_values():
  traces = []

  @jax.jit
  def step(x, y, margin):
    traces.append(1)  # Python side effect: runs only while tracing.
    return jax.value_and_grad(
        lambda e: triplet_loss(e, y, margin=margin, strategy="all_active"),
        has_aux=True)(x)

  x1 = _embeddings(12, 8, seed=7)
  x2 = _embeddings(12, 8, seed=8)
  y1 = LABEL_CASES["mixed_with_singleton"].astype(np.int32)
  # Different class structure (largest class 9 vs 4) must not retrace: the
  # offset loop's trip count is data-dependent, not static.
  y2 = LABEL_CASES["two_classes_unbalanced"].astype(np.int32)
  (l1, _), _ = step(x1, y1, 0.2)
  (l2, _), _ = step(x2, y2, 0.3)
  assert len(traces) == 1
  assert step._cache_size() == 1
  np.testing.assert_allclose(l2, _ref_loop(x2, y2, 0.3, "all_active")[0],
                             rtol=RTOL, atol=ATOL)
  assert float(l1) != float(l2)


def _near_tie(x, y, margin, tol=1e-4):
  """Whether a triplet sits within `tol` of a mining/activity boundary."""
  d = _np_distances(x)
  same = y[:, None] == y[None, :]
  pos = same & ~np.eye(len(y), dtype=bool)
  for a in range(len(y)):
    dp, dn = d[a, pos[a]], d[a, ~same[a]]
    gap = dp[:, None] - dn[None, :]
    if (np.abs(gap) < tol).any() or (np.abs(gap + margin) < tol).any():
      return True
  return False


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    x=hnp.arrays(np.float32, (10, 3),
                 elements=st.floats(-2, 2, width=32)),
    y=hnp.arrays(np.int32, (10,), elements=st.integers(0, 3)),
    margin=st.sampled_from([0.0, 0.25, 1.0]),
)
def test_property_matches_triple_loop(x, y, margin):
  # Hypothesis favours zeros and repeated values: duplicates and exact ties.
  ties = _near_tie(x, y, margin)
  for strategy in STRATEGIES:
    (loss, metrics), g = _loss_and_grad(x, y, margin, strategy)
    assert np.isfinite(np.asarray(g)).all(), strategy
    assert np.isfinite(float(loss)), strategy
    ref_loss, ref_metrics = _ref_loop(x, y, margin, strategy)
    np.testing.assert_array_equal(metrics["num_valid"],
                                  ref_metrics["num_valid"])
    # "all" and "hard" are continuous in the distances; "all_active" (its
    # denominator counts active triplets) and "semihard" (its selection) jump
    # at ties, where float32 and float64 may decide differently.
    if strategy in ("all", "hard") or not ties:
      # |x|^2 <= 12: float32 distance error ~1e-6 absolute.
      np.testing.assert_allclose(loss, ref_loss, rtol=1e-4, atol=1e-4,
                                 err_msg=strategy)


@pytest.mark.parametrize(
    "x, y, kwargs, name",
    [
        (np.zeros(4, np.float32), np.zeros(4, np.int32), {}, "embeddings"),
        (np.zeros((2, 3, 4), np.float32), np.zeros(2, np.int32), {},
         "embeddings"),
        (np.zeros((4, 3), np.int32), np.zeros(4, np.int32), {}, "embeddings"),
        (np.zeros((0, 3), np.float32), np.zeros(0, np.int32), {},
         "embeddings"),
        (np.zeros((4, 3), np.float32), np.zeros((4, 1), np.int32), {},
         "labels"),
        (np.zeros((4, 3), np.float32), np.zeros(5, np.int32), {}, "labels"),
        (np.zeros((4, 3), np.float32), np.zeros(4, np.float32), {}, "labels"),
        (np.zeros((4, 3), np.float32), np.zeros(4, np.int32),
         {"strategy": "batch_hard"}, "strategy"),
        (np.zeros((4, 3), np.float32), np.zeros(4, np.int32),
         {"margin": -0.1}, "margin"),
        (np.zeros((4, 3), np.float32), np.zeros(4, np.int32),
         {"margin": float("nan")}, "margin"),
        (np.zeros((4, 3), np.float32), np.zeros(4, np.int32),
         {"margin": float("inf")}, "margin"),
        (np.zeros((4, 3), np.float32), np.zeros(4, np.int32),
         {"margin": np.array([0.1, 0.2])}, "margin"),
    ])
def test_bad_input_raises(x, y, kwargs, name):
  with pytest.raises(ValueError, match=name):
    triplet_loss(x, y, **kwargs)


def test_bad_input_raises_under_jit():
  f = jax.jit(functools.partial(triplet_loss, strategy="all"))
  with pytest.raises(ValueError, match="labels"):
    f(np.zeros((4, 3), np.float32), np.zeros(3, np.int32))
