r"""Benchmark: dlib face pipeline in JAX (jaxface.faces) vs dlib itself, same run, same inputs.

Embedding throughput (chips/s) of ``faces.embed`` and detection time (ms per
image) of ``faces.detect``, and, when ``dlib`` is importable (``pip install
dlib-bin``; never needed by the tests), the same with dlib's models on the same
files and inputs, plus the speed ratio; without dlib it prints the issue's
reference figures, labelled as not measured. Calls are timed by
``experiments.bench.timing.timed`` (first call reported separately).

  python -m experiments.bench.faces [--batches=1,16,64,256] [--sizes=512,1024] [--min_time=3]
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags, logging

from experiments import flagutil
from experiments.bench import timing

flags.DEFINE_list("batches", ["1", "16", "64", "256"], "embedding batch sizes")
flags.DEFINE_list("sizes", ["512", "1024"], "square image sizes for detection")
flags.DEFINE_float("min_time", 3.0, "seconds of timed calls per configuration (after the first call)")
flags.DEFINE_integer("min_reps", 2, "at least this many timed calls per configuration")
flags.DEFINE_integer("upsample", 0, "detector upsampling steps", lower_bound=0)
flags.DEFINE_bool("dlib", True, "also time dlib when it is importable")
flags.DEFINE_integer("rounds", 5, "interleaved jaxface/dlib rounds per embedding batch size", lower_bound=1)
flags.DEFINE_bool("xla_tuning", True, "set the process-wide XLA_FLAGS (flagutil.tune_cpu_xla); "
                  "--noxla_tuning measures the library defaults")
FLAGS = flags.FLAGS

# Figures from the issue (dlib-bin 20.0.1 on this CPU), shown when dlib is not installed.
REFERENCE_DLIB = {"embed_chips_per_s": "11-12.5", "detect_512_ms": 1660.0}
PHOTO = "fr_two_people.jpg"  # two faces, ~130 px wide after the 512x512 resize


def _inputs(sizes: list[int]):
  """Golden chips [82,150,150,3] and the centre square of one golden photo (two faces) resized
  to each size (random data when the golden set is absent)."""
  import numpy as np
  from PIL import Image

  from jaxface import paths
  from jaxface.images import load_image
  rng = np.random.default_rng(0)
  golden = os.path.join(paths.data_root(), "dlib_golden")
  npz = os.path.join(golden, "golden.npz")
  if os.path.exists(npz):
    with np.load(npz) as z:
      chips = np.asarray(z["chips"])
    source = "golden chips"
  else:
    chips = rng.integers(0, 256, (82, 150, 150, 3), dtype=np.uint8)
    source = "random chips (golden set not found)"
  photo = os.path.join(golden, "images", PHOTO)
  images = {}
  for s in sizes:
    if os.path.exists(photo):
      rgb = load_image(photo)
      h, w = rgb.shape[:2]
      m = min(h, w)  # centre square, so resizing keeps the faces' proportions
      square = rgb[(h - m) // 2:(h - m) // 2 + m, (w - m) // 2:(w - m) // 2 + m]
      images[s] = np.asarray(Image.fromarray(square).resize((s, s), Image.BILINEAR))
    else:
      images[s] = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
  return chips, images, source + (f", {PHOTO} centre square resized" if os.path.exists(photo) else ", random images")


def _batch(chips, n: int):
  import numpy as np
  reps = -(-n // chips.shape[0])
  return np.ascontiguousarray(np.concatenate([chips] * reps)[:n])


def _embed_rows(chips, batches, rec):
  """Interleaved embedding timing: {n: (jax first s, jax chips/s, dlib first s | None,
  dlib chips/s | None, [per-round speed-ups])}, plus the encoder load time.

  ``rec`` is dlib's ``face_recognition_model_v1`` or None. Each round times
  jaxface then dlib for ``min_time / rounds`` seconds each (at least one call),
  so a burst of background load hits both (the machine is shared); rates are medians
  over rounds, and the speed-up is the median of the per-round ratios, with their range.
  """
  import jax
  import numpy as np

  from jaxface import faces
  t = time.perf_counter()
  faces.embed(chips[:1])
  load_s = time.perf_counter() - t  # conversion/cache restore + batch-1 compile
  slot = FLAGS.min_time / FLAGS.rounds

  def rate(fn, n):
    calls, start = 0, time.perf_counter()
    while calls < 1 or time.perf_counter() - start < slot:
      fn()
      calls += 1
    return n * calls / (time.perf_counter() - start)

  rows = {}
  for n in batches:
    x = _batch(chips, n)
    x_list = list(x)
    ours = lambda: jax.block_until_ready(faces.embed(x))  # noqa: E731
    theirs = (lambda: rec.compute_face_descriptor(x_list)) if rec is not None else None  # noqa: E731
    t = time.perf_counter()
    ours()
    first = time.perf_counter() - t
    d_first = None
    if theirs:
      t = time.perf_counter()
      theirs()
      d_first = time.perf_counter() - t
    j_rates, d_rates = [], []
    for _ in range(FLAGS.rounds):
      j_rates.append(rate(ours, n))
      if theirs:
        d_rates.append(rate(theirs, n))
    ratios = [j / d for j, d in zip(j_rates, d_rates)]
    rows[n] = (first, float(np.median(j_rates)), d_first,
               float(np.median(d_rates)) if d_rates else None, ratios)
  return rows, load_s


def _jax_detect_rows(images, upsample):
  from jaxface import faces
  rows = {"detect": {}}
  t = time.perf_counter()
  faces.detect(images[min(images)][:80, :80])
  rows["detector_load_s"] = time.perf_counter() - t
  for s, img in images.items():
    found = []
    _, first, med = timing.timed(lambda: found.append(len(faces.detect(img, upsample=upsample))),
                        FLAGS.min_time, FLAGS.min_reps)
    rows["detect"][s] = (first, med, found[-1])
  return rows


def _dlib_detect_rows(images, upsample):
  import dlib

  from jaxface import pretrained
  rows = {"detect": {}, "version": dlib.__version__}
  det = dlib.cnn_face_detection_model_v1(pretrained.model_file("mmod"))
  for s, img in images.items():
    found = []
    _, first, med = timing.timed(lambda: found.append(len(det(img, upsample))), FLAGS.min_time, 1)
    rows["detect"][s] = (first, med, found[-1])
  return rows


def main(argv):
  if len(argv) > 1:
    flagutil.fail(f"unexpected arguments {argv[1:]}; settings are --flags")
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every cache restore at INFO; the script prints its own lines.
    logging.set_verbosity(logging.WARNING)
  if FLAGS.xla_tuning:
    flagutil.tune_cpu_xla()
  try:
    batches = [int(b) for b in FLAGS.batches]
    sizes = [int(s) for s in FLAGS.sizes]
  except ValueError:
    flagutil.fail("--batches and --sizes take comma-separated integers")
  if min(batches + sizes) < 1:
    flagutil.fail("--batches and --sizes must be positive")
  import jax
  chips, images, source = _inputs(sizes)
  print(f"inputs: {source}; jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({os.cpu_count()} CPUs visible); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  rec = None
  if FLAGS.dlib:
    try:
      import dlib

      from jaxface import pretrained
      rec = dlib.face_recognition_model_v1(pretrained.model_file("resnet"))
    except ImportError:
      pass
  embed, encoder_load_s = _embed_rows(chips, batches, rec)
  ours = _jax_detect_rows(images, FLAGS.upsample)
  theirs = _dlib_detect_rows(images, FLAGS.upsample) if rec is not None else None
  print(f"\njaxface encoder load + first batch-1 call: {encoder_load_s:.1f} s; "
        f"detector load + first call: {ours['detector_load_s']:.1f} s")
  dl = f"dlib {theirs['version']}" if theirs else "dlib (NOT measured)"
  print(f"\nembedding (faces.embed), chips/s, median of {FLAGS.rounds} interleaved rounds; "
        "speed-up: median (min-max) of the per-round ratios")
  print(f"{'batch':>6s} {'jaxface':>10s} {'first call s':>13s} {dl + ' chips/s':>26s} {'speed-up':>18s}")
  for n in batches:
    first, rate, _, d_rate, ratios = embed[n]
    if d_rate is not None:
      ref = f"{d_rate:.1f}"
      ratio = f"{statistics.median(ratios):.1f}x ({min(ratios):.1f}-{max(ratios):.1f})"
    else:
      ref, ratio = REFERENCE_DLIB["embed_chips_per_s"] + " (issue)", "-"
    print(f"{n:6d} {rate:10.1f} {first:13.2f} {ref:>26s} {ratio:>18s}")
  print(f"\ndetection (faces.detect, upsample {FLAGS.upsample}), ms per image, median of warm calls")
  print(f"{'size':>10s} {'jaxface':>10s} {'first call s':>13s} {'faces':>6s} {dl + ' ms':>22s} "
        f"{'faces':>6s} {'speed-up':>9s}")
  for s in sizes:
    first, med, found = ours["detect"][s]
    if theirs:
      d_med, d_found = theirs["detect"][s][1], theirs["detect"][s][2]
      ref, ref_found, ratio = f"{1e3 * d_med:.0f}", str(d_found), f"{d_med / med:.1f}x"
    else:
      ref = f"{REFERENCE_DLIB['detect_512_ms']:.0f} (issue)" if s == 512 else "-"
      ref_found, ratio = "-", "-"
    print(f"{f'{s}x{s}':>10s} {1e3 * med:10.0f} {first:13.2f} {found:6d} {ref:>22s} {ref_found:>6s} {ratio:>9s}")
  if not theirs:
    why = "disabled by --nodlib" if not FLAGS.dlib else "dlib is not installed (pip install dlib-bin)"
    print(f"\n{why}: dlib figures above are the issue's reference values for this CPU, "
          "not measured in this run.")


if __name__ == "__main__":
  app.run(main, flags_parser=flagutil.parse_flags_exit2)
