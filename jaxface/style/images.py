"""Images for style transfer: loading, resizing, saving, colour matching, built-in images.

All images here are host NumPy arrays ``[H, W, 3] float32`` RGB in [0, 1].
An image spec is a file path (``$JAXFACE_DATA`` and ``~`` expand) or
``builtin:NAME``: procedurally generated pictures, so the default run needs
no files and no downloads.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from PIL import Image

from jaxface import paths

BUILTIN_CONTENT = ("scene", "checker")
BUILTIN_STYLE = ("waves", "mosaic")
BUILTIN_SIZE = 512  # built-in images are drawn at this longer side and resized like files


class ImageError(ValueError):
  """An image spec names a missing or unreadable file or an unknown built-in."""


def load(spec: str) -> np.ndarray:
  """Reads an image spec -> ``[H, W, 3] float32`` in [0, 1] (grayscale is replicated, alpha dropped)."""
  if spec.startswith("builtin:"):
    return builtin(spec[len("builtin:"):], BUILTIN_SIZE)
  path = paths.expand(spec)
  if not os.path.isfile(path):
    raise ImageError(f"image {spec!r}: no such file ({path})")
  try:
    with Image.open(path) as im:
      im.load()
      rgb = np.asarray(im.convert("RGB"), np.float32) / 255.0
  except Exception as e:  # PIL raises several types for damaged files
    raise ImageError(f"image {spec!r}: cannot be read ({type(e).__name__}: {e})") from None
  if rgb.ndim != 3 or min(rgb.shape[:2]) < 1:
    raise ImageError(f"image {spec!r}: empty image")
  return rgb


def name_of(spec: str) -> str:
  """Short file-name-safe name of an image spec (file stem or built-in name)."""
  if spec.startswith("builtin:"):
    return spec[len("builtin:"):]
  stem = os.path.splitext(os.path.basename(spec))[0]
  return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "image"


def fit_shape(shape: tuple[int, int], longer: int) -> tuple[int, int]:
  """(H, W) with the aspect ratio of ``shape`` and the longer side ``longer`` (both >= 1)."""
  h, w = shape
  if h >= w:
    return longer, max(1, round(w * longer / h))
  return max(1, round(h * longer / w)), longer


def resize(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Antialiased bilinear resize ``[H, W, C]`` -> ``[h, w, C] float32``."""
  if tuple(img.shape[:2]) == tuple(shape):
    return np.asarray(img, np.float32)
  out = jax.image.resize(np.asarray(img, np.float32), (*shape, img.shape[-1]), "linear",
                         antialias=True)
  return np.asarray(out, np.float32)


def resize_cover(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Centre-crops ``img`` to the aspect ratio of ``shape``, then resizes to it."""
  h, w = img.shape[:2]
  th, tw = shape
  if h * tw > w * th:  # too tall
    ch = max(1, round(w * th / tw))
    top = (h - ch) // 2
    img = img[top:top + ch]
  elif h * tw < w * th:  # too wide
    cw = max(1, round(h * tw / th))
    left = (w - cw) // 2
    img = img[:, left:left + cw]
  return resize(img, shape)


def save_png(path: str, img: np.ndarray) -> None:
  """Writes ``[H, W, 3]`` float in [0, 1] (clipped) as an 8-bit PNG."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  u8 = np.round(np.clip(np.asarray(img, np.float32), 0, 1) * 255).astype(np.uint8)
  tmp = path + ".tmp.png"
  Image.fromarray(u8).save(tmp)
  os.replace(tmp, path)  # a killed run never leaves half a PNG


# ------------------------------------------------------------------------- colour

# YIQ (NTSC): Y is luminance, I and Q carry the colour.
_RGB2YIQ = np.array([[0.299, 0.587, 0.114],
                     [0.595716, -0.274453, -0.321263],
                     [0.211456, -0.522591, 0.311135]], np.float64)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)
RGB_TO_Y = _RGB2YIQ[0]  # luminance weights, [3]


def rgb_to_yiq(img: np.ndarray) -> np.ndarray:
  return (np.asarray(img, np.float64) @ _RGB2YIQ.T).astype(np.float32)


def yiq_to_rgb(img: np.ndarray) -> np.ndarray:
  return (np.asarray(img, np.float64) @ _YIQ2RGB.T).astype(np.float32)


def luminance_rgb(img: np.ndarray) -> np.ndarray:
  """Luminance replicated to 3 channels ``[..., H, W, 3]`` (what the network sees in luminance mode)."""
  y = rgb_to_yiq(img)[..., :1]
  return np.repeat(y, 3, axis=-1)


def match_luminance(style_y: np.ndarray, content_y: np.ndarray) -> np.ndarray:
  """Shifts/scales style luminance to the content's mean and std (Gatys et al. 2016)."""
  s_mu, s_sd = style_y.mean(), style_y.std() + 1e-6
  return ((style_y - s_mu) * (content_y.std() / s_sd) + content_y.mean()).astype(np.float32)


def combine_luminance(generated: np.ndarray, content: np.ndarray) -> np.ndarray:
  """Luminance of ``generated`` with the colour (I, Q) of ``content``: ``[..., H, W, 3]``."""
  yiq = rgb_to_yiq(content)
  yiq[..., 0] = rgb_to_yiq(generated)[..., 0]
  return np.clip(yiq_to_rgb(yiq), 0, 1)


