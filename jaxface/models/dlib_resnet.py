"""dlib's 128-D face embedding ResNet (``dlib_face_recognition_resnet_model_v1``) in Flax NNX.

:class:`DlibResNet` is the network (its docstring gives the architecture),
:func:`apply` runs a split model functionally like :mod:`jaxface.models.encoder`,
and :class:`FaceEncoder` (``jaxface.pretrained.face_encoder()``) is batched,
jitted inference from uint8 chips. Every conv and dot runs at HIGHEST precision
by default, which parity with dlib needs on GPU/TPU (``DlibResNetSpec.precision``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxface import jit_cache, xla_options

# dlib stores the means as float32; these are those float32 values, written exactly.
DLIB_MEAN_RGB = (122.78199768066406, 117.0009994506836, 104.2979965209961)

# Parity with dlib (max abs difference <= 1e-5 on descriptors) needs true float32
# arithmetic in every conv and matmul. On CPU XLA computes float32 convolutions in
# float32 whatever the precision setting; on GPU (Ampere and later) JAX's DEFAULT
# precision runs them in TF32, and on TPU in bfloat16 passes (spec: TF32 2.6e-4,
# bf16 2.2e-3 max abs error), which fails parity (measured errors and speeds:
# BUILD.md, "dlib face pipeline"). HIGHEST forces full float32 on GPU (no TF32)
# and 6-pass bf16 emulation on TPU. "default" passes no precision, so the global
# setting decides: jax.default_matmul_precision("highest") (context manager) or
# JAX_DEFAULT_MATMUL_PRECISION=highest restores parity there.
_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH,
               "default": None}


@dataclasses.dataclass(frozen=True)
class DlibResNetSpec:
  """Architecture of dlib's embedding ResNet; JSON-friendly, saved with checkpoints.

  Attributes:
    input_size: chip side in pixels the weights were trained for (150).
    mean_rgb: per-channel means subtracted before dividing by 256.
    stem_width: channels of the 7x7 stride-2 stem convolution.
    stem_kernel: stem kernel size.
    widths: channels per stage.
    depths: residual blocks per stage; every stage after the first starts
      with a down block (stride 2, pooled zero-filled shortcut).
    embedding_dim: output size of the final (bias-free) fully connected layer.
    l2_normalize: project embeddings onto the unit sphere (dlib does not; off
      for parity, optional for triplet fine-tuning).
    precision: "highest" (float32 everywhere, needed for parity on GPU/TPU),
      "high" or "default" (TF32/bf16 on accelerators: faster, ~3e-4 (TF32) to
      ~2e-3 (bf16) descriptor error, acceptable for fine-tuning on an
      accelerator but not for parity tests).
  """
  input_size: int = 150
  mean_rgb: tuple[float, float, float] = DLIB_MEAN_RGB
  stem_width: int = 32
  stem_kernel: int = 7
  widths: tuple[int, ...] = (32, 64, 128, 256, 256)
  depths: tuple[int, ...] = (3, 4, 3, 3, 1)
  embedding_dim: int = 128
  l2_normalize: bool = False
  precision: str = "highest"

  def __post_init__(self):
    if len(self.widths) != len(self.depths) or not self.widths:
      raise ValueError(f"widths {self.widths} and depths {self.depths} must be non-empty and "
                       f"of equal length")
    if min(self.widths) < 1 or min(self.depths) < 1:
      raise ValueError(f"widths and depths must be >= 1, got {self.widths}, {self.depths}")
    for name in ("input_size", "stem_width", "stem_kernel", "embedding_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if len(self.mean_rgb) != 3:
      raise ValueError(f"mean_rgb must have 3 values, got {self.mean_rgb}")
    if self.precision not in _PRECISIONS:
      raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {self.precision!r}")

  def to_dict(self) -> dict[str, Any]:
    return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DlibResNetSpec:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown DlibResNetSpec fields {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

  def feature_size(self, size: int) -> int:
    """Side of the last feature map for an input of side ``size`` (0: too small)."""
    s = (size - self.stem_kernel) // 2 + 1 if size >= self.stem_kernel else 0
    s = (s - 3) // 2 + 1 if s >= 3 else 0  # max pool 3x3 s2
    for _ in self.widths[1:]:
      # down block: conv 3x3 s2 p0 and pool 2x2 s2; zero-filled sum takes the larger.
      conv = (s - 3) // 2 + 1 if s >= 3 else 0
      pool = s // 2
      s = max(conv, pool) if conv >= 1 else 0
    return s


# --------------------------------------------------------------------------- preprocessing


def preprocess(chips: jax.Array | np.ndarray,
               mean_rgb: tuple[float, float, float] = DLIB_MEAN_RGB) -> jax.Array:
  """dlib's input scaling: ``[N, H, W, 3] uint8`` RGB -> ``[N, H, W, 3] float32`` (p - mean) / 256.

  The division is by 256, not 255 (dlib's convention; /255 costs 3.5e-4 on
  the descriptors). Exact in float32.
  """
  if chips.dtype != np.uint8:
    raise ValueError(f"chips must be uint8 RGB, got dtype {chips.dtype}")
  if chips.ndim != 4 or chips.shape[-1] != 3:
    raise ValueError(f"chips must be [N, H, W, 3], got shape {tuple(chips.shape)}")
  mean = jnp.asarray(mean_rgb, jnp.float32)
  return (jnp.asarray(chips).astype(jnp.float32) - mean) * jnp.float32(1 / 256)


def preprocess_unit(images: jax.Array, mean_rgb: tuple[float, float, float] = DLIB_MEAN_RGB) -> jax.Array:
  """``[N, H, W, 3]`` float RGB in [0, 1] (the training pipeline's images) -> network input."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [N, H, W, 3], got shape {tuple(images.shape)}")
  mean = jnp.asarray(mean_rgb, jnp.float32)
  return (images.astype(jnp.float32) * 255.0 - mean) * jnp.float32(1 / 256)


# --------------------------------------------------------------------------- modules


class Conv(nnx.Module):
  """dlib's ``con`` layer: square kernel, symmetric zero padding, bias. NHWC, kernel HWIO."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, padding: int,
               precision: str, *, rngs: nnx.Rngs):
    init = nnx.initializers.he_normal()
    self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, in_ch, out_ch), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
    self.stride = stride
    self.padding = padding
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[N, H, W, in_ch] -> [N, OH, OW, out_ch]`` float32, OH = (H + 2 padding - kernel) // stride + 1."""
    kernel = self.kernel[...]
    k, s, p = kernel.shape[0], self.stride, self.padding
    (r0, r1, pads_h), (c0, c1, pads_w) = (_live_taps(x.shape[1], k, s, p),
                                          _live_taps(x.shape[2], k, s, p))
    if (r0, r1, c0, c1) != (0, k, 0, k):
      # Taps that only ever read zero padding are dropped (same sum, fewer terms):
      # the last 3x3 pad-1 conv sees a 1x1 map, so only its centre tap is live, and
      # as a full 3x3 conv XLA rewrote it into a kernel-reversing form that copied
      # the whole 2.4 MB kernel on every call.
      kernel = kernel[r0:r1, c0:c1]
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(s, s), padding=(pads_h, pads_w),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_PRECISIONS[self.precision])
    return y + self.bias[...]


