"""Receptive-field crops and grid PNGs (NumPy + PIL).

``crop`` cuts a unit's receptive field out of an image, filling the part
that lies outside the image with a constant (gray by default), so every
patch of a layer has the layer's full field size and the position of the
content inside the patch shows where the field hung over the border.
``grid`` tiles patches as ``units x k`` cells; ``save_grid`` writes a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

GRAY = 128


def crop(image: np.ndarray, box: Sequence[tuple[int, int]], fill: int = GRAY) -> np.ndarray:
  """Pixels of ``image`` inside ``box``, padded with ``fill`` outside the image.

  Args:
    image: ``[H, W, C]`` uint8.
    box: ``((y0, y1), (x0, x1))`` inclusive pixel ranges; may extend past
      the image on any side.
    fill: value for pixels outside the image, 0..255.

  Returns:
    ``[y1 - y0 + 1, x1 - x0 + 1, C]`` uint8.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be [H, W, C] uint8, got shape {image.shape} dtype {image.dtype}")
  if len(box) != 2 or any(len(b) != 2 or b[1] < b[0] for b in box):
    raise ValueError(f"box must be ((y0, y1), (x0, x1)) with y0 <= y1, x0 <= x1; got {box!r}")
  if not 0 <= fill <= 255:
    raise ValueError(f"fill must be in [0, 255], got {fill}")
  (y0, y1), (x0, x1) = ((int(a), int(b)) for a, b in box)
  h, w, c = image.shape
  out = np.full((y1 - y0 + 1, x1 - x0 + 1, c), fill, np.uint8)
  sy0, sy1 = max(y0, 0), min(y1, h - 1)
  sx0, sx1 = max(x0, 0), min(x1, w - 1)
  if sy0 <= sy1 and sx0 <= sx1:
    out[sy0 - y0:sy1 - y0 + 1, sx0 - x0:sx1 - x0 + 1] = image[sy0:sy1 + 1, sx0:sx1 + 1]
  return out


def _fit(patch: np.ndarray, cell: int) -> Image.Image:
  """Patch -> ``cell x cell`` RGB image: integer nearest-neighbour upscaling keeps small fields crisp."""
  img = Image.fromarray(patch[..., 0] if patch.shape[2] == 1 else patch).convert("RGB")
  h, w = patch.shape[:2]
  scale = cell / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX
  img = img.resize(size, resample)
  canvas = Image.new("RGB", (cell, cell), (255, 255, 255))
  canvas.paste(img, ((cell - size[0]) // 2, (cell - size[1]) // 2))
  return canvas


def grid(patches: Sequence[Sequence[np.ndarray | None]], cell: int = 64, gap: int = 2,
         row_labels: Sequence[str] | None = None, title: str | None = None) -> Image.Image:
  """Tiles ``rows x cols`` patches into one image.

  Args:
    patches: rows of ``[h, w, C]`` uint8 patches (C 1 or 3); ``None`` leaves a
      cell blank (a unit with fewer than k images).
    cell: side of each cell in pixels; patches are scaled to fit.
    gap: white pixels between cells.
    row_labels: optional text drawn left of each row (e.g. "unit 17").
    title: optional text drawn above the grid.

  Returns:
    RGB PIL image.
  """
  if cell < 4 or gap < 0:
    raise ValueError(f"cell must be >= 4 and gap >= 0, got cell={cell}, gap={gap}")
  rows = len(patches)
  cols = max((len(r) for r in patches), default=0)
  if rows == 0 or cols == 0:
    raise ValueError("patches must hold at least one row with one patch")
  if row_labels is not None and len(row_labels) != rows:
    raise ValueError(f"row_labels has {len(row_labels)} entries for {rows} rows")
  label_w = 0 if row_labels is None else 8 + 6 * max(len(s) for s in row_labels)
  title_h = 0 if title is None else 16
  width = label_w + cols * cell + (cols + 1) * gap
  height = title_h + rows * cell + (rows + 1) * gap
  out = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(out)
  if title is not None:
    draw.text((gap, 2), title, fill=(0, 0, 0))
  for r, row in enumerate(patches):
    top = title_h + gap + r * (cell + gap)
    if row_labels is not None:
      draw.text((2, top + cell // 2 - 5), row_labels[r], fill=(0, 0, 0))
    for c, patch in enumerate(row):
      if patch is None:
        continue
      patch = np.asarray(patch)
      if patch.ndim != 3 or patch.shape[2] not in (1, 3) or patch.dtype != np.uint8:
        raise ValueError(f"patch ({r}, {c}) must be [h, w, 1|3] uint8, got shape {patch.shape} "
                         f"dtype {patch.dtype}")
      out.paste(_fit(patch, cell), (label_w + gap + c * (cell + gap), top))
  return out


def clip_box(box: Sequence[tuple[int, int]], size_hw: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """``box`` (inclusive ranges per axis) intersected with an image of ``size_hw``.

  Raises ValueError when they do not overlap (a field always touches its image).
  """
  out = tuple((max(lo, 0), min(hi, n - 1)) for (lo, hi), n in zip(box, size_hw))
  if any(lo > hi for lo, hi in out):
    raise ValueError(f"box {tuple(box)} lies outside an image of size {tuple(size_hw)}")
  return out


def center_cell(box, jump, shown) -> tuple[tuple[int, int], ...]:
  """The ``jump``-sized cell around ``box``'s centre, in the coordinates of the crop ``shown``.

  A unit's neighbours are ``jump`` pixels apart, so this cell is the part of
  the image only this unit is centred on; clipped to the crop.
  """
  out = []
  for (lo, hi), j, (slo, shi) in zip(box, jump, shown):
    c0 = (lo + hi + 1) // 2 - j // 2
    a, b = max(c0, slo), min(c0 + j - 1, shi)
    out.append((a - slo, max(a, b) - slo))
  return tuple(out)


def mark(patch: np.ndarray, cell, colour=(255, 0, 0)) -> np.ndarray:
  """Copy of ``patch`` (as RGB ``[h, w, 3]`` uint8) with a 1-pixel rectangle around ``cell``."""
  rgb = np.repeat(patch, 3, axis=2) if patch.shape[2] == 1 else patch.copy()
  (y0, y1), (x0, x1) = cell
  c = np.asarray(colour, np.uint8)
  rgb[y0, x0:x1 + 1] = c
  rgb[y1, x0:x1 + 1] = c
  rgb[y0:y1 + 1, x0] = c
  rgb[y0:y1 + 1, x1] = c
  return rgb
