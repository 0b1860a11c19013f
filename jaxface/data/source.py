"""Random-access image sources: the one interface every data loader provides.

An ``ImageSource`` knows all labels up front (so a P x K sampler can plan batches
without touching pixels) and returns uint8 pixels for any set of indices. This
module is NumPy only; loaders that decode files live in ``folder.py`` and
``tfds_source.py``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np

_log = logging.getLogger(__name__)

# How many offending identities an error message lists before summarizing.
_MAX_LISTED = 20


def natural_key(name: str) -> tuple:
  """Sort key that orders digit runs by value: s1 < s2 < s10 < s40."""
  parts = re.split(r"(\d+)", name)
  # Pairs keep str and int parts from ever being compared with each other.
  return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in parts)


def natural_order(names: Sequence[str]) -> np.ndarray:
  """Indices that put ``names`` in natural order (ties keep input order). [n] int64."""
  return np.array(sorted(range(len(names)), key=lambda i: natural_key(names[i])), dtype=np.int64)


class ImageSource:
  """Random-access collection of equally shaped uint8 images with identity labels.

  "Image" means one sample of any spatial rank, channels last: an image
  (H, W, C), a 1-D signal (T, C) or a 3-D volume (D, H, W, C).

  Subclasses set in ``__init__``:
    labels: [N] int32, identity index of each image, in ``[0, num_identities)``.
    identity_names: list of ``num_identities`` names (index -> name).
    image_shape: (H, W, C) of every image returned by ``get`` ((T, C) or
      (D, H, W, C) for signals or volumes).
  and implement ``_get(indices [n] int64) -> [n, *image_shape] uint8``.
  """

  labels: np.ndarray
  identity_names: list[str]
  image_shape: tuple[int, ...]

  @property
  def spatial_rank(self) -> int:
    """Number of spatial axes of a sample: 1 (signals), 2 (images) or 3 (volumes)."""
    return len(self.image_shape) - 1

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def num_identities(self) -> int:
    return len(self.identity_names)

  def images_per_identity(self) -> np.ndarray:
    """Image count of each identity. [num_identities] int64."""
    return np.bincount(self.labels, minlength=self.num_identities).astype(np.int64)

  def get(self, indices) -> np.ndarray:
    """Images at ``indices``.

    Args:
      indices: [n] integer indices in ``[0, len(self))`` (repeats allowed).

    Returns:
      [n, *image_shape] uint8 ([n, H, W, C] for images).
    """
    idx = _check_indices(indices, len(self), "indices")
    out = self._get(idx)
    if out.dtype != np.uint8 or out.shape != (idx.shape[0], *self.image_shape):
      raise ValueError(
          f"{type(self).__name__} returned images of shape {out.shape} and dtype {out.dtype}; "
          f"expected {(idx.shape[0], *self.image_shape)} uint8")
    return out

  def _get(self, indices: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(images={len(self)}, identities={self.num_identities}, "
            f"image_shape={self.image_shape})")


def _check_indices(indices, n: int, name: str) -> np.ndarray:
  """Validates indices into a collection of size ``n``. Returns [k] int64."""
  idx = np.asarray(indices)
  if idx.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {idx.shape}")
  if idx.size and not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"{name} must be integers, got dtype {idx.dtype}")
  idx = idx.astype(np.int64)
  if idx.size and (idx.min() < 0 or idx.max() >= n):
    raise ValueError(f"{name} out of range [0, {n}): min {idx.min()}, max {idx.max()}")
  return idx


def _check_labels(labels, num_identities: int, name: str = "labels") -> np.ndarray:
  """Validates an identity label vector. Returns [N] int32."""
  lab = np.asarray(labels)
  if lab.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {lab.shape}")
  if lab.size and not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f"{name} must be integers, got dtype {lab.dtype}")
  if lab.size and (lab.min() < 0 or lab.max() >= num_identities):
    raise ValueError(
        f"{name} must lie in [0, {num_identities}) (the number of identity names), "
        f"got min {lab.min()}, max {lab.max()}")
  return lab.astype(np.int32)


class ArraySource(ImageSource):
  """An ``ImageSource`` over in-memory arrays.

  Args:
    images: [N, H, W, C] uint8 (or [N, H, W], taken as C = 1); with
      ``spatial_rank`` given, [N, *spatial, C] with that many spatial axes
      (signals [N, T, C], volumes [N, D, H, W, C]).
    labels: [N] integers in ``[0, len(identity_names))``.
    identity_names: names of the identities; default ``"0", "1", ...`` up to
      ``max(labels)``.
    spatial_rank: None (images, as above) or 1, 2, 3.
  """

  def __init__(self, images, labels, identity_names: Sequence[str] | None = None,
               spatial_rank: int | None = None):
    images = np.asarray(images)
    if spatial_rank is None:
      if images.ndim == 3:
        images = images[..., None]
      if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    else:
      if spatial_rank not in (1, 2, 3):
        raise ValueError(f"spatial_rank must be None, 1, 2 or 3, got {spatial_rank!r}")
      if images.ndim != spatial_rank + 2:
        layout = {1: "[N, T, C]", 2: "[N, H, W, C]", 3: "[N, D, H, W, C]"}[spatial_rank]
        raise ValueError(f"images must be {layout} for spatial_rank={spatial_rank}, "
                         f"got shape {images.shape}")
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8, got dtype {images.dtype}")
    lab = np.asarray(labels)
    if identity_names is None:
      identity_names = [str(i) for i in range(int(lab.max()) + 1 if lab.size else 0)]
    self.identity_names = [str(n) for n in identity_names]
    self.labels = _check_labels(lab, len(self.identity_names))
    if self.labels.shape[0] != images.shape[0]:
      raise ValueError(
          f"labels has {self.labels.shape[0]} entries but images has {images.shape[0]}")
    self.images = images
    self.image_shape = tuple(int(d) for d in images.shape[1:])

  def _get(self, indices: np.ndarray) -> np.ndarray:
    return self.images[indices]


class SubsetSource(ImageSource):
  """A view of some images of a parent source, with its own labels and names.

  Args:
    parent: source the pixels come from.
    parent_indices: [n] indices into ``parent`` of the images in this view.
    labels: [n] labels in ``[0, len(identity_names))``.
    identity_names: names of this view's identities.
  """

  def __init__(self, parent: ImageSource, parent_indices, labels, identity_names: Sequence[str]):
    idx = _check_indices(parent_indices, len(parent), "parent_indices")
    # A view of a view reads straight from the root, so chains stay one lookup deep.
    if isinstance(parent, SubsetSource):
      idx = parent.parent_indices[idx]
      parent = parent.parent
    self.parent = parent
    self.parent_indices = idx
    self.identity_names = list(identity_names)
    self.labels = _check_labels(labels, len(self.identity_names))
    if self.labels.shape[0] != idx.shape[0]:
      raise ValueError(f"labels has {self.labels.shape[0]} entries but parent_indices has {idx.shape[0]}")
    self.image_shape = parent.image_shape

  def _get(self, indices: np.ndarray) -> np.ndarray:
    return self.parent.get(self.parent_indices[indices])


def subset_identities(source: ImageSource, identity_indices) -> ImageSource:
  """The images of some identities, relabelled 0..k-1 in the order given.

  Args:
    source: any ``ImageSource``.
    identity_indices: [k] distinct identity indices of ``source``; identity
      ``identity_indices[j]`` becomes label ``j`` and keeps its name.

  Returns:
    An ``ImageSource`` with images in their original relative order.
  """
  ids = _check_indices(identity_indices, source.num_identities, "identity_indices")
  if np.unique(ids).shape[0] != ids.shape[0]:
    raise ValueError(f"identity_indices must be distinct, got {ids.tolist()}")
  new_label_of = np.full(source.num_identities, -1, dtype=np.int64)
  new_label_of[ids] = np.arange(ids.shape[0])
  relabelled = new_label_of[source.labels]
  keep = np.flatnonzero(relabelled >= 0)
  names = [source.identity_names[i] for i in ids]
  return SubsetSource(source, keep, relabelled[keep], names)


def split_by_identity(
    source: ImageSource,
    num_holdout: int | None = None,
    holdout_fraction: float | None = None,
    seed: int | None = None,
) -> tuple[ImageSource, ImageSource]:
  """Splits a source into disjoint sets of identities (train, holdout).

  Identities are ordered by the natural sort of their names (s1, s2, ..., s10)
  and the last ones are held out, so the split is readable and stable; with a
  ``seed`` the identities are shuffled with that seed instead. Each side keeps
  its identities in natural name order, labelled 0..k-1.

  Args:
    source: the source to split.
    num_holdout: number of identities to hold out.
    holdout_fraction: or the fraction of identities to hold out, in (0, 1)
      (rounded to the nearest count).
    seed: optional shuffle seed.

  Returns:
    (train_source, holdout_source).
  """
  n = source.num_identities
  if (num_holdout is None) == (holdout_fraction is None):
    raise ValueError("give exactly one of num_holdout and holdout_fraction, "
                     f"got num_holdout={num_holdout}, holdout_fraction={holdout_fraction}")
  if holdout_fraction is not None:
    if not 0.0 < holdout_fraction < 1.0:
      raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    num_holdout = int(round(holdout_fraction * n))
  if isinstance(num_holdout, bool) or int(num_holdout) != num_holdout:
    raise ValueError(f"num_holdout must be an integer, got {num_holdout!r}")
  num_holdout = int(num_holdout)
  if num_holdout < 2 or n - num_holdout < 2:
    raise ValueError(
        f"split_by_identity needs at least 2 identities on each side: {n} identities, "
        f"num_holdout={num_holdout} leaves {n - num_holdout} for training")
  order = natural_order(source.identity_names)
  if seed is not None:
    order = order[np.random.default_rng(seed).permutation(n)]
  rank = np.empty(n, dtype=np.int64)
  rank[natural_order(source.identity_names)] = np.arange(n)

  def side(ids: np.ndarray) -> ImageSource:
    return subset_identities(source, ids[np.argsort(rank[ids], kind="stable")])

  return side(order[: n - num_holdout]), side(order[n - num_holdout:])


def _describe(names: Sequence[str], counts: np.ndarray) -> str:
  shown = ", ".join(f"{nm} ({c})" for nm, c in zip(names[:_MAX_LISTED], counts[:_MAX_LISTED]))
  if len(names) > _MAX_LISTED:
    shown += f", ... and {len(names) - _MAX_LISTED} more"
  return shown


class SmallIdentitiesError(ValueError):
  """Identities with fewer than K images, and ``drop_small`` not set.

  ``K``, ``names`` and ``counts`` (of the small identities), ``num_identities``
  and ``listing`` (their names and counts, shortened) let a caller re-phrase
  the message for its own settings (a command line names ``--drop_small``).
  """

  def __init__(self, message: str, *, K: int, names: list[str], counts: np.ndarray,
               num_identities: int, listing: str):
    super().__init__(message)
    self.K, self.names, self.counts = K, names, counts
    self.num_identities, self.listing = num_identities, listing


def keep_identities_with(source: ImageSource, min_images: int) -> tuple[ImageSource, dict]:
  """The identities of ``source`` with at least ``min_images`` images.

  Returns:
    (the source restricted to them, relabelled 0..k-1 in their original order;
    ``{"identities": left out, "images": their images, "names": their names}``).
  """
  counts = source.images_per_identity()
  small = np.flatnonzero(counts < min_images)
  dropped = {"identities": int(small.size), "images": int(counts[small].sum()),
             "names": [source.identity_names[i] for i in small]}
  if not small.size:
    return source, dropped
  return subset_identities(source, np.flatnonzero(counts >= min_images)), dropped


def validate_pk(source: ImageSource, P: int, K: int, drop_small: bool = False) -> np.ndarray:
  """Checks, before training, that P x K triplet batches can be drawn.

  A triplet batch needs P >= 2 identities (for negatives) with K >= 2 images
  each (for positives). Identities with fewer than K images are an error that
  names them, unless ``drop_small`` is set: then they are left out (the sampler
  never draws them) and a warning says how many.

  Args:
    source: the training source.
    P: identities per batch.
    K: images per identity.
    drop_small: exclude identities with fewer than K images instead of failing.

  Returns:
    [M] int32, the identity indices batches may draw from (those with >= K images).
  """
  for name, v in (("P", P), ("K", K)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 2:
      raise ValueError(f"{name} must be an integer >= 2 for triplet batches, got {v!r}")
  n = source.num_identities
  if n < 2:
    raise ValueError(f"training needs at least 2 identities, the source has {n}")
  if P > n:
    raise ValueError(f"P={P} is larger than the number of identities ({n})")
  counts = source.images_per_identity()
  small = np.flatnonzero(counts < K)
  if small.size:
    what = _describe([source.identity_names[i] for i in small], counts[small])
    if not drop_small:
      raise SmallIdentitiesError(
          f"K={K} is larger than the number of images of {small.size} of {n} identities: "
          f"{what}. Lower K, or pass drop_small=True to leave those identities out",
          K=K, names=[source.identity_names[i] for i in small], counts=counts[small],
          num_identities=n, listing=what)
    _log.warning("leaving out %d of %d identities with fewer than K=%d images: %s",
                 small.size, n, K, what)
  eligible = np.flatnonzero(counts >= K).astype(np.int32)
  if eligible.size < P:
    raise ValueError(
        f"only {eligible.size} identities have at least K={K} images, fewer than P={P}")
  return eligible