def _live_taps(size: int, k: int, s: int, p: int) -> tuple[int, int, tuple[int, int]]:
  """Kernel taps ``[lo, hi)`` of one axis that can touch a real input pixel, and the
  padding that keeps the output size when only those taps are used.

  Output ``i`` reads input ``i * s + r - p`` with tap ``r``; over all ``OUT`` outputs
  that is inside ``[0, size)`` only for ``p - (OUT - 1) s <= r < size + p``.
  """
  out = (size + 2 * p - k) // s + 1
  if out < 1:
    return 0, k, (p, p)  # no output at all: leave it to the conv to produce the empty map
  lo, hi = max(0, p - (out - 1) * s), min(k, size + p)
  if hi <= lo:
    return 0, k, (p, p)  # every tap reads padding (output = bias): keep the plain conv
  # Same numerator size + pad_lo + pad_hi - (hi - lo) as size + 2p - k, so the same OUT.
  return lo, hi, (p - lo, p - (k - hi))


class Affine(nnx.Module):
  """dlib's ``affine`` layer (folded batch norm): ``x * scale + bias`` per channel."""

  def __init__(self, channels: int):
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.scale[...] + self.bias[...]


def _zero_fill_add(a: jax.Array, b: jax.Array) -> jax.Array:
  """dlib's add_prev: sum over the larger shape, each operand zero-filled at the end of each axis."""
  shape = tuple(max(u, v) for u, v in zip(a.shape, b.shape))
  def pad(t):
    return jnp.pad(t, [(0, n - m) for n, m in zip(shape, t.shape)]) if t.shape != shape else t
  return pad(a) + pad(b)


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 average pool, no padding: ``[N, H, W, C] -> [N, H//2, W//2, C]`` float32.

  Four strided slices summed elementwise: XLA fuses them into the consumer
  (shortcut add); a reshape + reduce was slower on CPU (BUILD.md, "dlib face
  pipeline").
  """
  oh, ow = x.shape[1] // 2, x.shape[2] // 2
  def tap(r, c):
    return x[:, r:r + 2 * oh:2, c:c + 2 * ow:2]
  return ((tap(0, 0) + tap(0, 1)) + (tap(1, 0) + tap(1, 1))) * jnp.float32(0.25)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 stride-2 max pool, no padding: ``[N, H, W, C] -> [N, (H-3)//2+1, (W-3)//2+1, C]``.

  Separable (rows, then columns) strided-slice maxima: exactly
  ``reduce_window(max)``, but XLA:CPU ran reduce_window as a slow generic loop
  and this form as a fused elementwise pass (timings: BUILD.md, "dlib face
  pipeline").
  """
  def pool(t, axis):
    out = (t.shape[axis] - 3) // 2 + 1
    if out < 1:  # window larger than the map: empty, as reduce_window gives
      return jax.lax.slice_in_dim(t, 0, 0, 1, axis)
    def tap(r):
      return jax.lax.slice_in_dim(t, r, r + 2 * (out - 1) + 1, 2, axis)
    return jnp.maximum(jnp.maximum(tap(0), tap(1)), tap(2))
  return pool(pool(x, 1), 2)


class Block(nnx.Module):
  """Residual block; ``down`` = stride-2 first conv and pooled, zero-filled shortcut."""

  def __init__(self, in_ch: int, out_ch: int, down: bool, precision: str, *, rngs: nnx.Rngs):
    self.down = down
    self.conv1 = Conv(in_ch, out_ch, 3, 2 if down else 1, 0 if down else 1, precision, rngs=rngs)
    self.affine1: Affine | None = Affine(out_ch)
    self.conv2 = Conv(out_ch, out_ch, 3, 1, 1, precision, rngs=rngs)
    self.affine2: Affine | None = Affine(out_ch)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv1(x)
    if self.affine1 is not None:  # None once folded into the conv (inference copy)
      y = self.affine1(y)
    y = self.conv2(jax.nn.relu(y))
    if self.affine2 is not None:
      y = self.affine2(y)
    shortcut = _avg_pool_2x2(x) if self.down else x
    return jax.nn.relu(_zero_fill_add(y, shortcut) if self.down else y + shortcut)


class DlibResNet(nnx.Module):
  """dlib's face embedding ResNet: ``[N, H, W, 3]`` -> ``[N, 128] float32``.

  Input: float32 from :func:`preprocess` (or uint8 chips, preprocessed here).
  150x150 chips reproduce dlib; other sizes run (global average pool) as long
  as :meth:`DlibResNetSpec.feature_size` is >= 1.

  Architecture (NHWC here; dlib is NCHW, shapes below are H x W x C)::

    chip 150x150x3 uint8 -> (pixel - mean_rgb) / 256          (preprocess)
    conv 7x7 s2 p0 -> 72x72x32, affine, relu, max pool 3x3 s2 p0 -> 35x35x32
    stage 32:  3 identity blocks                               35x35
    stage 64:  down block + 3 identity blocks                  17x17
    stage 128: down block + 2 identity blocks                  8x8
    stage 256: down block + 2 identity blocks                  4x4
    stage 256: down block                                      2x2
    global average -> 256 -> fc (no bias) -> 128               (not L2-normalized)

  A block is conv3x3 -> affine -> relu -> conv3x3 -> affine, plus a shortcut,
  then relu. Identity blocks: shortcut = input, convs stride 1 padding 1. Down
  blocks: first conv stride 2 padding 0; shortcut = 2x2 stride-2 average pool of
  the block input, and the sum zero-fills to the larger shape (more channels,
  and at stage 256 a 3x3 conv output added into the top-left of the 4x4 pooled
  shortcut) - no projection conv. "affine" is dlib's batch norm folded into a
  per-channel scale and shift; here it is a trainable ``scale``/``bias`` pair so
  the network can be fine-tuned (there are no batch statistics, so ``train``
  changes nothing in the forward pass).
  """

  def __init__(self, spec: DlibResNetSpec = DlibResNetSpec(), *, rngs: nnx.Rngs):
    self.spec = spec
    p = spec.precision
    self.stem = Conv(3, spec.stem_width, spec.stem_kernel, 2, 0, p, rngs=rngs)
    self.stem_affine: Affine | None = Affine(spec.stem_width)
    blocks = []
    in_ch = spec.stem_width
    for stage, (width, depth) in enumerate(zip(spec.widths, spec.depths)):
      for i in range(depth):
        blocks.append(Block(in_ch, width, stage > 0 and i == 0, p, rngs=rngs))
        in_ch = width
    self.blocks = nnx.List(blocks)
    self.fc = nnx.Param(nnx.initializers.lecun_normal()(
        rngs.params(), (in_ch, spec.embedding_dim), jnp.float32))

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Embeds a batch.

    Args:
      x: ``[N, H, W, 3]`` float32 (from :func:`preprocess`) or uint8 RGB.
      train: accepted for the encoder API; the network has no batch
        statistics or dropout, so it changes nothing.

    Returns:
      ``[N, embedding_dim]`` float32 descriptors (unit-norm only when
      ``spec.l2_normalize``).
    """
    del train
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"input must be [N, H, W, 3], got shape {tuple(x.shape)}")
    if min(self.spec.feature_size(x.shape[1]), self.spec.feature_size(x.shape[2])) < 1:
      raise ValueError(f"input of {x.shape[1]}x{x.shape[2]} pixels is too small for this network")
    if x.dtype == jnp.uint8:
      x = preprocess(x, self.spec.mean_rgb)
    elif x.dtype != jnp.float32:
      raise ValueError(f"input must be float32 (preprocessed) or uint8, got {x.dtype}")
    x = self.stem(x)
    if self.stem_affine is not None:
      x = self.stem_affine(x)
    x = _max_pool_3x3_s2(jax.nn.relu(x))
    for block in self.blocks:
      x = block(x)
    x = jnp.mean(x, axis=(1, 2))
    x = jnp.dot(x, self.fc[...], precision=_PRECISIONS[self.spec.precision])
    if self.spec.l2_normalize:
      x = x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
    return x


def build_dlib_resnet(spec: DlibResNetSpec = DlibResNetSpec(), seed: int = 0) -> DlibResNet:
  """A randomly initialised :class:`DlibResNet` (for training from scratch or as a restore target)."""
  return DlibResNet(spec, rngs=nnx.Rngs(seed))


def apply(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, x: jax.Array,
          train: bool = False) -> tuple[jax.Array, nnx.State]:
  """Pure application of a split :class:`DlibResNet`; same signature as ``encoder.apply``::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    emb, rest = apply(graphdef, params, rest, preprocess(chips), train=False)

  Args:
    graphdef, params, rest: from ``nnx.split(model, nnx.Param, ...)``.
    x: ``[N, H, W, 3]`` float32 from :func:`preprocess` (or uint8 chips).
    train: accepted for API compatibility; no effect.

  Returns:
    (``[N, 128]`` float32 descriptors, ``rest`` unchanged: no batch statistics).
  """
  model = nnx.merge(graphdef, params, rest, copy=True)
  emb = model(x, train=train)
  _, _, new_rest = nnx.split(model, nnx.Param, ...)
  return emb, new_rest


def fold_affine(model: DlibResNet) -> DlibResNet:
  """Copy of ``model`` with every affine layer folded into the conv before it (inference).

  conv(x, W) * s + t == conv(x, W * s) + (b * s + t) up to float32 rounding;
  the folded copy saves one elementwise pass per conv.
  """
  model = nnx.clone(model)

  def fold(conv: Conv, affine: Affine) -> None:
    s, t = np.asarray(affine.scale[...]), np.asarray(affine.bias[...])
    # device_put, not jnp.asarray: the latter compiles a small copy kernel per new shape.
    conv.kernel[...] = jax.device_put(np.asarray(np.asarray(conv.kernel[...]) * s, np.float32))
    conv.bias[...] = jax.device_put(np.asarray(np.asarray(conv.bias[...]) * s + t, np.float32))

  if model.stem_affine is not None:
    fold(model.stem, model.stem_affine)
    model.stem_affine = None
  for block in model.blocks:
    if block.affine1 is not None:
      fold(block.conv1, block.affine1)
      block.affine1 = None
    if block.affine2 is not None:
      fold(block.conv2, block.affine2)
      block.affine2 = None
  return model


def _to_state_dict(tree: Any) -> Any:
  """Lists -> int-keyed dicts (how NNX pure dicts spell ``nnx.List``)."""
  if isinstance(tree, dict):
    return {k: _to_state_dict(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return {i: _to_state_dict(v) for i, v in enumerate(tree)}
  return tree


def from_converted(tree: dict[str, Any], spec_overrides: dict[str, Any] | None = None) -> DlibResNet:
  """Builds a :class:`DlibResNet` from converted weights (no random init work).

  Args:
    tree: ``{"spec": ..., "params": ...}`` from
      :func:`jaxface.formats.dlib_resnet.convert` (or the weight cache); ``spec``
      holds the architecture read from the file, the other spec fields keep
      their defaults.
    spec_overrides: fields to change that do not affect parameter shapes,
      e.g. ``{"l2_normalize": True, "precision": "default"}``.
  """
  spec = DlibResNetSpec.from_dict({**tree["spec"], **(spec_overrides or {})})
  abstract = nnx.eval_shape(lambda: DlibResNet(spec, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pure = _to_state_dict(tree["params"])
  expected = {jax.tree_util.keystr(k): v.shape for k, v in
              jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))}
  given = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(pure)}
  if expected != given:
    diff = sorted(set(expected.items()) ^ set(given.items()))[:5]
    raise ValueError(f"converted weights do not fit DlibResNet{spec}: differences {diff}")
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jax.device_put(np.asarray(a, np.float32)), pure))
  return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------- inference wrapper


_YNN_OPTION = xla_options.YNN_OPTION
_xla_options = xla_options.cpu_compiler_options  # see jaxface/xla_options.py


def _build_infer(key: tuple[nnx.GraphDef, Any]):
  """``(weight leaves, chips uint8 [B, S, S, 3]) -> [B, 128] float32`` for one architecture.

  Why not ``jax.jit`` with the graphdef static and the ``nnx.State`` as argument:
  hashing the graphdef and flattening the State on every call was a measurable
  part of a batch-1 call (BUILD.md, "dlib face pipeline"); here both happen once
  per :class:`FaceEncoder`, and a call passes a flat list of arrays.
  """
  graphdef, treedef = key

  def infer(leaves, chips):
    net = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return net(preprocess(chips, net.spec.mean_rgb))

  return infer


# One program per (graphdef, treedef), shared by every FaceEncoder of the same architecture;
# ``_infer.get(key)`` is jitted with the CPU compiler options.
_infer = jit_cache.JitCache(_build_infer)


class FaceEncoder:
  """Batched, jitted dlib descriptors: ``enc(chips [N, 150, 150, 3] uint8) -> [N, 128] float32``.

  Batches are padded up to a power-of-two bucket (at most ``max_batch``;
  larger inputs run in chunks of ``max_batch``) so any N reuses one of a few
  compiled programs. ``max_batch`` defaults to 32 on CPU and 256 on
  accelerators, the faster chunk sizes measured (BUILD.md, "dlib face
  pipeline"). On CPU the
  programs are compiled with :func:`_xla_options` (YNN fusion off), so no
  ``XLA_FLAGS`` are needed for the fast path.

  For fine-tuning, ``graphdef, params, rest`` are the unfolded split of the
  model (``apply(graphdef, params, rest, preprocess(chips))``) and ``spec``
  the :class:`DlibResNetSpec` that rebuilds it.
  """

  def __init__(self, model: DlibResNet, *, fold: bool = True, max_batch: int | None = None):
    if max_batch is None:
      max_batch = 32 if jax.default_backend() == "cpu" else 256
    if max_batch < 1 or max_batch & (max_batch - 1):
      raise ValueError(f"max_batch must be a power of two >= 1, got {max_batch}")
    self.spec: DlibResNetSpec = model.spec
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.max_batch = max_batch
    infer_model = fold_affine(model) if fold else model
    self._infer_graphdef, self._infer_state = nnx.split(infer_model)
    # Flattened once: a call passes this list straight to the jitted program.
    self._infer_leaves, treedef = jax.tree.flatten(self._infer_state)
    self._infer_fn = _infer.get((self._infer_graphdef, treedef))

  @classmethod
  def from_converted(cls, tree: dict[str, Any], *, fold_affine: bool = True,
                     max_batch: int | None = None) -> FaceEncoder:
    return cls(from_converted(tree), fold=fold_affine, max_batch=max_batch)

  def _bucket(self, n: int) -> int:
    return min(self.max_batch, 1 << max(0, math.ceil(math.log2(n))))

  def __call__(self, chips: np.ndarray | jax.Array) -> np.ndarray:
    """``[N, S, S, 3] uint8`` RGB chips (S = spec.input_size) -> ``[N, 128] float32`` numpy."""
    size = self.spec.input_size
    if not hasattr(chips, "dtype") or not hasattr(chips, "shape"):
      chips = np.asarray(chips)
    if chips.ndim != 4 or tuple(chips.shape[1:]) != (size, size, 3):
      raise ValueError(f"chips must be [N, {size}, {size}, 3], got shape {tuple(chips.shape)}")
    if chips.dtype != np.uint8:
      raise ValueError(f"chips must be uint8 RGB, got dtype {chips.dtype}")
    n = int(chips.shape[0])
    out = np.empty((n, self.spec.embedding_dim), np.float32)
    start = 0
    while start < n:
      stop = min(n, start + self.max_batch)
      part = np.asarray(chips[start:stop])
      bucket = self._bucket(stop - start)
      if part.shape[0] < bucket:  # zero chips fill the bucket; their rows are dropped
        part = np.concatenate([part, np.zeros((bucket - part.shape[0],) + part.shape[1:], np.uint8)])
      emb = self._infer_fn(self._infer_leaves, part)
      out[start:stop] = np.asarray(emb)[:stop - start]
      start = stop
    return out
