r"""Benchmark: one Gatys style transfer step (VGG19 forward/backward, costs, Adam), ms/step.

Compares, in the same run and on the same shapes (content relu4_2 + style
relu1_1..relu5_1; lecture costs; Adam; pixels clipped to [0, 1]), jaxface's
jitted, donated ``jaxface.style.transfer.make_step`` with its constants
precomputed (``scale_consts``), with the default XLA flags, with
``experiments.flagutil.tune_cpu_xla()`` (``jax_tuned``) and with
``conv_impl="xla"`` (``jax_xla``), against an equivalent PyTorch CPU eager step
written here (NCHW, weights frozen, only the image requires grad; ``pip install
torch==2.13.0``). Reports wall and process CPU time per step, and a batch of 4
content images in one JAX step against 4 single-image steps.

  python -m experiments.bench.nst_step [--sizes=256,512] [--steps=5] [--rounds=5]
      [--variants=jax,jax_tuned,torch] [--conv_impl=auto] [--batch=4]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

from experiments.flagutil import YNN_FLAG

flags.DEFINE_list("sizes", ["256", "512"], "square image sizes to time")
flags.DEFINE_integer("steps", 5, "timed steps per variant (after 2 warm-up steps)")
flags.DEFINE_integer("batch", 4, "content images in the batched JAX variant (1: skip it)")
flags.DEFINE_integer("rounds", 2, "variants run interleaved this many times; the best median counts "
                     "(other processes on a shared CPU make single runs noisy)")
flags.DEFINE_enum("conv_impl", "auto", ["auto", "xla", "winograd"],
                  "VGG19 convolutions of the jax variants (jaxface.models.vgg19.input_grad_kernels)")
flags.DEFINE_list("variants", ["jax", "jax_tuned", "torch"],
                  "what to time: jax (default XLA flags, --conv_impl), jax_tuned (the same with "
                  "experiments.flagutil.tune_cpu_xla's flag), jax_xla (default flags, conv_impl=xla), "
                  "torch")
flags.DEFINE_string("worker", "", "internal: run one variant and print JSON")
FLAGS = flags.FLAGS

CONTENT_LAYER = "relu4_2"
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
ALPHA, BETA, TV, LR = 1.0, 1e7, 0.1, 0.02


def _timed(step, steps: int) -> tuple[list[float], list[float]]:
  """Wall and process CPU seconds (all threads) of each of ``steps`` calls.

  On a shared machine the CPU time is the steadier figure: other processes
  stretch the wall time of a step, much less the work it does.
  """
  times, cpu = [], []
  for _ in range(steps):
    t, c = time.perf_counter(), time.process_time()
    step()
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return times, cpu


def _summary(times: list[float], cpu: list[float]) -> dict:
  return {"ms_per_step": 1e3 * sorted(times)[len(times) // 2], "min_ms": 1e3 * min(times),
          "cpu_ms": 1e3 * sorted(cpu)[len(cpu) // 2]}


def _jax_worker(size: int, batch: int, steps: int, conv_impl: str) -> dict:
  import dataclasses

  import jax

  from jaxface.style import transfer
  from jaxface.style.config import NSTConfig
  content = ",".join((["builtin:scene", "builtin:checker"] * batch)[:batch])
  cfg = NSTConfig(content=content, size=size, num_scales=1, steps=(steps,), alpha=ALPHA, beta=BETA,
                  tv_weight=TV, learning_rate=LR, content_layer=CONTENT_LAYER,
                  style_layers=",".join(STYLE_LAYERS), init="content_noise", noise_ratio=0.3)
  problem = transfer.prepare(cfg)
  graphdef, vgg, prep, _ = transfer.build_network(cfg, None)
  tx = transfer.make_optimizer(cfg)
  cfg = dataclasses.replace(cfg, conv_impl=conv_impl)  # what `python -m experiments.nst --conv_impl` runs
  consts = transfer.scale_consts(cfg, problem, 0, vgg, transfer.make_targets(graphdef, cfg, prep))
  contents, _ = transfer.scale_images(cfg, problem, 0)
  state = transfer.new_state(tx, transfer.initial_image(cfg, contents), step=0, scale_index=0, seed=0)
  step_fn = transfer.make_step(graphdef, tx, cfg, prep)
  box = [state]

  def one():
    box[0], m = step_fn(box[0], consts)
    jax.block_until_ready(m)
    return m

  t0 = time.perf_counter()
  first_loss = float(one()["train/loss"])
  compile_s = time.perf_counter() - t0
  one()
  return {**_summary(*_timed(one, steps)), "compile_s": compile_s, "first_loss": first_loss}


def _jax_inputs(size: int):
  """The JAX variant's config, weights, first image and targets' inputs (for the torch twin)."""
  from jaxface.style import transfer
  from jaxface.style.config import NSTConfig
  cfg = NSTConfig(content="builtin:scene", size=size, num_scales=1, steps=(1,), content_layer=CONTENT_LAYER,
                  style_layers=",".join(STYLE_LAYERS), init="content_noise", noise_ratio=0.3)
  problem = transfer.prepare(cfg)
  graphdef, vgg, prep, _ = transfer.build_network(cfg, None)
  contents, styles = transfer.scale_images(cfg, problem, 0)
  image = transfer.initial_image(cfg, contents)
  return vgg, contents, styles[0], image


def _torch_worker(size: int, steps: int) -> dict:
  import numpy as np
  import torch
  import torch.nn.functional as F
  from torch import nn
  # Same random weights, images and start image as the JAX variant: the
  # first-step losses must agree, which checks that both compute the same thing.
  vgg, content, style, image0 = _jax_inputs(size)
  content, image0 = np.asarray(content), np.asarray(image0)
  depths, widths = (2, 2, 4, 4, 4), (64, 128, 256, 512, 512)
  convs, cin = {}, 3
  for b, (d, w) in enumerate(zip(depths, widths), start=1):
    for i in range(1, d + 1):
      name = f"conv{b}_{i}"
      conv = nn.Conv2d(cin, w, 3, padding=1)
      with torch.no_grad():  # HWIO -> OIHW
        conv.weight.copy_(torch.from_numpy(np.asarray(vgg[name]["kernel"][...]).transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.asarray(vgg[name]["bias"][...])))
      conv.requires_grad_(False)
      convs[name] = conv
      cin = w
  wanted = set(STYLE_LAYERS) | {CONTENT_LAYER}
  last = "relu5_1"
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

  def features(x):
    x = (x - mean) / std
    out = {}
    for b, d in enumerate(depths, start=1):
      for i in range(1, d + 1):
        x = F.relu(convs[f"conv{b}_{i}"](x))
        name = f"relu{b}_{i}"
        if name in wanted:
          out[name] = x
        if name == last:
          return out
      x = F.max_pool2d(x, 2)
    return out

  def gram(a):
    c = a.shape[1]
    f = a.reshape(c, -1)
    return f @ f.t()

  def to_t(img):
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)[None]))

  with torch.no_grad():
    target_c = features(to_t(content[0]))[CONTENT_LAYER]
    target_g = {n: gram(a) for n, a in features(to_t(style)).items() if n in STYLE_LAYERS}
  image = to_t(image0[0]).clone().requires_grad_(True)
  opt = torch.optim.Adam([image], lr=LR)
  lam = 1.0 / len(STYLE_LAYERS)

  def one():
    opt.zero_grad(set_to_none=True)
    feats = features(image)
    j_c = 0.5 * torch.sum((feats[CONTENT_LAYER] - target_c) ** 2)
    j_s = 0.0
    for n in STYLE_LAYERS:
      a = feats[n]
      _, c, h, w = a.shape
      j_s = j_s + lam * torch.sum((target_g[n] - gram(a)) ** 2) / (2.0 * h * w * c) ** 2
    tv = torch.sum((image[:, :, 1:] - image[:, :, :-1]) ** 2) + torch.sum(
        (image[:, :, :, 1:] - image[:, :, :, :-1]) ** 2)
    loss = ALPHA * j_c + BETA * j_s + TV * tv
    loss.backward()
    opt.step()
    with torch.no_grad():
      image.clamp_(0, 1)
    return float(loss)

  t0 = time.perf_counter()
  first_loss = one()
  first_s = time.perf_counter() - t0
  one()
  return {**_summary(*_timed(one, steps)), "compile_s": first_s, "first_loss": first_loss,
          "threads": torch.get_num_threads()}


def _spawn(kind: str, size: int, batch: int, steps: int, tuned: bool, conv_impl: str) -> dict | None:
  """Runs one variant in its own subprocess, so XLA_FLAGS apply and the peak RSS
  (``ru_maxrss``) is that variant's alone; returns its JSON record (None on failure)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if tuned:
    env["XLA_FLAGS"] = YNN_FLAG
  cmd = [sys.executable, "-m", "experiments.bench.nst_step",
         f"--worker={kind}:{size}:{batch}:{conv_impl}", f"--steps={steps}"]
  r = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if r.returncode != 0:
    tail = r.stderr.strip().splitlines()[-1:] or ["?"]
    print(f"  {kind} {size}px failed: {tail[0]}", flush=True)
    return None
  return json.loads(r.stdout.strip().splitlines()[-1])


