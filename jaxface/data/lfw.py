"""LFW pair lists: parsing ``pairs.txt``-style files and the image paths they name.

Format (LFW): the first line is ``N`` (N matched then N mismatched pairs) or
``F N`` (F folds, each N matched then N mismatched pairs); then one pair per
line, ``name i j`` (same person) or ``name1 i name2 j`` (different people).
Image ``i`` of ``name`` is ``<name>/<name>_<i:04d>.jpg`` under the image root;
indexes are 1-based. Blank lines are ignored.

  pairs = lfw.read_pairs("pairsDevTest.txt")    # Pairs: names, indexes, labels, folds
  p1, p2, same = lfw.pair_paths("pairsDevTest.txt", "lfw/")  # image paths and labels
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

__all__ = ["Pairs", "image_relpath", "read_pairs", "pair_paths"]


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Parsed LFW pairs: M pairs of (name, 1-based index) plus labels."""
  name1: tuple[str, ...]
  index1: np.ndarray  # [M] int64, 1-based
  name2: tuple[str, ...]
  index2: np.ndarray  # [M] int64
  same: np.ndarray  # [M] bool
  folds: np.ndarray | None  # [M] int64 fold id from an "F N" header, else None

  def __len__(self) -> int:
    return len(self.name1)

  def images(self) -> list[tuple[str, int]]:
    """Distinct (name, index) images, in order of first use."""
    seen: dict[tuple[str, int], None] = {}
    for n1, i1, n2, i2 in zip(self.name1, self.index1.tolist(), self.name2, self.index2.tolist()):
      seen.setdefault((n1, i1))
      seen.setdefault((n2, i2))
    return list(seen)


def image_relpath(name: str, index: int) -> str:
  """``name/name_%04d.jpg``, the LFW file naming."""
  return os.path.join(name, f"{name}_{index:04d}.jpg")


def read_pairs(path: str) -> Pairs:
  """Parses an LFW pairs file (see the module docstring); errors name file and line.

  Raises:
    FileNotFoundError: no such file.
    ValueError: bad header, bad line, or a pair count that disagrees with the header.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  if not lines or not lines[0].strip():
    raise ValueError(f"{path}: line 1: empty file, expected a header 'N' or 'FOLDS N'")
  header = lines[0].split()
  try:
    counts = [int(v) for v in header]
  except ValueError:
    raise ValueError(f"{path}: line 1: header must be 'N' or 'FOLDS N' integers, got {lines[0]!r}") from None
  if len(counts) not in (1, 2) or min(counts) < 1:
    raise ValueError(f"{path}: line 1: header must be 'N' or 'FOLDS N' positive integers, got {lines[0]!r}")
  num_folds, per_class = (1, counts[0]) if len(counts) == 1 else (counts[0], counts[1])
  body = [(k + 2, ln) for k, ln in enumerate(lines[1:]) if ln.strip()]
  expected = 2 * per_class * num_folds
  if len(body) != expected:
    raise ValueError(f"{path}: header {lines[0].strip()!r} announces {expected} pairs, found {len(body)}")
  name1, idx1, name2, idx2, same = [], [], [], [], []
  for lineno, ln in body:
    fields = ln.split()
    try:
      if len(fields) == 3:
        n1, i1, n2, i2 = fields[0], int(fields[1]), fields[0], int(fields[2])
      elif len(fields) == 4:
        n1, i1, n2, i2 = fields[0], int(fields[1]), fields[2], int(fields[3])
      else:
        raise ValueError
    except ValueError:
      raise ValueError(f"{path}: line {lineno}: expected 'name i j' or 'name1 i name2 j', got {ln!r}") from None
    if i1 < 1 or i2 < 1:
      raise ValueError(f"{path}: line {lineno}: image indexes are 1-based, got {ln!r}")
    for n in (n1, n2):
      if n in (".", "..") or "/" in n or "\\" in n:
        raise ValueError(f"{path}: line {lineno}: bad person name {n!r}")
    name1.append(n1)
    idx1.append(i1)
    name2.append(n2)
    idx2.append(i2)
    same.append(len(fields) == 3)
  same_arr = np.asarray(same, np.bool_)
  # Each block of 2N lines is N matched pairs then N mismatched ones.
  block = np.arange(expected) % (2 * per_class)
  expected_same = block < per_class
  if not np.array_equal(same_arr, expected_same):
    bad = int(np.flatnonzero(same_arr != expected_same)[0])
    kind = "matched ('name i j')" if expected_same[bad] else "mismatched ('name1 i name2 j')"
    raise ValueError(f"{path}: line {body[bad][0]}: expected a {kind} pair here "
                     f"(blocks of {per_class} matched then {per_class} mismatched)")
  folds = np.arange(expected) // (2 * per_class) if len(counts) == 2 and num_folds >= 2 else None
  return Pairs(tuple(name1), np.asarray(idx1, np.int64), tuple(name2), np.asarray(idx2, np.int64),
               same_arr, None if folds is None else folds.astype(np.int64))


def pair_paths(pairs_file: str, images_dir: str) -> tuple[list[str], list[str], np.ndarray]:
  """An LFW pairs file -> (paths1, paths2, same bool [M]) under ``images_dir`` (not checked to exist)."""
  pairs = read_pairs(pairs_file)
  p1 = [os.path.join(images_dir, image_relpath(n, int(i))) for n, i in zip(pairs.name1, pairs.index1)]
  p2 = [os.path.join(images_dir, image_relpath(n, int(i))) for n, i in zip(pairs.name2, pairs.index2)]
  return p1, p2, np.asarray(pairs.same, np.bool_)
