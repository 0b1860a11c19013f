"""Tests for experiments/lfw_eval.py: face choice, metrics, a 4-pair real run (pairs parsing: test_data_lfw)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from experiments import lfw_eval
from jaxface import paths


def write(tmp_path, text, name="pairs.txt"):
  p = tmp_path / name
  p.write_text(text)
  return str(p)


def test_pick_face_nearest_centre_then_larger():
  boxes = np.array([[0, 0, 99, 99], [100, 100, 149, 149], [90, 90, 159, 159]])
  # Image 250x250: centre (124.5, 124.5); boxes 1 and 2 are both centred there, 2 is larger.
  assert lfw_eval.pick_face(boxes, 250, 250) == 2
  assert lfw_eval.pick_face(boxes[:2], 250, 250) == 1
  assert lfw_eval.pick_face(boxes[:1], 250, 250) == 0


def test_pick_face_largest_then_nearer_centre():
  # Box 0 is the largest but off-centre; boxes 1 and 2 have equal area, 2 nearer the centre.
  boxes = np.array([[0, 0, 119, 119], [150, 150, 199, 199], [100, 100, 149, 149]])
  assert lfw_eval.pick_face(boxes, 250, 250, "largest") == 0
  assert lfw_eval.pick_face(boxes[1:], 250, 250, "largest") == 1
  assert lfw_eval.pick_face(boxes, 250, 250, "centre") == 2
  # main: the largest box wholly inside the photo; a box past the border is passed over.
  cut = np.array([[200, 50, 290, 140], [100, 100, 149, 149]])
  assert lfw_eval.pick_face(cut, 250, 250, "largest") == 0 and lfw_eval.pick_face(cut, 250, 250, "main") == 1
  with pytest.raises(ValueError, match="--face"):
    lfw_eval.pick_face(boxes, 250, 250, "smallest")


def test_face_choice_has_its_own_cache(tmp_path):
  images = tmp_path / "imgs"
  for name in ("A", "B"):
    (images / name).mkdir(parents=True)
    for i in (1, 2):
      (images / name / f"{name}_{i:04d}.jpg").write_bytes(b"stub")
  p = write(tmp_path, "1\nA 1 2\nA 1 B 1\n")
  def fake(path, upsample):
    v = np.zeros(128, np.float32)
    v[0 if "A_" in path else 1] = 1.0
    return v, np.array([0, 0, 9, 9]), 2

  r = lfw_eval.run(p, str(images), 0, str(tmp_path / "w"), printer=lambda s: None, face="largest",
                   embed_fn=fake)
  assert r["face"] == "largest" and os.path.isfile(tmp_path / "w" / "lfw_embeddings_up0_largest.npz")
  assert not os.path.exists(tmp_path / "w" / "lfw_embeddings_up0.npz")
  lines = lfw_eval.report_lines(r)
  assert "(the largest box used)" in lines[0]
  with pytest.raises(ValueError, match="--face"):
    lfw_eval.run(p, str(images), 0, None, printer=lambda s: None, face="biggest")


def test_verification_metrics_against_reference():
  rng = np.random.default_rng(1)
  same = np.repeat([True, False], 50)
  dist = np.where(same, rng.normal(0.4, 0.1, 100), rng.normal(0.8, 0.1, 100))
  r = lfw_eval.verification_metrics(dist, same, None)
  acc_ref = sum((d <= 0.6) == s for d, s in zip(dist.tolist(), same.tolist())) / 100
  assert r["accuracy_at_0.6"] == pytest.approx(acc_ref)
  auc_ref = np.mean([(dp < dn) + 0.5 * (dp == dn) for dp in dist[same] for dn in dist[~same]])
  assert r["auc"] == pytest.approx(auc_ref)
  assert 0.8 < r["kfold_accuracy"] <= 1.0 and r["pairs"] == 100 and r["matched"] == 50


def test_evaluate_with_fake_embedder(tmp_path, monkeypatch):
  """Coverage counts and both protocols, with a stub in place of the face pipeline."""
  images = tmp_path / "imgs"
  for name, idx in [("A", 1), ("A", 2), ("B", 1), ("C", 1), ("D", 1)]:
    (images / name).mkdir(parents=True, exist_ok=True)
    (images / name / f"{name}_{idx:04d}.jpg").write_bytes(b"stub")
  # 3 matched then 3 mismatched pairs; ("E", 1) is missing, D has no face.
  p = write(tmp_path, "3\nA 1 2\nD 1 1\nE 1 1\nA 1 B 1\nB 1 C 1\nC 1 E 1\n")
  emb = {"A": np.zeros(128, np.float32), "B": np.full(128, 0.1, np.float32),
         "C": np.full(128, 0.2, np.float32)}

  def fake(path, upsample):
    name = os.path.basename(os.path.dirname(path))
    if name == "D":
      return None, None, 0
    return emb[name], np.array([1, 2, 3, 4]), 1

  lines = []
  r = lfw_eval.run(p, str(images), 0, str(tmp_path / "work"), printer=lines.append, embed_fn=fake)
  c = r["coverage"]
  assert (c["pairs"], c["pairs_with_both_images"], c["pairs_with_both_faces"]) == (6, 4, 3)
  assert (c["images_needed"], c["images_present"], c["images_missing"], c["images_no_face"]) == (6, 5, 1, 1)
  # Found-faces pairs: (A1, A2) d=0 same; (A, B) d=sqrt(128)*0.1=1.13 diff; (B, C) 1.13 diff.
  assert r["faces_found"]["pairs"] == 3 and r["faces_found"]["accuracy_at_0.6"] == 1.0
  # All pairs: D-D and E-E are "different" (wrong, they are matched); C-E "different" (right).
  assert r["all_pairs"]["accuracy_at_0.6"] == pytest.approx(4 / 6)
  assert r["no_face_images"] == [os.path.join("D", "D_0001.jpg")]
  assert any("ETA" in ln for ln in lines)
  saved = json.loads((tmp_path / "work" / "lfw_metrics.json").read_text())
  assert saved["coverage"] == c
  # The cache makes a second run embed nothing.
  calls = []
  lfw_eval.run(p, str(images), 0, str(tmp_path / "work"), printer=lambda s: None,
               embed_fn=lambda *a: calls.append(a))
  assert calls == []
  # Other pipeline code (fingerprint) -> the cache is stale and everything is recomputed.
  monkeypatch.setattr(lfw_eval, "pipeline_fingerprint", lambda: "other")
  lines.clear()
  lfw_eval.run(p, str(images), 0, str(tmp_path / "work"), printer=lines.append, embed_fn=fake)
  assert any("recomputing" in ln for ln in lines)
  assert any("[5/5]" in ln for ln in lines)


def _real_ready() -> str | None:
  root = paths.data_root()
  if not os.path.isdir(os.path.join(root, "faces", "lfw_subset")):
    return f"LFW subset not found under {root}"
  if importlib.util.find_spec("face_recognition_models") is None:
    return "face-recognition-models not installed"
  for mod in ("jaxface.faces.detector", "jaxface.faces._landmarks", "jaxface.faces._chips",
              "jaxface.models.dlib_resnet"):
    if importlib.util.find_spec(mod) is None:
      return f"{mod} not available"
  return None


@pytest.mark.slow
@pytest.mark.skipif(_real_ready() is not None, reason=str(_real_ready()))
def test_four_real_pairs_end_to_end(tmp_path):
  root = paths.data_root()
  lines = open(os.path.join(root, "faces", "lfw_protocol", "pairsDevTest.txt")).read().splitlines()
  # Two matched pairs (start of the file) and two mismatched ones (after the 500 matched).
  p = write(tmp_path, "2\n" + "\n".join(lines[1:3] + lines[501:503]) + "\n")
  r = lfw_eval.run(p, os.path.join(root, "faces", "lfw_subset"), 0, None, printer=lambda s: None)
  # Lines 2-3 share Abdullah_Gul_0013, so 7 distinct images.
  assert r["coverage"]["images_present"] == r["coverage"]["images_needed"] == 7
  assert r["coverage"]["pairs_with_both_faces"] == 4, r["no_face_images"]
  assert r["faces_found"]["accuracy_at_0.6"] == 1.0


def test_damaged_cache_is_reported_not_deleted(tmp_path):
  bad = tmp_path / "lfw_embeddings_up0.npz"
  bad.write_bytes(b"not an npz")
  with pytest.raises(ValueError, match="damaged embedding cache"):
    lfw_eval.EmbeddingCache(str(tmp_path), 0, "fp")
  assert bad.read_bytes() == b"not an npz"
