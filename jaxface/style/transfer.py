"""Gatys neural style transfer: pure optimisation step, coarse-to-fine driver, ``run``.

The optimised variable is the generated image itself (one per content image,
all sharing the style), costed on VGG19 activations (:mod:`jaxface.losses.style`).
A run is checkpointed and resumes bitwise (:func:`new_state`); its batch may be
split over devices and processes (:mod:`jaxface.style.sharding`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxface import checkpointing, runloop
from jaxface.losses import style as costs
from jaxface.models import vgg19
from jaxface.parallel import mesh as mesh_lib
from jaxface.style import images as images_lib, sharding as sharding_lib
from jaxface.style.config import RESUMABLE_CHANGES, NSTConfig

log = logging.getLogger(__name__)

State = dict[str, Any]

RANDOM_WEIGHTS_WARNING = (
    "warning: no VGG19 weights found; using randomly initialised features. The result is NOT "
    "pretrained style transfer (it matches texture statistics of a random network only). Get the "
    "weights with `python -m jaxface.weights fetch vgg19`, or set `weights` to the path of a VGG19 "
    "file (.h5, .pth or .mat).")


class TransferError(RuntimeError):
  """Optimisation stopped: a non-finite cost."""


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Problem:
  """Loaded, checked inputs of a run (host arrays, RGB in [0, 1]).

  Attributes:
    contents: content images ``[H_i, W_i, 3] float32`` as loaded.
    content_names: file-name-safe names, one per content image.
    styles: style images ``[H_j, W_j, 3] float32`` as loaded.
    blend: style blend weights, summing to 1.
    shapes: generated image (H, W) per scale, coarse to fine.
  """
  contents: list[np.ndarray]
  content_names: list[str]
  styles: list[np.ndarray]
  blend: list[float]
  shapes: list[tuple[int, int]]


def prepare(cfg: NSTConfig) -> Problem:
  """Loads every image and checks sizes against the chosen layers, before any compute.

  Raises:
    images.ImageError (a ValueError): missing/unreadable image.
    ValueError: an image too small for the chosen layers at some scale.
  """
  cfg.validate()
  contents = [images_lib.load(s) for s in cfg.content_list()]
  styles = [images_lib.load(s) for s in cfg.style_list()]
  names = [images_lib.name_of(s) for s in cfg.content_list()]
  names = [f"{i}_{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]
  # The batch shares one shape: that of the first content image's aspect ratio.
  shapes = [images_lib.fit_shape(contents[0].shape[:2], s) for s in cfg.scale_sizes()]
  need = max(vgg19.downsampling(cfg.content_layer),
             max(vgg19.downsampling(n) for n in cfg.style_lambdas()))
  deepest = cfg.last_layer()
  for k, (h, w) in enumerate(shapes):
    if min(h, w) < need:
      raise ValueError(
          f"image too small for the chosen layers: at scale {k + 1}/{len(shapes)} the output is "
          f"{h}x{w} px, but layer {deepest} needs at least {need} px on each side; raise `size`, "
          "lower `num_scales` or choose shallower layers")
    for spec, st in zip(cfg.style_list(), styles):
      sh, sw = _style_shape(cfg, st, (h, w))
      if min(sh, sw) < need:
        raise ValueError(
            f"style image {spec!r} too small for the chosen layers: at scale {k + 1} it is resized "
            f"to {sh}x{sw} px, but layer {deepest} needs at least {need} px on each side; raise "
            "`style_scale` or `size`")
  return Problem(contents, names, styles, cfg.blend_weights(), shapes)


def _style_shape(cfg: NSTConfig, style: np.ndarray, out_shape: tuple[int, int]) -> tuple[int, int]:
  return images_lib.fit_shape(style.shape[:2], max(1, round(cfg.style_scale * max(out_shape))))


def scale_images(cfg: NSTConfig, problem: Problem, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
  """Content batch ``[B, H_k, W_k, 3]`` and style images at scale ``k``, colour mode applied."""
  shape = problem.shapes[k]
  contents = np.stack([images_lib.resize_cover(c, shape) for c in problem.contents])
  styles = [images_lib.resize(s, _style_shape(cfg, s, shape)) for s in problem.styles]
  if cfg.preserve_color == "luminance":
    lum = images_lib.luminance_rgb(contents)
    styles = [images_lib.match_luminance(images_lib.luminance_rgb(s), lum[..., 0]) for s in styles]
    contents = lum
  elif cfg.preserve_color == "histogram":
    # One shared style for the batch: match it to the pooled colours of all content images.
    styles = [images_lib.match_color(s, contents) for s in styles]
  return contents.astype(np.float32), styles


# --------------------------------------------------------------------------- network


_stderr = runloop.stderr_printer  # the default printer: progress and warnings on stderr


def load_weights(cfg: NSTConfig, printer: Callable[[str], None] = _stderr):
  """The VGGWeights to use, or None (random features, with a printed warning).

  ``cfg.weights`` (a path) reads and caches that file (errors propagate);
  otherwise the cached converted weights are used when present.
  """
  # h5py/scipy readers: imported only when a run starts.
  from jaxface import paths, weights as weights_lib
  if cfg.weights:
    path = paths.expand(cfg.weights)
    if not os.path.isfile(path):
      raise ValueError(f"weights={cfg.weights!r}: no such file ({path})")
    return weights_lib.load_vgg19(path)
  w = weights_lib.load_vgg19()
  if w is None:
    printer(RANDOM_WEIGHTS_WARNING)
  return w


def build_network(cfg: NSTConfig, weights) -> tuple[nnx.GraphDef, nnx.State, Any, str]:
  """(graphdef, params, preprocessing, source) of the VGG19 to use."""
  model = vgg19.build_vgg19(pooling=cfg.pooling, seed=cfg.seed, weights=weights)
  graphdef, params = nnx.split(model)
  if weights is None:
    return graphdef, params, vgg19.TORCH, f"random-init(seed={cfg.seed})"
  return graphdef, params, weights.preprocessing, str(weights.source)


# --------------------------------------------------------------------------- costs and step


def make_optimizer(cfg: NSTConfig) -> optax.GradientTransformation:
  if cfg.optimizer == "lbfgs":
    return optax.lbfgs()  # zoom line search picks the step size
  return optax.adam(cfg.learning_rate)


def make_batch_cost(graphdef: nnx.GraphDef, cfg: NSTConfig, prep):
  """``cost(images [B, H, W, 3], vgg, content_acts [B, h, w, c], grams {layer: [c, c]})
  -> (J [B], terms)``: ``J = alpha J_content + beta J_style + gamma TV`` per image.

  Each image's cost depends on that image only (VGG19 has no batch
  statistics), so the gradient of ``sum(J)`` is every image's own gradient:
  the whole batch goes through the network as one ``[B, ...]`` array (one
  large convolution per layer instead of B vmapped ones). ``terms`` holds
  the unweighted ``content``, ``style`` and ``tv`` costs, ``[B]`` float32.
  """
  lambdas = cfg.style_lambdas()
  layer, last = cfg.content_layer, cfg.last_layer()

  luminance = cfg.preserve_color == "luminance"
  yiq_y = jnp.asarray(images_lib.RGB_TO_Y, jnp.float32)

  def cost(images, vgg, content_acts, grams, grad_kernels=None):
    seen = images
    if luminance:
      # Luminance-only transfer: the network sees Y in all three channels;
      # the colour comes from the content image when saving.
      seen = jnp.broadcast_to((images @ yiq_y)[..., None], images.shape)
    feats = vgg19.features(graphdef, vgg, vgg19.preprocess(seen, prep), last, grad_kernels)
    j_content = costs.content_cost(content_acts, feats[layer], normalize=cfg.content_normalize)
    j_style = costs.style_cost(grams, {n: feats[n] for n in lambdas}, lambdas)
    tv = costs.total_variation(images)
    j = costs.total_cost(j_content, j_style, tv, alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.tv_weight)
    return j, {"content": j_content, "style": j_style, "tv": tv}

  return cost


def make_image_cost(graphdef: nnx.GraphDef, cfg: NSTConfig, prep):
  """``cost(image [H, W, 3], vgg, content_act [h, w, c], grams {layer: [c, c]}) -> (J, terms)``.

  One image (``make_batch_cost`` of a batch of one). ``terms`` holds the
  unweighted ``content``, ``style`` and ``tv`` costs, scalar float32.
  """
  batch_cost = make_batch_cost(graphdef, cfg, prep)

  def cost(image, vgg, content_act, grams, grad_kernels=None):
    j, terms = batch_cost(image[None], vgg, content_act[None], grams, grad_kernels)
    return j[0], {k: v[0] for k, v in terms.items()}

  return cost


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: NSTConfig, prep,
              *, jit: bool = True):
  """Builds the pure ``step(state, consts) -> (state, metrics)``.

  ``consts`` is ``{"vgg": params, "content": [B, h, w, c], "grams": {layer: [c, c]}}``,
  optionally with ``"grad_kernels": vgg19.input_grad_kernels(params)`` (as
  ``scale_consts`` makes it: the same step, a faster backward pass).
  Every image of ``state["image"] [B, H, W, 3]`` takes one optimizer step
  with its own optimizer state (shared style Grams and weights), exactly as
  separate runs would, while the convolutions run batched: Adam runs
  the whole batch through VGG19 at once (``make_batch_cost``), L-BFGS one
  image at a time (vmapped; its line search needs each image's own cost). A step
  whose cost is not finite leaves the state as it was and records its number
  in ``state["bad_step"]``; the host stops at the next log step. Metrics
  (``train/loss``, ``train/content``, ``train/style``, ``train/tv``) are
  means over the batch. Jitted with the state donated unless ``jit=False``.
  """
  cost = make_image_cost(graphdef, cfg, prep)
  batch_cost = make_batch_cost(graphdef, cfg, prep)
  lbfgs = cfg.optimizer == "lbfgs"

  def one_lbfgs(image, opt_state, content_act, vgg, grams, grad_kernels):
    # L-BFGS's line search evaluates each image's own cost: one image at a time.
    fn = lambda im: cost(im, vgg, content_act, grams, grad_kernels)
    (j, terms), grad = jax.value_and_grad(fn, has_aux=True)(image)
    updates, new_opt = tx.update(grad, opt_state, image, value=j, grad=grad,
                                 value_fn=lambda im: fn(im)[0])
    new_image = optax.apply_updates(image, updates)
    ok = jnp.isfinite(j) & jnp.all(jnp.isfinite(new_image))
    return new_image, new_opt, j, terms, ok

  def adam_one(grad, opt_state, image):
    updates, new_opt = tx.update(grad, opt_state, image)
    # Projected Adam: pixels stay displayable, as in crowsonkb/style-transfer-pytorch.
    return jnp.clip(optax.apply_updates(image, updates), 0.0, 1.0), new_opt

  def batched(images, opt_state, content_acts, vgg, grams, grad_kernels):
    if lbfgs:
      return jax.vmap(one_lbfgs, in_axes=(0, 0, 0, None, None, None))(
          images, opt_state, content_acts, vgg, grams, grad_kernels)
    # The batch's costs are independent: d sum(J) / d image_b = d J_b / d image_b.
    total = lambda ims: (lambda j, t: (jnp.sum(j), (j, t)))(
        *batch_cost(ims, vgg, content_acts, grams, grad_kernels))
    (_, (j, terms)), grad = jax.value_and_grad(total, has_aux=True)(images)
    new_images, new_opt = jax.vmap(adam_one)(grad, opt_state, images)
    ok = jnp.isfinite(j) & jnp.all(jnp.isfinite(new_images), axis=(1, 2, 3))
    return new_images, new_opt, j, terms, ok

  def step(state: State, consts: dict) -> tuple[State, dict]:
    new_image, new_opt, j, terms, ok = batched(state["image"], state["opt_state"],
                                               consts["content"], consts["vgg"], consts["grams"],
                                               consts.get("grad_kernels"))
    ok = jnp.all(ok) & (state["bad_step"] < 0)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {
        "image": keep(new_image, state["image"]),
        "opt_state": keep(new_opt, state["opt_state"]),
        "step": state["step"] + 1,
        "scale_index": state["scale_index"],
        "seed": state["seed"],
        "bad_step": jnp.where(ok | (state["bad_step"] >= 0), state["bad_step"], state["step"]),
    }
    metrics = {"train/loss": jnp.mean(j), **{f"train/{k}": jnp.mean(v) for k, v in terms.items()}}
    return new_state, metrics

  return jax.jit(step, donate_argnums=(0,)) if jit else step


def make_targets(graphdef: nnx.GraphDef, cfg: NSTConfig, prep):
  """Jitted target functions.

  Returns:
    ``content_fn(vgg, contents [B, H, W, 3]) -> [B, h, w, c]`` (content layer) and
    ``gram_fn(vgg, style [1, Hs, Ws, 3]) -> {layer: [c, c]}``.
  """
  lambdas = cfg.style_lambdas()

  @jax.jit
  def content_fn(vgg, contents):
    x = vgg19.preprocess(contents, prep)
    return vgg19.features(graphdef, vgg, x, cfg.content_layer)[cfg.content_layer]

  @jax.jit
  def gram_fn(vgg, style):
    x = vgg19.preprocess(style, prep)
    feats = vgg19.features(graphdef, vgg, x, vgg19.deepest(list(lambdas)))
    return {n: costs.gram(feats[n][0]) for n in lambdas}

  return content_fn, gram_fn


def scale_consts(cfg: NSTConfig, problem: Problem, k: int, vgg: nnx.State, targets,
                 mesh=None, grad_kernels=None) -> dict:
  """Constants of scale ``k``: weights (and their input-gradient kernels), content activations,
  blended style Grams; computed once per scale and passed to the step as arguments.

  With a ``mesh`` the content activations are computed where they are used:
  the content batch and a replicated copy of ``vgg`` are placed on the mesh
  first, so each device runs the forward pass on its own images only.
  ``grad_kernels``: ``vgg19.input_grad_kernels(vgg)`` when already computed
  (they depend on the weights only; a run computes them once, not per scale).

  A style image of another size than the output has Grams summed over another
  number of positions; each is rescaled by ``(nH nW)_generated / (nH nW)_style``
  so that the lecture's ``1/(2 nH nW nC)^2`` (generated sizes) applies as if
  both had the output's size. Equal sizes: no change.
  """
  content_fn, gram_fn = targets
  contents, styles = scale_images(cfg, problem, k)
  h, w = problem.shapes[k]
  per_style = []
  for st in styles:
    grams = gram_fn(vgg, jnp.asarray(st[None]))
    for n in grams:
      f = vgg19.downsampling(n)
      gen = (h // f) * (w // f)
      sty = (st.shape[0] // f) * (st.shape[1] // f)
      grams[n] = grams[n] * (gen / sty)
    per_style.append(grams)
  blended = {n: costs.blend_grams([g[n] for g in per_style], problem.blend)
             for n in per_style[0]}
  if grad_kernels is None:
    grad_kernels = vgg19.input_grad_kernels(vgg, cfg.conv_impl, cfg.last_layer())
  if mesh is None:
    content = content_fn(vgg, jnp.asarray(contents))
  else:
    rep = mesh_lib.replicated(mesh)
    vgg = jax.tree.map(lambda x: mesh_lib.place(x, rep), vgg)
    content = content_fn(vgg, mesh_lib.place(contents, mesh_lib.batch_sharding(mesh)))
  return {"vgg": vgg, "content": content, "grams": blended, "grad_kernels": grad_kernels}


# --------------------------------------------------------------------------- state


def initial_image(cfg: NSTConfig, contents: np.ndarray) -> jax.Array:
  """Start image ``[B, H, W, 3] float32``: noise, content, or content plus noise (seeded per image)."""
  return _initial_image(jnp.asarray(contents, jnp.float32), cfg.seed, cfg.init, cfg.noise_ratio)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _initial_image(contents, seed, init, noise_ratio):
  # Image i's noise comes from fold_in(key(seed), i): the same in a batch as alone.
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
      jnp.arange(contents.shape[0]))
  noise = jax.vmap(lambda k: jax.random.uniform(k, contents.shape[1:], jnp.float32))(keys)
  if init == "noise":
    return noise
  if init == "content":
    return contents
  return (1.0 - noise_ratio) * contents + noise_ratio * noise


def new_state(tx: optax.GradientTransformation, image: jax.Array, *, step: int, scale_index: int,
              seed: int) -> State:
  """The run state (what is checkpointed) for generated images ``[B, H, W, 3] float32``, RGB
  in [0, 1]: ``image``, ``opt_state`` (per image), ``step`` (global, across scales),
  ``scale_index``, ``seed`` and ``bad_step``. Everything else is a deterministic function
  of the config, so a run killed at any point resumes to bitwise the same images as an
  uninterrupted one (same machine and XLA build)."""
  # Strong dtypes: L-BFGS's initial state holds weak-typed scalars that its
  # update returns strongly typed, which would compile the step twice.
  opt_state = jax.tree.map(lambda x: jnp.asarray(x, x.dtype), jax.vmap(tx.init)(image))
  return {
      "image": image,
      "opt_state": opt_state,
      "step": jnp.asarray(step, jnp.int32),
      "scale_index": jnp.asarray(scale_index, jnp.int32),
      "seed": jnp.asarray(seed, jnp.int32),
      "bad_step": jnp.full((), -1, jnp.int32),
  }


def next_scale(tx: optax.GradientTransformation, state: State, shape: tuple[int, int]) -> State:
  """Upsamples the images to the next scale's ``shape`` and restarts the optimizer there."""
  image = state["image"]
  up = jnp.clip(jax.image.resize(image, (image.shape[0], *shape, 3), "cubic"), 0.0, 1.0)
  return new_state(tx, up, step=int(state["step"]), scale_index=int(state["scale_index"]) + 1,
                   seed=int(state["seed"]))


def scale_bounds(cfg: NSTConfig) -> list[int]:
  """Global step at which each scale starts, plus the total: ``[0, n0, n0 + n1, ...]``."""
  return [0, *np.cumsum(cfg.steps_per_scale()).tolist()]


def scale_of_step(cfg: NSTConfig, step: int) -> int:
  """Scale whose images a state saved after global ``step`` holds (a boundary step: the coarser)."""
  bounds = scale_bounds(cfg)
  for k in range(len(bounds) - 1):
    if step <= bounds[k + 1]:
      return k
  raise ValueError(f"step {step} is past the configured {bounds[-1]} steps")


def output_image(cfg: NSTConfig, problem: Problem, image: np.ndarray, k: int) -> np.ndarray:
  """What to save for generated ``[B, H, W, 3]`` at scale ``k``: luminance mode restores colours."""
  image = np.clip(np.asarray(image, np.float32), 0, 1)
  if cfg.preserve_color == "luminance":
    shape = problem.shapes[k]
    contents = np.stack([images_lib.resize_cover(c, shape) for c in problem.contents])
    image = images_lib.combine_luminance(image, contents)
  return image


# --------------------------------------------------------------------------- loop


def run(cfg: NSTConfig, workdir: str, *, stop_after: int | None = None,
        printer: Callable[[str], None] = _stderr) -> dict:
  """Style transfer (resuming from ``workdir``); writes the stylised PNGs there.

  Args:
    cfg: the config (validated here, images checked before any compute).
    workdir: run directory: ``checkpoints/``, ``config.json``,
      ``train_log.jsonl``, ``snapshots/``, ``<content>_stylized.png``,
      ``result.json``.
    stop_after: stop (checkpointed) once this global step is reached, as a
      pre-empted job would.
    printer: where progress lines and warnings go (default: stderr; process
      0's; the other processes of a multi-process run are silent).

  With several processes (``jax.distributed``) every process calls ``run``
  with the same config; the batch is split over the devices of all of them,
  every process takes part in checkpointing (orbax coordinates them), and
  process 0 alone prints and writes ``config.json``, ``train_log.jsonl``,
  snapshots, the stylised PNGs and ``result.json`` (:mod:`jaxface.runloop`).

  Returns:
    ``{"outputs": [paths], "final": {metric: value}, "steps": n, "images":
    [B, H, W, 3] float32}`` (the optimised images before colour restoration;
    the whole batch on every process), or ``{}`` when stopped early.
  """
  problem = prepare(cfg)
  # Checked before any compute: enough devices, batch a multiple of them.
  mesh = sharding_lib.make_mesh(cfg.num_devices, len(problem.contents))
  printer = runloop.primary_printer(printer)  # one process speaks for all
  weights = load_weights(cfg, printer)
  graphdef, vgg, prep, source = build_network(cfg, weights)
  os.makedirs(workdir, exist_ok=True)
  tx = make_optimizer(cfg)
  step_fn = (make_step(graphdef, tx, cfg, prep) if mesh is None else
             sharding_lib.jit_step(make_step(graphdef, tx, cfg, prep, jit=False), mesh))
  targets = make_targets(graphdef, cfg, prep)
  saved_dict = {**cfg.to_dict(), "weights_source": source}
  bounds = scale_bounds(cfg)
  printer(f"style transfer: {len(problem.contents)} content image(s), {len(problem.styles)} style "
          f"image(s), scales {' -> '.join(f'{h}x{w}' for h, w in problem.shapes)}, "
          f"{bounds[-1]} steps, {cfg.optimizer}, weights {source}, {mesh_lib.describe(mesh)}")

  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=cfg.max_to_keep)
  try:
    state = None
    saved = ckpt.restore_config()
    if saved is not None:
      checkpointing.check_resumable(saved, saved_dict, may_change=RESUMABLE_CHANGES)
      last = ckpt.latest_step()
      k = scale_of_step(cfg, last)
      b = len(problem.contents)
      template = sharding_lib.place_state(
          new_state(tx, jnp.zeros((b, *problem.shapes[k], 3), jnp.float32), step=0,
                    scale_index=k, seed=cfg.seed), mesh)
      _, state = ckpt.restore(checkpointing.abstract_like(template))
      if int(state["scale_index"]) != k or int(state["seed"]) != cfg.seed:
        raise checkpointing.CheckpointError(
            f"checkpoint {ckpt.directory}/{last} holds scale {int(state['scale_index'])}, seed "
            f"{int(state['seed'])}; expected scale {k}, seed {cfg.seed}")
      printer(f"resumed from {ckpt.directory}/{last} (scale {k + 1}/{len(problem.shapes)})")
    if runloop.is_primary():
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(saved_dict, f, indent=2)
    return _loop(cfg, workdir, problem, state, step_fn, tx, vgg, targets, ckpt, saved_dict,
                 stop_after, printer, mesh)
  finally:
    ckpt.close()


