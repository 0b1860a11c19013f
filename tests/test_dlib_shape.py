"""Tests for jaxface.formats.dlib_shape: synthetic files, the real 5-point model, errors, fuzzing.

A small writer produces dlib's shape predictor encoding from the spec, so the
vectorized parser is checked against an independent encoder and against a
slow record-by-record reference parser built on ``formats.dlib.Reader``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxface import pretrained
from jaxface.formats import dlib_shape
from jaxface.formats.dlib import DlibFormatError, Reader

# --------------------------------------------------------------------------- writer


def w_int(v: int) -> bytes:
  mag = abs(int(v))
  n = max(1, (mag.bit_length() + 7) // 8)
  return bytes([(0x80 if v < 0 else 0) | n]) + mag.to_bytes(n, "little")


def w_float(x: float) -> bytes:
  x = float(x)
  if x == 0:
    return w_int(0) + w_int(0)
  m, e = math.frexp(x)
  mant, exp = int(m * (1 << 24)), e - 24  # float32 values: 24-bit mantissas, as dlib writes floats
  return w_int(mant) + w_int(exp)


def w_matrix(values, *, new_format: bool = True) -> bytes:
  values = np.asarray(values, np.float32).reshape(-1)
  rows = -values.size if new_format else values.size
  cols = -1 if new_format else 1
  return w_int(rows) + w_int(cols) + b"".join(w_float(v) for v in values)


def random_model(rng: np.random.Generator, *, cascades=2, trees=3, depth=2, features=6, parts=5):
  s = 2 ** depth - 1
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  return dlib_shape.ShapePredictorModel(
      initial_shape=rng.uniform(0, 1, (parts, 2)).astype(np.float32),
      split_idx=rng.integers(0, features, (cascades, trees, s, 2)).astype(np.int32),
      thresholds=(f32(cascades, trees, s) * 50).astype(np.float32),
      leaves=(f32(cascades, trees, s + 1, parts, 2) * 0.01).astype(np.float32),
      anchor_idx=rng.integers(0, parts, (cascades, features)).astype(np.int32),
      deltas=(f32(cascades, features, 2) * 0.3).astype(np.float32))


def write_tree(idx, thr, leaves, *, new_format: bool = True) -> bytes:
  out = [w_int(len(thr))]
  for (a, b), t in zip(idx, thr):
    out += [w_int(a), w_int(b), w_float(t)]
  out.append(w_int(len(leaves)))
  out += [w_matrix(leaf, new_format=new_format) for leaf in leaves]
  return b"".join(out)


def write_model(m: dlib_shape.ShapePredictorModel, *, new_format: bool = True,
                replace_tree: dict | None = None) -> bytes:
  """dlib's encoding of ``m``; ``replace_tree`` {(cascade, tree): bytes} swaps in other trees."""
  replace_tree = replace_tree or {}
  c, t, s, _ = m.split_idx.shape
  out = [w_int(1), w_matrix(m.initial_shape, new_format=new_format), w_int(c)]
  for ci in range(c):
    out.append(w_int(t))
    for ti in range(t):
      out.append(replace_tree.get((ci, ti)) or write_tree(m.split_idx[ci, ti], m.thresholds[ci, ti],
                                                          m.leaves[ci, ti], new_format=new_format))
  out.append(w_int(c))
  for ci in range(c):
    out.append(w_int(m.anchor_idx.shape[1]))
    out += [w_int(a) for a in m.anchor_idx[ci]]
  out.append(w_int(c))
  for ci in range(c):
    out.append(w_int(m.deltas.shape[1]))
    for x, y in m.deltas[ci]:
      out += [w_float(x), w_float(y)]
  return b"".join(out)


# --------------------------------------------------------------------------- slow reference


def slow_parse(data: bytes, path: str = "<bytes>", max_trees: int | None = None) -> dict:
  """Record-by-record parse with Reader (obviously correct, slow). ``max_trees``: stop early."""
  r = Reader(data, path)
  assert r.int() == 1

  def matrix():
    rows, cols = abs(r.int()), abs(r.int())
    return np.array([r.float() for _ in range(rows * cols)]).reshape(rows, cols)

  init = matrix()
  forests = []
  for _ in range(r.int()):
    trees = []
    for _ in range(r.int()):
      splits = [(r.int(), r.int(), r.float()) for _ in range(r.int())]
      leaves = [matrix() for _ in range(r.int())]
      trees.append((splits, leaves))
      if max_trees is not None and len(trees) == max_trees:
        return {"initial_shape": init, "trees": trees}
    forests.append(trees)
  anchors = [[r.int() for _ in range(r.int())] for _ in range(r.int())]
  deltas = [[(r.float(), r.float()) for _ in range(r.int())] for _ in range(r.int())]
  r.finish()
  return {"initial_shape": init, "forests": forests, "anchors": anchors, "deltas": deltas}