def match_color(style: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Linear colour transfer: the style image's pixels get the target's mean and covariance.

  ``x' = A (x - mu_s) + mu_t`` with ``A = C_t^(1/2) C_s^(-1/2)`` (symmetric
  square roots), the "colour histogram matching" of Gatys et al. 2016.
  ``style [H, W, 3]``, ``target [..., 3]`` (any pixels) -> ``[H, W, 3] float32`` in [0, 1].
  """
  s = np.asarray(style, np.float64).reshape(-1, 3)
  t = np.asarray(target, np.float64).reshape(-1, 3)
  mu_s, mu_t = s.mean(0), t.mean(0)
  eye = 1e-5 * np.eye(3)
  cov_s, cov_t = np.cov(s, rowvar=False) + eye, np.cov(t, rowvar=False) + eye

  def sqrtm(c, power):
    vals, vecs = np.linalg.eigh(c)
    return (vecs * np.maximum(vals, 1e-10) ** power) @ vecs.T

  a = sqrtm(cov_t, 0.5) @ sqrtm(cov_s, -0.5)
  out = (s - mu_s) @ a.T + mu_t
  return np.clip(out, 0, 1).reshape(style.shape).astype(np.float32)


# ------------------------------------------------------------------------- built-ins


def builtin(name: str, size: int) -> np.ndarray:
  """Procedural picture ``name`` at ``size x size``, ``[size, size, 3] float32`` in [0, 1].

  Content: "scene" (sky, sun, hills, a house: large shapes and edges),
  "checker" (a tilted checkerboard). Style: "waves" (swirling brush-like
  bands in blues and yellows), "mosaic" (coloured Voronoi tiles with dark
  grout). Deterministic: no randomness beyond fixed seeds.
  """
  y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
  if name == "scene":
    img = np.zeros((size, size, 3))
    sky = np.stack([0.35 + 0.4 * y, 0.55 + 0.35 * y, 0.95 - 0.1 * y], -1)
    img[:] = sky
    sun = (x - 0.75) ** 2 + (y - 0.22) ** 2 < 0.1 ** 2
    img[sun] = (1.0, 0.85, 0.3)
    hill1 = y > 0.62 + 0.08 * np.sin(6 * x)
    hill2 = y > 0.72 + 0.05 * np.cos(9 * x + 1)
    img[hill1] = np.stack([0.2 + 0.1 * x, 0.55 - 0.1 * y, 0.2 + 0 * x], -1)[hill1]
    img[hill2] = np.stack([0.1 + 0 * x, 0.4 - 0.1 * y, 0.15 + 0 * x], -1)[hill2]
    wall = (x > 0.22) & (x < 0.45) & (y > 0.5) & (y < 0.78)
    img[wall] = (0.85, 0.75, 0.6)
    roof = (y <= 0.5) & (y > 0.36) & (np.abs(x - 0.335) < (y - 0.36) * 0.95)
    img[roof] = (0.6, 0.15, 0.12)
    door = (x > 0.31) & (x < 0.36) & (y > 0.64) & (y < 0.78)
    img[door] = (0.35, 0.2, 0.1)
    window = (x > 0.38) & (x < 0.42) & (y > 0.56) & (y < 0.61)
    img[window] = (0.3, 0.5, 0.8)
    return img.astype(np.float32)
  if name == "checker":
    u, v = (x - 0.5) * np.cos(0.4) + (y - 0.5) * np.sin(0.4), -(x - 0.5) * np.sin(0.4) + (y - 0.5) * np.cos(0.4)
    c = ((np.floor(u * 6) + np.floor(v * 6)) % 2)[..., None]
    return (c * np.array([0.9, 0.8, 0.2]) + (1 - c) * np.array([0.1, 0.2, 0.5])).astype(np.float32)
  if name == "waves":
    phase = 14 * y + 3 * np.sin(5 * x + 2 * np.sin(4 * y)) + 2 * np.sin(11 * x * y)
    band = 0.5 + 0.5 * np.sin(phase)
    streak = 0.5 + 0.5 * np.sin(60 * (x + 0.3 * np.sin(3 * y)) + 4 * band)
    dark = np.array([0.05, 0.12, 0.35])
    mid = np.array([0.2, 0.45, 0.8])
    bright = np.array([0.95, 0.85, 0.3])
    img = (dark * (1 - band[..., None]) + mid * band[..., None])
    img = img * (0.75 + 0.25 * streak[..., None])
    swirl = np.exp(-((x - 0.65) ** 2 + (y - 0.3) ** 2) / 0.02) * (0.5 + 0.5 * np.sin(40 * np.hypot(x - 0.65, y - 0.3)))
    img = img * (1 - swirl[..., None]) + bright * swirl[..., None]
    return np.clip(img, 0, 1).astype(np.float32)
  if name == "mosaic":
    rng = np.random.default_rng(7)
    centers = rng.uniform(size=(48, 2))
    colors = rng.uniform(0.15, 1.0, size=(48, 3)) * np.array([1.0, 0.7, 0.5])
    d = (y[..., None] - centers[:, 0]) ** 2 + (x[..., None] - centers[:, 1]) ** 2
    order = np.sort(d, axis=-1)
    idx = np.argmin(d, axis=-1)
    img = colors[idx]
    grout = (np.sqrt(order[..., 1]) - np.sqrt(order[..., 0])) < 0.012
    img[grout] = (0.08, 0.06, 0.05)
    return img.astype(np.float32)
  raise ImageError(f"image 'builtin:{name}': unknown built-in; valid: "
                   f"{', '.join('builtin:' + n for n in BUILTIN_CONTENT + BUILTIN_STYLE)}")
