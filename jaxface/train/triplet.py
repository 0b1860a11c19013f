"""Triplet-loss training of the face encoder: state, pure step, and ``run``.

``run(config, workdir)`` loads the data, splits identities into train and
held-out, trains with identity-balanced P x K batches, checkpoints, always
resumes from the latest checkpoint in ``workdir``, and finally evaluates on the
held-out identities (``<workdir>/metrics.json`` and ``roc.png``).

The data stream is a pure function of (seed, step) and the augmentation key is
``fold_in(seed key, step)``, so a run killed and resumed replays exactly the
batches an uninterrupted run sees and ends with bitwise-equal parameters on the
same machine and XLA build.

With several devices (``cfg.num_devices``, ``jaxface.parallel``) the batch is
sharded over a ``("data",)`` mesh and the state replicated; with several
processes (``jax.distributed``) each process loads only its rows of every
batch, all processes checkpoint together, and process 0 alone prints and
writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxface import checkpointing
from jaxface import metrics as metrics_lib
from jaxface import paths
from jaxface.data import augment as augment_lib
from jaxface.data import sampler as sampler_lib
from jaxface.data import source as source_lib
from jaxface.losses import triplet_loss
from jaxface.models import encoder as encoder_lib
from jaxface.train import heads
from jaxface.train.config import RESUMABLE_CHANGES, TripletConfig

log = logging.getLogger(__name__)

State = dict[str, Any]


class TrainingError(RuntimeError):
  """Training stopped: non-finite loss or collapsed embeddings."""


# --------------------------------------------------------------------------- data


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def load_source(cfg: TripletConfig, printer: Callable[[str], None] = _stderr) -> source_lib.ImageSource:
  """Builds the configured source: ``[N, H, W, C] uint8`` images with labels.

  With ``cfg.spatial_rank`` 1 or 3 the samples are synthetic signals
  ``[N, T, C]`` or volumes ``[N, D, H, W, C]``. ``printer`` hears which images
  alignment found no face in.
  """
  size = tuple(cfg.image_size)
  if cfg.data == "synthetic" and cfg.spatial_rank != 2:
    from jaxface.data import synthetic_nd
    if cfg.spatial_rank == 1:
      return synthetic_nd.synthetic_signals(cfg.synthetic_identities, cfg.synthetic_images,
                                            length=size[0], channels=cfg.channels, seed=cfg.seed)
    return synthetic_nd.synthetic_volumes(cfg.synthetic_identities, cfg.synthetic_images,
                                          size=size, channels=cfg.channels, seed=cfg.seed)
  if cfg.spatial_rank != 2:
    raise ValueError(f"--spatial_rank={cfg.spatial_rank} needs --data=synthetic, got {cfg.data}")
  if cfg.data == "synthetic":
    from jaxface.data import synthetic
    if size[0] != size[1]:
      raise ValueError(f"--image_size={size}: synthetic faces are square")
    return synthetic.synthetic_faces(cfg.synthetic_identities, cfg.synthetic_images,
                                     image_size=size[0], channels=cfg.channels, seed=cfg.seed)
  if cfg.data == "folder":
    from jaxface.data import folder
    src = folder.ImageFolderSource(paths.expand(cfg.data_path), image_size=size,
                                   channels=cfg.channels, on_error=cfg.on_bad_image,
                                   align=cfg.align, align_padding=cfg.align_padding)
    if cfg.align != "none":
      printer(f"aligned faces (--align={cfg.align}): no face found in {len(src.align_missed)} of "
              f"{len(src)} images (centre crop used)" + "".join(f"\n  {p}" for p in src.align_missed))
    return src
  from jaxface.data import tfds_source
  return tfds_source.TfdsSource(cfg.tfds_name, split=cfg.tfds_split,
                                data_dir=paths.expand(cfg.tfds_data_dir) or None,
                                image_size=size, channels=cfg.channels)


def drop_small_identities(cfg: TripletConfig, source: source_lib.ImageSource,
                          printer: Callable[[str], None] = lambda s: None) -> source_lib.ImageSource:
  """``cfg.drop_small``: ``source`` without its identities of fewer than K images.

  Says (through ``printer``) how many identities and images were left out and
  how many remain.

  Raises:
    ValueError: fewer than P training plus ``num_holdout`` held-out identities remain.
  """
  total_ids, total_images = source.num_identities, len(source)
  kept, dropped = source_lib.keep_identities_with(source, cfg.K)
  printer(f"--drop_small: left out {dropped['identities']} of {total_ids} identities "
          f"({dropped['images']} of {total_images} images) with fewer than --K={cfg.K} images; "
          f"{kept.num_identities} identities ({len(kept)} images) remain")
  if kept.num_identities < cfg.P + cfg.num_holdout:
    raise ValueError(
        f"--drop_small: only {kept.num_identities} of {total_ids} identities have at least "
        f"--K={cfg.K} images; training needs --P={cfg.P} identities plus --num_holdout="
        f"{cfg.num_holdout} held out ({cfg.P + cfg.num_holdout}). Lower --K, --P or "
        f"--num_holdout, or add images")
  return kept


def prepare_data(cfg: TripletConfig, source: source_lib.ImageSource | None = None,
                 printer: Callable[[str], None] = lambda s: None):
  """Loads and splits the data and checks it fits P x K before any compute.

  ``source``: already loaded data (the members of an ensemble share the data
  of the ensemble's seed; synthetic data depends on the seed). ``printer``
  hears what ``cfg.drop_small`` left out.

  Returns:
    (train source, held-out source, sampler over the train source).
  """
  source = load_source(cfg, printer) if source is None else source
  if cfg.drop_small:
    source = drop_small_identities(cfg, source, printer)
  if len(source.identity_names) < 2:
    raise ValueError(f"the data has {len(source.identity_names)} identities; training needs >= 2")
  seed = cfg.holdout_seed if cfg.holdout_seed >= 0 else None
  train_src, holdout_src = source_lib.split_by_identity(source, num_holdout=cfg.num_holdout, seed=seed)
  if cfg.extra_synthetic > 0:
    from jaxface.data import mix  # procedural identities appended to the training side only
    train_src = mix.with_synthetic(train_src, cfg.extra_synthetic, cfg.synthetic_images,
                                   seed=cfg.seed)
  try:
    source_lib.validate_pk(train_src, cfg.P, cfg.K, drop_small=cfg.drop_small)
  except source_lib.SmallIdentitiesError as e:
    raise ValueError(
        f"--K={e.K} is larger than the number of images of {len(e.names)} of {e.num_identities} "
        f"training identities: {e.listing}. Lower --K, or pass --drop_small to leave those "
        f"identities out") from None
  sampler = sampler_lib.PKSampler(train_src.labels, cfg.P, cfg.K, seed=cfg.seed)
  return train_src, holdout_src, sampler


# --------------------------------------------------------------------------- state


def make_optimizer(cfg: TripletConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.num_steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * 0.01)
  # Decay only kernels: decaying BatchNorm scales and biases hurts small nets.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask))


def model_apply(cfg: TripletConfig) -> Callable:
  """The forward pass of the configured model, with the encoder API.

  Returns:
    ``fwd(graphdef, params, rest, x, train) -> (emb [B, D] float32, rest)``
    where ``x`` is ``[B, *spatial, C] float32`` in [0, 1] (the augmentation
    pipeline's output). ``init="dlib"`` replicates grayscale to RGB and
    applies dlib's input scaling; ``standardize`` standardises each sample.
  """
  if cfg.init == "dlib":
    from jaxface.models import dlib_resnet

    def fwd_dlib(graphdef, params, rest, x, train):
      if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)  # dlib's net takes RGB; a gray face is R = G = B
      return dlib_resnet.apply(graphdef, params, rest, dlib_resnet.preprocess_unit(x), train)

    return fwd_dlib

  def fwd(graphdef, params, rest, x, train):
    if cfg.standardize:
      x = heads.standardize(x)
    return encoder_lib.apply(graphdef, params, rest, x, train)

  return fwd


def model_extras(cfg: TripletConfig, num_classes: int) -> dict:
  """What rebuilds the model beyond the config: saved with every checkpoint.

  ``dlib_spec``: :meth:`DlibResNetSpec.to_dict` of an ``init="dlib"`` run;
  ``num_classes``: training identities of the CosFace head (0 without one).
  """
  return {"dlib_spec": cfg.dlib_spec().to_dict() if cfg.init == "dlib" else None,
          "num_classes": int(num_classes) if cfg.cls_weight > 0 else 0}


def _split_saved(saved: dict) -> tuple[dict, dict]:
  """A checkpoint's config dict -> (TripletConfig fields, model extras)."""
  saved = dict(saved)
  extras = saved.pop("model_extras", None) or {}
  return saved, extras


def _with_sharding(tree, mesh=None):
  """Restore target whose leaves all carry a sharding (abstractly built leaves have none).

  Without a mesh every leaf lives on the first device; with one, every leaf is
  replicated over the mesh (every process restores its own copies).
  """
  if mesh is None:
    # local_devices()[0] is devices()[0] in a single process, and addressable in any.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  else:
    from jaxface import parallel
    device = parallel.replicated(mesh)

  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct) and (x.sharding is None or mesh is not None):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
    return x

  return jax.tree.map(leaf, checkpointing.abstract_like(tree))


def init_state(cfg: TripletConfig, *, num_classes: int = 0, dlib_spec: dict | None = None
               ) -> tuple[nnx.GraphDef, optax.GradientTransformation, State]:
  """Fresh model, optimizer and train state from ``cfg.seed``.

  Args:
    cfg: the config. ``init="scratch"`` builds a random encoder;
      ``init="dlib"`` starts from dlib's pretrained weights.
    num_classes: training identities, for the CosFace head (``cfg.cls_weight > 0``).
    dlib_spec: with ``init="dlib"``, a saved ``DlibResNetSpec.to_dict()``:
      build only the shapes (a restore target) without loading the
      pretrained weights.

  Returns:
    (graphdef, optimizer, state) where state is a pytree dict with ``step``
    (int32), ``params``, ``rest`` (BatchNorm statistics; empty for dlib),
    ``opt_state``, ``rng`` (uint32 key data), ``bad_step`` (int32, -1 while
    all losses were finite), ``ema`` when kept and ``cls`` (``[D, C]``
    float32 CosFace prototypes) with a CosFace head.
  """
  if cfg.init == "dlib":
    from jaxface.models import dlib_resnet
    if dlib_spec is not None:
      spec = dlib_resnet.DlibResNetSpec.from_dict(dlib_spec)
      model = nnx.eval_shape(lambda: dlib_resnet.build_dlib_resnet(spec))
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    else:
      from jaxface import pretrained
      enc = pretrained.face_encoder(fold_affine=False,
                                    spec_overrides={"l2_normalize": cfg.l2_normalize})
      graphdef, params, rest = enc.graphdef, enc.params, enc.rest
  else:
    model = encoder_lib.build_encoder(cfg.encoder_spec(), seed=cfg.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = make_optimizer(cfg)
  trainable = params
  cls = None
  if cfg.cls_weight > 0:
    cls = heads.init_cosface_weights(jax.random.key(cfg.seed + 2), cfg.embedding_dim, num_classes)
    trainable = (params, cls)
  abstract = dlib_spec is not None
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "rest": rest,
      "opt_state": jax.eval_shape(tx.init, trainable) if abstract else tx.init(trainable),
      "rng": jax.random.key_data(jax.random.key(cfg.seed + 1)),
      "bad_step": jnp.full((), -1, jnp.int32),
  }
  if cls is not None:
    state["cls"] = cls
  if cfg.ema_decay > 0:
    state["ema"] = params if abstract else jax.tree.map(jnp.copy, params)
  return graphdef, tx, state


def eval_params(state: State) -> nnx.State:
  """The parameters to evaluate with: the moving average when kept, else the live ones."""
  return state.get("ema", state["params"])


def make_loss_fn(graphdef: nnx.GraphDef, cfg: TripletConfig) -> Callable:
  """The training loss of one batch (on one device, or global under jit).

  Returns:
    ``loss_fn(trainable, rest, x, labels) -> (loss, (aux, new_rest, emb))``:
    ``trainable`` is ``params`` or ``(params, cls)`` with a CosFace head,
    ``x`` the augmented ``[B, *crop, C] float32`` batch, ``labels`` ``[B]
    int32``; ``loss`` ``[] float32``, ``aux`` the triplet (and CosFace)
    metrics, ``new_rest`` the BatchNorm statistics after this batch, ``emb``
    ``[B, D] float32``.
  """
  fwd = model_apply(cfg)
  use_cls = cfg.cls_weight > 0

  def loss_fn(trainable, rest, x, labels):
    params = trainable[0] if use_cls else trainable
    emb, new_rest = fwd(graphdef, params, rest, x, True)
    loss, aux = triplet_loss(emb, labels, margin=cfg.margin, strategy=cfg.strategy)
    aux = dict(aux)
    if use_cls:
      cls_loss, cls_acc = heads.margin_softmax_loss(
          emb, trainable[1], labels, kind=cfg.cls_type, margin=cfg.cls_margin,
          scale=cfg.cls_scale, smoothing=cfg.cls_smoothing)
      aux["cls_loss"], aux["cls_acc"] = cls_loss, cls_acc
      loss = loss + cfg.cls_weight * cls_loss
    return loss, (aux, new_rest, emb)

  return loss_fn


def make_grad_fn(graphdef: nnx.GraphDef, cfg: TripletConfig, mesh=None) -> Callable:
  """Loss, metrics and gradients of one batch, optionally data-parallel on ``mesh``.

  Without a mesh, or with ``cfg.mining == "global"``, this is plain
  ``value_and_grad`` of :func:`make_loss_fn`; under a jit whose batch is
  sharded on the mesh's ``"data"`` axis and whose parameters are replicated,
  XLA partitions the forward pass by rows and gathers what the loss needs,
  so every anchor is mined against the whole global batch and BatchNorm uses
  global batch statistics: the result is the one-device result (up to
  float32 reduction order).

  With ``cfg.mining == "local"`` (and a mesh) each device runs the loss on
  its own rows only (``shard_map``): triplets are mined within the device's
  identities, BatchNorm normalises with the device's own batch statistics
  (as PyTorch DDP without SyncBatchNorm), and the loss is the mean of the
  per-device losses, whose gradient is the mean of the per-device gradients.
  The new BatchNorm running statistics and the metrics are device means
  (``num_valid``: a sum).

  Returns:
    ``grad_fn(trainable, rest, x, labels) -> (loss, aux, new_rest, emb, grads)``
    with the shapes of :func:`make_loss_fn`; ``grads`` like ``trainable``.
  """
  loss_fn = make_loss_fn(graphdef, cfg)
  if mesh is not None and cfg.mining == "local":
    from jax.sharding import PartitionSpec as P
    from jaxface import parallel
    device_loss_fn = loss_fn

    def per_device(trainable, rest, x, labels):
      loss, (aux, new_rest, emb) = device_loss_fn(trainable, rest, x, labels)
      mean = lambda t: jax.tree.map(lambda v: jax.lax.pmean(v, parallel.DATA), t)
      aux = {k: (jax.lax.psum(v, parallel.DATA) if k == "num_valid" else mean(v))
             for k, v in aux.items()}
      return mean(loss), (aux, mean(new_rest), emb)

    rows = P(parallel.DATA)
    # check_vma=False: per-device (pmap-like) semantics. The triplet loss's
    # while_loop starts from constants and carries row-dependent values, which
    # the varying-axes type check rejects; the outputs are made replicated by
    # the pmeans above, and the gradient of the replicated inputs is the sum
    # of per-device cotangents, i.e. the mean of per-device gradients
    # (tests/test_parallel_triplet.py checks it against separate per-shard runs).
    loss_fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), rows, rows),
                            out_specs=(P(), (P(), P(), rows)), check_vma=False)
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

  def grad_fn(trainable, rest, x, labels):
    (loss, (aux, new_rest, emb)), grads = value_and_grad(trainable, rest, x, labels)
    return loss, aux, new_rest, emb, grads

  return grad_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    cfg: TripletConfig, mesh=None) -> Callable[[State, dict], tuple[State, dict]]:
  """Builds the pure ``train_step(state, batch) -> (state, metrics)``.

  ``batch`` is ``{"images": [P*K, H, W, C] uint8, "labels": [P*K] int32}``
  (``[P*K, T, C]`` or ``[P*K, D, H, W, C]`` for signals or volumes).
  The returned function is jitted with the state donated. A step whose loss
  or gradients are not finite leaves the state as it was and records its
  number in ``state["bad_step"]``; the host stops at the next log step, so a
  NaN never reaches the parameters or a checkpoint.

  With a ``mesh`` (``jaxface.parallel.make_mesh``) the batch is sharded over
  its ``"data"`` axis, the state is replicated (in and out) and
  ``cfg.mining`` picks global or per-device mining (:func:`make_grad_fn`).
  Augmentation is computed on the global batch either way: its random
  numbers do not depend on the sharding (threefry is partitionable).
  """
  crop = tuple(cfg.crop_size)
  use_cls = "cls" if cfg.cls_weight > 0 else None
  grad_fn = make_grad_fn(graphdef, cfg, mesh)

  def train_step(state: State, batch: dict) -> tuple[State, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    x = augment_lib.augment(rng, augment_lib.to_float(batch["images"]), crop_size=crop,
                            flip=cfg.flip, brightness=cfg.brightness, contrast=cfg.contrast,
                            scale=cfg.scale, rotate=cfg.rotate, erase=cfg.erase,
                            noise=cfg.noise)
    trainable = (state["params"], state["cls"]) if use_cls else state["params"]
    loss, aux, new_rest, emb, grads = grad_fn(trainable, state["rest"], x, batch["labels"])
    updates, new_opt = tx.update(grads, state["opt_state"], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    new_params = new_trainable[0] if use_cls else new_trainable
    grad_norm = optax.tree.norm(grads)
    # Masked strategies can turn NaN distances into a zero loss, so the
    # embeddings are checked too.
    ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(emb))
          & (state["bad_step"] < 0))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, state["params"]),
        "rest": keep(new_rest, state["rest"]),
        "opt_state": keep(new_opt, state["opt_state"]),
        "rng": state["rng"],
        "bad_step": jnp.where(ok | (state["bad_step"] >= 0), state["bad_step"], state["step"]),
    }
    if use_cls:
      new_state["cls"] = keep(new_trainable[1], state["cls"])
    if "ema" in state:
      # Polyak averaging: the average of recent weights generalises better than
      # the last iterate when few identities let the net memorise quickly.
      d = cfg.ema_decay
      ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], new_state["params"])
      new_state["ema"] = keep(ema, state["ema"])
    metrics = {
        "train/loss": loss,
        "train/active_fraction": aux["active_fraction"],
        "train/d_ap": aux["mean_d_ap"],
        "train/d_an": aux["mean_d_an"],
        "train/num_valid": jnp.asarray(aux["num_valid"], jnp.float32),
        "train/grad_norm": grad_norm,
        # Mean per-dimension variance across the batch: ~0 means all embeddings are equal.
        "train/embedding_spread": jnp.mean(jnp.var(emb, axis=0)) * emb.shape[-1],
    }
    if use_cls:
      metrics["train/cls_loss"] = aux["cls_loss"]
      metrics["train/cls_acc"] = aux["cls_acc"]
    return new_state, metrics

  if mesh is None:
    return jax.jit(train_step, donate_argnums=(0,))
  from jaxface import parallel
  replicated = parallel.replicated(mesh)
  return jax.jit(train_step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_embed_fn(graphdef: nnx.GraphDef, cfg: TripletConfig):
  """Jitted eval-mode ``embed(params, rest, images [B,H,W,C] uint8) -> [B, D] float32``.

  Images may be signals ``[B, T, C]`` or volumes ``[B, D, H, W, C]`` too.
  With ``cfg.eval_flip`` the embedding is that of the image plus its mirror
  image (renormalised), the usual test-time augmentation for faces; the
  mirror is along the last spatial axis (left-right for volumes as well).
  With ``cfg.eval_crops=5`` the centre and the 4 corner crops are averaged too.
  """
  crop = tuple(cfg.crop_size)
  fwd = model_apply(cfg)

  def embed_view(params, rest, x):
    emb, _ = fwd(graphdef, params, rest, x, False)
    if cfg.eval_flip:
      # A face and its mirror image are the same person: averaging both views
      # removes the left/right bias the encoder learned from one view.
      flipped, _ = fwd(graphdef, params, rest, jnp.flip(x, axis=-2), False)
      emb = emb + flipped
    return emb

  @jax.jit
  def embed(params, rest, images):
    x = augment_lib.to_float(images)
    if cfg.eval_crops == 5:
      # Centre and the 4 corner crops: averages out where the face sits in the
      # crop, as the random training crops taught the net to tolerate.
      (h, w), (ch, cw) = x.shape[1:3], crop
      emb = 0
      for top, left in (((h - ch) // 2, (w - cw) // 2), (0, 0), (0, w - cw), (h - ch, 0),
                        (h - ch, w - cw)):
        emb = emb + embed_view(params, rest, x[:, top:top + ch, left:left + cw])
    else:
      emb = embed_view(params, rest, augment_lib.center_crop(x, crop))
    views = (2 if cfg.eval_flip else 1) * cfg.eval_crops
    if views == 1:
      return emb
    return encoder_lib.l2_normalize(emb) if cfg.l2_normalize else emb / views

  return embed


def embed_source(embed, params, rest, source: source_lib.ImageSource, batch_size: int,
                 indices: np.ndarray | None = None) -> np.ndarray:
  """Embeds every image of ``source`` (or its rows ``indices``) in fixed-size batches
  (last one padded: one compile).

  Returns:
    ``[N, D]`` float32 embeddings on the host (N = len(source) or len(indices)).
  """
  rows = np.arange(len(source)) if indices is None else np.asarray(indices)
  n = rows.shape[0]
  out = []
  for start in range(0, n, batch_size):
    idx = rows[start:start + batch_size]
    images = source.get(idx)
    if len(idx) < batch_size:
      pad = np.zeros((batch_size - len(idx),) + images.shape[1:], images.dtype)
      images = np.concatenate([images, pad])
    out.append(np.asarray(embed(params, rest, images))[: len(idx)])
  return np.concatenate(out)


# --------------------------------------------------------------------------- evaluation


def cohort_indices(num_train: int, cfg: TripletConfig) -> np.ndarray:
  """Rows of the training source forming the S-norm cohort: all of them, or a seeded
  subset of ``cfg.score_norm_cohort`` (sorted) when there are more. ``[M] int64``."""
  if num_train <= cfg.score_norm_cohort:
    return np.arange(num_train)
  rng = np.random.default_rng((cfg.seed, 7))
  return np.sort(rng.choice(num_train, cfg.score_norm_cohort, replace=False))


def embed_for_evaluation(embed, params, rest, holdout: source_lib.ImageSource,
                         train: source_lib.ImageSource | None, cfg: TripletConfig
                         ) -> tuple[np.ndarray, np.ndarray | None]:
  """Held-out embeddings ``[N, D] float32`` and, with ``cfg.score_norm`` on, the cohort's
  (the training rows `cohort_indices` picks) ``[M, D] float32``; else None."""
  emb = embed_source(embed, params, rest, holdout, cfg.eval_batch_size)
  if cfg.score_norm == "none":
    return emb, None
  if train is None:
    raise ValueError("--score_norm: evaluation needs the training images as the cohort")
  return emb, embed_source(embed, params, rest, train, cfg.eval_batch_size,
                           cohort_indices(len(train), cfg))


def evaluate(embed, state: State, holdout: source_lib.ImageSource, cfg: TripletConfig,
             workdir: str | None, train: source_lib.ImageSource | None = None) -> dict:
  """Verification and identification on held-out identities; writes metrics.json and roc.png.

  With ``cfg.score_norm="snorm"`` the training images (``train``, required
  then) are embedded too, as the cohort.
  """
  emb, cohort = embed_for_evaluation(embed, eval_params(state), state["rest"], holdout, train,
                                     cfg)
  return evaluate_embeddings(emb, holdout, cfg, int(state["step"]), workdir, cohort=cohort,
                             train=train)


def evaluate_embeddings(emb: np.ndarray, holdout: source_lib.ImageSource, cfg: TripletConfig,
                        step: int, workdir: str | None, *, cohort: np.ndarray | None = None,
                        train: source_lib.ImageSource | None = None) -> dict:
  """Metrics of ``[N, D] float32`` held-out embeddings; writes metrics.json and roc.png to ``workdir``.

  Args:
    emb: ``[N, D] float32``, one row per ``holdout`` image.
    cohort: ``[M, D] float32`` embeddings of the training images
      ``cohort_indices`` picks; required with ``cfg.score_norm="snorm"``.
    train: the training source (Fisherfaces are fitted on it); None: reloaded
      from ``cfg``.
  """
  if not np.all(np.isfinite(emb)):
    raise TrainingError("held-out embeddings are not finite")
  pair_distance = None
  if cfg.score_norm == "snorm":
    if cohort is None:
      raise ValueError("--score_norm=snorm: no cohort embeddings were given")
    if not np.all(np.isfinite(cohort)):
      raise TrainingError("cohort (training image) embeddings are not finite")
    pair_distance = _snorm_scores(emb, cohort, holdout, cfg, train)
  elif cfg.fisher_weight > 0:
    emb = _fuse_fisherfaces(emb, holdout, cfg, train)
  results, roc = metrics_lib.evaluate_embeddings(emb, holdout.labels, seed=cfg.seed,
                                                 pair_distance=pair_distance)
  # NaN (e.g. TAR at a FAR finer than 1/#negative pairs) is stored as JSON null.
  results = {k: (float(v) if np.isfinite(v) else None) for k, v in results.items()}
  results["eval/step"] = int(step)
  if workdir:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    if cfg.roc_png:
      metrics_lib.save_roc_png(roc["fpr"], roc["tpr"], os.path.join(workdir, "roc.png"),
                               title=f"held-out ROC, step {int(step)}",
                               auc=results["eval/auc"])
  return results


def _training_split(holdout: source_lib.ImageSource, cfg: TripletConfig,
                    train: source_lib.ImageSource | None, flag: str) -> source_lib.ImageSource:
  if train is not None:
    return train
  train, check = prepare_data(cfg)[:2]
  if list(check.identity_names) != list(holdout.identity_names) or len(check) != len(holdout):
    raise ValueError(f"--{flag}: the training split reloaded from the config does not "
                     "match the held-out identities being evaluated")
  return train


def _fuse_fisherfaces(emb: np.ndarray, holdout: source_lib.ImageSource, cfg: TripletConfig,
                      train: source_lib.ImageSource | None = None) -> np.ndarray:
  """``[N, D]`` -> ``[N, D + k]``: appends ``cfg.fisher_weight`` times the Fisherfaces projection
  (fitted on the training identities' images, reloaded from ``cfg`` unless given, with
  ``extra_synthetic`` the synthetic ones too) of each held-out image."""
  from jaxface.train import fisher
  train_src = _training_split(holdout, cfg, train, "fisher_weight")
  return fisher.fuse(emb, train_src.get(np.arange(len(train_src))), train_src.labels,
                     holdout.get(np.arange(len(holdout))), weight=cfg.fisher_weight,
                     num_pca=cfg.fisher_pca)


def _snorm_scores(emb: np.ndarray, cohort: np.ndarray, holdout: source_lib.ImageSource,
                  cfg: TripletConfig, train: source_lib.ImageSource | None) -> Callable:
  """``pair_distance(i, j) -> [M]`` for `metrics.evaluate_embeddings`: the S-normed squared
  distance of held-out rows i, j, plus ``cfg.fisher_weight`` times the S-normed distance of
  their Fisherfaces projections (cohort: the same training images' projections)."""
  from jaxface.recognition import score_norm
  if cfg.score_norm_top_k > len(cohort):
    raise ValueError(f"--score_norm_top_k={cfg.score_norm_top_k}: the cohort has only "
                     f"{len(cohort)} training images")
  feats = [(1.0, emb, cohort)]
  if cfg.fisher_weight > 0:
    from jaxface.train import fisher
    train_src = _training_split(holdout, cfg, train, "fisher_weight")
    train_images = train_src.get(np.arange(len(train_src)))
    model = fisher.fit(train_images, train_src.labels, num_pca=cfg.fisher_pca)
    feats.append((cfg.fisher_weight,
                  fisher.project(model, holdout.get(np.arange(len(holdout)))),
                  fisher.project(model, train_images[cohort_indices(len(train_src), cfg)])))
  terms = []
  for weight, x, c in feats:
    mean, std = (np.asarray(a) for a in score_norm.cohort_stats(x, c, top_k=cfg.score_norm_top_k))
    terms.append((weight, x, mean, std))

  def pair_distance(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    total = np.zeros(i.shape[0], np.float64)
    for weight, x, mean, std in terms:
      d = metrics_lib.pair_distances(x, i, j)
      total += weight * np.asarray(score_norm.snorm(d, mean[i], std[i], mean[j], std[j]),
                                   np.float64)
    return total

  return pair_distance


# --------------------------------------------------------------------------- loop


class _Batches:
  """Host-side batch assembly, one step ahead in a thread so decoding overlaps compute.

  With a mesh, this process loads only its rows of each global batch (the
  sampler gives every process the same global indices) and the rows are
  assembled into one batch-sharded global array.
  """

  def __init__(self, source, sampler, mesh=None):
    from concurrent.futures import ThreadPoolExecutor
    self.source, self.sampler, self.mesh = source, sampler, mesh
    self.rows = slice(None)
    if mesh is not None:
      from jaxface import parallel
      self.rows = parallel.process_rows(mesh, sampler.batch_size)
    self.pool = ThreadPoolExecutor(max_workers=1)
    self.pending: dict[int, Any] = {}

  def _make(self, step: int) -> dict:
    idx = self.sampler.batch_indices(step)[self.rows]
    return {"images": self.source.get(idx), "labels": self.source.labels[idx].astype(np.int32)}

  def get(self, step: int) -> dict:
    fut = self.pending.pop(step, None)
    batch = fut.result() if fut is not None else self._make(step)
    self.pending[step + 1] = self.pool.submit(self._make, step + 1)
    if self.mesh is not None:
      from jaxface import parallel
      batch = parallel.global_batch(self.mesh, batch, self.sampler.batch_size)
    return batch

  def close(self):
    self.pool.shutdown(wait=False, cancel_futures=True)


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run(cfg: TripletConfig, workdir: str, *, stop_after: int | None = None,
        printer: Callable[[str], None] = _stderr) -> dict:
  """Trains (resuming from ``workdir``) and evaluates on held-out identities.

  Args:
    cfg: the experiment config (validated here).
    workdir: run directory: checkpoints, ``config.json``, ``train_log.jsonl``,
      ``metrics.json``, ``roc.png``.
    stop_after: stop (after checkpointing) once this step is reached, as a
      pre-empted job would; used by the resume tests.
    printer: where progress lines go (default: stderr).

  Returns:
    The final ``eval/...`` metrics (empty when stopped early).
  """
  cfg.validate()
  mesh = resolve_mesh(cfg)
  if jax.process_index() != 0:
    printer = lambda s: None  # one process speaks for all
  if cfg.ensemble > 1:
    return _run_ensemble(cfg, workdir, stop_after, printer, mesh)
  return _run_single(cfg, workdir, stop_after, printer, {}, mesh=mesh)


def check_parallel_batch(cfg: TripletConfig, num_devices: int) -> None:
  """Checks that the P x K batch splits over ``num_devices`` devices as ``cfg.mining`` needs.

  Global mining needs P*K rows to split evenly. Local mining mines within
  each device's rows, so each device must hold whole identities: the sampler
  lays the batch out identity-major (K rows per identity), so P must be a
  multiple of the device count, and each device needs >= 2 identities to
  have negatives.

  Raises:
    ValueError: naming --P/--K, the device count and the fix.
  """
  n = int(num_devices)
  if n <= 1:
    return
  if cfg.mining == "local":
    if cfg.P % n:
      raise ValueError(
          f"--P={cfg.P}: --mining=local gives each of the {n} devices whole identities, so P "
          f"must be a multiple of {n} (or use --mining=global, or fewer --num_devices)")
    if cfg.P // n < 2:
      raise ValueError(
          f"--P={cfg.P}: --mining=local on {n} devices leaves {cfg.P // n} identity per device, "
          f"so no negatives; use P >= {2 * n} or --mining=global")
  elif (cfg.P * cfg.K) % n:
    raise ValueError(f"--P={cfg.P} x --K={cfg.K} = {cfg.P * cfg.K} images per batch do not split "
                     f"evenly over {n} devices; make P*K a multiple of {n} or set --num_devices")


def resolve_mesh(cfg: TripletConfig):
  """The data-parallel mesh of ``cfg.num_devices``, or None for the one-device path.

  One device in one process (``--num_devices=1``, or 0 on a one-device
  machine) keeps the plain single-device step, numerically as before.

  Raises:
    ValueError: too many devices asked for, or a batch that does not split.
  """
  from jaxface import parallel
  if jax.process_count() == 1 and (cfg.num_devices == 1 or jax.device_count() == 1):
    if cfg.num_devices > jax.device_count():
      parallel.make_mesh(cfg.num_devices)  # raises, naming the device count
    return None
  mesh = parallel.make_mesh(cfg.num_devices)
  check_parallel_batch(cfg, mesh.devices.size)
  return mesh


def _run_ensemble(cfg: TripletConfig, workdir: str, stop_after: int | None,
                  printer: Callable[[str], None], mesh=None) -> dict:
  """Trains ``cfg.ensemble`` members in ``<workdir>/member<i>`` (seeds seed + i) and evaluates
  their concatenated embeddings.

  Each member is an ordinary run (own checkpoints, resumable, own metrics.json);
  with unit-norm members the concatenation divided by sqrt(#members) is unit
  norm and its squared distance is the members' mean squared distance.
  """
  source = load_source(cfg, printer)  # before the workdir: a bad input leaves none
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2)
  embs, cohorts, holdout_src, member_acc = [], [], None, []
  for i in range(cfg.ensemble):
    member = dataclasses.replace(cfg, seed=cfg.seed + i, ensemble=1)
    keep: dict = {}
    res = _run_single(member, os.path.join(workdir, f"member{i}"), stop_after,
                      lambda s, i=i: printer(f"[member {i}] {s}"), keep, source, mesh)
    if not res:
      return {}  # stopped early (stop_after); a rerun resumes this member
    member_acc.append(res["eval/accuracy"])
    holdout_src, train_src = keep["holdout"], keep["train"]
    emb, cohort = embed_for_evaluation(keep["embed"], eval_params(keep["state"]),
                                       keep["state"]["rest"], holdout_src, train_src, cfg)
    embs.append(emb)
    if cohort is not None:
      cohorts.append(cohort)
  emb = np.concatenate(embs, axis=1) / np.sqrt(cfg.ensemble)
  cohort = np.concatenate(cohorts, axis=1) / np.sqrt(cfg.ensemble) if cohorts else None
  results = evaluate_embeddings(emb, holdout_src, cfg, cfg.num_steps,
                                workdir if primary else None, cohort=cohort, train=train_src)
  results["eval/member_accuracy_mean"] = float(np.mean(member_acc))
  if primary:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  printer(f"ensemble of {cfg.ensemble}: member accuracies "
          f"{', '.join(f'{a:.4f}' for a in member_acc)}")
  printer(_fmt_eval(results))
  return results


def _run_single(cfg: TripletConfig, workdir: str, stop_after: int | None,
                printer: Callable[[str], None], keep: dict,
                source: source_lib.ImageSource | None = None, mesh=None) -> dict:
  train_src, holdout_src, sampler = prepare_data(cfg, source, printer)
  os.makedirs(workdir, exist_ok=True)  # after the data checks: a bad input leaves no workdir
  printer(f"data: {len(train_src)} train images of {len(train_src.identity_names)} identities, "
          f"{len(holdout_src)} held-out images of {len(holdout_src.identity_names)} identities, "
          f"image {train_src.image_shape}, batch {cfg.P}x{cfg.K}")

  num_classes = len(train_src.identity_names)
  extras = model_extras(cfg, num_classes)
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=cfg.max_to_keep)
  try:
    saved = ckpt.restore_config()
    if saved is not None:
      saved_cfg, saved_extras = _split_saved(saved)
      # Through the dataclass, so a run saved before a setting existed compares
      # that setting at its default (which is what the run used).
      saved_cfg = TripletConfig.from_dict(saved_cfg).to_dict()
      checkpointing.check_resumable(saved_cfg, cfg.to_dict(), may_change=RESUMABLE_CHANGES)
      if saved_extras:
        checkpointing.check_resumable({"model_extras": saved_extras}, {"model_extras": extras},
                                      may_change=())
      # A dlib run restores into shapes built from the saved spec: the
      # pretrained weights need not even be installed to resume it.
      graphdef, tx, state = init_state(cfg, num_classes=num_classes,
                                       dlib_spec=saved_extras.get("dlib_spec") or extras["dlib_spec"])
      start, state = ckpt.restore(_with_sharding(state, mesh))
      printer(f"resumed from {ckpt.directory}/{start}")
    else:
      graphdef, tx, state = init_state(cfg, num_classes=num_classes)
      if mesh is not None:
        from jaxface import parallel
        state = parallel.replicate(state, mesh)  # equal on every process: same seed
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    if mesh is not None:
      n = mesh.devices.size
      printer(f"data parallel: {n} {mesh.devices.flat[0].platform} devices in "
              f"{jax.process_count()} process(es), {cfg.P * cfg.K // n} images per device, "
              f"{cfg.mining} mining")
    printer(f"encoder: {encoder_lib.num_params(state['params']):,} parameters, "
            f"strategy {cfg.strategy}, margin {cfg.margin}")

    train_step = make_train_step(graphdef, tx, cfg, mesh)
    embed = make_embed_fn(graphdef, cfg)
    results = _train_loop(cfg, workdir, state, train_step, embed, train_src, holdout_src,
                          sampler, ckpt, stop_after, printer,
                          ckpt_config={**cfg.to_dict(), "model_extras": extras}, keep=keep,
                          mesh=mesh)
    keep.update(embed=embed, holdout=holdout_src, train=train_src)
  finally:
    ckpt.close()
  return results


def _check_health(state: State, metrics: dict, step: int) -> None:
  bad = int(state["bad_step"])
  if bad >= 0:
    raise TrainingError(
        f"non-finite loss or gradient at step {bad}; parameters are kept from step {bad} and "
        f"nothing after it was saved. Lower --learning_rate or check the data")
  if metrics and metrics["train/embedding_spread"] < 1e-6:
    raise TrainingError(
        f"embeddings collapsed at step {step} (all equal: spread "
        f"{metrics['train/embedding_spread']:.2e}); lower --learning_rate or raise --margin")


def _train_loop(cfg, workdir, state, train_step, embed, train_src, holdout_src, sampler, ckpt,
                stop_after, printer, ckpt_config, keep, mesh=None) -> dict:
  from jaxface import parallel
  # Evaluation is small: every process embeds the held-out set on one local
  # device from its own copy of the replicated state; only process 0 writes.
  local = parallel.to_local if mesh is not None else (lambda tree: tree)
  primary = jax.process_index() == 0
  step = int(state["step"])
  batches = _Batches(train_src, sampler, mesh)
  log_path = os.path.join(workdir, "train_log.jsonl")
  images_per_step = cfg.P * cfg.K
  t_last, step_last, t_start, step_start = time.perf_counter(), step, time.perf_counter(), step
  pending = None
  try:
    while step < cfg.num_steps:
      state, pending = train_step(state, batches.get(step))
      step += 1
      is_last = step == cfg.num_steps or step == stop_after
      if step % cfg.log_every == 0 or is_last:
        host = {k: float(v) for k, v in jax.device_get(pending).items()}
        _check_health(state, host, step)
        now = time.perf_counter()
        ips = (step - step_last) * images_per_step / max(now - t_last, 1e-9)
        # The first interval includes compilation; ETA uses the latest interval only.
        eta = (cfg.num_steps - step) * (now - t_last) / max(step - step_last, 1)
        t_last, step_last = now, step
        printer(f"step {step:6d}/{cfg.num_steps}  loss {host['train/loss']:.4f}  "
                f"active {host['train/active_fraction']:.3f}  d_ap {host['train/d_ap']:.3f}  "
                f"d_an {host['train/d_an']:.3f}  {ips:7.1f} img/s  ETA {_fmt_eta(eta)}")
        if primary:
          with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, **host, "train/images_per_s": ips}) + "\n")
      if step % cfg.checkpoint_every == 0 or is_last:
        _check_health(state, {}, step)
        # Save a copy: the next step donates (reuses) the state's buffers while
        # orbax may still be writing them in the background. Every process
        # saves (orbax coordinates them; process 0 writes replicated arrays).
        ckpt.save(step, jax.tree.map(jnp.copy, state), ckpt_config, force=True)
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
        res = evaluate(embed, local(state), holdout_src, cfg, None, train_src)
        printer(_fmt_eval(res))
      if stop_after is not None and step >= stop_after:
        printer(f"stopped at step {step} (stop_after); resume with the same --workdir")
        ckpt.wait()
        return {}
  finally:
    batches.close()
  ckpt.wait()
  elapsed = time.perf_counter() - t_start
  if step > step_start:
    printer(f"trained steps {step_start}..{step} in {elapsed:.1f}s")
  state = local(state)
  keep["state"] = state
  results = evaluate(embed, state, holdout_src, cfg, workdir if primary else None, train_src)
  printer(_fmt_eval(results))
  printer(f"wrote {os.path.join(workdir, 'metrics.json')}")
  return results


