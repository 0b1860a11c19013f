"""dlib's face embedding ResNet file (``dlib_face_recognition_resnet_model_v1.dat``) -> arrays.

:func:`convert` reads and checks the network with
:func:`jaxface.formats.dlib.read_network` and returns its arrays in the layout
of :mod:`jaxface.models.dlib_resnet`, which owns the network; this module knows
only the file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxface.formats import dlib as dlib_format

# Version of :func:`convert`'s output layout (part of the weight cache's key,
# jaxface.pretrained): bump it when the output changes.
CONVERTER_VERSION = "1"


def convert(path: str) -> dict[str, Any]:
  """Parses dlib's ``.dat`` file -> the input of ``jaxface.models.dlib_resnet.from_converted``::

    {"spec": {"input_size", "mean_rgb", "stem_width", "stem_kernel", "widths",
              "depths", "embedding_dim"},                    # the architecture read
     "params": {"stem": {"kernel" [k, k, 3, C] HWIO, "bias" [C]},
                "stem_affine": {"scale" [C], "bias" [C]},
                "blocks": [{"conv1", "affine1", "conv2", "affine2"}, ...],
                "fc": [C_last, D]}}

  Checks that the file is dlib's 29-conv ResNet (stem conv 7x7/2, affine, relu,
  max pool 3x3/2; residual blocks conv 3x3 -> affine -> relu -> conv 3x3 ->
  affine plus a shortcut, down blocks with stride 2 and a 2x2 average-pooled
  shortcut; global average pool; a bias-free fc): the layer sequence (strides, paddings,
  pool sizes, channel counts), so a different dlib network is refused with a
  :class:`~jaxface.formats.dlib.DlibFormatError` naming the layer's byte
  offset rather than computing something else.
  """
  net = dlib_format.read_network(path, expect_loss=("loss_metric_", "loss_metric_2"))
  if net.input != "input_rgb_image_sized":
    raise dlib_format.DlibFormatError(path, 0, f"expected input_rgb_image_sized, found {net.input}")
  rows, cols = net.input_attrs["rows"], net.input_attrs["cols"]
  if rows != cols:
    raise dlib_format.DlibFormatError(path, 0, f"non-square input {rows}x{cols} is not supported")
  layers = list(net.layers)
  pos = 0

  def take(kind: str, **want) -> dlib_format.Layer:
    nonlocal pos
    if pos >= len(layers):
      raise dlib_format.DlibFormatError(path, 0, f"network ends where a {kind} layer was expected")
    layer = layers[pos]
    if layer.kind != kind:
      raise dlib_format.DlibFormatError(
          path, layer.offset, f"layer {pos}: expected {kind}, found {layer.name} "
          f"(not dlib's face embedding ResNet)")
    for key, value in want.items():
      if tuple(layer.attrs.get(key, ())) != value:
        raise dlib_format.DlibFormatError(
            path, layer.offset, f"layer {pos} ({layer.name}): {key} {layer.attrs.get(key)}, "
            f"expected {value}")
    pos += 1
    return layer

  def peek() -> str | None:
    return layers[pos].kind if pos < len(layers) else None

  def conv_params(layer: dlib_format.Layer, in_ch: int | None) -> dict[str, np.ndarray]:
    f = layer.params["filters"]  # [O, I, kh, kw]
    if in_ch is not None and f.shape[1] != in_ch:
      raise dlib_format.DlibFormatError(
          path, layer.offset, f"conv has {f.shape[1]} input channels, previous layer gives {in_ch}")
    return {"kernel": np.ascontiguousarray(f.transpose(2, 3, 1, 0)), "bias": layer.params["bias"]}

  def affine_params(layer: dlib_format.Layer, ch: int) -> dict[str, np.ndarray]:
    if layer.params["gamma"].shape != (ch,) or layer.attrs.get("mode") != 0:
      raise dlib_format.DlibFormatError(path, layer.offset,
                                        f"expected a per-channel affine layer over {ch} channels")
    return {"scale": layer.params["gamma"], "bias": layer.params["beta"]}

  stem = take("con", stride=(2, 2), padding=(0, 0))
  kernel = stem.params["filters"].shape[2]
  stem_p = conv_params(stem, 3)
  width = stem_p["bias"].shape[0]
  stem_a = affine_params(take("affine"), width)
  take("relu")
  take("max_pool", window=(3, 3), stride=(2, 2), padding=(0, 0))
  blocks, widths, depths = [], [], []
  in_ch = width
  while peek() == "con":
    c1 = take("con")
    down = tuple(c1.attrs["stride"]) == (2, 2)
    want = ((2, 2), (0, 0)) if down else ((1, 1), (1, 1))
    if (tuple(c1.attrs["stride"]), tuple(c1.attrs["padding"])) != want or \
        c1.params["filters"].shape[2:] != (3, 3):
      raise dlib_format.DlibFormatError(
          path, c1.offset, f"block conv: stride {c1.attrs['stride']} padding {c1.attrs['padding']} "
          f"kernel {c1.params['filters'].shape[2:]} does not fit dlib's ResNet blocks")
    p1 = conv_params(c1, in_ch)
    out = p1["bias"].shape[0]
    if not down and out != in_ch:
      raise dlib_format.DlibFormatError(path, c1.offset,
                                        f"identity block changes channels {in_ch} -> {out}")
    a1 = affine_params(take("affine"), out)
    take("relu")
    p2 = conv_params(take("con", stride=(1, 1), padding=(1, 1)), out)
    a2 = affine_params(take("affine"), out)
    if down:
      take("avg_pool", window=(2, 2), stride=(2, 2), padding=(0, 0))
    take("add_prev")
    take("relu")
    if down or not widths:
      widths.append(out)
      depths.append(0)
    if not blocks and down:
      raise dlib_format.DlibFormatError(path, c1.offset, "the first block must not be a down block")
    depths[-1] += 1
    blocks.append({"conv1": p1, "affine1": a1, "conv2": p2, "affine2": a2})
    in_ch = out
  take("avg_pool", window=(0, 0))
  fc = take("fc")
  weights = fc.params["weights"]
  if "bias" in fc.params or weights.shape[0] != in_ch:
    raise dlib_format.DlibFormatError(
        path, fc.offset, f"expected a bias-free fc over {in_ch} inputs, found weights "
        f"{weights.shape}{' and a bias' if 'bias' in fc.params else ''}")
  if pos != len(layers):
    raise dlib_format.DlibFormatError(path, layers[pos].offset,
                                      f"unexpected layer {layers[pos].name} after the fc layer")
  # The architecture as the file states it (the fields of DlibResNetSpec that shape the
  # parameters; inference options such as precision are the model's).
  spec = {"input_size": int(rows), "mean_rgb": [float(m) for m in net.input_attrs["mean_rgb"]],
          "stem_width": int(width), "stem_kernel": int(kernel), "widths": [int(w) for w in widths],
          "depths": [int(d) for d in depths], "embedding_dim": int(weights.shape[1])}
  params = {"stem": stem_p, "stem_affine": stem_a, "blocks": blocks, "fc": weights}
  return {"spec": spec, "params": params}
