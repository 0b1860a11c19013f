"""VGG19 feature extractor (Flax NNX, NHWC) for neural style transfer.

The 16 convolutions are named as in the papers (``conv1_1`` .. ``conv5_4``);
``VGG19.__call__`` and :func:`features` return the named activations
``conv*_*``, ``relu*_*`` and ``pool*`` up to a requested layer, so the style
code asks for "relu4_2" and never counts layers. There are no fully connected
layers: style transfer uses only the convolutional trunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxface.formats import vgg_weights
from jaxface.formats.vgg_weights import (
  CAFFE,  # noqa: F401  (re-exported)
  TORCH,  # noqa: F401  (re-exported)
  Preprocessing,
)
from jaxface.models import winograd

BLOCK_DEPTHS = (2, 2, 4, 4, 4)
BLOCK_WIDTHS = (64, 128, 256, 512, 512)
POOLINGS = ("max", "avg")

# The 16 convolutions, as this network names them: conv{block}_{index}.
CONV_NAMES = tuple(f"conv{b}_{i}" for b, n in enumerate(BLOCK_DEPTHS, start=1)
                   for i in range(1, n + 1))
# What the weight-file readers fill (jaxface.formats.vgg_weights maps each file's layers to it).
CONVS = vgg_weights.ConvStack(CONV_NAMES, BLOCK_DEPTHS, BLOCK_WIDTHS)
# (Cin, Cout) of each convolution.
CONV_CHANNELS = CONVS.channels()


def _layer_names() -> tuple[str, ...]:
  names = []
  for b, n in enumerate(BLOCK_DEPTHS, start=1):
    for i in range(1, n + 1):
      names += [f"conv{b}_{i}", f"relu{b}_{i}"]
    names.append(f"pool{b}")
  return tuple(names)


# Every layer __call__ can return, in network order.
LAYER_NAMES = _layer_names()


def layer_index(name: str) -> int:
  """Position of ``name`` in LAYER_NAMES; ValueError naming the valid names otherwise."""
  try:
    return LAYER_NAMES.index(name)
  except ValueError:
    raise ValueError(f"unknown VGG19 layer {name!r}; valid layers: {', '.join(LAYER_NAMES)}") from None


def downsampling(name: str) -> int:
  """Spatial reduction factor of layer ``name`` (1 for block 1, 2**k after k pools)."""
  idx = layer_index(name)
  return 2 ** sum(1 for n in LAYER_NAMES[: idx + 1] if n.startswith("pool"))


def deepest(names) -> str:
  """The layer of ``names`` that comes last in the network."""
  return max(names, key=layer_index)


class VGG19(nnx.Module):
  """VGG19 convolutional trunk: ``[B, H, W, 3] float32 -> {layer: [B, h, w, C] float32}``.

  Args:
    pooling: "max" (the trained network) or "avg" (Gatys et al.: smoother
      gradients, often nicer textures).
    rngs: initialises the random weights (He-normal kernels so that activations
      keep their scale through 16 ReLU layers, zero biases). Random weights
      expect TORCH preprocessing.
  """

  def __init__(self, *, pooling: str = "max", rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f"pooling={pooling!r}: must be one of {', '.join(POOLINGS)}")
    self.pooling = pooling
    cin = 3
    init = _he_normal
    for b, (depth, width) in enumerate(zip(BLOCK_DEPTHS, BLOCK_WIDTHS), start=1):
      for i in range(1, depth + 1):
        setattr(self, f"conv{b}_{i}", nnx.Conv(cin, width, (3, 3), padding="SAME",
                                               kernel_init=init, rngs=rngs))
        cin = width

  def __call__(self, x: jax.Array, last_layer: str = "relu5_4",
               grad_kernels: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """Named activations from ``conv1_1`` up to and including ``last_layer``.

    Args:
      x: ``[B, H, W, 3] float32``, already preprocessed (``preprocess``).
      last_layer: a name of LAYER_NAMES; later layers are not computed.
      grad_kernels: optional ``input_grad_kernels(params, conv_impl)`` of
        this model's weights, for optimising the image against fixed
        weights. Same values up to float32 rounding; the convolutions then
        run as that function chose per layer: XLA's convolution with an
        input gradient by a precomputed flipped kernel (instead of flipping
        and transposing every kernel in every backward pass), or Winograd
        F(4x4, 3x3) forward and backward (``jaxface.models.winograd``).

    Returns:
      dict layer name -> ``[B, H / 2**k, W / 2**k, C] float32`` (k pools so
      far; odd sizes are floored, as in Caffe and PyTorch).
    """
    stop = layer_index(last_layer)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"x: expected [B, H, W, 3], got shape {x.shape}")
    if grad_kernels is not None:
      for name in (n for n in LAYER_NAMES[: stop + 1] if n.startswith("conv")):
        _check_kernels(name, getattr(self, name).kernel.shape, grad_kernels.get(name))
    out = {}
    for name in LAYER_NAMES[: stop + 1]:
      if name.startswith("conv"):
        conv = getattr(self, name)
        if grad_kernels is None:
          x = conv(x)
        elif WINOGRAD in grad_kernels[name]:
          ks = grad_kernels[name]
          x = winograd.conv3x3_vjp(x, ks[WINOGRAD], ks[WINOGRAD_T]) + conv.bias[...]
        else:
          x = _conv3x3(x, conv.kernel[...], grad_kernels[name][KERNEL_T]) + conv.bias[...]
      elif name.startswith("relu"):
        x = jax.nn.relu(x)
      else:
        x = _pool2x2(x, self.pooling)
      out[name] = x
    return out


def _he_normal(key, shape, dtype=jnp.float32):
  """He-normal kernel ``[3, 3, Cin, Cout]`` (std sqrt(2 / fan_in)).

  Drawn with NumPy from the key's bits when called eagerly: 20M eager JAX
  normals take tens of seconds on a small CPU, NumPy well under one.
  """
  std = np.sqrt(2.0 / np.prod(shape[:-1]))
  if isinstance(key, jax.core.Tracer):  # under jit / eval_shape
    return std * jax.random.normal(key, shape, dtype)
  bits = np.asarray(jax.random.key_data(key)).ravel()
  rng = np.random.default_rng([int(b) for b in bits])
  return jnp.asarray(rng.standard_normal(shape, np.float32) * np.float32(std), dtype)


def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  # Exactly nnx.Conv's call for these layers (stride 1, SAME, NHWC / HWIO).
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def _conv3x3(x: jax.Array, kernel: jax.Array, kernel_t: jax.Array) -> jax.Array:
  """``[B, H, W, Cin] * [3, 3, Cin, Cout] -> [B, H, W, Cout]`` (SAME, stride 1, no bias).

  ``kernel_t [3, 3, Cout, Cin]`` must be ``input_grad_kernel(kernel)``; it is
  used only by the VJP: the input gradient of a stride-1 SAME 3x3
  convolution is the SAME convolution of the output gradient with the
  spatially flipped, in/out-swapped kernel (exact). XLA's own VJP builds that
  kernel (a reverse + transpose copy of every kernel) on each backward pass.
  """
  return _conv_same(x, kernel)


def _conv3x3_fwd(x, kernel, kernel_t):
  return _conv_same(x, kernel), (x, kernel, kernel_t)


def _conv3x3_bwd(res, dy):
  x, kernel, kernel_t = res
  dx = _conv_same(dy, kernel_t)
  # The kernel's gradient, for completeness: dead code (removed by XLA) when
  # only the image is differentiated, as in style transfer. ``kernel_t`` does
  # not enter the value, so its cotangent is zero.
  dk = jax.vjp(lambda k: _conv_same(x, k), kernel)[1](dy)[0]
  return dx, dk, jnp.zeros_like(kernel_t)


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def input_grad_kernel(kernel: jax.Array) -> jax.Array:
  """``[3, 3, Cin, Cout] -> [3, 3, Cout, Cin]``: spatially flipped, in/out swapped."""
  return jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))


# Keys of one layer's entry in input_grad_kernels' result.
KERNEL_T = "kernel_t"        # [3, 3, Cout, Cin]: XLA convolution, precomputed input-gradient kernel
WINOGRAD = "winograd"        # [6, 6, Cin, Cout]: Winograd F(4x4, 3x3) transform of the kernel
WINOGRAD_T = "winograd_t"    # [6, 6, Cout, Cin]: the same of input_grad_kernel(kernel)

CONV_IMPLS = ("auto", "xla", "winograd")

# conv_impl="auto": Winograd everywhere except block 1. Measured per layer
# (forward + input gradient, 256 and 512 px; BUILD.md, "Neural style transfer"):
# block 1's convolutions (3 or 64 channels at full resolution) run slower as
# Winograd (its tile transforms are memory-bound and touch 2.25x the input
# there, against little arithmetic saved), every later layer faster.
_AUTO_XLA_LAYERS = frozenset({"conv1_1", "conv1_2"})


def conv_impls(conv_impl: str = "auto") -> dict[str, str]:
  """``{conv name: "xla" | "winograd"}``: what ``input_grad_kernels(.., conv_impl)`` uses per layer."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl={conv_impl!r}: must be one of {', '.join(CONV_IMPLS)}")
  if conv_impl != "auto":
    return {name: conv_impl for name in CONV_NAMES}
  return {name: "xla" if name in _AUTO_XLA_LAYERS else "winograd" for name in CONV_NAMES}


