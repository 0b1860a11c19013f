"""Tests for the SQLite gallery (jaxface.recognition.gallery)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxface.recognition.gallery import SCHEMA_VERSION, Gallery, GalleryError, normalize_name

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
    gal.enroll("alice", rng.normal(size=(2, 128)).astype(np.float32))
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


# ------------------------------------------------------------ names (Unicode)

ZOE = "Zo\u00eb"          # precomposed e-diaeresis (NFC)
ZOE_DECOMPOSED = "Zoe\u0308"  # e + combining diaeresis (NFD)


def test_name_spellings_are_one_identity(tmp_path):
  path = str(tmp_path / "g.db")
  assert ZOE != ZOE_DECOMPOSED and normalize_name(ZOE_DECOMPOSED) == ZOE == normalize_name(ZOE)
  with Gallery(path, FP) as g:
    z = g.enroll(ZOE, _emb(1, 1))
    assert g.enroll(ZOE_DECOMPOSED, _emb(2, 2)) == z  # the same identity
    b = g.enroll("bob", _emb(1, 3))
    assert g.names() == {z: ZOE, b: "bob"} and g.num_identities() == 2
    for spelling in (ZOE, ZOE_DECOMPOSED):  # every lookup by name normalises
      assert g.embeddings(spelling)[0].shape == (3, 128)
      assert len(g.sources(spelling)) == 3
      g.set_threshold(0.4, identity=spelling)
      assert g.threshold(spelling) == 0.4
    g.set_thresholds(0.6, {ZOE_DECOMPOSED: 0.5})
    assert g.identity_thresholds() == {z: 0.5}
    # renaming onto another spelling of an existing name is refused ...
    with pytest.raises(GalleryError, match="already enrolled"):
      g.rename("bob", ZOE_DECOMPOSED)
    assert g.names() == {z: ZOE, b: "bob"}
    # ... old names are normalised too, and new names are stored in NFC
    g.rename(ZOE_DECOMPOSED, "Chlo\u0065\u0301")
    assert g.names()[z] == "Chlo\u00e9"
    g.rename("Chlo\u00e9", ZOE_DECOMPOSED)
    assert g.names()[z] == ZOE
    assert g.remove(ZOE_DECOMPOSED) == 3
    assert g.names() == {b: "bob"}
  db = sqlite3.connect(path)
  assert [r[0] for r in db.execute("SELECT name FROM identities")] == ["bob"]
  db.close()
  with Gallery(path, FP) as g:
    g.enroll(ZOE_DECOMPOSED, _emb(1, 4))
  db = sqlite3.connect(path)
  assert ZOE in [r[0] for r in db.execute("SELECT name FROM identities")]  # stored as NFC
  db.close()


@pytest.mark.parametrize("bad", ["ann\nlee", "tab\there", "nul\x00", "del\x7f", "bell\x07",
                                 "line\u2028sep", "para\u2029sep", "cr\r", "\n"])
def test_names_with_control_characters_are_refused(tmp_path, bad):
  with pytest.raises(GalleryError) as err:
    normalize_name(bad)
  assert repr(bad) in str(err.value)
  with pytest.raises(GalleryError, match="new name"):
    normalize_name(bad, "new name")
  path = str(tmp_path / "g.db")
  with Gallery(path, FP) as g:
    g.enroll("ann", _emb(1))
    with pytest.raises(GalleryError) as err:
      g.enroll(bad, _emb(1, 2))
    assert repr(bad) in str(err.value)
    with pytest.raises(GalleryError) as err:
      g.rename("ann", bad)
    assert repr(bad) in str(err.value)
    assert g.names() == {1: "ann"} and len(g) == 1  # nothing written


def test_normalize_name_keeps_the_whitespace_checks():
  assert normalize_name("Jean-Luc Picard") == "Jean-Luc Picard"
  assert normalize_name("\u674e\u5c0f\u9f99") == "\u674e\u5c0f\u9f99"
  for bad, why in (("", "non-empty"), ("   ", "non-empty"), (" a", "whitespace"),
                   ("a ", "whitespace"), ("a\u00a0", "whitespace"), (None, "non-empty"),
                   (3, "non-empty")):
    with pytest.raises(GalleryError, match=why):
      normalize_name(bad)


# ------------------------------------------------------------------ cohort

def test_cohort_roundtrip_replace_and_validation(tmp_path):
  path = str(tmp_path / "g.db")
  c1, c2 = _emb(3, 11), _emb(2, 12)
  with Gallery(path) as g:
    assert g.cohort().shape == (0, 0) and g.cohort_size() == 0
    with pytest.raises(GalleryError, match="fingerprint"):
      g.set_cohort(c1)  # a cohort without a fingerprint could mix encoders
  with Gallery(path, FP) as g:
    assert g.set_cohort(c1, [{"path": f"/c/{i}.jpg", "sha256": f"{i:064x}"} for i in range(3)]) == 3
    assert g.fingerprint == FP and g.dim == 128  # stored on first use
    assert len(g) == 0 and g.identities() == []  # not enrolled identities
  with Gallery(path, FP, readonly=True) as g:
    np.testing.assert_array_equal(g.cohort(), c1)  # bit exact
    assert g.cohort().dtype == np.float32 and g.cohort_size() == 3
    assert [s["path"] for s in g.cohort_sources()] == ["/c/0.jpg", "/c/1.jpg", "/c/2.jpg"]
  with Gallery(path, FP) as g:
    assert g.set_cohort(c2) == 2  # replaces the whole cohort
    np.testing.assert_array_equal(g.cohort(), c2)
    assert [s["path"] for s in g.cohort_sources()] == [None, None]
    for bad, match in ((_emb(2, dim=64), "64 dimensions"), (c2[0], "1-D"),
                       (np.full((1, 128), np.inf, np.float32), "NaN or infinite"),
                       (np.zeros((2, 0), np.float32), "non-empty")):
      with pytest.raises(GalleryError, match=match):
        g.set_cohort(bad)
    with pytest.raises(GalleryError, match="1 sources for 2"):
      g.set_cohort(c2, [{"path": "a"}])
    with pytest.raises(GalleryError, match="keys path, sha256"):
      g.set_cohort(c2, [{"path": "a", "box": [0, 0, 1, 1]}, {}])
    np.testing.assert_array_equal(g.cohort(), c2)  # every refusal left it intact
    g.enroll("alice", _emb(1, 13))
    assert g.set_cohort(np.zeros((0, 128), np.float32)) == 0  # empties it
    assert g.cohort().shape == (0, 128) and g.cohort_size() == 0
    assert g.names() == {1: "alice"}


def test_set_cohort_is_one_transaction(tmp_path, monkeypatch):
  path = str(tmp_path / "g.db")
  c1 = _emb(4, 21)
  with Gallery(path, FP) as g:
    g.set_cohort(c1)

  def boom():
    raise RuntimeError("killed")

  monkeypatch.setattr(Gallery, "_before_commit", staticmethod(boom))
  with Gallery(path, FP) as g:
    with pytest.raises(RuntimeError):
      g.set_cohort(_emb(7, 22))
    np.testing.assert_array_equal(g.cohort(), c1)  # old cohort kept, not half-replaced


# --------------------------------------------------------------- migration

_SCHEMA_V1 = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE identities (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
                         created TEXT NOT NULL, threshold REAL);
CREATE TABLE embeddings (id INTEGER PRIMARY KEY AUTOINCREMENT,
  identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
  vector BLOB NOT NULL, source_path TEXT, source_sha256 TEXT, box TEXT, created TEXT NOT NULL);
CREATE INDEX embeddings_identity ON embeddings(identity_id);
INSERT INTO schema_version(version) VALUES (1);
"""


