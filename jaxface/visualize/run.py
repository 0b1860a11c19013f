"""What do ConvNet units respond to? Top-9 receptive-field patches per unit.

``run(config, workdir)`` writes one grid PNG per chosen layer of the k image
patches that excite each unit most, in the manner of Zeiler & Fergus' layer 1
to layer 5 figures. Receptive fields come from the network's own layer
geometry (``receptive``, ``adapters``).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxface import paths, runloop
from jaxface.visualize import adapters as adapters_lib, render, topk
from jaxface.visualize.config import DLIB_CENTER_CROP, NETWORKS, VisualizeConfig, parse_units  # noqa: F401

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- images


def list_images(root: str) -> list[str]:
  """Image files under ``root`` (any depth), in natural path order."""
  from jaxface.data.folder import IMAGE_EXTENSIONS
  from jaxface.data.source import natural_key
  if not os.path.isdir(root):
    raise ValueError(f"images={root!r} is not a folder (or tfds:NAME)")
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    found += [os.path.join(dirpath, f) for f in filenames
              if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
  if not found:
    raise ValueError(f"images={root!r} holds no image files")
  return sorted(found, key=lambda p: natural_key(os.path.relpath(p, root)))


def prepare(img: Image.Image, size_hw: tuple[int, int], center_crop: float, channels: int) -> np.ndarray:
  """PIL image -> the network's view ``[H, W, channels]`` uint8: central crop, then resize."""
  img = img.convert("RGB" if channels == 3 else "L")
  if center_crop < 1:
    w, h = img.size
    side = max(1, round(min(w, h) * center_crop))
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
  if img.size != (size_hw[1], size_hw[0]):
    img = img.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
  arr = np.asarray(img, np.uint8)
  return arr[..., None] if arr.ndim == 2 else arr


def face_chip(img: Image.Image) -> np.ndarray | None:
  """The highest-scoring face of ``img`` as dlib's aligned chip ``[150, 150, 3]`` uint8, or None.

  Uses ``jaxface.faces`` (MMOD detector, 5-point landmarks, ``get_face_chip``
  alignment): the input the dlib network was trained on.
  """
  from jaxface import faces
  rgb = np.asarray(img.convert("RGB"), np.uint8)
  boxes = faces.detect(rgb)
  if boxes.shape[0] == 0:
    return None
  return faces.chips(rgb, faces.landmarks(rgb, boxes[:1]))[0]


class ImageSet:
  """Random access to an image set in the network's view (decoded on demand, never all at once).

  Args:
    spec: a folder (``$JAXFACE_DATA`` expands) or ``tfds:NAME``.
    size_hw, center_crop, channels: see ``prepare``.
    max_images: 0 for all, else that many evenly spaced (deterministic).
    chips: replace each image by its aligned face chip (``face_chip``);
      images without a detected face are skipped.
  """

  def __init__(self, spec: str, size_hw, center_crop: float, channels: int, max_images: int = 0,
               tfds_split: str = "train", tfds_data_dir: str = "", chips: bool = False):
    if chips and channels != 3:
      raise ValueError("face chips are RGB: chips=True needs channels=3")
    self.size_hw, self.center_crop, self.channels = tuple(size_hw), center_crop, channels
    self.chips = chips
    self.no_face: list[str] = []
    if spec.startswith("tfds:"):
      from jaxface.data import tfds_source
      self._tfds = tfds_source.TfdsSource(spec[5:], split=tfds_split,
                                          data_dir=paths.expand(tfds_data_dir) or None)
      total = len(self._tfds)
      self._files = None
    else:
      self._tfds = None
      self._files = list_images(paths.expand(spec))
      total = len(self._files)
    if max_images and max_images < total:
      self.index = np.linspace(0, total - 1, max_images).round().astype(np.int64)
    else:
      self.index = np.arange(total, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.index)

  def name(self, i: int) -> str:
    j = int(self.index[i])
    return self._files[j] if self._files is not None else f"record {j}"

  def load(self, i: int) -> np.ndarray | None:
    """Image ``i`` as ``[H, W, channels]`` uint8, or None (logged) when it cannot be decoded
    (or, with ``chips``, holds no detected face)."""
    j = int(self.index[i])
    try:
      if self._files is not None:
        with Image.open(self._files[j]) as img:
          img.load()
      else:
        raw = self._tfds.get(np.array([j]))[0]
        img = Image.fromarray(raw[..., 0] if raw.shape[-1] == 1 else raw)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      log.warning("skipping unreadable image %s: %s", self.name(i), e)
      return None
    if self.chips:
      chip = face_chip(img)
      if chip is None:
        log.info("no face found in %s; skipped", self.name(i))
        self.no_face.append(self.name(i))
        return None
      img = Image.fromarray(chip)
      return prepare(img, self.size_hw, 1.0, self.channels)
    return prepare(img, self.size_hw, self.center_crop, self.channels)


