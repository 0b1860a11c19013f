"""dlib's MMOD CNN face detector file (``mmod_human_face_detector.dat``) -> arrays.

:func:`convert` reads the network with :func:`jaxface.formats.dlib.read_network`
and returns the arrays that ``jaxface.faces.detector.FaceDetector`` (which owns
the network) is built from.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxface.formats import dlib as dlib_format

# Version of :func:`convert`'s output layout (part of the weight cache's key,
# jaxface.pretrained): bump it when the output changes.
CONVERTER_VERSION = "mmod-v1"


def convert(path: str) -> dict:
  """Parses the MMOD ``.dat`` file -> the input of
  ``jaxface.faces.detector.FaceDetector.from_converted``::

    {"convs": {"00": {"filters" [O, I, kh, kw] (dlib's OIHW), "bias" [O],
                      "scale" [O], "shift" [O], "stride" [2], "padding" [2],
                      "relu": bool}, "01": ...},
     "mean_rgb": [3] float32, "window": [width, height],
     "nms_iou_threshold": float, "nms_covered_threshold": float}

  Batch norm is turned into the inference affine dlib uses
  (``scale = gamma / sqrt(var + eps)``, ``shift = beta - scale * mean``);
  convolutions keep dlib's OIHW filter layout here.

  Raises:
    DlibFormatError: the file is not the expected MMOD network (names the
      file and the byte offset of the offending record).
  """
  net = dlib_format.read_network(path, expect_loss=("loss_mmod_",))
  if net.input != "input_rgb_image_pyramid":
    raise dlib_format.DlibFormatError(path, 0, f"expected an input_rgb_image_pyramid network, found {net.input}")
  convs: list[dict[str, Any]] = []
  layers = net.layers
  i = 0
  while i < len(layers):
    layer = layers[i]
    if layer.kind != "con":
      raise dlib_format.DlibFormatError(path, layer.offset,
                            f"expected a convolution at layer {i}, found {layer.name!r}")
    filters = np.asarray(layer.params["filters"], np.float32)
    out_ch = filters.shape[0]
    bias = np.asarray(layer.params.get("bias", np.zeros(out_ch, np.float32)), np.float32)
    scale = np.ones(out_ch, np.float32)
    shift = np.zeros(out_ch, np.float32)
    relu = False
    i += 1
    if i < len(layers) and layers[i].kind in ("bn", "affine"):
      p = layers[i].params
      if p["gamma"].shape != (out_ch,):
        raise dlib_format.DlibFormatError(path, layers[i].offset,
                              f"{layers[i].name} has {p['gamma'].shape[0]} channels, "
                              f"the convolution before it {out_ch}")
      if layers[i].kind == "bn":
        eps = float(layers[i].attrs["eps"])
        scale = (p["gamma"] / np.sqrt(p["running_var"] + eps)).astype(np.float32)
        shift = (p["beta"] - scale * p["running_mean"]).astype(np.float32)
      else:
        scale, shift = p["gamma"].astype(np.float32), p["beta"].astype(np.float32)
      i += 1
    if i < len(layers) and layers[i].kind == "relu":
      relu = True
      i += 1
    if convs and convs[-1]["filters"].shape[0] != filters.shape[1]:
      raise dlib_format.DlibFormatError(path, layer.offset, f"convolution {len(convs)} takes {filters.shape[1]} "
                            f"channels, the previous one gives {convs[-1]['filters'].shape[0]}")
    convs.append({"filters": filters, "bias": bias, "scale": scale, "shift": shift,
                  "stride": list(layer.attrs["stride"]), "padding": list(layer.attrs["padding"]),
                  "relu": relu})
  if not convs or convs[0]["filters"].shape[1] != 3 or convs[-1]["filters"].shape[0] != 1:
    raise dlib_format.DlibFormatError(path, 0, "expected a 3-channel input and a single score channel")
  a = net.loss_attrs
  return {
      "convs": {f"{k:02d}": c for k, c in enumerate(convs)},
      "mean_rgb": np.asarray(net.input_attrs["mean_rgb"], np.float32),
      "window": [int(a["window_width"]), int(a["window_height"])],
      "nms_iou_threshold": float(a["nms_iou_threshold"]),
      "nms_covered_threshold": float(a["nms_percent_covered_threshold"]),
  }