def _make_v1(path, emb):
  """A version-1 gallery as an older jaxface wrote it (one name stored decomposed)."""
  db = sqlite3.connect(path)
  db.executescript(_SCHEMA_V1)
  db.execute("INSERT INTO meta VALUES ('fingerprint', ?)",
             (json.dumps(FP, sort_keys=True, separators=(",", ":")),))
  db.execute("INSERT INTO meta VALUES ('dim', '128')")
  db.execute("INSERT INTO meta VALUES ('threshold', '0.6')")
  db.execute("INSERT INTO identities VALUES (1, 'alice', '2024-01-01T00:00:00+00:00', 0.5)")
  db.execute("INSERT INTO identities VALUES (2, ?, '2024-01-01T00:00:00+00:00', NULL)",
             (ZOE_DECOMPOSED,))
  for i, owner in enumerate([1, 2, 1]):
    db.execute("INSERT INTO embeddings(identity_id, vector, source_path, created) "
               "VALUES (?, ?, ?, '2024-01-01T00:00:00+00:00')",
               (owner, emb[i].astype("<f4").tobytes(), f"/v1/{i}.jpg"))
  db.commit()
  db.close()


def _raw_version(path):
  db = sqlite3.connect(path)
  try:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return db.execute("SELECT version FROM schema_version").fetchone()[0], "cohort" in tables
  finally:
    db.close()


