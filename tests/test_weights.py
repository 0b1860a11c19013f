"""Tests for jaxface.weights: convert-once cache, lookup order, download, CLI.

No network: downloads come from file:// URLs or a fake opener.
"""

import hashlib
import io
import os

import pytest
from test_vgg_weights import assert_params_equal, tiny_params, torchvision_state_dict, write_matconvnet, write_torch_zip

from jaxface import weights as W
from jaxface.formats import vgg_weights as vw


@pytest.fixture
def cache(tmp_path, monkeypatch):
  root = tmp_path / "cache"
  monkeypatch.setenv("JAXFACE_CACHE", str(root))
  monkeypatch.delenv(W.ENV_VAR, raising=False)
  return root


def _torch_file(folder, seed=0, name="vgg.pth"):
  params = tiny_params(seed)
  path = str(folder / name)
  write_torch_zip(path, torchvision_state_dict(params))
  return path, params


def _forbid_reading(monkeypatch):
  def boom(*a, **k):
    raise AssertionError("the source file was read again")
  monkeypatch.setattr(vw, "READERS", {k: boom for k in vw.READERS})


def test_nothing_available_returns_none(cache):
  assert W.load_vgg19() is None
  assert "fetch vgg19" in W.HOW_TO_GET_WEIGHTS and W.ENV_VAR in W.HOW_TO_GET_WEIGHTS


def test_convert_once_then_load_from_cache_without_the_source(cache, tmp_path, monkeypatch):
  path, params = _torch_file(tmp_path)
  w = W.load_vgg19(path, strict_shapes=False)
  assert_params_equal(w.params, params)
  assert w.preprocessing == vw.TORCH and w.source.startswith("torchvision-pth:")
  sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
  entry = cache / "vgg19" / f"torchvision-pth-{sha[:16]}-loose"  # loose: tiny shapes
  assert (entry / "checkpoints" / "0").is_dir()
  _forbid_reading(monkeypatch)
  again = W.load_vgg19(path, strict_shapes=False)  # same path: found by its stamp
  assert_params_equal(again.params, params)
  os.remove(path)
  default = W.load_vgg19()  # no path: the default converted weights
  assert_params_equal(default.params, params)
  assert default.preprocessing == vw.TORCH and default.source == w.source


def test_same_content_at_new_path_is_not_converted_again(cache, tmp_path, monkeypatch):
  path, params = _torch_file(tmp_path)
  W.load_vgg19(path, strict_shapes=False)
  moved = str(tmp_path / "moved.pth")
  os.rename(path, moved)
  _forbid_reading(monkeypatch)
  assert_params_equal(W.load_vgg19(moved, strict_shapes=False).params, params)
  assert len(os.listdir(cache / "vgg19")) == 2  # index.json + one entry


def test_latest_conversion_becomes_default(cache, tmp_path):
  p1, params1 = _torch_file(tmp_path, seed=1, name="a.pth")
  m2 = str(tmp_path / "b.mat")
  params2 = tiny_params(2)
  write_matconvnet(m2, params2)
  W.load_vgg19(p1, strict_shapes=False)
  w2 = W.load_vgg19(m2, strict_shapes=False)
  assert w2.preprocessing.channel_order == "RGB" and w2.preprocessing.scale == 255.0
  assert_params_equal(W.load_vgg19().params, params2)
  W.load_vgg19(p1, strict_shapes=False)
  assert_params_equal(W.load_vgg19().params, params1)
  text = W.info()
  assert "torchvision-pth-" in text and "matconvnet-mat-" in text and str(cache) in text


def test_env_var_file_or_folder(cache, tmp_path, monkeypatch):
  path, params = _torch_file(tmp_path)
  monkeypatch.setenv(W.ENV_VAR, path)
  assert_params_equal(W.load_vgg19(strict_shapes=False).params, params)
  folder = tmp_path / "dl"
  folder.mkdir()
  os.rename(path, folder / "vgg19-dcbbb0f4.pth")
  monkeypatch.setenv(W.ENV_VAR, str(folder))
  assert_params_equal(W.load_vgg19(strict_shapes=False).params, params)
  monkeypatch.setenv(W.ENV_VAR, str(tmp_path / "missing.h5"))
  with pytest.raises(ValueError, match=r"JAXFACE_VGG19=.*missing\.h5 does not exist"):
    W.load_vgg19()


def test_official_file_in_cache_dir_is_found(cache, tmp_path):
  cache.mkdir()
  _, params = _torch_file(cache, name="vgg19-dcbbb0f4.pth")
  assert_params_equal(W.load_vgg19(strict_shapes=False).params, params)


