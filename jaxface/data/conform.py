"""Decoded images brought to one channel count and size (shared by the image sources and alignment).

``conform_array`` converts a uint8 image array to 1 (luminance) or 3 (RGB)
channels and optionally resizes it (bilinear, antialiased when shrinking);
``check_channels`` and ``check_size`` validate the settings every image
source takes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_MODES = {1: "L", 3: "RGB"}


def check_channels(channels) -> str:
  """1 or 3 -> the PIL mode ("L" or "RGB"); anything else is a ValueError."""
  if channels not in _MODES:
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  return _MODES[channels]


def check_size(image_size, name: str = "image_size") -> tuple[int, int] | None:
  """(height, width) as two positive ints, or None when ``image_size`` is None."""
  if image_size is None:
    return None
  try:
    h, w = (int(s) for s in image_size)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be (height, width), got {image_size!r}") from None
  if h < 1 or w < 1:
    raise ValueError(f"{name} must be positive, got {(h, w)}")
  return h, w


def conform_image(img: Image.Image, mode: str, size_hw: tuple[int, int] | None) -> np.ndarray:
  """PIL image -> [H, W, C] uint8 in ``mode`` ("L" or "RGB"), resized if asked."""
  if img.mode != mode:
    img = img.convert(mode)
  if size_hw is not None and img.size != (size_hw[1], size_hw[0]):
    # PIL's bilinear filter widens with the scale factor, so downscaling is antialiased.
    img = img.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
  arr = np.asarray(img, dtype=np.uint8)
  return arr[..., None] if arr.ndim == 2 else arr


def conform_array(image: np.ndarray, channels: int = 3,
                  image_size: tuple[int, int] | None = None) -> np.ndarray:
  """Converts a decoded image array to ``channels`` and optionally resizes it.

  Args:
    image: [H, W] or [H, W, C] uint8 with C in {1, 3, 4} (alpha is dropped).
    channels: 1 (luminance, ITU-R 601-2 as PIL's "L") or 3 (RGB).
    image_size: optional (H, W) to resize to (bilinear, antialiased).

  Returns:
    [H', W', channels] uint8.
  """
  mode = check_channels(channels)
  size_hw = check_size(image_size)
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    raise ValueError(f"image must be uint8, got dtype {arr.dtype}")
  if arr.ndim == 3 and arr.shape[2] == 1:
    arr = arr[..., 0]
  if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
    raise ValueError(f"image must be [H, W] or [H, W, 1|3|4], got shape {np.shape(image)}")
  if arr.ndim == 2 and mode == "L" and (size_hw is None or size_hw == arr.shape):
    return arr[..., None].copy()
  if arr.ndim == 3 and arr.shape[2] == 3 and mode == "RGB" and (size_hw is None or size_hw == arr.shape[:2]):
    return arr.copy()
  return conform_image(Image.fromarray(arr), mode, size_hw)
