"""Prepared TensorFlow Datasets read through ``tfds.data_source`` (no TensorFlow needed).

``tfds.data_source`` gives random access to a dataset prepared in the ArrayRecord
format, decoding records with NumPy and PIL only (:class:`TfdsSource`). Preparing
a dataset needs TensorFlow once::

    pip install 'jaxface[tfds-prepare]'
    tfds build lfw --data_dir=DIR --file_format=array_record
"""

from __future__ import annotations

import logging
import os

import numpy as np

from jaxface import paths
from jaxface.data.conform import check_channels, check_size, conform_array
from jaxface.data.source import ImageSource, natural_order

_log = logging.getLogger(__name__)

# Records read per call while collecting labels.
_LABEL_CHUNK = 1024


def _prepare_hint(name: str, data_dir: str | None) -> str:
  where = f" --data_dir={data_dir}" if data_dir else ""
  return (f"Prepare it once (this needs TensorFlow): pip install 'jaxface[tfds-prepare]' && "
          f"tfds build {name}{where} --file_format=array_record")


def _open(name: str, split: str, data_dir: str | None, decoders=None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders=decoders, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as err:
    raise ValueError(f"TFDS has no dataset named {name!r}: {str(err).splitlines()[0]}") from err
  except Exception as err:  # pylint: disable=broad-except
    # TFDS reports a missing or TFRecord-only preparation in several ways
    # (NotImplementedError, FileNotFoundError, AssertionError, ...).
    raise ValueError(
        f"TFDS dataset {name!r} split {split!r} is not prepared for random access in "
        f"data_dir={data_dir or '(TFDS default)'} ({type(err).__name__}: "
        f"{str(err).splitlines()[0].rstrip(':. ')}). "
        + _prepare_hint(name, data_dir)) from err


def _batch_reader(ds):
  """A function reading records at a list of indices, batched where ``ds`` allows it.

  ArrayRecord sources read a batch in parallel through ``__getitems__``; a
  source without it (or with a broken one, as in ``tfds.testing.mock_data``)
  is read record by record.
  """
  state = {"batched": getattr(ds, "__getitems__", None) is not None}

  def read(indices) -> list:
    keys = [int(i) for i in indices]
    if state["batched"] and keys:
      try:
        records = list(ds.__getitems__(keys))
        if len(records) == len(keys):
          return records
      except TypeError:
        pass
      state["batched"] = False
    return [ds[k] for k in keys]

  return read


def _label_names(ds, label_key: str) -> list[str] | None:
  """ClassLabel names of the label feature, if the dataset has them."""
  info = getattr(ds, "dataset_info", None)
  try:
    feature = info.features[label_key]
  except (AttributeError, KeyError, TypeError):
    return None
  names = getattr(feature, "names", None)
  return [str(n) for n in names] if names else None


def _labels_from_values(values: list, class_names: list[str] | None, name: str
                        ) -> tuple[np.ndarray, list[str]]:
  """Maps raw label values to ([N] int32 labels, identity names)."""
  values = [v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v for v in values]
  if all(isinstance(v, (bytes, str, np.bytes_, np.str_)) for v in values):
    strs = [v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v) for v in values]
    uniq = sorted(set(strs))
    uniq = [uniq[i] for i in natural_order(uniq)]
    index = {s: i for i, s in enumerate(uniq)}
    return np.array([index[s] for s in strs], np.int32), uniq
  try:
    ints = np.array([int(v) for v in values], np.int64)
  except (TypeError, ValueError):
    raise ValueError(f"labels of TFDS dataset {name!r} must be integers or strings, "
                     f"got e.g. {values[0]!r}") from None
  if class_names is not None:
    if ints.size and (ints.min() < 0 or ints.max() >= len(class_names)):
      raise ValueError(f"labels of TFDS dataset {name!r} fall outside its {len(class_names)} classes")
    return ints.astype(np.int32), class_names
  # Unnamed integer labels: keep only the values that occur, in numeric order.
  uniq, inverse = np.unique(ints, return_inverse=True)
  return inverse.astype(np.int32), [str(u) for u in uniq]


