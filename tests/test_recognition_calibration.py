"""Tests for jaxface.recognition.calibration: pairs -> threshold, head, per-identity, FPIR -> gallery."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxface.recognition import calibrate, calibration, encoders, gallery as gallery_lib, open_set, siamese


def _people(root, rng, counts, dim=4, spread=0.2):
  """``root/<name>/<name>_k.jpg`` (bytes only) and each file's embedding: a centre per person plus noise."""
  vecs = {}
  for i, n in enumerate(counts):
    centre = rng.normal(size=dim)
    folder = root / f"p{i}"
    folder.mkdir(parents=True)
    for k in range(n):
      path = folder / f"p{i}_{k}.jpg"
      path.write_bytes(f"p{i}_{k}".encode())
      vecs[str(path)] = (centre + spread * rng.normal(size=dim)).astype(np.float32)
  return vecs


def test_labelled_pairs_from_lfw_and_folder(tmp_path):
  images = tmp_path / "lfw"
  for rel in ("ann/ann_0001.jpg", "ann/ann_0002.jpg", "bob/bob_0001.jpg"):
    (images / rel).parent.mkdir(parents=True, exist_ok=True)
    (images / rel).write_bytes(b"x")
  pairs_file = tmp_path / "pairs.txt"
  pairs_file.write_text("2\nann 1 2\nbob 1 2\nann 1 bob 1\nann 2 bob 2\n")
  pairs = calibration.LabelledPairs.from_lfw(str(pairs_file), str(images))
  assert len(pairs) == 4 and pairs.same.tolist() == [True, True, False, False]
  assert pairs.images() == sorted({*pairs.path1, *pairs.path2}) and len(pairs.images()) == 4
  assert [os.path.relpath(p, images) for p in pairs.present()] == [
      os.path.join("ann", "ann_0001.jpg"), os.path.join("ann", "ann_0002.jpg"), os.path.join("bob", "bob_0001.jpg")]
  assert pairs.impostors_within(pairs.present()) == 1  # ann 2 / bob 2 lacks bob_0002
  assert pairs.impostors_within(pairs.images()) == 2
  assert calibration.identity_of(pairs.path1[1]) == "bob"
  vecs = _people(tmp_path / "people", np.random.default_rng(0), [3, 2, 1])
  folder = calibration.LabelledPairs.from_folder(str(tmp_path / "people"), max_pairs=8, seed=0)
  p1, p2, same = siamese.folder_pairs(str(tmp_path / "people"), max_pairs=8, seed=0)
  assert (folder.path1, folder.path2, folder.same.tolist()) == (p1, p2, same.tolist())
  assert set(folder.images()) <= set(vecs)


def test_check_far_support():
  calibration.check_far_support(0, 1e-3)     # no impostor pair: the pair check reports that
  calibration.check_far_support(1000, 1e-3)  # 1/1000 is measurable
  with pytest.raises(calibration.UnsupportedFarError) as info:
    calibration.check_far_support(999, 1e-3)
  e = info.value
  assert isinstance(e, ValueError) and (e.num_negatives, e.target_far, e.needed) == (999, 1e-3, 1000)
  assert e.smallest == pytest.approx(1 / 999) and "at least 1000 impostor pairs" in str(e)
  with pytest.raises(calibration.UnsupportedFarError, match="down to 1/5 = 0.2 only$") as info:
    calibration.check_far_support(5, 0.0)
  assert info.value.needed is None


def _pair_setup(tmp_path, seed=0):
  vecs = _people(tmp_path / "people", np.random.default_rng(seed), [4, 4, 3, 3, 2, 1, 1])
  pairs = calibration.LabelledPairs.from_folder(str(tmp_path / "people"), max_pairs=40, seed=seed)
  paths = sorted(vecs)
  return pairs, paths, np.stack([vecs[p] for p in paths]), vecs


