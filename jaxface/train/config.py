"""Configuration of the triplet-loss training experiment.

A plain frozen dataclass: the absl entry point builds it from flags, the
library receives it, and checkpoints store it as JSON (``to_dict``).

``spatial_rank`` picks what a sample is: 2 = images [H, W, C] (faces from any
source), 1 = EKG-like signals [T, C] or 3 = CT-like volumes [D, H, W, C]
(synthetic sources, ``jaxface.data.synthetic_nd``); ``image_size`` and
``crop_size`` then have that many entries (T | H,W | D,H,W). Augmentations
by rank: crop, brightness (a baseline offset), contrast (an amplitude scale)
and noise apply to every rank; flip mirrors the last spatial axis and is
refused for signals (reversed time is not the same heartbeat); scale, rotate
and erase are image-only and refused for other ranks.

``init="dlib"`` fine-tunes dlib's pretrained 128-D ResNet
(``jaxface.pretrained.face_encoder``) instead of building the scratch encoder:
the scratch architecture fields (stem_*, widths, depths, pool) are then unused,
``embedding_dim`` must be 128, crops must be at least 103 px (150 matches the
pretrained weights) and grayscale images are fed as RGB (R = G = B).
``l2_normalize`` (default on) normalises its descriptors so the triplet margin
has a fixed meaning. ``num_steps=0`` evaluates the initial weights (zero-shot).

Options beyond the triplet loss, all off by default: ``cls_weight`` adds a
CosFace softmax over the training identities (``jaxface.train.heads``),
``cls_type="arcface"`` makes that head's margin angular and ``cls_smoothing``
smooths its labels; ``standardize`` standardises each input, ``eval_crops=5`` averages the
embeddings of the centre and corner crops, ``ensemble=N`` trains N members
(seeds seed..seed+N-1, in ``<workdir>/member<i>``) and evaluates their
concatenated embeddings. ``fisher_weight > 0`` evaluates each held-out
embedding concatenated with that weight times a Fisherfaces projection of its
pixels fitted on the training identities (``jaxface.train.fisher``).
``score_norm="snorm"`` scores held-out pairs by cohort S-norm
(``jaxface.recognition.score_norm``) with the training images as the cohort;
with ``fisher_weight > 0`` too, the Fisherfaces scores are S-normed against
the training images' projections and added with that weight (score-level
fusion) instead of concatenated.
``drop_small`` leaves out identities with fewer than ``K`` images (most of an
LFW-style folder holds one or two per person) before the held-out split, so
training and evaluation see only identities with at least ``K`` images; without
it such identities are an error that names them.
``extra_synthetic=N`` appends N procedural identities (``synthetic_images``
images each, ``jaxface.data.mix``) to the training identities of real data.

Data parallelism (``jaxface.parallel``): the P x K batch is split over
``num_devices`` devices (0 = all, of all processes). ``mining="global"``
mines every anchor against the whole global batch, so loss and gradients
equal one device's on the same batch (BatchNorm statistics are global too);
``mining="local"`` mines within each device's rows (whole identities: P must
be a multiple of the device count, >= 2 identities per device), with local
BatchNorm statistics, and averages losses and gradients over devices.
``distributed`` starts ``jax.distributed`` for multi-process (multi-host) runs.
"""

from __future__ import annotations

import dataclasses
import math

import typing

from jaxface.config_dict import JsonConfig

if typing.TYPE_CHECKING:  # the model module imports JAX: only when a spec is built
  from jaxface.models.encoder import EncoderSpec

STRATEGIES = ("all", "all_active", "hard", "semihard")
INITS = ("scratch", "dlib")
# Smallest input side dlib's ResNet accepts (its last feature map is >= 1x1);
# 150 is what the pretrained weights were trained on.
DLIB_MIN_SIZE = 103
DATA_KINDS = ("synthetic", "folder", "tfds")
SPATIAL_RANKS = {1: "signals T", 2: "images H,W", 3: "volumes D,H,W"}

# Keys a resumed run may change without starting over.
RESUMABLE_CHANGES = ("num_steps", "log_every", "checkpoint_every", "eval_every", "eval_batch_size",
                     "max_to_keep", "roc_png", "eval_flip", "eval_crops",
                     # Evaluation-only: the Fisherfaces fusion is fitted after training.
                     "fisher_weight", "fisher_pca",
                     "score_norm", "score_norm_top_k", "score_norm_cohort",
                     # The global batch and its data stream do not depend on how many
                     # devices or processes share it (global mining equals one device).
                     "num_devices", "distributed", "coordinator_address", "num_processes",
                     "process_id")
MINING = ("global", "local")
SCORE_NORMS = ("none", "snorm")
DISTRIBUTED = ("off", "on", "auto")


