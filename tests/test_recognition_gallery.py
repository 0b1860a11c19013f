"""Tests for the SQLite gallery (jaxface.recognition.gallery)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxface.recognition.gallery import SCHEMA_VERSION, Gallery, GalleryError

FP = {"model": "dlib_resnet_v1", "weights_sha256": "ab" * 32, "preprocessing": "chip150"}
OTHER_FP = {"model": "triplet", "weights_sha256": "cd" * 32, "preprocessing": "chip150"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _emb(n, seed=0, dim=128):
  return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _src(i):
  return {"path": f"/photos/{i}.jpg", "sha256": f"{i:064x}", "box": [i, 2 * i, i + 10, 2 * i + 10]}


def _state(path):
  """Everything observable in a gallery, for before/after comparisons."""
  with Gallery(path) as g:
    emb, ids = g.embeddings()
    return {"identities": g.identities(), "emb": emb.tobytes(), "ids": ids.tolist(),
            "sources": g.sources(), "fingerprint": g.fingerprint, "threshold": g.threshold(),
            "names": g.names()}


def test_enroll_one_shot_and_many_roundtrip(tmp_path):
  path = str(tmp_path / "g.db")
  e1, e3 = _emb(1, 1), _emb(3, 2)
  with Gallery(path, FP) as g:
    assert g.fingerprint is None and len(g) == 0
    emb, ids = g.embeddings()
    assert emb.shape == (0, 0) and ids.shape == (0,)
    a = g.enroll("alice", e1, [_src(0)])
    b = g.enroll("bob", e3, [_src(1), _src(2), _src(3)])
    assert g.enroll("alice", e3[:1], None) == a  # adding to an existing identity
    assert a != b
  with Gallery(path, FP) as g:  # reopened: everything persisted
    assert g.fingerprint == FP and g.dim == 128 and len(g) == 5
    emb, ids = g.embeddings()
    assert emb.dtype == np.float32 and emb.shape == (5, 128)
    np.testing.assert_array_equal(emb, np.concatenate([e1, e3, e3[:1]]))  # bit exact
    assert ids.tolist() == [a, b, b, b, a]
    assert g.names() == {a: "alice", b: "bob"}
    info = g.identities()
    assert [(r["id"], r["name"], r["num_embeddings"]) for r in info] == [(a, "alice", 2), (b, "bob", 3)]
    assert info[0]["created"].endswith("+00:00")
    src = g.sources("bob")
    assert [s["path"] for s in src] == ["/photos/1.jpg", "/photos/2.jpg", "/photos/3.jpg"]
    assert src[0]["box"] == [1, 2, 11, 12] and src[0]["sha256"] == f"{1:064x}"
    assert g.sources("alice")[1]["path"] is None
    emb_a, ids_a = g.embeddings("alice")
    np.testing.assert_array_equal(emb_a, np.concatenate([e1, e3[:1]]))
    assert set(ids_a.tolist()) == {a}


def test_vectors_are_raw_float32_blobs_not_pickle(tmp_path):
  path = str(tmp_path / "g.db")
  e = _emb(2, 3)
  with Gallery(path, FP) as g:
    g.enroll("x", e)
  db = sqlite3.connect(path)
  blobs = [r[0] for r in db.execute("SELECT vector FROM embeddings ORDER BY id")]
  assert blobs == [e[0].astype("<f4").tobytes(), e[1].astype("<f4").tobytes()]
  assert db.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
  assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  db.close()
  source = open(os.path.join(REPO, "jaxface", "recognition", "gallery.py")).read()
  assert "import pickle" not in source and "pickle." not in source


def test_remove_rename_cascade(tmp_path):
  path = str(tmp_path / "g.db")
  with Gallery(path, FP) as g:
    a = g.enroll("alice", _emb(2, 1))
    b = g.enroll("bob", _emb(3, 2))
    assert g.remove("alice") == 2
    emb, ids = g.embeddings()
    assert emb.shape == (3, 128) and set(ids.tolist()) == {b}
    assert len(g.sources()) == 3  # the cascade removed alice's rows
    g.rename("bob", "robert")
    assert g.names() == {b: "robert"}
    with pytest.raises(GalleryError, match="'bob' is not enrolled"):
      g.remove("bob")
    with pytest.raises(GalleryError, match="'alice' is not enrolled"):
      g.rename("alice", "al")
    g.enroll("carol", _emb(1, 4))
    with pytest.raises(GalleryError, match="'carol' is already enrolled"):
      g.rename("robert", "carol")
    assert g.names()[b] == "robert"
    # a removed name can be enrolled again, as a new identity
    assert g.enroll("alice", _emb(1, 5)) not in (a, b)
    assert g.remove(b) == 3  # by id


def test_thresholds(tmp_path):
  path = str(tmp_path / "g.db")
  with Gallery(path, FP) as g:
    a = g.enroll("alice", _emb(2, 1))
    b = g.enroll("bob", _emb(1, 2))
    assert g.threshold() is None and g.threshold("alice") is None
    g.set_threshold(0.55)
    g.set_threshold(0.5, identity="alice")
    assert g.threshold() == 0.55 and g.threshold("alice") == 0.5 and g.threshold(b) is None
    _, ids = g.embeddings()
    np.testing.assert_allclose(g.row_thresholds(ids, 0.55), [0.5, 0.5, 0.55])
    assert g.identity_thresholds() == {a: 0.5}
    for bad in (-0.1, float("nan"), "0.5", True):
      with pytest.raises(GalleryError, match="threshold"):
        g.set_threshold(bad)
    with pytest.raises(GalleryError, match="'zed' is not enrolled"):
      g.set_threshold(0.4, identity="zed")
    with pytest.raises(GalleryError, match="'zed' is not enrolled"):
      g.threshold("zed")
    g.set_threshold(None, identity="alice")
    assert g.threshold("alice") is None
  with Gallery(path) as g:
    assert g.threshold() == 0.55


def test_fingerprint_mismatch_refused(tmp_path):
  path = str(tmp_path / "g.db")
  with Gallery(path, FP) as g:
    g.enroll("alice", _emb(1))
  with pytest.raises(GalleryError, match="triplet") as err:
    Gallery(path, OTHER_FP)
  assert "dlib_resnet_v1" in str(err.value)  # names both encoders
  with Gallery(path) as g:  # no fingerprint: readable, but enrolling is refused
    assert g.fingerprint == FP
    with pytest.raises(GalleryError, match="fingerprint"):
      g.enroll("bob", _emb(1))
  # an empty gallery takes whichever encoder enrolls first
  empty = str(tmp_path / "e.db")
  Gallery(empty, OTHER_FP).close()
  with Gallery(empty, FP) as g:
    g.enroll("x", _emb(1))
    assert g.fingerprint == FP


def test_bad_inputs_name_the_input(tmp_path):
  path = str(tmp_path / "g.db")
  with Gallery(path, FP) as g:
    with pytest.raises(GalleryError, match="1-D"):
      g.enroll("a", _emb(1)[0])
    with pytest.raises(GalleryError, match="NaN"):
      g.enroll("a", np.full((1, 128), np.nan, np.float32))
    with pytest.raises(GalleryError, match="non-empty"):
      g.enroll("a", np.zeros((0, 128), np.float32))
    with pytest.raises(GalleryError, match="2 sources for 1"):
      g.enroll("a", _emb(1), [_src(0), _src(1)])
    with pytest.raises(GalleryError, match="box"):
      g.enroll("a", _emb(1), [{"path": "p", "box": [1, 2, 3]}])
    with pytest.raises(GalleryError, match="name"):
      g.enroll(" a", _emb(1))
    with pytest.raises(GalleryError, match="name"):
      g.enroll("", _emb(1))
    assert g.identities() == [] and g.fingerprint is None  # nothing half-written
    g.enroll("a", _emb(1, dim=128))
    with pytest.raises(GalleryError, match="64 dimensions"):
      g.enroll("b", _emb(1, dim=64))
    assert [r["name"] for r in g.identities()] == ["a"]


def test_bad_files(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("hello, not a database " * 100)
  with pytest.raises(GalleryError, match="notes.txt"):
    Gallery(str(text))
  other = str(tmp_path / "other.db")
  db = sqlite3.connect(other)
  db.execute("CREATE TABLE t (x)")
  db.commit()
  db.close()
  with pytest.raises(GalleryError, match="not a jaxface gallery"):
    Gallery(other)
  with pytest.raises(GalleryError, match="does not exist"):
    Gallery(str(tmp_path / "missing" / "g.db"))
  with pytest.raises(GalleryError, match="is a folder"):
    Gallery(str(tmp_path))
  newer = str(tmp_path / "newer.db")
  Gallery(newer).close()
  db = sqlite3.connect(newer)
  db.execute("UPDATE schema_version SET version = 99")
  db.commit()
  db.close()
  with pytest.raises(GalleryError, match="schema version 99"):
    Gallery(newer)


def test_exception_inside_transaction_rolls_back(tmp_path, monkeypatch):
  path = str(tmp_path / "g.db")
  with Gallery(path, FP) as g:
    g.enroll("alice", _emb(2, 1), [_src(0), _src(1)])
  before = _state(path)

  def boom():
    raise RuntimeError("disk on fire")

  monkeypatch.setattr(Gallery, "_before_commit", staticmethod(boom))
  with Gallery(path, FP) as g:
    with pytest.raises(RuntimeError):
      g.enroll("alice", _emb(3, 2))
    with pytest.raises(RuntimeError):
      g.enroll("bob", _emb(3, 3))
  assert _state(path) == before


_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from jaxface.recognition.gallery import Gallery
    path, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fp = {"model": "dlib_resnet_v1", "weights_sha256": "ab" * 32, "preprocessing": "chip150"}
    def pause():
      print("inside", flush=True)   # rows written, COMMIT not yet run
      time.sleep(120)
    Gallery._before_commit = staticmethod(pause)
    emb = np.random.default_rng(7).normal(size=(n, 128)).astype(np.float32)
    srcs = [{"path": f"/big/{i}.jpg", "sha256": "%064x" % i, "box": [0, 0, 5, 5]} for i in range(n)]
    with Gallery(path, fp) as g:
      g.enroll(name, emb, srcs)
    print("committed", flush=True)
""")