def _load() -> str:
  return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def _ratio_line(size: int, name: str, runs: list[tuple[dict, dict]]) -> str:
  """Per-round ratios (JAX run / the torch run of the same round): min and median over rounds.

  On a machine shared with other jobs the wall-time ratio swings widely between runs
  (PyTorch's OpenMP threads suffer most), the CPU-time ratio much less; so besides the
  ratio of the best medians the script prints these (variants of a round run back to back).
  """
  def stats(key):
    ratios = sorted(a[key] / b[key] for a, b in runs)
    return f"{ratios[0]:.2f}/{ratios[len(ratios) // 2]:.2f}"
  return (f"{size:4d}px {name} / torch per round (min/median of {len(runs)}): medians "
          f"{stats('ms_per_step')}, fastest steps {stats('min_ms')}, CPU time {stats('cpu_ms')}")


def main(argv):
  del argv
  if FLAGS.worker:
    kind, size, batch, *impl = FLAGS.worker.split(":")
    size, batch = int(size), int(batch)
    if kind == "jax":
      res = _jax_worker(size, batch, FLAGS.steps, impl[0] if impl else "auto")
    else:
      res = _torch_worker(size, FLAGS.steps)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))
    return
  try:
    import torch  # noqa: F401
    have_torch = True
  except ImportError:
    have_torch = False
    print("torch not installed (pip install torch==2.13.0): JAX figures only")
  print(f"VGG19 conv1_1..conv5_1, content {CONTENT_LAYER} + {len(STYLE_LAYERS)} style layers, Adam; "
        f"median of {FLAGS.steps} steps; {os.cpu_count()} CPUs; conv_impl={FLAGS.conv_impl}; "
        f"{_load()}", flush=True)
  results = {}
  known = {"jax": ("jax", False, FLAGS.conv_impl), "jax_tuned": ("jax", True, FLAGS.conv_impl),
           "jax_xla": ("jax", False, "xla"), "torch": ("torch", False, "")}
  for name in FLAGS.variants:
    if name not in known:
      raise app.UsageError(f"--variants: unknown {name!r}; choose from {', '.join(known)}")
  variants = [n for n in FLAGS.variants if have_torch or n != "torch"]
  for size in (int(s) for s in FLAGS.sizes):
    row: dict = {}
    rounds: list[dict] = []
    for _ in range(FLAGS.rounds):
      this = {}
      for name in variants:
        kind, tuned, impl = known[name]
        r = _spawn(kind, size, 1, FLAGS.steps, tuned=tuned, conv_impl=impl)
        if r:
          this[name] = r
        if r and (name not in row or r["ms_per_step"] < row[name]["ms_per_step"]):
          row[name] = r
      rounds.append(this)
    results[size] = row
    for name, r in row.items():
      print(f"{size:4d}px {name:10s} {r['ms_per_step']:8.1f} ms/step (min {r['min_ms']:.1f}, CPU "
            f"{r['cpu_ms']:.0f})  first step {r['compile_s']:.1f}s  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    if "torch" in row:
      b = row["torch"]["first_loss"]
      for name in (n for n in row if n != "torch"):
        a = row[name]["first_loss"]
        rel = abs(a - b) / abs(b)
        # Winograd F(4x4, 3x3) rounds each layer to ~1e-5 of its scale (tests/test_winograd.py);
        # the loss sums squares of many such values, so a relative 1e-5 bounds a correct run.
        print(f"{size:4d}px first-step loss: {name} {a:.8g}, torch {b:.8g} (relative difference "
              f"{rel:.1e}{'' if rel < 1e-5 else ', ABOVE 1e-5: check the numerics'})", flush=True)
      for name in (n for n in row if n != "torch"):
        print(f"{size:4d}px {name} / torch = {row[name]['ms_per_step'] / row['torch']['ms_per_step']:.2f} "
              f"(best medians), {row[name]['min_ms'] / row['torch']['min_ms']:.2f} (fastest steps), "
              f"{row[name]['cpu_ms'] / row['torch']['cpu_ms']:.2f} (CPU time)", flush=True)
        runs = [(r[name], r["torch"]) for r in rounds if name in r and "torch" in r]
        if runs:
          print(_ratio_line(size, name, runs), flush=True)
    print(f"     {_load()}", flush=True)
  if FLAGS.batch <= 1:
    return
  size = int(FLAGS.sizes[0])
  # experiments.nst runs with the default XLA flags (see there): the batch is
  # compared with that single-image variant.
  name = "jax"
  single = results[size].get(name)
  batched = None
  for _ in range(FLAGS.rounds):
    r = _spawn("jax", size, FLAGS.batch, FLAGS.steps, tuned=False, conv_impl=FLAGS.conv_impl)
    if r and (batched is None or r["ms_per_step"] < batched["ms_per_step"]):
      batched = r
  if single and batched:
    sep = FLAGS.batch * single["ms_per_step"]
    print(f"{size:4d}px {name} batch of {FLAGS.batch}: {batched['ms_per_step']:.1f} ms/step "
          f"({1e3 * FLAGS.batch / batched['ms_per_step']:.2f} image-steps/s, peak RSS "
          f"{batched['peak_rss_mb']:.0f} MB) vs {FLAGS.batch} separate runs {sep:.1f} ms "
          f"({1e3 * FLAGS.batch / sep:.2f} image-steps/s): {sep / batched['ms_per_step']:.2f}x",
          flush=True)


if __name__ == "__main__":
  from experiments import flagutil as _flagutil
  app.run(main, flags_parser=_flagutil.parse_flags_exit2)
