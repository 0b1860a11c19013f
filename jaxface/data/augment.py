"""Jitted per-image augmentation on device: random crop, flip, brightness, contrast.

Samples of any spatial rank are handled, channels last: images [H, W, C],
1-D signals [T, C] and 3-D volumes [D, H, W, C]; the rank is the length of
``crop_size``. Zoom/rotation and random erasing are image-only and rejected for
other ranks. Flipping a signal reverses time, which is rarely label-preserving:
the training config rejects it for 1-D.
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


_LAYOUT = {1: "[B, T, C]", 2: "[B, H, W, C]", 3: "[B, D, H, W, C]"}


def _crop_rank(crop_size, name: str = "crop_size") -> tuple[int, ...]:
  """``crop_size`` as a tuple of 1 to 3 ints (its length is the spatial rank)."""
  try:
    crop = tuple(int(c) for c in crop_size)
  except (TypeError, ValueError):
    crop = ()
  if not 1 <= len(crop) <= 3:
    raise ValueError(f"{name} must be a pair (height, width), or (T,) for signals or (D, H, W) "
                     f"for volumes; got {crop_size!r}")
  return crop


def _check_batch(images, rank: int) -> None:
  if images.ndim != rank + 2:
    raise ValueError(f"images must be {_LAYOUT[rank]} for a crop_size of {rank} entries, "
                     f"got shape {tuple(images.shape)}")


def _check_crop(image_spatial: Sequence[int], crop_size, name: str = "crop_size") -> tuple[int, ...]:
  crop = _crop_rank(crop_size, name)
  spatial = tuple(int(n) for n in image_spatial)
  if len(spatial) != len(crop) or not all(1 <= c <= n for c, n in zip(crop, spatial)):
    what = "(H, W)" if len(spatial) == 2 else "spatial size"
    raise ValueError(f"{name}={crop} does not fit in images of {what}={spatial}")
  return crop


def center_crop(images, crop_size: tuple[int, ...]):
  """Central crop for evaluation (offsets rounded down, as in the random crop's middle).

  Args:
    images: [B, H, W, C] (or [B, T, C], [B, D, H, W, C]; NumPy or JAX, any dtype).
    crop_size: (crop_h, crop_w) <= (H, W) (or one entry per spatial axis).

  Returns:
    [B, crop_h, crop_w, C], same array type and dtype.
  """
  rank = len(_crop_rank(crop_size))
  _check_batch(images, rank)
  crop = _check_crop(images.shape[1:-1], crop_size)
  window = tuple(slice((n - c) // 2, (n - c) // 2 + c) for n, c in zip(images.shape[1:-1], crop))
  return images[(slice(None), *window, slice(None))]


def crop_at(images: jax.Array, offsets: jax.Array, crop_size: tuple[int, ...]) -> jax.Array:
  """Per-image crops at given offsets.

  Args:
    images: [B, H, W, C] (or [B, T, C], [B, D, H, W, C]).
    offsets: [B, 2] int32 (top, left) of each crop ([B, rank] in general);
      clamped by ``lax.dynamic_slice`` so the crop stays inside the image.
    crop_size: (crop_h, crop_w) <= (H, W) (or one entry per spatial axis).

  Returns:
    [B, crop_h, crop_w, C], same dtype as images.
  """
  rank = len(_crop_rank(crop_size))
  _check_batch(images, rank)
  if offsets.shape != (images.shape[0], rank):
    raise ValueError(f"offsets must be [B, {rank}] = {(images.shape[0], rank)}, got {offsets.shape}")
  crop = _check_crop(images.shape[1:-1], crop_size)
  c = images.shape[-1]

  def one(img, off):
    return jax.lax.dynamic_slice(img, (*(off[i] for i in range(rank)), 0), (*crop, c))

  return jax.vmap(one)(images, jnp.asarray(offsets, jnp.int32))


def augment_single(
    rng: jax.Array,
    image: jax.Array,
    *,
    crop_size: tuple[int, ...],
    flip: bool = True,
    brightness: float = 0.2,
    contrast: float = 0.2,
    scale: float = 0.0,
    rotate: float = 0.0,
    erase: float = 0.0,
    noise: float = 0.0,
) -> jax.Array:
  """Augments one image. [H, W, C] float32 in [0, 1] -> [crop_h, crop_w, C] float32 in [0, 1].

  Signals [T, C] and volumes [D, H, W, C] work the same way (crop, flip of
  the last spatial axis, brightness, contrast, noise); ``scale``, ``rotate``
  and ``erase`` are for images only.

  Random crop at a uniform offset; with ``scale`` or ``rotate`` the crop is
  resampled (bilinear, edge pixels repeated) through a zoom by
  s ~ U(1 - scale, 1 + scale) and a rotation by U(-rotate, rotate) degrees
  about the crop's centre; horizontal flip with probability 1/2 (if
  ``flip``); brightness: add delta ~ U(-brightness, brightness); contrast:
  scale each channel's deviation from its mean by f ~ U(1 - contrast, 1 + contrast);
  then clip to [0, 1]; finally, with probability ``erase``, random erasing
  (Zhong et al. 2017): a rectangle of 2-25% of the crop with aspect ratio
  1/3..3 is filled with uniform noise, so no single face region decides.
  With ``noise`` > 0, Gaussian noise of standard deviation ``noise`` is added
  to every value before the clip. A strength of 0 turns that step off.
  """
  rank = len(_crop_rank(crop_size))
  if image.ndim != rank + 1:
    layout = _LAYOUT[rank].replace("B, ", "")
    raise ValueError(f"image must be {layout}, got shape {image.shape}")
  if rank != 2 and (scale or rotate or erase):
    raise ValueError(f"scale, rotate and erase are image (2-D) augmentations; got scale={scale}, "
                     f"rotate={rotate}, erase={erase} for samples of spatial rank {rank}")
  spatial, c = image.shape[:-1], image.shape[-1]
  crop = _check_crop(spatial, crop_size)
  # For images this is split(rng, 5) -> (k_y, k_x, k_flip, k_b, k_c), as it always was.
  keys = jax.random.split(rng, rank + 3)
  k_flip, k_b, k_c = keys[rank:]
  offsets = [jax.random.randint(keys[i], (), 0, spatial[i] - crop[i] + 1) for i in range(rank)]
  if scale or rotate:
    out = _affine_crop(jax.random.fold_in(rng, 1), image, offsets[0], offsets[1], crop, scale,
                       rotate)
  else:
    out = jax.lax.dynamic_slice(image, (*offsets, 0), (*crop, c))
  if flip:
    out = jnp.where(jax.random.bernoulli(k_flip), jnp.flip(out, axis=rank - 1), out)
  if brightness:
    out = out + jax.random.uniform(k_b, (), out.dtype, -brightness, brightness)
  if contrast:
    factor = jax.random.uniform(k_c, (), out.dtype, 1.0 - contrast, 1.0 + contrast)
    mean = jnp.mean(out, axis=tuple(range(rank)), keepdims=True)
    out = mean + factor * (out - mean)
  if noise:
    out = out + noise * jax.random.normal(jax.random.fold_in(rng, 3), out.shape, out.dtype)
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
                                             "scale", "rotate", "erase", "noise"))
def _augment_jit(rng, images, *, crop_size, flip, brightness, contrast, scale, rotate, erase,
                 noise):
  keys = jax.random.split(rng, images.shape[0])
  one = functools.partial(augment_single, crop_size=crop_size, flip=flip,
                          brightness=brightness, contrast=contrast, scale=scale, rotate=rotate,
                          erase=erase, noise=noise)
  return jax.vmap(one)(keys, images)


def augment(
    rng: jax.Array,
    images: jax.Array,
    *,
    crop_size: tuple[int, ...],
    flip: bool = True,
    brightness: float = 0.2,
    contrast: float = 0.2,
    scale: float = 0.0,
    rotate: float = 0.0,
    erase: float = 0.0,
    noise: float = 0.0,
) -> jax.Array:
  """Per-image random augmentation of a batch (jitted; see ``augment_single``).

  Shape-static: crop size and the jitter strengths are Python constants (static
  under jit), so a training loop compiles the augmentation once. Each image gets
  its own key, so ``augment`` on a batch equals ``augment_single`` applied image by
  image with those keys.

  Args:
    rng: PRNG key; image i uses ``jax.random.split(rng, B)[i]``.
    images: [B, H, W, C] float32 in [0, 1] (see ``to_float``); or signals
      [B, T, C], volumes [B, D, H, W, C].
    crop_size: (crop_h, crop_w) <= (H, W); (T,) or (D, H, W) for signals
      or volumes: its length is the spatial rank.
    flip: random flips of the last spatial axis (horizontal for images).
    brightness: max additive brightness change (0 = off).
    contrast: max relative contrast change (0 = off).
    scale: max relative zoom, in [0, 0.5] (0 = off).
    rotate: max rotation in degrees, in [0, 45] (0 = off).
    erase: probability of random erasing, in [0, 1] (0 = off).
    noise: standard deviation of additive Gaussian noise, in [0, 0.5] (0 = off).

  Returns:
    [B, crop_h, crop_w, C] float32 in [0, 1] ([B, *crop_size, C] in general).
  """
  rank = len(_crop_rank(crop_size))
  _check_batch(images, rank)
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
  if not 0.0 <= float(noise) <= 0.5:
    raise ValueError(f"noise must be in [0, 0.5], got {noise}")
  if rank != 2 and (scale or rotate or erase):
    raise ValueError(f"scale, rotate and erase are image (2-D) augmentations; got scale={scale}, "
                     f"rotate={rotate}, erase={erase} for samples of spatial rank {rank}")
  crop = _check_crop(images.shape[1:-1], crop_size)
  return _augment_jit(rng, images, crop_size=crop, flip=bool(flip),
                      brightness=float(brightness), contrast=float(contrast),
                      scale=float(scale), rotate=float(rotate), erase=float(erase),
                      noise=float(noise))