def _batches(images: ImageSet, batch_size: int, pool: concurrent.futures.Executor):
  """Yields (uint8 ``[batch_size, H, W, C]``, ids ``[batch_size]`` int32); -1 marks padding/unreadable.

  The next batch decodes in ``pool`` while the caller computes on this one.
  """
  n = len(images)
  shape = (batch_size, *images.size_hw, images.channels)

  def submit(start):
    return [pool.submit(images.load, i) for i in range(start, min(start + batch_size, n))]

  pending = submit(0)
  for start in range(0, n, batch_size):
    futures, pending = pending, (submit(start + batch_size) if start + batch_size < n else [])
    batch = np.zeros(shape, np.uint8)
    ids = np.full(batch_size, -1, np.int32)
    for j, f in enumerate(futures):
      img = f.result()
      if img is not None:
        batch[j], ids[j] = img, start + j
    yield batch, ids


# --------------------------------------------------------------------------- networks


def build_adapter(cfg: VisualizeConfig) -> tuple[adapters_lib.Adapter, list[str]]:
  """The configured network as an Adapter, and warnings to report (e.g. random weights)."""
  warnings = []
  size = tuple(cfg.image_size) or None
  if cfg.network == "dlib":
    from jaxface import pretrained
    return adapters_lib.dlib_adapter(pretrained.face_encoder()), warnings
  if cfg.network == "vgg19":
    from jaxface import weights as weights_lib
    from jaxface.models import vgg19 as vgg_lib
    w = weights_lib.load_vgg19()
    if w is None:
      warnings.append("no pretrained VGG19 weights found (python -m jaxface.weights fetch vgg19): "
                      "using RANDOM weights")
      model, prep = vgg_lib.build_vgg19(seed=cfg.seed), vgg_lib.TORCH
    else:
      model, prep = vgg_lib.build_vgg19(weights=w), w.preprocessing
    return adapters_lib.vgg19_adapter(model, prep, size or (224, 224)), warnings
  from jaxface.models import encoder as encoder_lib
  if cfg.network == "random":
    warnings.append("network=random: an untrained encoder (random filters)")
    model = encoder_lib.build_encoder(encoder_lib.EncoderSpec(), seed=cfg.seed)
    return adapters_lib.encoder_adapter(model, size or (64, 64), "random encoder"), warnings
  from jaxface.train import triplet
  workdir = paths.expand(cfg.network[len("checkpoint:"):])
  model, tcfg = triplet.load_params(workdir)
  # The encoder was trained on crops of its image_size; it sees the whole image here.
  return adapters_lib.encoder_adapter(model, size or tuple(tcfg.image_size),
                                      f"triplet encoder ({workdir})"), warnings


# --------------------------------------------------------------------------- streaming


def make_step(adapter: adapters_lib.Adapter, layers: tuple[str, ...]) -> Callable:
  """Jitted ``(params, states, images uint8, ids) -> states``, the states donated."""

  def step(params, states, images, ids):
    acts = adapter.features(params, adapter.preprocess(images), layers)
    return {l: topk.update_impl(states[l], acts[l], ids) for l in layers}

  return jax.jit(step, donate_argnums=1)


