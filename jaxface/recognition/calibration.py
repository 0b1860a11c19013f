"""Calibrating a gallery from labelled face images: the steps behind ``faces calibrate``.

The threshold arithmetic lives in :mod:`jaxface.recognition.calibrate` (pairs,
FAR) and :mod:`jaxface.recognition.open_set` (one-shot 1:K, FPIR); this module
turns labelled images and their embeddings into what a gallery stores: a
verification threshold from pairs (:func:`calibrate_pairs`) or an open-set one
for a gallery of K people (:func:`calibrate_fpir`). Neither needs images of its
own: embedding them is the caller's. Identities are the images' folder names
(``<root>/<identity>/<image>``, LFW's ``<name>/<name>_NNNN.jpg``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxface.data import lfw
from jaxface.recognition import calibrate, encoders, open_set, siamese

__all__ = ["CalibrationError", "UnsupportedFarError", "CohortError", "LabelledPairs", "PairCalibration",
           "FpirCalibration", "identity_of", "check_far_support", "calibrate_pairs", "train_head",
           "identity_thresholds", "calibrate_fpir", "store_fpir"]


class CalibrationError(ValueError):
  """The labelled images cannot calibrate what was asked."""


class UnsupportedFarError(CalibrationError):
  """Too few impostor pairs to measure ``target_far`` (see :func:`check_far_support`)."""

  def __init__(self, num_negatives: int, target_far: float):
    self.num_negatives, self.target_far = int(num_negatives), float(target_far)
    self.smallest = calibrate.min_supported_far(self.num_negatives)
    # The fewest impostor pairs that measure target_far (None for 0, which no number of pairs measures).
    self.needed = calibrate.negatives_needed(self.target_far) if self.target_far > 0 else None
    super().__init__(f"target_far={self.target_far:g}: {self.num_negatives} impostor (different-person) pairs "
                     f"can measure a FAR down to 1/{self.num_negatives} = {self.smallest:.3g} only"
                     + (f"; FAR <= {self.target_far:g} needs at least {self.needed} impostor pairs"
                        if self.needed else ""))


class CohortError(CalibrationError):
  """Too few faces of people outside the gallery for an S-norm background cohort."""


def identity_of(path: str) -> str:
  """The identity of an image: the name of its folder."""
  return os.path.basename(os.path.dirname(path))


# --------------------------------------------------------------------------- pairs


@dataclasses.dataclass(frozen=True)
class LabelledPairs:
  """Image pairs: ``path1[i]``, ``path2[i]`` and ``same[i]`` (bool [M]), True for one person."""
  path1: list[str]
  path2: list[str]
  same: np.ndarray

  @classmethod
  def from_lfw(cls, pairs_file: str, images_dir: str) -> LabelledPairs:
    """An LFW pairs file over ``images_dir`` (:func:`jaxface.data.lfw.pair_paths`)."""
    return cls(*lfw.pair_paths(pairs_file, images_dir))

  @classmethod
  def from_folder(cls, root: str, *, max_pairs: int = 2000, seed: int = 0) -> LabelledPairs:
    """Balanced same / different pairs sampled from ``root/<identity>/<images>``
    (:func:`jaxface.recognition.siamese.folder_pairs`)."""
    return cls(*siamese.folder_pairs(root, max_pairs=max_pairs, seed=seed))

  def __len__(self) -> int:
    return len(self.path1)

  def images(self) -> list[str]:
    """The distinct images the pairs name, sorted."""
    return sorted(set(self.path1) | set(self.path2))

  def present(self) -> list[str]:
    """:meth:`images` that exist as files."""
    return [p for p in self.images() if os.path.isfile(p)]

  def impostors_within(self, images: Iterable[str]) -> int:
    """Different-person pairs whose two images are both among ``images``."""
    have = set(images)
    return int(sum(not s and a in have and b in have for a, b, s in zip(self.path1, self.path2, self.same)))


def check_far_support(num_negatives: int, target_far: float) -> None:
  """Raises :class:`UnsupportedFarError` when ``num_negatives`` impostor pairs cannot measure
  ``target_far`` (N pairs measure a FAR down to 1/N); no impostor pair at all passes here, the
  pair check of :func:`calibrate_pairs` reports it."""
  if num_negatives == 0:
    return
  if target_far < calibrate.min_supported_far(num_negatives) * (1.0 - 1e-12):
    raise UnsupportedFarError(num_negatives, target_far)


@dataclasses.dataclass(frozen=True)
class PairCalibration:
  """A verification threshold fitted on the pairs whose images both have an embedding.

  ``used`` [M] bool marks those pairs among all M; ``e1``, ``e2`` [P, D] are their
  embeddings, ``same`` [P] their labels and ``distances`` [P] their Euclidean distances.
  ``accuracy``, ``far`` and ``frr`` are the threshold's rates on them.
  """
  threshold: float
  best: bool
  target_far: float | None
  used: np.ndarray
  e1: np.ndarray
  e2: np.ndarray
  same: np.ndarray
  distances: np.ndarray
  accuracy: float
  far: float
  frr: float

  @property
  def method(self) -> str:
    """How the threshold was chosen, in words."""
    return "best accuracy" if self.best else f"FAR <= {self.target_far:g}"

  def record(self, source: str) -> dict[str, Any]:
    """The calibration record a gallery stores beside the threshold (``source``: where the pairs came from)."""
    return {"score": "distance", "method": "best" if self.best else "far", "target": self.target_far,
            "pairs": int(self.used.sum()), "genuine_pairs": int(self.same.sum()),
            "impostor_pairs": int((~self.same).sum()), "accuracy": self.accuracy, "far": self.far,
            "frr": self.frr, "source": source}


def calibrate_pairs(pairs: LabelledPairs, paths: Sequence[str], embeddings: Any, *, best: bool = False,
                    target_far: float = 1e-3) -> PairCalibration:
  """The verification threshold on ``pairs``, from the embeddings of the images that have one::

    pairs = calibration.LabelledPairs.from_folder("people/", max_pairs=2000, seed=0)
    calibration.check_far_support(pairs.impostors_within(pairs.present()), 1e-3)  # before embedding
    ...  # embed the present images: paths, embeddings [N, D]
    cal = calibration.calibrate_pairs(pairs, paths, embeddings, target_far=1e-3)
    gallery.set_thresholds(cal.threshold, info=cal.record(source="people/"))

  Args:
    pairs: the labelled pairs.
    paths: images that have an embedding, ``embeddings[k]`` being that of ``paths[k]``;
      pairs with an image not among them are left out.
    embeddings: [len(paths), D] float.
    best: the threshold of best accuracy instead of ``target_far``.
    target_far: the highest false-accept rate on the pairs, in (0, 1).

  Raises:
    CalibrationError: the pairs left lack a class.
    UnsupportedFarError: too few impostor pairs left to measure ``target_far``.
  """
  emb = np.asarray(embeddings)
  if emb.ndim != 2 or emb.shape[0] != len(paths):
    raise ValueError(f"embeddings: expected [{len(paths)}, D], got shape {list(emb.shape)}")
  row_of = {p: k for k, p in enumerate(paths)}
  same = np.asarray(pairs.same, np.bool_)
  use = np.asarray([a in row_of and b in row_of for a, b in zip(pairs.path1, pairs.path2)], np.bool_)
  if not (same[use].any() and (~same[use]).any()):
    raise CalibrationError("calibration needs same and different pairs whose images both have a face")
  if not best:
    check_far_support(int((~same[use]).sum()), target_far)
  a = emb[[row_of[p] for p, u in zip(pairs.path1, use) if u]]
  b = emb[[row_of[p] for p, u in zip(pairs.path2, use) if u]]
  y = same[use]
  dist = np.linalg.norm(a.astype(np.float64) - b.astype(np.float64), axis=1)
  if best:
    thr = float(calibrate.best_accuracy_threshold(dist, y))
  else:
    thr = float(calibrate.threshold_for_far(dist, y, target_far))
  accepted = dist <= thr
  return PairCalibration(threshold=thr, best=bool(best), target_far=None if best else float(target_far),
                         used=use, e1=a, e2=b, same=y, distances=dist,
                         accuracy=float(np.mean(accepted == y)), far=float(np.mean(accepted[~y])),
                         frr=float(np.mean(~accepted[y])))


def train_head(cal: PairCalibration, *, seed: int = 0, fingerprint: dict | None = None
               ) -> tuple[siamese.Siamese, float]:
  """A Siamese head trained on the calibration pairs: (head, its accuracy at p(same) >= 0.5 on them).

  ``fingerprint`` (the encoder's) is kept in the head's ``meta``, so that it is
  never used on embeddings of another encoder.
  """
  model = siamese.train(cal.e1, cal.e2, cal.same, siamese.SiameseConfig(seed=seed))
  model.meta = {"fingerprint": fingerprint}
  accuracy = float(np.mean((model.predict(cal.e1, cal.e2) >= 0.5) == cal.same))
  return model, accuracy


def identity_thresholds(embeddings: Any, identity_ids: Any, global_threshold: float, *,
                        target_far: float = 0.0) -> dict[int, float] | None:
  """Own thresholds of a gallery's identities (:func:`calibrate.per_identity_thresholds`).

  Returns None when no identity has two or more embeddings (nothing to fit).
  """
  ids = np.asarray(identity_ids)
  counts = np.bincount(ids) if ids.size else np.zeros(0, np.int64)
  if not (counts >= 2).any():
    return None
  return calibrate.per_identity_thresholds(embeddings, ids, global_threshold=global_threshold,
                                           target_far=target_far)


# --------------------------------------------------------------------------- open set (FPIR)


@dataclasses.dataclass(frozen=True)
class FpirCalibration:
  """A one-shot 1:K threshold for ``gallery_size`` people at ``target_fpir``.

  ``cohort`` [N] bool marks the embeddings set aside as the S-norm background
  (None for ``score="distance"``); ``simulation`` is
  :func:`open_set.fpir_threshold`'s report (searches run, DIR, measured FPIR).
  """
  threshold: float
  score: str
  top_k: int
  target_fpir: float
  gallery_size: int
  rounds: int
  cohort: np.ndarray | None
  simulation: dict

  @property
  def cohort_size(self) -> int:
    return 0 if self.cohort is None else int(self.cohort.sum())

  def record(self, source: str) -> dict[str, Any]:
    """The calibration record a gallery stores beside the threshold."""
    info = self.simulation
    return {"score": self.score, "top_k": self.top_k, "method": "fpir", "target": float(self.target_fpir),
            "gallery_size": int(self.gallery_size), "rounds": int(self.rounds),
            "nonmated_searches": int(info["num_nonmated"]), "mated_searches": int(info["num_mated"]),
            "dir": float(info["dir"]), "fpir": float(info["fpir_measured"]), "cohort": self.cohort_size,
            "source": source}


def calibrate_fpir(embeddings: Any, names: Sequence[str], *, gallery_size: int, target_fpir: float,
                   score: str = "snorm", enrolled: Iterable[str] = (), snorm_top_k: int = 100,
                   rounds: int = 10, seed: int = 0) -> FpirCalibration:
  """The threshold at which at most ``target_fpir`` of strangers' searches of a one-shot gallery of
  ``gallery_size`` people return someone (simulated on labelled embeddings, :mod:`open_set`)::

    cal = calibration.calibrate_fpir(embeddings, names, gallery_size=K, target_fpir=0.01,
                                     enrolled=gallery_names)
    calibration.store_fpir(gallery, cal, embeddings, paths, source="people/")

  With ``score="snorm"`` whole identities are first set aside as the background
  cohort (:func:`calibrate.choose_cohort`), never people in ``enrolled`` (the
  gallery's names), and scores are S-norm over each face's ``snorm_top_k``
  nearest cohort faces (0: all of them).

  Args:
    embeddings: [N, D] float.
    names: [N] identity of each row.
    gallery_size: people the gallery holds (>= 1).
    target_fpir: in (0, 1).
    score: "distance" or "snorm".
    enrolled: identities that must stay out of the cohort.
    snorm_top_k: 0 or >= 2.
    rounds, seed: simulated galleries and their seed.

  Raises:
    CohortError: fewer than 2 faces of people who are not enrolled for the cohort.
    ValueError: bad arguments, or too few strangers' searches for ``target_fpir``.
  """
  if score not in open_set.SCORES:
    raise ValueError(f"score: expected one of {open_set.SCORES}, got {score!r}")
  if not 0 < target_fpir < 1:
    raise ValueError(f"target_fpir: expected in (0, 1), got {target_fpir!r}")
  if gallery_size < 1 or rounds < 1 or snorm_top_k < 0 or snorm_top_k == 1:
    raise ValueError("gallery_size must be >= 1, rounds >= 1 and snorm_top_k 0 or >= 2")
  names = list(names)
  labels = np.unique(names, return_inverse=True)[1].astype(np.int64)
  cohort, top_k = None, 0
  if score == "snorm":
    banned = set(enrolled)
    # Background faces: whole identities, none of them enrolled, never searched in the simulation.
    cohort = calibrate.choose_cohort(labels, exclude=[n in banned for n in names], seed=seed)
    if cohort.sum() < 2:
      raise CohortError(f"the calibration images leave {int(cohort.sum())} faces of people who are not "
                        "enrolled for the background cohort (>= 2 needed)")
    top_k = min(snorm_top_k, int(cohort.sum())) if snorm_top_k else 0
  thr, info = open_set.fpir_threshold(embeddings, labels, gallery_size, target_fpir, rounds=rounds, seed=seed,
                                      score=score, cohort=cohort, top_k=top_k)
  return FpirCalibration(threshold=float(thr), score=score, top_k=top_k, target_fpir=float(target_fpir),
                         gallery_size=int(gallery_size), rounds=int(rounds), cohort=cohort, simulation=info)


def store_fpir(gal, cal: FpirCalibration, embeddings: Any, paths: Sequence[str], *, source: str) -> dict:
  """Writes ``cal`` to the gallery ``gal`` (open for writing): the threshold, its record and, for
  S-norm, the cohort's embeddings with their files (absolute path, sha256). Returns the record."""
  stored = cal.record(source)
  if cal.cohort is None:
    gal.set_thresholds(cal.threshold, info=stored)
  else:
    rows = np.flatnonzero(cal.cohort)
    gal.set_thresholds(cal.threshold, info=stored, cohort=np.asarray(embeddings)[rows],
                       cohort_sources=[{"path": os.path.abspath(paths[r]),
                                        "sha256": encoders.content_sha256(paths[r])} for r in rows])
  return stored