def input_grad_kernels(params: nnx.State, conv_impl: str = "auto", last_layer: str | None = None
                       ) -> dict[str, dict[str, jax.Array]]:
  """Precomputed kernels for optimising an image through fixed weights, for every conv of
  ``nnx.split(model)[1]``; pass the result to ``features`` (``grad_kernels``).

  Args:
    params: the model's parameters.
    conv_impl: "xla" (``{KERNEL_T: input_grad_kernel(kernel)}`` per layer:
      XLA's convolution, input gradient by that kernel), "winograd"
      (``{WINOGRAD: [6, 6, Cin, Cout], WINOGRAD_T: [6, 6, Cout, Cin]}``
      float32 per layer, Winograd F(4x4, 3x3) forward and backward; each
      layer's output is off by up to ~1e-5 of its scale, against ~5e-7 for
      XLA's convolution), or "auto" (per layer, ``conv_impls``: the faster
      of the two as measured).
    last_layer: only the convolutions up to this layer (what ``features``
      with that ``last_layer`` uses): style transfer to relu5_1 needs
      neither conv5_2 nor the later ones (about 230 MB of Winograd kernels
      saved). Default: every convolution.

  Returns:
    ``{conv name: {key: float32 array}}``. Compute once per set of weights:
    it holds 32 MB per million weights of Winograd layers (two 6x6
    transforms of each 3x3 kernel), 4 MB for the others; about 640 MB for
    VGG19 with "auto".
  """
  impls = conv_impls(conv_impl)
  if last_layer is not None:
    stop = layer_index(last_layer)
    impls = {name: impl for name, impl in impls.items() if layer_index(name) <= stop}
  return _input_grad_kernels(params, tuple(sorted(impls.items())))


