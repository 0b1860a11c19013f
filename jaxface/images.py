"""Robust image loading for the face pipeline: anything reasonable -> uint8 [H, W, 3] RGB.

:func:`load_image` accepts a path, an open binary file object, a
``PIL.Image.Image`` or an array and returns a C-contiguous ``uint8 [H, W, 3]``
RGB array, with one set of conventions (EXIF orientation, grayscale, 16-bit,
float, alpha) for every caller, and a pixel limit checked before decoding
(:func:`default_max_pixels`). Bad input raises :class:`ImageError` (a
ValueError) naming the path; a missing file is a ``FileNotFoundError``.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DEFAULT_MAX_PIXELS", "MAX_PIXELS_ENV", "ImageError", "ImageTooLargeError",
           "default_max_pixels", "load_image"]

# PIL's hard decompression-bomb limit with its default settings (2 x 89,478,485).
DEFAULT_MAX_PIXELS = 178_956_970
# Overrides DEFAULT_MAX_PIXELS for callers that pass no max_pixels: a count, or "none".
MAX_PIXELS_ENV = "JAXFACE_MAX_IMAGE_PIXELS"


class _FromEnv:
  """load_image's default ``max_pixels``: :func:`default_max_pixels`, read at each call."""

  def __repr__(self) -> str:
    return "$" + MAX_PIXELS_ENV


_FROM_ENV: Any = _FromEnv()

# Serializes the rare calls that must lift PIL's global limit to honour a larger max_pixels.
_PIL_LIMIT_LOCK = threading.Lock()


class ImageError(ValueError):
  """An input is not a usable image (unreadable file, bad array shape/dtype/values)."""


class ImageTooLargeError(ImageError):
  """An image has more pixels than allowed (possible decompression bomb)."""


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def default_max_pixels() -> int | None:
  """The pixel limit of :func:`load_image` when none is passed.

  ``$JAXFACE_MAX_IMAGE_PIXELS`` when set (a positive integer; ``_`` and ``,``
  separators allowed; ``none`` = no limit), else :data:`DEFAULT_MAX_PIXELS`. The
  variable raises the limit without code, e.g. for every command line.

  Raises:
    ValueError: naming the variable, for a value that is neither.
  """
  value = os.environ.get(MAX_PIXELS_ENV, "").strip()
  if not value:
    return DEFAULT_MAX_PIXELS
  if value.lower() == "none":
    return None
  try:
    limit = int(value.replace("_", "").replace(",", ""))
  except ValueError:
    limit = 0
  if limit < 1:
    raise ValueError(f"${MAX_PIXELS_ENV}={value!r}: expected a positive number of pixels "
                     f"(default {DEFAULT_MAX_PIXELS:_}) or 'none' for no limit")
  return limit


def _how_to_allow(needed: int | None = None) -> str:
  """How to raise the limit to ``needed`` pixels (unknown: twice the default)."""
  larger = f"{needed or 2 * DEFAULT_MAX_PIXELS:_}"
  return (f"to allow it, set the environment variable {MAX_PIXELS_ENV}={larger} (or 'none' "
          f"for no limit), e.g. `{MAX_PIXELS_ENV}={larger} python -m experiments.faces ...`, or "
          f"pass max_pixels=... to load_image")