def test_version1_gallery_read_only_works_without_upgrading(tmp_path):
  path = str(tmp_path / "v1.db")
  emb = _emb(3, 31)
  _make_v1(path, emb)
  before = open(path, "rb").read()
  with Gallery(path, FP, readonly=True) as g:
    assert g.names() == {1: "alice", 2: ZOE_DECOMPOSED}  # as stored
    got, ids = g.embeddings()
    np.testing.assert_array_equal(got, emb)
    assert ids.tolist() == [1, 2, 1]
    assert g.cohort().shape == (0, 128) and g.cohort_size() == 0 and g.cohort_sources() == []
    assert g.threshold() == 0.6 and g.threshold("alice") == 0.5 and g.calibration() is None
    assert g.embeddings(ZOE)[0].shape == (1, 128)  # found in either spelling
    with pytest.raises(GalleryError, match="read-only"):
      g.set_cohort(_emb(2))
  assert open(path, "rb").read() == before
  assert _raw_version(path) == (1, False)


def test_version1_gallery_upgrades_when_opened_writable(tmp_path):
  path = str(tmp_path / "v1.db")
  emb = _emb(3, 32)
  _make_v1(path, emb)
  with Gallery(path, FP) as g:
    assert _raw_version(path) == (SCHEMA_VERSION, True) == (2, True)
    assert g.names() == {1: "alice", 2: ZOE}  # names normalised by the upgrade
    got, ids = g.embeddings()
    np.testing.assert_array_equal(got, emb)
    assert ids.tolist() == [1, 2, 1]
    assert [s["path"] for s in g.sources()] == ["/v1/0.jpg", "/v1/1.jpg", "/v1/2.jpg"]
    assert g.threshold() == 0.6 and g.threshold("alice") == 0.5
    assert g.cohort().shape == (0, 128)
    g.set_cohort(_emb(2, 33))
    assert g.enroll(ZOE_DECOMPOSED, _emb(1, 34)) == 2
  with Gallery(path, FP) as g:  # a second open finds version 2: nothing more to do
    assert g.cohort_size() == 2 and len(g) == 4
  db = sqlite3.connect(path)
  assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
  db.close()


def test_newer_schema_is_refused_and_left_alone(tmp_path):
  path = str(tmp_path / "new.db")
  Gallery(path, FP).close()
  db = sqlite3.connect(path)
  db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
  db.commit()
  db.close()
  before = open(path, "rb").read()
  for kwargs in ({}, {"readonly": True}, {"create": False}):
    with pytest.raises(GalleryError, match="written by a newer jaxface") as err:
      Gallery(path, FP, **kwargs)
    assert path in str(err.value) and f"schema version {SCHEMA_VERSION + 1}" in str(err.value)
  assert open(path, "rb").read() == before


# ------------------------------------------------------- calibration info

