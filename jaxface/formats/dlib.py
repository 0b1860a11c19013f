"""Reader for dlib's serialization format (the ``.dat`` model files), without dlib.

:class:`Reader` reads the primitives with every read bounds-checked, so a bad
file raises :class:`DlibFormatError` naming the file and byte offset;
:func:`read_network` parses a whole DNN file into :class:`Layer` records.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

# Specials of dlib's scalar float encoding (exponent values).
_EXP_INF, _EXP_NINF, _EXP_NAN = 32000, 32001, 32002


class DlibFormatError(ValueError):
  """A dlib model file is truncated, corrupt, or not the file expected."""

  def __init__(self, path: str, offset: int, message: str):
    self.path, self.offset = path, offset
    super().__init__(f"{path}: byte offset {offset}: {message}")


class Reader:
  """Bounds-checked cursor over the bytes of one dlib file.

  Every read is checked against the bytes that remain, so a truncated,
  corrupted or unrelated file raises :class:`DlibFormatError` naming the file and
  the byte offset; no length field is trusted before it is checked against the
  file size, so a corrupt length can neither hang the reader nor allocate more
  memory than the file holds.

  Primitives (see ``../shared/specs/dlib-models.md``):

  * integer: one control byte (bit 7 = negative, low 4 bits = byte count 1..8),
    then the magnitude little-endian;
  * bool: ASCII ``'1'`` / ``'0'``; string: integer length then bytes;
  * scalar float: integer mantissa then integer exponent, value = m * 2**e;
  * tensor: version integer (2 = with data, 1 = shape only), four integers
    n, k, nr, nc, then n*k*nr*nc little-endian float32.
  """

  def __init__(self, data: bytes, path: str = "<bytes>"):
    self.data = memoryview(data)
    self.path = path
    self.pos = 0

  # -- errors -------------------------------------------------------------
  def error(self, message: str, offset: int | None = None) -> DlibFormatError:
    return DlibFormatError(self.path, self.pos if offset is None else offset, message)

  @property
  def remaining(self) -> int:
    return len(self.data) - self.pos

  def _take(self, n: int, what: str) -> memoryview:
    if n < 0 or n > self.remaining:
      raise self.error(f"truncated: {what} needs {n} bytes, {self.remaining} left")
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  # -- primitives ---------------------------------------------------------
  def int(self, what: str = "integer") -> int:
    start = self.pos
    ctrl = self._take(1, what)[0]
    n = ctrl & 0x0F
    if n < 1 or n > 8 or ctrl & 0x70:
      raise self.error(f"bad control byte 0x{ctrl:02x} for {what}", start)
    value = int.from_bytes(self._take(n, what), "little")
    return -value if ctrl & 0x80 else value

  def uint(self, what: str, *, limit: int | None = None) -> int:
    start = self.pos
    v = self.int(what)
    if v < 0 or (limit is not None and v > limit):
      raise self.error(f"{what} = {v} is out of range" + (f" (max {limit})" if limit is not None else ""),
                       start)
    return v

  def bool(self, what: str = "bool") -> bool:
    start = self.pos
    c = self._take(1, what)[0]
    if c not in (0x30, 0x31):
      raise self.error(f"expected a bool ('0'/'1') for {what}, found byte 0x{c:02x}", start)
    return c == 0x31

  def string(self, what: str = "string", *, max_len: int = 256) -> str:
    n = self.uint(f"length of {what}", limit=max_len)
    start = self.pos
    raw = bytes(self._take(n, what))
    try:
      return raw.decode("ascii")
    except UnicodeDecodeError:
      raise self.error(f"{what} is not ASCII: {raw[:32]!r}", start) from None

  def float(self, what: str = "float") -> float:
    start = self.pos
    mantissa = self.int(f"mantissa of {what}")
    exponent = self.int(f"exponent of {what}")
    if exponent == _EXP_INF:
      return float("inf")
    if exponent == _EXP_NINF:
      return float("-inf")
    if exponent == _EXP_NAN:
      return float("nan")
    if not -1100 <= exponent <= 1100 or abs(mantissa) >= 1 << 64:
      raise self.error(f"{what}: exponent {exponent} out of range for a double", start)
    return float(np.ldexp(np.float64(mantissa), exponent))

  def expect(self, expected: tuple[str, ...], what: str) -> str:
    start = self.pos
    s = self.string(what)
    if s not in expected:
      raise self.error(f"expected {what} {' or '.join(map(repr, expected))}, found {s!r}", start)
    return s

  def tensor(self, what: str = "tensor") -> np.ndarray:
    """A tensor record -> float32 array [n, k, nr, nc] (shape-only records give zeros-size arrays)."""
    start = self.pos
    version = self.int(f"version of {what}")
    if version not in (1, 2):
      raise self.error(f"{what}: unknown tensor version {version}", start)
    shape = tuple(self.uint(f"{what} dimension", limit=1 << 31) for _ in range(4))
    if version == 1:
      return np.zeros((0,), np.float32).reshape(0, 0, 0, 0) if not any(shape) else np.empty(0, np.float32)
    count = math.prod(shape)  # Python ints: np.prod would wrap (2**31)**4 to 0 in int64
    if 4 * count > self.remaining:  # checked before allocating anything
      raise self.error(f"{what} of shape {shape} needs {4 * count} bytes, {self.remaining} left", start)
    arr = np.frombuffer(self._take(4 * count, what), dtype="<f4").astype(np.float32).reshape(shape)
    return arr

  def empty_tensor(self, what: str) -> None:
    start = self.pos
    t = self.tensor(what)
    if t.size:
      raise self.error(f"{what}: expected an empty tensor, found {t.shape}", start)

  def alias(self, what: str) -> tuple[int, ...]:
    """dlib's alias_tensor record: version 1 and the 4-D shape; returned without the version."""
    start = self.pos
    version = self.int(f"version of {what}")
    if version != 1:
      raise self.error(f"{what}: unknown alias-tensor version {version}", start)
    return tuple(self.uint(f"{what} dimension", limit=1 << 31) for _ in range(4))

  def finish(self) -> None:
    if self.remaining:
      raise self.error(f"{self.remaining} unexpected trailing bytes after the model")


