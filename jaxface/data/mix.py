"""Extra training identities: procedural synthetic faces shaped like a real face set, appended to it.

With few real identities (30 on AT&T/ORL) a metric-learning network sees few
"different person" directions. ``with_synthetic`` appends procedurally drawn
identities (``jaxface.data.synthetic``; no outside data or weights) to the
training side only: rendered as squares, cropped around the face to the real
images' aspect ratio (so the face fills about as much of the frame as in a
cropped face photo) and resized to the real images' size and channels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from jaxface.data import synthetic
from jaxface.data.source import ArraySource, ImageSource


def synthetic_like(num_identities: int, images_per_identity: int, image_hw: tuple[int, int],
                   channels: int, seed: int = 0, face_fraction: float = 0.72) -> ArraySource:
  """Synthetic faces as ``[N, H, W, C] uint8`` with labels ``[N]`` (identity-major).

  Args:
    num_identities, images_per_identity: counts (>= 1).
    image_hw: (H, W) of the output images.
    channels: 1 or 3.
    seed: synthetic identity seed (non-negative).
    face_fraction: height of the centre crop as a fraction of the rendered
      square, in (0, 1]; its width follows the aspect ratio W / H.
  """
  h, w = (int(v) for v in image_hw)
  if h < 1 or w < 1:
    raise ValueError(f"image_hw must be positive (H, W), got {image_hw}")
  if not 0.0 < face_fraction <= 1.0:
    raise ValueError(f"face_fraction must be in (0, 1], got {face_fraction}")
  size = max(64, 2 * max(h, w))
  src = synthetic.synthetic_faces(num_identities, images_per_identity, image_size=size,
                                  channels=channels, seed=seed)
  ch = min(size, max(1, int(round(face_fraction * size))))
  cw = min(size, max(1, int(round(ch * w / h))))
  top, left = (size - ch) // 2, (size - cw) // 2
  crops = src.images[:, top:top + ch, left:left + cw]
  mode = "L" if channels == 1 else "RGB"
  out = np.stack([
      np.asarray(Image.fromarray(c[..., 0] if channels == 1 else c, mode).resize(
          (w, h), Image.Resampling.BILINEAR), np.uint8).reshape(h, w, channels)
      for c in crops])
  return ArraySource(out, src.labels, src.identity_names)


def concat_sources(first: ImageSource, second: ImageSource) -> ArraySource:
  """All images of ``first`` then ``second``; ``second``'s labels come after ``first``'s identities.

  Both must hold images of one shape. Identity names must not collide.
  """
  if tuple(first.image_shape) != tuple(second.image_shape):
    raise ValueError(f"image shapes differ: {first.image_shape} and {second.image_shape}")
  names = list(first.identity_names) + list(second.identity_names)
  if len(set(names)) != len(names):
    raise ValueError("identity names of the two sources collide")
  images = np.concatenate([first.get(np.arange(len(first))), second.get(np.arange(len(second)))])
  labels = np.concatenate([np.asarray(first.labels, np.int64),
                           np.asarray(second.labels, np.int64) + len(first.identity_names)])
  return ArraySource(images, labels, names)


def with_synthetic(train: ImageSource, num_identities: int, images_per_identity: int,
                   seed: int = 0) -> ArraySource:
  """``train`` plus ``num_identities`` synthetic identities of its image shape (see module doc)."""
  shape = tuple(train.image_shape)
  if len(shape) != 3:
    raise ValueError(f"extra synthetic identities need images [H, W, C], got image shape {shape}")
  extra = synthetic_like(num_identities, images_per_identity, shape[:2], shape[2], seed=seed)
  return concat_sources(train, extra)