def test_real_vgg19_shapes_required_by_default(cache, tmp_path):
  path, _ = _torch_file(tmp_path)
  with pytest.raises(ValueError, match=r"vgg\.pth.*conv1_1.*\(3, 3, 3, 64\)"):
    W.load_vgg19(path)
  assert not (cache / "vgg19").exists() or not [
      n for n in os.listdir(cache / "vgg19") if n != "index.json"]


def test_unrelated_file_is_refused_before_any_conversion(cache, tmp_path):
  bad = tmp_path / "x.pth"
  bad.write_bytes(b"not weights at all")
  with pytest.raises(ValueError, match=r"x\.pth is not a Keras"):
    W.load_vgg19(str(bad))
  with pytest.raises(ValueError, match=r"nope\.pth.*does not exist"):
    W.load_vgg19(str(tmp_path / "nope.pth"))


def test_damaged_cache_is_a_clear_error_and_nothing_is_deleted(cache, tmp_path):
  path, _ = _torch_file(tmp_path)
  W.load_vgg19(path, strict_shapes=False)
  entry = next(p for p in (cache / "vgg19").iterdir() if p.is_dir())
  # Damage every stored array file of the checkpoint.
  damaged = 0
  for root, _, files in os.walk(entry / "checkpoints" / "0" / "state"):
    for f in files:
      p = os.path.join(root, f)
      if os.path.getsize(p) > 64:
        with open(p, "r+b") as fh:
          fh.truncate(16)
        damaged += 1
  assert damaged
  with pytest.raises(W.WeightsCacheError, match=f"{entry}.*Delete that folder"):
    W.load_vgg19()
  assert entry.is_dir() and os.path.exists(path)
  (cache / "vgg19" / "index.json").write_text("{ broken")
  with pytest.raises(W.WeightsCacheError, match=r"index\.json is damaged.*delete the folder"):
    W.load_vgg19()


# ----------------------------------------------------------------------------- download

def test_download_file_url_checks_and_renames(tmp_path):
  src = tmp_path / "src.bin"
  data = os.urandom(3 * 1024 + 5)
  src.write_bytes(b"MAGIC" + data)
  want = hashlib.sha256(src.read_bytes()).hexdigest()
  dest = str(tmp_path / "out" / "file.bin")
  err = io.StringIO()
  got = W.download(src.as_uri(), dest, sha256=want, md5=hashlib.md5(src.read_bytes()).hexdigest(),
                   sha256_prefix=want[:8], magic=b"MAGIC", chunk=1000, stream=err)
  assert got == want and open(dest, "rb").read() == src.read_bytes()
  assert os.listdir(tmp_path / "out") == ["file.bin"]  # no temporary file left
  assert "100.0%" in err.getvalue() and "MB/s" in err.getvalue() and "ETA" in err.getvalue()


@pytest.mark.parametrize("kw", [{"sha256": "0" * 64}, {"sha256_prefix": "dcbbb0f4"},
                                {"md5": "253f8cb515780f3b799900260a226db6"}, {"magic": b"MATLAB"}])
def test_download_mismatch_keeps_nothing(tmp_path, kw):
  src = tmp_path / "src.bin"
  src.write_bytes(b"some bytes")
  dest = tmp_path / "out" / "file.bin"
  with pytest.raises(ValueError, match=r"src\.bin failed its check.*not kept"):
    W.download(src.as_uri(), str(dest), progress=False, **kw)
  assert os.listdir(tmp_path / "out") == []


class _FakeResponse(io.BytesIO):
  def __init__(self, data, length=True):
    super().__init__(data)
    self.headers = {"Content-Length": str(len(data))} if length else {}


def test_download_fake_opener_without_length_and_interrupted(tmp_path):
  data = b"x" * 5000
  err = io.StringIO()
  W.download("https://example.invalid/f", str(tmp_path / "f"),
             opener=lambda url: _FakeResponse(data, length=False), chunk=512, stream=err)
  assert (tmp_path / "f").read_bytes() == data and "MB/s" in err.getvalue()

  class Broken(_FakeResponse):
    def read(self, n=-1):
      raise OSError("connection reset")
  with pytest.raises(OSError, match="connection reset"):
    W.download("https://example.invalid/g", str(tmp_path / "g"),
               opener=lambda url: Broken(data), progress=False)
  assert sorted(os.listdir(tmp_path)) == ["f"]


