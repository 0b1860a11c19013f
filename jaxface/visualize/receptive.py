"""Receptive fields of ConvNet layers, computed from the architecture (plain Python / NumPy; no JAX).

A network's geometry is a list of sliding-window layers (:class:`Window`:
convolutions and poolings alike) in forward order; element-wise layers (ReLU,
BatchNorm, affine) do not change geometry and are left out. A residual block is
a :class:`Parallel` of branches whose outputs are summed index by index.
:func:`receptive_fields` gives each named layer's :class:`Field`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxface import conv as conv_lib


@dataclasses.dataclass(frozen=True)
class Window:
  """A sliding-window layer: convolution or pooling.

  Attributes:
    kernel: int (every axis) or one int per spatial axis.
    stride: int or one per axis.
    padding: "same", "valid", an int, one int per axis, or (low, high) pairs
      (see ``jaxface.conv.conv_padding``).
    dilation: int or one per axis.
    name: when set, the receptive field after this layer is reported under
      this name (a tap point a visualizer can read activations from).
  """
  kernel: int | tuple[int, ...]
  stride: int | tuple[int, ...] = 1
  padding: str | int | tuple = 0
  dilation: int | tuple[int, ...] = 1
  name: str | None = None


@dataclasses.dataclass(frozen=True)
class Parallel:
  """Branches applied to the same input and summed (a residual block).

  An empty branch is the identity shortcut. Output unit ``i`` reads every
  branch's unit ``i`` (a zero-filled sum of unequal shapes, as in dlib's
  down-sampling blocks, aligns at index 0), so its field is the hull.
  """
  branches: tuple[tuple[Layer, ...], ...]
  name: str | None = None


Layer = Window | Parallel


@dataclasses.dataclass(frozen=True)
class Field:
  """Receptive field of one layer's units, per spatial axis (tuples of ints).

  Attributes:
    size: field extent in input pixels.
    jump: input pixels between neighbouring units.
    start: input coordinate of unit 0's first pixel (may be negative).
    out_size: the layer's spatial output size for the given input size.
  """
  size: tuple[int, ...]
  jump: tuple[int, ...]
  start: tuple[int, ...]
  out_size: tuple[int, ...]

  def box(self, position: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Inclusive input-pixel range ``((lo, hi), ...)`` of the unit at ``position`` (one index per axis)."""
    if len(position) != len(self.size):
      raise ValueError(f"position must have {len(self.size)} entries, got {tuple(position)}")
    return tuple((st + int(p) * j, st + int(p) * j + sz - 1)
                 for p, st, j, sz in zip(position, self.start, self.jump, self.size))


def _walk(layers: Sequence[Layer], size, jump, start, spatial, out: dict):
  """Propagates (size, jump, start, spatial size) through ``layers``; records named ones in ``out``."""
  rank = len(spatial)
  for layer in layers:
    if isinstance(layer, Window):
      shape = (*spatial, 1)
      pads = conv_lib.conv_padding(shape, layer.kernel, layer.stride, layer.padding, layer.dilation)
      new_spatial = conv_lib.conv_output_shape(shape, layer.kernel, 1, layer.stride, pads,
                                               layer.dilation)[:-1]
      k = conv_lib._per_axis(layer.kernel, rank, "kernel", 1)
      s = conv_lib._per_axis(layer.stride, rank, "stride", 1)
      d = conv_lib._per_axis(layer.dilation, rank, "dilation", 1)
      size = tuple(sz + dd * (kk - 1) * j for sz, kk, dd, j in zip(size, k, d, jump))
      start = tuple(st - lo * j for st, (lo, _), j in zip(start, pads, jump))
      jump = tuple(j * ss for j, ss in zip(jump, s))
      spatial = new_spatial
    elif isinstance(layer, Parallel):
      if not layer.branches:
        raise ValueError("Parallel needs at least one branch")
      results = [_walk(branch, size, jump, start, spatial, out) for branch in layer.branches]
      jumps = {r[1] for r in results}
      if len(jumps) != 1:
        raise ValueError(f"Parallel{' ' + layer.name if layer.name else ''}: branches downsample "
                         f"differently (jumps {sorted(jumps)}); their sum has no single grid")
      lo = tuple(min(r[2][a] for r in results) for a in range(rank))
      hi = tuple(max(r[2][a] + r[0][a] - 1 for r in results) for a in range(rank))
      size = tuple(h - l + 1 for l, h in zip(lo, hi))
      start = lo
      jump = results[0][1]
      # A zero-filled sum is as large as its largest branch.
      spatial = tuple(max(r[3][a] for r in results) for a in range(rank))
    else:
      raise ValueError(f"geometry entries must be Window or Parallel, got {layer!r}")
    if layer.name is not None:
      if layer.name in out:
        raise ValueError(f"layer name {layer.name!r} appears twice in the geometry")
      out[layer.name] = Field(size, jump, start, spatial)
  return size, jump, start, spatial


def receptive_fields(geometry: Sequence[Layer], input_size: Sequence[int]) -> dict[str, Field]:
  """Receptive field of every named layer of ``geometry`` for an input of ``input_size``.

  For every layer, along each spatial axis, three numbers locate the input
  pixels that can influence output unit ``i`` (Araujo et al., "Computing
  receptive fields of convolutional neural networks", Distill 2019): ``jump``
  (input pixels between neighbouring output units, the product of strides),
  ``size`` (extent of one unit's field) and ``start`` (input coordinate of the
  first pixel of unit 0's field, negative when padding reaches outside the
  image); unit ``i``'s field is ``[start + i * jump, start + i * jump + size - 1]``
  (inclusive). Through a layer with kernel k, stride s, dilation d and low-side
  padding p (effective kernel ``d * (k - 1) + 1``)::

    jump' = jump * s;  size' = size + d * (k - 1) * jump;  start' = start - p * jump

  For a ``Parallel`` the field is the hull of the branches' fields (all branches
  must downsample alike). Padding "same" depends on the input size, hence the
  ``input_size`` argument; the output sizes come along.

  Args:
    geometry: Window / Parallel entries in forward order.
    input_size: spatial size of the input, e.g. (H, W).

  Returns:
    {name: Field} in forward order.

  Raises:
    ValueError: bad input size or layer parameters, a window that does not fit
      its input, branches of a Parallel with different strides, a repeated name.
  """
  if (isinstance(input_size, str) or not isinstance(input_size, Sequence) or not input_size
      or not all(conv_lib._is_int(v) and v >= 1 for v in input_size)):
    raise ValueError(f"input_size must be positive integers, one per spatial axis; got {input_size!r}")
  rank = len(input_size)
  out: dict[str, Field] = {}
  _walk(geometry, (1,) * rank, (1,) * rank, (0,) * rank, tuple(int(v) for v in input_size), out)
  return out
