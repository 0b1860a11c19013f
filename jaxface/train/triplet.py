"""Triplet-loss training of the face encoder: state, pure step, and ``run``.

``run(config, workdir)`` loads the data, splits identities into train and
held-out, trains with identity-balanced P x K batches, checkpoints, always
resumes from the latest checkpoint in ``workdir``, and finally evaluates on the
held-out identities (``<workdir>/metrics.json`` and ``roc.png``).

The data stream is a pure function of (seed, step) and the augmentation key is
``fold_in(seed key, step)``, so a run killed and resumed replays exactly the
batches an uninterrupted run sees and ends with bitwise-equal parameters on the
same machine and XLA build.
"""

from __future__ import annotations

import json
import logging
import os
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
from jaxface.train.config import RESUMABLE_CHANGES, TripletConfig

log = logging.getLogger(__name__)

State = dict[str, Any]


class TrainingError(RuntimeError):
  """Training stopped: non-finite loss or collapsed embeddings."""


# --------------------------------------------------------------------------- data


def load_source(cfg: TripletConfig) -> source_lib.ImageSource:
  """Builds the configured source: ``[N, H, W, C] uint8`` images with labels.

  With ``cfg.spatial_rank`` 1 or 3 the samples are synthetic signals
  ``[N, T, C]`` or volumes ``[N, D, H, W, C]``.
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
    return folder.ImageFolderSource(paths.expand(cfg.data_path), image_size=size,
                                    channels=cfg.channels, on_error=cfg.on_bad_image)
  from jaxface.data import tfds_source
  return tfds_source.TfdsSource(cfg.tfds_name, split=cfg.tfds_split,
                                data_dir=paths.expand(cfg.tfds_data_dir) or None,
                                image_size=size, channels=cfg.channels)


def prepare_data(cfg: TripletConfig):
  """Loads and splits the data and checks it fits P x K before any compute.

  Returns:
    (train source, held-out source, sampler over the train source).
  """
  source = load_source(cfg)
  if len(source.identity_names) < 2:
    raise ValueError(f"the data has {len(source.identity_names)} identities; training needs >= 2")
  seed = cfg.holdout_seed if cfg.holdout_seed >= 0 else None
  train_src, holdout_src = source_lib.split_by_identity(source, num_holdout=cfg.num_holdout, seed=seed)
  source_lib.validate_pk(train_src, cfg.P, cfg.K)
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


def init_state(cfg: TripletConfig) -> tuple[nnx.GraphDef, optax.GradientTransformation, State]:
  """Fresh model, optimizer and train state from ``cfg.seed``.

  Returns:
    (graphdef, optimizer, state) where state is a pytree dict with ``step``
    (int32), ``params``, ``rest`` (BatchNorm statistics), ``opt_state``,
    ``rng`` (uint32 key data) and ``bad_step`` (int32, -1 while all losses
    were finite).
  """
  model = encoder_lib.build_encoder(cfg.encoder_spec(), seed=cfg.seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = make_optimizer(cfg)
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "rest": rest,
      "opt_state": tx.init(params),
      "rng": jax.random.key_data(jax.random.key(cfg.seed + 1)),
      "bad_step": jnp.full((), -1, jnp.int32),
  }
  if cfg.ema_decay > 0:
    state["ema"] = jax.tree.map(jnp.copy, params)
  return graphdef, tx, state


def eval_params(state: State) -> nnx.State:
  """The parameters to evaluate with: the moving average when kept, else the live ones."""
  return state.get("ema", state["params"])


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    cfg: TripletConfig) -> Callable[[State, dict], tuple[State, dict]]:
  """Builds the pure ``train_step(state, batch) -> (state, metrics)``.

  ``batch`` is ``{"images": [P*K, H, W, C] uint8, "labels": [P*K] int32}``
  (``[P*K, T, C]`` or ``[P*K, D, H, W, C]`` for signals or volumes).
  The returned function is jitted with the state donated. A step whose loss
  or gradients are not finite leaves the state as it was and records its
  number in ``state["bad_step"]``; the host stops at the next log step, so a
  NaN never reaches the parameters or a checkpoint.
  """
  crop = tuple(cfg.crop_size)

  def train_step(state: State, batch: dict) -> tuple[State, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    x = augment_lib.augment(rng, augment_lib.to_float(batch["images"]), crop_size=crop,
                            flip=cfg.flip, brightness=cfg.brightness, contrast=cfg.contrast,
                            scale=cfg.scale, rotate=cfg.rotate, erase=cfg.erase,
                            noise=cfg.noise)

    def loss_fn(params):
      emb, new_rest = encoder_lib.apply(graphdef, params, state["rest"], x, train=True)
      loss, aux = triplet_loss(emb, batch["labels"], margin=cfg.margin, strategy=cfg.strategy)
      return loss, (aux, new_rest, emb)

    (loss, (aux, new_rest, emb)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
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
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,))


def make_embed_fn(graphdef: nnx.GraphDef, cfg: TripletConfig):
  """Jitted eval-mode ``embed(params, rest, images [B,H,W,C] uint8) -> [B, D] float32``.

  Images may be signals ``[B, T, C]`` or volumes ``[B, D, H, W, C]`` too.
  With ``cfg.eval_flip`` the embedding is that of the image plus its mirror
  image (renormalised), the usual test-time augmentation for faces; the
  mirror is along the last spatial axis (left-right for volumes as well).
  """
  crop = tuple(cfg.crop_size)

  @jax.jit
  def embed(params, rest, images):
    x = augment_lib.center_crop(augment_lib.to_float(images), crop)
    emb, _ = encoder_lib.apply(graphdef, params, rest, x, train=False)
    if cfg.eval_flip:
      # A face and its mirror image are the same person: averaging both views
      # removes the left/right bias the encoder learned from one view.
      flipped, _ = encoder_lib.apply(graphdef, params, rest, jnp.flip(x, axis=-2), train=False)
      emb = encoder_lib.l2_normalize(emb + flipped) if cfg.l2_normalize else (emb + flipped) / 2
    return emb

  return embed


def embed_source(embed, params, rest, source: source_lib.ImageSource, batch_size: int) -> np.ndarray:
  """Embeds every image of ``source`` in fixed-size batches (last one padded: one compile).

  Returns:
    ``[N, D]`` float32 embeddings on the host.
  """
  n = len(source)
  out = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    images = source.get(idx)
    if len(idx) < batch_size:
      pad = np.zeros((batch_size - len(idx),) + images.shape[1:], images.dtype)
      images = np.concatenate([images, pad])
    out.append(np.asarray(embed(params, rest, images))[: len(idx)])
  return np.concatenate(out)


# --------------------------------------------------------------------------- evaluation


def evaluate(embed, state: State, holdout: source_lib.ImageSource, cfg: TripletConfig,
             workdir: str | None) -> dict:
  """Verification and identification on held-out identities; writes metrics.json and roc.png."""
  emb = embed_source(embed, eval_params(state), state["rest"], holdout, cfg.eval_batch_size)
  if not np.all(np.isfinite(emb)):
    raise TrainingError("held-out embeddings are not finite")
  results, roc = metrics_lib.evaluate_embeddings(emb, holdout.labels, seed=cfg.seed)
  # NaN (e.g. TAR at a FAR finer than 1/#negative pairs) is stored as JSON null.
  results = {k: (float(v) if np.isfinite(v) else None) for k, v in results.items()}
  results["eval/step"] = int(state["step"])
  if workdir:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    if cfg.roc_png:
      metrics_lib.save_roc_png(roc["fpr"], roc["tpr"], os.path.join(workdir, "roc.png"),
                               title=f"held-out ROC, step {int(state['step'])}",
                               auc=results["eval/auc"])
  return results


# --------------------------------------------------------------------------- loop


class _Batches:
  """Host-side batch assembly, one step ahead in a thread so decoding overlaps compute."""

  def __init__(self, source, sampler):
    from concurrent.futures import ThreadPoolExecutor
    self.source, self.sampler = source, sampler
    self.pool = ThreadPoolExecutor(max_workers=1)
    self.pending: dict[int, Any] = {}

  def _make(self, step: int) -> dict:
    idx = self.sampler.batch_indices(step)
    return {"images": self.source.get(idx), "labels": self.source.labels[idx].astype(np.int32)}

  def get(self, step: int) -> dict:
    fut = self.pending.pop(step, None)
    batch = fut.result() if fut is not None else self._make(step)
    self.pending[step + 1] = self.pool.submit(self._make, step + 1)
    return batch

  def close(self):
    self.pool.shutdown(wait=False, cancel_futures=True)


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run(cfg: TripletConfig, workdir: str, *, stop_after: int | None = None,
        printer: Callable[[str], None] = print) -> dict:
  """Trains (resuming from ``workdir``) and evaluates on held-out identities.

  Args:
    cfg: the experiment config (validated here).
    workdir: run directory: checkpoints, ``config.json``, ``train_log.jsonl``,
      ``metrics.json``, ``roc.png``.
    stop_after: stop (after checkpointing) once this step is reached, as a
      pre-empted job would; used by the resume tests.
    printer: where progress lines go.

  Returns:
    The final ``eval/...`` metrics (empty when stopped early).
  """
  cfg.validate()
  os.makedirs(workdir, exist_ok=True)
  train_src, holdout_src, sampler = prepare_data(cfg)
  printer(f"data: {len(train_src)} train images of {len(train_src.identity_names)} identities, "
          f"{len(holdout_src)} held-out images of {len(holdout_src.identity_names)} identities, "
          f"image {train_src.image_shape}, batch {cfg.P}x{cfg.K}")

  graphdef, tx, state = init_state(cfg)
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=cfg.max_to_keep)
  try:
    saved_cfg = ckpt.restore_config()
    if saved_cfg is not None:
      # Through the dataclass, so a run saved before a setting existed compares
      # that setting at its default (which is what the run used).
      saved_cfg = TripletConfig.from_dict(saved_cfg).to_dict()
      checkpointing.check_resumable(saved_cfg, cfg.to_dict(), may_change=RESUMABLE_CHANGES)
      restored = ckpt.restore(checkpointing.abstract_like(state))
      start, state = restored
      printer(f"resumed from {ckpt.directory}/{start}")
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2)
    printer(f"encoder: {encoder_lib.num_params(state['params']):,} parameters, "
            f"strategy {cfg.strategy}, margin {cfg.margin}")

    train_step = make_train_step(graphdef, tx, cfg)
    embed = make_embed_fn(graphdef, cfg)
    results = _train_loop(cfg, workdir, state, train_step, embed, train_src, holdout_src,
                          sampler, ckpt, stop_after, printer)
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
                stop_after, printer) -> dict:
  step = int(state["step"])
  batches = _Batches(train_src, sampler)
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
        with open(log_path, "a") as f:
          f.write(json.dumps({"step": step, **host, "train/images_per_s": ips}) + "\n")
      if step % cfg.checkpoint_every == 0 or is_last:
        _check_health(state, {}, step)
        # Save a copy: the next step donates (reuses) the state's buffers while
        # orbax may still be writing them in the background.
        ckpt.save(step, jax.tree.map(jnp.copy, state), cfg.to_dict(), force=True)
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
        res = evaluate(embed, state, holdout_src, cfg, None)
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
  results = evaluate(embed, state, holdout_src, cfg, workdir)
  printer(_fmt_eval(results))
  printer(f"wrote {os.path.join(workdir, 'metrics.json')}")
  return results


def _fmt_eval(r: dict) -> str:
  f = lambda key: "n/a" if r.get(key) is None else f"{r[key]:.4f}"
  return (f"eval (held-out identities, step {r['eval/step']}): accuracy {f('eval/accuracy')}"
          f" +- {f('eval/accuracy_std')}  AUC {f('eval/auc')}  TAR@FAR=1e-2 {f('eval/tar@far=1e-2')}"
          f"  TAR@FAR=1e-3 {f('eval/tar@far=1e-3')}  threshold {f('eval/threshold')}  "
          f"rank-1 {f('eval/rank1')}  open-set FAR {f('eval/open_set/far')}")


def load_params(workdir: str):
  """Rebuilds the trained encoder from ``workdir``'s latest checkpoint.

  Returns:
    (encoder in eval mode, config).
  """
  with checkpointing.Checkpointer(workdir) as ckpt:
    saved = ckpt.restore_config()
    if saved is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    cfg = TripletConfig.from_dict(saved)
    graphdef, _, state = init_state(cfg)
    _, state = ckpt.restore(checkpointing.abstract_like(state))
  return nnx.merge(graphdef, eval_params(state), state["rest"]), cfg
