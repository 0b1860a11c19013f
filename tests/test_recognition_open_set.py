"""jaxface.recognition.open_set against brute-force NumPy loops."""

import math

import numpy as np
import pytest

from jaxface import score_norm
from jaxface.recognition import open_set


def _ref_threshold(scores, fpir):
  """Loosest midpoint threshold accepting <= floor(fpir * Q) scores, by trying every cut."""
  u = sorted(set(float(v) for v in scores))
  budget = math.floor(fpir * len(scores) + 1e-9)
  best = None
  for k in range(len(u) + 1):  # accept u[:k]
    accepted = sum(1 for v in scores if k and v <= u[k - 1])
    if accepted <= budget:
      best = k
  margin = (u[-1] - u[0]) / 2 if len(u) > 1 else 1.0
  if best == 0:
    return u[0] - margin
  if best == len(u):
    return u[-1] + margin
  return (u[best - 1] + u[best]) / 2


@pytest.mark.parametrize("fpir", [0.0, 0.01, 0.05, 0.1, 0.33, 1.0])
def test_threshold_for_fpir_matches_loop(fpir):
  rng = np.random.default_rng(1)
  s = np.round(rng.normal(size=200), 1)  # many ties
  t = open_set.threshold_for_fpir(s, fpir)
  assert t == pytest.approx(_ref_threshold(s.tolist(), fpir), abs=1e-12)
  assert np.sum(s <= t) <= math.floor(fpir * s.size + 1e-9)


def test_threshold_for_fpir_too_few_nonmated_names_min_supported():
  s = np.arange(50, dtype=float)
  with pytest.raises(ValueError, match=r"min_supported_fpir=0\.02.*need >= 1000"):
    open_set.threshold_for_fpir(s, 1e-3)
  assert open_set.threshold_for_fpir(s, 0.02) == 0.5  # exactly one accepted
  assert open_set.threshold_for_fpir(s, 0.0) < 0.0
  with pytest.raises(ValueError, match="target_fpir"):
    open_set.threshold_for_fpir(s, 1.5)
  with pytest.raises(ValueError, match="nonmated_scores"):
    open_set.threshold_for_fpir(np.array([0.1, np.nan]), 0.5)


def test_min_supported_and_needed():
  assert open_set.min_supported_fpir(1000) == 1e-3
  assert open_set.nonmated_needed(1e-3) == 1000 and open_set.nonmated_needed(0.01) == 100
  with pytest.raises(ValueError, match="num_nonmated"):
    open_set.min_supported_fpir(0)


def test_dir_at_fpir_by_hand():
  ids = np.array([1, 2, 3, 9, 5])
  truth = np.array([1, 2, 3, 4, 5])
  mated = np.array([0.1, 0.5, 0.9, 0.2, 0.3])
  non = np.array([0.25, 0.6, 0.8, 1.0, 1.2, 1.4, 1.5, 1.6, 1.7, 1.8])
  r = open_set.dir_at_fpir(ids, truth, mated, non, 0.1)  # one non-mated (0.25) may pass
  assert r["threshold"] == pytest.approx(0.425)
  assert r["dir"] == pytest.approx(2 / 5)  # 0.1 and 0.3 right and accepted; 0.2 is the wrong person
  assert r["rank1"] == pytest.approx(4 / 5)
  assert r["fpir_measured"] == pytest.approx(0.1)
  assert (r["num_mated"], r["num_nonmated"], r["min_supported_fpir"]) == (5, 10, 0.1)
  with pytest.raises(ValueError, match="mated_truth"):
    open_set.dir_at_fpir(ids, truth[:3], mated, non, 0.1)


def _data(seed=0, people=30, dim=6):
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 5, size=people)
  labels = np.repeat(np.arange(people) * 7 + 3, counts)  # labels need not be 0..n-1
  centres = rng.normal(size=(people, dim))
  emb = np.repeat(centres, counts, axis=0) + 0.6 * rng.normal(size=(labels.size, dim))
  return emb.astype(np.float32), labels


def _ref_top1(emb, labels, gallery, probes, score, mean=None, std=None):
  ids, sc = [], []
  for p in probes:
    best, best_j = None, None
    for j in gallery:
      d2 = float(np.sum((emb[p].astype(np.float64) - emb[j].astype(np.float64)) ** 2))
      s = math.sqrt(d2) if score == "distance" else 0.5 * ((d2 - mean[p]) / std[p] + (d2 - mean[j]) / std[j])
      if best is None or s < best:
        best, best_j = s, j
    ids.append(labels[best_j])
    sc.append(best)
  return np.array(ids), np.array(sc)