def _fmt_eval(r: dict) -> str:
  f = lambda key: "n/a" if r.get(key) is None else f"{r[key]:.4f}"
  return (f"eval (held-out identities, step {r['eval/step']}): accuracy {f('eval/accuracy')}"
          f" +- {f('eval/accuracy_std')}  AUC {f('eval/auc')}  TAR@FAR=1e-2 {f('eval/tar@far=1e-2')}"
          f"  TAR@FAR=1e-3 {f('eval/tar@far=1e-3')}  threshold {f('eval/threshold')}  "
          f"rank-1 {f('eval/rank1')}  open-set FAR {f('eval/open_set/far')}")


def load_params(workdir: str, mesh=None):
  """Rebuilds the trained encoder from ``workdir``'s latest checkpoint.

  Args:
    workdir: the run directory.
    mesh: restore replicated over this mesh (``jaxface.parallel.make_mesh``);
      in a multi-process run every process must call this. None: on this
      process's first device.

  Returns:
    (encoder in eval mode, config).
  """
  with checkpointing.Checkpointer(workdir) as ckpt:
    saved = ckpt.restore_config()
    if saved is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    saved_cfg, extras = _split_saved(saved)
    cfg = TripletConfig.from_dict(saved_cfg)
    dlib_spec = extras.get("dlib_spec") or (cfg.dlib_spec().to_dict() if cfg.init == "dlib" else None)
    graphdef, _, state = init_state(cfg, num_classes=extras.get("num_classes", 0), dlib_spec=dlib_spec)
    _, state = ckpt.restore(_with_sharding(state, mesh))
  return nnx.merge(graphdef, eval_params(state), state["rest"]), cfg
