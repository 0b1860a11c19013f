"""``python -m experiments.faces cluster``: in-process with a fake encoder, then real LFW photos."""

import csv
import io
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import faces as cli
from jaxface import paths
from jaxface.recognition import encoders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.abspath(paths.data_root())
LFW = os.path.join(DATA, "faces", "lfw_subset")
# Their first three photos lie within 0.46 of each other and >= 0.65 from the other people's (dlib encoder).
PEOPLE = ("Albert_Costa", "Ali_Naimi", "Ann_Veneman")


class FakeEncoder(encoders.FaceEmbedder):
  dim = 3
  fingerprint = {"model": "fake", "weights_sha256": "0" * 64, "preprocessing": "none", "dim": 3}


def fake_encode_faces(image, encoder, *, upsample=0):
  """The file holds its faces: 'a b c;d e f' (one embedding per face), '' (no face), 'broken'."""
  with open(image) as f:
    text = f.read().strip()
  if text == "broken":
    raise ValueError(f"{image}: cannot decode image")
  vecs = [[float(v) for v in face.split()] for face in text.split(";") if face]
  emb = np.asarray(vecs, np.float32).reshape(-1, 3)
  boxes = np.asarray([[k, k, k + 10, k + 10] for k in range(len(vecs))], np.int64).reshape(-1, 4)
  return encoders.Faces(os.fspath(image), boxes, emb, (100, 100))


@pytest.fixture
def photos(monkeypatch, tmp_path):
  monkeypatch.setattr(encoders, "encode_faces", fake_encode_faces)
  monkeypatch.setattr(encoders, "get_encoder", lambda spec="dlib": FakeEncoder())
  root = tmp_path / "photos"
  root.mkdir()
  files = {"a1.jpg": "0 0 0", "a2.jpg": "0.1 0 0", "a3.jpg": "0 0.1 0", "b1.jpg": "5 0 0",
           "b2.jpg": "5 0.1 0", "lone.jpg": "0 9 0", "group.jpg": "0 0 0.1;5 0 0.1;0 0 9",
           "landscape.jpg": "", "broken.jpg": "broken", "notes.txt": "1 2 3"}
  for name, text in files.items():
    (root / name).write_text(text)
  return root


def _run(argv, **kw):
  out, err = io.StringIO(), io.StringIO()
  code = cli.run(argv, cli.Options(progress=False, **kw), out, err)
  return code, out.getvalue(), err.getvalue()


def _manifest(out):
  with open(os.path.join(out, "clusters.csv"), newline="") as f:
    return list(csv.DictReader(f))


def test_cluster_folders_manifest_and_summary(photos, tmp_path):
  out = tmp_path / "out"
  code, stdout, err = _run(["cluster", str(photos), "--out"], out=str(out))  # a stray argument is an image
  assert code == 1 and "--out: no such file or folder" in err
  code, stdout, err = _run(["cluster", str(photos)], out=str(out), format="csv")
  assert code == 1  # broken.jpg could not be read: a warning, the exit status, but the rest is done
  assert "warning: skipped" in err and "broken.jpg" in err
  assert "9 faces in 7 of 9 images (1 without a face, 1 unreadable): 2 clusters of >= 2 faces, " \
         "2 unclustered" in err
  summary = list(csv.DictReader(io.StringIO(stdout)))
  assert [(r["cluster"], r["faces"], r["images"]) for r in summary] == [
      ("person_001", "4", "4"), ("person_002", "3", "3"), ("unclustered", "2", "2")]
  assert sorted(os.listdir(out / "person_001")) == ["a1.jpg", "a2.jpg", "a3.jpg", "group.jpg"]
  assert sorted(os.listdir(out / "person_002")) == ["b1.jpg", "b2.jpg", "group.jpg"]
  assert sorted(os.listdir(out / "unclustered")) == ["group.jpg", "lone.jpg"]
  link = out / "person_001" / "a1.jpg"
  assert link.is_symlink() and os.readlink(link) == str(photos / "a1.jpg")
  rows = _manifest(out)
  group = [(r["face"], r["left"], r["bottom"], r["cluster"], r["file"]) for r in rows
           if r["path"].endswith("group.jpg")]
  assert group == [("0", "0", "10", "person_001", "person_001/group.jpg"),
                   ("1", "1", "11", "person_002", "person_002/group.jpg"),
                   ("2", "2", "12", "unclustered", "unclustered/group.jpg")]