def _kill_inside_enroll(path, name, n):
  proc = subprocess.Popen([sys.executable, "-c", _CHILD, path, name, str(n)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.strip() == "inside", proc.stderr.read()
    # The uncommitted rows really are on disk (WAL frames) when the kill lands.
    assert os.path.getsize(path + "-wal") > n * 256
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL


def test_killed_process_mid_enrollment_leaves_gallery_unchanged(tmp_path):
  path = str(tmp_path / "g.db")
  with Gallery(path, FP) as g:
    g.enroll("alice", _emb(2, 1), [_src(0), _src(1)])
    g.set_threshold(0.5)
  before = _state(path)
  # adding to an existing identity, then creating a new one: both killed mid-transaction
  _kill_inside_enroll(path, "alice", 20000)
  assert _state(path) == before
  _kill_inside_enroll(path, "bob", 20000)
  after = _state(path)
  assert after == before
  with Gallery(path, FP) as g:  # opens fine and takes new changes
    g.enroll("bob", _emb(1, 9))
    assert [r["name"] for r in g.identities()] == ["alice", "bob"]
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_killed_first_enrollment_stores_no_fingerprint(tmp_path):
  path = str(tmp_path / "g.db")
  Gallery(path).close()
  _kill_inside_enroll(path, "alice", 20000)
  with Gallery(path, OTHER_FP) as g:  # the killed enrollment did not claim the encoder
    assert g.fingerprint is None and g.identities() == [] and len(g) == 0


def test_busy_gallery_is_a_clear_error(tmp_path):
  path = str(tmp_path / "g.db")
  with Gallery(path, FP) as g:
    g.enroll("alice", _emb(1))
  other = sqlite3.connect(path, isolation_level=None)
  other.execute("BEGIN IMMEDIATE")       # another writer holds the lock
  try:
    with Gallery(path, FP) as g:
      g._db.execute("PRAGMA busy_timeout = 50")
      with pytest.raises(GalleryError, match="another process is writing"):
        g.enroll("bob", _emb(1))
      assert [r["name"] for r in g.identities()] == ["alice"]  # reads still work
  finally:
    other.execute("ROLLBACK")
    other.close()


def test_set_thresholds_replaces_all_thresholds_in_one_transaction(tmp_path):
  fp = {"model": "test", "weights_sha256": "0" * 16, "preprocessing": "none"}
  rng = np.random.default_rng(0)
  with Gallery(str(tmp_path / "g.sqlite"), fp) as gal:
    a = gal.enroll("alice", rng.normal(size=(2, 128)).astype(np.float32))
    b = gal.enroll("bob", rng.normal(size=(2, 128)).astype(np.float32))
    gal.set_threshold(0.5)
    gal.set_threshold(0.4, identity="alice")
    gal.set_thresholds(0.55, {b: 0.45})
    assert gal.threshold() == pytest.approx(0.55)
    assert gal.threshold("alice") is None  # fitted around the old global: cleared
    assert gal.threshold("bob") == pytest.approx(0.45)
    with pytest.raises(GalleryError, match="threshold"):
      gal.set_thresholds(float("nan"), {})
    with pytest.raises(GalleryError):
      gal.set_thresholds(0.3, {"carol": 0.2})  # unknown identity: nothing changes
    assert gal.threshold() == pytest.approx(0.55)
    assert gal.threshold("bob") == pytest.approx(0.45)
