r"""Prepared accelerator benchmark: one table of the headline figures on one device.

Triplet training images/s, Gatys style transfer ms/step and ``SearchIndex.identify``
queries/s on ``jax.devices()[0]`` (plus sharded rows over all local devices when there
are several); what each row measures: BUILD.md, "Accelerator benchmark". Each row
reports the first call (trace + compile + run) separately; the figure is the median
of the timed calls that follow. Sizes for a CPU smoke run:

  python -m experiments.bench.gpu                               # the real thing (GPU)
  python -m experiments.bench.gpu --train_P=2 --train_K=2 --train_widths=8,16 \
      --train_depths=1,1 --nst_size=32 --nst_batch=2 --nst_content_layer=relu1_2 \
      --nst_style_layers=relu1_1 --gallery=5000 --queries=16 --min_time=0
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import sys
import time
import traceback

from absl import app, flags

from experiments import flagutil
from experiments.bench import timing

SECTIONS = ("train", "nst", "identify")
flags.DEFINE_list("sections", list(SECTIONS), "which figures to measure")
flags.DEFINE_integer("train_P", 16, "identities per training batch", lower_bound=2)
flags.DEFINE_integer("train_K", 4, "images per identity", lower_bound=2)
flags.DEFINE_list("train_image", ["64", "64"], "training image H,W (crops are 7/8 of it)")
flags.DEFINE_list("train_widths", None, "encoder stage widths (default: TripletConfig's)")
flags.DEFINE_list("train_depths", None, "encoder stage depths (default: TripletConfig's)")
flags.DEFINE_integer("train_steps", 20, "timed training steps (after 3 warm-up steps)", lower_bound=1)
flags.DEFINE_integer("nst_size", 512, "style transfer image size, px (square)", lower_bound=8)
flags.DEFINE_integer("nst_steps", 10, "timed style transfer steps (after 2 warm-up steps)", lower_bound=1)
flags.DEFINE_string("nst_content_layer", "relu4_2", "content layer (smaller: a faster smoke test)")
flags.DEFINE_string("nst_style_layers", "relu1_1,relu2_1,relu3_1,relu4_1,relu5_1", "style layers")
flags.DEFINE_integer("nst_batch", 4, "content images in the batched rows (1: skip them)", lower_bound=1)
flags.DEFINE_integer("gallery", 1_000_000, "gallery embeddings for identify()", lower_bound=1)
flags.DEFINE_integer("queries", 256, "queries per identify() call", lower_bound=1)
flags.DEFINE_integer("k", 5, "candidates per query", lower_bound=1)
flags.DEFINE_float("recall_target", 0.95, "approx_max_k row: expected recall (0 skips the row)",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_float("min_time", 2.0, "seconds of timed identify() calls per row", lower_bound=0)
flags.DEFINE_integer("min_reps", 5, "at least this many timed identify() calls", lower_bound=1)
flags.DEFINE_float("budget_s", 420.0, "skip (and fail) sections that would start after this many "
                   "seconds, so the run ends well inside an 8-minute slot", lower_bound=1)
FLAGS = flags.FLAGS


def _say(text: str) -> None:
  print(text, flush=True)


def _row(section: str, what: str, figure: float, unit: str, first_s: float, note: str = "") -> None:
  _say(f"| {section:8s} | {what:58s} | {figure:12.2f} {unit:13s} | {first_s:8.1f} | {note}")


def _median_times(fn, reps: int) -> list[float]:
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def _median(xs: list[float]) -> float:
  return sorted(xs)[len(xs) // 2]


# --------------------------------------------------------------------------- sections


def bench_train() -> None:
  """Triplet training images/s: the jitted train step (augmentation, encoder forward/backward,
  batch-all triplet loss, AdamW) of the demo-size scratch encoder (``TripletConfig`` defaults,
  stem stride 2, as ``experiments.bench.encoder_step --config=demo``) on a fixed P*K batch
  already on the device (the input pipeline is not timed)."""
  import jax
  import numpy as np

  from jaxface.train import triplet
  from jaxface.train.config import TripletConfig
  h, w = (int(v) for v in FLAGS.train_image)
  kw = dict(stem_stride=2, P=FLAGS.train_P, K=FLAGS.train_K, image_size=(h, w),
            crop_size=(h * 7 // 8, w * 7 // 8), channels=3)
  if FLAGS.train_widths:
    kw["widths"] = tuple(int(v) for v in FLAGS.train_widths)
  if FLAGS.train_depths:
    kw["depths"] = tuple(int(v) for v in FLAGS.train_depths)
  if "num_devices" in {f.name for f in dataclasses.fields(TripletConfig)}:
    kw["num_devices"] = 1  # one device: this row is the single-accelerator figure
  cfg = TripletConfig(**kw)
  graphdef, tx, state = triplet.init_state(cfg)
  step_fn = triplet.make_train_step(graphdef, tx, cfg)
  b = cfg.P * cfg.K
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      "images": rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
      "labels": np.repeat(np.arange(cfg.P, dtype=np.int32), cfg.K)})
  box = [state]

  def one():
    box[0], m = step_fn(box[0], batch)
    jax.block_until_ready(m)

  t = time.perf_counter()
  one()
  first = time.perf_counter() - t
  for _ in range(2):
    one()
  med = _median(_median_times(one, FLAGS.train_steps))
  _row("train", f"triplet step, batch {b} ({cfg.P}x{cfg.K}) {h}x{w}->{cfg.crop_size[0]}x"
       f"{cfg.crop_size[1]}", b / med, "images/s", first,
       f"{1e3 * med:.1f} ms/step; widths {','.join(map(str, cfg.widths))}")


def _nst_rows(size: int, batch: int, devices: int) -> None:
  import jax

  from jaxface.style import sharding, transfer
  from jaxface.style.config import NSTConfig
  content = ",".join((["builtin:scene", "builtin:checker"] * batch)[:batch])
  cfg = NSTConfig(content=content, size=size, num_scales=1, steps=(1,),
                  content_layer=FLAGS.nst_content_layer, style_layers=FLAGS.nst_style_layers,
                  init="content_noise", num_devices=devices).validate()
  problem = transfer.prepare(cfg)
  mesh = sharding.make_mesh(cfg.num_devices, batch)
  graphdef, vgg, prep, _ = transfer.build_network(cfg, None)
  tx = transfer.make_optimizer(cfg)
  consts = transfer.scale_consts(cfg, problem, 0, vgg, transfer.make_targets(graphdef, cfg, prep))
  contents, _ = transfer.scale_images(cfg, problem, 0)
  state = transfer.new_state(tx, transfer.initial_image(cfg, contents), step=0, scale_index=0, seed=0)
  if mesh is None:
    step_fn = transfer.make_step(graphdef, tx, cfg, prep)
  else:
    step_fn = sharding.jit_step(transfer.make_step(graphdef, tx, cfg, prep, jit=False), mesh)
    state, consts = sharding.place_state(state, mesh), sharding.place_consts(consts, mesh)
  box = [state]

  def one():
    box[0], m = step_fn(box[0], consts)
    jax.block_until_ready(m)

  t = time.perf_counter()
  one()
  first = time.perf_counter() - t
  one()
  one()
  med = _median(_median_times(one, FLAGS.nst_steps))
  where = "1 device" if mesh is None else f"sharded over {mesh.devices.size} devices"
  _row("nst", f"{size}px, batch {batch}, {where}", 1e3 * med, "ms/step", first,
       f"{1e3 * med / batch:.1f} ms/image-step; random VGG19 weights")


def bench_nst() -> None:
  import jax
  size, b = FLAGS.nst_size, FLAGS.nst_batch
  _nst_rows(size, 1, 1)
  if b > 1:
    _nst_rows(size, b, 1)
    n = jax.local_device_count()
    if n > 1:
      if b % n:
        _say(f"  (nst: batch {b} does not split over {n} devices; sharded row skipped)")
      else:
        _nst_rows(size, b, n)


def _unit(rng, n: int, dim: int):
  import numpy as np
  out = np.empty((n, dim), np.float32)
  step = 1 << 18  # bounded temporaries
  for lo in range(0, n, step):
    x = rng.standard_normal((min(step, n - lo), dim), dtype=np.float32)
    out[lo:lo + step] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def bench_identify() -> None:
  import jax
  import numpy as np

  from jaxface.recognition import search
  rng = np.random.default_rng(0)
  m, q = FLAGS.gallery, FLAGS.queries
  gallery = _unit(rng, m, 128)
  queries = _unit(rng, q, 128)
  variants = [("1 device", None, False)]
  if jax.local_device_count() > 1:
    variants.append((f"sharded over {jax.local_device_count()} devices", jax.local_devices(), False))
  if FLAGS.recall_target > 0:
    # TPU's partial-reduce top-k; CPU and GPU lower approx_max_k to an exact sort.
    variants.append((f"approx_max_k recall_target {FLAGS.recall_target:g}", None, True))
  top1 = None
  for name, devices, approx in variants:
    t = time.perf_counter()
    index = search.SearchIndex(gallery, np.arange(m), devices=devices, approx=approx,
                               recall_target=FLAGS.recall_target if approx else 0.95)
    jax.block_until_ready(index._chunks)  # noqa: SLF001 -- the build includes the device copy
    build = time.perf_counter() - t
    out, first, med = timing.timed(lambda: index.identify(queries, k=FLAGS.k, threshold=0.6),
                                   FLAGS.min_time, FLAGS.min_reps)
    note = ""
    if top1 is None:
      top1 = out
    elif approx:
      hits = (out["index"][:, :, None] == top1["index"][:, None, :]).any(-1)
      note = f"; recall@{FLAGS.k} vs exact {hits.mean():.4f}"
    else:
      same = out["index"][:, 0] == top1["index"][:, 0]
      near = np.abs(out["distances"][:, 0] - top1["distances"][:, 0]) <= 1e-5
      if not (same | near).all():
        raise RuntimeError(f"identify {name}: top-1 rows differ from one device on "
                           f"{int((~(same | near)).sum())} queries")
    _row("identify", f"gallery {m:,} x 128, {q} queries, k={FLAGS.k}, {name}", q / med, "queries/s",
         first, f"{1e3 * med:.1f} ms/call; build {build:.1f} s{note}")
    index = None  # frees the device gallery before the next variant (a lambda above reads it)


# --------------------------------------------------------------------------- main


def main(argv):
  if len(argv) > 1:
    flagutil.fail(f"unexpected arguments: {argv[1:]}")
  unknown = [s for s in FLAGS.sections if s not in SECTIONS]
  if unknown or not FLAGS.sections:
    flagutil.fail(f"--sections: expected some of {','.join(SECTIONS)}, got {FLAGS.sections}")
  try:
    image = [int(v) for v in FLAGS.train_image]
    for name in ("train_widths", "train_depths"):
      [int(v) for v in (FLAGS[name].value or [])]
  except ValueError as e:
    flagutil.fail(f"--train_image/--train_widths/--train_depths: expected integers ({e})")
  if len(image) != 2 or min(image) < 8:
    flagutil.fail(f"--train_image: expected H,W >= 8, got {FLAGS.train_image}")
  start = time.perf_counter()
  import jax
  import jaxlib
  dev = jax.devices()[0]
  _say(f"# jaxface accelerator benchmark, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
  _say(f"# device: {dev.platform} {dev.device_kind} (x{jax.device_count()}); jax {jax.__version__}, "
       f"jaxlib {jaxlib.__version__}; python {platform.python_version()}; host CPUs {os.cpu_count()}")
  _say(f"# default matmul precision: {jax.config.jax_default_matmul_precision or 'default'} "
       f"(the library asks for HIGHEST in the search matmul and the style Grams); "
       f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  _say(f"| {'section':8s} | {'configuration':58s} | {'figure':26s} | {'first s':>8s} | notes")
  _say(f"|{'-' * 10}|{'-' * 60}|{'-' * 28}|{'-' * 10}|------")
  runners = {"train": bench_train, "nst": bench_nst, "identify": bench_identify}
  failed = []
  for section in FLAGS.sections:
    elapsed = time.perf_counter() - start
    if elapsed > FLAGS.budget_s:
      failed.append(section)
      _say(f"FAILED {section}: skipped, {elapsed:.0f} s elapsed > --budget_s={FLAGS.budget_s:g}")
      continue
    try:
      runners[section]()
    except Exception as e:  # noqa: BLE001 -- report, go on with the other sections
      failed.append(section)
      _say(f"FAILED {section}: {type(e).__name__}: {e}")
      traceback.print_exc(file=sys.stderr)
  _say(f"# total {time.perf_counter() - start:.0f} s")
  if failed:
    print(f"error: {len(failed)} section(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=flagutil.parse_flags_exit2)
