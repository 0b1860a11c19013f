"""The faces CLI: command logic in-process with a fake encoder, the real pipeline in a few subprocesses."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import faces as cli
from jaxface import paths
from jaxface.recognition import encoders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = paths.data_root()
EXAMPLES = os.path.join(DATA, "faces", "face_recognition_examples")
MULTI = os.path.join(DATA, "faces_multi", "face_recognition_examples")
needs_data = pytest.mark.skipif(not os.path.isdir(EXAMPLES), reason=f"{EXAMPLES} not present")


# --------------------------------------------------------------------------- fake encoder


class FakeEncoder(encoders.FaceEmbedder):
  dim = 4
  fingerprint = {"model": "fake", "weights_sha256": "0" * 64, "preprocessing": "none", "dim": 4}


# Each person is a direction; images of a person are small perturbations of it.
PEOPLE = {"ann": [1, 0, 0, 0], "bob": [0, 1, 0, 0], "cy": [0, 0, 1, 0], "dee": [0, 0, 0, 1]}


def _vec(name):
  person, k = name.rstrip("0123456789"), name[len(name.rstrip("0123456789")):] or "0"
  return (np.asarray(PEOPLE[person], np.float32) + 0.02 * int(k) * np.asarray([0.5, 0.5, -0.5, 0.5],
                                                                              np.float32))


def fake_encode_faces(image, encoder, *, upsample=0):
  """File names say what is in the image: 'ann1.jpg', 'ann1+bob2.jpg' (two faces), 'empty.jpg'."""
  with open(image, "rb") as f:
    if f.read() == b"broken":
      raise ValueError(f"{image}: cannot decode image")
  stem = os.path.splitext(os.path.basename(image))[0]
  names = [] if stem.startswith("empty") else stem.split("+")
  emb = np.stack([_vec(n) for n in names]) if names else np.zeros((0, 4), np.float32)
  # Later faces are bigger boxes: the largest-face rule picks the last one.
  boxes = np.asarray([[0, 0, 10 * (k + 1), 10 * (k + 1)] for k in range(len(names))], np.int64).reshape(-1, 4)
  return encoders.Faces(os.fspath(image), boxes, emb)


@pytest.fixture
def fake(monkeypatch, tmp_path):
  monkeypatch.setattr(encoders, "encode_faces", fake_encode_faces)
  monkeypatch.setattr(encoders, "get_encoder", lambda spec="dlib": FakeEncoder())
  photos = tmp_path / "photos"
  photos.mkdir()
  for name in ("ann1", "ann2", "ann3", "bob1", "bob2", "cy1", "dee1", "ann1+bob2", "empty"):
    (photos / f"{name}.jpg").write_bytes(name.encode())
  (photos / "broken.jpg").write_bytes(b"broken")
  return tmp_path


def _run(argv, tmp_path, **kw):
  out, err = io.StringIO(), io.StringIO()
  opts = cli.Options(gallery=str(tmp_path / "g" / "gallery.sqlite"), progress=False, **kw)
  code = cli.run(argv, opts, out, err)
  return code, out.getvalue(), err.getvalue()


def test_enroll_list_identify_verify_rename_remove(fake):
  t, ph = fake, fake / "photos"
  code, out, err = _run(["enroll", "ann", str(ph / "ann1.jpg")], t, format="json")
  assert code == 0, err
  assert json.loads(out) == [{"name": "ann", "id": 1, "added": 1, "embeddings": 1,
                              "gallery": str(t / "g" / "gallery.sqlite")}]
  assert _run(["enroll", "bob", str(ph / "bob1.jpg"), str(ph / "bob2.jpg")], t)[0] == 0
  assert _run(["enroll", "ann", str(ph / "ann2.jpg")], t)[0] == 0  # adds to ann
  code, out, _ = _run(["list"], t, format="csv")
  lines = out.strip().splitlines()
  assert lines[0] == "id,name,embeddings,threshold,created"
  assert [ln.split(",")[:3] for ln in lines[1:]] == [["1", "ann", "2"], ["2", "bob", "2"]]

  code, out, err = _run(["identify", str(ph / "ann3.jpg"), str(ph / "cy1.jpg"), str(ph / "ann1+bob2.jpg")],
                        t, format="json", k=2)
  assert code == 0, err
  rows = json.loads(out)
  assert [(os.path.basename(r["image"]), r["face"], r["identity"]) for r in rows] == [
      ("ann3.jpg", 0, "ann"), ("cy1.jpg", 0, cli.NOT_RECOGNIZED),
      ("ann1+bob2.jpg", 0, "ann"), ("ann1+bob2.jpg", 1, "bob")]
  # Distances against a NumPy brute force over the enrolled vectors.
  enrolled = {"ann": [_vec("ann1"), _vec("ann2")], "bob": [_vec("bob1"), _vec("bob2")]}
  q = _vec("ann3")
  best = min(np.linalg.norm(q - e) for e in enrolled["ann"])
  assert rows[0]["distance"] == pytest.approx(best, abs=1e-5)
  assert rows[0]["threshold"] == pytest.approx(0.6)
  assert [c.split(":")[0] for c in rows[0]["candidates"]] == ["ann", "bob"]  # distinct identities

  code, out, _ = _run(["verify", str(ph / "ann3.jpg")], t, name="ann", format="json")
  v = json.loads(out)[0]
  assert code == 0 and v["same"] is True and v["distance"] == pytest.approx(best, abs=1e-5)
  code, out, _ = _run(["verify", str(ph / "bob1.jpg")], t, name="ann", format="json")
  assert code == 0 and json.loads(out)[0]["same"] is False  # a mismatch is a result

  assert _run(["rename", "ann", "Ann Smith"], t)[0] == 0
  code, out, _ = _run(["remove", "bob"], t, format="json")
  assert code == 0 and json.loads(out) == [{"name": "bob", "removed_embeddings": 2}]
  code, out, _ = _run(["list"], t, format="json")
  assert [(r["name"], r["embeddings"]) for r in json.loads(out)] == [("Ann Smith", 2)]


def test_enroll_folder_uses_largest_face_and_strict_fails(fake):
  t, ph = fake, fake / "photos"
  code, _, err = _run(["enroll", "group", str(ph / "ann1+bob2.jpg")], t, strict=True)
  assert code == 1 and "ann1+bob2.jpg: 2 faces" in err and "Traceback" not in err
  assert not os.path.exists(t / "g" / "gallery.sqlite")  # nothing written on failure
  assert _run(["enroll", "group", str(ph / "ann1+bob2.jpg")], t)[0] == 0
  from jaxface.recognition import gallery
  with gallery.Gallery(str(t / "g" / "gallery.sqlite")) as g:
    emb, _ = g.embeddings()
    src = g.sources()
  np.testing.assert_allclose(emb[0], _vec("bob2"))  # the larger box
  assert src[0]["box"] == [0, 0, 20, 20] and src[0]["path"] == str(ph / "ann1+bob2.jpg")
  assert len(src[0]["sha256"]) == 64


def test_errors_name_the_input_and_set_exit_codes(fake):
  t, ph = fake, fake / "photos"
  code, _, err = _run(["identify", str(ph / "ann1.jpg")], t)
  assert code == 1 and "does not exist: enroll someone first" in err
  code, _, err = _run(["enroll", "x", str(ph / "empty.jpg")], t)
  assert code == 1 and "empty.jpg: no face found" in err
  code, _, err = _run(["enroll", "x", str(ph / "broken.jpg")], t)
  assert code == 1 and "broken.jpg" in err
  code, _, err = _run(["enroll", "x", str(ph / "missing.jpg")], t)
  assert code == 1 and "missing.jpg: no such file" in err
  # A folder with a bad image: fails as a whole, or skips it with --skip_bad.
  code, _, err = _run(["enroll", "x", str(ph)], t)
  assert code == 1 and ("broken.jpg" in err or "empty.jpg" in err)
  code, out, err = _run(["enroll", "everyone", str(ph)], t, skip_bad=True, format="json")
  assert code == 0 and json.loads(out)[0]["added"] == 8 and "skipped" in err
  code, _, err = _run(["verify", str(ph / "ann1.jpg")], t, name="nobody")
  assert code == 1 and "--name=nobody: not enrolled" in err
  code, _, err = _run(["verify", str(ph / "ann1.jpg")], t)
  assert code == 2 and "usage" in err
  # identify goes on past bad images, reports them, and exits 1.
  code, out, err = _run(["identify", str(ph / "empty.jpg"), str(ph / "ann1.jpg")], t, format="json")
  assert code == 1 and "empty.jpg: no face found" in err and len(json.loads(out)) == 1
  assert _run(["frobnicate"], t)[0] == 2
  assert _run([], t)[0] == 2
  assert _run(["list"], t, format="xml")[0] == 2
  code, _, err = _run(["remove", "nobody"], t)
  assert code == 1 and "nobody" in err


def test_empty_gallery_and_encoder_mismatch(fake, monkeypatch):
  t, ph = fake, fake / "photos"
  assert _run(["enroll", "ann", str(ph / "ann1.jpg")], t)[0] == 0
  assert _run(["remove", "ann"], t)[0] == 0
  code, _, err = _run(["identify", str(ph / "ann1.jpg")], t)
  assert code == 1 and "is empty: enroll someone first" in err

  class Other(FakeEncoder):
    fingerprint = {**FakeEncoder.fingerprint, "model": "other"}

  monkeypatch.setattr(encoders, "get_encoder", lambda spec="dlib": Other())
  code, _, err = _run(["enroll", "bob", str(ph / "bob1.jpg")], t)
  assert code == 1 and "fake" in err and "other" in err


def test_identify_known_unknown(fake):
  t, ph = fake, fake / "photos"
  known = t / "known"
  (known / "ann").mkdir(parents=True)
  (known / "ann" / "ann1.jpg").write_bytes(b"x")
  (known / "bob2.jpg").write_bytes(b"x")  # one file named after the person
  code, out, err = _run(["identify"], t, known=str(known), unknown=str(ph / "ann1+bob2.jpg"), format="csv")
  assert code == 0, err
  lines = out.strip().splitlines()
  assert lines[0] == "image,face,box,identity,distance,threshold,candidates"
  assert [ln.split(",")[3] for ln in lines[1:]] == ["ann", "bob2"]
  assert not os.path.exists(t / "g" / "gallery.sqlite")  # no gallery involved
  assert _run(["identify", "extra.jpg"], t, known=str(known), unknown=str(ph))[0] == 2


def test_calibrate_folder_sets_thresholds(fake):
  t, ph = fake, fake / "photos"
  people = t / "people"
  for name in ("ann1", "ann2", "ann3", "bob1", "bob2", "cy1", "dee1"):
    (people / name.rstrip("0123456789")).mkdir(parents=True, exist_ok=True)
    (people / name.rstrip("0123456789") / f"{name}.jpg").write_bytes(b"x")
  assert _run(["enroll", "ann", str(ph / "ann1.jpg"), str(ph / "ann2.jpg")], t)[0] == 0
  assert _run(["enroll", "bob", str(ph / "bob1.jpg")], t)[0] == 0
  code, out, err = _run(["calibrate"], t, folder=str(people), best=True, per_identity=True, format="json")
  assert code == 0, err
  row = json.loads(out)[0]
  assert row["pairs"] == 8 and row["accuracy"] == 1.0 and row["per_identity"] == 1  # 4 same + 4 different
  same_d = max(np.linalg.norm(_vec(a) - _vec(b)) for a, b in (("ann1", "ann2"), ("ann1", "ann3"), ("ann2", "ann3")))
  assert same_d <= row["threshold"] < np.sqrt(2) - 0.1
  code, out, _ = _run(["list"], t, format="json")
  thr = {r["name"]: r["threshold"] for r in json.loads(out)}
  assert thr["ann"] is not None and thr["bob"] is None
  # Identify now uses the calibrated threshold.
  code, out, _ = _run(["identify", str(ph / "ann3.jpg")], t, format="json")
  assert json.loads(out)[0]["threshold"] == pytest.approx(thr["ann"], abs=1e-6)
  # A Siamese head trained on the same pairs, used by verify.
  head = str(t / "head")
  code, out, err = _run(["calibrate"], t, folder=str(people), best=True, siamese=head, format="json")
  assert code == 0, err
  assert json.loads(out)[0]["siamese"] == head and os.path.isdir(os.path.join(head, "checkpoints"))
  code, out, err = _run(["verify", str(ph / "ann3.jpg"), str(ph / "bob2.jpg")], t, name="ann", siamese=head,
                        format="json")
  assert code == 0, err
  v = json.loads(out)
  assert v[0]["p_same"] > v[1]["p_same"]  # ann3 vs ann beats bob2 vs ann
  code, _, err = _run(["verify", str(ph / "ann3.jpg")], t, name="ann", siamese=str(t / "nohead"))
  assert code == 1 and "--siamese=" in err
  # A new calibration replaces the per-identity thresholds (they were fitted around the old one).
  code, out, _ = _run(["calibrate"], t, folder=str(people), target_far=0.5, format="json")
  assert code == 0 and json.loads(out)[0]["method"] == "FAR <= 0.5"
  assert all(r["threshold"] is None for r in json.loads(_run(["list"], t, format="json")[1]))
  assert _run(["calibrate"], t)[0] == 2
  assert _run(["calibrate"], t, folder=str(people), target_far=0.0)[0] == 2


def test_render_formats():
  rows = [{"a": 1, "b": 0.5, "c": ["x", "y"]}, {"a": 22, "b": float("nan"), "c": []}]
  table = cli.render(rows, "table").splitlines()
  assert table[0].split() == ["a", "b", "c"] and table[2].split() == ["1", "0.5000", "x", "y"]
  assert cli.render(rows, "csv").splitlines() == ["a,b,c", "1,0.5000,x y", "22,,"]
  assert json.loads(cli.render(rows[:1], "json")) == [{"a": 1, "b": 0.5, "c": ["x", "y"]}]
  assert cli.render([], "table") == "(nothing)\n"


# --------------------------------------------------------------------------- real pipeline, subprocess


def _cli(*args, gallery):
  env = {**os.environ, "JAXFACE_DATA": DATA}
  return subprocess.run([sys.executable, "-m", "experiments.faces", *args, f"--gallery={gallery}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@needs_data
def test_cli_subprocess_real_faces(tmp_path):
  g = str(tmp_path / "sub" / "g.sqlite")
  r = _cli("enroll", "rose", os.path.join(EXAMPLES, "rose_leslie", "img2.jpg"), gallery=g)  # one-shot
  assert r.returncode == 0, r.stderr
  assert "rose" in r.stdout
  r = _cli("enroll", "obama", os.path.join(EXAMPLES, "obama", "obama2.jpg"),
           os.path.join(EXAMPLES, "obama", "test_obama1.jpg"), "--format=json", gallery=g)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)[0]["added"] == 2
  r = _cli("identify", os.path.join(MULTI, "kit_with_rose.jpg"), os.path.join(EXAMPLES, "kit_harington"),
           "--format=json", gallery=g)
  assert r.returncode == 0, r.stderr  # unknown faces are results
  assert "identify [" in r.stderr  # progress bar for the folder
  rows = json.loads(r.stdout)
  group = sorted(x["identity"] for x in rows if x["image"].endswith("kit_with_rose.jpg"))
  assert group == sorted(["rose", cli.NOT_RECOGNIZED])
  kit = [x["identity"] for x in rows if "kit_harington" in x["image"]]
  assert len(kit) == 3 and set(kit) == {cli.NOT_RECOGNIZED}
  r = _cli("verify", os.path.join(MULTI, "kit_with_rose.jpg"), "--name=rose", "--strict", gallery=g)
  assert r.returncode == 1 and "kit_with_rose.jpg: 2 faces found where one is needed" in r.stderr
  assert "Traceback" not in r.stderr