class TfdsSource(ImageSource):
  """Images and identity labels of a prepared TFDS dataset.

  Labels are read once up front (with image decoding skipped), so a sampler can
  plan batches; images are decoded when ``get`` asks for them. The data source is
  a plain random-access sequence, so it could also be wrapped in a
  ``grain.MapDataset`` for prefetching; plain indexing is all this class needs.

  Args:
    name: TFDS dataset name, e.g. "lfw" (label: person name) or "mnist".
    split: split spec, e.g. "train" or "train[:80%]".
    data_dir: TFDS data directory (``$JAXFACE_DATA`` etc. expanded); default:
      TFDS's own default (``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).
    image_key: feature holding the image.
    label_key: feature holding the identity (ClassLabel, integer or string;
      strings are mapped to indices in natural name order).
    image_size: (H, W) to resize to; default: the shape of the first image, and
      ``get`` fails on records of another size.
    channels: 1 or 3; images are converted as needed.

  Raises:
    ValueError: unknown dataset, or not prepared in ``data_dir`` (the message
      says how to prepare it).
  """

  def __init__(
      self,
      name: str,
      split: str = "train",
      data_dir: str | os.PathLike | None = None,
      image_key: str = "image",
      label_key: str = "label",
      image_size: tuple[int, int] | None = None,
      channels: int = 3,
  ):
    check_channels(channels)
    self.channels = channels
    self.image_size = check_size(image_size)
    self.image_shape = None
    self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
    self.data_dir = paths.expand(os.fspath(data_dir)) if data_dir is not None else None
    self._ds = _open(name, split, self.data_dir)
    n = len(self._ds)
    if n == 0:
      raise ValueError(f"TFDS dataset {name!r} split {split!r} has no records")
    first = self._ds[0]
    for key in (image_key, label_key):
      if key not in first:
        raise ValueError(f"TFDS dataset {name!r} has no feature {key!r}; it has {sorted(first)}")
    label_ds = self._label_view()
    read_labels = _batch_reader(label_ds)
    values = []
    for start in range(0, n, _LABEL_CHUNK):
      values.extend(r[label_key] for r in read_labels(range(start, min(start + _LABEL_CHUNK, n))))
    self._read = _batch_reader(self._ds)
    self.labels, self.identity_names = _labels_from_values(values, _label_names(self._ds, label_key), name)
    img = self._conform(first[image_key], 0)
    self.image_shape = tuple(int(d) for d in img.shape)

  def _label_view(self):
    """A view of the records that leaves images encoded, so the label pass is cheap.

    Falls back to the decoding view where skipping fails: ``tfds.testing.mock_data``
    can only produce encoded images with TensorFlow installed.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
      view = _open(self.name, self.split, self.data_dir,
                   decoders={self.image_key: tfds.decode.SkipDecoding()})
      view[0]  # pylint: disable=pointless-statement
      return view
    except Exception as err:  # pylint: disable=broad-except
      _log.debug("reading labels with images decoded (%s: %s)", type(err).__name__, err)
      return self._ds

  def _conform(self, image, index: int) -> np.ndarray:
    try:
      out = conform_array(np.asarray(image), self.channels, self.image_size)
    except ValueError as err:
      raise ValueError(f"record {index} of TFDS dataset {self.name!r}: {err}") from err
    if self.image_shape is not None and out.shape != self.image_shape:
      raise ValueError(
          f"record {index} of TFDS dataset {self.name!r} has image shape {out.shape} but the first "
          f"has {self.image_shape}; pass image_size=(H, W) to resize all images to one size")
    return out

  def _get(self, indices: np.ndarray) -> np.ndarray:
    records = self._read(indices)
    out = np.empty((len(indices), *self.image_shape), np.uint8)
    for j, (i, r) in enumerate(zip(indices, records)):
      out[j] = self._conform(r[self.image_key], int(i))
    return out
