"""Data: image sources (synthetic, folders, TFDS), P x K sampling, augmentation.

Sources may also hold 1-D signals or 3-D volumes (``synthetic_signals``,
``synthetic_volumes``); sampling and augmentation work for every rank.

``from jaxface.data import PKSampler`` works, but each name is imported from its
submodule on first use, so importing ``jaxface.data`` loads neither JAX, PIL
nor TFDS. The augmentation functions ``augment`` and ``augment_single`` are
reached through their module, ``jaxface.data.augment``, whose name they share.
LFW pair lists are parsed by ``jaxface.data.lfw``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ImageSource": "source",
    "ArraySource": "source",
    "SubsetSource": "source",
    "subset_identities": "source",
    "split_by_identity": "source",
    "validate_pk": "source",
    "keep_identities_with": "source",
    "SmallIdentitiesError": "source",
    "natural_key": "source",
    "synthetic_faces": "synthetic",
    "synthetic_signals": "synthetic_nd",
    "synthetic_volumes": "synthetic_nd",
    "ImageFolderSource": "folder",
    "IMAGE_EXTENSIONS": "folder",
    "TfdsSource": "tfds_source",
    "PKSampler": "sampler",
    "center_crop": "augment",
    "crop_at": "augment",
    "to_float": "augment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'jaxface.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"jaxface.data.{module}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
