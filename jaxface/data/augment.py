"""Jitted per-image augmentation on device: random crop, flip, brightness, contrast.

Everything here is shape-static: crop size and the jitter strengths are Python
constants (static under jit), so a training loop compiles the augmentation once.
Each image gets its own key (``jax.random.split(rng, B)``), so ``augment`` on a
batch equals ``augment_single`` applied image by image with those keys.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def to_float(images) -> jax.Array:
  """uint8 pixels to float32 in [0, 1]. [..., H, W, C] uint8 -> same shape float32."""
  if np.dtype(images.dtype) != np.uint8:
    raise ValueError(f"to_float expects uint8 images, got dtype {images.dtype}")
  return jnp.asarray(images, jnp.float32) / 255.0


def _check_crop(image_hw: Sequence[int], crop_size, name: str = "crop_size") -> tuple[int, int]:
  try:
    ch, cw = (int(c) for c in crop_size)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a pair (height, width), got {crop_size!r}") from None
  h, w = int(image_hw[0]), int(image_hw[1])
  if not (1 <= ch <= h and 1 <= cw <= w):
    raise ValueError(f"{name}={(ch, cw)} does not fit in images of size (H, W)={(h, w)}")
  return ch, cw


def center_crop(images, crop_size: tuple[int, int]):
  """Central crop for evaluation (offsets rounded down, as in the random crop's middle).

  Args:
    images: [B, H, W, C] (NumPy or JAX, any dtype).
    crop_size: (crop_h, crop_w) <= (H, W).

  Returns:
    [B, crop_h, crop_w, C], same array type and dtype.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  ch, cw = _check_crop(images.shape[1:3], crop_size)
  oy = (images.shape[1] - ch) // 2
  ox = (images.shape[2] - cw) // 2
  return images[:, oy:oy + ch, ox:ox + cw, :]


def crop_at(images: jax.Array, offsets: jax.Array, crop_size: tuple[int, int]) -> jax.Array:
  """Per-image crops at given offsets.

  Args:
    images: [B, H, W, C].
    offsets: [B, 2] int32 (top, left) of each crop; clamped by
      ``lax.dynamic_slice`` so the crop stays inside the image.
    crop_size: (crop_h, crop_w) <= (H, W).

  Returns:
    [B, crop_h, crop_w, C], same dtype as images.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if offsets.shape != (images.shape[0], 2):
    raise ValueError(f"offsets must be [B, 2] = {(images.shape[0], 2)}, got {offsets.shape}")
  ch, cw = _check_crop(images.shape[1:3], crop_size)
  c = images.shape[3]

  def one(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (ch, cw, c))

  return jax.vmap(one)(images, jnp.asarray(offsets, jnp.int32))


def augment_single(
    rng: jax.Array,
    image: jax.Array,
    *,
    crop_size: tuple[int, int],
    flip: bool = True,
    brightness: float = 0.2,
    contrast: float = 0.2,
    scale: float = 0.0,
    rotate: float = 0.0,
    erase: float = 0.0,
) -> jax.Array:
  """Augments one image. [H, W, C] float32 in [0, 1] -> [crop_h, crop_w, C] float32 in [0, 1].

  Random crop at a uniform offset; with ``scale`` or ``rotate`` the crop is
  resampled (bilinear, edge pixels repeated) through a zoom by
  s ~ U(1 - scale, 1 + scale) and a rotation by U(-rotate, rotate) degrees
  about the crop's centre; horizontal flip with probability 1/2 (if
  ``flip``); brightness: add delta ~ U(-brightness, brightness); contrast:
  scale each channel's deviation from its mean by f ~ U(1 - contrast, 1 + contrast);
  then clip to [0, 1]; finally, with probability ``erase``, random erasing
  (Zhong et al. 2017): a rectangle of 2-25% of the crop with aspect ratio
  1/3..3 is filled with uniform noise, so no single face region decides.
  A strength of 0 turns that step off.
  """
  if image.ndim != 3:
    raise ValueError(f"image must be [H, W, C], got shape {image.shape}")
  h, w, c = image.shape
  ch, cw = _check_crop((h, w), crop_size)
  k_y, k_x, k_flip, k_b, k_c = jax.random.split(rng, 5)
  oy = jax.random.randint(k_y, (), 0, h - ch + 1)
  ox = jax.random.randint(k_x, (), 0, w - cw + 1)
  if scale or rotate:
    out = _affine_crop(jax.random.fold_in(rng, 1), image, oy, ox, (ch, cw), scale, rotate)
  else:
    out = jax.lax.dynamic_slice(image, (oy, ox, 0), (ch, cw, c))
  if flip:
    out = jnp.where(jax.random.bernoulli(k_flip), out[:, ::-1, :], out)
  if brightness:
    out = out + jax.random.uniform(k_b, (), out.dtype, -brightness, brightness)
  if contrast:
    factor = jax.random.uniform(k_c, (), out.dtype, 1.0 - contrast, 1.0 + contrast)
    mean = jnp.mean(out, axis=(0, 1), keepdims=True)
    out = mean + factor * (out - mean)
  out = jnp.clip(out, 0.0, 1.0)
  if erase:
    out = _random_erase(jax.random.fold_in(rng, 2), out, erase)
  return out


def _random_erase(rng, image, prob):
  """[h, w, C] -> same: one random rectangle replaced by U(0, 1) noise with probability ``prob``."""
  h, w, c = image.shape
  k_p, k_a, k_r, k_y, k_x, k_n = jax.random.split(rng, 6)
  area = jax.random.uniform(k_a, (), jnp.float32, 0.02, 0.25) * h * w
  aspect = jnp.exp(jax.random.uniform(k_r, (), jnp.float32, -jnp.log(3.0), jnp.log(3.0)))
  eh = jnp.clip(jnp.sqrt(area * aspect), 1, h)
  ew = jnp.clip(jnp.sqrt(area / aspect), 1, w)
  y0 = jax.random.uniform(k_y, (), jnp.float32, 0, 1) * (h - eh)
  x0 = jax.random.uniform(k_x, (), jnp.float32, 0, 1) * (w - ew)
  yy = jnp.arange(h, dtype=jnp.float32)[:, None, None]
  xx = jnp.arange(w, dtype=jnp.float32)[None, :, None]
  inside = (yy >= y0) & (yy < y0 + eh) & (xx >= x0) & (xx < x0 + ew)
  inside = inside & jax.random.bernoulli(k_p, prob)
  return jnp.where(inside, jax.random.uniform(k_n, image.shape, image.dtype), image)


def _affine_crop(rng, image, oy, ox, crop_hw, scale, rotate):
  """[H, W, C] -> [ch, cw, C]: the crop at (oy, ox), zoomed and rotated about its centre."""
  ch, cw = crop_hw
  k_s, k_r = jax.random.split(rng)
  s = jax.random.uniform(k_s, (), jnp.float32, 1.0 - scale, 1.0 + scale)
  theta = jnp.deg2rad(jax.random.uniform(k_r, (), jnp.float32, -rotate, rotate))
  yy, xx = jnp.meshgrid(jnp.arange(ch, dtype=jnp.float32) - (ch - 1) / 2,
                        jnp.arange(cw, dtype=jnp.float32) - (cw - 1) / 2, indexing="ij")
  cos, sin = jnp.cos(theta) / s, jnp.sin(theta) / s
  src_y = oy + (ch - 1) / 2 + cos * yy - sin * xx
  src_x = ox + (cw - 1) / 2 + sin * yy + cos * xx
  sample = lambda plane: jax.scipy.ndimage.map_coordinates(plane, [src_y, src_x], order=1,
                                                           mode="nearest")
  return jax.vmap(sample, in_axes=2, out_axes=2)(image)


@functools.partial(jax.jit, static_argnames=("crop_size", "flip", "brightness", "contrast",
                                             "scale", "rotate", "erase"))
def _augment_jit(rng, images, *, crop_size, flip, brightness, contrast, scale, rotate, erase):
  keys = jax.random.split(rng, images.shape[0])
  one = functools.partial(augment_single, crop_size=crop_size, flip=flip,
                          brightness=brightness, contrast=contrast, scale=scale, rotate=rotate,
                          erase=erase)
  return jax.vmap(one)(keys, images)


def augment(
    rng: jax.Array,
    images: jax.Array,
    *,
    crop_size: tuple[int, int],
    flip: bool = True,
    brightness: float = 0.2,
    contrast: float = 0.2,
    scale: float = 0.0,
    rotate: float = 0.0,
    erase: float = 0.0,
) -> jax.Array:
  """Per-image random augmentation of a batch (jitted; see ``augment_single``).

  Args:
    rng: PRNG key; image i uses ``jax.random.split(rng, B)[i]``.
    images: [B, H, W, C] float32 in [0, 1] (see ``to_float``).
    crop_size: (crop_h, crop_w) <= (H, W).
    flip: random horizontal flips.
    brightness: max additive brightness change (0 = off).
    contrast: max relative contrast change (0 = off).
    scale: max relative zoom, in [0, 0.5] (0 = off).
    rotate: max rotation in degrees, in [0, 45] (0 = off).
    erase: probability of random erasing, in [0, 1] (0 = off).

  Returns:
    [B, crop_h, crop_w, C] float32 in [0, 1].
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be float in [0, 1] (use to_float), got dtype {images.dtype}")
  if not 0.0 <= float(brightness) <= 1.0:
    raise ValueError(f"brightness must be in [0, 1], got {brightness}")
  # A factor range reaching 0 could flatten an image completely.
  if not 0.0 <= float(contrast) < 1.0:
    raise ValueError(f"contrast must be in [0, 1), got {contrast}")
  if not 0.0 <= float(scale) <= 0.5:
    raise ValueError(f"scale must be in [0, 0.5], got {scale}")
  if not 0.0 <= float(rotate) <= 45.0:
    raise ValueError(f"rotate must be in [0, 45] degrees, got {rotate}")
  if not 0.0 <= float(erase) <= 1.0:
    raise ValueError(f"erase must be a probability in [0, 1], got {erase}")
  crop = _check_crop(images.shape[1:3], crop_size)
  return _augment_jit(rng, images, crop_size=crop, flip=bool(flip),
                      brightness=float(brightness), contrast=float(contrast),
                      scale=float(scale), rotate=float(rotate), erase=float(erase))
