"""Trainable ResNet-style face encoder (Flax NNX).

The encoder maps a batch of images (or 1-D signals, or 3-D volumes) to
embeddings: ``[B, *spatial, C] float32 -> [B, D] float32``. The spatial rank
(1, 2 or 3) is a constructor argument so the same code serves EKG-like
signals ``[B, T, C]``, images ``[B, H, W, C]`` and CT-like volumes
``[B, D, H, W, C]``.

Run it functionally, as the training code does::

  graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
  emb = apply(graphdef, params, rest, images)          # pure, jittable
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Architecture hyper-parameters; saved with checkpoints to rebuild the model.

  Attributes:
    spatial_rank: 1 (signals), 2 (images) or 3 (volumes).
    in_channels: channels of the input (3 for RGB, 1 for grayscale).
    embedding_dim: D, size of the output embedding.
    stem_width: channels of the stem convolution.
    stem_stride: stride of the stem convolution (2 halves the work for
      inputs >= 64 px).
    widths: channels per stage; every stage after the first halves the
      spatial size.
    depths: residual blocks per stage (same length as ``widths``).
    l2_normalize: project embeddings onto the unit sphere, as FaceNet does, so
      squared distances lie in [0, 4] and a margin has a fixed meaning.
    pool: "avg" (global average pooling: any input size) or "flatten" (keep
      the final feature map's layout, as face-recognition heads do: where a
      feature is matters for aligned faces; needs ``input_size``).
    input_size: spatial input size, required by ``pool="flatten"``.
  """
  spatial_rank: int = 2
  in_channels: int = 3
  embedding_dim: int = 128
  stem_width: int = 32
  stem_stride: int = 1
  widths: tuple[int, ...] = (32, 64, 128, 256)
  depths: tuple[int, ...] = (1, 1, 1, 1)
  l2_normalize: bool = True
  pool: str = "avg"
  input_size: tuple[int, ...] = ()

  def __post_init__(self):
    if self.spatial_rank not in (1, 2, 3):
      raise ValueError(f"spatial_rank must be 1, 2 or 3, got {self.spatial_rank}")
    if len(self.widths) != len(self.depths) or not self.widths:
      raise ValueError(
          f"widths {self.widths} and depths {self.depths} must be non-empty and of equal length")
    for name in ("in_channels", "embedding_dim", "stem_width", "stem_stride"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if min(self.widths) < 1 or min(self.depths) < 1:
      raise ValueError(f"widths and depths must be >= 1, got {self.widths}, {self.depths}")
    if self.pool not in ("avg", "flatten"):
      raise ValueError(f"pool must be 'avg' or 'flatten', got {self.pool!r}")
    if self.pool == "flatten" and len(self.input_size) != self.spatial_rank:
      raise ValueError(f"pool='flatten' needs input_size with {self.spatial_rank} entries, "
                       f"got {self.input_size}")

  def feature_size(self) -> tuple[int, ...]:
    """Spatial size of the last feature map for ``input_size`` (SAME padding)."""
    size = tuple(self.input_size)
    strides = [self.stem_stride] + [2] * (len(self.widths) - 1)
    for s in strides:
      size = tuple(-(-n // s) for n in size)
    return size


def _conv(in_ch: int, out_ch: int, rank: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(in_ch, out_ch, kernel_size=(kernel,) * rank, strides=(stride,) * rank,
                  padding="SAME", use_bias=False, rngs=rngs)


class ResidualBlock(nnx.Module):
  """Basic pre-activation-free ResNet block: conv-BN-ReLU-conv-BN + shortcut."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, rank: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(in_ch, out_ch, rank, 3, stride, rngs)
    self.bn1 = nnx.BatchNorm(out_ch, momentum=0.9, rngs=rngs)
    self.conv2 = _conv(out_ch, out_ch, rank, 3, 1, rngs)
    # Zero-init the last BN scale so each block starts as the identity: stabler
    # early triplet training, where a random network already gives near-equal distances.
    self.bn2 = nnx.BatchNorm(out_ch, momentum=0.9, scale_init=nnx.initializers.zeros, rngs=rngs)
    if stride != 1 or in_ch != out_ch:
      self.proj = _conv(in_ch, out_ch, rank, 1, stride, rngs)
      self.proj_bn = nnx.BatchNorm(out_ch, momentum=0.9, rngs=rngs)
    else:
      self.proj = None
      self.proj_bn = None

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    shortcut = x if self.proj is None else self.proj_bn(self.proj(x), use_running_average=ura)
    return nnx.relu(y + shortcut)


class Encoder(nnx.Module):
  """ResNet-style encoder: ``[B, *spatial, C] float32 -> [B, D] float32``.

  Any spatial size works (global average pooling); ``spec.spatial_rank``
  fixes how many spatial axes the input has.
  """

  def __init__(self, spec: EncoderSpec = EncoderSpec(), *, rngs: nnx.Rngs):
    self.spec = spec
    r = spec.spatial_rank
    self.stem = _conv(spec.in_channels, spec.stem_width, r, 3, spec.stem_stride, rngs)
    self.stem_bn = nnx.BatchNorm(spec.stem_width, momentum=0.9, rngs=rngs)
    blocks = []
    in_ch = spec.stem_width
    for stage, (width, depth) in enumerate(zip(spec.widths, spec.depths)):
      for i in range(depth):
        stride = 2 if (stage > 0 and i == 0) else 1
        blocks.append(ResidualBlock(in_ch, width, stride, r, rngs=rngs))
        in_ch = width
    self.blocks = nnx.List(blocks)
    if spec.pool == "flatten":
      in_ch *= int(np.prod(spec.feature_size()))
    self.head = nnx.Linear(in_ch, spec.embedding_dim, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Embeds a batch.

    Args:
      x: ``[B, *spatial, C]`` float32 (images in [0, 1]; they are centred here).
      train: use batch statistics and update running averages (training) or
        use running averages (evaluation).

    Returns:
      ``[B, D]`` float32 embeddings, unit-norm when ``spec.l2_normalize``.
    """
    expected = self.spec.spatial_rank + 2
    if x.ndim != expected or x.shape[-1] != self.spec.in_channels:
      raise ValueError(
          f"encoder input must be [B, {'x'.join('S' * self.spec.spatial_rank)}, "
          f"{self.spec.in_channels}] (rank {expected}), got shape {tuple(x.shape)}")
    x = x.astype(jnp.float32) - 0.5
    x = nnx.relu(self.stem_bn(self.stem(x), use_running_average=not train))
    for block in self.blocks:
      x = block(x, train)
    if self.spec.pool == "flatten":
      if tuple(x.shape[1:-1]) != self.spec.feature_size():
        raise ValueError(f"pool='flatten' was built for input size {self.spec.input_size}; "
                         f"this input gives feature map {tuple(x.shape[1:-1])}")
      x = x.reshape(x.shape[0], -1)
    else:
      x = jnp.mean(x, axis=tuple(range(1, 1 + self.spec.spatial_rank)))
    x = self.head(x)
    return l2_normalize(x) if self.spec.l2_normalize else x


def l2_normalize(x: jax.Array) -> jax.Array:
  """``[..., D]`` -> unit-norm rows, same shape and dtype."""
  # eps inside the sqrt keeps the gradient finite for an all-zero embedding.
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def build_encoder(spec: EncoderSpec, seed: int = 0) -> Encoder:
  """Creates an encoder with parameters initialised from ``seed``."""
  return Encoder(spec, rngs=nnx.Rngs(seed))


def apply(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, x: jax.Array,
          train: bool = False) -> tuple[jax.Array, nnx.State]:
  """Pure application of a split encoder.

  Args:
    graphdef, params, rest: from ``nnx.split(encoder, nnx.Param, ...)``.
    x: ``[B, *spatial, C]`` float32.
    train: batch statistics (and their update) or running averages.

  Returns:
    (``[B, D]`` float32 embeddings, updated non-parameter state such as
    BatchNorm running averages; unchanged when ``train`` is False).
  """
  # copy=True: fresh Variables at this trace level, so the BatchNorm update in
  # train mode never mutates the caller's state (purity under jit and grad).
  model = nnx.merge(graphdef, params, rest, copy=True)
  emb = model(x, train=train)
  _, _, new_rest = nnx.split(model, nnx.Param, ...)
  return emb, new_rest


def num_params(params: nnx.State) -> int:
  return int(sum(p.size for p in jax.tree.leaves(params)))


def parse_ints(text: str | Sequence[int]) -> tuple[int, ...]:
  """'32,64,128' -> (32, 64, 128); passes tuples through."""
  if isinstance(text, str):
    try:
      return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as e:
      raise ValueError(f"expected comma-separated integers, got {text!r}") from e
  return tuple(int(t) for t in text)
