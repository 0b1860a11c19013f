"""Tests for jaxface.data.source: ArraySource, subsets, identity splits, P x K checks."""

import logging

import numpy as np
import pytest

from jaxface.data import source as src


def _toy(names, counts, hw=(4, 3), seed=0):
  """ArraySource whose image j is filled with a unique pattern; labels grouped by identity."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(names)), counts)
  perm = rng.permutation(labels.size)  # images of an identity need not be contiguous
  labels = labels[perm]
  images = rng.integers(0, 256, (labels.size, *hw, 1), dtype=np.uint8)
  return src.ArraySource(images, labels, names)


def test_natural_order_matches_numeric_sort():
  names = [f"s{i}" for i in range(1, 41)]
  shuffled = list(np.random.default_rng(0).permutation(names))
  got = [shuffled[i] for i in src.natural_order(shuffled)]
  assert got == sorted(names, key=lambda s: int(s[1:]))
  # Mixed text and digit runs: compare digit runs by value, text lexically.
  mixed = ["img10b", "img2", "img10a", "a", "img1"]
  assert [mixed[i] for i in src.natural_order(mixed)] == ["a", "img1", "img2", "img10a", "img10b"]


def test_array_source_get_and_validation():
  s = _toy(["a", "b", "c"], [2, 3, 1])
  assert len(s) == 6 and s.num_identities == 3 and s.image_shape == (4, 3, 1)
  assert s.labels.dtype == np.int32
  np.testing.assert_array_equal(s.images_per_identity(), [2, 3, 1])
  idx = np.array([5, 0, 5])
  np.testing.assert_array_equal(s.get(idx), s.images[idx])
  assert s.get(np.zeros(0, np.int64)).shape == (0, 4, 3, 1)
  with pytest.raises(ValueError, match="indices out of range"):
    s.get([6])
  with pytest.raises(ValueError, match="indices must be 1-D"):
    s.get([[0]])
  with pytest.raises(ValueError, match="uint8"):
    src.ArraySource(np.zeros((2, 4, 4, 1), np.float32), [0, 1])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    src.ArraySource(np.zeros((2, 4, 4, 1), np.uint8), [0, 2], ["x", "y"])
  with pytest.raises(ValueError, match="labels has 3 entries but images has 2"):
    src.ArraySource(np.zeros((2, 4, 4, 1), np.uint8), [0, 1, 1])
  # Grayscale [N, H, W] gains a channel axis; default names are the label values.
  g = src.ArraySource(np.zeros((3, 5, 6), np.uint8), [0, 2, 1])
  assert g.image_shape == (5, 6, 1) and g.identity_names == ["0", "1", "2"]


def test_subset_identities_matches_brute_force():
  s = _toy(["a", "b", "c", "d"], [2, 3, 1, 4])
  sub = src.subset_identities(s, [3, 1])
  assert sub.identity_names == ["d", "b"]
  expected = [j for j in range(len(s)) if s.labels[j] in (3, 1)]  # original order
  assert len(sub) == len(expected)
  for k, j in enumerate(expected):
    assert sub.labels[k] == {3: 0, 1: 1}[s.labels[j]]
    np.testing.assert_array_equal(sub.get([k])[0], s.images[j])
  # A subset of a subset reads the same pixels as a direct subset.
  subsub = src.subset_identities(sub, [1])
  direct = src.subset_identities(s, [1])
  assert subsub.identity_names == ["b"] and subsub.parent is s
  np.testing.assert_array_equal(subsub.get(np.arange(len(subsub))), direct.get(np.arange(len(direct))))
  with pytest.raises(ValueError, match="distinct"):
    src.subset_identities(s, [1, 1])
  with pytest.raises(ValueError, match="identity_indices out of range"):
    src.subset_identities(s, [4])


def test_split_by_identity_holds_out_last_natural_names():
  names = [f"s{i}" for i in range(1, 41)]
  shuffled = list(np.random.default_rng(1).permutation(names))
  s = _toy(shuffled, [2] * 40, hw=(2, 2))
  train, hold = src.split_by_identity(s, num_holdout=10)
  assert hold.identity_names == [f"s{i}" for i in range(31, 41)]
  assert train.identity_names == [f"s{i}" for i in range(1, 31)]
  assert len(train) == 60 and len(hold) == 20
  # Each image keeps its identity's name and pixels.
  for part in (train, hold):
    for k in range(len(part)):
      name = part.identity_names[part.labels[k]]
      j = part.parent_indices[k]
      assert s.identity_names[s.labels[j]] == name
      np.testing.assert_array_equal(part.get([k])[0], s.images[j])
  train_f, hold_f = src.split_by_identity(s, holdout_fraction=0.25)
  assert hold_f.identity_names == hold.identity_names


def test_split_by_identity_seeded_shuffle():
  s = _toy([f"id{i}" for i in range(20)], [1] * 20, hw=(1, 1))
  a_train, a_hold = src.split_by_identity(s, num_holdout=5, seed=3)
  b_train, b_hold = src.split_by_identity(s, num_holdout=5, seed=3)
  _, c_hold = src.split_by_identity(s, num_holdout=5, seed=4)
  _, plain_hold = src.split_by_identity(s, num_holdout=5)
  assert a_hold.identity_names == b_hold.identity_names
  assert a_hold.identity_names != c_hold.identity_names
  assert a_hold.identity_names != plain_hold.identity_names
  assert set(a_train.identity_names) | set(a_hold.identity_names) == set(s.identity_names)
  assert not set(a_train.identity_names) & set(a_hold.identity_names)
  # Each side is listed in natural order even when shuffled.
  assert a_hold.identity_names == sorted(a_hold.identity_names, key=src.natural_key)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one"),
    (dict(num_holdout=2, holdout_fraction=0.5), "exactly one"),
    (dict(num_holdout=1), "at least 2 identities on each side"),
    (dict(num_holdout=4), "at least 2 identities on each side"),
    (dict(holdout_fraction=1.0), "holdout_fraction"),
    (dict(num_holdout=2.5), "num_holdout must be an integer"),
])
def test_split_by_identity_errors(kwargs, match):
  s = _toy(["a", "b", "c", "d", "e"], [1] * 5, hw=(1, 1))
  with pytest.raises(ValueError, match=match):
    src.split_by_identity(s, **kwargs)


def test_validate_pk(caplog):
  s = _toy(["a", "b", "c", "d"], [4, 1, 5, 2])
  np.testing.assert_array_equal(src.validate_pk(s, P=2, K=2, drop_small=True), [0, 2, 3])
  with pytest.raises(ValueError, match=r"K=3 .* 2 of 4 identities: b \(1\), d \(2\)"):
    src.validate_pk(s, P=2, K=3)
  with caplog.at_level(logging.WARNING):
    eligible = src.validate_pk(s, P=2, K=3, drop_small=True)
  np.testing.assert_array_equal(eligible, [0, 2])
  assert "b (1)" in caplog.text and "leaving out 2 of 4" in caplog.text
  with pytest.raises(ValueError, match="only 2 identities have at least K=3 images, fewer than P=3"):
    src.validate_pk(s, P=3, K=3, drop_small=True)
  with pytest.raises(ValueError, match=r"P=5 is larger than the number of identities \(4\)"):
    src.validate_pk(s, P=5, K=2)
  with pytest.raises(ValueError, match="K must be an integer >= 2"):
    src.validate_pk(s, P=2, K=1)
  with pytest.raises(ValueError, match="P must be"):
    src.validate_pk(s, P=True, K=2)
  with pytest.raises(ValueError, match="at least 2 identities"):
    src.validate_pk(_toy(["solo"], [5]), P=2, K=2)


def test_small_identities_error_carries_what_a_caller_needs_to_rephrase_it():
  s = _toy(["a", "b", "c", "d"], [4, 1, 5, 2])
  with pytest.raises(src.SmallIdentitiesError, match="pass drop_small=True") as e:
    src.validate_pk(s, P=2, K=3)
  assert isinstance(e.value, ValueError)
  assert (e.value.K, e.value.names, e.value.num_identities) == (3, ["b", "d"], 4)
  np.testing.assert_array_equal(e.value.counts, [1, 2])
  assert e.value.listing == "b (1), d (2)"


def test_keep_identities_with_drops_small_ones_and_counts_them():
  s = _toy(["a", "b", "c", "d"], [4, 1, 5, 2])
  kept, dropped = src.keep_identities_with(s, 3)
  assert kept.identity_names == ["a", "c"] and len(kept) == 9
  np.testing.assert_array_equal(kept.images_per_identity(), [4, 5])
  assert dropped == {"identities": 2, "images": 3, "names": ["b", "d"]}
  same, none = src.keep_identities_with(s, 1)
  assert same is s and none == {"identities": 0, "images": 0, "names": []}


def test_validate_pk_truncates_long_lists():
  s = _toy([f"p{i}" for i in range(30)], [1] * 30, hw=(1, 1))
  with pytest.raises(ValueError, match=r"p19 \(1\), \.\.\. and 10 more"):
    src.validate_pk(s, P=2, K=2)
