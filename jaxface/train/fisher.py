"""Fisherfaces (PCA then LDA on pixels) fitted on the training identities, fused with a learned embedding.

With few training identities (30 on AT&T/ORL) a network from scratch and a
linear discriminant on pixels make different mistakes: the network tolerates
shifts and zoom, the linear projection keeps the global face layout it would
otherwise memorise away. :func:`fit` and :func:`project` are the Fisherfaces;
:func:`fuse` concatenates them with the embedding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.linalg


@dataclasses.dataclass(frozen=True)
class Fisherfaces:
  """A fitted projection: ``mean [P] float64`` (P = pixels), ``basis [P, k] float64``."""
  mean: np.ndarray
  basis: np.ndarray


def _standardized(images, name: str) -> np.ndarray:
  """``[N, *spatial, C]`` (any real dtype) -> ``[N, P] float64``, each row zero mean and unit std."""
  x = np.asarray(images)
  if x.ndim < 2 or x.shape[0] < 1 or not np.issubdtype(x.dtype, np.number):
    raise ValueError(f"{name} must be a non-empty numeric [N, ...] array, got shape {x.shape} "
                     f"and dtype {x.dtype}")
  x = x.reshape(x.shape[0], -1).astype(np.float64)
  x = x - x.mean(axis=1, keepdims=True)
  # A flat image stays all zeros rather than dividing by 0.
  return x / np.maximum(x.std(axis=1, keepdims=True), 1e-6)


def fit(images, labels, num_pca: int = 80) -> Fisherfaces:
  """Fits Fisherfaces on training images (Belhumeur et al. 1997).

  Images are standardised per image (zero mean, unit std over all pixels),
  projected onto the top ``num_pca`` principal components of the training images
  (so the within-class scatter is invertible), then onto the ``C - 1``
  generalised eigenvectors of (between-class scatter, within-class scatter) with
  the largest eigenvalues.

  Args:
    images: ``[N, H, W, C]`` (any spatial rank) uint8 or float training images.
    labels: ``[N]`` int identities, at least 2 distinct.
    num_pca: principal components kept before LDA; capped at ``N - C`` (C =
      identities) so the within-class scatter has full rank.

  Returns:
    :class:`Fisherfaces` with ``C - 1`` (or fewer, if ``num_pca`` is smaller) directions.
  """
  x = _standardized(images, "images")
  y = np.asarray(labels)
  if y.shape != (x.shape[0],):
    raise ValueError(f"labels must be [N]=[{x.shape[0]}], got shape {y.shape}")
  classes = np.unique(y)
  if classes.size < 2:
    raise ValueError(f"labels: Fisherfaces needs >= 2 identities, got {classes.size}")
  k_pca = min(int(num_pca), x.shape[0] - classes.size, x.shape[1])
  if k_pca < 1:
    raise ValueError(f"num_pca={num_pca}: needs >= 1 component and more images than identities "
                     f"(got {x.shape[0]} images of {classes.size} identities)")
  mean = x.mean(axis=0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  pca = vt[:k_pca].T                                               # [P, k_pca]
  z = (x - mean) @ pca                                             # [N, k_pca], zero mean
  # Scatter matrices from class means (one pass, no loop over images).
  onehot = (y[:, None] == classes[None, :]).astype(np.float64)     # [N, C]
  counts = onehot.sum(axis=0)
  class_means = (onehot.T @ z) / counts[:, None]                   # [C, k_pca]
  within = z - class_means[np.searchsorted(classes, y)]
  s_w = within.T @ within
  s_b = (class_means * counts[:, None]).T @ class_means            # sum_c n_c m_c m_c^T (global mean 0)
  k_lda = min(classes.size - 1, k_pca)
  # Tiny ridge: keeps eigh's Cholesky of s_w stable when a component has little within-class spread.
  ridge = 1e-9 * np.trace(s_w) / k_pca
  _, vecs = scipy.linalg.eigh(s_b, s_w + ridge * np.eye(k_pca))
  lda = vecs[:, ::-1][:, :k_lda]                                   # largest eigenvalues first
  return Fisherfaces(mean=mean, basis=pca @ lda)


def project(model: Fisherfaces, images) -> np.ndarray:
  """``[N, H, W, C]`` images (the layout ``fit`` saw) -> ``[N, k] float32`` unit-norm projections."""
  x = _standardized(images, "images")
  if x.shape[1] != model.mean.shape[0]:
    raise ValueError(f"images have {x.shape[1]} values each; the projection was fitted on "
                     f"{model.mean.shape[0]}")
  f = (x - model.mean) @ model.basis
  return (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def fuse(emb, train_images, train_labels, holdout_images, *, weight: float,
         num_pca: int = 80) -> np.ndarray:
  """Appends ``weight`` times the Fisherfaces projection of the held-out images to their embeddings.

  The squared distance becomes ``||e_i - e_j||^2 + weight^2 ||f_i - f_j||^2`` (the
  projection is unit-norm). Both parts are fitted on the training identities
  only; held-out images are only projected.

  Args:
    emb: ``[N, D] float32`` held-out embeddings (one row per ``holdout_images`` row).
    train_images, train_labels: the training identities' images ``[M, H, W, C]`` and ``[M]`` labels.
    holdout_images: ``[N, H, W, C]``, same layout as the training images.
    weight: > 0, the projection's weight in the concatenation.
    num_pca: see :func:`fit`.

  Returns:
    ``[N, D + k] float32``.
  """
  e = np.asarray(emb, np.float32)
  if e.ndim != 2 or e.shape[0] != np.shape(holdout_images)[0]:
    raise ValueError(f"emb must be [N, D] with N = {np.shape(holdout_images)[0]} held-out images, "
                     f"got shape {e.shape}")
  if not (np.isfinite(weight) and weight > 0):
    raise ValueError(f"weight must be finite and > 0, got {weight}")
  model = fit(train_images, train_labels, num_pca)
  return np.concatenate([e, np.float32(weight) * project(model, holdout_images)], axis=1)
