"""experiments.recognition_eval: the open-set split, its rates, and a whole run with a fake embedder."""

import json
import os

import numpy as np
import pytest

from experiments import recognition_eval as ev
from jaxface.recognition import open_set

# Identity -> number of images; vectors: a direction per person plus a small per-image offset.
PEOPLE = {"Ann": 3, "Bob": 2, "Cy": 2, "Dee": 1, "Eve": 1, "Fay": 3, "Gus": 2, "Hal": 1, "Ivy": 1,
          "Jon": 2, "Kim": 1, "Lou": 1}
AXIS = {name: k for k, name in enumerate(sorted(PEOPLE))}


def _vec(name, i):
  v = np.zeros(128, np.float32)
  v[AXIS[name]] = 1.0
  v[127] = 0.05 * i
  return v


def fake_embed(path, upsample):
  base = os.path.basename(path)
  name, i = base[:-9], int(base[-8:-4])
  if name == "Cy" and i == 1:  # no face in Cy's first image
    return None, None, 0
  return _vec(name, i), np.array([0, 0, 10, 10]), 1


@pytest.fixture
def tree(tmp_path):
  root = tmp_path / "lfw"
  for name, n in PEOPLE.items():
    (root / name).mkdir(parents=True)
    for i in range(1, n + 1):
      (root / name / f"{name}_{i:04d}.jpg").write_bytes(b"x")
  return tmp_path, root


def test_open_set_split():
  ids = {"A": ["a1", "a2", "a3"], "B": ["b1", "b2"], "C": ["c1"], "D": ["d1", "d2"]}
  split = ev.open_set_split(ids, lambda r: r not in ("b1", "d1", "d2"))
  assert split["gallery"] == [("A", "a1"), ("B", "b2")]  # B's first image has no face: the next is enrolled
  assert split["known"] == [("A", "a2"), ("A", "a3")]
  assert split["unknown"] == [("C", "c1")]
  assert sorted(split["no_face"]) == ["b1", "d1", "d2"]


def test_open_set_metrics_by_hand():
  res = {"ids": np.array([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1]]),
         "best_id": np.array([0, -1, 1, -1, 0])}
  truth = np.array([0, 0, 1])  # 3 known queries, 2 unknown
  m = ev.open_set_metrics(res, truth, 3, 0.5)
  assert m["rank1_accuracy"] == pytest.approx(1 / 3)  # only query 0's nearest is right
  assert m["correct_accept_rate"] == pytest.approx(2 / 3)  # queries 0 and 2
  assert m["frr"] == pytest.approx(1 / 3)
  assert m["misidentification_rate"] == 0.0
  assert m["far"] == pytest.approx(1 / 2)


def test_fold_pairs_counts_and_distances():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(6, 4)).astype(np.float32)
  labels = np.array([0, 0, 0, 1, 1, 2])
  p = ev.fold_pairs([str(k) for k in range(6)], labels, emb, rng)
  assert p["same"].size == 15 and p["same"].sum() == 4  # 3 + 1 same pairs
  np.testing.assert_allclose(p["dist"], np.linalg.norm(emb[p["i"]] - emb[p["j"]], axis=1), rtol=1e-6)
  b = p["balanced"]
  assert b.size == 8 and p["same"][b].sum() == 4 and np.unique(b).size == 8