@functools.partial(jax.jit, static_argnums=1)
def _input_grad_kernels(params, impls):
  out = {}
  for name, impl in impls:
    k = params[name]["kernel"][...]
    k_t = input_grad_kernel(k)
    if impl == "xla":
      out[name] = {KERNEL_T: k_t}
    else:
      out[name] = {WINOGRAD: winograd.transform_kernel(k), WINOGRAD_T: winograd.transform_kernel(k_t)}
  return out


def _check_kernels(name: str, kernel_shape, entry) -> None:
  """ValueError naming ``grad_kernels[name]`` unless it fits a ``[3, 3, Cin, Cout]`` kernel."""
  _, _, cin, cout = kernel_shape
  if isinstance(entry, dict) and WINOGRAD in entry:
    want = {WINOGRAD: (6, 6, cin, cout), WINOGRAD_T: (6, 6, cout, cin)}
  else:
    want = {KERNEL_T: (3, 3, cout, cin)}
  if isinstance(entry, dict):
    got = {key: getattr(entry.get(key), "shape", None) for key in want}
  else:
    got = f"{type(entry).__name__} {getattr(entry, 'shape', '')}".strip()
  if got != want:
    raise ValueError(f"grad_kernels[{name!r}]: expected {want} (input_grad_kernels), got {got}")


