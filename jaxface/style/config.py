"""Configuration of ``python -m experiments.nst`` (Gatys neural style transfer).

A plain frozen dataclass: the absl entry point builds it from flags, the
library receives it, and checkpoints store it as JSON (``to_dict``). Lists of
names or numbers are comma-separated strings (``--style_layers=relu1_1,relu2_1``)
so that every field stays a simple flag; ``validate`` parses and checks them.
"""

from __future__ import annotations

import dataclasses
import math

from jaxface.config_dict import JsonConfig, field

OPTIMIZERS = ("adam", "lbfgs")
INITS = ("noise", "content", "content_noise")
COLOR_MODES = ("none", "luminance", "histogram")

# Keys a resumed run may change without starting over.
# num_devices only moves images between devices (results equal up to float
# rounding; bitwise equal when resumed with the same value), and runs saved
# before the field existed must still resume. Likewise the process layout
# (jax.distributed): the same images, on other devices.
RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "snapshot_every", "max_to_keep", "num_devices",
                     "conv_impl",  # float rounding only (Winograd vs direct convolution)
                     "distributed", "coordinator_address", "num_processes", "process_id")
DISTRIBUTED = ("off", "on", "auto")


def _split(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


@dataclasses.dataclass(frozen=True)
class NSTConfig(JsonConfig):
  """Every setting of ``python -m experiments.nst`` (flag name = field name)."""
  # --- images
  content: str = field("builtin:scene",
      "comma-separated content images (one batch); builtin:scene|builtin:checker or paths")
  style: str = field("builtin:waves", "comma-separated style images; builtin:waves|builtin:mosaic or paths")
  style_blend: str = field("", "comma-separated weights, one per style image (default equal)")
  size: int = field(256, "longer side of the output, px (the last scale)")
  style_scale: float = field(1.0, "style image longer side = style_scale * current output longer side")
  num_scales: int = field(2, "coarse-to-fine: scale k of n has longer side size / 2**(n-1-k)")
  steps: tuple[int, ...] = field((300, 100),
      "optimisation steps per scale (one value for all, or one per scale)")
  preserve_color: str = field("none",
      "none | luminance (transfer on luminance only) | histogram (match style colours to content)")
  # --- network and costs
  weights: str = field("",
      "VGG19 weight file (.h5/.pth/.mat); empty: converted weights in the cache, else random")
  pooling: str = field("max", "max | avg")
  conv_impl: str = field("auto",
      "auto (measured per layer) | xla | winograd: VGG19 3x3 convolutions "
      "(jaxface.models.vgg19.input_grad_kernels)")
  content_layer: str = field("relu4_2", "VGG19 layer whose activations define the content cost")
  style_layers: str = field(
      "relu1_1,relu2_1,relu3_1,relu4_1,relu5_1",
      "comma-separated VGG19 layers whose Gram matrices define the style cost")
  style_layer_weights: str = field("", "lambda_l per style layer, comma-separated (default 1/L each)")
  content_normalize: bool = field(False, "content cost 1/(4 nH nW nC) instead of 1/2")
  alpha: float = field(1.0, "content weight")
  beta: float = field(1e7, "style weight")
  tv_weight: float = field(0.1, "total variation weight (gamma)")
  # --- optimisation
  optimizer: str = field("adam", "adam | lbfgs")
  learning_rate: float = field(0.02, "Adam step size (pixels in [0, 1])")
  init: str = field("content", "noise | content | content_noise")
  noise_ratio: float = field(0.3, "content_noise: (1 - r) content + r uniform noise")
  seed: int = field(0, "random seed: noise initialisation, and VGG19 weights when none are loaded")
  num_devices: int = field(1,
      "devices the content batch is split over (0 = all); must divide the number of content images")
  # --- several processes (jaxface.parallel.distributed; multi-host: pass --num_devices=0)
  distributed: str = field("off", "off | on | auto: jax.distributed.initialize (multi-process)")
  coordinator_address: str = field("", 'host:port of process 0 ("" = detect: TPU pod, SLURM, ...)')
  num_processes: int = field(0, "with --coordinator_address: number of processes")
  process_id: int = field(-1, "with --coordinator_address: this process's rank")
  # --- bookkeeping
  log_every: int = field(20, "steps between log lines")
  checkpoint_every: int = field(100, "steps between checkpoints (>= 1; the last step is always saved)")
  snapshot_every: int = field(0, "> 0: write PNGs of the current images every N steps")
  max_to_keep: int = field(2, "checkpoints kept")

  def __post_init__(self):
    v = self.steps
    if isinstance(v, str):
      v = tuple(int(t) for t in v.split(",") if t.strip())
    object.__setattr__(self, "steps", tuple(int(t) for t in v))

  # ------------------------------------------------------------------ parsed views

  def content_list(self) -> list[str]:
    return _split(self.content)

  def style_list(self) -> list[str]:
    return _split(self.style)

  def blend_weights(self) -> list[float]:
    if not self.style_blend.strip():
      return [1.0 / len(self.style_list())] * len(self.style_list())
    w = [float(t) for t in _split(self.style_blend)]
    total = sum(w)
    return [x / total for x in w]

  def style_lambdas(self) -> dict[str, float]:
    layers = _split(self.style_layers)
    if not self.style_layer_weights.strip():
      return {name: 1.0 / len(layers) for name in layers}
    return dict(zip(layers, (float(t) for t in _split(self.style_layer_weights))))

  def steps_per_scale(self) -> tuple[int, ...]:
    return self.steps * self.num_scales if len(self.steps) == 1 else self.steps

  def total_steps(self) -> int:
    return sum(self.steps_per_scale())

  def scale_sizes(self) -> tuple[int, ...]:
    """Longer output side per scale, coarse to fine."""
    return tuple(max(1, round(self.size / 2 ** (self.num_scales - 1 - k)))
                 for k in range(self.num_scales))

  def last_layer(self) -> str:
    from jaxface.models import vgg19  # imports JAX: only once a run needs it
    return vgg19.deepest([self.content_layer, *self.style_lambdas()])

  # ------------------------------------------------------------------ checks

  def validate(self) -> NSTConfig:
    """Raises ValueError naming the first bad setting (images are checked by ``run``)."""
    from jaxface.models import vgg19  # imports JAX: after the flags are parsed
    def bad(name, why):
      v = getattr(self, name)
      shown = ",".join(map(str, v)) if isinstance(v, tuple) else repr(v)
      raise ValueError(f"{name}={shown}: {why}")
    if not self.content_list():
      bad("content", "needs at least one content image")
    if not self.style_list():
      bad("style", "needs at least one style image")
    if self.style_blend.strip():
      try:
        w = [float(t) for t in _split(self.style_blend)]
      except ValueError:
        bad("style_blend", "expected comma-separated numbers")
      if len(w) != len(self.style_list()):
        bad("style_blend", f"needs one weight per style image ({len(self.style_list())})")
      if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        bad("style_blend", "weights must be finite, >= 0, and not all 0")
    try:
      vgg19.layer_index(self.content_layer)
    except ValueError as e:
      bad("content_layer", str(e))
    layers = _split(self.style_layers)
    if not layers:
      bad("style_layers", "needs at least one layer")
    if len(set(layers)) != len(layers):
      bad("style_layers", "lists a layer twice")
    for name in layers:
      try:
        vgg19.layer_index(name)
      except ValueError as e:
        bad("style_layers", str(e))
    if self.style_layer_weights.strip():
      try:
        lam = [float(t) for t in _split(self.style_layer_weights)]
      except ValueError:
        bad("style_layer_weights", "expected comma-separated numbers")
      if len(lam) != len(layers):
        bad("style_layer_weights", f"needs one weight per style layer ({len(layers)})")
      if not all(math.isfinite(x) and x >= 0 for x in lam):
        bad("style_layer_weights", "weights must be finite and >= 0")
    for name in ("alpha", "beta", "tv_weight"):
      v = getattr(self, name)
      if not (math.isfinite(v) and v >= 0):
        bad(name, "must be finite and >= 0")
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      bad("learning_rate", "must be finite and > 0")
    if not (math.isfinite(self.style_scale) and 0.05 <= self.style_scale <= 8):
      bad("style_scale", "must be in [0.05, 8]")
    if not (math.isfinite(self.noise_ratio) and 0 <= self.noise_ratio <= 1):
      bad("noise_ratio", "must be in [0, 1]")
    if self.optimizer not in OPTIMIZERS:
      bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    if self.init not in INITS:
      bad("init", f"must be one of {', '.join(INITS)}")
    if self.preserve_color not in COLOR_MODES:
      bad("preserve_color", f"must be one of {', '.join(COLOR_MODES)}")
    if self.conv_impl not in vgg19.CONV_IMPLS:
      bad("conv_impl", f"must be one of {', '.join(vgg19.CONV_IMPLS)}")
    if self.pooling not in vgg19.POOLINGS:
      bad("pooling", f"must be one of {', '.join(vgg19.POOLINGS)}")
    if self.size < 8 or self.size > 4096:
      bad("size", "must be in [8, 4096]")
    if not 1 <= self.num_scales <= 6:
      bad("num_scales", "must be in [1, 6]")
    if len(self.steps) not in (1, self.num_scales) or min(self.steps, default=0) < 1:
      bad("steps", f"needs one value >= 1, or one per scale ({self.num_scales})")
    for name in ("log_every", "checkpoint_every", "max_to_keep"):
      if getattr(self, name) < 1:
        bad(name, "must be >= 1")
    if self.snapshot_every < 0:
      bad("snapshot_every", "must be >= 0")
    if self.num_devices < 0:
      bad("num_devices", "must be >= 0 (0 = all devices)")
    if self.distributed not in DISTRIBUTED:
      bad("distributed", f"must be one of {', '.join(DISTRIBUTED)}")
    return self
