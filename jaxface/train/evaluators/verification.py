"""Held-out verification and identification of a trained encoder (``eval/...`` metrics).

:class:`VerificationEvaluator` embeds the held-out images with the run's
test-time augmentation (``jaxface.train.model.make_embed_fn``) and scores them
with ``jaxface.metrics.evaluate_embeddings``: k-fold verification accuracy, AUC,
TAR at fixed FAR, threshold, closed- and open-set identification, optionally
with S-norm and Fisherfaces fusion. Its inputs are given when it is built; it
never loads data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from jaxface import metrics as metrics_lib
from jaxface.config_dict import invalid
from jaxface.data import source as source_lib
from jaxface.train.config import EvalConfig
from jaxface.train.model import embed_source
from jaxface.train.step import TrainingError


def cohort_indices(num_train: int, max_size: int, seed: int) -> np.ndarray:
  """Rows of the training source forming the S-norm cohort: all of them, or a subset of
  ``max_size`` (sorted) drawn with ``seed`` when there are more. ``[M] int64``."""
  if num_train <= max_size:
    return np.arange(num_train)
  rng = np.random.default_rng((seed, 7))
  return np.sort(rng.choice(num_train, max_size, replace=False))


class VerificationEvaluator:
  """Verification and identification on held-out identities.

  Args:
    embed: ``embed(params, rest, images uint8) -> [B, D] float32``, the run's
      eval-mode embedding (``make_embed_fn``); None for an evaluator that only
      scores given embeddings (:meth:`metrics`).
    holdout: the held-out images (identities never trained on).
    config: the run's ``eval`` group.
    seed: the run's seed (the metrics' random folds and pairs, the cohort subset).
    train: the training split: the S-norm cohort and the Fisherfaces' training
      images; required with ``score_norm="snorm"`` or ``fisher_weight > 0``.

  Two optional ways of scoring pairs use ``train``: ``score_norm="snorm"``, each
  pair's squared distance cohort S-normed (``jaxface.score_norm``) against the
  embeddings of the training images (a seeded subset of at most
  ``score_norm_cohort``; ``score_norm_top_k``: each image's nearest cohort images
  only); ``fisher_weight > 0``, a Fisherfaces projection of the pixels
  (``jaxface.train.fisher``) fitted on the training identities joins the
  embedding: concatenated with that weight, or, with S-norm, its own S-normed
  distance added with that weight (score-level fusion).

  Raises:
    ValueError: ``train`` missing where the config needs it.
  """

  def __init__(self, embed: Callable | None, holdout: source_lib.ImageSource, config: EvalConfig, *,
               seed: int, train: source_lib.ImageSource | None = None):
    if train is None:
      for name, on in (("score_norm", config.score_norm != "none"), ("fisher_weight", config.fisher_weight > 0)):
        if on:
          raise invalid(name, getattr(config, name), "the evaluation needs the training split (train=)")
    self.embed, self.holdout, self.config, self.seed, self.train = embed, holdout, config, seed, train
    self.roc: dict[str, np.ndarray] | None = None  # of the latest metrics: fpr, tpr

  def run(self, params, rest) -> Iterator[tuple[str, float | None]]:
    """Yields the ``("eval/<name>", value)`` metrics of the encoder ``params``, ``rest``
    (None: undefined, e.g. TAR at a FAR finer than 1 / #negative pairs)."""
    yield from self.metrics(*self.embeddings(params, rest)).items()

  def cohort_rows(self) -> np.ndarray:
    """Rows of ``train`` whose embeddings form the S-norm cohort (:func:`cohort_indices`)."""
    return cohort_indices(len(self.train), self.config.score_norm_cohort, self.seed)

  def embeddings(self, params, rest) -> tuple[np.ndarray, np.ndarray | None]:
    """Held-out embeddings ``[N, D] float32`` and, with S-norm, the cohort's ``[M, D] float32``
    (else None)."""
    batch = self.config.eval_batch_size
    emb = embed_source(self.embed, params, rest, self.holdout, batch)
    if self.config.score_norm == "none":
      return emb, None
    return emb, embed_source(self.embed, params, rest, self.train, batch, self.cohort_rows())

  def metrics(self, emb: np.ndarray, cohort: np.ndarray | None = None) -> dict[str, float | None]:
    """The ``eval/...`` metrics of held-out embeddings ``emb [N, D]`` (one row per held-out
    image), with S-norm against ``cohort [M, D]`` (the :meth:`cohort_rows` embeddings);
    keeps the ROC curve in ``self.roc``.

    Raises:
      TrainingError: non-finite embeddings.
      ValueError: S-norm without a cohort, or ``score_norm_top_k`` above its size.
    """
    if not np.all(np.isfinite(emb)):
      raise TrainingError("held-out embeddings are not finite")
    pair_distance = None
    if self.config.score_norm == "snorm":
      if cohort is None:
        raise invalid("score_norm", "snorm", "no cohort embeddings were given")
      if not np.all(np.isfinite(cohort)):
        raise TrainingError("cohort (training image) embeddings are not finite")
      pair_distance = self._snorm_scores(emb, cohort)
    elif self.config.fisher_weight > 0:
      emb = self._fuse_fisherfaces(emb)
    results, self.roc = metrics_lib.evaluate_embeddings(emb, self.holdout.labels, seed=self.seed,
                                                        pair_distance=pair_distance)
    # NaN (e.g. TAR at a FAR finer than 1/#negative pairs) is stored as JSON null.
    return {k: (float(v) if np.isfinite(v) else None) for k, v in results.items()}

  def _all_images(self, source: source_lib.ImageSource) -> np.ndarray:
    return source.get(np.arange(len(source)))

  def _fuse_fisherfaces(self, emb: np.ndarray) -> np.ndarray:
    """``[N, D]`` -> ``[N, D + k]``: appends ``fisher_weight`` times the Fisherfaces projection
    (fitted on the training identities' images, with ``extra_synthetic`` the synthetic ones
    too) of each held-out image."""
    from jaxface.train import fisher
    return fisher.fuse(emb, self._all_images(self.train), self.train.labels,
                       self._all_images(self.holdout), weight=self.config.fisher_weight,
                       num_pca=self.config.fisher_pca)

  def _snorm_scores(self, emb: np.ndarray, cohort: np.ndarray) -> Callable:
    """``pair_distance(i, j) -> [M]`` for `metrics.evaluate_embeddings`: the S-normed squared
    distance of held-out rows i, j, plus ``fisher_weight`` times the S-normed distance of
    their Fisherfaces projections (cohort: the same training images' projections)."""
    from jaxface import score_norm
    cfg = self.config
    if cfg.score_norm_top_k > len(cohort):
      raise invalid("score_norm_top_k", cfg.score_norm_top_k,
                    f"the cohort has only {len(cohort)} training images")
    feats = [(1.0, emb, cohort)]
    if cfg.fisher_weight > 0:
      from jaxface.train import fisher
      train_images = self._all_images(self.train)
      model = fisher.fit(train_images, self.train.labels, num_pca=cfg.fisher_pca)
      feats.append((cfg.fisher_weight, fisher.project(model, self._all_images(self.holdout)),
                    fisher.project(model, train_images[self.cohort_rows()])))
    terms = []
    for weight, x, c in feats:
      mean, std = (np.asarray(a) for a in score_norm.cohort_stats(x, c, top_k=cfg.score_norm_top_k))
      terms.append((weight, x, mean, std))

    def pair_distance(i: np.ndarray, j: np.ndarray) -> np.ndarray:
      total = np.zeros(i.shape[0], np.float64)
      for weight, x, mean, std in terms:
        d = metrics_lib.pair_distances(x, i, j)
        total += weight * np.asarray(score_norm.snorm(d, mean[i], std[i], mean[j], std[j]),
                                     np.float64)
      return total

    return pair_distance


def format_results(r: dict) -> str:
  """The one-line summary of ``eval/...`` results (with ``eval/step``) that runs print."""
  f = lambda key: "n/a" if r.get(key) is None else f"{r[key]:.4f}"
  return (f"eval (held-out identities, step {r['eval/step']}): accuracy {f('eval/accuracy')}"
          f" +- {f('eval/accuracy_std')}  AUC {f('eval/auc')}  TAR@FAR=1e-2 {f('eval/tar@far=1e-2')}"
          f"  TAR@FAR=1e-3 {f('eval/tar@far=1e-3')}  threshold {f('eval/threshold')}  "
          f"rank-1 {f('eval/rank1')}  open-set FAR {f('eval/open_set/far')}")