def test_run_with_fake_embedder(tree):
  tmp, root = tree
  lines = []
  r = ev.run(str(root), str(tmp / "cache"), str(tmp / "out"), features=("abs",), printer=lines.append,
             embed_fn=fake_embed, seed=1, one_shot_sizes=(2, 4), one_shot_rounds=(3, 2), fpirs=(0.5, 0.01),
             snorm_top_ks=(0, 2))
  o = r["open_set"]
  # Gallery: the 6 people with >= 2 images (Cy's second image: Cy_1 has no face); known: 2+1+0+2+1+1;
  # unknown: the 6 people with one image.
  assert (o["gallery_identities"], o["known_queries"], o["unknown_queries"], o["images_no_face"]) == (6, 7, 6, 1)
  # Same-person distances are 0.05-0.1, different-person ~sqrt(2): the calibrated thresholds separate them.
  for key in ("best_accuracy", "far<=0.001", "open_set_far<=0.05", "dlib_0.6"):
    m = o["by_threshold"][key]
    assert m["rank1_accuracy"] == 1.0 and m["far"] == 0.0 and m["frr"] == 0.0, key
  assert r["verification"]["threshold_0.6"]["accuracy"] == 1.0
  assert 0.0 <= r["verification"]["siamese_abs"]["accuracy"] <= 1.0
  saved = json.loads((tmp / "out" / "recognition_metrics.json").read_text())
  assert saved["open_set"]["known_queries"] == 7 and len(saved["folds"]) == 2
  assert os.path.isdir(tmp / "out" / "siamese_abs_fold0" / "checkpoints")
  assert os.path.isfile(tmp / "cache" / "lfw_embeddings_up0.npz")
  assert any("open-set 1:K" in ln for ln in lines)
  # One-shot galleries: 5 people with >= 2 faces (Cy has one face left: a single), 7 singles -> cohort of 3.
  one = saved["one_shot"]
  assert (one["cohort_identities"], one["cohort_images"]) == (3, 3)
  e4 = one["by_gallery_size"]["4"]
  assert e4["eligible_identities"] == 5 and e4["rounds"] == 2
  # 4 searchable singles + the one non-enrolled person's 2 or 3 faces: FPIR 0.5 measurable, 0.01 not.
  assert 6 <= e4["nonmated_per_round_min"] <= 7
  assert e4["distance"]["fpir=0.5"]["measurable"] and not e4["snorm"]["fpir=0.01"]["measurable"]
  assert e4["snorm_top2"]["fpir=0.5"]["measurable"] and one["snorm_top_ks"] == [0, 2]
  # Well separated fake people: every mated search is right and accepted at dlib's 0.6, no stranger.
  assert e4["distance"]["dlib_0.6"]["dir"] == 1.0 and e4["distance"]["dlib_0.6"]["fpir_measured"] == 0.0
  assert any(ln.startswith("| 4 | 2 |") and "n/a (min FPIR" in ln for ln in lines)


def _gauss_people(seed=0, people=60, dim=8):
  rng = np.random.default_rng(seed)
  counts = rng.choice([1, 1, 2, 3, 4], size=people)
  labels = np.repeat(np.arange(people), counts)
  emb = np.repeat(rng.normal(size=(people, dim)), counts, axis=0) + 0.5 * rng.normal(size=(labels.size, dim))
  return emb.astype(np.float32), labels


def test_one_shot_identification_matches_open_set_and_loops():
  emb, labels = _gauss_people()
  lines = []
  out = ev.one_shot_identification(emb, labels, sizes=(5, 20), rounds=(4, 2), fpirs=(0.1, 0.001),
                                   target_far=0.01, seed=3, snorm_top_ks=(0, 5),
                                   printer=lines.append)
  singles = [p for p in np.unique(labels) if np.sum(labels == p) == 1]
  assert out["cohort_identities"] == len(singles) // 2 == out["cohort_images"]
  # Recover the cohort: identities never seen among searches or galleries.
  e = out["by_gallery_size"]["5"]
  cohort_ids = np.random.default_rng(3).choice(np.array(singles), len(singles) // 2, replace=False)
  cohort = np.isin(labels, cohort_ids)
  for name, score, top_k in (("distance", "distance", 0), ("snorm", "snorm", 0), ("snorm_top5", "snorm", 5)):
    sim = open_set.simulate_one_shot(emb, labels, 5, rounds=4, seed=3, score=score, cohort=cohort, top_k=top_k)
    want = open_set.dir_at_fpir(sim["mated_top1_ids"], sim["mated_truth"], sim["mated_top1_scores"],
                                sim["nonmated_top1_scores"], 0.1)
    assert e[name]["fpir=0.1"]["dir"] == want["dir"] and e[name]["fpir=0.1"]["threshold"] == want["threshold"]
    assert not e[name]["fpir=0.001"]["measurable"]
    assert e[name]["fpir=0.001"]["min_supported_fpir"] == pytest.approx(1 / min(sim["nonmated_per_round"]))
  # Pair-FAR threshold by a loop over every pair outside the cohort.
  keep = np.flatnonzero(~cohort)
  neg = sorted(float(np.linalg.norm(emb[a].astype(np.float64) - emb[b]))
               for x, a in enumerate(keep) for b in keep[x + 1:] if labels[a] != labels[b])
  allowed = int(np.floor(0.01 * len(neg)))
  # Midpoint between the last accepted impostor distance and the next distance of any pair.
  assert neg[allowed - 1] <= out["pair_far_threshold"] <= neg[allowed]
  fixed = e["distance"]["pair_far<=0.01"]
  assert fixed["threshold"] == out["pair_far_threshold"]
  assert sum(ln.startswith("| 5 |") for ln in lines) == 3 and sum(ln.startswith("| 20 |") for ln in lines) == 3
  assert e["snorm"]["fpir=0.1"]["dir"] != e["snorm_top5"]["fpir=0.1"]["dir"] or \
      e["snorm"]["fpir=0.1"]["threshold"] != e["snorm_top5"]["fpir=0.1"]["threshold"]
