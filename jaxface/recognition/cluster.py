"""Grouping faces by person: Chinese whispers over a distance-threshold graph, as dlib does it.

:func:`chinese_whispers` returns the same labels as ``dlib.chinese_whispers_clustering`` (the
graph, the update rule and dlib's random visiting order, ``jaxface.dlib_rand``, are dlib's: see
its docstring); :func:`cluster_faces` turns labels into the clusters a photo collection is split
into (``python -m experiments.faces cluster``).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxface.dlib_rand import DlibRand

__all__ = ["similarity_edges", "brute_force_edges", "chinese_whispers", "cluster_faces",
           "cluster_names", "Clustering", "UNCLUSTERED",
           "check_output_folder", "write_cluster_folders", "OutputFolderError", "MANIFEST"]

UNCLUSTERED = -1
_BLOCK = 1024  # rows of the distance matrix per jnp call: [1024, N] float32, bounded memory

# --------------------------------------------------------------------------- the graph


def _check_embeddings(embeddings: Any, name: str = "embeddings") -> np.ndarray:
  x = np.asarray(embeddings)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected [N, D] face embeddings, got shape {x.shape}")
  if x.shape[0] and x.shape[1] == 0:
    raise ValueError(f"{name}: expected [N, D] face embeddings with D >= 1, got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{name}: expected numbers, got dtype {x.dtype}")
  x = x.astype(np.float64)
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    rows = np.flatnonzero(bad)
    raise ValueError(f"{name}: {rows.size} rows hold NaN or inf (first: row {int(rows[0])}); "
                     "every face needs a finite embedding")
  return x


def _check_threshold(threshold: Any) -> float:
  if np.ndim(threshold) != 0 or isinstance(threshold, bool):
    raise ValueError(f"threshold: expected one number, got {threshold!r}")
  t = float(threshold)
  if not (np.isfinite(t) and t > 0):
    raise ValueError(f"threshold: expected a finite distance > 0 (dlib requires it), got {threshold!r}")
  return t


@jax.jit
def _candidates(rows: jax.Array, allx: jax.Array, sq_rows: jax.Array, sq_all: jax.Array,
                limit: jax.Array) -> jax.Array:
  """[B, N] bool: squared distance (norm expansion, float32) within ``limit``² plus a margin far
  above float32's rounding, so that no pair closer than ``limit`` is missed."""
  d2 = sq_rows[:, None] + sq_all[None, :] - 2.0 * (rows @ allx.T)
  margin = 1e-4 * (sq_rows[:, None] + sq_all[None, :]) + 1e-6
  return d2 <= limit * limit + margin


def similarity_edges(embeddings: Any, threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """Pairs of faces closer than ``threshold`` (Euclidean, strictly): int64 (i [E], j [E]) with
  i < j, sorted by (i, j). The self-pairs (i, i), which dlib's graph also holds, are implied.

  Candidates come from jnp (float32, blocks of rows); each is decided in float64 from the
  difference of the two embeddings, as dlib decides it.
  """
  x = _check_embeddings(embeddings)
  t = _check_threshold(threshold)
  n = x.shape[0]
  if n < 2:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  x32 = jnp.asarray(x, jnp.float32)
  sq = jnp.sum(x32 * x32, axis=1)
  block = min(_BLOCK, n)
  pad = -n % block  # equal blocks: one compilation per N
  xp, sqp = jnp.pad(x32, ((0, pad), (0, 0))), jnp.pad(sq, (0, pad))
  ii, jj = [], []
  for lo in range(0, n, block):
    mask = np.asarray(_candidates(xp[lo:lo + block], x32, sqp[lo:lo + block], sq, jnp.float32(t)))
    r, c = np.nonzero(mask[:min(block, n - lo)])
    r = r + lo
    keep = r < c
    ii.append(r[keep])
    jj.append(c[keep])
  i, j = np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64)
  d = x[i] - x[j]
  exact = np.sqrt(np.einsum("ed,ed->e", d, d)) < t
  return i[exact], j[exact]


