"""Per-network adapters: intermediate activations and the geometry behind them.

An :class:`Adapter` gives the visualizer, for one network (the face encoder,
VGG19, dlib's ResNet), its tap points' activations, its preprocessing and the
receptive-field geometry of its layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxface.visualize import receptive as rf


@dataclasses.dataclass(frozen=True)
class Adapter:
  """One network, as the visualizer sees it.

  The modules are not edited and expose no hooks, so each adapter walks the
  module's layers itself, calling the module's own sub-layers; the tests check
  that each walk reproduces the module's own output, so a change in a model
  that the walk does not follow fails loudly.

  Attributes:
    name: short description for file headers and logs.
    params: pytree passed to ``features`` (device arrays).
    features: ``(params, x [B, H, W, C] float32, layers tuple) -> {name: [B, h, w, U] float32}``:
      a pure function of already preprocessed input, jittable (``layers`` static).
    preprocess: ``[B, H, W, C] uint8 -> [B, H, W, C] float32`` network input (jnp).
    geometry: forward-order Window / Parallel list whose names are the tap points, read
      off the module's own layers (kernel sizes, strides, paddings).
    layers: every tap name, in forward order.
    default_layers: the "layer 1 .. layer 5" a figure shows by default.
    input_size: (H, W) images are resized to, or None for any size.
    channels: input channels (1 or 3).
    notes: {layer: what it is}, for the summary.
  """
  name: str
  params: Any
  features: Callable[[Any, jax.Array, tuple[str, ...]], dict[str, jax.Array]]
  preprocess: Callable[[jax.Array], jax.Array]
  geometry: tuple
  layers: tuple[str, ...]
  default_layers: tuple[str, ...]
  input_size: tuple[int, int] | None
  channels: int = 3
  notes: dict[str, str] = dataclasses.field(default_factory=dict)

  def fields(self, input_size) -> dict[str, rf.Field]:
    """Receptive field of every tap for an input of ``input_size`` (H, W)."""
    return rf.receptive_fields(self.geometry, tuple(input_size))

  def check_layers(self, layers) -> tuple[str, ...]:
    """``layers`` as a tuple in forward order; ValueError naming unknown ones and the valid names."""
    layers = tuple(layers)
    unknown = [l for l in layers if l not in self.layers]
    if unknown or not layers:
      raise ValueError(f"layers {unknown or '(none)'} are not taps of {self.name}; valid: "
                       f"{', '.join(self.layers)}")
    if len(set(layers)) != len(layers):
      raise ValueError(f"layers repeat a name: {layers}")
    return tuple(sorted(layers, key=self.layers.index))


def window_of(conv: nnx.Conv, name: str | None = None) -> rf.Window:
  """The geometry of an ``nnx.Conv`` as configured (kernel, strides, padding, dilation)."""
  idil = getattr(conv, "input_dilation", 1) or 1
  if any(v != 1 for v in (idil if isinstance(idil, (tuple, list)) else (idil,))):
    raise ValueError(f"transposed (input-dilated) convolution {name or conv} is not supported")
  padding = conv.padding
  if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
    raise ValueError(f"padding {padding!r} of {name or conv} has no receptive-field rule here")
  return rf.Window(tuple(conv.kernel_size), conv.strides, padding, conv.kernel_dilation or 1, name)


def identity(name: str) -> rf.Window:
  """A named point that changes no geometry (after an element-wise layer)."""
  return rf.Window(1, 1, 0, 1, name)


# --------------------------------------------------------------------------- trainable encoder


def encoder_adapter(model, input_size: tuple[int, int], name: str = "encoder") -> Adapter:
  """Adapter for ``jaxface.models.encoder.Encoder`` (2-D images), evaluated in inference mode.

  Taps: ``stem`` (stem conv + BN + ReLU), then ``s{stage}b{block}`` after each
  residual block (stages and blocks counted from 1). Default layers: the stem
  and the last block of each stage (the first five of those).
  """
  from jaxface.models import encoder as encoder_lib
  if not isinstance(model, encoder_lib.Encoder):
    raise ValueError(f"model must be a jaxface.models.encoder.Encoder, got {type(model).__name__}")
  spec = model.spec
  if spec.spatial_rank != 2:
    raise ValueError(f"only image encoders (spatial_rank 2) can be visualized, got {spec.spatial_rank}")
  block_names, stage_ends = [], []
  for stage, depth in enumerate(spec.depths, start=1):
    block_names += [f"s{stage}b{i}" for i in range(1, depth + 1)]
    stage_ends.append(f"s{stage}b{depth}")
  if len(block_names) != len(model.blocks):
    raise ValueError(f"encoder has {len(model.blocks)} blocks, its spec says {len(block_names)}")
  geometry = [window_of(model.stem, "stem")]
  for bname, block in zip(block_names, model.blocks):
    shortcut = () if block.proj is None else (window_of(block.proj),)
    geometry.append(rf.Parallel(((window_of(block.conv1), window_of(block.conv2)), shortcut), bname))
  layers = ("stem", *block_names)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def features(state, x, wanted):
    m = nnx.merge(graphdef, *state)
    out = {}
    last = max(layers.index(l) for l in wanted)
    # Mirrors Encoder.__call__ in eval mode (its input centring included); the
    # tests check the walk reproduces the encoder's embedding.
    h = nnx.relu(m.stem_bn(m.stem(x.astype(jnp.float32) - 0.5), use_running_average=True))
    if "stem" in wanted:
      out["stem"] = h
    for i, (bname, block) in enumerate(zip(block_names, m.blocks), start=1):
      if i > last:
        break
      h = block(h, False)
      if bname in wanted:
        out[bname] = h
    return out

  notes = {"stem": "stem conv + BN + ReLU"}
  notes.update({b: f"after residual block {b} (stage {b[1:b.index('b')]})" for b in block_names})
  return Adapter(
      name=name, params=(params, rest), features=features,
      preprocess=lambda u8: u8.astype(jnp.float32) / 255.0,
      geometry=tuple(geometry), layers=layers,
      default_layers=tuple(["stem", *stage_ends][:5]),
      input_size=tuple(input_size), channels=spec.in_channels, notes=notes)


def encoder_walk_embedding(adapter: Adapter, x: jax.Array, model) -> jax.Array:
  """Embedding computed from the adapter's last tap (for the walk-equals-module test).

  ``x``: ``[B, H, W, C]`` float32 in [0, 1]; returns ``[B, D]`` float32.
  """
  from jaxface.models import encoder as encoder_lib
  h = adapter.features(adapter.params, x, (adapter.layers[-1],))[adapter.layers[-1]]
  if model.spec.pool == "flatten":
    h = h.reshape(h.shape[0], -1)
  else:
    h = jnp.mean(h, axis=(1, 2))
  e = model.head(h)
  return encoder_lib.l2_normalize(e) if model.spec.l2_normalize else e


# --------------------------------------------------------------------------- VGG19


def vgg19_adapter(model, prep, input_size: tuple[int, int] = (224, 224),
                  name: str = "vgg19") -> Adapter:
  """Adapter for ``jaxface.models.vgg19.VGG19``; taps are its named activations.

  Default layers: ``relu1_1, relu2_1, relu3_1, relu4_1, relu5_1`` (the first
  ReLU of each block, the layers style transfer reads). The 2x2 pooling is a
  function in that module, not a layer object: its window is taken from the
  module's own ``downsampling`` table (factor 2 per pool) and the tests check
  the resulting output sizes against a forward pass.
  """
  from jaxface.models import vgg19 as vgg_lib
  if not isinstance(model, vgg_lib.VGG19):
    raise ValueError(f"model must be a jaxface.models.vgg19.VGG19, got {type(model).__name__}")
  geometry = []
  prev = 1
  for lname in vgg_lib.LAYER_NAMES:
    if lname.startswith("conv"):
      geometry.append(window_of(getattr(model, lname), lname))
    elif lname.startswith("pool"):
      factor = vgg_lib.downsampling(lname) // prev
      prev *= factor
      # Odd sizes are floored: a VALID window of size = stride = factor.
      geometry.append(rf.Window(factor, factor, "valid", 1, lname))
    else:
      geometry.append(identity(lname))
  graphdef, params = nnx.split(model)

  def features(state, x, wanted):
    acts = vgg_lib.features(graphdef, state, x, vgg_lib.deepest(wanted))
    return {l: acts[l] for l in wanted}

  return Adapter(
      name=name, params=params, features=features,
      preprocess=lambda u8: vgg_lib.preprocess(u8.astype(jnp.float32) / 255.0, prep),
      geometry=tuple(geometry), layers=tuple(vgg_lib.LAYER_NAMES),
      default_layers=("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
      input_size=tuple(input_size), channels=3,
      notes={l: "VGG19 " + l for l in vgg_lib.LAYER_NAMES})


# --------------------------------------------------------------------------- dlib face ResNet


def _dlib_window(conv, name: str | None = None) -> rf.Window:
  """Geometry of a ``dlib_resnet.Conv`` (square HWIO kernel, symmetric integer padding)."""
  kh, kw = conv.kernel.shape[:2]
  return rf.Window((int(kh), int(kw)), int(conv.stride), int(conv.padding), 1, name)


def dlib_adapter(net, name: str = "dlib face ResNet") -> Adapter:
  """Adapter for ``jaxface.models.dlib_resnet`` (a ``FaceEncoder`` or a ``DlibResNet``).

  Taps: ``stem`` (7x7/2 conv + affine + ReLU), ``pool`` (the 3x3/2 max pool),
  then ``s{stage}b{block}`` after each residual block. Default "layers 1..5":
  ``stem`` and the ends of the first four stages (``s1b3`` 35x35, ``s2b4``
  17x17, ``s3b3`` 8x8, ``s4b3`` 4x4); the fifth stage's 2x2 map is left out
  because its fields cover the whole chip and more. The 3x3/2 max pool and
  the 2x2/2 average-pool shortcut are functions in that module, not layer
  objects, so their windows are written here; ``collect`` checks every
  predicted map size against a forward pass.
  """
  from jaxface.models import dlib_resnet as dlib_lib
  model = net
  if isinstance(net, dlib_lib.FaceEncoder):
    model = nnx.merge(net.graphdef, net.params, net.rest)
  if not isinstance(model, dlib_lib.DlibResNet):
    raise ValueError(f"net must be a dlib_resnet.FaceEncoder or DlibResNet, got {type(net).__name__}")
  spec = model.spec
  block_names, stage_ends = [], []
  for stage, depth in enumerate(spec.depths, start=1):
    block_names += [f"s{stage}b{i}" for i in range(1, depth + 1)]
    stage_ends.append(f"s{stage}b{depth}")
  if len(block_names) != len(model.blocks):
    raise ValueError(f"dlib net has {len(model.blocks)} blocks, its spec says {len(block_names)}")
  geometry = [_dlib_window(model.stem, "stem"), rf.Window(3, 2, 0, 1, "pool")]
  for bname, block in zip(block_names, model.blocks):
    shortcut = (rf.Window(2, 2, 0, 1),) if block.down else ()
    geometry.append(rf.Parallel(((_dlib_window(block.conv1), _dlib_window(block.conv2)), shortcut),
                                bname))
  layers = ("stem", "pool", *block_names)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mean = spec.mean_rgb

  def features(state, x, wanted):
    m = nnx.merge(graphdef, *state)
    out = {}
    last = max(layers.index(l) for l in wanted)
    # Mirrors DlibResNet.__call__ (the tests check the walk reproduces its descriptors).
    h = m.stem(x)
    if m.stem_affine is not None:
      h = m.stem_affine(h)
    h = jax.nn.relu(h)
    if "stem" in wanted:
      out["stem"] = h
    h = dlib_lib._max_pool_3x3_s2(h)
    if "pool" in wanted:
      out["pool"] = h
    for i, (bname, block) in enumerate(zip(block_names, m.blocks), start=2):
      if i > last:
        break
      h = block(h)
      if bname in wanted:
        out[bname] = h
    return out

  notes = {"stem": "7x7/2 conv + affine + ReLU (72x72 for a 150 chip)", "pool": "3x3/2 max pool"}
  widths = {f"s{s}": w for s, w in enumerate(spec.widths, start=1)}
  notes.update({b: f"after residual block {b} (stage {b[1:b.index('b')]}, "
                   f"{widths['s' + b[1:b.index('b')]]} channels)" for b in block_names})
  return Adapter(
      name=name, params=(params, rest), features=features,
      preprocess=lambda u8: dlib_lib.preprocess(u8, mean),
      geometry=tuple(geometry), layers=layers,
      default_layers=tuple(["stem", *stage_ends][:5]),
      input_size=(spec.input_size, spec.input_size), channels=3, notes=notes)


def dlib_walk_descriptor(adapter: Adapter, x: jax.Array, model) -> jax.Array:
  """Descriptor computed from the adapter's last tap (walk-equals-module test): ``[B, 128]``."""
  h = adapter.features(adapter.params, x, (adapter.layers[-1],))[adapter.layers[-1]]
  return jnp.dot(jnp.mean(h, axis=(1, 2)), model.fc[...], precision=jax.lax.Precision.HIGHEST)
