"""Galleries that cannot be written: a read-only folder, a read-only file, an unreadable file.

Root ignores permission bits (and ``os.access`` says yes to it), so how a file
is made read-only depends on who runs the tests:

* not root: ``chmod`` (folder 0o555, file 0o444), checked in this process;
* root: ``chattr +i`` (immutable, refused even to root) where the file system
  supports it, checked in this process;
* root either way for the "nobody" variant, and root without ``chattr``: a
  child process loads this module, drops to uid/gid 65534 itself and checks
  with ``chmod``-ed files owned by it, in a folder under /tmp that it can
  reach. (It drops privileges after starting rather than in ``preexec_fn``:
  the interpreter may live where nobody may execute it, e.g. under /root.)

Every variant runs wherever the tests run; none is skipped.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

from jaxface.recognition import gallery as gallery_lib
from jaxface.recognition.gallery import Gallery, GalleryError, writable_problem

FP = {"model": "dlib_resnet_v1", "weights_sha256": "ab" * 32, "preprocessing": "chip150"}
NOBODY = 65534
IS_ROOT = os.geteuid() == 0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _emb(n, seed=0, dim=16):
  return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _file_state(path):
  with open(path, "rb") as f:
    data = f.read()
  return [hashlib.sha256(data).hexdigest(), os.stat(path).st_mtime_ns, len(data)]


def _sha(a):
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _summary(g):
  """Everything a reader sees, as JSON values (it travels to the child process)."""
  emb, ids = g.embeddings()
  return json.loads(json.dumps({
      "names": sorted([i, n] for i, n in g.names().items()), "emb": _sha(emb), "ids": ids.tolist(),
      "cohort": _sha(g.cohort()), "cohort_size": g.cohort_size(), "threshold": g.threshold(),
      "alice": g.threshold("alice"), "sources": g.sources(), "calibration": g.calibration(),
      "identities": g.identities(), "fingerprint": g.fingerprint, "dim": g.dim,
      "score_kind": g.score_kind()}))


def _build(path):
  """A gallery with two identities, a cohort and thresholds; returns its :func:`_summary`."""
  with Gallery(path, FP) as g:
    a = g.enroll("alice", _emb(2, 1), [{"path": "/p/a0.jpg"}, {"path": "/p/a1.jpg"}])
    g.enroll("Zoë", _emb(1, 2))
    g.set_cohort(_emb(3, 3), [{"path": f"/c/{i}.jpg"} for i in range(3)])
    g.set_thresholds(0.5, {a: 0.45}, info={"score": "distance", "method": "far", "target": 0.01})
  with Gallery(path, FP) as g:
    return _summary(g)


@functools.cache
def _chattr_works() -> bool:
  """Whether ``chattr +i`` really makes a folder unwritable here (as root)."""
  if not IS_ROOT or shutil.which("chattr") is None:
    return False
  probe = tempfile.mkdtemp(prefix="jaxface-chattr-")
  try:
    if subprocess.run(["chattr", "+i", probe], capture_output=True).returncode != 0:
      return False
    try:
      open(os.path.join(probe, "x"), "w").close()
      return False  # created anyway: the flag does nothing here
    except OSError:
      return True
    finally:
      subprocess.run(["chattr", "-i", probe], capture_output=True)
  finally:
    shutil.rmtree(probe, ignore_errors=True)


@pytest.fixture
def work():
  """A fresh folder /tmp/X (0o755, reachable by nobody) holding the folder gal/."""
  top = tempfile.mkdtemp(dir="/tmp", prefix="jaxface-ro-")
  os.chmod(top, 0o755)
  folder = os.path.join(top, "gal")
  os.mkdir(folder)
  os.chmod(folder, 0o755)
  yield folder
  for p in [folder] + [os.path.join(folder, n) for n in os.listdir(folder)]:
    if IS_ROOT and shutil.which("chattr"):
      subprocess.run(["chattr", "-i", p], capture_output=True)
    os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
  shutil.rmtree(top)


_CHILD = textwrap.dedent("""
    import importlib.util, json, os, sys
    spec = importlib.util.spec_from_file_location("gallery_readonly_child", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._emb(1)  # numpy.random loads lazily, from where nobody may not read
    # Everything needed is loaded: now become nobody.
    os.setgroups([])
    os.setgid({nobody})
    os.setuid({nobody})
    assert os.geteuid() == {nobody} and os.getegid() == {nobody}
    getattr(module, sys.argv[2])(*json.loads(sys.argv[3]))
    print("checked as nobody", flush=True)
""").format(nobody=NOBODY)


def _in_child_as_nobody(fn, *args):
  """Runs fn(*args) (JSON arguments) in a fresh process as uid/gid 65534; fails here if it fails."""
  proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(__file__), fn.__name__,
                         json.dumps(args)], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 0 and "checked as nobody" in proc.stdout, \
      f"as nobody (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def _restricted(mechanism, folder, path, what, fn, *args):
  """Makes ``what`` ("folder" or "file") read-only, runs fn(*args) as the
  restricted user, and makes it writable again."""
  if mechanism == "nobody" and not IS_ROOT:
    mechanism = "chmod"  # already unprivileged
  if mechanism == "auto":
    mechanism = "chmod" if not IS_ROOT else "chattr" if _chattr_works() else "nobody"
  target = folder if what == "folder" else path
  if mechanism == "chattr":
    subprocess.run(["chattr", "+i", target], check=True)
    try:
      with pytest.raises(OSError):  # check the flag works, even for root
        if what == "folder":
          open(os.path.join(folder, "probe"), "w").close()
        else:
          open(path, "r+b").close()
      fn(*args)
    finally:
      subprocess.run(["chattr", "-i", target], check=True)
    return
  files = [os.path.join(folder, n) for n in os.listdir(folder)]
  if mechanism == "nobody":
    for p in [folder] + files:
      os.chown(p, NOBODY, NOBODY)
  os.chmod(target, 0o555 if what == "folder" else 0o444)
  try:
    if mechanism == "nobody":
      _in_child_as_nobody(fn, *args)
    else:
      fn(*args)
  finally:
    os.chmod(target, 0o755 if what == "folder" else 0o644)
    if mechanism == "nobody":
      for p in [folder] + [os.path.join(folder, n) for n in os.listdir(folder)]:
        os.chown(p, 0, 0)


def _check_read_only(path, expected, what, file_state):
  """As the restricted user: reads work, every write is refused, nothing changes."""
  reason = "is not writable" if what == "folder" else "the file is read-only"
  problem = writable_problem(path)
  assert problem is not None and reason in problem, problem
  if what == "folder":
    assert os.path.dirname(path) in problem and "journal" in problem
  for fp in (FP, None):  # a writer is refused up front, with the reason
    with pytest.raises(GalleryError, match="cannot be written") as err:
      Gallery(path, fp)
    assert path in str(err.value) and reason in str(err.value)
    assert "damaged" not in str(err.value)
  with Gallery(path, FP, readonly=True) as g:
    assert g.readonly and g.immutable == (what == "folder")  # no -shm possible in the folder
    assert _summary(g) == expected
    assert expected["cohort_size"] == 3 and expected["fingerprint"] == FP and expected["dim"] == 16
    assert g.embeddings("Zoe\u0308")[0].shape == (1, 16)  # lookups normalise names
    changes = [lambda: g.enroll("bob", _emb(1, 5)), lambda: g.enroll("alice", _emb(1, 5)),
               lambda: g.remove("alice"), lambda: g.rename("alice", "al"),
               lambda: g.set_threshold(0.3), lambda: g.set_threshold(0.3, identity="alice"),
               lambda: g.set_thresholds(0.3), lambda: g.set_cohort(_emb(2, 6))]
    for change in changes:
      with pytest.raises(GalleryError, match="is open read-only") as err:
        change()
      assert path in str(err.value) and reason in str(err.value)
    assert _summary(g) == expected
  if what == "folder":  # a new gallery cannot be made there either
    new = os.path.join(os.path.dirname(path), "new.db")
    assert reason in writable_problem(new)
    with pytest.raises(GalleryError, match="cannot be written"):
      Gallery(new, FP)
    with pytest.raises(GalleryError, match="does not exist"):
      Gallery(new, FP, readonly=True)
    assert not os.path.exists(new)
  assert _file_state(path) == file_state


@pytest.mark.parametrize("mechanism", ["auto", "nobody"])
@pytest.mark.parametrize("what", ["folder", "file"])
def test_read_only_gallery_reads_and_refuses_writes(work, what, mechanism):
  path = os.path.join(work, "gallery.sqlite")
  expected = _build(path)
  assert writable_problem(path) is None
  assert sorted(os.listdir(work)) == ["gallery.sqlite"]  # closed cleanly: no -wal, no -shm
  state = _file_state(path)
  _restricted(mechanism, work, path, what, _check_read_only, path, expected, what, state)
  assert _file_state(path) == state
  # writable again: the restriction was the only obstacle
  assert writable_problem(path) is None
  with Gallery(path, FP) as g:
    g.enroll("bob", _emb(1, 7))
    assert sorted(g.names().values()) == ["Zoë", "alice", "bob"]


def _check_unreadable(path):
  assert "the file is read-only" in writable_problem(path)
  with pytest.raises(GalleryError, match="cannot be opened") as err:
    Gallery(path, readonly=True)
  assert path in str(err.value) and "Permission denied" in str(err.value)
  assert "damaged" not in str(err.value) and "not a jaxface gallery" not in str(err.value)
  with pytest.raises(GalleryError, match="cannot be opened|cannot be written") as err:
    Gallery(path, FP)
  assert "damaged" not in str(err.value)


def test_unreadable_gallery_is_a_permission_error_not_damage(work):
  path = os.path.join(work, "gallery.sqlite")
  _build(path)
  state = _file_state(path)
  os.chmod(path, 0o000)  # root reads it anyway: check as nobody when root
  try:
    if IS_ROOT:
      os.chown(path, 0, 0)
      _in_child_as_nobody(_check_unreadable, path)
    else:
      _check_unreadable(path)
  finally:
    os.chmod(path, 0o644)
  assert _file_state(path) == state


def test_writable_problem_on_writable_and_absent_files(work, tmp_path):
  path = os.path.join(work, "gallery.sqlite")
  assert writable_problem(path) is None  # absent, in a writable folder
  assert os.listdir(work) == []  # the probe file was deleted
  _build(path)
  assert writable_problem(path) is None
  assert "does not exist" in writable_problem(str(tmp_path / "missing" / "g.db"))
  assert "is a folder" in writable_problem(str(tmp_path))


def test_writable_problem_reports_read_only_file_systems(work, monkeypatch):
  def erofs(*a, **k):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(gallery_lib.tempfile, "mkstemp", erofs)
  path = os.path.join(work, "gallery.sqlite")
  assert "read-only file system" in writable_problem(path)
  with pytest.raises(GalleryError, match="cannot be written: .*read-only file system"):
    Gallery(path, FP)
  assert not os.path.exists(path)  # refused before SQLite created anything