@pytest.mark.parametrize("score", ["distance", "snorm"])
def test_simulate_one_shot_matches_loop(score):
  emb, labels = _data()
  people = np.unique(labels)
  single = [p for p in people if np.sum(labels == p) == 1]
  cohort = np.isin(labels, single[:4])
  sim = open_set.simulate_one_shot(emb, labels, 5, rounds=3, seed=2, score=score, cohort=cohort)
  mean = std = None
  if score == "snorm":
    # Cohort statistics by loops (population std, like score_norm.cohort_stats).
    cr = np.flatnonzero(cohort)
    mean, std = np.zeros(len(emb)), np.zeros(len(emb))
    for i in range(len(emb)):
      d = [float(np.sum((emb[i].astype(np.float64) - emb[c].astype(np.float64)) ** 2)) for c in cr]
      mean[i], std[i] = np.mean(d), np.std(d)
    m32, s32 = score_norm.cohort_stats(emb, emb[cohort])
    np.testing.assert_allclose(mean, m32, rtol=1e-5)
  eligible = [p for p in people if p not in single[:4] and np.sum(labels == p) >= 2]
  assert sim["eligible_identities"] == len(eligible) and sim["cohort_rows"] == int(cohort.sum())
  for r in range(3):
    g = sim["galleries"][r]
    assert np.unique(labels[g]).size == 5 and set(labels[g]) <= set(eligible)
    mated = sim["mated_rows"][sim["mated_round"] == r]
    non = sim["nonmated_rows"][sim["nonmated_round"] == r]
    # Mated: exactly the other rows of the enrolled people; non-mated: every other non-cohort row.
    want_mated = [i for i in range(len(emb)) if labels[i] in labels[g] and i not in g]
    want_non = [i for i in range(len(emb)) if labels[i] not in labels[g] and not cohort[i]]
    assert sorted(mated) == want_mated and sorted(non) == want_non
    for rows, key in ((mated, "mated"), (non, "nonmated")):
      ids, sc = _ref_top1(emb, labels, g, rows, score, mean, std)
      sel = sim[f"{key}_round"] == r
      np.testing.assert_array_equal(sim[f"{key}_top1_ids"][sel], ids)
      np.testing.assert_allclose(sim[f"{key}_top1_scores"][sel], sc, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(sim["mated_truth"][sim["mated_round"] == r], labels[mated])
  assert sim["mated_per_round"] == [int(np.sum(sim["mated_round"] == r)) for r in range(3)]
  # Different rounds draw different galleries, and the seed fixes them.
  assert len({tuple(g) for g in sim["galleries"]}) > 1
  again = open_set.simulate_one_shot(emb, labels, 5, rounds=3, seed=2, score=score, cohort=cohort)
  np.testing.assert_array_equal(again["galleries"], sim["galleries"])


def test_simulate_one_shot_enrolls_every_image_of_a_person_over_rounds():
  emb, labels = _data(seed=3)
  sim = open_set.simulate_one_shot(emb, labels, 3, rounds=200, seed=0)
  # A person with 4 images: each of them is enrolled in some round (random choice, not the first).
  person = next(p for p in np.unique(labels) if np.sum(labels == p) == 4)
  enrolled = set(sim["galleries"].ravel().tolist())
  assert set(np.flatnonzero(labels == person).tolist()) <= enrolled


def test_simulate_one_shot_errors():
  emb, labels = _data()
  eligible = int(np.sum(np.unique(labels, return_counts=True)[1] >= 2))
  with pytest.raises(ValueError, match=f"gallery_size={eligible + 1} is larger than the {eligible}"):
    open_set.simulate_one_shot(emb, labels, eligible + 1)
  with pytest.raises(ValueError, match="needs a cohort"):
    open_set.simulate_one_shot(emb, labels, 3, score="snorm")
  half = np.zeros(len(labels), bool)
  two = np.flatnonzero(np.bincount(labels) >= 2)[0]
  half[np.flatnonzero(labels == two)[0]] = True
  with pytest.raises(ValueError, match="split"):
    open_set.simulate_one_shot(emb, labels, 3, cohort=half)
  with pytest.raises(ValueError, match="score"):
    open_set.simulate_one_shot(emb, labels, 3, score="cosine")
  # Every identity has 2 images and all are enrolled: no non-mated probe.
  lab2 = np.repeat(np.arange(4), 2)
  with pytest.raises(ValueError, match="no non-mated"):
    open_set.simulate_one_shot(np.eye(8, dtype=np.float32), lab2, 4)


def test_fpir_threshold_holds_its_target_and_grows_stricter_with_k():
  emb, labels = _data(seed=5, people=80)
  t5, info5 = open_set.fpir_threshold(emb, labels, 5, 0.05, rounds=10, seed=0)
  t30, info30 = open_set.fpir_threshold(emb, labels, 30, 0.05, rounds=10, seed=0)
  assert info5["fpir_measured"] <= 0.05 and info30["fpir_measured"] <= 0.05
  assert info5["num_nonmated"] == sum(info5["nonmated_per_round"]) and info5["gallery_size"] == 5
  # A larger gallery offers every stranger more chances: the same FPIR needs a tighter threshold.
  assert t30 < t5
  sim = open_set.simulate_one_shot(emb, labels, 30, rounds=10, seed=0)
  assert np.mean(sim["nonmated_top1_scores"] <= t5) > 0.05
  with pytest.raises(ValueError, match="min_supported_fpir"):
    open_set.fpir_threshold(emb, labels, 5, 1e-6, rounds=1)


def test_rates_at_fixed_threshold_by_loop():
  rng = np.random.default_rng(7)
  ids, truth = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
  ms, ns = rng.uniform(0, 1, 40), rng.uniform(0, 1, 25)
  r = open_set.rates_at(ids, truth, ms, ns, 0.6)
  assert r["dir"] == pytest.approx(sum(1 for a, b, s in zip(ids, truth, ms) if a == b and s <= 0.6) / 40)
  assert r["fpir_measured"] == pytest.approx(sum(1 for s in ns if s <= 0.6) / 25)