def read_file(path: str) -> Reader:
  """Opens ``path`` as a Reader; missing or unreadable files raise with the path."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise FileNotFoundError(f"cannot read dlib model file {path}: {e.strerror or e}") from e
  return Reader(data, path)


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Layer:
  """One computational layer of a dlib network, in forward order.

  ``kind`` is one of con, affine, bn, relu, add_prev, max_pool, avg_pool, fc;
  ``name`` is the record name as stored (e.g. ``con_4``); ``params`` hold
  float32 arrays (conv: ``filters`` [O, I, kh, kw], ``bias`` [O]; affine:
  ``gamma``, ``beta`` [C]; bn: those plus ``running_mean``, ``running_var``;
  fc: ``weights`` [in, out] and optional ``bias`` [out]); ``attrs`` hold ints
  and floats (strides, paddings, pool sizes, eps, ...). ``offset`` is where
  the record starts in the file, for error messages.
  """
  kind: str
  name: str
  params: dict[str, np.ndarray]
  attrs: dict[str, Any]
  offset: int


@dataclasses.dataclass
class Network:
  """A parsed dlib network file."""
  path: str
  loss: str
  loss_attrs: dict[str, Any]
  input: str
  input_attrs: dict[str, Any]
  layers: list[Layer]
  wrapper_versions: list[int]

  @property
  def num_params(self) -> int:
    return sum(int(p.size) for layer in self.layers for p in layer.params.values())


def _read_loss(r: Reader) -> tuple[str, dict]:
  name = r.expect(("loss_metric_", "loss_metric_2", "loss_mmod_"), "loss layer name")
  if name.startswith("loss_metric"):
    attrs = {"margin": r.float("margin"), "distance_threshold": r.float("distance threshold")}
  else:
    start = r.pos
    version = r.int("mmod options version")
    if version != 1:
      raise r.error(f"unsupported mmod options version {version}", start)
    attrs = {
        "window_width": r.uint("detector window width", limit=1 << 16),
        "window_height": r.uint("detector window height", limit=1 << 16),
        "loss_per_false_alarm": r.float("loss per false alarm"),
        "loss_per_missed_target": r.float("loss per missed target"),
        "truth_match_iou_threshold": r.float("truth match IoU threshold"),
        "nms_iou_threshold": r.float("NMS IoU threshold"),
        "nms_percent_covered_threshold": r.float("NMS percent-covered threshold"),
        "ignore_iou_threshold": r.float("ignore IoU threshold"),
        "ignore_percent_covered_threshold": r.float("ignore percent-covered threshold"),
    }
  return name, attrs


def _read_input(r: Reader) -> tuple[str, dict]:
  name = r.expect(("input_rgb_image_sized", "input_rgb_image_pyramid", "input_rgb_image"),
                  "input layer name")
  means = (r.float("red mean"), r.float("green mean"), r.float("blue mean"))
  attrs: dict[str, Any] = {"mean_rgb": means}
  if name == "input_rgb_image_sized":
    attrs["rows"] = r.uint("input rows", limit=1 << 16)
    attrs["cols"] = r.uint("input cols", limit=1 << 16)
  return name, attrs


def _layer_tail(r: Reader, name: str) -> None:
  # add_layer's bookkeeping after every layer: three flags and three cached tensors,
  # all empty in a saved model.
  for what in ("this_layer_setup_called", "gradient_input_is_stale", "output_and_gradient_disabled"):
    r.bool(f"{name} {what}")
  for what in ("x_grad", "cached_output", "params_grad"):
    r.empty_tensor(f"{name} {what}")


def _split(r: Reader, flat: np.ndarray, shapes: list[tuple[str, tuple[int, ...]]], start: int,
           name: str) -> dict[str, np.ndarray]:
  flat = flat.reshape(-1)
  need = sum(math.prod(s) for _, s in shapes)
  if flat.size != need:
    raise r.error(f"{name}: parameter tensor has {flat.size} values, layer shapes need {need}", start)
  out, i = {}, 0
  for key, shape in shapes:
    n = math.prod(shape)
    out[key] = flat[i:i + n].reshape(shape).copy()
    i += n
  return out


def _read_layer(r: Reader) -> Layer:
  start = r.pos
  name = r.string("layer name", max_len=64)
  attrs: dict[str, Any] = {}
  params: dict[str, np.ndarray] = {}
  if name in ("con_4", "con_5", "con_6"):
    p_at = r.pos
    flat = r.tensor(f"{name} parameters")
    num_filters = r.uint(f"{name} num_filters", limit=1 << 20)
    kh = r.uint(f"{name} rows", limit=4096)
    kw = r.uint(f"{name} cols", limit=4096)
    attrs["stride"] = (r.uint(f"{name} stride y", limit=4096), r.uint(f"{name} stride x", limit=4096))
    attrs["padding"] = (r.uint(f"{name} padding y", limit=4096), r.uint(f"{name} padding x", limit=4096))
    fshape = r.alias(f"{name} filters shape")
    bshape = r.alias(f"{name} bias shape")
    for what in ("learning rate multiplier", "weight decay multiplier",
                 "bias learning rate multiplier", "bias weight decay multiplier"):
      r.float(f"{name} {what}")
    use_bias = r.bool(f"{name} use_bias") if name == "con_6" else True
    if fshape[0] != num_filters or fshape[2:] != (kh, kw):
      raise r.error(f"{name}: filter shape {fshape} disagrees with {num_filters} filters {kh}x{kw}", start)
    shapes = [("filters", fshape)] + ([("bias", (num_filters,))] if use_bias else [])
    params = _split(r, flat, shapes, p_at, name)
    kind = "con"
    del bshape
  elif name in ("affine_", "affine_2"):
    p_at = r.pos
    flat = r.tensor(f"{name} parameters")
    gshape = r.alias(f"{name} gamma shape")
    r.alias(f"{name} beta shape")
    attrs["mode"] = r.int(f"{name} mode")  # 0: per-channel (conv), 1: per-element (fc)
    if name == "affine_2":
      attrs["disabled"] = r.bool(f"{name} disabled")
    c = math.prod(gshape)
    params = _split(r, flat, [("gamma", (c,)), ("beta", (c,))], p_at, name)
    kind = "affine"
  elif name in ("bn_con2", "bn_fc2", "bn_con", "bn_fc"):
    p_at = r.pos
    flat = r.tensor(f"{name} parameters")
    gshape = r.alias(f"{name} gamma shape")
    r.alias(f"{name} beta shape")
    means = r.tensor(f"{name} means")
    invstds = r.tensor(f"{name} invstds")
    running_means = r.tensor(f"{name} running means")
    running_vars = r.tensor(f"{name} running variances")
    attrs["num_updates"] = r.uint(f"{name} num_updates")
    attrs["running_stats_window_size"] = r.uint(f"{name} running_stats_window_size")
    for what in ("learning rate multiplier", "weight decay multiplier",
                 "bias learning rate multiplier", "bias weight decay multiplier"):
      r.float(f"{name} {what}")
    attrs["eps"] = r.float(f"{name} eps")
    c = math.prod(gshape)
    params = _split(r, flat, [("gamma", (c,)), ("beta", (c,))], p_at, name)
    if running_means.size != c or running_vars.size != c:
      raise r.error(f"{name}: running statistics have {running_means.size}/{running_vars.size} "
                    f"values for {c} channels", p_at)
    params["running_mean"] = running_means.reshape(c).copy()
    params["running_var"] = running_vars.reshape(c).copy()
    del means, invstds
    kind = "bn"
  elif name in ("relu_", "relu_2"):
    if name == "relu_2":
      attrs["disabled"] = r.bool(f"{name} disabled")
    kind = "relu"
  elif name == "add_prev_":
    kind = "add_prev"
  elif name in ("max_pool_2", "avg_pool_2"):
    attrs["window"] = (r.uint(f"{name} rows", limit=4096), r.uint(f"{name} cols", limit=4096))
    attrs["stride"] = (r.uint(f"{name} stride y", limit=4096), r.uint(f"{name} stride x", limit=4096))
    attrs["padding"] = (r.uint(f"{name} padding y", limit=4096), r.uint(f"{name} padding x", limit=4096))
    kind = name[:-2]
  elif name in ("fc_2", "fc_3"):
    num_outputs = r.uint(f"{name} num_outputs", limit=1 << 24)
    num_inputs = r.uint(f"{name} num_inputs", limit=1 << 24)
    p_at = r.pos
    flat = r.tensor(f"{name} parameters")
    r.alias(f"{name} weights shape")
    r.alias(f"{name} bias shape")
    attrs["bias_mode"] = r.int(f"{name} bias mode")  # 0: bias, 1: no bias
    for what in ("learning rate multiplier", "weight decay multiplier",
                 "bias learning rate multiplier", "bias weight decay multiplier"):
      r.float(f"{name} {what}")
    if name == "fc_3":
      attrs["use_bias"] = r.bool(f"{name} use_bias")
    shapes = [("weights", (num_inputs, num_outputs))]
    if attrs["bias_mode"] == 0:
      shapes.append(("bias", (num_outputs,)))
    params = _split(r, flat, shapes, p_at, name)
    kind = "fc"
  else:
    raise r.error(f"unknown or unsupported layer {name!r}", start)
  _layer_tail(r, name)
  return Layer(kind=kind, name=name, params=params, attrs=attrs, offset=start)


# Wrapper versions: 2 = add_layer, 1 = tag/skip wrapper, 3 = the add_layer over the input.
_MAX_WRAPPERS = 10_000


def read_network(path: str, *, expect_loss: tuple[str, ...] | None = None) -> Network:
  """Parses a dlib DNN file (embedding ResNet or MMOD detector) -> :class:`Network`.

  The layers come back as a flat list of :class:`Layer` records in forward
  order; the tag/skip wiring is not stored in the file and belongs to the
  model code that consumes the list.

  Consumes every byte: trailing data is an error, as is any record that does
  not fit the bytes that remain.
  """
  r = read_file(path)
  start = r.pos
  version = r.int("network version")
  if version != 1:
    raise r.error(f"not a dlib network file (first record {version}, expected 1)", start)
  loss, loss_attrs = _read_loss(r)
  if expect_loss and loss not in expect_loss:
    raise r.error(f"this is a {loss!r} network, expected {' or '.join(expect_loss)}", start)
  versions: list[int] = []
  while True:
    at = r.pos
    v = r.int("layer wrapper version")
    if v == 3:
      versions.append(v)
      break
    if v not in (1, 2):
      raise r.error(f"unexpected layer wrapper version {v}", at)
    versions.append(v)
    if len(versions) > _MAX_WRAPPERS:
      raise r.error("more than 10000 layer wrappers: not a dlib network", at)
  num_layers = versions.count(2) + 1
  inp, input_attrs = _read_input(r)
  layers = []
  for i in range(num_layers):
    layers.append(_read_layer(r))
    if i == 0:
      # The add_layer directly over the input layer stores one more integer.
      at = r.pos
      extra = r.int("input layer sample_expansion_factor")
      if extra < 1 or extra > 1 << 16:
        raise r.error(f"bad sample expansion factor {extra}", at)
  r.finish()
  return Network(path=r.path, loss=loss, loss_attrs=loss_attrs, input=inp, input_attrs=input_attrs,
                 layers=layers, wrapper_versions=versions)
