"""Fixtures shared by test modules: dlib's golden reference sets (CNN pipeline; HOG, 68 points).

Golden data: ``data_root()/dlib_golden`` (dlib 20.0.1 outputs on 82 faces).
The entry ``skimage_astronaut`` has no image in that folder; it is checked
only when scikit-image is installed, otherwise left out.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxface import paths

GOLDEN = os.path.join(paths.data_root(), "dlib_golden")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
  """golden.npz as a dict: names, rects, landmarks5, chips, descriptors."""
  f = os.path.join(GOLDEN, "golden.npz")
  if not os.path.isfile(f):
    pytest.skip(f"golden data not found at {f} (set JAXFACE_DATA)")
  g = np.load(f)
  return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def hog_golden() -> tuple[dict[str, np.ndarray], str]:
  """(dlib_golden_hog/golden.npz as a dict, the data root its ``paths`` are relative to)."""
  f = os.path.join(paths.data_root(), "dlib_golden_hog", "golden.npz")
  if not os.path.isfile(f):
    pytest.skip(f"golden data not found at {f} (set JAXFACE_DATA)")
  z = np.load(f)
  return {k: z[k] for k in z.files}, paths.data_root()


def load_golden_image(name: str) -> np.ndarray | None:
  """uint8 [H, W, 3] RGB as dlib saw it (no EXIF rotation), or None when unavailable."""
  from PIL import Image
  if name == "skimage_astronaut":
    try:
      from skimage import data  # optional; not a dependency
    except ImportError:
      return None
    return np.asarray(data.astronaut())[..., :3]
  with Image.open(os.path.join(GOLDEN, "images", name)) as im:
    return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def golden_images(golden) -> dict[str, np.ndarray | None]:
  return {name: load_golden_image(name) for name in sorted(set(golden["names"].tolist()))}