def collect(adapter: adapters_lib.Adapter, images: ImageSet, layers: tuple[str, ...], k: int,
            batch_size: int, printer: Callable[[str], None] = lambda s: None) -> dict:
  """Streams ``images`` through ``adapter`` and returns ``{layer: top-k state (NumPy)}``.

  Before any compute, checks the architecture-derived feature-map sizes
  against the network's real output shapes (``jax.eval_shape``).
  """
  layers = adapter.check_layers(layers)
  fields = adapter.fields(images.size_hw)
  x = jax.ShapeDtypeStruct((batch_size, *images.size_hw, images.channels), jnp.uint8)
  shapes = jax.eval_shape(lambda p, u8: adapter.features(p, adapter.preprocess(u8), layers),
                          adapter.params, x)
  for l in layers:
    if tuple(shapes[l].shape[1:3]) != fields[l].out_size:
      raise ValueError(f"{adapter.name} layer {l}: the geometry predicts a {fields[l].out_size} map, "
                       f"the network gives {tuple(shapes[l].shape[1:3])}; the adapter is out of date")
  states = {l: topk.init(int(shapes[l].shape[-1]), k) for l in layers}
  step = make_step(adapter, layers)
  n, meter, done = len(images), runloop.Meter(), 0
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    for b, (batch, ids) in enumerate(_batches(images, batch_size, pool), start=1):
      states = step(adapter.params, states, jnp.asarray(batch), jnp.asarray(ids))
      done += batch_size
      if runloop.every(b, 10, last=done >= n):
        jax.block_until_ready(states)
        printer(f"{min(done, n)}/{n} images, {meter.elapsed():.1f}s")
  return {l: jax.tree.map(np.asarray, s) for l, s in states.items()}


def choose_units(state: dict, units: str, num_images: int) -> np.ndarray:
  """Unit indices to show: the first N, the N with highest mean per-image maximum, or a list."""
  kind, arg = parse_units(units)
  u = state["value"].shape[0]
  if kind == "first":
    return np.arange(min(arg, u))
  if kind == "top":
    mean = state["total"] / max(num_images, 1)
    return np.argsort(-mean, kind="stable")[:arg]
  bad = [v for v in arg if v >= u]
  if bad:
    raise ValueError(f"units: {bad} out of range for a layer with {u} units")
  return np.array(arg)


def run(cfg: VisualizeConfig, workdir: str, printer: Callable[[str], None] = lambda s: None) -> dict:
  """Computes the grids; returns the summary that is also written to ``summary.json``.

  Streams the image set through the network in jitted batches, keeps for every
  unit of every chosen layer the k images whose strongest response is largest
  (``topk``: O(units x k) memory; one batch of activations alive at a time,
  never the whole set's), then re-reads just those images and writes one grid
  PNG per layer, ``units x k`` receptive-field crops (``render``). Outputs in
  ``workdir``: ``layer{i}_{name}.png`` (i = 1.. in forward order) and
  ``summary.json`` (fields, units, top values, image paths, boxes).
  """
  cfg.validate()
  adapter, warnings = build_adapter(cfg)
  for w in warnings:
    printer("warning: " + w)
  layers = adapter.check_layers([l.strip() for l in cfg.layers.split(",") if l.strip()]
                                or adapter.default_layers)
  size = tuple(cfg.image_size) or adapter.input_size
  if size is None:
    raise ValueError(f"image_size is required for {adapter.name}")
  if adapter.input_size is not None and cfg.image_size and size != adapter.input_size:
    raise ValueError(f"image_size={size}: {adapter.name} takes {adapter.input_size} inputs")
  chips = cfg.align == "chips" or (cfg.align == "auto" and cfg.network == "dlib")
  crop = cfg.center_crop if cfg.center_crop > 0 else (DLIB_CENTER_CROP if cfg.network == "dlib" else 1.0)
  images = ImageSet(cfg.images, size, crop, adapter.channels, cfg.max_images, cfg.tfds_split,
                    cfg.tfds_data_dir, chips=chips)
  view = "aligned face chips" if chips else f"central crop {crop:g}"
  printer(f"{adapter.name}: layers {', '.join(layers)}; {len(images)} images of {size[0]}x{size[1]} "
          f"({view})")
  meter = runloop.Meter()
  states = collect(adapter, images, layers, cfg.top_k, cfg.batch_size, printer)
  seconds = meter.elapsed()
  if images.no_face:
    printer(f"{len(images.no_face)} images without a detected face were skipped")
  return write_outputs(cfg, workdir, adapter, images, layers, states, warnings, seconds,
                       "chips" if chips else crop, printer)