@pytest.mark.parametrize("best", [False, True])
def test_calibrate_pairs_matches_calibrate_on_the_usable_pairs(tmp_path, best):
  pairs, paths, emb, vecs = _pair_setup(tmp_path)
  # One image without a face: its pairs are left out.
  missing = pairs.path1[0]
  keep = [k for k, p in enumerate(paths) if p != missing]
  cal = calibration.calibrate_pairs(pairs, [paths[k] for k in keep], emb[keep], best=best, target_far=0.25)
  use = np.asarray([a != missing and b != missing for a, b in zip(pairs.path1, pairs.path2)])
  np.testing.assert_array_equal(cal.used, use)
  a = np.stack([vecs[p] for p, u in zip(pairs.path1, use) if u]).astype(np.float64)
  b = np.stack([vecs[p] for p, u in zip(pairs.path2, use) if u]).astype(np.float64)
  d, y = np.linalg.norm(a - b, axis=1), pairs.same[use]
  np.testing.assert_allclose(cal.distances, d)
  want = calibrate.best_accuracy_threshold(d, y) if best else calibrate.threshold_for_far(d, y, 0.25)
  assert cal.threshold == pytest.approx(want)
  rates = calibrate.rates_at(d, y, cal.threshold)
  assert (cal.accuracy, cal.far, cal.frr) == pytest.approx((rates["accuracy"], rates["far"], rates["frr"]))
  assert cal.method == ("best accuracy" if best else "FAR <= 0.25")
  rec = cal.record("--folder=people")
  assert list(rec) == ["score", "method", "target", "pairs", "genuine_pairs", "impostor_pairs", "accuracy",
                       "far", "frr", "source"]
  assert rec["method"] == ("best" if best else "far") and rec["target"] == (None if best else 0.25)
  assert rec["pairs"] == int(use.sum()) and rec["genuine_pairs"] + rec["impostor_pairs"] == rec["pairs"]


def test_calibrate_pairs_refusals(tmp_path):
  pairs, paths, emb, _ = _pair_setup(tmp_path)
  same_only = [p for p in paths if os.path.basename(os.path.dirname(p)) == "p0"]
  with pytest.raises(calibration.CalibrationError, match="same and different pairs"):
    calibration.calibrate_pairs(pairs, same_only, emb[[paths.index(p) for p in same_only]])
  with pytest.raises(calibration.UnsupportedFarError):  # about 20 impostor pairs cannot measure 1e-3
    calibration.calibrate_pairs(pairs, paths, emb, target_far=1e-3)
  with pytest.raises(ValueError, match="embeddings"):
    calibration.calibrate_pairs(pairs, paths, emb[:-1])


def test_train_head_on_the_calibration_pairs(tmp_path):
  pairs, paths, emb, _ = _pair_setup(tmp_path)
  cal = calibration.calibrate_pairs(pairs, paths, emb, best=True)
  fp = {"model": "fake"}
  head, accuracy = calibration.train_head(cal, seed=0, fingerprint=fp)
  assert isinstance(head, siamese.Siamese) and head.meta == {"fingerprint": fp}
  assert accuracy == pytest.approx(np.mean((head.predict(cal.e1, cal.e2) >= 0.5) == cal.same))
  assert accuracy > 0.8


def test_identity_thresholds():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(5, 4))
  assert calibration.identity_thresholds(emb, np.arange(5), 0.6) is None  # one image each: nothing to fit
  assert calibration.identity_thresholds(np.zeros((0, 4)), np.zeros(0, np.int64), 0.6) is None
  ids = np.asarray([0, 0, 1, 2, 2])
  got = calibration.identity_thresholds(emb, ids, 0.6, target_far=0.0)
  assert got == calibrate.per_identity_thresholds(emb, ids, global_threshold=0.6, target_far=0.0)
  assert set(got) == {0, 2}


def _crowd(rng, multi=20, single=12, dim=4):
  emb, names = [], []
  for i in range(multi + single):
    centre = rng.normal(size=dim)
    for _ in range(3 if i < multi else 1):
      emb.append(centre + 0.3 * rng.normal(size=dim))
      names.append(f"p{i}")
  return np.asarray(emb, np.float32), names


def test_calibrate_fpir_distance_is_open_set_fpir_threshold():
  emb, names = _crowd(np.random.default_rng(0))
  cal = calibration.calibrate_fpir(emb, names, gallery_size=5, target_fpir=0.1, score="distance", rounds=4)
  labels = np.unique(names, return_inverse=True)[1]
  want, info = open_set.fpir_threshold(emb, labels, 5, 0.1, rounds=4)
  assert cal.threshold == pytest.approx(want) and cal.cohort is None and cal.top_k == 0
  rec = cal.record("--folder=crowd")
  assert rec["method"] == "fpir" and rec["gallery_size"] == 5 and rec["cohort"] == 0
  assert rec["nonmated_searches"] == info["num_nonmated"] and rec["fpir"] <= 0.1


