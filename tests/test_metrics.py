"""Tests for jaxface.metrics against brute-force loop references.

All metrics are exact counting in float64, so most comparisons are exact
equality (or 1e-12 where a sum of float64 ratios is involved).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from PIL import Image

from jaxface import metrics as m

# --------------------------------------------------------------------------
# Brute-force references (deliberately loop-based and naive)
# --------------------------------------------------------------------------


def ref_auc(d, same):
  pos = d[same]
  neg = d[~same]
  total = 0.0
  for p in pos:
    for n in neg:
      total += 1.0 if p < n else (0.5 if p == n else 0.0)
  return total / (len(pos) * len(neg))


def ref_candidates(d):
  u = sorted(set(d.tolist()))
  margin = (u[-1] - u[0]) / 2 if len(u) > 1 else 1.0
  mids = [u[k] + (u[k + 1] - u[k]) / 2 for k in range(len(u) - 1)]
  return [u[0] - margin] + mids + [u[-1] + margin]


def ref_best_threshold(d, same):
  best_t, best_acc = None, -1.0
  for t in ref_candidates(d):
    acc = sum(1 for x, s in zip(d, same) if (x <= t) == s) / len(d)
    if acc > best_acc:  # strict: first (smallest) maximum wins
      best_t, best_acc = t, acc
  return best_t, best_acc


def ref_kfold(d, same, folds):
  accs, thrs = [], []
  for f in sorted(set(folds.tolist())):
    tr = folds != f
    t, _ = ref_best_threshold(d[tr], same[tr])
    te = ~tr
    accs.append(sum(1 for x, s in zip(d[te], same[te]) if (x <= t) == s) / te.sum())
    thrs.append(t)
  return np.array(accs), np.array(thrs)


def ref_identification(gallery, gl, queries, ql, threshold, k):
  ids = sorted(set(gl.tolist()))
  kk = min(k, len(ids))
  known = unknown = r1 = topk = dir_ = frr = far = 0
  for q, lab in zip(queries, ql):
    per_id = {}
    for g, gid in zip(gallery, gl):
      dist = float(np.sum((q - g) ** 2))
      per_id[gid] = min(per_id.get(gid, math.inf), dist)
    ranked = sorted(per_id, key=lambda c: per_id[c])
    best = ranked[0]
    accepted = per_id[best] <= threshold
    if lab in per_id:
      known += 1
      r1 += best == lab
      topk += lab in ranked[:kk]
      dir_ += (best == lab) and accepted
      frr += not accepted
    else:
      unknown += 1
      far += accepted
  nan = float("nan")
  return {"rank1": r1 / known if known else nan, "top_k": topk / known if known else nan,
          "dir": dir_ / known if known else nan, "frr": frr / known if known else nan,
          "far": far / unknown if unknown else nan, "k": kk, "num_known": known,
          "num_unknown": unknown}


def random_scores(rng, m_pairs, ties=False, shift=0.7):
  same = rng.random(m_pairs) < 0.45
  same[0], same[1] = True, False
  d = rng.normal(size=m_pairs) + shift * (~same)
  if ties:
    d = np.round(d * 2) / 2  # heavy ties across classes
  return d, same


# --------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------


def test_all_pairs_matches_combinations():
  labels = np.array([3, 1, 3, 2, 1, 3, 7])
  i, j, same = m.all_pairs(labels)
  ref = list(itertools.combinations(range(len(labels)), 2))
  assert list(zip(i.tolist(), j.tolist())) == ref
  np.testing.assert_array_equal(same, [labels[a] == labels[b] for a, b in ref])
  assert same.dtype == np.bool_


def _pair_set(i, j):
  return set(zip(i.tolist(), j.tolist()))


def test_balanced_pairs_all_positives_and_distinct_negatives():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 12, size=70)
  i, j, same = m.balanced_pairs(labels, seed=3)
  ai, aj, asame = m.all_pairs(labels)
  all_pos = _pair_set(ai[asame], aj[asame])
  assert _pair_set(i[same], j[same]) == all_pos          # every positive exactly once
  assert same.sum() == len(all_pos) == (~same).sum()     # balanced
  assert np.all(i < j)
  neg = _pair_set(i[~same], j[~same])
  assert len(neg) == (~same).sum()                       # no duplicates
  assert all(labels[a] != labels[b] for a, b in neg)
  np.testing.assert_array_equal(same, labels[i] == labels[j])
  # Deterministic in the seed, different for another seed.
  i2, j2, s2 = m.balanced_pairs(labels, seed=3)
  np.testing.assert_array_equal(i, i2)
  np.testing.assert_array_equal(j, j2)
  np.testing.assert_array_equal(same, s2)
  i3, j3, _ = m.balanced_pairs(labels, seed=4)
  assert _pair_set(i3[~same], j3[~same]) != neg


def test_balanced_pairs_max_pairs_and_few_negatives():
  labels = np.repeat(np.arange(5), 8)  # 5 * 28 = 140 positives
  i, j, same = m.balanced_pairs(labels, seed=0, max_pairs=41)
  assert same.sum() == 20 and (~same).sum() == 20
  assert len(_pair_set(i[same], j[same])) == 20
  assert np.all(labels[i[same]] == labels[j[same]])
  # One big identity + one singleton: only 6 negatives, so positives shrink too.
  labels = np.array([0, 0, 0, 0, 0, 0, 1])
  i, j, same = m.balanced_pairs(labels, seed=0)
  assert same.sum() == 6 and (~same).sum() == 6
  assert _pair_set(i[~same], j[~same]) == {(a, 6) for a in range(6)}


def test_balanced_pairs_negatives_are_uniform():
  # 8 negatives, 2 positives -> each negative is chosen with probability 1/4.
  labels = np.array([0, 0, 1, 1, 2])
  counts = {}
  trials = 2000
  for seed in range(trials):
    i, j, same = m.balanced_pairs(labels, seed=seed)
    for p in zip(i[~same].tolist(), j[~same].tolist()):
      counts[p] = counts.get(p, 0) + 1
  assert len(counts) == 8
  # Binomial(2000, 1/4): mean 500, std ~19.4; 6 sigma keeps false failures negligible.
  for c in counts.values():
    assert abs(c - 500) < 6 * 19.4


def test_balanced_pairs_errors():
  with pytest.raises(ValueError, match="labels.*positive"):
    m.balanced_pairs(np.arange(5), seed=0)
  with pytest.raises(ValueError, match="labels.*same identity"):
    m.balanced_pairs(np.zeros(5, int), seed=0)
  with pytest.raises(ValueError, match="labels.*empty"):
    m.balanced_pairs(np.array([], int), seed=0)
  with pytest.raises(ValueError, match="max_pairs"):
    m.balanced_pairs(np.array([0, 0, 1]), seed=0, max_pairs=1)
  with pytest.raises(ValueError, match="labels.*integer"):
    m.balanced_pairs(np.array([0.0, 0.0, 1.0]), seed=0)


def test_pair_distances_vs_loop():
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(9, 5)).astype(np.float32)
  i, j, _ = m.all_pairs(np.arange(9) % 3)
  d = m.pair_distances(emb, i, j)
  ref = [float(np.sum((emb[a].astype(np.float64) - emb[b]) ** 2)) for a, b in zip(i, j)]
  np.testing.assert_allclose(d, ref, rtol=1e-12)
  assert m.pair_distances(emb, [2], [2])[0] == 0.0


# --------------------------------------------------------------------------
# ROC / AUC / TAR@FAR
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_vs_brute_force(ties):
  d, same = random_scores(np.random.default_rng(2), 300, ties=ties)
  fpr, tpr, thr = m.roc_curve(d, same)
  assert thr[0] == -np.inf and np.all(np.diff(thr) > 0)        # ascending, unique
  np.testing.assert_array_equal(thr[1:], np.unique(d))
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  for f, t, th in zip(fpr, tpr, thr):
    acc = d <= th
    assert f == np.sum(acc & ~same) / np.sum(~same)
    assert t == np.sum(acc & same) / np.sum(same)


@pytest.mark.parametrize("ties", [False, True])
def test_auc_vs_mann_whitney_brute_force(ties):
  d, same = random_scores(np.random.default_rng(3), 400, ties=ties)
  auc = m.roc_auc(d, same)
  assert auc == pytest.approx(ref_auc(d, same), abs=1e-12)
  fpr, tpr, _ = m.roc_curve(d, same)
  trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
  assert trapezoid == pytest.approx(auc, abs=1e-12)


def test_auc_known_cases():
  same = np.array([True] * 4 + [False] * 5)
  d = np.array([0.1, 0.2, 0.3, 0.4, 1.0, 1.1, 1.2, 1.3, 1.4])
  assert m.roc_auc(d, same) == 1.0
  assert m.roc_auc(-d, same) == 0.0
  # Identical distributions with ties: every positive ties one negative value.
  vals = np.array([0.5, 1.0, 1.0, 2.0])
  d = np.concatenate([vals, vals])
  same = np.array([True] * 4 + [False] * 4)
  assert m.roc_auc(d, same) == 0.5
  assert m.roc_auc(np.zeros(6), np.array([1, 0, 1, 0, 0, 1])) == 0.5  # all tied, 0/1 mask


def test_tar_at_far_vs_brute_force():
  d, same = random_scores(np.random.default_rng(4), 2500, ties=False)
  num_neg = int((~same).sum())
  for far in (1e-2, 5e-2, 0.3, 1.0):
    tar, thr = m.tar_at_far(d, same, far)
    best_tar, best_thr = 0.0, -np.inf
    for th in np.unique(d):
      if np.sum((d <= th) & ~same) <= far * num_neg:
        t = np.sum((d <= th) & same) / same.sum()
        if t >= best_tar:
          best_tar, best_thr = t, th
    assert tar == best_tar and thr == best_thr
    assert np.sum((d <= thr) & ~same) / num_neg <= far
  # far * num_neg < 1: cannot be resolved -> nan.
  tar, thr = m.tar_at_far(d, same, 0.5 / num_neg)
  assert math.isnan(tar) and math.isnan(thr)
  # Exactly one allowed false accept still resolves.
  assert not math.isnan(m.tar_at_far(d, same, 1.0 / num_neg)[0])
  # 1 of 2 false accepts allowed: the negative at 0.0 uses it up before any positive.
  tar, thr = m.tar_at_far(np.array([0.0, 0.1, 1.0]), np.array([False, False, True]), 0.5)
  assert tar == 0.0 and thr == 0.0
  # Two tied negatives at the smallest distance, 1 allowed: nothing can be accepted.
  tar, thr = m.tar_at_far(np.array([0.0, 0.0, 1.0, 3.0, 4.0]),
                          np.array([False, False, True, False, False]), 0.25)
  assert tar == 0.0 and thr == -np.inf
  tar, thr = m.tar_at_far(np.array([0.0, 0.0, 2.0]), np.array([False, True, False]), 0.5)
  assert tar == 1.0 and thr == 0.0  # the tie is accepted together
  with pytest.raises(ValueError, match="far"):
    m.tar_at_far(d, same, 0.0)


def test_best_threshold_vs_brute_force():
  rng = np.random.default_rng(5)
  for ties in (False, True):
    d, same = random_scores(rng, 250, ties=ties)
    t, acc = m.best_threshold(d, same)
    rt, racc = ref_best_threshold(d, same)
    assert acc == racc and t == rt
    assert acc == np.mean((d <= t) == same)


def test_best_threshold_known_cases():
  same = np.array([True, True, False, False, True])
  d = np.array([0.1, 0.2, 1.0, 1.5, 0.4])
  t, acc = m.best_threshold(d, same)
  assert acc == 1.0 and t == pytest.approx(0.7)
  # All equal distances: accept-all (3/5 correct) beats reject-all (2/5).
  t, acc = m.best_threshold(np.ones(5), same)
  assert acc == 0.6 and t == 2.0
  # Adjacent float64 values: the threshold must still split them. Starting
  # from an odd mantissa, the rounded midpoint (round-half-even) lands on b.
  for a in (1.0, np.nextafter(1.0, 2.0)):
    b = np.nextafter(a, 2.0)
    t, acc = m.best_threshold(np.array([a, b]), np.array([True, False]))
    assert acc == 1.0 and a <= t < b


def test_kfold_vs_loop_reference():
  rng = np.random.default_rng(6)
  d, same = random_scores(rng, 240, ties=True, shift=1.0)
  folds = np.repeat(np.arange(10), 24)  # LFW-style: consecutive blocks
  out = m.kfold_verification(d, same, folds=folds)
  accs, thrs = ref_kfold(d, same, folds)
  np.testing.assert_array_equal(out["fold_accuracies"], accs)
  np.testing.assert_array_equal(out["fold_thresholds"], thrs)
  assert out["accuracy"] == pytest.approx(accs.mean(), abs=1e-15)
  assert out["accuracy_std"] == pytest.approx(accs.std(), abs=1e-15)
  assert out["threshold"] == pytest.approx(thrs.mean(), abs=1e-15)
  # Seeded random folds == explicit stratified_folds with the same seed.
  seeded = m.kfold_verification(d, same, num_folds=7, seed=11)
  sf = m.stratified_folds(same, 7, 11)
  explicit = m.kfold_verification(d, same, folds=sf)
  np.testing.assert_array_equal(seeded["fold_accuracies"], explicit["fold_accuracies"])
  np.testing.assert_array_equal(seeded["fold_accuracies"], ref_kfold(d, same, sf)[0])


def test_stratified_folds_balanced_and_seeded():
  same = np.array([True] * 33 + [False] * 47)
  f = m.stratified_folds(same, 10, seed=0)
  assert set(f.tolist()) == set(range(10))
  for cls in (True, False):
    c = np.bincount(f[same == cls], minlength=10)
    assert c.max() - c.min() <= 1
  sizes = np.bincount(f, minlength=10)
  assert sizes.max() - sizes.min() <= 1
  np.testing.assert_array_equal(f, m.stratified_folds(same, 10, seed=0))
  assert not np.array_equal(f, m.stratified_folds(same, 10, seed=1))
  with pytest.raises(ValueError, match="num_folds"):
    m.stratified_folds(same[:5], 10)


def test_kfold_perfectly_separated():
  same = np.array([True] * 50 + [False] * 50)
  d = np.where(same, 0.0, 1.0) + np.linspace(0, 0.5, 100)
  out = m.kfold_verification(d, same)
  assert out["accuracy"] == 1.0 and out["accuracy_std"] == 0.0
  assert np.all(out["fold_accuracies"] == 1.0)


def test_kfold_errors():
  d = np.arange(6.0)
  same = np.array([True, False] * 3)
  with pytest.raises(ValueError, match="folds.*length"):
    m.kfold_verification(d, same, folds=np.zeros(5, int))
  with pytest.raises(ValueError, match="folds.*2 distinct"):
    m.kfold_verification(d, same, folds=np.zeros(6, int))
  with pytest.raises(ValueError, match="folds.*lack positives"):
    m.kfold_verification(d, same, folds=np.array([0, 1, 0, 1, 0, 1]))


# --------------------------------------------------------------------------
# Input validation shared by the score functions
# --------------------------------------------------------------------------


SCORE_FNS = [
    lambda d, s: m.roc_curve(d, s),
    lambda d, s: m.roc_auc(d, s),
    lambda d, s: m.tar_at_far(d, s, 0.1),
    lambda d, s: m.best_threshold(d, s),
    lambda d, s: m.kfold_verification(d, s, num_folds=2),
]


@pytest.mark.parametrize("fn", SCORE_FNS)
def test_score_validation(fn):
  d = np.array([0.1, 0.5, 0.9, 1.3])
  s = np.array([True, False, True, False])
  with pytest.raises(ValueError, match="same.*length 3.*distances length 4"):
    fn(d, s[:3])
  with pytest.raises(ValueError, match="distances.*NaN"):
    fn(np.array([0.1, np.nan, 0.9, 1.3]), s)
  with pytest.raises(ValueError, match="distances.*empty"):
    fn(np.array([]), np.array([], bool))
  with pytest.raises(ValueError, match="same.*no negative"):
    fn(d, np.ones(4, bool))
  with pytest.raises(ValueError, match="same.*no positive"):
    fn(d, np.zeros(4, bool))
  with pytest.raises(ValueError, match="same.*bool"):
    fn(d, np.array([0, 2, 1, 0]))
  with pytest.raises(ValueError, match="distances.*1-D"):
    fn(d.reshape(2, 2), s)


# --------------------------------------------------------------------------
# Identification
# --------------------------------------------------------------------------


def _clusters(rng, num_ids, per_id, dim, spread):
  centers = rng.normal(size=(num_ids, dim))
  emb = centers[:, None, :] + spread * rng.normal(size=(num_ids, per_id, dim))
  return emb.reshape(-1, dim), np.repeat(np.arange(num_ids), per_id)


@pytest.mark.parametrize("k", [1, 3, 50])
def test_identification_vs_loop(k):
  rng = np.random.default_rng(7)
  emb, lab = _clusters(rng, 12, 5, 8, spread=0.9)  # overlapping: errors occur
  labels = lab * 10 + 5                                 # non-contiguous identity ids
  perm = rng.permutation(len(labels))
  gal = perm[:25]                                       # several images per identity
  qry = perm[25:]
  qlab = labels[qry].copy()
  qlab[:6] = 999                                        # some unknown identities
  nearest = ((emb[qry][:, None, :] - emb[gal][None, :, :]) ** 2).sum(-1).min(1)
  # Halfway between two nearest distances, so that the loop's direct
  # differences and the vectorized norm expansion (which differ by rounding)
  # cannot fall on different sides of it; about half the queries are accepted.
  threshold = float(np.sort(nearest)[len(nearest) // 2 - 1:len(nearest) // 2 + 1].mean())
  out = m.identification(emb[gal], labels[gal], emb[qry], qlab, threshold, k=k)
  ref = ref_identification(emb[gal], labels[gal], emb[qry], qlab, threshold, k)
  assert out.keys() == ref.keys()
  for key in ref:
    assert out[key] == pytest.approx(ref[key], abs=1e-12), key
  assert 0.0 < out["rank1"] < 1.0 and 0.0 < out["far"] < 1.0  # the case is non-trivial
  assert out["dir"] + out["frr"] <= 1.0


def test_identification_chunked_matches_unchunked(monkeypatch):
  rng = np.random.default_rng(8)
  emb, lab = _clusters(rng, 10, 4, 6, spread=0.8)
  args = (emb[::4], lab[::4], emb, lab, 3.0)
  full = m.identification(*args, k=2)
  monkeypatch.setattr(m, "_CHUNK_ELEMENTS", 7)  # forces one query per chunk
  chunked = m.identification(*args, k=2)
  assert chunked == pytest.approx(full, nan_ok=True)
  assert full["rank1"] < 1.0  # the comparison is not trivially all-correct


def test_identification_perfect_and_no_unknowns():
  rng = np.random.default_rng(9)
  emb, lab = _clusters(rng, 6, 3, 16, spread=0.01)
  out = m.identification(emb[::3], lab[::3], emb, lab, threshold=0.1)
  assert out["rank1"] == 1.0 and out["dir"] == 1.0 and out["frr"] == 0.0
  assert math.isnan(out["far"]) and out["num_unknown"] == 0 and out["k"] == 5


def test_identification_errors():
  g = np.zeros((3, 4))
  with pytest.raises(ValueError, match="gallery_labels.*length"):
    m.identification(g, [0, 1], g, [0, 1, 2], 1.0)
  with pytest.raises(ValueError, match="queries.*dimension"):
    m.identification(g, [0, 1, 2], np.zeros((2, 5)), [0, 1], 1.0)
  with pytest.raises(ValueError, match="queries.*NaN"):
    m.identification(g, [0, 1, 2], np.full((2, 4), np.nan), [0, 1], 1.0)
  with pytest.raises(ValueError, match="gallery.*empty"):
    m.identification(np.zeros((0, 4)), np.zeros(0, int), g, [0, 1, 2], 1.0)
  with pytest.raises(ValueError, match="threshold"):
    m.identification(g, [0, 1, 2], g, [0, 1, 2], float("nan"))
  with pytest.raises(ValueError, match="k:"):
    m.identification(g, [0, 1, 2], g, [0, 1, 2], 1.0, k=0)


# --------------------------------------------------------------------------
# evaluate_embeddings
# --------------------------------------------------------------------------

REQUIRED_KEYS = {
    "eval/accuracy", "eval/accuracy_std", "eval/auc", "eval/tar@far=1e-2", "eval/tar@far=1e-3",
    "eval/threshold", "eval/rank1", "eval/open_set/far", "eval/open_set/dir", "eval/open_set/frr",
    "eval/num_pairs", "eval/num_identities",
}


def test_evaluate_embeddings_separated():
  rng = np.random.default_rng(10)
  emb, lab = _clusters(rng, 30, 6, 32, spread=0.02)
  emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
  met, roc = m.evaluate_embeddings(emb, lab, seed=1)
  assert REQUIRED_KEYS <= met.keys()
  assert all(isinstance(v, float) for v in met.values())
  for key in ("eval/accuracy", "eval/auc", "eval/tar@far=1e-2", "eval/rank1",
              "eval/open_set/dir", "eval/open_set/rank1"):
    assert met[key] == 1.0, key
  assert met["eval/accuracy_std"] == 0.0
  assert met["eval/open_set/far"] == 0.0 and met["eval/open_set/frr"] == 0.0
  # 900 pairs -> 450 negatives; 1e-3 * 450 < 1 cannot be resolved.
  assert math.isnan(met["eval/tar@far=1e-3"])
  assert met["eval/num_pairs"] == 2 * 30 * 15 and met["eval/num_identities"] == 30
  assert set(roc) == {"fpr", "tpr", "thresholds"}
  assert roc["fpr"].shape == roc["tpr"].shape == roc["thresholds"].shape


def test_evaluate_embeddings_consistent_with_parts():
  rng = np.random.default_rng(11)
  emb, lab = _clusters(rng, 20, 5, 8, spread=0.8)
  met, roc = m.evaluate_embeddings(emb, lab, seed=4, num_folds=5)
  i, j, same = m.balanced_pairs(lab, 4)
  d = np.array([np.sum((emb[a] - emb[b]) ** 2) for a, b in zip(i, j)])
  assert met["eval/auc"] == pytest.approx(ref_auc(d, same), abs=1e-12)
  assert met["eval/threshold"] == pytest.approx(ref_best_threshold(d, same)[0], rel=1e-9)
  accs, _ = ref_kfold(d, same, m.stratified_folds(same, 5, 4))
  assert met["eval/accuracy"] == pytest.approx(accs.mean(), abs=1e-12)
  fpr, _, _ = m.roc_curve(d, same)
  np.testing.assert_allclose(roc["fpr"], fpr)
  assert 0.5 < met["eval/auc"] < 1.0 and 0.0 < met["eval/rank1"] < 1.0
  # Closed-set rank-1 with all 20 identities enrolled, recomputed with loops:
  # the gallery is the first image of each identity in the seeded permutation.
  perm = np.random.default_rng((4, 1)).permutation(len(lab))
  gal = {}
  for p in perm:
    gal.setdefault(int(lab[p]), int(p))
  gidx = np.array([gal[c] for c in sorted(gal)])
  qidx = np.setdiff1d(np.arange(len(lab)), gidx)
  ref = ref_identification(emb[gidx], lab[gidx], emb[qidx], lab[qidx], 0.0, 5)
  assert met["eval/rank1"] == pytest.approx(ref["rank1"], abs=1e-12)
  assert met["eval/top5"] == pytest.approx(ref["top_k"], abs=1e-12)
  # Deterministic in the seed.
  met2, _ = m.evaluate_embeddings(emb, lab, seed=4, num_folds=5)
  assert met2 == pytest.approx(met, nan_ok=True)


def test_evaluate_embeddings_random_is_chance_and_skips_open_set():
  rng = np.random.default_rng(12)
  emb = rng.normal(size=(400, 16)).astype(np.float32)
  lab = np.repeat(np.arange(40), 10)
  met, _ = m.evaluate_embeddings(emb, lab)
  # 3600 pairs: AUC std under the null ~ 0.0096; 0.05 is > 5 sigma.
  assert abs(met["eval/auc"] - 0.5) < 0.05
  assert met["eval/rank1"] < 0.15  # chance is 1/40
  # Only 2 identities: with gallery_fraction=0.5 just one is unknown -> skipped.
  met, _ = m.evaluate_embeddings(emb[:20], lab[:20])
  assert math.isnan(met["eval/open_set/far"]) and math.isnan(met["eval/open_set/dir"])
  assert not math.isnan(met["eval/rank1"])


def test_evaluate_embeddings_errors():
  emb = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="labels.*length"):
    m.evaluate_embeddings(emb, [0, 0, 1])
  bad = emb.copy()
  bad[1, 2] = np.nan
  with pytest.raises(ValueError, match="embeddings.*NaN"):
    m.evaluate_embeddings(bad, [0, 0, 1, 1])
  with pytest.raises(ValueError, match="gallery_fraction"):
    m.evaluate_embeddings(emb, [0, 0, 1, 1], gallery_fraction=0.0)
  with pytest.raises(ValueError, match="labels.*positive"):
    m.evaluate_embeddings(emb, [0, 1, 2, 3])


# --------------------------------------------------------------------------
# ROC PNG
# --------------------------------------------------------------------------


def test_save_roc_png_draws_curve(tmp_path):
  t = np.linspace(0.0, 1.0, 2001)
  fpr, tpr = t, np.sqrt(t)
  path = tmp_path / "roc.png"
  m.save_roc_png(fpr, tpr, path, title="Test", auc=2 / 3)
  img = np.asarray(Image.open(path).convert("RGB")).astype(int)
  assert img.shape == (480, 480, 3)
  left, top, right, bottom = m._PLOT_BOX
  curve = (img[..., 2] > 150) & (img[..., 0] < 90) & (img[..., 1] < 120)  # the blue curve
  for x in (0.1, 0.3, 0.5, 0.8):
    px = round(left + x * (right - left))
    py = round(bottom - math.sqrt(x) * (bottom - top))
    assert curve[py - 3:py + 4, px - 1:px + 2].any(), x
    # ... and not where the curve is absent (below the curve at the chance line).
    py_diag = round(bottom - x * (bottom - top))
    assert not curve[py_diag - 2:py_diag + 3, px - 1:px + 2].any(), x
  assert curve.sum() > 400                          # a long visible line
  dark = img.sum(axis=2) < 200
  assert dark[: top - 4].sum() > 50                 # title text above the plot
  assert dark[bottom + 6:].sum() > 50               # tick labels / axis label


def test_save_roc_png_errors(tmp_path):
  fpr, tpr = np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.8, 1.0])
  with pytest.raises(ValueError, match="path.*does not exist"):
    m.save_roc_png(fpr, tpr, tmp_path / "missing" / "roc.png")
  with pytest.raises(ValueError, match="path.*png"):
    m.save_roc_png(fpr, tpr, tmp_path / "roc.jpg")
  with pytest.raises(ValueError, match="tpr.*shape"):
    m.save_roc_png(fpr, tpr[:2], tmp_path / "roc.png")
  with pytest.raises(ValueError, match="fpr.*within"):
    m.save_roc_png(fpr * 2, tpr, tmp_path / "roc.png")
  (tmp_path / "dir.png").mkdir()
  with pytest.raises(ValueError, match="path.*cannot write"):
    m.save_roc_png(fpr, tpr, tmp_path / "dir.png")


def test_evaluate_embeddings_pair_distance_default_and_monotone_transform():
  rng = np.random.default_rng(13)
  emb, lab = _clusters(rng, 12, 5, 8, spread=0.8)
  base, base_roc = m.evaluate_embeddings(emb, lab, seed=2)
  # The squared Euclidean distance as a callable reproduces the default exactly.
  same_fn, _ = m.evaluate_embeddings(emb, lab, seed=2,
                                     pair_distance=lambda i, j: m.pair_distances(emb, i, j))
  assert same_fn == pytest.approx(base, nan_ok=True, rel=0, abs=0)
  # An increasing affine map of the scores (negative values included) changes
  # no decision, ranking or rate; the threshold moves with the map.
  got, roc = m.evaluate_embeddings(
      emb, lab, seed=2, pair_distance=lambda i, j: 3.0 * m.pair_distances(emb, i, j) - 5.0)
  for key, value in base.items():
    if key == "eval/threshold":
      assert got[key] == pytest.approx(3.0 * value - 5.0, rel=1e-12)
    else:
      assert got[key] == pytest.approx(value, nan_ok=True, abs=1e-12), key
  np.testing.assert_allclose(roc["tpr"], base_roc["tpr"])
  assert 0.0 < base["eval/rank1"] < 1.0 and 0.0 < base["eval/open_set/far"] < 1.0


def test_evaluate_embeddings_pair_distance_ranks_identities_by_it():
  # Embeddings say nothing; the callable knows the labels: every identity
  # metric must follow the callable, not the embeddings.
  lab = np.repeat(np.arange(6), 4)
  emb = np.zeros((24, 3), np.float32)
  oracle = lambda i, j: np.where(lab[i] == lab[j], 0.1, 2.0)
  met, _ = m.evaluate_embeddings(emb, lab, seed=0, pair_distance=oracle)
  assert met["eval/accuracy"] == 1.0 and met["eval/auc"] == 1.0
  assert met["eval/rank1"] == 1.0 and met["eval/open_set/far"] == 0.0
  assert met["eval/open_set/dir"] == 1.0


def test_evaluate_embeddings_pair_distance_errors():
  emb, lab = np.zeros((4, 3), np.float32), [0, 0, 1, 1]
  with pytest.raises(ValueError, match="pair_distance: returned shape"):
    m.evaluate_embeddings(emb, lab, pair_distance=lambda i, j: np.zeros(1))
  with pytest.raises(ValueError, match="pair_distance: returned NaN"):
    m.evaluate_embeddings(emb, lab, pair_distance=lambda i, j: np.full(i.shape, np.nan))
