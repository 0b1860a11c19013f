"""Tests for jaxface.conv: convolution output shapes, against brute force and lax."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxface
from jaxface import conv


def _brute_shape(input_shape, kernel, filters, stride, pads, dilation):
  """Counts window positions one by one: the window starting at padded index p covers
  p, p + d, ..., p + d * (k - 1), and is a valid output if all of them lie in the padded input."""
  out = []
  for n, k, s, d, (lo, hi) in zip(input_shape[:-1], kernel, stride, dilation, pads):
    count, p = 0, 0
    while p + d * (k - 1) <= n + lo + hi - 1:
      count += 1
      p += s
    out.append(count)
  return (*out, filters)


@pytest.mark.parametrize("input_shape,kernel,filters,kw,expected", [
    ((14, 14, 3), (5, 5), 16, {}, (10, 10, 16)),
    ((14, 1), 5, 16, {}, (10, 16)),
    ((14, 1), (5,), 16, {}, (10, 16)),
    ((14, 14, 14, 1), (5, 5, 5), 16, {}, (10, 10, 10, 16)),
    ((10, 10, 10, 16), (5, 5, 5), 32, {}, (6, 6, 6, 32)),
    ((32, 32, 32, 16), (3, 3, 3), 32, {}, (30, 30, 30, 32)),
    ((64, 64, 64, 3), (4, 4, 4), 16, dict(stride=2, padding=0), (31, 31, 31, 16)),
    ((64, 64, 64, 3), 4, 16, dict(stride=2, padding="valid"), (31, 31, 31, 16)),
])
def test_lecture_examples(input_shape, kernel, filters, kw, expected):
  assert conv.conv_output_shape(input_shape, kernel, filters, **kw) == expected
  assert jaxface.conv_output_shape(input_shape, kernel, filters, **kw) == expected
  assert conv.lax_conv_output_shape(input_shape, kernel, filters, **kw) == expected


def test_lecture_chain_14_cubed_to_6_cubed():
  first = conv.conv_output_shape((14, 14, 14, 1), 5, 16)
  assert conv.conv_output_shape(first, 5, 32) == (6, 6, 6, 32)


def test_padding_forms_stride_and_dilation():
  f = conv.conv_output_shape
  assert f((28, 28, 1), 3, 8, padding="same") == (28, 28, 8)
  assert f((28, 28, 1), 3, 8, padding="SAME", stride=2) == (14, 14, 8)
  assert f((27, 1), 4, 8, padding="same", stride=2) == (14, 8)
  assert f((28, 28, 1), 3, 8, padding=1) == (28, 28, 8)
  assert f((28, 20, 1), 3, 8, padding=(1, 0)) == (28, 18, 8)
  assert f((28, 20, 1), 3, 8, padding=((2, 0), (0, 1))) == (28, 19, 8)
  assert f((28, 20, 1), (3, 5), 8, stride=(1, 2)) == (26, 8, 8)
  # A 3-tap kernel with dilation 2 spans 5 inputs.
  assert f((16, 2), 3, 4, dilation=2) == (12, 4)
  assert f((16, 16, 2), 3, 4, dilation=(1, 3)) == (14, 10, 4)
  assert f((np.int64(14), np.int32(1)), np.int64(5), np.int16(16)) == (10, 16)
  assert conv.conv_padding((10, 1), 4, padding="same") == ((1, 2),)


@pytest.mark.parametrize("args,kw,match", [
    (((14,), 3, 4), {}, "input_shape must be"),
    (((14, 0, 3), 3, 4), {}, "input_shape must be positive"),
    (("14x14x3", 3, 4), {}, "input_shape must be"),
    (((14, 14, 3), (3, 3, 3), 4), {}, "kernel must be an integer or 2 integers"),
    (((14, 14, 3), 0, 4), {}, "kernel must be >= 1"),
    (((14, 14, 3), True, 4), {}, "kernel must be"),
    (((14, 14, 3), 3.0, 4), {}, "kernel must be"),
    (((14, 14, 3), 3, 0), {}, "filters must be an integer >= 1"),
    (((14, 14, 3), 3, 4), dict(stride=0), "stride must be >= 1"),
    (((14, 14, 3), 3, 4), dict(dilation=(1, 0)), "dilation must be >= 1"),
    (((14, 14, 3), 3, 4), dict(padding="full"), "padding must be 'same', 'valid'"),
    (((14, 14, 3), 3, 4), dict(padding=-1), "padding must be >= 0"),
    (((14, 14, 3), 3, 4), dict(padding=(1, 2, 3)), "padding must be"),
    (((14, 14, 3), 3, 4), dict(padding=((1, -1), 0)), "padding must be >= 0"),
    (((4, 14, 3), 5, 4), {}, "does not fit along spatial axis 0"),
    (((14, 4, 3), 3, 4), dict(dilation=2), r"spans 5\) does not fit along spatial axis 1"),
])
def test_bad_arguments_are_named(args, kw, match):
  with pytest.raises(ValueError, match=match):
    conv.conv_output_shape(*args, **kw)


_axis = st.tuples(st.integers(1, 20), st.integers(1, 5), st.integers(1, 4), st.integers(1, 3),
                  st.integers(0, 3), st.integers(0, 3))


@settings(max_examples=60, deadline=None)
@given(axes=st.lists(_axis, min_size=1, max_size=3), channels=st.integers(1, 3),
       filters=st.integers(1, 4), same=st.booleans())
def test_matches_brute_force_and_lax(axes, channels, filters, same):
  n, k, s, d, lo, hi = (tuple(v) for v in zip(*axes))
  shape = (*n, channels)
  padding = "same" if same else tuple(zip(lo, hi))
  pads = conv.conv_padding(shape, k, s, padding, d)
  fits = all(dd * (kk - 1) + 1 <= nn + a + b for nn, kk, dd, (a, b) in zip(n, k, d, pads))
  if not fits:
    with pytest.raises(ValueError, match="does not fit"):
      conv.conv_output_shape(shape, k, filters, s, padding, d)
    return
  got = conv.conv_output_shape(shape, k, filters, s, padding, d)
  assert got == _brute_shape(shape, k, filters, s, pads, d)
  assert got == conv.lax_conv_output_shape(shape, k, filters, s, padding, d)
  if same:
    assert got[:-1] == tuple(-(-nn // ss) for nn, ss in zip(n, s))


def test_same_padding_pairs_give_the_values_lax_same_gives():
  # Not just the shape: the explicit (low, high) split is the one lax uses for "SAME".
  rng = np.random.default_rng(0)
  for shape, k, s, d in [((9, 2), (4,), (2,), (1,)), ((7, 8, 1), (3, 2), (2, 3), (2, 1)),
                         ((5, 6, 7, 1), (2, 3, 4), (1, 2, 2), (1, 1, 2))]:
    x = jnp.asarray(rng.standard_normal((1, *shape)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*k, shape[-1], 3)), jnp.float32)
    letters = "DHW"[-len(k):]
    dims = ("N" + letters + "C", letters + "IO", "N" + letters + "C")
    ref = jax.lax.conv_general_dilated(x, w, s, "SAME", rhs_dilation=d, dimension_numbers=dims)
    pads = conv.conv_padding(shape, k, s, "same", d)
    got = jax.lax.conv_general_dilated(x, w, s, pads, rhs_dilation=d, dimension_numbers=dims)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert ref.shape[1:] == conv.conv_output_shape(shape, k, 3, s, "same", d)


def test_package_import_does_not_load_jax():
  code = ("import sys, jaxface; assert jaxface.conv_output_shape((14, 1), 5, 16) == (10, 16); "
          "assert 'jax' not in sys.modules, 'jax was imported'")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