def test_calibration_info_and_score_kind(tmp_path):
  path = str(tmp_path / "g.db")
  info = {"score": "distance", "method": "far", "target": 0.01, "gallery_size": 2, "pairs": 10}
  with Gallery(path, FP) as g:
    a = g.enroll("alice", _emb(1, 1))
    assert g.calibration() is None and g.score_kind() == "distance"
    g.set_thresholds(0.6, {a: 0.55}, info=info)
    assert g.calibration() == info and g.score_kind() == "distance"
    with pytest.raises(GalleryError, match=">= 0"):
      g.set_thresholds(-0.5, info=info)  # distances are never negative
    # S-norm thresholds are negative numbers: allowed for that score kind
    snorm = {"score": "snorm", "method": "fpir", "target": np.float32(0.05), "gallery_size": 2}
    with pytest.raises(GalleryError, match="cohort"):
      g.set_thresholds(-0.5, info=snorm)  # S-norm scores mean nothing without the cohort
    assert g.calibration() == info and g.threshold() == 0.6
    g.set_thresholds(-0.5, {"alice": -0.75}, info=snorm, cohort=_emb(3, 7))
    assert g.cohort_size() == 3
    assert g.threshold() == -0.5 and g.threshold("alice") == -0.75
    assert g.score_kind() == "snorm" and g.calibration()["target"] == pytest.approx(0.05)
    g.set_threshold(-0.4)  # keeps the stored score kind
    assert g.threshold() == -0.4 and g.score_kind() == "snorm"
    for bad_info, match in (({"score": "snorm", "x": object()}, "JSON"),
                            ({"score": "snorm", "x": float("nan")}, "JSON"),
                            ({"score": 3}, "score"), ([("score", "snorm")], "dict")):
      with pytest.raises(GalleryError, match=match):
        g.set_thresholds(-0.3, info=bad_info)
    with pytest.raises(GalleryError, match="finite"):
      g.set_thresholds(float("-inf"), info=snorm)
    with pytest.raises(GalleryError, match="not enrolled"):
      g.set_thresholds(-0.2, {"carol": -0.1}, info={"score": "snorm", "method": "best"})
    assert g.calibration()["method"] == "fpir" and g.threshold() == -0.4  # all left as they were
    g.set_thresholds(0.7)  # info=None clears the calibration ...
    assert g.calibration() is None and g.score_kind() == "distance"
    with pytest.raises(GalleryError, match=">= 0"):
      g.set_threshold(-0.1)  # ... so thresholds are distances again
    g.set_thresholds(0.65, info=info)
  with Gallery(path, readonly=True) as g:
    assert g.calibration() == info and g.threshold() == 0.65


# ---------------------------------------------------- opening and errors

def test_create_false_and_readonly_write_nothing(tmp_path):
  missing = str(tmp_path / "missing.db")
  for kwargs in ({"create": False}, {"readonly": True}):
    with pytest.raises(GalleryError, match="does not exist"):
      Gallery(missing, FP, **kwargs)
    assert not os.path.exists(missing)
  empty = tmp_path / "empty.db"
  empty.write_bytes(b"")
  os.utime(empty, ns=(1_000_000_000, 1_000_000_000))
  for kwargs in ({"create": False}, {"readonly": True}, {"readonly": True, "create": True}):
    with pytest.raises(GalleryError, match="is empty, not a gallery") as err:
      Gallery(str(empty), FP, **kwargs)
    assert str(empty) in str(err.value)
    assert empty.read_bytes() == b"" and os.stat(empty).st_mtime_ns == 1_000_000_000
  assert sorted(os.listdir(tmp_path)) == ["empty.db"]  # no -wal, no -shm, no schema
  path = str(tmp_path / "g.db")
  with Gallery(path, FP) as g:
    g.enroll("alice", _emb(1))
  with Gallery(path, FP, create=False) as g:  # an existing gallery opens as usual
    g.enroll("bob", _emb(1, 2))
    assert not g.readonly and g.num_identities() == 2


def test_paths_with_uri_special_characters(tmp_path, monkeypatch):
  # Galleries are opened through SQLite URIs: '?', '#', '%' and spaces must stay in the name.
  folder = tmp_path / "a dir?x=1#frag%20"
  folder.mkdir()
  path = str(folder / "gal lery?mode=ro#%41 Zoë.db")
  with Gallery(path, FP) as g:
    g.enroll("alice", _emb(1))
  assert os.listdir(folder) == ["gal lery?mode=ro#%41 Zoë.db"]
  with Gallery(path, FP, readonly=True) as g:
    assert g.names() == {1: "alice"}
  monkeypatch.chdir(folder)  # a relative path
  with Gallery("gal lery?mode=ro#%41 Zoë.db", FP, create=False) as g:
    g.enroll("bob", _emb(1, 2))
  with Gallery(path, readonly=True) as g:
    assert g.names() == {1: "alice", 2: "bob"}