def load_image(src: Any, *, max_pixels: int | None = _FROM_ENV) -> np.ndarray:
  """Loads `src` as an RGB image.

  Conventions, chosen once so every caller sees the same pixels:

  * **EXIF orientation** (tag 0x0112) is applied to files and PIL images with
    ``PIL.ImageOps.exif_transpose``, so a phone photo comes out upright. Arrays
    carry no EXIF and are taken as they are.
  * **Grayscale** (modes ``1``, ``L``, ``I;16*``, ``I``, ``F`` and 2-D or
    ``[H, W, 1]`` arrays) is replicated to three equal channels.
  * **16-bit** data (``I;16*`` modes, ``uint16`` arrays) keep their 8 most
    significant bits (``v >> 8``): the full 16-bit range maps onto the full 8-bit
    range, instead of clipping everything above 255 to white. PIL already reads
    16-bit-per-channel RGB PNGs as 8-bit RGB this way. Mode ``I`` (32-bit signed,
    how some readers hand out 16-bit data) is treated as 16-bit: values are
    clipped to [0, 65535], then ``>> 8``.
  * **Float** data (mode ``F``, float arrays) must be finite and within [0, 1];
    it maps to ``round(v * 255)``. Anything else is a ValueError (no guessing
    whether 1.0 means "white" or "almost black").
  * **Alpha** (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour,
    ``[H, W, 4]`` / ``[H, W, 2]`` arrays) is composited on **black**:
    ``round(c * a / 255)``. A fully transparent pixel is black whatever colour it
    hides (often undefined garbage), and this is what dlib's own loader yields
    when it assigns an RGBA image to an RGB one.
  * **Other colour spaces** (``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, palette
    without transparency) go through PIL's ``convert("RGB")``.
  * **Multi-frame** files (GIF, TIFF) give their first frame.

  Safety: a file or PIL image larger than ``max_pixels`` is refused *before*
  any pixel is decoded; PIL's ``DecompressionBombWarning`` (emitted from half
  the default limit) never escapes, the explicit limit replaces it. Truncated
  files are only detected while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False
  (PIL's default; this module never changes it).

  Args:
    src: a path (``str`` / ``os.PathLike``), a binary file object (with
      ``read``), a ``PIL.Image.Image``, or an array ``[H, W]``, ``[H, W, 1]``,
      ``[H, W, 2]`` (gray + alpha), ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA)
      of dtype uint8, uint16 (>> 8), bool (0/255) or float in [0, 1].
    max_pixels: largest accepted ``H * W`` for files and PIL images, checked
      from the header before decoding; None = no limit. Arrays are already in
      memory and are not limited. Default: :func:`default_max_pixels`
      (``$JAXFACE_MAX_IMAGE_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`).

  Returns:
    ``uint8 [H, W, 3]`` RGB, C-contiguous. A ``uint8 [H, W, 3]`` array input is
    returned without a copy when it is already C-contiguous.

  Raises:
    ImageTooLargeError: more than `max_pixels` pixels.
    ImageError (ValueError): unreadable / truncated / non-image file, bad array
      shape, dtype or values (NaN, float outside [0, 1]), unsupported type.
    FileNotFoundError: `src` is a path that does not exist.
  """
  if max_pixels is _FROM_ENV:
    max_pixels = default_max_pixels()
  if max_pixels is not None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
      raise ValueError(f"max_pixels: expected a positive int or None, got {max_pixels!r}")
    max_pixels = int(max_pixels)
  if isinstance(src, (str, os.PathLike)):
    path = os.fspath(src)
    return _load_file(path, path, max_pixels)
  if isinstance(src, Image.Image):
    name = getattr(src, "filename", "") or "<PIL image>"
    _check_size(src.size, max_pixels, name)
    try:
      return _from_pil(src, name)
    except (OSError, SyntaxError) as e:  # a lazily opened PIL image decodes here
      raise ImageError(f"{name}: cannot decode image: {e}") from e
  if hasattr(src, "read"):
    return _load_file(getattr(src, "name", None) or "<file object>", src, max_pixels)
  if isinstance(src, bytes):
    raise ImageError("src: got bytes; wrap encoded image data in io.BytesIO, or pass a path")
  if isinstance(src, np.ndarray) or hasattr(src, "__array__"):
    return _from_array(np.asarray(src), "array")
  raise ImageError(f"src: expected a path, file object, PIL image or array, got {type(src).__name__}")


# --------------------------------------------------------------------------
# Files and PIL images
# --------------------------------------------------------------------------