def assert_matches_slow(m: dlib_shape.ShapePredictorModel, ref: dict) -> None:
  np.testing.assert_array_equal(m.initial_shape.reshape(-1), ref["initial_shape"].reshape(-1))
  for ci, trees in enumerate(ref["forests"]):
    for ti, (splits, leaves) in enumerate(trees):
      np.testing.assert_array_equal(m.split_idx[ci, ti], [[a, b] for a, b, _ in splits])
      np.testing.assert_array_equal(m.thresholds[ci, ti], [t for _, _, t in splits])
      np.testing.assert_array_equal(m.leaves[ci, ti].reshape(len(leaves), -1),
                                    np.stack([l.reshape(-1) for l in leaves]))
  np.testing.assert_array_equal(m.anchor_idx, ref["anchors"])
  np.testing.assert_array_equal(m.deltas, ref["deltas"])


# --------------------------------------------------------------------------- tokenizer


def slow_token_starts(data: bytes, start: int) -> list[int]:
  out, p = [], start
  while p < len(data):
    out.append(p)
    p += 1 + (data[p] & 0x0F)
  return out


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.integers(0, 20))
def test_token_starts_match_sequential_scan(data, start):
  got = dlib_shape._token_starts(np.frombuffer(data, np.uint8), start)
  assert got.tolist() == slow_token_starts(data, start)


# --------------------------------------------------------------------------- synthetic files


@pytest.mark.parametrize("new_format", [True, False])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_synthetic_roundtrip(depth, new_format):
  rng = np.random.default_rng(depth)
  m = random_model(rng, depth=depth, trees=4, features=9)
  data = write_model(m, new_format=new_format)
  got = dlib_shape.parse_shape_predictor(data, "synthetic.dat")
  for name, want in m.to_dict().items():
    arr = getattr(got, name)
    assert arr.dtype == want.dtype, name
    np.testing.assert_array_equal(arr, want, err_msg=name)
  assert got.depth == depth
  assert_matches_slow(got, slow_parse(data))


def test_special_and_large_integers():
  # Multi-byte feature indices, negative thresholds, zero floats and a 2-byte exponent.
  rng = np.random.default_rng(1)
  m = random_model(rng, features=300)
  m.split_idx[0, 0, 0] = (256, 299)
  m.thresholds[0, 0, 0] = 0.0
  m.thresholds[1, 2, 1] = -1e-30
  got = dlib_shape.parse_shape_predictor(write_model(m))
  np.testing.assert_array_equal(got.split_idx, m.split_idx)
  np.testing.assert_array_equal(got.thresholds, m.thresholds)


def test_roundtrip_through_dict():
  m = random_model(np.random.default_rng(2))
  again = dlib_shape.ShapePredictorModel.from_dict(m.to_dict())
  for name, want in m.to_dict().items():
    np.testing.assert_array_equal(getattr(again, name), want)
  bad = m.to_dict()
  bad["anchor_idx"] = bad["anchor_idx"] + 5
  with pytest.raises(ValueError, match="anchor_idx"):
    dlib_shape.ShapePredictorModel.from_dict(bad)


# --------------------------------------------------------------------------- errors


def _err(data: bytes) -> DlibFormatError:
  with pytest.raises(DlibFormatError) as e:
    dlib_shape.parse_shape_predictor(data, "sp.dat")
  assert "sp.dat" in str(e.value) and "byte offset" in str(e.value)
  return e.value


@pytest.fixture(scope="module")
def small_file() -> bytes:
  return write_model(random_model(np.random.default_rng(3)))