def test_foreign_files_are_not_galleries_and_stay_byte_identical(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("hello, not a database " * 100)
  other = str(tmp_path / "other.db")
  db = sqlite3.connect(other)
  db.execute("CREATE TABLE t (x)")
  db.commit()
  db.close()
  for path in (str(text), other):
    before = open(path, "rb").read()
    for kwargs in ({"readonly": True}, {"create": False}, {}):
      with pytest.raises(GalleryError, match="not a jaxface gallery") as err:
        Gallery(path, **kwargs)
      assert path in str(err.value) and "damaged" not in str(err.value)
      assert open(path, "rb").read() == before


def test_sqlite_errors_inside_a_change_become_gallery_errors(tmp_path):
  path = str(tmp_path / "g.db")
  with Gallery(path, FP) as g:
    g.enroll("alice", _emb(2, 1))
  before = _state(path)
  with Gallery(path, FP) as g:
    pages = g._db.execute("PRAGMA page_count").fetchone()[0]
    g._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # the disk is all but full
    with pytest.raises(GalleryError, match="full") as err:
      g.enroll("bob", _emb(500, 2))
    assert path in str(err.value) and not isinstance(err.value, sqlite3.Error)
    with pytest.raises(GalleryError, match="full"):
      g.set_cohort(_emb(500, 3))
    assert g.names() == {1: "alice"}  # reads still work
  assert _state(path) == before


def test_readonly_gallery_refuses_every_change(tmp_path):
  path = str(tmp_path / "g.db")
  with Gallery(path, FP) as g:
    g.enroll("alice", _emb(2, 1))
    g.set_threshold(0.5)
  before = _state(path)
  with pytest.raises(GalleryError, match="triplet"):
    Gallery(path, OTHER_FP, readonly=True)  # the encoder check still applies
  with Gallery(path, FP, readonly=True) as g:
    assert g.readonly and not g.immutable  # the folder is writable: a plain mode=ro
    changes = {"enroll": lambda: g.enroll("bob", _emb(1)), "remove": lambda: g.remove("alice"),
               "rename": lambda: g.rename("alice", "al"), "set_threshold": lambda: g.set_threshold(0.4),
               "set_thresholds": lambda: g.set_thresholds(0.4, info={"score": "distance"}),
               "set_cohort": lambda: g.set_cohort(_emb(2))}
    for what, change in changes.items():
      with pytest.raises(GalleryError, match="is open read-only") as err:
        change()
      assert path in str(err.value), what
  assert _state(path) == before


def test_thresholds_and_cohort_change_in_one_transaction(tmp_path):
  path = str(tmp_path / "g.db")
  snorm = {"score": "snorm", "method": "fpir", "target": 0.01, "gallery_size": 1}
  with Gallery(path, FP) as g:
    g.enroll("alice", _emb(1, 1))
    g.set_thresholds(-1.0, info=snorm, cohort=_emb(2, 5), cohort_sources=[{"path": "a"}, {"path": "b"}])
    old_cohort = g.cohort()

    def fail():
      raise RuntimeError("killed")
    with pytest.raises(GalleryError, match="cohort embeddings"):
      g.set_thresholds(-2.0, info=snorm, cohort=np.full((2, 4), np.nan, np.float32))
    Gallery._before_commit = fail
    try:
      with pytest.raises(RuntimeError):
        g.set_cohort(_emb(4, 9))
    finally:
      Gallery._before_commit = None
    # Neither the failed threshold change nor the interrupted cohort change left anything behind.
    assert g.threshold() == -1.0 and np.array_equal(g.cohort(), old_cohort)
    assert [s_["path"] for s_ in g.cohort_sources()] == ["a", "b"]