@dataclasses.dataclass(frozen=True)
class TripletConfig(JsonConfig):
  """Every setting of ``python -m experiments.triplet`` (flag name = field name)."""
  # --- data
  data: str = "synthetic"                 # synthetic | folder | tfds
  spatial_rank: int = 2                   # 2: images; 1: signals [T,C], 3: volumes [D,H,W,C] (synthetic)
  data_path: str = ""                     # folder: <root>/<identity>/<images>; $JAXFACE_DATA expands
  tfds_name: str = "lfw"
  tfds_split: str = "train"
  tfds_data_dir: str = ""
  synthetic_identities: int = 96
  synthetic_images: int = 12              # images per synthetic identity
  extra_synthetic: int = 0                # > 0: append this many synthetic identities to the training side
  image_size: tuple[int, ...] = (64, 64)  # H,W images are resized to when loaded (rank 1: T, 3: D,H,W)
  crop_size: tuple[int, ...] = (56, 56)   # H,W random (train) / centre (eval) crop (rank 1: T, 3: D,H,W)
  channels: int = 3                       # images: 1 or 3; signals: leads, volumes: modalities (1..12)
  num_holdout: int = 24                   # identities held out for evaluation (last by natural sort)
  holdout_seed: int = -1                  # >= 0: choose held-out identities at random with this seed
  on_bad_image: str = "warn"              # warn (skip and name the file) | raise
  drop_small: bool = False                # leave out identities with fewer than K images (LFW-style folders)
  align: str = "none"                     # folder: none | dlib (aligned chips: pretrained detector + landmarks)
  align_padding: float = 0.25             # --align=dlib: chip padding (0.25 = eyebrows to chin)
  # --- batches and loss
  P: int = 16                             # identities per batch
  K: int = 4                              # images per identity
  strategy: str = "all_active"
  margin: float = 0.2
  flip: bool = True
  brightness: float = 0.2
  contrast: float = 0.2
  scale: float = 0.0                      # random zoom, max relative change
  rotate: float = 0.0                     # random rotation, max degrees
  erase: float = 0.0                      # probability of random erasing (a noise rectangle)
  noise: float = 0.0                      # std of additive Gaussian noise on [0, 1] values
  # --- model
  init: str = "scratch"                   # scratch | dlib (fine-tune dlib's pretrained ResNet: crop >= 103, 150 native)
  embedding_dim: int = 128
  stem_width: int = 32
  stem_stride: int = 1
  widths: tuple[int, ...] = (32, 64, 128, 256)
  depths: tuple[int, ...] = (1, 1, 1, 1)
  l2_normalize: bool = True
  pool: str = "avg"                       # avg (global average) | flatten (keeps face layout)
  standardize: bool = False               # per-image standardisation of inputs (zero mean, unit std)
  cls_weight: float = 0.0                 # > 0: add a CosFace softmax loss over the training identities
  cls_margin: float = 0.35                # CosFace additive cosine margin
  cls_scale: float = 16.0                 # CosFace logit scale
  cls_type: str = "cosface"               # cosface (cosine margin) | arcface (angular margin, radians)
  cls_smoothing: float = 0.0              # label smoothing of the margin softmax, in [0, 1)
  fisher_weight: float = 0.0              # > 0: evaluate [embedding, w * Fisherfaces of the pixels] (jaxface.train.fisher)
  fisher_pca: int = 80                    # principal components before the Fisherfaces LDA
  score_norm: str = "none"                # none | snorm: cohort S-norm of held-out scores (cohort: training images)
  score_norm_top_k: int = 0               # snorm: 0 = whole cohort, k >= 2 = each image's k nearest (adaptive)
  score_norm_cohort: int = 2000           # snorm: at most this many training images (seeded subset) form the cohort
  # --- optimisation
  num_steps: int = 400
  learning_rate: float = 3e-3
  warmup_steps: int = 40
  weight_decay: float = 1e-4
  grad_clip: float = 1.0
  ema_decay: float = 0.0                  # > 0: evaluate an exponential moving average of the weights
  seed: int = 0
  ensemble: int = 1                       # > 1: train members with seeds seed, seed+1, ...; concatenate embeddings
  # --- bookkeeping
  log_every: int = 20
  checkpoint_every: int = 100
  max_to_keep: int = 2
  eval_every: int = 0                     # 0: evaluate only at the end
  eval_batch_size: int = 128
  eval_flip: bool = True                  # embed image + mirror image, average (test-time augmentation)
  eval_crops: int = 1                     # 1: centre crop; 5: centre + 4 corner crops, averaged (images only)
  roc_png: bool = True
  # --- devices and processes (jaxface.parallel)
  num_devices: int = 0                    # data-parallel devices: 0 = all (of all processes), 1 = one device
  mining: str = "global"                  # global: mine over the whole P*K batch; local: within each device's rows
  distributed: str = "off"                # off | on | auto: jax.distributed.initialize (multi-process)
  coordinator_address: str = ""           # host:port of process 0 ("" = detect: TPU pod, SLURM, ...)
  num_processes: int = 0                  # with --coordinator_address: number of processes
  process_id: int = -1                    # with --coordinator_address: this process's rank

  def __post_init__(self):
    # Tuples may arrive as lists (from JSON) or strings (from flags).
    for name in ("image_size", "crop_size", "widths", "depths"):
      v = getattr(self, name)
      if isinstance(v, str):
        v = tuple(int(t) for t in v.split(",") if t.strip())
      object.__setattr__(self, name, tuple(int(t) for t in v))

  def validate(self) -> "TripletConfig":
    """Raises ValueError naming the first bad setting."""
    def bad(name, why):
      raise ValueError(f"--{name}={getattr(self, name)!r}: {why}")
    if self.init not in INITS:
      bad("init", f"must be one of {', '.join(INITS)}")
    if self.data not in DATA_KINDS:
      bad("data", f"must be one of {', '.join(DATA_KINDS)}")
    if self.data == "folder" and not self.data_path:
      bad("data_path", "--data=folder needs --data_path=<root>/<identity>/<images>")
    if self.strategy not in STRATEGIES:
      bad("strategy", f"must be one of {', '.join(STRATEGIES)}")
    if self.on_bad_image not in ("warn", "raise"):
      bad("on_bad_image", "must be warn or raise")
    if self.align not in ("none", "dlib"):
      bad("align", "must be none or dlib")
    if self.align != "none" and self.data != "folder":
      bad("align", "needs --data=folder")
    if not 0.0 <= self.align_padding <= 2.0:
      bad("align_padding", "must be in [0, 2]")
    rank = self.spatial_rank
    if rank not in SPATIAL_RANKS:
      bad("spatial_rank", "must be 1 (signals), 2 (images) or 3 (volumes)")
    if rank != 2 and self.data != "synthetic":
      bad("data", f"--spatial_rank={rank} data comes from --data=synthetic only "
                  "(folder and tfds hold 2-D images)")
    what = SPATIAL_RANKS[rank].split()[1]
    for name in ("image_size", "crop_size"):
      v = getattr(self, name)
      if len(v) != rank or min(v) < 8:
        bad(name, f"must be {what} ({rank} entries for --spatial_rank={rank}), each >= 8")
    if rank == 1 and self.image_size[0] < 32:
      bad("image_size", "synthetic signals need T >= 32")
    if any(c > s for c, s in zip(self.crop_size, self.image_size)):
      bad("crop_size", f"must not exceed --image_size={self.image_size}")
    if rank == 2 and self.channels not in (1, 3):
      bad("channels", "must be 1 (grayscale) or 3 (RGB)")
    if rank != 2 and not 1 <= self.channels <= 12:
      bad("channels", f"must be 1..12 for {SPATIAL_RANKS[rank].split()[0]}")
    if rank == 1:
      for name in ("flip", "eval_flip"):
        if getattr(self, name):
          bad(name, f"flipping a signal reverses time, which changes the heartbeat; "
                    f"pass --no{name} with --spatial_rank=1")
    if rank != 2:
      for name in ("scale", "rotate", "erase"):
        if getattr(self, name):
          bad(name, f"is an image (2-D) augmentation; set it to 0 with --spatial_rank={rank}")
    if not (math.isfinite(self.noise) and 0 <= self.noise <= 0.5):
      bad("noise", "must be in [0, 0.5]")
    if self.P < 2:
      bad("P", "a batch needs at least 2 identities (negatives)")
    if self.K < 2:
      bad("K", "a batch needs at least 2 images per identity (positives)")
    if not (math.isfinite(self.margin) and self.margin >= 0):
      bad("margin", "must be finite and >= 0")
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      bad("learning_rate", "must be finite and > 0")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      bad("weight_decay", "must be finite and >= 0")
    if not 0 <= self.ema_decay < 1:
      bad("ema_decay", "must be in [0, 1)")
    if not 0 <= self.erase <= 1:
      bad("erase", "must be a probability in [0, 1]")
    if not 0 <= self.scale <= 0.5:
      bad("scale", "must be in [0, 0.5]")
    if not 0 <= self.rotate <= 45:
      bad("rotate", "must be in [0, 45] degrees")
    for name in ("brightness", "contrast", "grad_clip"):
      v = getattr(self, name)
      if not (math.isfinite(v) and v >= 0):
        bad(name, "must be finite and >= 0")
    if self.num_steps < 0:
      bad("num_steps", "must be >= 0 (0: evaluate the initial weights only)")
    if not (math.isfinite(self.cls_weight) and self.cls_weight >= 0):
      bad("cls_weight", "must be finite and >= 0")
    if not (math.isfinite(self.cls_margin) and 0 <= self.cls_margin < 1):
      bad("cls_margin", "must be in [0, 1)")
    if not (math.isfinite(self.cls_scale) and self.cls_scale > 0):
      bad("cls_scale", "must be finite and > 0")
    if self.cls_type not in ("cosface", "arcface"):
      bad("cls_type", "must be cosface or arcface")
    if not (math.isfinite(self.cls_smoothing) and 0 <= self.cls_smoothing < 1):
      bad("cls_smoothing", "must be in [0, 1)")
    if not (math.isfinite(self.fisher_weight) and self.fisher_weight >= 0):
      bad("fisher_weight", "must be finite and >= 0 (0: off)")
    if self.fisher_pca < 1:
      bad("fisher_pca", "must be >= 1")
    if self.score_norm not in SCORE_NORMS:
      bad("score_norm", f"must be one of {', '.join(SCORE_NORMS)}")
    if self.score_norm_top_k < 0 or self.score_norm_top_k == 1:
      bad("score_norm_top_k", "must be 0 (whole cohort) or >= 2")
    if self.score_norm_cohort < 2:
      bad("score_norm_cohort", "must be >= 2")
    if self.score_norm_top_k > self.score_norm_cohort:
      bad("score_norm_top_k", f"must be <= score_norm_cohort ({self.score_norm_cohort})")
    for name in ("log_every", "checkpoint_every", "eval_batch_size",
                 "max_to_keep", "synthetic_identities"):
      if getattr(self, name) < 1:
        bad(name, "must be >= 1")
    if self.synthetic_images < 2:
      bad("synthetic_images", "must be >= 2")
    if self.extra_synthetic < 0:
      bad("extra_synthetic", "must be >= 0 (0: off)")
    if self.extra_synthetic and (self.data == "synthetic" or rank != 2):
      bad("extra_synthetic", "adds synthetic faces to real 2-D image data (--data=folder or tfds)")
    if self.warmup_steps < 0 or self.eval_every < 0:
      bad("warmup_steps" if self.warmup_steps < 0 else "eval_every", "must be >= 0")
    if self.num_holdout < 2:
      bad("num_holdout", "evaluation needs at least 2 held-out identities")
    if self.eval_crops not in (1, 5):
      bad("eval_crops", "must be 1 (centre crop) or 5 (centre and 4 corners)")
    if self.eval_crops == 5 and rank != 2:
      bad("eval_crops", f"corner crops are an image (2-D) test-time augmentation; use 1 with "
                        f"--spatial_rank={rank}")
    if not 1 <= self.ensemble <= 16:
      bad("ensemble", "must be in 1..16")
    if self.mining not in MINING:
      bad("mining", f"must be one of {', '.join(MINING)}")
    if self.num_devices < 0:
      bad("num_devices", "must be >= 0 (0: all devices)")
    if self.distributed not in DISTRIBUTED:
      bad("distributed", f"must be one of {', '.join(DISTRIBUTED)}")
    if self.init == "dlib":
      if rank != 2:
        bad("init", "dlib's ResNet embeds 2-D images; use --spatial_rank=2")
      if min(self.crop_size) < DLIB_MIN_SIZE:
        bad("crop_size", f"--init=dlib needs a crop of at least {DLIB_MIN_SIZE}x{DLIB_MIN_SIZE} "
                         f"(150,150 matches the pretrained weights); raise --image_size and --crop_size")
      if self.embedding_dim != 128:
        bad("embedding_dim", "--init=dlib keeps dlib's 128-D output layer; use --embedding_dim=128")
      if self.standardize:
        bad("standardize", "--init=dlib uses dlib's own input scaling; use --nostandardize")
    else:
      self.encoder_spec()  # validates the scratch architecture
    return self

  def dlib_spec(self):
    """The :class:`DlibResNetSpec` of an ``init="dlib"`` run (dlib's architecture, our l2 choice)."""
    from jaxface.models.dlib_resnet import DlibResNetSpec
    return DlibResNetSpec(l2_normalize=self.l2_normalize)

  def encoder_spec(self) -> EncoderSpec:
    from jaxface.models.encoder import EncoderSpec
    return EncoderSpec(spatial_rank=self.spatial_rank, in_channels=self.channels,
                       embedding_dim=self.embedding_dim, stem_width=self.stem_width, stem_stride=self.stem_stride,
                       widths=self.widths, depths=self.depths, l2_normalize=self.l2_normalize,
                       pool=self.pool, input_size=tuple(self.crop_size))
