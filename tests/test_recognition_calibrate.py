"""Tests for threshold calibration (jaxface.recognition.calibrate) against brute-force sweeps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxface.recognition import calibrate


def _pairs(seed, n=300, ties=False):
  rng = np.random.default_rng(seed)
  same = rng.random(n) < 0.4
  d = np.where(same, rng.normal(0.45, 0.1, n), rng.normal(0.75, 0.1, n))
  if ties:
    d = np.round(d, 2)   # many ties, also across the two classes
  return d, same


def _sweep_far(d, same, target):
  """Largest observed distance t whose accept set {d <= t} has FAR <= target (None: none)."""
  neg = int((~same).sum())
  best = None
  for t in sorted(set(d.tolist())):
    fa = sum(1 for x, s in zip(d, same) if x <= t and not s)
    if fa <= math.floor(target * neg * (1 + 1e-12)):
      best = t
  return best


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.3, 1.0])
def test_threshold_for_far_matches_sweep(seed, ties, target):
  d, same = _pairs(seed, ties=ties)
  t = calibrate.threshold_for_far(d, same, target)
  ref = _sweep_far(d, same, target)
  if ref is None:
    assert t < d.min()
  else:
    # same accept set as the tight reference threshold ...
    np.testing.assert_array_equal(d <= t, d <= ref)
    # ... and strictly between it and the next observed distance
    above = d[d > ref]
    assert ref <= t and (above.size == 0 or t < above.min())
    if above.size:
      assert t == pytest.approx((ref + above.min()) / 2)
  rates = calibrate.rates_at(d, same, t)
  assert rates["far"] <= target + 1e-12


def test_threshold_for_far_rejects_a_tie_that_would_exceed_the_budget():
  d = np.array([0.1, 0.2, 0.5, 0.5, 0.5, 0.9])
  same = np.array([True, True, True, False, False, False])
  # 3 negatives, budget floor(0.34 * 3) = 1, but the tie at 0.5 holds two
  assert calibrate.threshold_for_far(d, same, 0.34) == pytest.approx(0.35)
  assert calibrate.threshold_for_far(d, same, 0.67) == pytest.approx(0.7)
  assert calibrate.threshold_for_far(d, same, 1.0) > 0.9


@pytest.mark.parametrize("seed,ties", [(3, False), (4, True)])
def test_best_accuracy_threshold_matches_sweep(seed, ties):
  d, same = _pairs(seed, ties=ties)
  t = calibrate.best_accuracy_threshold(d, same)
  candidates = [-np.inf] + sorted(set(d.tolist()))
  best = max(np.mean((d <= c) == same) for c in candidates)
  assert calibrate.rates_at(d, same, t)["accuracy"] == pytest.approx(best)


def test_rates_at_against_loop():
  d, same = _pairs(5)
  r = calibrate.rates_at(d, same, 0.6)
  fa = sum(1 for x, s in zip(d, same) if x <= 0.6 and not s)
  ta = sum(1 for x, s in zip(d, same) if x <= 0.6 and s)
  assert r["far"] == fa / (~same).sum() and r["tar"] == ta / same.sum()
  assert r["frr"] == pytest.approx(1 - r["tar"])
  assert r["accuracy"] == pytest.approx((ta + (~same).sum() - fa) / d.size)
  only_neg = calibrate.rates_at(np.array([0.1, 0.9]), np.array([False, False]), 0.5)
  assert only_neg["far"] == 0.5 and math.isnan(only_neg["tar"])


def _per_identity_reference(emb, ids, glob, far, negatives, max_adjust):
  out = {}
  others = list(zip(emb, ids)) + [(n, None) for n in negatives]
  for ident in sorted(set(ids.tolist())):
    mine = [e for e, i in zip(emb, ids) if i == ident]
    if len(mine) < 2:
      continue
    genuine = [float(np.linalg.norm(mine[a] - mine[b]))
               for a in range(len(mine)) for b in range(a + 1, len(mine))]
    impostor = [float(np.linalg.norm(m - o)) for m in mine for o, oi in others if oi != ident]
    d = np.array(genuine + impostor)
    same = np.array([True] * len(genuine) + [False] * len(impostor))
    bound = calibrate.threshold_for_far(d, same, far)
    t = min(bound, max(glob, max(genuine)))
    out[ident] = float(np.clip(t, glob - max_adjust, glob + max_adjust))
  return out


@pytest.mark.parametrize("far", [0.0, 0.1])
def test_per_identity_thresholds_against_loop_reference(far):
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 16))
  ids = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4])
  emb = centers[ids] + rng.normal(scale=0.3, size=(ids.size, 16))
  negatives = rng.normal(size=(4, 16))
  negatives[0] = centers[4] + rng.normal(scale=0.3, size=16)   # an impostor close to identity 4
  got = calibrate.per_identity_thresholds(emb, ids, global_threshold=1.5, target_far=far,
                                          negatives=negatives, max_adjust=1.0)
  want = _per_identity_reference(emb, ids, 1.5, far, negatives, 1.0)
  assert sorted(got) == [0, 2, 4]            # single-image identities get none
  # loosened for 0 and 2 (their own images need it), tightened for 4 at far=0
  assert 1.5 < got[0] < 2.5 and 1.5 < got[2] < 2.5
  assert got[4] == (0.5 if far == 0.0 else 2.5)
  assert got.keys() == want.keys()
  for key in got:
    assert got[key] == pytest.approx(want[key], abs=1e-9)
  clipped = calibrate.per_identity_thresholds(emb, ids, global_threshold=1.0, max_adjust=0.0)
  assert set(clipped.values()) == {1.0}


def test_errors():
  d, same = _pairs(0)
  with pytest.raises(ValueError, match="target_far"):
    calibrate.threshold_for_far(d, same, 1.5)
  with pytest.raises(ValueError, match="same"):
    calibrate.threshold_for_far(d, np.ones_like(same), 0.1)
  with pytest.raises(ValueError, match="distances"):
    calibrate.threshold_for_far(np.array([np.nan, 1.0]), np.array([True, False]), 0.1)
  with pytest.raises(ValueError, match="threshold"):
    calibrate.rates_at(d, same, float("nan"))
  with pytest.raises(ValueError, match="identity_ids"):
    calibrate.per_identity_thresholds(np.ones((3, 4)), np.array([0, 1]), global_threshold=0.6)
  with pytest.raises(ValueError, match="min_images"):
    calibrate.per_identity_thresholds(np.ones((3, 4)), np.array([0, 1, 1]), global_threshold=0.6,
                                      min_images=1)


def test_per_identity_thresholds_never_negative():
  # an impostor closer than identity 0's own images, another far away: the FAR=0
  # bound lies below every distance (negative here) and is clipped to 0
  emb = np.array([[0.0, 0.0], [0.0, 0.1], [0.01, 0.0], [3.0, 0.0]])
  got = calibrate.per_identity_thresholds(emb, np.array([0, 0, 1, 2]), global_threshold=0.05,
                                          max_adjust=1.0)
  assert got[0] == 0.0


def test_min_supported_far_and_negatives_needed():
  assert calibrate.min_supported_far(10) == pytest.approx(0.1)
  assert calibrate.min_supported_far(1000) == pytest.approx(1e-3)
  assert calibrate.min_supported_far(np.int64(4)) == 0.25
  for bad in (0, -3, 2.5, True, "10"):
    with pytest.raises(ValueError, match="num_negatives"):
      calibrate.min_supported_far(bad)
  assert calibrate.negatives_needed(1e-3) == 1000
  assert calibrate.negatives_needed(0.3) == 4
  assert calibrate.negatives_needed(1.0) == 1
  # Consistent: N = negatives_needed(f) supports f, N - 1 does not.
  for far in (1e-3, 0.3, 0.07, 1 / 3):
    n = calibrate.negatives_needed(far)
    assert calibrate.min_supported_far(n) <= far * (1 + 1e-12)
    assert n == 1 or calibrate.min_supported_far(n - 1) > far
  for bad in (0.0, -0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match="target_far"):
      calibrate.negatives_needed(bad)


def test_choose_cohort_takes_whole_identities_singletons_first():
  # identities 0..3 have 3 rows each, 4..9 one row each: 18 rows.
  labels = np.asarray([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9])
  mask = calibrate.choose_cohort(labels, fraction=0.25, seed=3)
  assert mask.sum() == 5 and set(labels[mask]) <= {4, 5, 6, 7, 8, 9}  # ceil(0.25 * 18) = 5 singletons
  big = calibrate.choose_cohort(labels, fraction=0.5, seed=3)
  chosen = set(labels[big].tolist())
  assert {4, 5, 6, 7, 8, 9} <= chosen and big.sum() >= 9
  for i in chosen:  # whole identities only
    assert big[labels == i].all()
  excl = calibrate.choose_cohort(labels, fraction=0.5, exclude=labels == 4, seed=3)
  assert not excl[labels == 4].any() and excl.sum() >= 9
  assert np.array_equal(calibrate.choose_cohort(labels, seed=1), calibrate.choose_cohort(labels, seed=1))
  with pytest.raises(ValueError, match="fraction"):
    calibrate.choose_cohort(labels, fraction=1.5)
  with pytest.raises(ValueError, match="exclude"):
    calibrate.choose_cohort(labels, exclude=[True])
