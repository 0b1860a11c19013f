"""Tests for the dlib ResNet inference fast path: dead kernel taps, per-program XLA options."""

from __future__ import annotations

import importlib.metadata
import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from jaxface.models import dlib_resnet as dr


def np_conv_1d(x, w, b, stride, pad):
  """x [N, H, C], w [k, C, O] -> [N, OH, O] float64, one output position at a time."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (0, 0)))
  k = w.shape[0]
  oh = (x.shape[1] - k) // stride + 1
  out = np.zeros((x.shape[0], oh, w.shape[2]))
  for i in range(oh):
    for r in range(k):
      out[:, i] += x[:, i * stride + r] @ w[r]
  return out + b


def test_live_taps_drop_only_taps_that_read_padding():
  rng = np.random.default_rng(0)
  sliced = 0
  for size, k, s, p in itertools.product(range(1, 7), (1, 2, 3, 7), (1, 2, 3), (0, 1, 3)):
    if (size + 2 * p - k) // s + 1 < 1:
      continue
    lo, hi, pads = dr._live_taps(size, k, s, p)
    assert 0 <= lo < hi <= k
    sliced += (lo, hi) != (0, k)
    x = rng.normal(size=(1, size, 1, 2)).astype(np.float32)
    w = rng.normal(size=(k, 1, 2, 3)).astype(np.float32)
    got = jax.lax.conv_general_dilated(x, w[lo:hi], (s, 1), (pads, (0, 0)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    want = np_conv_1d(x[:, :, 0], w[:, 0], 0.0, s, p)
    assert got.shape[1] == want.shape[1], (size, k, s, p)
    np.testing.assert_allclose(np.asarray(got)[:, :, 0], want, atol=1e-5, err_msg=str((size, k, s, p)))
  assert sliced > 20  # the grid does exercise the slicing


@pytest.mark.parametrize("size,stride,pad", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (4, 2, 0)])
def test_conv_module_on_tiny_maps_matches_numpy(size, stride, pad):
  # 3x3 convs on 1x1/2x2 maps are where taps get dropped (dlib's last block sees 1x1).
  conv = dr.Conv(5, 4, 3, stride, pad, "highest", rngs=nnx.Rngs(0))
  conv.bias[...] = jax.numpy.arange(4, dtype=np.float32)
  x = np.random.default_rng(1).normal(size=(2, size, size, 5)).astype(np.float32)
  kernel = np.asarray(conv.kernel[...], np.float64)
  xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh = (size + 2 * pad - 3) // stride + 1
  want = np.zeros((2, oh, oh, 4)) + np.arange(4)
  for i, j, r, c in itertools.product(range(oh), range(oh), range(3), range(3)):
    want[:, i, j] += xp[:, i * stride + r, j * stride + c] @ kernel[r, c]
  eager = np.asarray(conv(x))
  jitted = np.asarray(jax.jit(lambda m, v: m(v))(conv, x))
  np.testing.assert_allclose(eager, want, atol=1e-5)
  np.testing.assert_allclose(jitted, eager, atol=1e-6)


def test_xla_options_per_program_and_overrides(monkeypatch):
  monkeypatch.delenv("JAXFACE_NO_XLA_TUNING", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  opts = dr._xla_options()
  if jax.default_backend() == "cpu" and importlib.metadata.version("jaxlib").startswith("0.10."):
    assert opts == {dr._YNN_OPTION: ""}
  else:
    assert opts is None
  monkeypatch.setenv("XLA_FLAGS", f"--{dr._YNN_OPTION}=")  # the user's own setting wins
  assert dr._xla_options() is None
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAXFACE_NO_XLA_TUNING", "1")
  assert dr._xla_options() is None


def test_infer_cache_shares_programs_and_matches_eager():
  spec = dr.DlibResNetSpec(input_size=40, stem_width=4, widths=(4, 8, 8), depths=(2, 1, 1),
                           embedding_dim=6)
  model = dr.build_dlib_resnet(spec, seed=3)
  enc = dr.FaceEncoder(model, max_batch=2)
  enc2 = dr.FaceEncoder(dr.build_dlib_resnet(spec, seed=4), max_batch=2)
  assert enc2._infer_fn is enc._infer_fn  # same architecture -> same jitted program
  chips = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
  got = enc(chips)  # buckets 2 + 1
  before = dr._infer._cache_size()
  np.testing.assert_array_equal(enc(chips[2:3]), got[2:3])  # bucket 1, as in the first call
  assert dr._infer._cache_size() == before, "a repeated bucket recompiled"
  eager = np.asarray(nnx.merge(enc._infer_graphdef, enc._infer_state)(dr.preprocess(chips)))
  np.testing.assert_allclose(got, eager, atol=1e-5)
  # the shared program, asked for by key, gives the same numbers
  leaves, treedef = jax.tree.flatten(enc._infer_state)
  np.testing.assert_allclose(np.asarray(dr._infer.get((enc._infer_graphdef, treedef))(leaves, chips[:2])),
                             got[:2], atol=1e-6)


def test_max_pool_is_exactly_reduce_window():
  rng = np.random.default_rng(2)
  for shape in [(2, 72, 72, 3), (1, 3, 3, 2), (1, 4, 7, 2), (3, 9, 5, 1)]:
    x = rng.normal(size=shape).astype(np.float32)
    want = jax.lax.reduce_window(x, -np.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
    got = dr._max_pool_3x3_s2(x)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