def test_errors_truncated(small_file):
  for cut in (0, 1, 2, 5, len(small_file) // 3, len(small_file) // 2, len(small_file) - 1):
    e = _err(small_file[:cut])
    assert e.offset <= cut


def test_errors_trailing_bytes(small_file):
  e = _err(small_file + w_int(7))
  assert e.offset == len(small_file) and "trailing" in str(e)


def test_errors_wrong_version_and_unrelated_file(small_file):
  assert "version" in str(_err(w_int(2) + small_file[2:]))
  assert _err(b"\x89PNG\r\n\x1a\n" + bytes(100)).offset == 0


def test_error_bad_control_byte_names_offset(small_file):
  bad = bytearray(small_file)
  pos = len(small_file) // 2
  # Walk to a record boundary, then corrupt that record's control byte.
  starts = slow_token_starts(small_file, 2)
  pos = next(p for p in starts if p >= pos)
  bad[pos] = 0x40
  e = _err(bytes(bad))
  assert e.offset <= pos


def test_error_huge_count_does_not_allocate(small_file):
  # Number of trees in cascade 0 -> 2**40: must fail on the count, not try to allocate.
  m = random_model(np.random.default_rng(3))
  head = w_int(1) + w_matrix(m.initial_shape) + w_int(2)
  data = head + w_int(1 << 40) + small_file[len(head) + 1:]
  e = _err(data)
  assert e.offset == len(head) and "does not fit" in str(e)


def test_error_out_of_range_indices():
  m = random_model(np.random.default_rng(4))
  m.split_idx[1, 2, 0, 1] = 6  # 6 feature pixels: 0..5 valid
  assert "feature index 6" in str(_err(write_model(m)))
  m = random_model(np.random.default_rng(4))
  m.anchor_idx[0, 3] = 5  # 5 parts: 0..4 valid
  assert "anchor index 5" in str(_err(write_model(m)))


def test_error_trees_of_different_shapes():
  a = random_model(np.random.default_rng(5), depth=2)
  b = random_model(np.random.default_rng(5), depth=3)
  deep = write_tree(b.split_idx[0, 0], b.thresholds[0, 0], b.leaves[0, 0])
  e = _err(write_model(a, replace_tree={(1, 2): deep}))
  assert "cascade 1 tree 2" in str(e) and "split count" in str(e)
  # A leaf of the wrong size is caught the same way.
  odd = write_tree(a.split_idx[0, 0], a.thresholds[0, 0], [np.zeros(12)] + list(a.leaves[0, 0, 1:]))
  e = _err(write_model(a, replace_tree={(0, 1): odd}))
  assert "tree 1" in str(e) or "does not fit" in str(e)


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_corrupted_files_fail_cleanly(small_file, data):
  """Truncations, byte flips and insertions: either a valid parse or DlibFormatError, quickly."""
  buf = bytearray(small_file)
  kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "garbage"]))
  if kind == "truncate":
    buf = buf[:data.draw(st.integers(0, len(buf)))]
  elif kind == "flip":
    for _ in range(data.draw(st.integers(1, 8))):
      buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
  elif kind == "insert":
    pos = data.draw(st.integers(0, len(buf)))
    buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=12))
  else:
    buf = bytearray(data.draw(st.binary(min_size=0, max_size=400)))
  t0 = time.perf_counter()
  try:
    m = dlib_shape.parse_shape_predictor(bytes(buf), "fuzz.dat")
  except DlibFormatError as e:
    assert "fuzz.dat" in str(e) and 0 <= e.offset <= len(buf)
  else:
    m.validate()  # anything accepted is internally consistent
  assert time.perf_counter() - t0 < 2.0


# --------------------------------------------------------------------------- the real file


@pytest.fixture(scope="module")
def real_path() -> str:
  try:
    return pretrained.model_file("shape5")
  except pretrained.PretrainedNotFoundError as e:
    pytest.skip(f"weights package not installed: {e}")


@pytest.fixture(scope="module")
def real_model(real_path):
  t0 = time.perf_counter()
  m = dlib_shape.read_shape_predictor(real_path)
  return m, time.perf_counter() - t0


def test_real_file_structure(real_model):
  m, seconds = real_model
  assert m.initial_shape.shape == (5, 2)
  assert m.split_idx.shape == (15, 500, 15, 2) and m.thresholds.shape == (15, 500, 15)
  assert m.leaves.shape == (15, 500, 16, 5, 2)
  assert m.anchor_idx.shape == (15, 800) and m.deltas.shape == (15, 800, 2)
  assert m.depth == 4
  # Mean shape: eyes above the nose, subject's right eye (parts 0, 1) on the image right.
  assert m.initial_shape[4, 1] > m.initial_shape[:4, 1].max()
  assert m.initial_shape[0, 0] > m.initial_shape[2, 0]
  assert np.all(np.isfinite(m.thresholds)) and np.all(np.abs(m.leaves) < 1)
  assert seconds < 20, f"parse took {seconds:.1f} s"


def test_real_file_matches_slow_reader_on_first_trees(real_path, real_model):
  m, _ = real_model
  with open(real_path, "rb") as f:
    data = f.read()
  ref = slow_parse(data, real_path, max_trees=25)
  np.testing.assert_array_equal(m.initial_shape.reshape(-1), ref["initial_shape"].reshape(-1))
  for ti, (splits, leaves) in enumerate(ref["trees"]):
    np.testing.assert_array_equal(m.split_idx[0, ti], [[a, b] for a, b, _ in splits])
    np.testing.assert_array_equal(m.thresholds[0, ti], np.float32([t for _, _, t in splits]))
    np.testing.assert_array_equal(m.leaves[0, ti].reshape(16, 10),
                                  np.float32(np.stack([l.reshape(-1) for l in leaves])))


def test_real_file_truncated_names_file_and_offset(real_path):
  with open(real_path, "rb") as f:
    data = f.read()
  for cut in (len(data) // 2,):
    with pytest.raises(DlibFormatError, match="byte offset") as e:
      dlib_shape.parse_shape_predictor(data[:cut], real_path)
    assert real_path in str(e.value) and e.value.offset <= cut