def test_calibrate_fpir_snorm_keeps_enrolled_people_out_of_the_cohort():
  emb, names = _crowd(np.random.default_rng(1))
  enrolled = {"p0", "p1", "p25"}
  cal = calibration.calibrate_fpir(emb, names, gallery_size=4, target_fpir=0.2, enrolled=enrolled,
                                   snorm_top_k=5, rounds=3)
  in_cohort = {n for n, c in zip(names, cal.cohort) if c}
  assert in_cohort and not in_cohort & enrolled and cal.cohort_size >= 2
  # Whole identities only.
  assert all(c == (n in in_cohort) for n, c in zip(names, cal.cohort))
  assert cal.score == "snorm" and cal.top_k == 5 and cal.record("x")["cohort"] == cal.cohort_size
  labels = np.unique(names, return_inverse=True)[1]
  want, _ = open_set.fpir_threshold(emb, labels, 4, 0.2, rounds=3, score="snorm", cohort=cal.cohort, top_k=5)
  assert cal.threshold == pytest.approx(want)
  # top_k larger than the cohort: all of it.
  wide = calibration.calibrate_fpir(emb, names, gallery_size=4, target_fpir=0.2, snorm_top_k=10_000, rounds=1)
  assert wide.top_k == wide.cohort_size


def test_calibrate_fpir_refusals():
  emb, names = _crowd(np.random.default_rng(2), multi=6, single=0)
  with pytest.raises(calibration.CohortError, match="leave 0 faces"):
    calibration.calibrate_fpir(emb, names, gallery_size=2, target_fpir=0.2, enrolled=set(names))
  with pytest.raises(ValueError, match="score"):
    calibration.calibrate_fpir(emb, names, gallery_size=2, target_fpir=0.2, score="cosine")
  with pytest.raises(ValueError, match="target_fpir"):
    calibration.calibrate_fpir(emb, names, gallery_size=2, target_fpir=1.0)
  with pytest.raises(ValueError, match="snorm_top_k"):
    calibration.calibrate_fpir(emb, names, gallery_size=2, target_fpir=0.2, snorm_top_k=1)


def test_store_fpir_writes_threshold_record_and_cohort(tmp_path):
  vecs = _people(tmp_path / "crowd", np.random.default_rng(3), [3] * 12 + [1] * 8, spread=0.3)
  paths = sorted(vecs)
  emb = np.stack([vecs[p] for p in paths])
  names = [calibration.identity_of(p) for p in paths]
  fp = {"model": "fake", "dim": 4}
  cal = calibration.calibrate_fpir(emb, names, gallery_size=3, target_fpir=0.2, rounds=2)
  db = str(tmp_path / "g.sqlite")
  with gallery_lib.Gallery(db, fp, create=True) as g:
    stored = calibration.store_fpir(g, cal, emb, paths, source="--folder=crowd")
  assert stored == cal.record("--folder=crowd")
  with gallery_lib.Gallery(db, readonly=True) as g:
    assert g.threshold() == pytest.approx(cal.threshold) and g.calibration() == stored
    assert g.score_kind() == "snorm"
    rows = np.flatnonzero(cal.cohort)
    np.testing.assert_allclose(g.cohort(), emb[rows], rtol=1e-6)
    assert [s["path"] for s in g.cohort_sources()] == [os.path.abspath(paths[r]) for r in rows]
    assert [s["sha256"] for s in g.cohort_sources()] == [encoders.content_sha256(paths[r]) for r in rows]
  plain = calibration.calibrate_fpir(emb, names, gallery_size=3, target_fpir=0.2, rounds=2, score="distance")
  with gallery_lib.Gallery(db, fp) as g:
    calibration.store_fpir(g, plain, emb, paths, source="s")
    assert g.score_kind() == "distance" and g.threshold() == pytest.approx(plain.threshold)
