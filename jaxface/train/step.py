"""The pure parts of triplet training: optimizer, train state, loss, gradients, the step.

``train_step(state, batch) -> (state, metrics)`` is jitted with the state
donated. The augmentation key is ``fold_in(state rng, step)``, so a run's
steps depend only on (seed, step) and a resumed run replays exactly what an
uninterrupted one computes. A step whose loss or gradients are not finite
leaves the state as it was and records its number in ``state["bad_step"]``
(the host checks it at log and checkpoint steps).

With a mesh (``jaxface.parallel``) the batch is sharded over its ``"data"``
axis and the state replicated; ``loss.mining`` picks global mining (the
one-device result) or per-device mining (:func:`make_grad_fn`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxface.config_dict import invalid
from jaxface.data import augment as augment_lib
from jaxface.losses import triplet_loss
from jaxface.train import heads
from jaxface.train.config import DataConfig, LossConfig, ModelConfig, OptimConfig, TripletConfig
from jaxface.train.model import build_model, model_apply

State = dict[str, Any]


class TrainingError(RuntimeError):
  """Training stopped: non-finite loss, collapsed or non-finite embeddings."""


# --------------------------------------------------------------------------- state


def make_optimizer(optim: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """AdamW on a warm-up cosine schedule that decays over ``num_steps`` to 1% of the peak."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.learning_rate, warmup_steps=optim.warmup_steps,
      decay_steps=max(num_steps, optim.warmup_steps + 1), end_value=optim.learning_rate * 0.01)
  # Decay only kernels: decaying BatchNorm scales and biases hurts small nets.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, weight_decay=optim.weight_decay, mask=decay_mask))


def init_state(cfg: TripletConfig, *, num_classes: int = 0, dlib_spec: dict | None = None
               ) -> tuple[nnx.GraphDef, optax.GradientTransformation, State]:
  """Fresh model, optimizer and train state from ``cfg.seed``.

  Args:
    cfg: the config. ``init="scratch"`` builds a random encoder;
      ``init="dlib"`` starts from dlib's pretrained weights.
    num_classes: training identities, for the CosFace head (``loss.cls_weight > 0``).
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
  graphdef, params, rest = build_model(cfg, dlib_spec=dlib_spec)
  tx = make_optimizer(cfg.optim, cfg.runtime.num_steps)
  trainable = params
  cls = None
  if cfg.loss.cls_weight > 0:
    cls = heads.init_cosface_weights(jax.random.key(cfg.seed + 2), cfg.model.embedding_dim, num_classes)
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
  if cfg.optim.ema_decay > 0:
    state["ema"] = params if abstract else jax.tree.map(jnp.copy, params)
  return graphdef, tx, state


def eval_params(state: State) -> nnx.State:
  """The parameters to evaluate with: the moving average when kept, else the live ones."""
  return state.get("ema", state["params"])


# --------------------------------------------------------------------------- loss and gradients


def make_loss_fn(graphdef: nnx.GraphDef, model: ModelConfig, loss: LossConfig) -> Callable:
  """The training loss of one batch (on one device, or global under jit).

  Returns:
    ``loss_fn(trainable, rest, x, labels) -> (loss, (aux, new_rest, emb))``:
    ``trainable`` is ``params`` or ``(params, cls)`` with a CosFace head,
    ``x`` the augmented ``[B, *crop, C] float32`` batch, ``labels`` ``[B]
    int32``; ``loss`` ``[] float32``, ``aux`` the triplet (and CosFace)
    metrics, ``new_rest`` the BatchNorm statistics after this batch, ``emb``
    ``[B, D] float32``.
  """
  fwd = model_apply(model)
  use_cls = loss.cls_weight > 0

  def loss_fn(trainable, rest, x, labels):
    params = trainable[0] if use_cls else trainable
    emb, new_rest = fwd(graphdef, params, rest, x, True)
    value, aux = triplet_loss(emb, labels, margin=loss.margin, strategy=loss.strategy)
    aux = dict(aux)
    if use_cls:
      cls_loss, cls_acc = heads.margin_softmax_loss(
          emb, trainable[1], labels, kind=loss.cls_type, margin=loss.cls_margin,
          scale=loss.cls_scale, smoothing=loss.cls_smoothing)
      aux["cls_loss"], aux["cls_acc"] = cls_loss, cls_acc
      value = value + loss.cls_weight * cls_loss
    return value, (aux, new_rest, emb)

  return loss_fn


def make_grad_fn(graphdef: nnx.GraphDef, model: ModelConfig, loss: LossConfig, mesh=None) -> Callable:
  """Loss, metrics and gradients of one batch, optionally data-parallel on ``mesh``.

  Without a mesh, or with ``loss.mining == "global"``, this is plain
  ``value_and_grad`` of :func:`make_loss_fn`; under a jit whose batch is
  sharded on the mesh's ``"data"`` axis and whose parameters are replicated,
  XLA partitions the forward pass by rows and gathers what the loss needs,
  so every anchor is mined against the whole global batch and BatchNorm uses
  global batch statistics: the result is the one-device result (up to
  float32 reduction order).

  With ``loss.mining == "local"`` (and a mesh) each device runs the loss on
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
  loss_fn = make_loss_fn(graphdef, model, loss)
  if mesh is not None and loss.mining == "local":
    from jax.sharding import PartitionSpec as P

    from jaxface import parallel
    device_loss_fn = loss_fn

    def per_device(trainable, rest, x, labels):
      value, (aux, new_rest, emb) = device_loss_fn(trainable, rest, x, labels)
      mean = lambda t: jax.tree.map(lambda v: jax.lax.pmean(v, parallel.DATA), t)
      aux = {k: (jax.lax.psum(v, parallel.DATA) if k == "num_valid" else mean(v))
             for k, v in aux.items()}
      return mean(value), (aux, mean(new_rest), emb)

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
    (value, (aux, new_rest, emb)), grads = value_and_grad(trainable, rest, x, labels)
    return value, aux, new_rest, emb, grads

  return grad_fn


