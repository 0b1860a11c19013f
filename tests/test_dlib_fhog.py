"""Reader of dlib's serialized HOG detectors (jaxface.formats.dlib_fhog)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxface.formats.dlib import DlibFormatError
from jaxface.formats.dlib_fhog import convert, effective_filters, read_fhog_detector

DATA = os.environ.get("JAXFACE_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
SVM = os.path.join(DATA, "dlib_golden_hog", "frontal_face_detector.svm")
SHIPPED = os.path.join(os.path.dirname(__file__), "..", "jaxface", "faces", "data", "frontal_face_detector.npz")


def _int(v: int) -> bytes:
  mag = abs(int(v))
  n = max(1, (mag.bit_length() + 7) // 8)
  return bytes([n | (0x80 if v < 0 else 0)]) + mag.to_bytes(n, "little")


def _float(x: float) -> bytes:
  m, e = np.frexp(np.float64(x))
  mant = int(np.ldexp(m, 53))
  return _int(mant) + _int(int(e) - 53)


def _synthetic(num: int = 2, seed: int = 0) -> tuple[bytes, np.ndarray]:
  """A small detector in dlib's layout: 80x80 window, cell 8 -> 10x10 cells, 31 planes."""
  rng = np.random.default_rng(seed)
  dims = 31 * 10 * 10
  w = rng.normal(size=(num, dims + 1))
  out = _int(2) + _int(1) + _int(0) + _int(0)  # versions, empty feature pyramid (max size, size)
  out += b"".join(_int(v) for v in (8, 0, 80, 80, 1000, 64, 64)) + _float(9.0) + _int(dims)
  out += _float(0.33) + _float(0.78) + _int(num)
  for row in w:
    out += _int(-(dims + 1)) + _int(-1) + b"".join(_float(v) for v in row)
  return out, w


def test_synthetic_round_trip(tmp_path):
  data, w = _synthetic()
  p = tmp_path / "det.svm"
  p.write_bytes(data)
  det = read_fhog_detector(p)
  assert det.fhog_window == (10, 10)
  np.testing.assert_array_equal(det.weights, w[:, :-1])
  np.testing.assert_array_equal(det.thresholds, w[:, -1])
  assert (det.cell_size, det.padding, det.window_width, det.min_pyramid_layer_width) == (8, 0, 80, 64)
  assert det.iou_thresh == 0.33 and det.percent_covered_thresh == 0.78
  filt, separable = effective_filters(det)
  assert filt.shape == (2, 31, 10, 10) and filt.dtype == np.float32
  assert not separable  # random filters are full rank: dlib uses the full filters
  np.testing.assert_array_equal(filt, det.filters().astype(np.float32))


@pytest.mark.parametrize("cut", [0, 1, 5, 40, 1000, -3])
def test_truncated_file_names_the_file(tmp_path, cut):
  data, _ = _synthetic(1)
  p = tmp_path / "cut.svm"
  p.write_bytes(data[:cut] if cut >= 0 else data[:cut])
  with pytest.raises(DlibFormatError, match="cut.svm"):
    read_fhog_detector(p)


def test_corrupt_files(tmp_path):
  data, _ = _synthetic(1)
  p = tmp_path / "bad.svm"
  p.write_bytes(_int(7) + data[2:])  # unknown object_detector version
  with pytest.raises(DlibFormatError, match="bad.svm.*version 7"):
    read_fhog_detector(p)
  p.write_bytes(data + b"\x01\x00")  # trailing bytes
  with pytest.raises(DlibFormatError, match="trailing"):
    read_fhog_detector(p)
  with pytest.raises(FileNotFoundError, match="missing.svm"):
    read_fhog_detector(tmp_path / "missing.svm")


@pytest.mark.skipif(not os.path.exists(SVM), reason="needs shared/data/dlib_golden_hog (dlib's saved detector)")
def test_real_file_matches_shipped_npz(tmp_path):
  det = read_fhog_detector(SVM)
  assert det.weights.shape == (5, 3100) and det.fhog_window == (10, 10)
  filt, separable = effective_filters(det)
  assert separable  # the frontal face detector's filters are low rank (dlib's separable path)
  out = tmp_path / "ffd.npz"
  convert(SVM, out)
  with np.load(out) as a, np.load(SHIPPED) as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(DlibFormatError, match="frontal"):
    data = open(SVM, "rb").read()
    (tmp_path / "frontal_cut.svm").write_bytes(data[: len(data) // 2])
    read_fhog_detector(tmp_path / "frontal_cut.svm")
