"""A disk cache of the faces found in known-people images (``identify --known=DIR``).

Entries are keyed by the image file's content (sha256), so a renamed or moved
file is still found and an edited one is embedded again (:class:`KnownFaceCache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable

import numpy as np

from jaxface import paths

FORMAT_VERSION = 1
SUBDIR = "known_faces"


def default_dir() -> str:
  """``$JAXFACE_CACHE/known_faces`` (default ``~/.cache/jaxface/known_faces``)."""
  return os.path.join(paths.cache_dir(), SUBDIR)


def _key(fingerprint: dict, upsample: int) -> str:
  return json.dumps({"fingerprint": fingerprint, "upsample": int(upsample), "version": FORMAT_VERSION},
                    sort_keys=True, separators=(",", ":"))


class KnownFaceCache:
  """Faces per image content for one (encoder ``fingerprint``, ``upsample``).

  One cache file holds the entries of one encoder fingerprint and one detector
  ``upsample`` setting; its name is a digest of both, and the file repeats them,
  so embeddings of another encoder are never returned. Every face of an image is
  stored (boxes and embeddings, possibly none), so the one-face rules (largest
  face, ``strict``) are applied by the caller as for a freshly embedded image. A
  damaged or unreadable cache is reported through ``warn`` and rebuilt from scratch.

  Args:
    fingerprint: the encoder's fingerprint dict (JSON-serializable).
    upsample: the detector's upsampling steps.
    folder: where the cache files live (default :func:`default_dir`).
    warn: called with a message when an existing cache file cannot be used.
  """

  def __init__(self, fingerprint: dict, upsample: int, *, folder: str | None = None,
               warn: Callable[[str], None] | None = None):
    if not isinstance(fingerprint, dict):
      raise ValueError(f"fingerprint: expected a dict, got {type(fingerprint).__name__}")
    if isinstance(upsample, bool) or not isinstance(upsample, (int, np.integer)) or upsample < 0:
      raise ValueError(f"upsample: expected an int >= 0, got {upsample!r}")
    self.key = _key(fingerprint, int(upsample))
    self.folder = folder if folder is not None else default_dir()
    digest = hashlib.sha256(self.key.encode()).hexdigest()[:24]
    self.path = os.path.join(self.folder, f"{digest}.npz")
    self.dim = int(fingerprint.get("dim", 0) or 0)
    self._warn = warn or (lambda message: None)
    self._entries: dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]] = {}
    self._dirty = False
    self._load()

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, sha256: str) -> bool:
    return sha256 in self._entries

  def get(self, sha256: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None] | None:
    """(boxes int64 [N, 4], embeddings float32 [N, D], image (height, width) or None when
    unknown) of the image with this content, or None."""
    entry = self._entries.get(sha256)
    if entry is None:
      return None
    return entry[0].copy(), entry[1].copy(), (entry[2] if min(entry[2]) > 0 else None)

  def put(self, sha256: str, boxes: np.ndarray, embeddings: np.ndarray,
          image_hw: tuple[int, int] | None = None) -> None:
    """Remembers the faces of the image with content ``sha256`` and its (height, width)
    (saved by :meth:`save`)."""
    if not isinstance(sha256, str) or len(sha256) != 64:
      raise ValueError(f"sha256: expected a 64-character hex digest, got {sha256!r}")
    hw = (0, 0) if image_hw is None else tuple(int(v) for v in np.asarray(image_hw).reshape(-1))
    if image_hw is not None and (len(hw) != 2 or min(hw) < 1):
      raise ValueError(f"image_hw: expected (height, width) >= 1 or None, got {image_hw!r}")
    b = np.asarray(boxes, np.int64).reshape(-1, 4)
    e = np.asarray(embeddings, np.float32)
    if e.ndim != 2 or e.shape[0] != b.shape[0] or (self.dim and e.shape[0] and e.shape[1] != self.dim):
      raise ValueError(f"embeddings: expected [{b.shape[0]}, {self.dim or 'D'}] for {b.shape[0]} boxes, "
                       f"got {e.shape}")
    if e.shape[0] == 0:
      e = np.zeros((0, self.dim or e.shape[1]), np.float32)
    self._entries[sha256] = (b, e, hw)
    self._dirty = True

  # ---------------------------------------------------------------- file

  def _load(self) -> None:
    if not os.path.exists(self.path):
      return
    try:
      with np.load(self.path, allow_pickle=False) as z:
        key = str(z["key"])
        if key != self.key:
          raise ValueError("written for another encoder or upsample setting")
        shas = [str(s) for s in z["sha256"]]
        counts = np.asarray(z["counts"], np.int64)
        boxes = np.asarray(z["boxes"], np.int64).reshape(-1, 4)
        embs = np.asarray(z["embeddings"], np.float32)
        sizes = np.asarray(z["sizes"], np.int64)
      if sizes.shape != (len(shas), 2) or (sizes < 0).any():
        raise ValueError("inconsistent arrays")
      if counts.shape != (len(shas),) or (counts < 0).any() or int(counts.sum()) != boxes.shape[0] \
          or embs.ndim != 2 or embs.shape[0] != boxes.shape[0] or (self.dim and embs.shape[1] != self.dim):
        raise ValueError("inconsistent arrays")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      self._warn(f"known-faces cache {self.path} cannot be used ({e}); rebuilding it")
      self._entries, self._dirty = {}, True
      return
    ends = np.cumsum(counts)
    for sha, end, n, hw in zip(shas, ends, counts, sizes.tolist()):
      self._entries[sha] = (boxes[end - n:end], embs[end - n:end], (hw[0], hw[1]))

  def save(self) -> None:
    """Writes the cache atomically when something changed (creates its folder): NumPy ``.npz``
    (no pickle) into a temporary file in the same folder, fsynced, then renamed over the old one."""
    if not self._dirty:
      return
    os.makedirs(self.folder, exist_ok=True)
    shas = sorted(self._entries)
    dim = self.dim or next((e.shape[1] for _, e in self._entries.values()), 0)
    boxes = [self._entries[s][0] for s in shas]
    embs = [self._entries[s][1] for s in shas]
    arrays = {
        "key": np.asarray(self.key),
        "sha256": np.asarray(shas, dtype="U64"),
        "counts": np.asarray([b.shape[0] for b in boxes], np.int64),
        "sizes": np.asarray([self._entries[s][2] for s in shas], np.int64).reshape(-1, 2),
        "boxes": np.concatenate(boxes).astype(np.int64) if boxes else np.zeros((0, 4), np.int64),
        "embeddings": (np.concatenate(embs).astype(np.float32) if embs
                       else np.zeros((0, dim), np.float32)),
    }
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.folder)
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    except BaseException:
      try:
        os.unlink(tmp)
      except OSError:
        pass
      raise
    self._dirty = False