def write_outputs(cfg, workdir, adapter, images: ImageSet, layers, states, warnings, seconds, crop,
                  printer=lambda s: None) -> dict:
  """Renders the grid PNGs and ``summary.json`` from collected top-k states."""
  os.makedirs(workdir, exist_ok=True)
  fields = adapter.fields(images.size_hw)
  chosen = {l: choose_units(states[l], cfg.units, len(images)) for l in layers}
  needed = sorted({int(i) for l in layers for i in states[l]["image"][chosen[l]].ravel() if i >= 0})
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    pixels = dict(zip(needed, pool.map(images.load, needed)))
  summary = {"network": adapter.name, "images": cfg.images, "num_images": len(images),
             "no_face": len(images.no_face), "image_size": list(images.size_hw),
             "view": crop if crop == "chips" else f"center_crop {crop:g}", "seconds": round(seconds, 2),
             "clip": cfg.clip,
             "warnings": warnings, "layers": []}
  for li, l in enumerate(layers, start=1):
    f, s = fields[l], states[l]
    rows, labels, units_out = [], [], []
    for unit in chosen[l]:
      row, entries = [], []
      for j in range(s["value"].shape[1]):
        img = int(s["image"][unit, j])
        if img < 0 or pixels.get(img) is None:
          row.append(None)
          continue
        pos = (int(s["y"][unit, j]), int(s["x"][unit, j]))
        box = f.box(pos)
        shown = render.clip_box(box, images.size_hw) if cfg.clip else box
        patch = render.crop(pixels[img], shown)
        if shown != box:
          # The field was cut at the image border: mark the unit's own grid cell (jump x jump
          # around the field's centre) so the patch still says where the unit looks.
          patch = render.mark(patch, render.center_cell(box, f.jump, shown))
        row.append(patch)
        entries.append({"image": images.name(img), "value": float(s["value"][unit, j]),
                        "position": list(pos), "box": [list(b) for b in box]})
      rows.append(row)
      labels.append(f"u{int(unit)}")
      units_out.append({"unit": int(unit), "mean_max": float(s["total"][unit] / max(len(images), 1)),
                        "top": entries})
    title = (f"{adapter.name} {l} (layer {li}): field {f.size[0]}x{f.size[1]} px, "
             f"stride {f.jump[0]}, top {cfg.top_k} of {len(images)} images") if cfg.labels else None
    out = render.grid(rows, cell=cfg.cell, row_labels=labels if cfg.labels else None, title=title)
    png = os.path.join(workdir, f"layer{li}_{l}.png")
    out.save(png)
    printer(f"wrote {png}: {len(rows)} units, field {f.size[0]} px, stride {f.jump[0]}")
    summary["layers"].append({"layer": l, "index": li, "note": adapter.notes.get(l, ""),
                              "png": os.path.basename(png), "field_size": list(f.size),
                              "field_jump": list(f.jump), "field_start": list(f.start),
                              "map_size": list(f.out_size), "num_units": int(s["value"].shape[0]),
                              "units": units_out})
  with open(os.path.join(workdir, "summary.json"), "w") as fh:
    json.dump(summary, fh, indent=1)
  return summary