def test_fetch_downloads_verifies_and_converts(cache, tmp_path, monkeypatch):
  path, params = _torch_file(tmp_path, name="upstream.pth")
  sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
  monkeypatch.setitem(W.SOURCES, "torch", W.Source(
      "file://" + path, "vgg19-dcbbb0f4.pth", "torchvision-pth", sha256_prefix=sha[:8]))
  target, w = W.fetch("torch", progress=False, strict_shapes=False)
  assert target == str(cache / "vgg19-dcbbb0f4.pth") and os.path.isfile(target)
  assert_params_equal(w.params, params)
  # Present and verified: not downloaded again (the URL is gone now).
  os.remove(path)
  target2, _ = W.fetch("torch", progress=False, strict_shapes=False)
  assert target2 == target
  with pytest.raises(ValueError, match="source must be one of"):
    W.fetch("caffe")


def test_official_sources_table():
  assert W.SOURCES["torch"].url == "https://download.pytorch.org/models/vgg19-dcbbb0f4.pth"
  assert W.SOURCES["torch"].sha256_prefix == "dcbbb0f4"
  assert W.SOURCES["keras"].url.endswith("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5")
  assert len(W.SOURCES["keras"].md5) == 32
  assert W.SOURCES["matconvnet"].magic == vw.MAT5_HEADER


# ----------------------------------------------------------------------------- CLI

def test_cli_info_convert_and_fetch_errors(cache, tmp_path, capsys):
  assert W.main(["info"]) == 0
  out = capsys.readouterr().out
  assert str(cache / "vgg19") in out and "fetch vgg19" in out
  bad = tmp_path / "bad.h5"
  bad.write_bytes(b"junk")
  assert W.main(["convert", str(bad)]) == 1
  assert "bad.h5" in capsys.readouterr().err
  src = tmp_path / "upstream.h5"
  src.write_bytes(b"wrong content")
  dest = tmp_path / "dl"
  code = W.main(["fetch", "vgg19", "--source=keras", f"--dest={dest}", f"--url={src.as_uri()}",
                 "--no-convert"])
  assert code == 1 and "md5" in capsys.readouterr().err
  assert os.listdir(dest) == []
  with pytest.raises(SystemExit):
    W.main(["fetch", "resnet"])


class _Stream(io.StringIO):
  def __init__(self, tty):
    super().__init__()
    self.tty = tty

  def isatty(self):
    return self.tty


def test_download_progress_is_plain_lines_when_not_a_terminal(tmp_path):
  data = b"x" * 100_000
  log = _Stream(tty=False)
  W.download("https://example.invalid/f", str(tmp_path / "f"), opener=lambda url: _FakeResponse(data),
             chunk=1000, stream=log)
  text = log.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  # 100 chunks: a line every 10% of the file, the last one at 100%, none repeated.
  assert 5 <= len(lines) <= 11 and lines[-1].startswith("0.1/0.1 MB 100.0%"), lines
  assert len(set(lines)) == len(lines)
  term = _Stream(tty=True)
  W.download("https://example.invalid/g", str(tmp_path / "g"), opener=lambda url: _FakeResponse(data),
             chunk=1000, stream=term)
  assert term.getvalue().startswith("\r") and term.getvalue().endswith("\n")
  assert term.getvalue().count("\n") == 1  # one redrawn line


def _vgg_entry(cache, path):
  sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return cache / "vgg19" / f"torchvision-pth-{sha[:16]}-loose"


def test_conversion_killed_midway_leaves_no_entry_and_its_temp_folder_is_cleaned(cache, tmp_path,
                                                                                 monkeypatch):
  import subprocess
  import sys

  from jaxface import staging
  path, params = _torch_file(tmp_path)
  entry = _vgg_entry(cache, path)
  # A killed conversion left its temp folder (a dead process's, half-written) behind.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = entry.parent / f".{entry.name}.tmp-{staging._host()}-{dead.pid}-abc"
  (stale / "checkpoints").mkdir(parents=True)
  # An interrupted conversion removes its own and publishes nothing.
  real = W._save_entry

  def interrupted(entry_dir, weights, meta):
    real(entry_dir, weights, meta)
    raise KeyboardInterrupt

  monkeypatch.setattr(W, "_save_entry", interrupted)
  with pytest.raises(KeyboardInterrupt):
    W.load_vgg19(path, strict_shapes=False)
  assert not entry.exists() and not stale.exists()
  assert [n for n in os.listdir(entry.parent) if ".tmp-" in n] == []
  monkeypatch.setattr(W, "_save_entry", real)
  w = W.load_vgg19(path, strict_shapes=False)  # converts again, cleanly
  assert_params_equal(w.params, params)
  assert sorted(os.listdir(entry.parent)) == ["index.json", entry.name]
