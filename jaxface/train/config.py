"""Configuration of the triplet-loss training experiment: one frozen dataclass per concern.

:class:`TripletConfig` holds the run's ``seed`` and seven groups, each a frozen
dataclass that checks its own settings when built and is what the functions of
that concern take. Choices other modules implement (loss strategies, head kinds,
alignment methods, ``jax.distributed`` modes) are imported from them when a group
is checked: they import JAX and this module does not, so flags are defined and
parsed without it. Errors name the parameter and its value (``strategy='x': must
be one of ...``); the entry point turns the name into its flag.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from jaxface.config_dict import JsonConfig, field, invalid
from jaxface.data.build import DataConfig, int_tuple

if typing.TYPE_CHECKING:  # the model modules import JAX: only when a spec is built
  from jaxface.models.dlib_resnet import DlibResNetSpec
  from jaxface.models.encoder import EncoderSpec

# Choices that only these settings make.
INITS = ("scratch", "dlib")  # model: a random encoder, or dlib's pretrained ResNet
# Smallest input side dlib's ResNet accepts (its last feature map is >= 1x1);
# 150 is what the pretrained weights were trained on.
DLIB_MIN_SIZE = 103
MINING = ("global", "local")  # loss: over the whole batch, or within each device's rows
SCORE_NORMS = ("none", "snorm")  # eval: plain distances, or cohort S-norm

__all__ = ["AugmentConfig", "DataConfig", "EvalConfig", "LossConfig", "ModelConfig", "OptimConfig",
           "RuntimeConfig", "TripletConfig"]


def _finite_at_least(group, names: tuple[str, ...], low: float = 0.0) -> None:
  for name in names:
    v = getattr(group, name)
    if not (math.isfinite(v) and v >= low):
      raise invalid(name, v, f"must be finite and >= {low:g}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig(JsonConfig):
  """Random augmentation of training batches (``jaxface.data.augment``); all ranks unless noted."""
  flip: bool = field(True, "mirror the last spatial axis at random (not for signals)")
  brightness: float = field(0.2, "max additive brightness change (a baseline offset)")
  contrast: float = field(0.2, "max relative contrast change (an amplitude scale)")
  scale: float = field(0.0, "random zoom, max relative change (images)")
  rotate: float = field(0.0, "random rotation, max degrees (images)")
  erase: float = field(0.0, "probability of random erasing, a noise rectangle (images)")
  noise: float = field(0.0, "std of additive Gaussian noise on [0, 1] values")

  def __post_init__(self):
    _finite_at_least(self, ("brightness", "contrast"))
    if not (math.isfinite(self.noise) and 0 <= self.noise <= 0.5):
      raise invalid("noise", self.noise, "must be in [0, 0.5]")
    if not 0 <= self.erase <= 1:
      raise invalid("erase", self.erase, "must be a probability in [0, 1]")
    if not 0 <= self.scale <= 0.5:
      raise invalid("scale", self.scale, "must be in [0, 0.5]")
    if not 0 <= self.rotate <= 45:
      raise invalid("rotate", self.rotate, "must be in [0, 45] degrees")


@dataclasses.dataclass(frozen=True)
class ModelConfig(JsonConfig):
  """The encoder.

  ``init="dlib"`` fine-tunes dlib's pretrained 128-D ResNet
  (``jaxface.pretrained.face_encoder``); the scratch architecture fields
  (stem_*, widths, depths, pool) are then unused and grayscale images are fed
  as RGB. ``ensemble=N`` trains N members (seeds seed..seed+N-1, in
  ``<workdir>/member<i>``) and evaluates their concatenated embeddings.
  """
  init: str = field("scratch", "scratch | dlib (fine-tune dlib's pretrained ResNet: crop >= 103, 150 native)")
  embedding_dim: int = field(128, "embedding size (128 with init=dlib)")
  stem_width: int = field(32, "scratch: channels of the stem convolution")
  stem_stride: int = field(1, "scratch: stride of the stem convolution")
  widths: tuple[int, ...] = field((32, 64, 128, 256), "scratch: channels per stage")
  depths: tuple[int, ...] = field((1, 1, 1, 1), "scratch: residual blocks per stage")
  l2_normalize: bool = field(True, "unit-norm embeddings, so the margin has a fixed meaning")
  pool: str = field("avg", "scratch: avg (global average) | flatten (keeps face layout)")
  standardize: bool = field(False, "per-sample standardisation of inputs (zero mean, unit std)")
  ensemble: int = field(1, "> 1: train members with seeds seed, seed+1, ...; concatenate embeddings")

  def __post_init__(self):
    for name in ("widths", "depths"):
      object.__setattr__(self, name, int_tuple(getattr(self, name)))
    if self.init not in INITS:
      raise invalid("init", self.init, f"must be one of {', '.join(INITS)}")
    if not 1 <= self.ensemble <= 16:
      raise invalid("ensemble", self.ensemble, "must be in 1..16")


@dataclasses.dataclass(frozen=True)
class LossConfig(JsonConfig):
  """Triplet loss, how it is mined over devices, and the optional margin-softmax head.

  Data parallelism (``runtime.num_devices``): ``mining="global"`` mines every
  anchor against the whole global batch, so loss and gradients equal one
  device's on the same batch (BatchNorm statistics are global too);
  ``mining="local"`` mines within each device's rows (whole identities: P must
  be a multiple of the device count, >= 2 identities per device), with local
  BatchNorm statistics, and averages losses and gradients over devices.
  ``cls_weight > 0`` adds a CosFace (``cls_type="arcface"``: ArcFace) softmax
  over the training identities (``jaxface.train.heads``).
  """
  strategy: str = field("all_active", "triplet mining: all | all_active | hard | semihard")
  margin: float = field(0.2, "triplet margin on squared distances")
  mining: str = field("global", "global: mine over the whole P*K batch; local: within each device's rows")
  cls_weight: float = field(0.0, "> 0: add a CosFace softmax loss over the training identities")
  cls_margin: float = field(0.35, "CosFace additive cosine margin (ArcFace: angular, radians)")
  cls_scale: float = field(16.0, "CosFace logit scale")
  cls_type: str = field("cosface", "cosface (cosine margin) | arcface (angular margin, radians)")
  cls_smoothing: float = field(0.0, "label smoothing of the margin softmax, in [0, 1)")

  def __post_init__(self):
    # The loss and the heads own their choices (both import JAX).
    from jaxface.losses.triplet import STRATEGIES
    from jaxface.train.heads import MARGIN_KINDS
    if self.strategy not in STRATEGIES:
      raise invalid("strategy", self.strategy, f"must be one of {', '.join(STRATEGIES)}")
    if not (math.isfinite(self.margin) and self.margin >= 0):
      raise invalid("margin", self.margin, "must be finite and >= 0")
    if self.mining not in MINING:
      raise invalid("mining", self.mining, f"must be one of {', '.join(MINING)}")
    _finite_at_least(self, ("cls_weight",))
    if not (math.isfinite(self.cls_margin) and 0 <= self.cls_margin < 1):
      raise invalid("cls_margin", self.cls_margin, "must be in [0, 1)")
    if not (math.isfinite(self.cls_scale) and self.cls_scale > 0):
      raise invalid("cls_scale", self.cls_scale, "must be finite and > 0")
    if self.cls_type not in MARGIN_KINDS:
      raise invalid("cls_type", self.cls_type, f"must be {' or '.join(MARGIN_KINDS)}")
    if not (math.isfinite(self.cls_smoothing) and 0 <= self.cls_smoothing < 1):
      raise invalid("cls_smoothing", self.cls_smoothing, "must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class OptimConfig(JsonConfig):
  """AdamW on a warm-up cosine schedule over ``runtime.num_steps``."""
  learning_rate: float = field(3e-3, "peak learning rate")
  warmup_steps: int = field(40, "linear warm-up steps")
  weight_decay: float = field(1e-4, "AdamW weight decay (kernels only)")
  grad_clip: float = field(1.0, "global gradient-norm clip (0: off)")
  ema_decay: float = field(0.0, "> 0: evaluate an exponential moving average of the weights")

  def __post_init__(self):
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise invalid("learning_rate", self.learning_rate, "must be finite and > 0")
    _finite_at_least(self, ("weight_decay", "grad_clip"))
    if not 0 <= self.ema_decay < 1:
      raise invalid("ema_decay", self.ema_decay, "must be in [0, 1)")
    if self.warmup_steps < 0:
      raise invalid("warmup_steps", self.warmup_steps, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig(JsonConfig):
  """Held-out verification (``jaxface.train.evaluators.verification``); may change on resume."""
  eval_every: int = field(0, "evaluate every N steps (0: only at the end)")
  eval_batch_size: int = field(128, "images per embedding batch")
  eval_flip: bool = field(True, "embed image + mirror image, average (test-time augmentation)")
  eval_crops: int = field(1, "1: centre crop; 5: centre + 4 corner crops, averaged (images only)")
  roc_png: bool = field(True, "write roc.png beside metrics.json")
  fisher_weight: float = field(0.0, "> 0: fuse w * Fisherfaces of the pixels (jaxface.train.fisher)")
  fisher_pca: int = field(80, "principal components before the Fisherfaces LDA")
  score_norm: str = field("none", "none | snorm: cohort S-norm of held-out scores (cohort: training images)")
  score_norm_top_k: int = field(0, "snorm: 0 = whole cohort, k >= 2 = each image's k nearest (adaptive)")
  score_norm_cohort: int = field(2000, "snorm: at most this many training images (seeded subset) form the cohort")

  def __post_init__(self):
    if self.eval_every < 0:
      raise invalid("eval_every", self.eval_every, "must be >= 0")
    if self.eval_batch_size < 1:
      raise invalid("eval_batch_size", self.eval_batch_size, "must be >= 1")
    if self.eval_crops not in (1, 5):
      raise invalid("eval_crops", self.eval_crops, "must be 1 (centre crop) or 5 (centre and 4 corners)")
    if not (math.isfinite(self.fisher_weight) and self.fisher_weight >= 0):
      raise invalid("fisher_weight", self.fisher_weight, "must be finite and >= 0 (0: off)")
    if self.fisher_pca < 1:
      raise invalid("fisher_pca", self.fisher_pca, "must be >= 1")
    if self.score_norm not in SCORE_NORMS:
      raise invalid("score_norm", self.score_norm, f"must be one of {', '.join(SCORE_NORMS)}")
    if self.score_norm_top_k < 0 or self.score_norm_top_k == 1:
      raise invalid("score_norm_top_k", self.score_norm_top_k, "must be 0 (whole cohort) or >= 2")
    if self.score_norm_cohort < 2:
      raise invalid("score_norm_cohort", self.score_norm_cohort, "must be >= 2")
    if self.score_norm_top_k > self.score_norm_cohort:
      raise invalid("score_norm_top_k", self.score_norm_top_k,
                    f"must be <= score_norm_cohort ({self.score_norm_cohort})")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig(JsonConfig):
  """How long and where the run goes, and how often it reports; may change on resume."""
  # num_steps: a resumed run may train on (or stop earlier); the learning-rate
  # schedule then follows the new length from the resumed step on.
  num_steps: int = field(400, "training steps (0: evaluate the initial weights only)")
  log_every: int = field(20, "log (stderr, train_log.jsonl) every N steps")
  checkpoint_every: int = field(100, "checkpoint every N steps")
  max_to_keep: int = field(2, "checkpoints kept")
  # Devices and processes (jaxface.parallel): the global batch and its data
  # stream do not depend on how many share it (global mining equals one device).
  num_devices: int = field(0, "data-parallel devices: 0 = all (of all processes), 1 = one device")
  distributed: str = field("off", "off | on | auto: jax.distributed.initialize (multi-process)")
  coordinator_address: str = field("", 'host:port of process 0 ("" = detect: TPU pod, SLURM, ...)')
  num_processes: int = field(0, "with coordinator_address: number of processes")
  process_id: int = field(-1, "with coordinator_address: this process's rank")

  def __post_init__(self):
    from jaxface.parallel.distributed import MODES  # what jax.distributed start-up accepts
    if self.num_steps < 0:
      raise invalid("num_steps", self.num_steps, "must be >= 0 (0: evaluate the initial weights only)")
    for name in ("log_every", "checkpoint_every", "max_to_keep"):
      if getattr(self, name) < 1:
        raise invalid(name, getattr(self, name), "must be >= 1")
    if self.num_devices < 0:
      raise invalid("num_devices", self.num_devices, "must be >= 0 (0: all devices)")
    if self.distributed not in MODES:
      raise invalid("distributed", self.distributed, f"must be one of {', '.join(MODES)}")


# The groups, in order; a resumed run may change these (and nothing else).
GROUPS = {"data": DataConfig, "augment": AugmentConfig, "model": ModelConfig, "loss": LossConfig,
          "optim": OptimConfig, "eval": EvalConfig, "runtime": RuntimeConfig}
RESUMABLE_GROUPS = ("eval", "runtime")


def _flat_names() -> dict[str, tuple[str, str]]:
  """{flat (flag) name: (group, field)} over every group; the names are unique."""
  out = {}
  for group, cls in GROUPS.items():
    for f in dataclasses.fields(cls):
      name = f.metadata.get("flag", f.name)
      assert name not in out and name != "seed", name
      out[name] = (group, f.name)
  return out


FLAT = _flat_names()


def _sort_settings(settings: dict[str, Any]) -> tuple[int | None, dict[str, Any], dict[str, dict[str, Any]]]:
  """Keyword settings -> (seed or None, {group: object or dict}, {group: {field: value}})."""
  seed, bases, changes, unknown = None, {}, {g: {} for g in GROUPS}, []
  for key, value in settings.items():
    if key == "seed":
      seed = value
    elif key in GROUPS and isinstance(value, (dict, GROUPS[key])):
      bases[key] = value
    elif key in FLAT:
      group, name = FLAT[key]
      changes[group][name] = value
    else:
      unknown.append(key)
  if unknown:
    raise TypeError(f"TripletConfig got unknown settings {sorted(unknown)}")
  return seed, bases, changes


@dataclasses.dataclass(frozen=True, init=False)
class TripletConfig(JsonConfig):
  """Every setting of ``python -m experiments.triplet``: the seed and seven groups.

  * ``data`` (:class:`jaxface.data.build.DataConfig`): source, sample shape,
    held-out split, P x K batch.
  * ``augment``: random training augmentation.
  * ``model``: the encoder (``init="dlib"`` fine-tunes dlib's pretrained
    ResNet), input standardisation, ensembles.
  * ``loss``: triplet strategy and margin, mining across devices, the optional
    CosFace/ArcFace head.
  * ``optim``: AdamW, warm-up cosine schedule, gradient clipping, EMA.
  * ``eval``: held-out evaluation: test-time augmentation, S-norm, Fisherfaces.
  * ``runtime``: step count, logging and checkpoint cadence, devices and processes.

  Every leaf setting has one flat name, the absl flag of ``python -m
  experiments.triplet`` (``--P``, ``--strategy``, ...; ``data.kind`` is
  ``--data``), with its help text in the field's metadata. The flat names also
  work in Python: ``TripletConfig(P=8, strategy="hard")``, ``cfg.P`` and
  ``cfg.replace(margin=0.5)`` address the group field of that name
  (``dataclasses.replace`` too, except for ``data``: the name of both the data
  kind and its group). Built from groups (instances or dicts), flat names or
  both; flat names override the group they belong to::

    TripletConfig(loss=LossConfig(strategy="hard"), P=8)
    TripletConfig.from_dict(json.load(open("config.json")))  # nested or old flat

  The rules between groups are checked when it is built: ``spatial_rank`` 1
  (signals) refuses ``flip`` and ``eval_flip`` (reversed time is not the same
  heartbeat); scale, rotate, erase and ``eval_crops=5`` are image-only;
  ``init="dlib"`` needs 2-D crops of at least 103 px (150 matches the
  pretrained weights), ``embedding_dim=128`` and no ``standardize``; a scratch
  encoder checks its architecture (``EncoderSpec``).
  """
  seed: int = field(0, "seed of the data, the weights, the sampler and the augmentation")
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

  def __init__(self, **settings: Any):
    seed, bases, changes = _sort_settings(settings)
    if isinstance(settings.get("data"), str) and bases:
      # dataclasses.replace(cfg, data="folder") and {**cfg.to_dict(), "data": "folder"} would
      # silently drop the data group: the flat name of the data kind is also the group's name.
      raise invalid("data", settings["data"], "the data kind cannot be given by its flat name beside "
                    "config groups, whose data group it would replace; use cfg.replace(data=...) or "
                    "data=dataclasses.replace(cfg.data, kind=...)")
    self._assign(0 if seed is None else seed, bases, changes)

  def replace(self, **settings: Any) -> TripletConfig:
    """A copy with ``settings`` changed: groups (objects or dicts) or flat names, which
    change one field of their group (``data="folder"`` sets ``data.kind``)."""
    seed, bases, changes = _sort_settings(settings)
    new = object.__new__(TripletConfig)
    new._assign(self.seed if seed is None else seed,
                {**{g: getattr(self, g) for g in GROUPS}, **bases}, changes)
    return new

  def _assign(self, seed: int, bases: dict[str, Any], changes: dict[str, dict[str, Any]]) -> None:
    object.__setattr__(self, "seed", int(seed))
    for group, cls in GROUPS.items():
      base = bases.get(group, {})
      if isinstance(base, dict):
        value = cls.from_dict({**base, **changes[group]})
      else:
        value = dataclasses.replace(base, **changes[group]) if changes[group] else base
      object.__setattr__(self, group, value)
    self._check()

  def __getattr__(self, name: str) -> Any:
    # Only reached for names that are not attributes: the flat (flag) names.
    where = FLAT.get(name)
    if where is None:
      raise AttributeError(f"'TripletConfig' has no setting {name!r}")
    return getattr(object.__getattribute__(self, where[0]), where[1])

  # ------------------------------------------------------------------ checks between groups

  def _check(self) -> None:
    data, rank = self.data, self.data.spatial_rank
    if rank == 1:
      for name, on in (("flip", self.augment.flip), ("eval_flip", self.eval.eval_flip)):
        if on:
          raise invalid(name, on, "flipping a signal reverses time, which changes the heartbeat; "
                                  "switch it off with spatial_rank=1")
    if rank != 2:
      for name in ("scale", "rotate", "erase"):
        if getattr(self.augment, name):
          raise invalid(name, getattr(self.augment, name),
                        f"is an image (2-D) augmentation; set it to 0 with spatial_rank={rank}")
      if self.eval.eval_crops == 5:
        raise invalid("eval_crops", 5, f"corner crops are an image (2-D) test-time augmentation; "
                                       f"use 1 with spatial_rank={rank}")
    model = self.model
    if model.init == "dlib":
      if rank != 2:
        raise invalid("init", model.init, "dlib's ResNet embeds 2-D images; use spatial_rank=2")
      if min(data.crop_size) < DLIB_MIN_SIZE:
        raise invalid("crop_size", data.crop_size,
                      f"init='dlib' needs a crop of at least {DLIB_MIN_SIZE}x{DLIB_MIN_SIZE} (150,150 "
                      f"matches the pretrained weights); raise image_size and crop_size")
      if model.embedding_dim != 128:
        raise invalid("embedding_dim", model.embedding_dim, "init='dlib' keeps dlib's 128-D output layer")
      if model.standardize:
        raise invalid("standardize", model.standardize, "init='dlib' uses dlib's own input scaling")
    else:
      self.encoder_spec()  # checks the scratch architecture

  def validate(self) -> TripletConfig:
    """The config itself: every group and the rules between them were checked when it was built."""
    return self

  # ------------------------------------------------------------------ model specs

  def dlib_spec(self) -> DlibResNetSpec:
    """The :class:`DlibResNetSpec` of an ``init="dlib"`` run (dlib's architecture, our l2 choice)."""
    from jaxface.models.dlib_resnet import DlibResNetSpec
    return DlibResNetSpec(l2_normalize=self.model.l2_normalize)

  def encoder_spec(self) -> EncoderSpec:
    """The scratch encoder: the model group's architecture on the data group's samples."""
    from jaxface.models.encoder import EncoderSpec
    m, d = self.model, self.data
    return EncoderSpec(spatial_rank=d.spatial_rank, in_channels=d.channels,
                       embedding_dim=m.embedding_dim, stem_width=m.stem_width, stem_stride=m.stem_stride,
                       widths=m.widths, depths=m.depths, l2_normalize=m.l2_normalize,
                       pool=m.pool, input_size=tuple(d.crop_size))

  # ------------------------------------------------------------------ JSON and resume

  def to_dict(self) -> dict[str, Any]:
    """``{"seed": ..., "data": {...}, ...}``, JSON-ready (what checkpoints store)."""
    return {"seed": self.seed, **{g: getattr(self, g).to_dict() for g in GROUPS}}

  def to_flat(self) -> dict[str, Any]:
    """``{flat name: value}``, JSON-ready: the flag view (and the format of runs saved before the groups)."""
    groups = {g: getattr(self, g).to_dict() for g in GROUPS}
    return {"seed": self.seed, **{name: groups[g][f] for name, (g, f) in FLAT.items()}}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TripletConfig:
    """From :meth:`to_dict` (nested, what checkpoints store), :meth:`to_flat` (flat, as saved
    before the groups existed) or a mix; missing settings take their defaults (what such runs
    used)."""
    known = {"seed", *GROUPS, *FLAT}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown config keys: {sorted(unknown)}")
    return cls(**d)

  @staticmethod
  def resumable_names() -> tuple[str, ...]:
    """Flat names a resumed run may change: those of the ``eval`` and ``runtime`` groups."""
    return tuple(name for name, (group, _) in FLAT.items() if group in RESUMABLE_GROUPS)

  def check_resumable(self, saved: dict[str, Any]) -> None:
    """Refuses to resume the run ``saved`` (a checkpoint's config, nested or flat) with this config
    when they differ outside the ``eval`` and ``runtime`` groups (how it is evaluated, how long it
    runs, how often it logs and saves, which devices and processes run it).

    Raises:
      checkpointing.CheckpointError: naming each differing setting and both values.
    """
    from jaxface import checkpointing
    # Through the dataclass, so a run saved before a setting existed compares
    # that setting at its default (which is what the run used).
    before = TripletConfig.from_dict(saved).to_flat()
    checkpointing.check_resumable(before, self.to_flat(), may_change=self.resumable_names())