def _check_health(state: State) -> None:
  runloop.check_bad_step(
      state["bad_step"], what="cost", kept="the images are kept from before that step",
      hint="Lower `learning_rate`, `beta` or `alpha`, or use optimizer='adam'", error=TransferError)


def _loop(cfg, workdir, problem, state, step_fn, tx, vgg, targets, ckpt, saved_dict, stop_after,
          printer, mesh=None) -> dict:
  bounds = scale_bounds(cfg)
  total = bounds[-1]
  n_scales = len(problem.shapes)
  metrics_log = runloop.MetricsLog(workdir)  # process 0 writes
  k = 0 if state is None else int(state["scale_index"])
  host: dict = {}
  grad_kernels = None
  run_time = runloop.Meter()
  while k < n_scales:
    consts = sharding_lib.place_consts(
        scale_consts(cfg, problem, k, vgg, targets, mesh, grad_kernels), mesh)
    grad_kernels = consts["grad_kernels"]
    if state is None:
      contents, _ = scale_images(cfg, problem, k)
      state = new_state(tx, initial_image(cfg, contents), step=0, scale_index=k, seed=cfg.seed)
    state = sharding_lib.place_state(state, mesh)  # unchanged without a mesh
    step = int(state["step"])
    h, w = problem.shapes[k]
    meter = runloop.Meter(step)  # the rate of this scale's steps
    while step < bounds[k + 1]:
      state, metrics = step_fn(state, consts)
      step += 1
      is_end = step == bounds[k + 1] or step == stop_after
      if runloop.every(step, cfg.log_every, last=is_end):
        host = runloop.host_metrics(metrics)
        _check_health(state)
        rate = meter.tick(step)
        # Later scales cost about (area ratio) times more per step.
        left = meter.eta((bounds[k + 1] - step) + sum(
            (bounds[j + 1] - bounds[j]) * (np.prod(problem.shapes[j]) / (h * w))
            for j in range(k + 1, n_scales)))
        printer(f"scale {k + 1}/{n_scales} {h}x{w} step {step:5d}/{total} "
                f"{runloop.bar(step, total)} loss {host['train/loss']:.4g} "
                f"content {host['train/content']:.4g} style {host['train/style']:.4g} "
                f"tv {host['train/tv']:.4g}  {rate:.2f} step/s  ETA {runloop.format_eta(left)}")
        metrics_log.write({"step": step, "scale": k, **host, "train/steps_per_s": rate})
      if runloop.every(step, cfg.snapshot_every):
        _write_images(cfg, problem, state, k, os.path.join(workdir, "snapshots"), f"step{step:06d}_")
      if runloop.every(step, cfg.checkpoint_every, last=is_end):
        _check_health(state)
        runloop.save_copy(ckpt, step, state, saved_dict)  # every process saves its shards
      if stop_after is not None and step >= stop_after:
        ckpt.wait()
        printer(f"stopped at step {step} (stop_after); resume with the same workdir")
        return {}
    if k + 1 < n_scales:
      state = next_scale(tx, state, problem.shapes[k + 1])
    k += 1
  ckpt.wait()
  _check_health(state)
  outputs, images = _write_images(cfg, problem, state, n_scales - 1, workdir, "",
                                  suffix="_stylized")
  result = {"outputs": outputs, "final": host, "steps": total}
  if runloop.is_primary():
    with open(os.path.join(workdir, "result.json"), "w") as f:
      json.dump(result, f, indent=2)
  result["images"] = images
  printer(f"done in {run_time.elapsed():.1f}s: wrote {', '.join(outputs)}")
  return result


def _write_images(cfg, problem, state, k, folder, prefix, suffix="") -> tuple[list[str], np.ndarray]:
  """Writes the current images as PNGs (process 0 only).

  Every process must call it: with several processes the images are gathered
  from all of them first.

  Returns:
    The PNG paths, and the images ``[B, H, W, 3] float32`` as optimised.
  """
  images = mesh_lib.to_host(state["image"])
  out = output_image(cfg, problem, images, k)
  written = []
  for img, name in zip(out, problem.content_names):
    path = os.path.join(folder, f"{prefix}{name}{suffix}.png")
    if runloop.is_primary():
      images_lib.save_png(path, img)
    written.append(path)
  return written, images