def _pool2x2(x: jax.Array, kind: str) -> jax.Array:
  # Reshape-and-reduce instead of reduce_window: same result for 2x2/stride 2,
  # and its gradient avoids select-and-scatter, which is slow on CPU.
  b, h, w, c = x.shape
  if h < 2 or w < 2:
    raise ValueError(f"cannot pool a {h}x{w} feature map; the input image is too small")
  x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
  return x.max(axis=(2, 4)) if kind == "max" else x.mean(axis=(2, 4))


def build_vgg19(*, pooling: str = "max", seed: int = 0, weights=None) -> VGG19:
  """A VGG19 with random weights from ``seed``, or with ``weights`` (a VGGWeights) set."""
  model = VGG19(pooling=pooling, rngs=nnx.Rngs(seed))
  if weights is not None:
    set_weights(model, weights)
  return model


def set_weights(model: VGG19, weights) -> None:
  """Copies ``weights.params`` (name -> (kernel [3,3,Cin,Cout] HWIO, bias [Cout])) into ``model``.

  ``weights`` is a ``VGGWeights`` from ``jaxface.weights.load_vgg19``; each file
  format needs its own input preprocessing (``preprocess``), carried with it.

  Raises:
    ValueError: naming a missing layer or a kernel/bias of the wrong shape,
      before anything is changed.
  """
  params = weights.params
  missing = [n for n in CONV_NAMES if n not in params]
  if missing:
    raise ValueError(f"weights ({getattr(weights, 'source', '?')}) lack layers {missing}")
  for name in CONV_NAMES:
    conv = getattr(model, name)
    kernel, bias = params[name]
    if tuple(np.shape(kernel)) != conv.kernel.shape or tuple(np.shape(bias)) != conv.bias.shape:
      raise ValueError(
          f"weights {name}: kernel {np.shape(kernel)} / bias {np.shape(bias)}, expected "
          f"{conv.kernel.shape} / {conv.bias.shape} (HWIO)")
  for name in CONV_NAMES:
    conv = getattr(model, name)
    kernel, bias = params[name]
    conv.kernel[...] = jnp.asarray(kernel, jnp.float32)
    conv.bias[...] = jnp.asarray(bias, jnp.float32)


def features(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, last_layer: str,
             grad_kernels: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """Pure form of ``VGG19.__call__`` on ``nnx.split(model)``, as the style transfer code runs it::

    graphdef, params = nnx.split(model)
    feats = features(graphdef, params, x, "relu5_1")   # pure, jittable

  For optimising an image through fixed weights, pass
  ``grad_kernels=input_grad_kernels(params, conv_impl)`` (by default Winograd
  F(4x4, 3x3) from block 2 on; ``conv_impl="xla"`` switches that off).
  """
  return nnx.merge(graphdef, params)(x, last_layer, grad_kernels)


def preprocess(images: jax.Array, prep: Preprocessing) -> jax.Array:
  """``[B, H, W, 3] float32`` RGB in [0, 1] -> the network's input ``[B, H, W, 3] float32``."""
  x = images * prep.scale
  if prep.channel_order == "BGR":
    x = x[..., ::-1]
  return (x - jnp.asarray(prep.mean, x.dtype)) / jnp.asarray(prep.std, x.dtype)


def deprocess(x: jax.Array, prep: Preprocessing) -> jax.Array:
  """Inverse of ``preprocess``: network input -> RGB ``[B, H, W, 3] float32`` (not clipped)."""
  x = x * jnp.asarray(prep.std, x.dtype) + jnp.asarray(prep.mean, x.dtype)
  if prep.channel_order == "BGR":
    x = x[..., ::-1]
  return x / prep.scale
