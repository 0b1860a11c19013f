"""The faces CLI: command logic in-process with a fake encoder, the real pipeline in a few subprocesses."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import faces as cli
from jaxface import paths, progress
from jaxface.recognition import encoders, gallery, known_cache, open_set

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


CALLS = []  # every image the fake encoder embedded


def fake_encode_faces(image, encoder, *, upsample=0):
  """File names say what is in the image: 'ann1.jpg', 'ann1+bob2.jpg' (two faces), 'empty.jpg';
  LFW names 'ann_0002.jpg' are 'ann2'."""
  CALLS.append(os.fspath(image))
  with open(image, "rb") as f:
    if f.read() == b"broken":
      raise ValueError(f"{image}: cannot decode image")
  stem = re.sub(r"_0*(\d+)$", r"\1", os.path.splitext(os.path.basename(image))[0])
  names = [] if stem.startswith("empty") else stem.split("+")
  emb = np.stack([_vec(n) for n in names]) if names else np.zeros((0, 4), np.float32)
  # Later faces are bigger boxes: the largest-face rule picks the last one.
  boxes = np.asarray([[0, 0, 10 * (k + 1), 10 * (k + 1)] for k in range(len(names))], np.int64).reshape(-1, 4)
  return encoders.Faces(os.fspath(image), boxes, emb)


@pytest.fixture
def fake(monkeypatch, tmp_path):
  monkeypatch.setattr(encoders, "encode_faces", fake_encode_faces)
  monkeypatch.setenv("JAXFACE_CACHE", str(tmp_path / "cache"))
  CALLS.clear()
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
      ("ann3.jpg", 0, "ann"), ("cy1.jpg", 0, None),
      ("ann1+bob2.jpg", 0, "ann"), ("ann1+bob2.jpg", 1, "bob")]
  # Distances against a NumPy brute force over the enrolled vectors.
  enrolled = {"ann": [_vec("ann1"), _vec("ann2")], "bob": [_vec("bob1"), _vec("bob2")]}
  q = _vec("ann3")
  best = min(np.linalg.norm(q - e) for e in enrolled["ann"])
  assert rows[0]["distance"] == pytest.approx(best, abs=1e-5)
  assert rows[0]["threshold"] == pytest.approx(0.6)
  assert [c["name"] for c in rows[0]["candidates"]] == ["ann", "bob"]  # distinct identities
  assert rows[0]["candidates"][0]["distance"] == pytest.approx(best, abs=1e-5)
  assert [r["recognized"] for r in rows] == [True, False, True, True]

  code, out, _ = _run(["verify", str(ph / "ann3.jpg")], t, name="ann", format="json")
  v = json.loads(out)[0]
  assert code == 0 and v["same"] is True and v["distance"] == pytest.approx(best, abs=1e-5)
  code, out, _ = _run(["verify", str(ph / "bob1.jpg")], t, name="ann", format="json")
  assert code == 0 and json.loads(out)[0]["same"] is False  # a mismatch is a result

  assert _run(["rename", "ann", "Ann Smith"], t)[0] == 0
  code, out, _ = _run(["remove", "bob"], t, format="json")
  assert code == 0 and json.loads(out) == [{"name": "bob", "removed_embeddings": 2}]
  code, out, _ = _run(["list"], t, format="json")
  assert [(r["name"], r["embeddings"]) for r in json.loads(out)["identities"]] == [("Ann Smith", 2)]


def test_enroll_folder_uses_largest_face_and_strict_fails(fake):
  t, ph = fake, fake / "photos"
  code, _, err = _run(["enroll", "group", str(ph / "ann1+bob2.jpg")], t, strict=True)
  assert code == 1 and "ann1+bob2.jpg: 2 faces" in err and "Traceback" not in err
  assert not os.path.exists(t / "g" / "gallery.sqlite")  # nothing written on failure
  assert _run(["enroll", "group", str(ph / "ann1+bob2.jpg")], t)[0] == 0
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
  assert code == 1 and "broken.jpg" in err and "empty.jpg" in err  # every bad image, in one run
  assert "2 of 10 images cannot be used" in err and not os.path.exists(t / "g" / "gallery.sqlite")
  code, out, err = _run(["enroll", "everyone", str(ph)], t, skip_bad=True, format="json")
  assert code == 0 and json.loads(out)[0]["added"] == 8 and "skipped" in err
  code, _, err = _run(["verify", str(ph / "ann1.jpg")], t, name="nobody")
  assert code == 1 and "--name=nobody: not enrolled" in err
  code, _, err = _run(["verify", str(ph / "ann1.jpg")], t)
  assert code == 2 and "usage" in err
  # identify goes on past bad images, reports them, and exits 1.
  code, out, err = _run(["identify", str(ph / "empty.jpg"), str(ph / "ann1.jpg")], t, format="json")
  assert code == 1 and "empty.jpg: no face found" in err
  rows = json.loads(out)
  assert [(r["recognized"], r["identity"], r["error"]) for r in rows] == [
      (False, None, "no face found"), (True, "everyone", None)]
  assert rows[0]["face"] is None and rows[0]["box"] is None
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
  (known / "ann" / "ann1.jpg").write_bytes(b"ann1")
  (known / "bob2.jpg").write_bytes(b"bob2")  # one file named after the person
  code, out, err = _run(["identify"], t, known=str(known), unknown=str(ph / "ann1+bob2.jpg"), format="csv")
  assert code == 0, err
  lines = list(csv.reader(io.StringIO(out)))
  assert lines[0] == ["image", "face", "box", "recognized", "identity", "distance", "threshold", "candidates",
                      "error"]
  assert [ln[4] for ln in lines[1:]] == ["ann", "bob2"]
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
  thr = {r["name"]: r["threshold"] for r in json.loads(out)["identities"]}
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
  assert all(r["threshold"] is None for r in json.loads(_run(["list"], t, format="json")[1])["identities"])
  assert _run(["calibrate"], t)[0] == 2
  assert _run(["calibrate"], t, folder=str(people), target_far=0.0)[0] == 2


def test_progress_comes_from_jaxface_progress():
  assert cli.Progress is progress.Progress and not hasattr(cli.App, "Progress")


def test_bad_command_lines_fail_before_any_image_is_embedded(fake):
  t, ph = fake, fake / "photos"
  img = str(ph / "ann1.jpg")
  for bad in ("", "   ", " ann", "an\nn", "ann\tsmith", "nul\x00"):
    code, _, err = _run(["enroll", bad, img], t)
    assert code == 2 and "NAME" in err and "Traceback" not in err, (bad, err)
  for bad in (float("nan"), float("inf"), -0.5, -2.0):
    code, _, err = _run(["enroll", "ann", img], t, threshold=bad)
    assert code == 2 and f"--threshold={bad}" in err, err
    assert _run(["identify", img], t, threshold=bad)[0] == 2
  code, _, err = _run(["verify", img], t, name="bad\nname")
  assert code == 2 and "--name" in err
  assert CALLS == [] and not os.path.exists(t / "g")  # nothing embedded, nothing created
  # A name is stored and echoed in NFC: the decomposed spelling is the same identity.
  code, out, err = _run(["enroll", "Zoe\u0308", img], t, format="json", threshold=0.0)
  assert code == 0, err
  assert json.loads(out)[0]["name"] == "Zo\u00eb"
  code, out, _ = _run(["verify", img], t, name="Zo\u00eb", format="json")
  assert code == 0 and json.loads(out)[0]["same"] is True


def test_encoder_mismatch_and_unwritable_gallery_fail_before_embedding(fake, monkeypatch):
  t, ph = fake, fake / "photos"
  assert _run(["enroll", "ann", str(ph / "ann1.jpg")], t)[0] == 0
  people = t / "people"
  for name in ("ann1", "ann2", "bob1", "bob2"):
    (people / name[:3]).mkdir(parents=True, exist_ok=True)
    (people / name[:3] / f"{name}.jpg").write_bytes(name.encode())

  class Other(FakeEncoder):
    fingerprint = {**FakeEncoder.fingerprint, "model": "other"}

  monkeypatch.setattr(encoders, "get_encoder", lambda spec="dlib": Other())
  CALLS.clear()
  for argv, kw in ((["enroll", "bob", str(ph / "bob1.jpg"), str(ph / "bob2.jpg")], {}),
                   (["identify", str(ph / "bob1.jpg")], {}), (["verify", str(ph / "ann1.jpg")], {"name": "ann"}),
                   (["calibrate"], {"folder": str(people), "best": True})):
    code, _, err = _run(argv, t, **kw)
    assert code == 1 and "fake" in err and "other" in err, (argv, err)
  assert CALLS == []
  monkeypatch.setattr(encoders, "get_encoder", lambda spec="dlib": FakeEncoder())
  monkeypatch.setattr(gallery, "writable_problem", lambda path: "the file is read-only (Permission denied)")
  g = str(t / "g" / "gallery.sqlite")
  for argv, kw in ((["enroll", "bob", str(ph / "bob1.jpg")], {}), (["remove", "ann"], {}),
                   (["rename", "ann", "Ann"], {}), (["calibrate"], {"folder": str(people), "best": True})):
    code, _, err = _run(argv, t, **kw)
    assert code == 1 and g in err and "read-only (Permission denied)" in err, (argv, err)
    assert "Traceback" not in err
  assert CALLS == []
  # Reads do not need a writable gallery.
  code, out, err = _run(["list"], t, format="json")
  assert code == 0 and [r["name"] for r in json.loads(out)["identities"]] == ["ann"], err
  assert _run(["identify", str(ph / "ann1.jpg")], t)[0] == 0


def test_reads_open_the_gallery_read_only_and_change_nothing(fake, monkeypatch):
  t, ph = fake, fake / "photos"
  assert _run(["enroll", "ann", str(ph / "ann1.jpg")], t)[0] == 0
  modes = []
  real = gallery.Gallery

  def spy(*a, **kw):
    modes.append(kw.get("readonly", False))
    return real(*a, **kw)

  monkeypatch.setattr(gallery, "Gallery", spy)
  assert _run(["list"], t)[0] == 0
  assert _run(["identify", str(ph / "ann1.jpg")], t)[0] == 0
  assert _run(["verify", str(ph / "ann1.jpg")], t, name="ann")[0] == 0
  assert modes == [True, True, True]
  # Not a gallery / an empty file: an error, and the file is left as it was.
  for content in (b"", b"hello, not a gallery\n"):
    other = t / "other"
    other.mkdir(exist_ok=True)
    f = other / "g.sqlite"
    f.write_bytes(content)
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(["list"], cli.Options(gallery=str(f), progress=False), out, err)
    assert code == 1 and str(f) in err.getvalue() and "Traceback" not in err.getvalue()
    assert f.read_bytes() == content and sorted(os.listdir(other)) == ["g.sqlite"]


def test_structured_identify_results(fake):
  t, ph = fake, fake / "photos"
  # A person may well be called "not recognized": the output must not confuse them with a stranger.
  assert _run(["enroll", cli.NOT_RECOGNIZED, str(ph / "dee1.jpg")], t)[0] == 0
  assert _run(["enroll", "ann", str(ph / "ann1.jpg")], t)[0] == 0
  imgs = [str(ph / n) for n in ("dee1.jpg", "cy1.jpg", "empty.jpg", "broken.jpg")]
  code, out, err = _run(["identify", *imgs], t, format="json", k=2)
  assert code == 1  # unusable images are still a failure
  assert "empty.jpg: no face found" in err and "broken.jpg: cannot decode image" in err
  rows = json.loads(out)
  assert [(r["recognized"], r["identity"]) for r in rows] == [
      (True, cli.NOT_RECOGNIZED), (False, None), (False, None), (False, None)]
  assert [r["error"] for r in rows] == [None, None, "no face found", "cannot decode image"]
  assert rows[0]["candidates"][0] == {"name": cli.NOT_RECOGNIZED, "distance": pytest.approx(0.0, abs=1e-6)}
  cands = rows[1]["candidates"]
  assert sorted(c["name"] for c in cands) == ["ann", cli.NOT_RECOGNIZED]
  assert [c["distance"] for c in cands] == pytest.approx([np.sqrt(2)] * 2, abs=1e-5)
  assert rows[2]["face"] is None and rows[2]["box"] is None and rows[2]["candidates"] == []
  # CSV: the same fields; identity empty when not recognized; candidates as JSON text.
  code, out, _ = _run(["identify", *imgs], t, format="csv", k=2)
  table = list(csv.DictReader(io.StringIO(out)))
  assert [(r["recognized"], r["identity"], r["error"]) for r in table] == [
      ("True", cli.NOT_RECOGNIZED, ""), ("False", "", ""), ("False", "", "no face found"),
      ("False", "", "cannot decode image")]
  cands = json.loads(table[1]["candidates"])
  assert [c["name"] for c in cands] == [c["name"] for c in rows[1]["candidates"]]
  # The table still reads "not recognized" for a stranger and shows the error.
  code, out, _ = _run(["identify", *imgs[1:3]], t, k=1)
  assert "not recognized" in out and "no face found" in out and "error" in out.splitlines()[0]
  code, out, _ = _run(["identify", imgs[0]], t)
  assert "error" not in out.splitlines()[0]  # no error, no empty column


def test_list_json_is_one_object(fake):
  t, ph = fake, fake / "photos"
  people = t / "people"
  for name in ("ann1", "ann2", "bob1", "bob2"):
    (people / name[:3]).mkdir(parents=True, exist_ok=True)
    (people / name[:3] / f"{name}.jpg").write_bytes(name.encode())
  assert _run(["enroll", "ann", str(ph / "ann1.jpg"), str(ph / "ann2.jpg")], t)[0] == 0
  assert _run(["enroll", "bob", str(ph / "bob1.jpg")], t)[0] == 0
  code, out, _ = _run(["list"], t, format="json")
  doc = json.loads(out)
  assert doc["gallery"] == str(t / "g" / "gallery.sqlite") and doc["fingerprint"] == FakeEncoder.fingerprint
  assert doc["threshold"] is None and doc["calibration"] is None
  assert [(r["name"], r["embeddings"], r["threshold"]) for r in doc["identities"]] == [
      ("ann", 2, None), ("bob", 1, None)]
  code, out, err = _run(["calibrate"], t, folder=str(people), best=True, per_identity=True)
  assert code == 0, err
  doc = json.loads(_run(["list"], t, format="json")[1])
  assert doc["threshold"] > 0 and doc["identities"][0]["threshold"] is not None
  cal = doc["calibration"]
  assert cal["method"] == "best" and cal["pairs"] == 4 and cal["impostor_pairs"] == 2
  assert cal["source"] == f"--folder={people}"


def _lfw(root, same, diff):
  """An LFW pairs file under ``root`` and the image folder it names (images not written)."""
  lines = [f"{len(same)}"] + [f"{n} {i} {j}" for n, i, j in same] + [f"{a} {i} {b} {j}" for a, i, b, j in diff]
  pairs = root / "pairs.txt"
  pairs.write_text("\n".join(lines) + "\n")
  return str(pairs)


def test_calibrate_names_the_image_folder_and_refuses_unsupported_far(fake, monkeypatch):
  t = fake
  images = t / "lfw"
  same = [("ann", 1, 2), ("bob", 1, 2)]
  diff = [("ann", 1, "bob", 1), ("ann", 2, "bob", 2)]
  pairs = _lfw(t, same, diff)
  monkeypatch.setenv("JAXFACE_DATA", str(t / "nodata"))
  code, _, err = _run(["calibrate"], t, pairs=pairs, best=True)  # default folder: nothing there
  assert code == 1 and str(t / "nodata" / "faces" / "lfw_subset") in err and "--images=DIR" in err
  assert "none of the 4 pair images" in err and CALLS == []
  for person in ("ann", "bob"):
    (images / person).mkdir(parents=True)
    (images / person / f"{person}_0001.jpg").write_bytes(f"{person}1".encode())
  (images / "ann" / "ann_0002.jpg").write_bytes(b"ann2")  # bob_0002 missing
  code, out, err = _run(["calibrate"], t, pairs=pairs, images=str(images), best=True, format="json")
  assert code == 0, err
  assert f"1 of 4 pair images are missing under --images={images}" in err
  assert json.loads(out)[0]["pairs"] == 2 and json.loads(out)[0]["left_out"] == 2
  # 2 impostor pairs measure a FAR of 0.5 at best: 0.1 is refused before any embedding, nothing stored.
  (images / "bob" / "bob_0002.jpg").write_bytes(b"bob2")
  assert _run(["enroll", "ann", str(images / "ann" / "ann_0001.jpg")], t)[0] == 0
  CALLS.clear()
  code, _, err = _run(["calibrate"], t, pairs=pairs, images=str(images), target_far=0.1)
  assert code == 1 and "2 impostor" in err and "0.5" in err and "at least 10 impostor pairs" in err, err
  assert CALLS == []
  doc = json.loads(_run(["list"], t, format="json")[1])
  assert doc["threshold"] is not None and doc["calibration"]["method"] == "best"  # the earlier one stays
  code, out, err = _run(["calibrate"], t, pairs=pairs, images=str(images), target_far=0.5, format="json")
  assert code == 0 and json.loads(out)[0]["method"] == "FAR <= 0.5", err


def test_enroll_hygiene_repeats_and_duplicates(fake):
  t, ph = fake, fake / "photos"
  copy = t / "copy_of_ann1.jpg"
  copy.write_bytes((ph / "ann1.jpg").read_bytes())
  code, out, err = _run(["enroll", "ann", str(ph / "ann1.jpg"), str(ph / "ann1.jpg"), str(copy)], t,
                        format="json")
  assert code == 0, err
  assert json.loads(out)[0]["added"] == 1
  assert f"{ph / 'ann1.jpg'} and {ph / 'ann1.jpg'} are the same file" in err
  assert f"{copy} has the same content as {ph / 'ann1.jpg'}" in err
  assert CALLS == [str(ph / "ann1.jpg")]
  # ann2 is ann's face: enrolling it as bob is refused, nothing written.
  code, _, err = _run(["enroll", "bob", str(ph / "bob1.jpg"), str(ph / "ann2.jpg")], t)
  d = np.linalg.norm(_vec("ann2") - _vec("ann1"))
  assert code == 1 and "'ann'" in err and "'bob'" in err and f"{d:.4f}" in err and "ann2.jpg" in err, err
  assert "--allow_duplicates" in err
  names = [r["name"] for r in json.loads(_run(["list"], t, format="json")[1])["identities"]]
  assert names == ["ann"]
  # Adding to the same identity is no duplicate; --allow_duplicates accepts (and still warns).
  assert _run(["enroll", "ann", str(ph / "ann3.jpg")], t)[0] == 0
  code, out, err = _run(["enroll", "bob", str(ph / "bob1.jpg"), str(ph / "ann2.jpg")], t, allow_duplicates=True,
                        format="json")
  assert code == 0 and json.loads(out)[0]["added"] == 2 and "matches 'ann'" in err
  # A tighter --threshold is the one in force: no duplicate then.
  (ph / "ann4.jpg").write_bytes(b"ann4")
  code, _, err = _run(["enroll", "cy", str(ph / "ann4.jpg")], t, threshold=1e-4)
  assert code == 0 and "matches" not in err, err


def test_verify_says_when_it_picked_the_largest_face(fake):
  t, ph = fake, fake / "photos"
  assert _run(["enroll", "bob", str(ph / "bob1.jpg")], t)[0] == 0
  code, out, err = _run(["verify", str(ph / "ann1+bob2.jpg"), str(ph / "bob2.jpg"), str(ph / "empty.jpg")], t,
                        name="bob", format="json")
  rows = json.loads(out)
  assert [(r["faces"], r["same"], r["error"]) for r in rows] == [
      (2, True, None), (1, True, None), (0, False, "no face found")]
  assert "ann1+bob2.jpg: 2 faces found; using the largest" in err
  assert err.count("using the largest") == 1  # only for the image with several faces
  assert code == 1 and "empty.jpg: no face found" in err  # an unusable image is still exit status 1


def test_identify_known_caches_embeddings(fake):
  t, ph = fake, fake / "photos"
  known = t / "known"
  (known / "ann").mkdir(parents=True)
  (known / "ann" / "ann1.jpg").write_bytes(b"ann1")
  (known / "bob2.jpg").write_bytes(b"bob2")
  (known / "empty.jpg").write_bytes(b"empty")  # no face: cached as such
  unknown = str(ph / "ann1+bob2.jpg")
  code, out1, err = _run(["identify"], t, known=str(known), unknown=unknown, format="json")
  assert code == 0, err
  assert len(CALLS) == 4  # 3 known + 1 unknown
  cache_files = os.listdir(t / "cache" / known_cache.SUBDIR)
  assert len(cache_files) == 1 and cache_files[0].endswith(".npz")
  CALLS.clear()
  code, out2, err = _run(["identify"], t, known=str(known), unknown=unknown, format="json")
  assert code == 0 and out2 == out1 and CALLS == [unknown], err
  # A changed file is embedded again; the others come from the cache.
  (known / "bob2.jpg").write_bytes(b"bob2, edited")
  CALLS.clear()
  assert _run(["identify"], t, known=str(known), unknown=unknown)[0] == 0
  assert CALLS == [str(known / "bob2.jpg"), unknown]
  # Another --upsample is another cache.
  CALLS.clear()
  assert _run(["identify"], t, known=str(known), unknown=unknown, upsample=0)[0] == 0
  assert len(CALLS) == 4
  # A damaged cache file is reported and rebuilt.
  path = t / "cache" / known_cache.SUBDIR / cache_files[0]
  path.write_bytes(b"garbage")
  CALLS.clear()
  code, out3, err = _run(["identify"], t, known=str(known), unknown=unknown, format="json")
  assert code == 0 and str(path) in err and "rebuilding" in err and len(CALLS) == 4
  CALLS.clear()
  code, _, err = _run(["identify"], t, known=str(known), unknown=unknown)
  assert code == 0 and "rebuilding" not in err and CALLS == [unknown]
  CALLS.clear()
  assert _run(["identify"], t, known=str(known), unknown=unknown, known_cache=False)[0] == 0
  assert len(CALLS) == 4


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
  assert "identify: 4/4 (100%)" in r.stderr and "\r" not in r.stderr  # a pipe: progress as log lines
  rows = json.loads(r.stdout)
  group = sorted(str(x["identity"]) for x in rows if x["image"].endswith("kit_with_rose.jpg"))
  assert group == ["None", "rose"]
  kit = [(x["recognized"], x["identity"]) for x in rows if "kit_harington" in x["image"]]
  assert len(kit) == 3 and set(kit) == {(False, None)}
  r = _cli("verify", os.path.join(MULTI, "kit_with_rose.jpg"), "--name=rose", "--strict", gallery=g)
  assert r.returncode == 1 and "kit_with_rose.jpg: 2 faces found where one is needed" in r.stderr
  assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- open-set calibration


def _crowd(root, rng, *, multi=24, single=16, dim=4):
  """``root/pN/pN_k.jpg`` for ``multi`` people with 3 images and ``single`` with 1; each file holds
  its embedding as text ('vec:a,b,c,d'), which :func:`_vec_faces` returns as one face."""
  vecs = {}
  for i in range(multi + single):
    centre = rng.normal(size=dim)
    for k in range(3 if i < multi else 1):
      folder = root / f"p{i}"
      folder.mkdir(parents=True, exist_ok=True)
      v = (centre + 0.3 * rng.normal(size=dim)).astype(np.float32)
      path = folder / f"p{i}_{k}.jpg"
      path.write_bytes(("vec:" + ",".join(repr(float(x)) for x in v)).encode())
      vecs[str(path)] = v
  return vecs


def _vec_faces(image, encoder, *, upsample=0):
  with open(image, "rb") as f:
    data = f.read()
  if not data.startswith(b"vec:"):
    return fake_encode_faces(image, encoder, upsample=upsample)
  CALLS.append(os.fspath(image))
  v = np.asarray([float(x) for x in data[4:].decode().split(",")], np.float32)
  return encoders.Faces(os.fspath(image), np.asarray([[0, 0, 10, 10]], np.int64), v[None])


def test_calibrate_target_fpir_for_a_gallery_size(fake, monkeypatch):
  monkeypatch.setattr(encoders, "encode_faces", _vec_faces)
  t = fake
  vecs = _crowd(t / "crowd", np.random.default_rng(0))
  code, _, err = _run(["calibrate"], t, folder=str(t / "crowd"), target_fpir=0.1)
  assert code == 2 and "--gallery_size" in err and not CALLS  # empty gallery: K unknown, nothing embedded
  code, out, err = _run(["calibrate"], t, folder=str(t / "crowd"), target_fpir=0.1, gallery_size=5,
                        rounds=4, score="distance", format="json")
  assert code == 0, err
  row = json.loads(out)[0]
  # The same simulation run directly on the same embeddings gives the stored threshold.
  paths_ = sorted(vecs, key=lambda p: (os.path.basename(os.path.dirname(p)), p))
  labels = np.unique([os.path.basename(os.path.dirname(p)) for p in paths_], return_inverse=True)[1]
  want, info = open_set.fpir_threshold(np.stack([vecs[p] for p in paths_]), labels, 5, 0.1, rounds=4)
  assert row["threshold"] == pytest.approx(want) and row["fpir"] <= 0.1 and row["score"] == "distance"
  assert row["nonmated_searches"] == info["num_nonmated"]
  with gallery.Gallery(str(t / "g" / "gallery.sqlite"), readonly=True) as g:
    cal = g.calibration()
    assert g.threshold() == pytest.approx(want) and cal["method"] == "fpir" and cal["gallery_size"] == 5
  # Decisions use it, and a gallery grown past the calibrated size is warned about.
  monkeypatch.setattr(encoders, "encode_faces", fake_encode_faces)
  ph = t / "photos"
  for name in ("ann", "bob", "cy", "dee"):
    assert _run(["enroll", name, str(ph / f"{name}1.jpg")], t, allow_duplicates=True)[0] == 0
  code, out, err = _run(["identify", str(ph / "ann3.jpg")], t, format="json")
  assert code == 0 and json.loads(out)[0]["threshold"] == pytest.approx(want) and "calibrated for" not in err
  (ph / "zed.jpg").write_bytes(b"ann2")  # one more person (content 'ann2' parses as ann's second image)
  monkeypatch.setitem(PEOPLE, "eve", [0.5, 0.5, 0.5, 0.5])
  assert _run(["enroll", "eve", str(ph / "ann2.jpg")], t, allow_duplicates=True)[0] == 0
  monkeypatch.setitem(PEOPLE, "fay", [-1, 0, 0, 0])
  (ph / "fay1.jpg").write_bytes(b"fay1")
  assert _run(["enroll", "fay", str(ph / "fay1.jpg")], t, allow_duplicates=True)[0] == 0
  code, out, err = _run(["identify", str(ph / "ann3.jpg")], t, format="json")
  assert code == 0 and "calibrated for a gallery of 5 people" in err and "holds 6" in err
  # Too few strangers for the target: refused, and the stored calibration is kept.
  monkeypatch.setattr(encoders, "encode_faces", _vec_faces)
  code, _, err = _run(["calibrate"], t, folder=str(t / "crowd"), target_fpir=1e-4, gallery_size=5, rounds=1,
                      score="distance")
  assert code == 1 and "--target_fpir=0.0001" in err
  with gallery.Gallery(str(t / "g" / "gallery.sqlite"), readonly=True) as g:
    assert g.threshold() == pytest.approx(want)


def test_calibrate_snorm_keeps_a_cohort_and_decides_on_scores(fake, monkeypatch):
  monkeypatch.setattr(encoders, "encode_faces", _vec_faces)
  t = fake
  vecs = _crowd(t / "crowd", np.random.default_rng(1))
  assert _run(["calibrate"], t, folder=str(t / "crowd"), score="snorm")[0] == 2  # needs --target_fpir
  enrolled = [p for p in vecs if os.path.basename(p).startswith(("p0_", "p1_", "p2_"))]
  for k in range(3):
    assert _run(["enroll", f"p{k}", *[p for p in enrolled if f"/p{k}_" in p][:1]], t)[0] == 0, k
  code, out, err = _run(["calibrate"], t, folder=str(t / "crowd"), target_fpir=0.2, snorm_top_k=5,
                        rounds=3, format="json")  # --score defaults to snorm with --target_fpir
  assert code == 0, err
  row = json.loads(out)[0]
  with gallery.Gallery(str(t / "g" / "gallery.sqlite"), readonly=True) as g:
    cohort, thr = g.cohort().astype(np.float64), g.threshold()
    sources = {os.path.basename(os.path.dirname(s["path"])) for s in g.cohort_sources()}
    emb_g, ids_g = g.embeddings()
    assert g.score_kind() == "snorm" and cohort.shape[0] == row["cohort"] >= 2
    assert g.calibration()["top_k"] == 5
  assert not sources & {"p0", "p1", "p2"}  # enrolled people are never background faces
  assert thr == pytest.approx(row["threshold"]) and row["score"] == "snorm"
  # identify and verify decide on the S-norm score: a float64 NumPy reference.
  probe = [p for p in vecs if os.path.basename(p) == "p1_2.jpg"][0]
  q = vecs[probe].astype(np.float64)

  def stats(x):  # over the 5 nearest cohort faces (--snorm_top_k=5)
    d2 = np.sort(((x[None] - cohort) ** 2).sum(-1))[:5]
    return d2.mean(), d2.std()
  mq, sq = stats(q)
  ref = []
  for e in emb_g.astype(np.float64):
    d2, (mg, sg) = ((q - e) ** 2).sum(), stats(e)
    ref.append(0.5 * ((d2 - mq) / sq + (d2 - mg) / sg))
  j = int(np.argmin(ref))
  code, out, err = _run(["identify", probe], t, format="json")
  assert code == 0, err
  r = json.loads(out)[0]
  assert r["score"] == pytest.approx(ref[j], rel=1e-4, abs=1e-4)
  assert r["distance"] == pytest.approx(np.linalg.norm(q - emb_g[j]), abs=1e-5)
  assert r["recognized"] == (ref[j] <= thr) and r["threshold"] == pytest.approx(thr)
  assert r["candidates"][0]["score"] == pytest.approx(ref[j], rel=1e-4, abs=1e-4)
  code, out, err = _run(["verify", probe], t, name="p1", format="json")
  assert code == 0, err
  v = json.loads(out)[0]
  p1 = [ref[i] for i, g_id in enumerate(ids_g) if g_id == 2]  # p1 was enrolled second: id 2
  assert code == 0 and v["score"] == pytest.approx(min(p1), rel=1e-4, abs=1e-4) and v["same"] == (min(p1) <= thr)
  # --threshold is always a distance: it overrides the S-norm decision.
  code, out, _ = _run(["identify", probe], t, format="json", threshold=10.0)
  assert code == 0 and json.loads(out)[0]["recognized"] and "score" not in json.loads(out)[0]
