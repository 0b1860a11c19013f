"""Triplet-loss training of the face encoder: the trainer.

``run(cfg, workdir)`` trains (resuming from the latest checkpoint, bitwise as an
uninterrupted run would) and evaluates on held-out identities; it reads top to
bottom in :func:`train_and_evaluate` (data, build or restore, loop, evaluate),
on one device, a mesh of several, or several processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from jaxface import checkpointing, runloop
from jaxface.data import build as data_build, source as source_lib
from jaxface.models import encoder as encoder_lib
from jaxface.train.config import TripletConfig
from jaxface.train.evaluators.verification import VerificationEvaluator, format_results
from jaxface.train.input_pipeline import Batches
from jaxface.train.model import embed_source, make_embed_fn, model_extras
from jaxface.train.step import (
  State,
  TrainingError,
  check_parallel_batch,
  eval_params,
  init_state,
  make_grad_fn,
  make_train_step,
)

__all__ = ["Trained", "TrainingError", "check_health", "embed_source", "eval_params", "init_state",
           "load_params", "make_embed_fn", "make_grad_fn", "make_train_step", "model_extras",
           "prepare_data", "resolve_mesh", "run", "run_ensemble", "train_and_evaluate"]

Printer = Callable[[str], None]


class Trained(NamedTuple):
  """What a finished :func:`train_and_evaluate` gives back (an ensemble evaluates its members)."""
  results: dict          # the final eval/... metrics, with eval/step
  embed: Callable        # the run's eval-mode embedding (make_embed_fn)
  params: nnx.State      # the weights evaluated (the moving average when kept), on one device
  rest: nnx.State        # BatchNorm statistics
  train: source_lib.ImageSource
  holdout: source_lib.ImageSource


def run(cfg: TripletConfig, workdir: str, *, stop_after: int | None = None,
        printer: Printer = runloop.stderr_printer) -> dict:
  """Trains (resuming from ``workdir``) and evaluates on held-out identities.

  With several devices (``runtime.num_devices``, ``jaxface.parallel``) the batch
  is sharded over a ``("data",)`` mesh and the state replicated; with several
  processes (``jax.distributed``) each process loads only its rows of every
  batch, all processes checkpoint together, and process 0 alone prints and
  writes files. ``model.ensemble = N`` trains N members (:func:`run_ensemble`).

  Args:
    cfg: the experiment config.
    workdir: run directory: checkpoints, ``config.json``, ``train_log.jsonl``,
      ``metrics.json``, ``roc.png``.
    stop_after: stop (after checkpointing) once this step is reached, as a
      pre-empted job would; used by the resume tests.
    printer: where progress lines go (default: stderr); process 0's only.

  Returns:
    The final ``eval/...`` metrics (empty when stopped early).
  """
  cfg.validate()
  mesh = resolve_mesh(cfg)
  printer = runloop.primary_printer(printer)  # one process speaks for all
  if cfg.model.ensemble > 1:
    return run_ensemble(cfg, workdir, stop_after=stop_after, printer=printer, mesh=mesh)
  trained = train_and_evaluate(cfg, workdir, stop_after=stop_after, printer=printer, mesh=mesh)
  return trained.results if trained else {}


def prepare_data(cfg: TripletConfig, source: source_lib.ImageSource | None = None,
                 printer: Printer = runloop.quiet):
  """(train source, held-out source, P x K sampler) of ``cfg.data`` with the run's seed
  (:func:`jaxface.data.build.prepare_data`)."""
  return data_build.prepare_data(cfg.data, cfg.seed, source, printer)


def train_and_evaluate(cfg: TripletConfig, workdir: str, *, stop_after: int | None = None,
                       printer: Printer = runloop.quiet, source: source_lib.ImageSource | None = None,
                       mesh=None) -> Trained | None:
  """One run: data, build or restore, the training loop, the held-out evaluation.

  1. data: load the source, split identities into train and held-out, check
     that P x K batches can be drawn (``jaxface.data.build``), all before the
     workdir exists, so a bad input leaves none;
  2. build: model, optimizer and train state (``jaxface.train.step``), or
     restore them from the latest checkpoint in ``workdir``;
  3. loop: identity-balanced P x K batches through the jitted pure step, with
     logging, checkpoints and optional periodic evaluation (``jaxface.runloop``);
  4. evaluate: verification on the held-out identities
     (``jaxface.train.evaluators.verification``): ``metrics.json`` and ``roc.png``.

  The data stream is a pure function of (seed, step) and the augmentation key is
  ``fold_in(seed key, step)``, so a run killed and resumed replays exactly the
  batches an uninterrupted run sees and ends with bitwise-equal parameters on the
  same machine and XLA build.

  Args:
    cfg, workdir, stop_after: as in :func:`run` (``model.ensemble`` is ignored).
    printer: progress lines (already silenced off the primary process).
    source: already loaded data (ensemble members share the ensemble's).
    mesh: the data-parallel mesh (:func:`resolve_mesh`), or None.

  Returns:
    The evaluated run, or None when stopped at ``stop_after``.
  """
  # 1. Data, checked before the workdir exists.
  train_src, holdout_src, sampler = prepare_data(cfg, source, printer)
  os.makedirs(workdir, exist_ok=True)
  data, rt = cfg.data, cfg.runtime
  printer(f"data: {len(train_src)} train images of {len(train_src.identity_names)} identities, "
          f"{len(holdout_src)} held-out images of {len(holdout_src.identity_names)} identities, "
          f"image {train_src.image_shape}, batch {data.P}x{data.K}")
  primary = runloop.is_primary()
  # Evaluation is small: every process embeds the held-out set on one local
  # device from its own copy of the replicated state; only process 0 writes.
  local = (lambda tree: tree) if mesh is None else _to_local

  # 2. Model, optimizer and state: fresh, or restored from the latest checkpoint.
  extras = model_extras(cfg, len(train_src.identity_names))
  with checkpointing.Checkpointer(workdir, max_to_keep=rt.max_to_keep) as ckpt:
    graphdef, tx, state = _build_or_restore(cfg, ckpt, extras, mesh, printer)
    if primary:
      _write_json(workdir, "config.json", cfg.to_dict())
    if mesh is not None:
      n = mesh.devices.size
      printer(f"data parallel: {n} {mesh.devices.flat[0].platform} devices in "
              f"{jax.process_count()} process(es), {data.P * data.K // n} images per device, "
              f"{cfg.loss.mining} mining")
    printer(f"encoder: {encoder_lib.num_params(state['params']):,} parameters, "
            f"strategy {cfg.loss.strategy}, margin {cfg.loss.margin}")
    train_step = make_train_step(graphdef, tx, cfg, mesh)
    embed = make_embed_fn(graphdef, cfg)
    evaluator = VerificationEvaluator(embed, holdout_src, cfg.eval, seed=cfg.seed, train=train_src)

    def evaluate(state: State) -> dict:
      return {**dict(evaluator.run(eval_params(state), state["rest"])), "eval/step": int(state["step"])}

    # 3. The loop.
    ckpt_config = {**cfg.to_dict(), "model_extras": extras}
    step = int(state["step"])
    meter, log = runloop.Meter(step), runloop.MetricsLog(workdir)
    with Batches(train_src, sampler, mesh) as batches:
      while step < rt.num_steps:
        state, metrics = train_step(state, batches.get(step))
        step += 1
        last = step == rt.num_steps or step == stop_after
        if runloop.every(step, rt.log_every, last=last):
          host = runloop.host_metrics(metrics)
          check_health(state, host, step)
          # The first interval includes compilation; rate and ETA follow the latest one.
          images_per_s = meter.tick(step) * data.P * data.K
          eta = runloop.format_eta(meter.eta(rt.num_steps - step))
          printer(f"step {step:6d}/{rt.num_steps}  loss {host['train/loss']:.4f}  "
                  f"active {host['train/active_fraction']:.3f}  d_ap {host['train/d_ap']:.3f}  "
                  f"d_an {host['train/d_an']:.3f}  {images_per_s:7.1f} img/s  ETA {eta}")
          log.write({"step": step, **host, "train/images_per_s": images_per_s})
        if runloop.every(step, rt.checkpoint_every, last=last):
          check_health(state, {}, step)
          runloop.save_copy(ckpt, step, state, ckpt_config)  # every process saves
        if runloop.every(step, cfg.eval.eval_every) and step < rt.num_steps:
          printer(format_results(evaluate(local(state))))
        if stop_after is not None and step >= stop_after:
          printer(f"stopped at step {step} (stop_after); resume with the same workdir")
          ckpt.wait()
          return None
    ckpt.wait()
    if step > meter.start_step:
      printer(f"trained steps {meter.start_step}..{step} in {meter.elapsed():.1f}s")

    # 4. Held-out evaluation.
    state = local(state)
    results = evaluate(state)
    if primary:
      _write_results(workdir, results, evaluator.roc, cfg.eval.roc_png)
    printer(format_results(results))
    printer(f"wrote {os.path.join(workdir, 'metrics.json')}")
  return Trained(results, embed, eval_params(state), state["rest"], train_src, holdout_src)


def run_ensemble(cfg: TripletConfig, workdir: str, *, stop_after: int | None = None,
                 printer: Printer = runloop.quiet, mesh=None) -> dict:
  """Trains ``model.ensemble`` members in ``<workdir>/member<i>`` (seeds seed + i) and
  evaluates their concatenated embeddings.

  Each member is an ordinary run (own checkpoints, resumable, own metrics.json);
  with unit-norm members the concatenation divided by sqrt(#members) is unit
  norm and its squared distance is the members' mean squared distance.

  Returns:
    The ensemble's ``eval/...`` metrics plus ``eval/member_accuracy_mean``
    (empty when stopped early).
  """
  source = data_build.load_source(cfg.data, cfg.seed, printer)  # before the workdir
  os.makedirs(workdir, exist_ok=True)
  if runloop.is_primary():
    _write_json(workdir, "config.json", cfg.to_dict())
  members = []
  for i in range(cfg.model.ensemble):
    member = dataclasses.replace(cfg, seed=cfg.seed + i, model=dataclasses.replace(cfg.model, ensemble=1))
    trained = train_and_evaluate(member, os.path.join(workdir, f"member{i}"), stop_after=stop_after,
                                 printer=lambda s, i=i: printer(f"[member {i}] {s}"), source=source,
                                 mesh=mesh)
    if trained is None:
      return {}  # stopped early (stop_after); a rerun resumes this member
    members.append(trained)
  # Every member holds the same held-out identities; the training split (cohort,
  # Fisherfaces) is the last member's, whose extra_synthetic identities follow its seed.
  holdout, train = members[-1].holdout, members[-1].train
  parts = [VerificationEvaluator(m.embed, holdout, cfg.eval, seed=cfg.seed, train=train)
           .embeddings(m.params, m.rest) for m in members]
  scale = np.sqrt(cfg.model.ensemble)
  emb = np.concatenate([e for e, _ in parts], axis=1) / scale
  cohort = np.concatenate([c for _, c in parts], axis=1) / scale if parts[0][1] is not None else None
  evaluator = VerificationEvaluator(None, holdout, cfg.eval, seed=cfg.seed, train=train)
  results = {**evaluator.metrics(emb, cohort), "eval/step": cfg.runtime.num_steps}
  member_accuracy = [m.results["eval/accuracy"] for m in members]
  results["eval/member_accuracy_mean"] = float(np.mean(member_accuracy))
  if runloop.is_primary():
    _write_results(workdir, results, evaluator.roc, cfg.eval.roc_png)
  printer(f"ensemble of {cfg.model.ensemble}: member accuracies "
          f"{', '.join(f'{a:.4f}' for a in member_accuracy)}")
  printer(format_results(results))
  return results


def load_params(workdir: str, mesh=None) -> tuple[nnx.Module, TripletConfig]:
  """Rebuilds the trained encoder from ``workdir``'s latest checkpoint.

  Args:
    workdir: the run directory (checkpoints written by any version of the
      trainer: flat or nested configs).
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
    dlib_spec = extras.get("dlib_spec") or (cfg.dlib_spec().to_dict() if cfg.model.init == "dlib" else None)
    graphdef, _, state = init_state(cfg, num_classes=extras.get("num_classes", 0), dlib_spec=dlib_spec)
    _, state = ckpt.restore(_restore_target(state, mesh))
  return nnx.merge(graphdef, eval_params(state), state["rest"]), cfg


# --------------------------------------------------------------------------- devices


def resolve_mesh(cfg: TripletConfig):
  """The data-parallel mesh of ``runtime.num_devices``, or None for the one-device path.

  One device in one process (``num_devices=1``, or 0 on a one-device
  machine) keeps the plain single-device step, numerically as before.

  Raises:
    ValueError: too many devices asked for, or a batch that does not split.
  """
  from jaxface import parallel
  num_devices = cfg.runtime.num_devices
  if jax.process_count() == 1 and (num_devices == 1 or jax.device_count() == 1):
    if num_devices > jax.device_count():
      parallel.make_mesh(num_devices)  # raises, naming the device count
    return None
  mesh = parallel.make_mesh(num_devices)
  check_parallel_batch(cfg.data, cfg.loss, mesh.devices.size)
  return mesh


def _to_local(tree):
  from jaxface import parallel
  return parallel.to_local(tree)


# --------------------------------------------------------------------------- health and files


def check_health(state: State, metrics: dict, step: int) -> None:
  """Stops the run on a non-finite step (``state["bad_step"]``) or, given the step's host
  ``metrics``, on collapsed embeddings.

  Raises:
    TrainingError: naming the step and what to change.
  """
  runloop.check_bad_step(state["bad_step"], what="loss or gradient",
                         kept="parameters are kept from step {step}",
                         hint="Lower learning_rate or check the data", error=TrainingError)
  if metrics and metrics["train/embedding_spread"] < 1e-6:
    raise TrainingError(
        f"embeddings collapsed at step {step} (all equal: spread "
        f"{metrics['train/embedding_spread']:.2e}); lower learning_rate or raise margin")


def _build_or_restore(cfg: TripletConfig, ckpt: checkpointing.Checkpointer, extras: dict, mesh,
                      printer: Printer):
  """(graphdef, optimizer, state): fresh from the seed, or the workdir's latest checkpoint
  after checking that its run may be resumed with ``cfg``."""
  num_classes = extras["num_classes"]
  saved = ckpt.restore_config()
  if saved is None:
    graphdef, tx, state = init_state(cfg, num_classes=num_classes)
    if mesh is not None:
      from jaxface import parallel
      state = parallel.replicate(state, mesh)  # equal on every process: same seed
    return graphdef, tx, state
  saved_cfg, saved_extras = _split_saved(saved)
  cfg.check_resumable(saved_cfg)
  if saved_extras:
    checkpointing.check_resumable({"model_extras": saved_extras}, {"model_extras": extras},
                                  may_change=())
  # A dlib run restores into shapes built from the saved spec: the pretrained
  # weights need not even be installed to resume it.
  graphdef, tx, state = init_state(cfg, num_classes=num_classes,
                                   dlib_spec=saved_extras.get("dlib_spec") or extras["dlib_spec"])
  start, state = ckpt.restore(_restore_target(state, mesh))
  printer(f"resumed from {ckpt.directory}/{start}")
  return graphdef, tx, state


def _split_saved(saved: dict) -> tuple[dict, dict]:
  """A checkpoint's config dict -> (TripletConfig settings, model extras)."""
  saved = dict(saved)
  extras = saved.pop("model_extras", None) or {}
  return saved, extras


def _restore_target(tree, mesh=None):
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


def _write_json(workdir: str, name: str, obj: dict, **kw) -> None:
  with open(os.path.join(workdir, name), "w") as f:
    json.dump(obj, f, indent=2, **kw)


def _write_results(workdir: str, results: dict, roc: dict, roc_png: bool) -> None:
  """``metrics.json`` and, with ``roc_png``, ``roc.png`` of the held-out evaluation."""
  from jaxface import metrics as metrics_lib
  _write_json(workdir, "metrics.json", results, sort_keys=True)
  if roc_png:
    metrics_lib.save_roc_png(roc["fpr"], roc["tpr"], os.path.join(workdir, "roc.png"),
                             title=f"held-out ROC, step {results['eval/step']}", auc=results["eval/auc"])
