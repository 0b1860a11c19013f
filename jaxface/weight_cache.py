"""The convert-once weight cache: foreign weight files converted once, kept under ``cache_dir()``.

Both dlib's face models (:mod:`jaxface.pretrained`) and VGG19 (:mod:`jaxface.weights`)
go through it. An entry is a folder named after what was converted (model,
converter version, the source file's sha256 prefix), so a new file or converter
never reuses an old entry. Shared here: digests, atomic publishing
(:func:`publish`), the damaged-entry error (:func:`damaged`), the one-time notice
(:func:`announce`) and tree entries (:func:`cached`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxface import paths, staging
from jaxface.checkpointing import CheckpointError

log = logging.getLogger(__name__)

__all__ = ["WeightsCacheError", "announce", "cached", "damaged", "file_digests", "file_sha256",
           "publish"]

_META = "meta.json"
_ARRAYS = "arrays"
TREE_FORMAT = 1  # layout of a tree entry (meta.json + orbax arrays); bump when it changes


class WeightsCacheError(CheckpointError):
  """A cache entry exists but cannot be used; the message names the folder to delete."""


def damaged(folder: str, why: str, redo: str = "") -> WeightsCacheError:
  """The error for an unusable entry ``folder`` (raise it): why, and that deleting the folder
  makes the next load convert again (``redo``: how, when it needs more than a rerun).
  Nothing is ever deleted silently."""
  return WeightsCacheError(f"the cached converted weights in {folder} cannot be used ({why}). "
                           f"Delete that folder to convert the weight file again{redo}.")


# --------------------------------------------------------------------------- digests


_sha_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
  """Hex sha256 of a file (memoized per path, size and mtime in this process)."""
  st = os.stat(path)
  key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
  if key not in _sha_memo:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
      while block := f.read(1 << 20):
        sha.update(block)
    _sha_memo[key] = sha.hexdigest()
  return _sha_memo[key]


def file_digests(path: str, chunk: int = 1 << 20) -> tuple[str, str]:
  """(sha256, md5) hex digests of a file, read once in chunks."""
  sha, md5 = hashlib.sha256(), hashlib.md5()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      sha.update(block)
      md5.update(block)
  return sha.hexdigest(), md5.hexdigest()


# --------------------------------------------------------------------------- publishing


def publish(entry_dir: str, write: Callable[[str], None], *, unwritable_ok: bool = False) -> bool:
  """Writes an entry with ``write(tmp)`` into a temporary sibling and renames it to ``entry_dir``.

  Readers see no entry or a complete one; a conversion killed midway leaves
  nothing a later load takes for a damaged entry, and two processes converting
  at once both finish.

  The temporary folder (``.<entry>.tmp-<host>-<pid>-*``) goes on any
  exception, Ctrl-C or SIGTERM; those of killed earlier processes on the next
  publish (:mod:`jaxface.staging`).

  Args:
    entry_dir: the entry's final folder.
    write: writes the entry's files into the folder it is given.
    unwritable_ok: when the cache folder cannot be written at all, log a
      warning and return False instead of raising (the caller goes on
      without caching).

  Returns:
    Whether this call published the entry; False when another process
    published the same entry first (this process's copy is dropped), or
    (``unwritable_ok``) the cache cannot be written.

  Raises:
    OSError: the parent folder cannot be created or written (unless
      ``unwritable_ok``), or writing or renaming failed.
  """
  try:
    tmp = staging.make_temp(entry_dir)
  except OSError as e:
    if not unwritable_ok:
      raise
    log.warning("cannot write the weight cache in %s (%s); using the converted weights "
                "without caching them", os.path.dirname(entry_dir), e)
    return False
  with staging.removed_on_failure(tmp):
    write(tmp)
    try:
      # Atomic: readers see either no entry or a complete one.
      os.rename(tmp, entry_dir)
    except OSError:
      if not os.path.isdir(entry_dir):
        raise
      return False  # another process published it first; the block removes our copy
  return True


_announced = False


def announce(what: str) -> None:
  """Says once per process, on stderr, that ``what`` is being converted and where the cache is."""
  global _announced
  if _announced:
    return
  _announced = True
  print(f"jaxface: converting {what} for their first use (once, a few seconds) into the cache "
        f"{paths.cache_dir()} (set by $JAXFACE_CACHE, default ~/.cache/jaxface); later runs load "
        f"them from there", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tree entries


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


def _write_tree(folder: str, tree: Any, meta: dict) -> None:
  arrays: dict[str, np.ndarray] = {}
  skeleton = _encode(tree, arrays, "")
  if arrays:
    _checkpointer().save(os.path.join(folder, _ARRAYS), arrays)
  # meta.json is written last: an entry without it was never completed.
  with open(os.path.join(folder, _META), "w") as f:
    json.dump({**meta, "tree": skeleton}, f)


def _read_tree(folder: str, expect: dict) -> Any:
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
    raise damaged(folder, f"{type(e).__name__}: {str(e)[:300]}") from e


def cached(entry_dir: str, expect: dict, convert: Callable[[], dict], *, source: str,
           what: str) -> dict:
  """The converted tree in ``entry_dir``, or ``convert()``'s, stored there once.

  The entry is ``meta.json`` (the tree's skeleton, written last) plus an orbax
  ``arrays/`` checkpoint (dlib's models use it; VGG19 entries are an orbax
  ``checkpoints/0`` with the weights as state, written by ``jaxface.weights``, a
  layout kept for the caches already on disk).

  Args:
    entry_dir: the entry's folder (its name says what was converted).
    expect: JSON values the entry's ``meta.json`` must hold besides the
      entry format (e.g. the source file's sha256): a mismatch is a damaged
      entry.
    convert: ``() -> nested dict`` (dicts with string keys, lists, tuples;
      leaves numpy arrays of bool/int/float dtypes or Python
      bool/int/float/str/None), called only when the entry does not exist.
    source: the converted file, recorded in ``meta.json``.
    what: for the notice, e.g. "dlib's face models".

  Returns:
    The tree (arrays as numpy arrays), equal to what ``convert`` returned.

  Raises:
    WeightsCacheError: the entry exists but is damaged (nothing is deleted;
      the message names the folder to delete).
    ValueError: ``convert`` returned something that cannot be stored.
  """
  expect = {"format": TREE_FORMAT, **expect}
  if os.path.isdir(entry_dir):
    return _read_tree(entry_dir, expect)
  announce(what)
  tree = convert()
  if not isinstance(tree, dict):
    raise ValueError(f"converting {source!r} must give a dict, got {type(tree).__name__}")
  # Two processes converting at once both finish; the second rename fails because the
  # folder exists, and that process keeps its own equal tree.
  publish(entry_dir, lambda tmp: _write_tree(tmp, tree, {**expect, "source": source}),
          unwritable_ok=True)
  return tree