def brute_force_edges(embeddings: Any, threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """Slow reference of :func:`similarity_edges`: dlib's double loop over i <= j, in float64."""
  x = _check_embeddings(embeddings)
  t = _check_threshold(threshold)
  ii, jj = [], []
  for i in range(x.shape[0]):
    for j in range(i + 1, x.shape[0]):
      if np.sqrt(np.sum((x[i] - x[j]) ** 2)) < t:
        ii.append(i)
        jj.append(j)
  return np.asarray(ii, np.int64), np.asarray(jj, np.int64)


# --------------------------------------------------------------------------- chinese whispers


def _propagate(neighbors: list[list[int]], order: np.ndarray) -> list[int]:
  """Labels after visiting the nodes ``order`` one after another (dlib's update rule).

  Plain Python on purpose: each visit reads the labels the previous visits wrote (that
  sequential dependency IS the algorithm), so it cannot be vectorized or jitted as one
  step, and per visit the work is a handful of neighbours: list and dict operations beat
  the fixed cost of a NumPy call there.
  """
  labels = list(range(len(neighbors)))
  for node in order.tolist():
    counts: dict[int, int] = {}
    for other in neighbors[node]:
      lab = labels[other]
      counts[lab] = counts.get(lab, 0) + 1
    best_label, best = labels[node], -1
    for lab, c in counts.items():
      if c > best or (c == best and lab < best_label):  # most frequent, then smallest (std::map)
        best_label, best = lab, c
    labels[node] = best_label
  return labels


def chinese_whispers(embeddings: Any, threshold: float = 0.5, iterations: int = 100,
                     seed: int | str = "") -> np.ndarray:
  """Cluster labels int64 [N] of face embeddings [N, D]; identical to
  ``dlib.chinese_whispers_clustering(list_of_rows, threshold)`` with the defaults.

  Args:
    embeddings: [N, D] finite float embeddings (N may be 0).
    threshold: faces closer than this (Euclidean, strictly) are linked; > 0.
    iterations: dlib's ``num_iterations``: ``iterations * N`` node visits.
    seed: ``dlib::rand``'s seed string ("" is dlib's default; see :class:`jaxface.dlib_rand.DlibRand`).

  Returns:
    labels 0..K-1, numbered in order of first appearance (face 0 has label 0).

  The graph: an edge between faces i <= j at Euclidean distance strictly below ``threshold``
  (every face has a self-edge), all of weight 1, found by a float32 jnp pass with a margin and
  decided exactly in float64 as dlib decides them in double. Then ``iterations * N`` times: visit
  node ``rand.uint64() % N`` and give it the label most frequent among its neighbours (itself
  included), the smallest label on a tie (dlib walks a ``std::map`` in key order). Labels start
  as node indices. dlib's own random stream makes the labels, not just the partition, equal.

  Raises:
    ValueError: a bad shape, NaN/inf rows, threshold <= 0 or a negative ``iterations``;
      the message names the parameter.
  """
  x = _check_embeddings(embeddings)
  _check_threshold(threshold)
  if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
    raise ValueError(f"iterations: expected an int >= 0, got {iterations!r}")
  rnd = DlibRand(seed)
  n = x.shape[0]
  if n == 0:
    return np.zeros(0, np.int64)
  i, j = similarity_edges(x, threshold)
  neighbors: list[list[int]] = [[k] for k in range(n)]  # the self-edge of distance 0
  for a, b in zip(i.tolist(), j.tolist()):
    neighbors[a].append(b)
    neighbors[b].append(a)
  order = (rnd.uint64(int(iterations) * n) % np.uint64(n)).astype(np.int64)
  labels = _propagate(neighbors, order)
  first: dict[int, int] = {}
  return np.asarray([first.setdefault(lab, len(first)) for lab in labels], np.int64)


# --------------------------------------------------------------------------- photo collections


@dataclasses.dataclass(frozen=True)
class Clustering:
  """Faces split into clusters.

  labels: int64 [N] chinese-whispers labels; cluster: int64 [N], 0..K-1 by decreasing cluster
  size (ties: the cluster whose first face comes first), :data:`UNCLUSTERED` (-1) for faces
  in groups smaller than ``min_cluster_size``; sizes: int64 [K] faces per cluster.
  """
  labels: np.ndarray
  cluster: np.ndarray
  sizes: np.ndarray

  @property
  def num_clusters(self) -> int:
    return int(self.sizes.shape[0])

  @property
  def num_unclustered(self) -> int:
    return int(np.sum(self.cluster == UNCLUSTERED))


def cluster_faces(embeddings: Any, *, threshold: float = 0.5, min_cluster_size: int = 2,
                  iterations: int = 100, seed: int | str = "") -> Clustering:
  """Chinese whispers over face embeddings [N, D], then the clusters worth a folder.

  ``min_cluster_size`` (>= 1): smaller groups are :data:`UNCLUSTERED` (with 2, a face seen once).
  """
  if isinstance(min_cluster_size, bool) or not isinstance(min_cluster_size, (int, np.integer)) \
      or min_cluster_size < 1:
    raise ValueError(f"min_cluster_size: expected an int >= 1, got {min_cluster_size!r}")
  labels = chinese_whispers(embeddings, threshold, iterations, seed)
  counts = np.bincount(labels) if labels.size else np.zeros(0, np.int64)
  big = np.flatnonzero(counts >= min_cluster_size)  # labels already in first-appearance order
  big = big[np.argsort(-counts[big], kind="stable")]
  remap = np.full(counts.shape[0], UNCLUSTERED, np.int64)
  remap[big] = np.arange(big.shape[0])
  return Clustering(labels, remap[labels] if labels.size else labels, counts[big].astype(np.int64))


def cluster_names(clustering: Clustering) -> list[str]:
  """Folder names per face: ``person_001``... (1-based, zero-padded to the cluster count's
  width, at least 3 digits) or ``unclustered``."""
  width = max(3, len(str(clustering.num_clusters)))
  return ["unclustered" if c == UNCLUSTERED else f"person_{c + 1:0{width}d}"
          for c in clustering.cluster.tolist()]


# --------------------------------------------------------------------------- output folders

MANIFEST = "clusters.csv"
_MANIFEST_TMP = f".{MANIFEST}.tmp"
MANIFEST_COLUMNS = ("path", "face", "left", "top", "right", "bottom", "cluster", "file")


class OutputFolderError(ValueError):
  """The output folder cannot be used as it is; the message names it."""


def _written_before(out: str) -> set[str]:
  """The files (relative to ``out``) an earlier :func:`write_cluster_folders` listed in its manifest."""
  if not os.path.isfile(os.path.join(out, MANIFEST)):
    raise OutputFolderError(f"{out}: not empty and holds no {MANIFEST} of an earlier clustering run; "
                            "nothing was deleted")
  try:
    with open(os.path.join(out, MANIFEST), newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise OutputFolderError(f"{out}: not empty and no readable {MANIFEST} of an earlier clustering "
                            f"({e}); nothing was deleted") from e
  return {os.path.normpath(r["file"]) for r in rows if r.get("file")}


def check_output_folder(out: str, *, overwrite: bool = False) -> list[str]:
  """Whether ``out`` may receive the clusters; returns the files of an earlier run to delete.

  A missing or empty folder is fine. A non-empty one needs ``overwrite`` AND must hold only what an
  earlier run wrote there (its manifest and the folders of files that manifest lists): nothing
  else is ever deleted. Checked before any work; nothing is changed here.

  Raises:
    OutputFolderError: naming ``out`` and, when it holds other things, the first of them.
  """
  if not os.path.lexists(out):
    return []
  if not os.path.isdir(out):
    raise OutputFolderError(f"{out}: exists and is not a folder")
  entries = sorted(os.listdir(out))
  if not entries:
    return []
  if not overwrite:
    raise OutputFolderError(f"{out}: folder is not empty")
  listed = _written_before(out)
  remove = []
  for entry in entries:
    full = os.path.join(out, entry)
    if entry == MANIFEST:
      continue
    if entry == _MANIFEST_TMP:  # a run killed while writing its manifest
      remove.append(entry)
      continue
    if not os.path.isdir(full) or os.path.islink(full):
      raise OutputFolderError(f"{out}: {entry} was not written by a clustering run; nothing was deleted")
    for name in sorted(os.listdir(full)):
      rel = os.path.join(entry, name)
      full_rel = os.path.join(out, rel)
      if rel not in listed or (os.path.isdir(full_rel) and not os.path.islink(full_rel)):
        raise OutputFolderError(f"{out}: {rel} was not written by a clustering run; nothing was deleted")
      remove.append(rel)
  return remove


def _link_name(taken: set[str], source: str) -> str:
  """A file name not in ``taken`` (the names of one cluster folder) for ``source``: its base
  name, or ``stem-2.ext``, ``stem-3.ext``... when another image (from another folder) took it."""
  base = os.path.basename(source)
  stem, ext = os.path.splitext(base)
  name, k = base, 1
  while name in taken:
    k += 1
    name = f"{stem}-{k}{ext}"
  taken.add(name)
  return name


def write_cluster_folders(out: str, sources: Sequence[str], boxes: Any, clustering: Clustering, *,
                          copy: bool = False, overwrite: bool = False) -> list[dict]:
  """One folder per cluster under ``out`` (``person_001``..., ``unclustered``) holding a symlink
  to (or, ``copy``, a copy of) each image with a face in it, and ``out/clusters.csv``.

  Args:
    sources: image path of each face [N]: an image's faces one after another, in the detector's
      order (the manifest's ``face`` is the position within the image).
    boxes: int [N, 4] (left, top, right, bottom) of each face.
    clustering: of the N faces (:func:`cluster_faces`).
    overwrite: replace an earlier run's output (see :func:`check_output_folder`).

  Returns:
    the manifest rows (``MANIFEST_COLUMNS``), one per face.
  """
  b = np.asarray(boxes, np.int64).reshape(-1, 4)
  if not (len(sources) == b.shape[0] == clustering.cluster.shape[0]):
    raise ValueError(f"sources, boxes, clustering: {len(sources)}, {b.shape[0]} and "
                     f"{clustering.cluster.shape[0]} faces; expected the same number")
  for rel in check_output_folder(out, overwrite=overwrite):
    os.remove(os.path.join(out, rel))  # a symlink itself, never its target
  if os.path.isdir(out):
    for entry in os.listdir(out):
      if os.path.isdir(os.path.join(out, entry)):
        os.rmdir(os.path.join(out, entry))  # empty now; rmdir refuses anything else
  os.makedirs(out, exist_ok=True)
  names = cluster_names(clustering)
  taken: dict[str, set[str]] = {}  # per folder: file names in use
  placed: dict[tuple[str, str], str] = {}  # (folder, source) -> its file name there
  rows = []
  for k, (src, folder) in enumerate(zip(sources, names)):
    name = placed.get((folder, src))
    if name is None:  # an image's first face in this folder
      name = placed[folder, src] = _link_name(taken.setdefault(folder, set()), src)
      target = os.path.join(out, folder, name)
      os.makedirs(os.path.join(out, folder), exist_ok=True)
      if copy:
        shutil.copy2(src, target)
      else:
        os.symlink(os.path.abspath(src), target)
    l, t, r, bt = (int(v) for v in b[k])
    rows.append({"path": src, "face": 0, "left": l, "top": t, "right": r, "bottom": bt, "cluster": folder,
                 "file": os.path.join(folder, name)})
  face_of: dict[str, int] = {}
  for row in rows:  # face index within its image, in the order given
    row["face"] = face_of[row["path"]] = face_of.get(row["path"], -1) + 1
  tmp = os.path.join(out, _MANIFEST_TMP)
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, MANIFEST_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, os.path.join(out, MANIFEST))
  return rows
