"""Configuration of ``python -m experiments.visualize`` (no JAX import: flags parse fast)."""

from __future__ import annotations

import dataclasses
import os

from jaxface import paths
from jaxface.config_dict import field

NETWORKS = ("dlib", "vgg19", "random", "checkpoint:PATH")
# LFW photos are roughly centred on the face; this central part of the 250 px
# photo (175 px) scales the face to about the size it has in a dlib chip.
DLIB_CENTER_CROP = 0.7


@dataclasses.dataclass(frozen=True)
class VisualizeConfig:
  """Every setting of ``python -m experiments.visualize`` (flag name = field name)."""
  network: str = field(
      "dlib",
      "dlib (pretrained face ResNet) | vgg19 | random (untrained encoder) | checkpoint:PATH (triplet "
      "workdir)")
  images: str = field("$JAXFACE_DATA/faces/lfw_subset", "image folder (searched recursively) or tfds:NAME")
  tfds_split: str = field("train", "images=tfds:NAME: the dataset split")
  tfds_data_dir: str = field("", "images=tfds:NAME: TFDS data directory ('': TFDS default)")
  layers: str = field("", "comma-separated tap names; empty: the network's five default layers")
  units: str = field("top:16", "first:N | top:N (highest mean response) | comma-separated unit indices")
  top_k: int = field(9, "patches per unit")
  max_images: int = field(0, "0: every image; N: N images evenly spaced over the set")
  batch_size: int = field(32, "images per forward pass")
  image_size: tuple[int, ...] = field((), "H,W fed to the network; empty: the network's own (dlib 150, vgg19 224)")
  align: str = field(
      "auto",
      "chips (detect, 5 landmarks, aligned 150 px dlib chip) | center (central crop) | auto: chips for "
      "dlib")
  center_crop: float = field(-1.0, "align=center: central fraction of the shorter side kept; < 0: dlib 0.7, else 1")
  cell: int = field(64, "grid cell size in pixels")
  labels: bool = field(True, "unit labels and a title on each grid")
  clip: bool = field(True, "crop fields to the image (deep fields outgrow it); false: pad to full field")
  seed: int = field(0, "initialisation of --network=random")

  def validate(self) -> VisualizeConfig:
    net = self.network
    if not (net in ("dlib", "vgg19", "random") or (net.startswith("checkpoint:") and len(net) > 11)):
      raise ValueError(f"network={net!r}: must be one of {', '.join(NETWORKS)}")
    if not self.images:
      raise ValueError("images is empty: give an image folder or tfds:NAME")
    if self.images.startswith("tfds:"):
      if len(self.images) == 5:
        raise ValueError("images='tfds:' needs a dataset name, e.g. tfds:lfw")
    elif not os.path.isdir(paths.expand(self.images)):
      raise ValueError(f"images={self.images!r} is not a folder (or tfds:NAME)")
    if self.align not in ("auto", "chips", "center"):
      raise ValueError(f"align={self.align!r}: must be auto, chips or center")
    parse_units(self.units)
    for name in ("top_k", "batch_size", "cell"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.cell < 4:
      raise ValueError(f"cell must be >= 4, got {self.cell}")
    if self.max_images < 0:
      raise ValueError(f"max_images must be >= 0, got {self.max_images}")
    if self.image_size and (len(self.image_size) != 2 or min(self.image_size) < 1):
      raise ValueError(f"image_size must be H,W (positive), got {self.image_size}")
    if self.center_crop > 1 or self.center_crop == 0:
      raise ValueError(f"center_crop must be in (0, 1] (or < 0 for the default), got {self.center_crop}")
    return self


def parse_units(text: str) -> tuple[str, object]:
  """'first:N' | 'top:N' | '3,17,42' -> ("first", N) | ("top", N) | ("list", (3, 17, 42))."""
  t = text.strip()
  for kind in ("first", "top"):
    if t.startswith(kind + ":"):
      try:
        n = int(t[len(kind) + 1:])
      except ValueError:
        n = 0
      if n < 1:
        raise ValueError(f"units={text!r}: {kind}:N needs a positive integer N")
      return kind, n
  try:
    units = tuple(int(v) for v in t.split(",") if v.strip())
  except ValueError:
    units = ()
  if not units or min(units) < 0 or len(set(units)) != len(units):
    raise ValueError(f"units={text!r}: expected first:N, top:N or distinct unit indices like 0,5,17")
  return "list", units
