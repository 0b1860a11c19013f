"""Tests for jaxface.data.lfw: LFW pair lists (headers, folds, errors naming the line) and their paths."""

from __future__ import annotations

import os

import pytest

from jaxface.data import lfw
from jaxface.recognition import siamese


def write(tmp_path, text, name="pairs.txt"):
  p = tmp_path / name
  p.write_text(text)
  return str(p)


def test_read_pairs_single_count_header(tmp_path):
  p = write(tmp_path, "2\nAnn_A\t1\t2\nBob_B 3 1\nAnn_A\t1\tBob_B\t3\nCid_C\t2\tAnn_A\t4\n\n")
  pairs = lfw.read_pairs(p)
  assert len(pairs) == 4
  assert pairs.name1 == ("Ann_A", "Bob_B", "Ann_A", "Cid_C")
  assert pairs.name2 == ("Ann_A", "Bob_B", "Bob_B", "Ann_A")
  assert pairs.index1.tolist() == [1, 3, 1, 2] and pairs.index2.tolist() == [2, 1, 3, 4]
  assert pairs.same.tolist() == [True, True, False, False]
  assert pairs.folds is None
  # Distinct images in order of first use; ("Ann_A", 1) and ("Bob_B", 3) repeat.
  assert pairs.images() == [("Ann_A", 1), ("Ann_A", 2), ("Bob_B", 3), ("Bob_B", 1),
                            ("Cid_C", 2), ("Ann_A", 4)]
  assert lfw.image_relpath("Ann_A", 7) == os.path.join("Ann_A", "Ann_A_0007.jpg")


def test_read_pairs_fold_header(tmp_path):
  body = "".join(f"P{f}\t1\t2\nP{f}\t1\tQ{f}\t1\n" for f in range(3))
  pairs = lfw.read_pairs(write(tmp_path, "3\t1\n" + body))
  assert pairs.folds.tolist() == [0, 0, 1, 1, 2, 2]
  assert pairs.same.tolist() == [True, False] * 3


@pytest.mark.parametrize("text, match", [
    ("", "line 1: empty"),
    ("x\nA 1 2\n", "line 1: header"),
    ("0\n", "line 1: header"),
    ("1 2 3\nA 1 2\n", "line 1: header"),
    ("1\nA 1 2\n", "announces 2 pairs, found 1"),
    ("1\nA 1 2\nA 1 B\n", "line 3: expected 'name i j'"),
    ("1\nA 1 2\nA 1 B 2 9\n", "line 3"),
    ("1\nA 0 2\nA 1 B 2\n", "line 2: image indexes are 1-based"),
    ("1\nA 1 B 2\nA 1 2\n", "line 2: expected a matched"),
    ("1\n../x 1 2\nA 1 B 2\n", "bad person name"),
])
def test_read_pairs_errors_name_line(tmp_path, text, match):
  with pytest.raises(ValueError, match=match):
    lfw.read_pairs(write(tmp_path, text))


def test_pair_paths(tmp_path):
  f = write(tmp_path, "1\nAnn 1 2\nAnn 1 Bob 3\n")
  p1, p2, same = lfw.pair_paths(f, "/img")
  assert p1 == ["/img/Ann/Ann_0001.jpg", "/img/Ann/Ann_0001.jpg"]
  assert p2 == ["/img/Ann/Ann_0002.jpg", "/img/Bob/Bob_0003.jpg"]
  assert same.tolist() == [True, False]
  # The Siamese head's LFW pairs are these.
  q1, q2, qsame = siamese.lfw_pairs(f, "/img")
  assert (q1, q2, qsame.tolist()) == (p1, p2, same.tolist())
