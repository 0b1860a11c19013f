"""Image folders laid out as ``<root>/<identity>/<image files>``, loaded eagerly.

Face sets used here are small (hundreds to a few thousand images), so every
image is decoded once, in parallel threads (PIL releases the GIL while
decoding), into one uint8 array; batches are then plain indexing.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

import numpy as np
from PIL import Image

from jaxface import paths
from jaxface.data import align as align_lib
from jaxface.data.conform import (
  check_channels,
  check_size,
  conform_array as conform_array,  # re-exported: part of this module's API
  conform_image,
)
from jaxface.data.source import ImageSource, natural_key

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

def _is_hidden(name: str) -> bool:
  return name.startswith(".")


def list_image_folder(root: str) -> list[tuple[str, list[str]]]:
  """Identity folders under ``root`` and their image files, both in natural order.

  Plain files at the root, hidden entries and files whose extension is not an
  image extension are ignored. Identity folders with no image files are left out.

  Returns:
    [(identity_name, [file paths])].
  """
  if not os.path.isdir(root):
    raise ValueError(f"image folder root {root!r} does not exist or is not a directory")
  out = []
  with os.scandir(root) as it:
    dirs = [e for e in it if not _is_hidden(e.name) and e.is_dir()]
  for d in sorted(dirs, key=lambda e: natural_key(e.name)):
    with os.scandir(d.path) as it:
      files = [e for e in it if not _is_hidden(e.name) and e.is_file()
               and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
    if files:
      out.append((d.name, [e.path for e in sorted(files, key=lambda e: natural_key(e.name))]))
    else:
      _log.info("identity folder %s has no image files; skipped", d.path)
  if not out:
    raise ValueError(f"image folder root {root!r} has no identity folders with image files "
                     f"(expected <root>/<identity>/<image files>)")
  return out


def _open_checked(path: str) -> Image.Image:
  img = Image.open(path)
  # Image.open itself only refuses images above 2x the limit (and merely warns
  # above 1x, through a process-global warning); refuse the whole range here.
  limit = Image.MAX_IMAGE_PIXELS
  if limit and img.size[0] * img.size[1] > limit:
    img.close()
    raise Image.DecompressionBombError(
        f"{img.size[0]}x{img.size[1]} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS={limit} "
        "(possible decompression bomb)")
  return img


def _load_one(path: str, mode: str, size_hw: tuple[int, int] | None) -> np.ndarray:
  with _open_checked(path) as img:
    if size_hw is not None and img.format == "JPEG":
      # Lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller.
      img.draft(mode, (size_hw[1], size_hw[0]))
    return conform_image(img, mode, size_hw)


# What a corrupt, truncated or oversized file raises inside PIL.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageFolderSource(ImageSource):
  """All images of ``<root>/<identity>/<image files>``, decoded into memory.

  Identities are the sub-folders of ``root`` in natural name order (s1, s2, ...,
  s10); images within a folder are in natural file-name order.

  Args:
    root: folder path; ``$JAXFACE_DATA``, other environment variables and ``~``
      are expanded.
    image_size: (H, W) to resize every image to; default: the size of the first
      image, and every other image must have that size.
    channels: 1 (grayscale) or 3 (RGB); images are converted as needed.
    on_error: "warn" to log and skip unreadable images, "raise" to fail.
    min_images: identities with fewer readable images are left out.
    num_threads: decoding threads (default: CPU count, at most 8).
    align: "none", or "dlib": each image becomes the aligned face chip of its
      best face (``jaxface.data.align``: dlib's pretrained detector and 5-point
      landmarks), resized to ``image_size`` (required then); cached on disk.
    align_padding: chip padding with ``align="dlib"`` (0.25: eyebrows to chin).

  Attributes (besides ``ImageSource``'s):
    images: [N, H, W, C] uint8.
    paths: file path of each image, [N] list of str.
    skipped: (path, reason) of each unreadable image that was skipped.
    align_missed: with ``align``, paths where no face was found (their centre
      square crop is used instead).
  """

  def __init__(
      self,
      root: str | os.PathLike,
      image_size: tuple[int, int] | None = None,
      channels: int = 3,
      on_error: str = "warn",
      min_images: int = 1,
      num_threads: int | None = None,
      align: str = "none",
      align_padding: float = 0.25,
  ):
    mode = check_channels(channels)
    size_hw = check_size(image_size)
    align_lib.check_method(align)
    load = _load_one
    if align != "none":
      if size_hw is None:
        raise ValueError(f"align={align!r} needs image_size=(H, W)")
      aligner = align_lib.Aligner(size_hw, channels=channels, padding=align_padding)
      load = lambda path, _mode, _size: aligner(path)  # noqa: E731
      num_threads = 1  # one detector, run sequentially (most images come from the cache)
    if on_error not in ("warn", "raise"):
      raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 1:
      raise ValueError(f"min_images must be a positive integer, got {min_images!r}")
    self.root = paths.expand(os.fspath(root))
    listing = list_image_folder(self.root)
    files = [f for _, fs in listing for f in fs]
    file_label = np.concatenate([np.full(len(fs), i, np.int32) for i, (_, fs) in enumerate(listing)])

    self.skipped: list[tuple[str, str]] = []
    self.align_missed: list[str] = []

    def fail(path: str, err: BaseException) -> None:
      reason = f"{type(err).__name__}: {err}"
      if on_error == "raise":
        raise ValueError(f"cannot read image {path!r}: {reason}") from err
      _log.warning("skipping unreadable image %s: %s", path, reason)
      self.skipped.append((path, reason))

    threads = num_threads or min(8, os.cpu_count() or 1)
    arrays: list[np.ndarray | None] = [None] * len(files)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
    try:
      futures = [pool.submit(load, f, mode, size_hw) for f in files]
      for i, fut in enumerate(futures):
        try:
          arrays[i] = fut.result()
        except _DECODE_ERRORS as err:
          fail(files[i], err)
    finally:
      # After an error in "raise" mode, don't decode the rest.
      pool.shutdown(wait=True, cancel_futures=True)
    if align != "none":
      self.align_missed = list(aligner.missed)
      _log.info("aligned %d images (%d from the cache); no face found in %d%s",
                len(files), aligner.cache_hits, len(aligner.missed),
                f", e.g. {aligner.missed[0]}" if aligner.missed else "")
    ok = [i for i, a in enumerate(arrays) if a is not None]
    if not ok:
      raise ValueError(f"no readable images under {self.root!r} "
                       f"({len(self.skipped)} unreadable, e.g. {self.skipped[0][0]!r})")
    shape = arrays[ok[0]].shape
    for i in ok:
      if arrays[i].shape != shape:
        raise ValueError(
            f"image {files[i]!r} has shape (H, W, C)={arrays[i].shape} but {files[ok[0]]!r} has "
            f"{shape}; pass image_size=(H, W) to resize all images to one size")

    ok = np.asarray(ok, dtype=np.int64)
    old_labels = file_label[ok]
    counts = np.bincount(old_labels, minlength=len(listing))
    keep_ids = np.flatnonzero(counts >= min_images)
    dropped = [(listing[i][0], int(counts[i])) for i in np.flatnonzero((counts < min_images) & (counts > 0))]
    if dropped:
      _log.info("leaving out %d identities with fewer than min_images=%d images", len(dropped), min_images)
    if keep_ids.size == 0:
      raise ValueError(f"no identity under {self.root!r} has min_images={min_images} readable images")
    new_label_of = np.full(len(listing), -1, np.int64)
    new_label_of[keep_ids] = np.arange(keep_ids.size)
    sel = ok[new_label_of[old_labels] >= 0]

    self.identity_names = [listing[i][0] for i in keep_ids]
    self.labels = new_label_of[file_label[sel]].astype(np.int32)
    self.paths = [files[i] for i in sel]
    self.images = np.stack([arrays[i] for i in sel]) if sel.size else np.zeros((0, *shape), np.uint8)
    self.image_shape = tuple(int(d) for d in shape)

  def _get(self, indices: np.ndarray) -> np.ndarray:
    return self.images[indices]
