"""Tests for jaxface.formats.dlib: primitives, a synthetic network, the real files, fuzzing.

A tiny writer below produces dlib's encoding from the spec
(../shared/specs/dlib-models.md), so the reader is checked against an
independent encoder, and the fuzz tests have a small, fully valid file to
truncate and corrupt.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import tracemalloc
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxface import pretrained
from jaxface.formats import dlib

# --------------------------------------------------------------------------- tiny writer


def w_int(v: int) -> bytes:
  mag = abs(v)
  n = max(1, (mag.bit_length() + 7) // 8)
  assert n <= 8
  return bytes([(0x80 if v < 0 else 0) | n]) + mag.to_bytes(n, "little")


def w_bool(b: bool) -> bytes:
  return b"1" if b else b"0"


def w_str(s: str) -> bytes:
  return w_int(len(s)) + s.encode("ascii")


def w_float(x: float) -> bytes:
  if math.isinf(x):
    return w_int(0) + w_int(32000 if x > 0 else 32001)
  if math.isnan(x):
    return w_int(0) + w_int(32002)
  if x == 0:
    return w_int(0) + w_int(0)
  m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
  mant, exp = int(m * (1 << 53)), e - 53
  while mant % 2 == 0:  # shortest mantissa, as 1.0 = 01 10 81 04 shows (16 * 2**-4)
    mant //= 2
    exp += 1
  return w_int(mant) + w_int(exp)


def w_tensor(a: np.ndarray) -> bytes:
  a = np.asarray(a, np.float32)
  shape = (a.shape + (1, 1, 1, 1))[:4] if a.ndim < 4 else a.shape
  return w_int(2) + b"".join(w_int(d) for d in shape) + a.astype("<f4").tobytes()


def w_alias(shape) -> bytes:
  return w_int(1) + b"".join(w_int(d) for d in shape)


EMPTY_TENSOR = w_int(2) + w_int(0) * 4
TAIL = w_bool(False) * 3 + EMPTY_TENSOR * 3
FOUR_FLOATS = w_float(1.0) + w_float(1.0) + w_float(1.0) + w_float(0.0)


def w_con(filters: np.ndarray, bias: np.ndarray, stride: int, pad: int) -> bytes:
  o, i, kh, kw = filters.shape
  return (w_str("con_4") + w_tensor(np.concatenate([filters.ravel(), bias]).reshape(1, 1, 1, -1))
          + w_int(o) + w_int(kh) + w_int(kw) + w_int(stride) * 2 + w_int(pad) * 2
          + w_alias(filters.shape) + w_alias((1, o, 1, 1)) + FOUR_FLOATS)


def w_affine(gamma: np.ndarray, beta: np.ndarray) -> bytes:
  c = gamma.size
  return (w_str("affine_") + w_tensor(np.concatenate([gamma, beta]).reshape(1, 1, 1, -1))
          + w_alias((1, c, 1, 1)) + w_alias((1, c, 1, 1)) + w_int(0))


def w_pool(name: str, window: int, stride: int, pad: int) -> bytes:
  return w_str(name) + w_int(window) * 2 + w_int(stride) * 2 + w_int(pad) * 2


def w_fc(weights: np.ndarray) -> bytes:
  n_in, n_out = weights.shape
  return (w_str("fc_2") + w_int(n_out) + w_int(n_in) + w_tensor(weights.reshape(1, 1, 1, -1))
          + w_alias((n_in, n_out, 1, 1)) + w_alias((1, n_out, 1, 1)) + w_int(1) + FOUR_FLOATS)


def synthetic_network(seed: int = 0) -> tuple[bytes, dict]:
  """A small, valid metric network: conv, affine, relu, max pool, conv, add_prev, avg pool, fc."""
  rng = np.random.default_rng(seed)
  f1 = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
  b1 = rng.normal(size=4).astype(np.float32)
  g, be = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
  f2 = rng.normal(size=(4, 4, 3, 3)).astype(np.float32)
  b2 = rng.normal(size=4).astype(np.float32)
  fc = rng.normal(size=(4, 5)).astype(np.float32)
  records = [w_con(f1, b1, 2, 0), w_affine(g, be), w_str("relu_"), w_pool("max_pool_2", 3, 2, 0),
             w_con(f2, b2, 1, 1), w_str("add_prev_"), w_pool("avg_pool_2", 0, 1, 0), w_fc(fc)]
  body = b"".join(rec + TAIL + (w_int(1) if i == 0 else b"") for i, rec in enumerate(records))
  data = (w_int(1) + w_str("loss_metric_2") + w_float(0.04) + w_float(0.6)
          + w_int(2) * (len(records) - 1) + w_int(1) * 2 + w_int(3)
          + w_str("input_rgb_image_sized") + w_float(122.5) + w_float(117.0) + w_float(104.25)
          + w_int(20) + w_int(20) + body)
  return data, dict(f1=f1, b1=b1, g=g, be=be, f2=f2, b2=b2, fc=fc)


SYNTH, SYNTH_PARAMS = synthetic_network()
_TMP = tempfile.mkdtemp(prefix="jaxface-dlib-format-")


def write(data: bytes, name: str = "model.dat") -> str:
  path = os.path.join(_TMP, name)
  with open(path, "wb") as f:
    f.write(data)
  return path


def parse(data: bytes, path: str = "/fuzz/model.dat") -> dlib.Network:
  """read_network on in-memory bytes (writing thousands of fuzz files costs seconds here)."""
  with mock.patch.object(dlib, "read_file", lambda p: dlib.Reader(data, p)):
    return dlib.read_network(path)


def check_error(err: dlib.DlibFormatError, path: str, size: int) -> None:
  assert isinstance(err, ValueError)
  assert err.path == path and path in str(err)
  assert 0 <= err.offset <= size and f"byte offset {err.offset}" in str(err)


# --------------------------------------------------------------------------- primitives


def test_spec_examples_decode():
  assert dlib.Reader(bytes([0x01, 0x00])).int() == 0
  r = dlib.Reader(bytes([0x01, 0x10, 0x81, 0x04]))
  assert r.float() == 1.0 and r.remaining == 0
  assert dlib.Reader(bytes([0x81, 0x05])).int() == -5
  assert dlib.Reader(w_int(0) + w_int(32000)).float() == math.inf
  assert dlib.Reader(w_int(0) + w_int(32001)).float() == -math.inf
  assert math.isnan(dlib.Reader(w_int(0) + w_int(32002)).float())
  assert dlib.Reader(b"1").bool() is True and dlib.Reader(b"0").bool() is False
  assert dlib.Reader(w_str("con_4")).string() == "con_4"


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(1 << 63) + 1, max_value=(1 << 63) - 1))
def test_int_round_trip(v):
  r = dlib.Reader(w_int(v))
  assert r.int() == v and r.remaining == 0


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=True, width=64))
def test_float_round_trip(x):
  r = dlib.Reader(w_float(x))
  assert r.float() == x and r.remaining == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=24))
def test_tensor_round_trip(values):
  a = np.array(values, np.float32).reshape(1, 1, 1, -1)
  r = dlib.Reader(w_tensor(a))
  np.testing.assert_array_equal(r.tensor(), a)
  assert r.remaining == 0


@pytest.mark.parametrize("data,match", [
    (b"", "truncated"), (bytes([0x03, 0x01]), "truncated"), (bytes([0x09, 0]), "control byte"),
    (bytes([0x41, 0]), "control byte"), (bytes([0x00]), "control byte")])
def test_bad_integers_name_the_offset(data, match):
  with pytest.raises(dlib.DlibFormatError, match=match) as e:
    dlib.Reader(data, "x.dat").int("thing")
  assert e.value.path == "x.dat" and 0 <= e.value.offset <= len(data)


def test_bad_bool_string_and_tensor_version():
  with pytest.raises(dlib.DlibFormatError, match="bool"):
    dlib.Reader(b"2").bool()
  with pytest.raises(dlib.DlibFormatError, match="out of range"):
    dlib.Reader(w_int(100_000) + b"a").string("name")
  with pytest.raises(dlib.DlibFormatError, match="not ASCII"):
    dlib.Reader(w_int(2) + b"\xff\xfe").string("name")
  with pytest.raises(dlib.DlibFormatError, match="unknown tensor version 7"):
    dlib.Reader(w_int(7) + w_int(0) * 4).tensor()


# --------------------------------------------------------------------------- synthetic network


def test_synthetic_network_parses_exactly():
  path = write(SYNTH, "synthetic.dat")
  net = dlib.read_network(path)
  p = SYNTH_PARAMS
  assert net.loss == "loss_metric_2" and net.input == "input_rgb_image_sized"
  assert net.input_attrs == {"mean_rgb": (122.5, 117.0, 104.25), "rows": 20, "cols": 20}
  assert net.loss_attrs["margin"] == 0.04 and net.loss_attrs["distance_threshold"] == 0.6
  assert [l.kind for l in net.layers] == ["con", "affine", "relu", "max_pool", "con", "add_prev",
                                          "avg_pool", "fc"]
  con1, aff = net.layers[0], net.layers[1]
  np.testing.assert_array_equal(con1.params["filters"], p["f1"])
  np.testing.assert_array_equal(con1.params["bias"], p["b1"])
  assert con1.attrs == {"stride": (2, 2), "padding": (0, 0)}
  np.testing.assert_array_equal(aff.params["gamma"], p["g"])
  np.testing.assert_array_equal(aff.params["beta"], p["be"])
  assert net.layers[3].attrs == {"window": (3, 3), "stride": (2, 2), "padding": (0, 0)}
  assert net.layers[4].attrs["padding"] == (1, 1)
  np.testing.assert_array_equal(net.layers[7].params["weights"], p["fc"])
  assert "bias" not in net.layers[7].params
  assert net.num_params == sum(v.size for v in p.values())
  # offsets point at the start of each record: the layer name string.
  for layer in net.layers:
    assert dlib.Reader(SYNTH[layer.offset:]).string() == layer.name


def test_trailing_bytes_are_an_error():
  path = write(SYNTH + b"\x00", "trailing.dat")
  with pytest.raises(dlib.DlibFormatError, match="trailing") as e:
    dlib.read_network(path)
  assert e.value.offset == len(SYNTH)


def test_every_truncation_of_the_synthetic_network_fails_cleanly():
  # Exhaustive, since the file is small (~1.8 KB): every prefix must be refused.
  path = "/fuzz/trunc.dat"
  for n in range(len(SYNTH)):
    with pytest.raises(dlib.DlibFormatError) as e:
      parse(SYNTH[:n], path)
    check_error(e.value, path, n)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(SYNTH) - 1), st.integers(0, 255)), min_size=1,
                max_size=6))
def test_byte_flips_of_the_synthetic_network_parse_or_fail_cleanly(flips):
  data = bytearray(SYNTH)
  for pos, value in flips:
    data[pos] = value
  path = "/fuzz/flipped.dat"
  t = time.perf_counter()
  try:
    parse(bytes(data), path)
  except dlib.DlibFormatError as e:
    check_error(e, path, len(data))
  assert time.perf_counter() - t < 1.0


# --------------------------------------------------------------------------- hostile headers


def test_huge_declared_tensor_is_refused_before_allocating():
  # A conv claiming 2**31 x 2**31 x 2**31 x 2**31 floats in a 100-byte file.
  huge = w_int(2) + w_int(1 << 31) * 4 + b"\x00" * 64
  data = (w_int(1) + w_str("loss_metric_2") + w_float(0.04) + w_float(0.6) + w_int(3)
          + w_str("input_rgb_image_sized") + w_float(1.0) * 3 + w_int(150) * 2
          + w_str("con_4") + huge)
  path = write(data, "huge.dat")
  tracemalloc.start()
  try:
    with pytest.raises(dlib.DlibFormatError, match="needs") as e:
      dlib.read_network(path)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  check_error(e.value, path, len(data))
  assert peak < 1 << 20, f"peak {peak} bytes while refusing a {len(data)}-byte file"


def test_endless_wrapper_versions_stop():
  data = w_int(1) + w_str("loss_metric_2") + w_float(0.04) + w_float(0.6) + w_int(2) * 20_000
  path = write(data, "wrappers.dat")
  with pytest.raises(dlib.DlibFormatError, match="10000 layer wrappers"):
    dlib.read_network(path)


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 64,  # a PNG
    b"hello, this is a text file\n",
    b"",
    w_int(1) + w_str("loss_binary_log_"),  # a dlib file of another network type
])
def test_unrelated_files_give_a_clear_error(content):
  path = write(content, "unrelated.bin")
  with pytest.raises(dlib.DlibFormatError) as e:
    dlib.read_network(path)
  check_error(e.value, path, len(content))


def test_missing_file_names_the_path():
  path = os.path.join(_TMP, "nope.dat")
  with pytest.raises(FileNotFoundError, match="nope.dat"):
    dlib.read_network(path)


def test_expected_loss_is_enforced():
  path = write(SYNTH, "synthetic2.dat")
  with pytest.raises(dlib.DlibFormatError, match="expected loss_mmod_"):
    dlib.read_network(path, expect_loss=("loss_mmod_",))


# --------------------------------------------------------------------------- real files


def _real(name: str) -> str:
  try:
    return pretrained.model_file(name)
  except pretrained.PretrainedNotFoundError as e:
    pytest.skip(f"dlib weights not installed: {e}")


def test_real_resnet_file_parses_fully():
  net = dlib.read_network(_real("resnet"))
  assert net.loss == "loss_metric_2" and len(net.layers) == 108
  assert net.num_params == 5_614_592
  v = net.wrapper_versions  # add_layer (2) and tag/skip (1) wrappers interleave; the input's last
  assert (v.count(2), v.count(1), v[-1], len(v)) == (107, 22, 3, 130)
  assert net.input_attrs["rows"] == net.input_attrs["cols"] == 150
  kinds = [l.kind for l in net.layers]
  assert kinds.count("con") == 29 and kinds.count("add_prev") == 14


def test_real_mmod_file_parses_fully():
  net = dlib.read_network(_real("mmod"))
  assert net.loss == "loss_mmod_" and len(net.layers) == 19
  # 180,711 conv weights and biases, plus gamma, beta and running mean/variance per bn channel.
  bn_channels = sum(l.params["gamma"].size for l in net.layers if l.kind == "bn")
  assert bn_channels == 16 + 32 + 32 + 45 * 3
  assert net.num_params == 180_711 + 4 * bn_channels


@pytest.fixture(scope="module")
def mmod_bytes():
  with open(_real("mmod"), "rb") as f:
    return f.read()


def test_fuzz_real_mmod_file(mmod_bytes):
  """Random truncations and byte flips of a real file (0.7 MB): parse or DlibFormatError."""
  data0 = mmod_bytes

  @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
  @given(st.integers(0, len(data0) - 1),
         st.lists(st.tuples(st.integers(0, len(data0) - 1), st.integers(0, 255)), max_size=4),
         st.booleans())
  def run(cut, flips, truncate):
    data = bytearray(data0[:cut] if truncate else data0)
    for pos, value in flips:
      if pos < len(data):
        data[pos] = value
    path = "/fuzz/mmod.dat"
    t = time.perf_counter()
    try:
      parse(bytes(data), path)
      assert not truncate, "a truncated file parsed"
    except dlib.DlibFormatError as e:
      check_error(e, path, len(data))
    assert time.perf_counter() - t < 2.0

  run()


def test_real_resnet_truncations():
  """The real ResNet cut at 300 points (dense in the header, stem and first blocks) is refused."""
  with open(_real("resnet"), "rb") as f:
    data = f.read()
  path = "/fuzz/resnet_cut.dat"
  cuts = np.concatenate([np.linspace(0, 40_000, 250), np.linspace(40_000, len(data) - 1, 50)])
  for n in cuts.astype(int):
    with pytest.raises(dlib.DlibFormatError) as e:
      parse(data[:n], path)
    check_error(e.value, path, n)
