"""Output shapes of N-D convolutions, without running one.

:func:`conv_output_shape` is plain Python (this module imports no JAX at load
time, so ``import jaxface`` stays cheap); :func:`lax_conv_output_shape` asks
``jax.lax.conv_general_dilated`` for the shape it really produces, and the
tests check that the two agree. Shapes are channels-last and exclude the batch:
a 1-D signal is ``(T, C)``, an image ``(H, W, C)``, a volume ``(D, H, W, C)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

__all__ = ["conv_output_shape", "conv_padding", "lax_conv_output_shape"]


def _is_int(v) -> bool:
  # NumPy integers are Integral too; bool is, but True as a kernel size is a mistake.
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _per_axis(value, rank: int, name: str, minimum: int) -> tuple[int, ...]:
  """An int (same for every axis) or a sequence of ``rank`` ints, each >= minimum."""
  if _is_int(value):
    values = (int(value),) * rank
  elif isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != rank or not all(_is_int(v) for v in value):
      raise ValueError(f"{name} must be an integer or {rank} integers (one per spatial axis), "
                       f"got {value!r}")
    values = tuple(int(v) for v in value)
  else:
    raise ValueError(f"{name} must be an integer or {rank} integers (one per spatial axis), "
                     f"got {value!r}")
  if min(values) < minimum:
    raise ValueError(f"{name} must be >= {minimum} along every axis, got {value!r}")
  return values


def _check_input_shape(input_shape) -> tuple[tuple[int, ...], int]:
  """(spatial sizes, channels) of a channels-last shape without batch."""
  if (not isinstance(input_shape, Sequence) or isinstance(input_shape, str)
      or len(input_shape) < 2 or not all(_is_int(v) for v in input_shape)):
    raise ValueError(
        "input_shape must be the integers (*spatial, channels), e.g. (14, 1) for a signal, "
        f"(14, 14, 3) for an image, (14, 14, 14, 1) for a volume; got {input_shape!r}")
  dims = tuple(int(v) for v in input_shape)
  if min(dims) < 1:
    raise ValueError(f"input_shape must be positive, got {input_shape!r}")
  return dims[:-1], dims[-1]


def conv_padding(input_shape, kernel, stride=1, padding=0, dilation=1) -> tuple[tuple[int, int], ...]:
  """Explicit (low, high) padding per spatial axis.

  Args: as ``conv_output_shape``.

  Returns:
    ``rank`` pairs of non-negative ints.
  """
  spatial, _ = _check_input_shape(input_shape)
  rank = len(spatial)
  k = _per_axis(kernel, rank, "kernel", 1)
  s = _per_axis(stride, rank, "stride", 1)
  d = _per_axis(dilation, rank, "dilation", 1)
  if isinstance(padding, str):
    mode = padding.lower()
    if mode == "valid":
      return ((0, 0),) * rank
    if mode != "same":
      raise ValueError(f"padding must be 'same', 'valid', an integer, {rank} integers or "
                       f"{rank} (low, high) pairs; got {padding!r}")
    pads = []
    for n, kk, ss, dd in zip(spatial, k, s, d):
      out = -(-n // ss)
      total = max((out - 1) * ss + dd * (kk - 1) + 1 - n, 0)
      pads.append((total // 2, total - total // 2))
    return tuple(pads)
  if _is_int(padding):
    p = int(padding)
    if p < 0:
      raise ValueError(f"padding must be >= 0, got {padding!r}")
    return ((p, p),) * rank
  bad = ValueError(f"padding must be 'same', 'valid', an integer, {rank} integers or "
                   f"{rank} (low, high) pairs (one per spatial axis); got {padding!r}")
  if not isinstance(padding, Sequence) or len(padding) != rank:
    raise bad
  pads = []
  for p in padding:
    if _is_int(p):
      pads.append((int(p), int(p)))
    elif (isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2
          and all(_is_int(v) for v in p)):
      pads.append((int(p[0]), int(p[1])))
    else:
      raise bad
  if min(min(p) for p in pads) < 0:
    raise ValueError(f"padding must be >= 0 along every axis, got {padding!r}")
  return tuple(pads)


def conv_output_shape(input_shape, kernel, filters, stride=1, padding=0, dilation=1) -> tuple[int, ...]:
  """Shape of a convolution's output (channels-last, no batch axis).

  Along each spatial axis, with input size n, kernel k, stride s, dilation d and
  padding (lo, hi)::

    out = floor((n + lo + hi - d * (k - 1) - 1) / s) + 1

  ``padding="valid"`` is (0, 0); ``padding="same"`` pads so that
  ``out = ceil(n / s)`` (TensorFlow/JAX "SAME": the total padding
  ``max((out - 1) * s + d * (k - 1) + 1 - n, 0)`` is split with the odd pixel
  at the end).

  Examples (the lecture's)::

    conv_output_shape((14, 14, 3), (5, 5), 16)           == (10, 10, 16)
    conv_output_shape((14, 1), 5, 16)                    == (10, 16)
    conv_output_shape((14, 14, 14, 1), (5, 5, 5), 16)    == (10, 10, 10, 16)
    conv_output_shape((64, 64, 64, 3), 4, 16, stride=2)  == (31, 31, 31, 16)

  Args:
    input_shape: ``(*spatial, channels)`` positive ints; the spatial rank
      (1, 2, 3, ...) is ``len(input_shape) - 1``. The input channel count
      does not change the output shape (each filter spans all channels).
    kernel: kernel size, an int for every axis or one int per spatial axis.
    filters: number of filters = output channels, >= 1.
    stride: int or one int per spatial axis, >= 1.
    padding: ``"valid"`` (none), ``"same"`` (output ``ceil(n / stride)``), an
      int (both sides of every axis), one int per axis, or one
      ``(low, high)`` pair per axis; >= 0.
    dilation: kernel dilation, int or one int per spatial axis, >= 1.

  Returns:
    ``(*out_spatial, filters)`` tuple of ints.

  Raises:
    ValueError: naming the bad argument, or the axis whose dilated kernel
      does not fit in the padded input.
  """
  spatial, _ = _check_input_shape(input_shape)
  rank = len(spatial)
  if not _is_int(filters) or int(filters) < 1:
    raise ValueError(f"filters must be an integer >= 1, got {filters!r}")
  pads = conv_padding(input_shape, kernel, stride, padding, dilation)
  k = _per_axis(kernel, rank, "kernel", 1)
  s = _per_axis(stride, rank, "stride", 1)
  d = _per_axis(dilation, rank, "dilation", 1)
  out = []
  for axis, (n, kk, ss, dd, (lo, hi)) in enumerate(zip(spatial, k, s, d, pads)):
    span = dd * (kk - 1) + 1
    if span > n + lo + hi:
      raise ValueError(
          f"kernel {kk} (dilation {dd}: spans {span}) does not fit along spatial axis {axis} "
          f"of input_shape {tuple(input_shape)}: size {n} + padding {lo}+{hi} = {n + lo + hi}")
    out.append((n + lo + hi - span) // ss + 1)
  return (*out, int(filters))


def lax_conv_output_shape(input_shape, kernel, filters, stride=1, padding=0,
                          dilation=1) -> tuple[int, ...]:
  """The shape ``jax.lax.conv_general_dilated`` actually gives (traced, nothing computed).

  Same arguments and result as ``conv_output_shape``; used to check it.
  """
  import jax
  import jax.numpy as jnp

  spatial, channels = _check_input_shape(input_shape)
  rank = len(spatial)
  if not _is_int(filters) or int(filters) < 1:
    raise ValueError(f"filters must be an integer >= 1, got {filters!r}")
  k = _per_axis(kernel, rank, "kernel", 1)
  s = _per_axis(stride, rank, "stride", 1)
  d = _per_axis(dilation, rank, "dilation", 1)
  if isinstance(padding, str) and padding.lower() == "same":
    lax_padding = "SAME"  # let lax compute it, so the check is independent of conv_padding
  else:
    lax_padding = conv_padding(input_shape, k, s, padding, d)
  letters = "DHW"[-rank:] if rank <= 3 else "".join(chr(ord("a") + i) for i in range(rank))
  dims = ("N" + letters + "C", letters + "IO", "N" + letters + "C")
  x = jax.ShapeDtypeStruct((1, *spatial, channels), jnp.float32)
  w = jax.ShapeDtypeStruct((*k, channels, int(filters)), jnp.float32)
  out = jax.eval_shape(
      lambda x, w: jax.lax.conv_general_dilated(x, w, window_strides=s, padding=lax_padding,
                                                rhs_dilation=d, dimension_numbers=dims), x, w)
  return tuple(int(v) for v in out.shape[1:])
