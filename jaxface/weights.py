"""Pretrained VGG19 weights: find, download, convert once (:func:`convert`), load (:func:`load_vgg19`).

Command line (for users with internet; tests never download)::

  python -m jaxface.weights fetch vgg19 [--source=keras|torch|matconvnet] [--dest=DIR]
  python -m jaxface.weights convert PATH
  python -m jaxface.weights info
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable

import numpy as np

from jaxface import checkpointing, paths, weight_cache
from jaxface.formats import vgg_weights
from jaxface.formats.vgg_weights import VGGWeights
from jaxface.models import vgg19
from jaxface.weight_cache import WeightsCacheError, file_digests  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

ENV_VAR = "JAXFACE_VGG19"
CACHE_VERSION = 1

HOW_TO_GET_WEIGHTS = (
    "get pretrained VGG19 weights with `python -m jaxface.weights fetch vgg19 "
    "[--source=keras|torch|matconvnet]` (needs internet), or download one of "
    "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 / vgg19-dcbbb0f4.pth / "
    "imagenet-vgg-verydeep-19.mat yourself and run `python -m jaxface.weights convert PATH` "
    f"(or set ${ENV_VAR}=PATH)")


@dataclasses.dataclass(frozen=True)
class Source:
  """An official download of the VGG19 weights."""
  url: str
  filename: str
  format: str
  md5: str | None = None             # published full md5
  sha256_prefix: str | None = None   # published sha256 prefix
  magic: bytes = b""                 # what the file must start with


SOURCES = {
    # md5 as published in keras-applications' vgg19.py (get_file file_hash).
    "keras": Source(
        "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "keras-h5",
        md5="253f8cb515780f3b799900260a226db6", magic=vgg_weights.HDF5_SIGNATURE),
    # torchvision names its files <arch>-<first 8 hex digits of the sha256>.pth.
    "torch": Source(
        "https://download.pytorch.org/models/vgg19-dcbbb0f4.pth", "vgg19-dcbbb0f4.pth",
        "torchvision-pth", sha256_prefix="dcbbb0f4"),
    # No checksum is published; the header is checked and the sha256 recorded.
    "matconvnet": Source(
        "https://www.vlfeat.org/matconvnet/models/imagenet-vgg-verydeep-19.mat",
        "imagenet-vgg-verydeep-19.mat", "matconvnet-mat", magic=vgg_weights.MAT5_HEADER),
}
OFFICIAL_FILENAMES = tuple(s.filename for s in SOURCES.values())


# ----------------------------------------------------------------------------- cache

def _stamp(path: str) -> list:
  st = os.stat(path)
  return [os.path.realpath(path), int(st.st_size), int(st.st_mtime_ns)]


def _vgg_cache(cache_root: str | None) -> str:
  return os.path.join(cache_root or paths.cache_dir(), "vgg19")


def _read_index(folder: str) -> dict:
  path = os.path.join(folder, "index.json")
  if not os.path.exists(path):
    return {"version": CACHE_VERSION, "default": None, "entries": {}}
  try:
    with open(path) as f:
      index = json.load(f)
    if not isinstance(index.get("entries"), dict):
      raise ValueError("no 'entries'")
  except (OSError, ValueError, AttributeError) as e:
    raise WeightsCacheError(
        f"the VGG19 weights cache index {path} is damaged ({e}); delete the folder {folder} "
        f"and convert again (pass the weight file path again or run "
        f"`python -m jaxface.weights convert PATH`)") from e
  return index


def _write_index(folder: str, index: dict) -> None:
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".index.", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(index, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(folder, "index.json"))  # atomic: never a half-written index
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _save_entry(entry_dir: str, weights: VGGWeights, meta: dict) -> None:
  state = {n: {"kernel": k, "bias": b} for n, (k, b) in weights.params.items()}
  config = dict(meta, preprocessing=weights.preprocessing.to_dict(), source=weights.source,
                shapes={n: [list(k.shape), list(b.shape)] for n, (k, b) in weights.params.items()},
                cache_version=CACHE_VERSION)
  with checkpointing.Checkpointer(entry_dir, max_to_keep=1, async_save=False) as ck:
    ck.save(0, state, config, force=True)


_REDO = (" (pass the weight file path again or run `python -m jaxface.weights convert PATH`)")


def _load_entry(entry_dir: str) -> VGGWeights:
  def damaged(why, cause=None):
    err = weight_cache.damaged(entry_dir, why, _REDO)
    if cause is not None:
      raise err from cause
    raise err

  if not os.path.isdir(entry_dir):
    damaged("the folder is missing")
  try:
    with checkpointing.Checkpointer(entry_dir, async_save=False) as ck:
      config = ck.restore_config()
      if config is None:
        damaged("no complete checkpoint in it")
      if config.get("cache_version") != CACHE_VERSION:
        damaged(f"cache version {config.get('cache_version')!r}, this jaxface writes "
                f"{CACHE_VERSION}")
      abstract = {n: {"kernel": np.zeros(ks, np.float32), "bias": np.zeros(bs, np.float32)}
                  for n, (ks, bs) in config["shapes"].items()}
      restored = ck.restore(abstract)
  except WeightsCacheError:
    raise
  except (checkpointing.CheckpointError, KeyError, TypeError, ValueError) as e:
    damaged(f"{type(e).__name__}: {str(e)[:300]}", e)
  if restored is None:
    damaged("no complete checkpoint in it")
  _, state = restored
  params = {n: (np.asarray(v["kernel"]), np.asarray(v["bias"])) for n, v in state.items()}
  try:
    params = vgg_weights.validate(params, f"VGG19 weights cache {entry_dir}", vgg19.CONVS,
                                  strict_shapes=bool(config.get("strict_shapes", True)))
    prep = vgg_weights.Preprocessing.from_dict(config["preprocessing"])
  except (ValueError, KeyError, TypeError) as e:
    damaged(str(e), e)
  return VGGWeights(params, prep, str(config["source"]))


def convert(path: str, *, strict_shapes: bool = True, cache_root: str | None = None,
            make_default: bool = True) -> VGGWeights:
  """Reads ``path`` (unless already converted) and returns its weights from the cache.

  The file (Keras .h5, torchvision .pth or MatConvNet .mat, detected from its
  content by ``jaxface.formats.vgg_weights``) is validated and converted once, in
  the one weight cache (:mod:`jaxface.weight_cache`), into an orbax checkpoint
  under ``<cache_dir()>/vgg19/<format>-<sha256[:16]>/checkpoints/0``;
  ``<cache_dir()>/vgg19/index.json`` remembers every conversion (source path,
  size, mtime, sha256) and which one is the default. The file is looked up in
  that index by (real path, size, mtime), then by sha256; only a file not seen
  before is read and converted, so later calls load the checkpoint without
  re-reading the source file.

  Raises:
    ValueError: naming the file, for a missing, unreadable or wrong file.
    WeightsCacheError: naming the folder, for a damaged cache.
  """
  path = paths.expand(os.fspath(path))  # ~, $VARS and $JAXFACE_DATA
  if not os.path.isfile(path):
    raise ValueError(f"VGG19 weight file {path!r} does not exist or is not a file")
  fmt = vgg_weights.detect_format(path)  # cheap: refuse an unrelated file before hashing
  folder = _vgg_cache(cache_root)
  index = _read_index(folder)
  stamp = _stamp(path)
  name = next((n for n, e in index["entries"].items()
               if e.get("stamp") == stamp and e.get("strict_shapes", True) == strict_shapes), None)
  if name is not None and not os.path.isdir(os.path.join(folder, name)):
    name = None  # its folder was deleted: convert again
  sha256 = md5 = None
  if name is None:
    sha256, md5 = weight_cache.file_digests(path)
    name = f"{fmt}-{sha256[:16]}" + ("" if strict_shapes else "-loose")
  entry_dir = os.path.join(folder, name)
  if os.path.isdir(entry_dir):
    # Converted before (maybe from another path, or before a crash left the index
    # unwritten): load it; a damaged one raises, naming the folder.
    weights = _load_entry(entry_dir)
    if sha256 is not None:
      index["entries"][name] = dict(index["entries"].get(name, {}), stamp=stamp,
                                    sha256=sha256, md5=md5, format=fmt, source_path=stamp[0],
                                    source_size=stamp[1], strict_shapes=strict_shapes)
  else:
    weights = vgg_weights.READERS[fmt](path, vgg19.CONVS, strict_shapes=strict_shapes)
    meta = {"format": fmt, "sha256": sha256, "md5": md5, "source_path": stamp[0],
            "source_size": stamp[1], "strict_shapes": strict_shapes}
    # Published atomically: a conversion killed midway leaves no half-written entry.
    weight_cache.publish(entry_dir, lambda tmp: _save_entry(tmp, weights, meta))
    log.info("converted %s (sha256 %s) into %s", path, sha256, entry_dir)
    index["entries"][name] = dict(meta, stamp=stamp)
    weights = _load_entry(entry_dir)  # what later calls will see; also checks the write
  if make_default:
    index["default"] = name
  _write_index(folder, index)
  return weights


def _env_path() -> str | None:
  """``$JAXFACE_VGG19``: a weight file, or a folder holding an official file name."""
  value = os.environ.get(ENV_VAR)
  if not value:
    return None
  value = paths.expand(value)
  if os.path.isdir(value):
    found = _official_in(value)
    if found is None:
      raise ValueError(f"${ENV_VAR}={value} is a folder without any of {OFFICIAL_FILENAMES}")
    return found
  if not os.path.isfile(value):
    raise ValueError(f"${ENV_VAR}={value} does not exist")
  return value


def _official_in(folder: str) -> str | None:
  for name in OFFICIAL_FILENAMES:
    p = os.path.join(folder, name)
    if os.path.isfile(p):
      return p
  return None


def load_vgg19(path: str | None = None, *, strict_shapes: bool = True,
               cache_root: str | None = None) -> VGGWeights | None:
  """The pretrained VGG19 weights, or None when none are available.

  Args:
    path: a Keras .h5, torchvision .pth or MatConvNet .mat file. It is
      converted once into the cache and becomes the default.
    strict_shapes: require the real VGG19 channel counts (tests pass False).
    cache_root: overrides ``paths.cache_dir()``.

  Without ``path``: ``$JAXFACE_VGG19`` (a file, or a folder with an official
  file name) when set, else the default converted weights in the cache, else
  an official file name in the cache dir (where ``fetch`` puts it), else None.

  Returns:
    VGGWeights (kernels [3,3,Cin,Cout] float32 HWIO, biases [Cout] float32),
    or None.

  Raises:
    ValueError: naming the file, for a missing, unreadable or wrong file.
    WeightsCacheError: naming the folder, for a damaged cache.
  """
  if path is not None:
    return convert(path, strict_shapes=strict_shapes, cache_root=cache_root)
  env = _env_path()
  if env is not None:
    return convert(env, strict_shapes=strict_shapes, cache_root=cache_root)
  folder = _vgg_cache(cache_root)
  index = _read_index(folder)
  if index.get("default"):
    return _load_entry(os.path.join(folder, index["default"]))
  found = _official_in(cache_root or paths.cache_dir())
  if found is not None:
    return convert(found, strict_shapes=strict_shapes, cache_root=cache_root)
  return None


# ----------------------------------------------------------------------------- download

class _Progress:
  """Download progress on a stream: bytes, percent, MB/s, ETA.

  On a terminal one line is redrawn with ``\\r`` every ``interval`` seconds;
  anywhere else (a log file, a pipe, CI) a plain line is written at most every
  10% of the file or every ``log_interval`` seconds, and a last one at the end.
  """

  def __init__(self, total: int | None, stream=None, interval: float = 0.2,
               log_interval: float = 5.0):
    self.total = total if total and total > 0 else None
    self.stream = stream if stream is not None else sys.stderr
    try:
      self.tty = bool(self.stream.isatty())
    except (AttributeError, ValueError, OSError):
      self.tty = False
    self.interval = interval if self.tty else log_interval
    self.done = self.logged = 0
    self.start = self.last = time.monotonic()

  def line(self) -> str:
    elapsed = max(time.monotonic() - self.start, 1e-6)
    rate = self.done / elapsed
    text = f"{self.done / 1e6:8.1f}"
    if self.total:
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      eta_s = "?" if eta == float("inf") else f"{int(eta) // 60}:{int(eta) % 60:02d}"
      text += (f"/{self.total / 1e6:.1f} MB {100.0 * self.done / self.total:5.1f}% "
               f"{rate / 1e6:6.2f} MB/s ETA {eta_s}")
    else:
      text += f" MB {rate / 1e6:6.2f} MB/s"
    return text

  def update(self, n: int) -> None:
    self.done += n
    now = time.monotonic()
    tenth = self.total is not None and not self.tty and self.done - self.logged >= self.total / 10
    if now - self.last >= self.interval or tenth:
      self.last, self.logged = now, self.done
      self.stream.write("\r" + self.line() if self.tty else self.line().strip() + "\n")
      self.stream.flush()

  def close(self) -> None:
    if not self.tty and self.logged == self.done and self.done:
      return  # the last line written already says it all
    self.stream.write("\r" + self.line() + "\n" if self.tty else self.line().strip() + "\n")
    self.stream.flush()


def download(url: str, dest: str, *, md5: str | None = None, sha256: str | None = None,
             sha256_prefix: str | None = None, magic: bytes = b"", progress: bool = True,
             opener: Callable = urllib.request.urlopen, chunk: int = 1 << 20,
             stream=None) -> str:
  """Downloads ``url`` to ``dest`` atomically and checks it; returns its sha256.

  The bytes go to a temporary file in ``dest``'s folder, hashed on the way,
  and are renamed to ``dest`` only when every given check passes; otherwise
  the temporary file is removed and nothing is left behind.

  Raises:
    ValueError: on a checksum or header mismatch, naming the URL and both values.
    OSError: on network or disk errors (urllib.error.URLError is one).
  """
  folder = os.path.dirname(os.path.abspath(dest))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(dest) + ".", suffix=".part")
  sha, md5h = hashlib.sha256(), hashlib.md5()
  head = b""
  try:
    with os.fdopen(fd, "wb") as out, opener(url) as resp:
      length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
      bar = _Progress(int(length) if length and length.isdigit() else None, stream) \
          if progress else None
      while block := resp.read(chunk):
        out.write(block)
        sha.update(block)
        md5h.update(block)
        if len(head) < len(magic):
          head += block[: len(magic) - len(head)]
        if bar:
          bar.update(len(block))
      if bar:
        bar.close()
    got_sha, got_md5 = sha.hexdigest(), md5h.hexdigest()
    problems = []
    if sha256 and got_sha != sha256.lower():
      problems.append(f"sha256 {got_sha}, expected {sha256}")
    if sha256_prefix and not got_sha.startswith(sha256_prefix.lower()):
      problems.append(f"sha256 {got_sha}, expected one starting with {sha256_prefix}")
    if md5 and got_md5 != md5.lower():
      problems.append(f"md5 {got_md5}, expected {md5}")
    if magic and head != magic:
      problems.append(f"file starts with {head[:24]!r}, expected {magic!r}")
    if problems:
      raise ValueError(f"download of {url} failed its check: {'; '.join(problems)}. "
                       f"The file was not kept; try again or download it by hand")
    os.replace(tmp, dest)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return got_sha


def fetch(source: str = "keras", dest: str | None = None, *, url: str | None = None,
          do_convert: bool = True, progress: bool = True, opener: Callable = urllib.request.urlopen,
          cache_root: str | None = None, strict_shapes: bool = True, stream=None) -> tuple[str, VGGWeights | None]:
  """Downloads the official VGG19 file of ``source`` into ``dest`` and converts it.

  The download goes to a temporary file next to the destination, with a
  progress bar on stderr, and is checked against the published checksum
  (Keras: md5 from keras-applications; torchvision: the sha256 prefix in the
  file name; MatConvNet publishes none, so its MATLAB header is checked and the
  sha256 computed is printed and recorded in the cache) before it is renamed
  into place atomically (:func:`download`). A file already at the destination
  that passes the checks is not downloaded again.

  Returns:
    (path of the downloaded file, converted weights or None when not converting).
  """
  if source not in SOURCES:
    raise ValueError(f"source must be one of {sorted(SOURCES)}, got {source!r}")
  src = SOURCES[source]
  folder = paths.expand(dest) if dest else (cache_root or paths.cache_dir())
  target = os.path.join(folder, src.filename)
  if os.path.isfile(target) and _verify_existing(target, src):
    log.info("%s already present and verified", target)
  else:
    sha = download(url or src.url, target, md5=src.md5, sha256_prefix=src.sha256_prefix,
                   magic=src.magic, progress=progress, opener=opener, stream=stream)
    if not (src.md5 or src.sha256_prefix):
      print(f"{src.filename}: no published checksum; sha256 of the download is {sha} "
            f"(recorded in the cache)", file=stream or sys.stderr)
  weights = (convert(target, cache_root=cache_root, strict_shapes=strict_shapes)
             if do_convert else None)
  return target, weights


def _verify_existing(path: str, src: Source) -> bool:
  sha, md5 = weight_cache.file_digests(path)
  with open(path, "rb") as f:
    head = f.read(len(src.magic))
  return ((not src.md5 or md5 == src.md5) and (not src.sha256_prefix or sha.startswith(src.sha256_prefix))
          and head == src.magic)


# ----------------------------------------------------------------------------- CLI

def info(cache_root: str | None = None) -> str:
  """A human-readable summary of what weights are available."""
  folder = _vgg_cache(cache_root)
  lines = [f"cache folder: {folder}"]
  try:
    index = _read_index(folder)
  except WeightsCacheError as e:
    return "\n".join(lines + [f"  {e}"])
  if not index["entries"]:
    lines.append("  no converted weights")
  for name, e in sorted(index["entries"].items()):
    mark = "*" if name == index.get("default") else " "
    lines.append(f" {mark}{name}: from {e.get('source_path')} ({e.get('source_size')} bytes, "
                 f"sha256 {e.get('sha256')})")
  lines.append(f"${ENV_VAR}: {os.environ.get(ENV_VAR) or '(unset)'}")
  found = _official_in(cache_root or paths.cache_dir())
  lines.append(f"official file in {cache_root or paths.cache_dir()}: {found or '(none)'}")
  if not index["entries"] and not found and not os.environ.get(ENV_VAR):
    lines.append(HOW_TO_GET_WEIGHTS)
  return "\n".join(lines)


def _describe(w: VGGWeights) -> str:
  p = w.preprocessing
  return (f"VGG19 weights from {w.source}: 16 convs, "
          f"{sum(k.size + b.size for k, b in w.params.values()):,} parameters; input "
          f"{p.channel_order}, x{p.scale:g}, mean {p.mean}, std {p.std}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxface.weights",
                                   description="Pretrained VGG19 weights for jaxface.")
  sub = parser.add_subparsers(dest="command", required=True)
  p_fetch = sub.add_parser("fetch", help="download from the official URL, check and convert")
  p_fetch.add_argument("model", choices=["vgg19"])
  p_fetch.add_argument("--source", choices=sorted(SOURCES), default="keras",
                       help="which published file (keras: 80 MB, original Caffe weights; "
                            "torch: 548 MB; matconvnet: 535 MB)")
  p_fetch.add_argument("--dest", default=None, help="folder for the file (default: cache dir)")
  p_fetch.add_argument("--url", default=None, help="a mirror of the official file")
  p_fetch.add_argument("--no-convert", action="store_true", help="only download")
  p_conv = sub.add_parser("convert", help="convert a downloaded file into the cache")
  p_conv.add_argument("path")
  sub.add_parser("info", help="show the cache and where weights are looked for")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    if args.command == "fetch":
      target, w = fetch(args.source, args.dest, url=args.url, do_convert=not args.no_convert)
      print(f"downloaded {target}")
      if w is not None:
        print(_describe(w))
    elif args.command == "convert":
      print(_describe(convert(args.path)))
    else:
      print(info())
  except (ValueError, OSError, ImportError, checkpointing.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