def test_out_is_never_clobbered(photos, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "mine.txt").write_text("keep")
  code, _, err = _run(["cluster", str(photos / "a1.jpg")], out=str(out))
  assert code == 1 and "folder is not empty (--overwrite replaces an earlier cluster output" in err
  code, _, err = _run(["cluster", str(photos / "a1.jpg")], out=str(out), overwrite=True)
  assert code == 1 and "holds no clusters.csv of an earlier clustering run; nothing was deleted" in err
  (out / "clusters.csv").write_text("path,face,left,top,right,bottom,cluster,file\n")
  code, _, err = _run(["cluster", str(photos / "a1.jpg")], out=str(out), overwrite=True)
  assert code == 1 and "mine.txt was not written by a clustering run; nothing was deleted" in err
  assert (out / "mine.txt").read_text() == "keep"
  # An earlier run's output (copies this time) is replaced with --overwrite, and only then.
  fresh = tmp_path / "fresh"
  assert _run(["cluster", str(photos / "a1.jpg"), str(photos / "a2.jpg")], out=str(fresh), copy=True)[0] == 0
  assert (fresh / "person_001" / "a1.jpg").read_text() == "0 0 0" and not (fresh / "person_001" / "a1.jpg").is_symlink()
  assert _run(["cluster", str(photos / "b1.jpg")], out=str(fresh))[0] == 1
  code, stdout, _ = _run(["cluster", str(photos / "b1.jpg")], out=str(fresh), overwrite=True, min_cluster_size=1)
  assert code == 0 and sorted(os.listdir(fresh)) == ["clusters.csv", "person_001"]
  assert os.listdir(fresh / "person_001") == ["b1.jpg"] and (photos / "a1.jpg").exists()
  # A file added to a cluster folder by hand is not the run's: refused, kept.
  (fresh / "person_001" / "extra.jpg").write_text("mine")
  code, _, err = _run(["cluster", str(photos / "b1.jpg")], out=str(fresh), overwrite=True)
  assert code == 1 and "person_001/extra.jpg was not written by a clustering run" in err


def test_bad_command_lines(photos, tmp_path):
  out = str(tmp_path / "o")
  assert _run(["cluster", str(photos)])[0] == 2  # no --out
  assert _run(["cluster"], out=out)[0] == 2
  code, _, err = _run(["cluster", str(photos)], out=out, cluster_threshold=float("nan"))
  assert code == 2 and "--cluster_threshold=nan" in err
  assert _run(["cluster", str(photos)], out=out, min_cluster_size=0)[0] == 2
  code, _, err = _run(["cluster", str(photos)], out=out, threshold=0.6)
  assert code == 2 and "--cluster_threshold" in err
  assert not os.path.exists(out)


def test_same_base_name_from_two_folders(photos, tmp_path):
  other = tmp_path / "other"
  other.mkdir()
  (other / "a1.jpg").write_text("0.05 0 0")
  out = tmp_path / "out"
  assert _run(["cluster", str(photos / "a1.jpg"), str(other / "a1.jpg")], out=str(out))[0] == 0
  assert sorted(os.listdir(out / "person_001")) == ["a1-2.jpg", "a1.jpg"]
  assert os.readlink(out / "person_001" / "a1-2.jpg") == str(other / "a1.jpg")


@pytest.mark.skipif(not all(os.path.isdir(os.path.join(LFW, p)) for p in PEOPLE), reason=f"{LFW} not present")
def test_cluster_subprocess_real_faces(tmp_path):
  photos = tmp_path / "photos"
  photos.mkdir()
  truth = {}
  for person in PEOPLE:
    for name in sorted(os.listdir(os.path.join(LFW, person)))[:3]:
      os.symlink(os.path.join(LFW, person, name), photos / name)
      truth[str(photos / name)] = person
  out = tmp_path / "out"
  env = {**os.environ, "JAXFACE_DATA": DATA}
  r = subprocess.run([sys.executable, "-m", "experiments.faces", "cluster", str(photos), f"--out={out}",
                      "--format=csv"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  assert "Traceback" not in r.stderr
  rows = _manifest(out)
  # LFW photos are centred on one person; others may appear small at the edge: judge the main faces.
  main = {}
  for row in rows:
    box = [int(row[k]) for k in ("left", "top", "right", "bottom")]
    if 60 < (box[0] + box[2]) / 2 < 190 and 60 < (box[1] + box[3]) / 2 < 190:
      main[row["path"]] = row["cluster"]
  assert set(main) == set(truth)
  by_person = {p: {main[path] for path in truth if truth[path] == p} for p in PEOPLE}
  assert all(len(c) == 1 for c in by_person.values()), by_person
  assert len({c.pop() for c in by_person.values()}) == 3 and "unclustered" not in set(main.values())
  summary = list(csv.DictReader(io.StringIO(r.stdout)))
  assert sum(int(s["faces"]) for s in summary) == len(rows)