def _check_size(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
  w, h = size
  if w <= 0 or h <= 0:
    raise ImageError(f"{name}: empty image ({w}x{h})")
  if max_pixels is not None and w * h > max_pixels:
    raise ImageTooLargeError(
        f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
        f"(possible decompression bomb); {_how_to_allow(w * h)}")


def _open(fp: Any, max_pixels: int | None) -> Image.Image:
  """Image.open with PIL's own bomb check subordinated to `max_pixels`."""
  with warnings.catch_warnings():
    # Our explicit check after opening replaces PIL's warning.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    pil_hard = Image.MAX_IMAGE_PIXELS and 2 * Image.MAX_IMAGE_PIXELS
    if pil_hard and (max_pixels is None or max_pixels > pil_hard):
      # The caller allows more than PIL would open: lift PIL's global limit for
      # the header parse only (decoding happens later, outside the lock).
      with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
          return Image.open(fp)
        finally:
          Image.MAX_IMAGE_PIXELS = saved
    return Image.open(fp)


def _load_file(name: str, fp: Any, max_pixels: int | None) -> np.ndarray:
  if isinstance(fp, str):
    if not os.path.exists(fp):
      raise FileNotFoundError(f"{name}: no such file")
    if os.path.isdir(fp):
      raise ImageError(f"{name}: is a directory, not an image file")
  try:
    im = _open(fp, max_pixels)
  except Image.DecompressionBombError as e:
    size = re.search(r"\((\d+) pixels\)", str(e))  # PIL: "Image size (N pixels) exceeds ..."
    raise ImageTooLargeError(f"{name}: {e}; {_how_to_allow(int(size[1]) if size else None)}") from e
  except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
    raise ImageError(f"{name}: not a readable image file: {e}") from e
  try:
    with im:
      _check_size(im.size, max_pixels, name)
      try:
        im.load()
      except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: cannot decode image (truncated or corrupt file?): {e}") from e
      return _from_pil(im, name)
  except ImageError:
    raise
  except (OSError, SyntaxError, EOFError) as e:
    raise ImageError(f"{name}: cannot decode image: {e}") from e


def _from_pil(im: Image.Image, name: str) -> np.ndarray:
  try:
    im = ImageOps.exif_transpose(im)
  except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error) as e:
    raise ImageError(f"{name}: corrupt EXIF data, cannot apply its orientation: {e}") from e
  mode = im.mode
  if mode in ("RGB", "L", "LA", "RGBA"):
    pass
  elif mode == "1":
    im = im.convert("L")
  elif mode in ("P", "PA"):
    has_alpha = mode == "PA" or "transparency" in im.info
    im = im.convert("RGBA" if has_alpha else "RGB")
  elif mode in ("RGBa", "RGBX"):
    im = im.convert("RGBA" if mode == "RGBa" else "RGB")
  elif mode == "La":
    im = im.convert("LA")
  elif mode.startswith("I;16"):
    # Byte order handled by numpy ('>u2' for I;16B); >> 8 happens in _from_array.
    return _from_array(np.asarray(im).astype(np.uint16), name)
  elif mode == "I":
    arr = np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.uint16)
    return _from_array(arr, name)
  elif mode == "F":
    return _from_array(np.asarray(im, dtype=np.float32), name)
  else:  # CMYK, YCbCr, LAB, HSV and anything PIL adds later
    try:
      im = im.convert("RGB")
    except (ValueError, OSError) as e:
      raise ImageError(f"{name}: cannot convert PIL mode {mode!r} to RGB: {e}") from e
  return _from_array(np.asarray(im), name)


# --------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------


def _to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
  """Any supported dtype -> uint8 with the same shape."""
  dt = arr.dtype
  if dt == np.uint8:
    return arr
  if dt == np.bool_:
    return arr.astype(np.uint8) * np.uint8(255)
  if dt == np.uint16:
    return (arr >> 8).astype(np.uint8)
  if np.issubdtype(dt, np.floating):
    if not np.isfinite(arr).all():
      raise ImageError(f"{name}: float image contains NaN or inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
      raise ImageError(f"{name}: float image values must lie in [0, 1], got [{lo:g}, {hi:g}] "
                       f"(divide by 255 for 8-bit data, or pass uint8)")
    return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
  raise ImageError(f"{name}: unsupported dtype {dt}; expected uint8, uint16, bool or float in [0, 1]")


def _composite_on_black(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """round(color * alpha / 255) in exact integer arithmetic, uint8."""
  c = color.astype(np.uint32)
  a = alpha.astype(np.uint32)[..., None]
  return ((2 * c * a + 255) // 510).astype(np.uint8)


def _from_array(arr: np.ndarray, name: str) -> np.ndarray:
  if arr.ndim not in (2, 3):
    raise ImageError(f"{name}: expected shape [H, W] or [H, W, C], got {arr.shape}")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ImageError(f"{name}: empty image, shape {arr.shape}")
  if arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4):
    raise ImageError(f"{name}: expected 1, 2, 3 or 4 channels last, got shape {arr.shape}")
  u8 = _to_uint8(arr, name)
  if u8.ndim == 2:
    u8 = u8[:, :, None]
  c = u8.shape[2]
  if c == 2:
    u8 = _composite_on_black(u8[:, :, :1], u8[:, :, 1])
  elif c == 4:
    u8 = _composite_on_black(u8[:, :, :3], u8[:, :, 3])
  if u8.shape[2] == 1:
    u8 = np.broadcast_to(u8, u8.shape[:2] + (3,))
  return np.ascontiguousarray(u8)