def check_parallel_batch(data: DataConfig, loss: LossConfig, num_devices: int) -> None:
  """Checks that the P x K batch splits over ``num_devices`` devices as ``loss.mining`` needs.

  Global mining needs P*K rows to split evenly. Local mining mines within
  each device's rows, so each device must hold whole identities: the sampler
  lays the batch out identity-major (K rows per identity), so P must be a
  multiple of the device count, and each device needs >= 2 identities to
  have negatives.

  Raises:
    ValueError: naming P, the device count and the fix.
  """
  n, P, K = int(num_devices), data.P, data.K
  if n <= 1:
    return
  if loss.mining == "local":
    if P % n:
      raise invalid("P", P, f"mining='local' gives each of the {n} devices whole identities, so P must "
                            f"be a multiple of {n} (or use mining='global', or fewer num_devices)")
    if P // n < 2:
      raise invalid("P", P, f"mining='local' on {n} devices leaves {P // n} identity per device, so no "
                            f"negatives; use P >= {2 * n} or mining='global'")
  elif (P * K) % n:
    raise invalid("P", P, f"with K={K}, {P * K} images per batch do not split evenly over {n} devices; "
                          f"make P*K a multiple of {n} or set num_devices")


# --------------------------------------------------------------------------- the step


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
  ``loss.mining`` picks global or per-device mining (:func:`make_grad_fn`).
  Augmentation is computed on the global batch either way: its random
  numbers do not depend on the sharding (threefry is partitionable).
  """
  crop, aug = tuple(cfg.data.crop_size), cfg.augment
  use_cls = "cls" if cfg.loss.cls_weight > 0 else None
  ema_decay = cfg.optim.ema_decay
  grad_fn = make_grad_fn(graphdef, cfg.model, cfg.loss, mesh)

  def train_step(state: State, batch: dict) -> tuple[State, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    x = augment_lib.augment(rng, augment_lib.to_float(batch["images"]), crop_size=crop,
                            flip=aug.flip, brightness=aug.brightness, contrast=aug.contrast,
                            scale=aug.scale, rotate=aug.rotate, erase=aug.erase, noise=aug.noise)
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
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"],
                         new_state["params"])
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
