r"""Benchmark: dlib face pipeline in JAX (jaxface.faces) vs dlib itself, same run, same inputs.

Measures
  * embedding throughput (chips/s) of ``faces.embed`` at batch 1, 16, 64, 256;
  * detection time (ms per image) of ``faces.detect`` at 512x512 and 1024x1024;
and, when ``dlib`` is importable (``pip install dlib-bin``; optional, never
needed by the tests), the same with dlib's ``face_recognition_model_v1`` /
``cnn_face_detection_model_v1`` on the same model files and inputs, plus the
speed ratio. Without dlib it prints the reference figures from the issue,
labelled as not measured in this run.

Timing: each configuration is called once first (for JAX this includes
tracing and XLA compilation, reported separately as "first call"), then
repeated until ``--min_time`` seconds have passed (at least ``--min_reps``
calls); the median call time is reported. Inputs are the golden chips and the
centre square of a golden photo (two faces) resized to each size (random data
when the golden set is absent).

  python -m experiments.bench.faces [--batches=1,16,64,256] [--sizes=512,1024] [--min_time=3]
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
from absl import logging

from experiments import flagutil

flags.DEFINE_list("batches", ["1", "16", "64", "256"], "embedding batch sizes")
flags.DEFINE_list("sizes", ["512", "1024"], "square image sizes for detection")
flags.DEFINE_float("min_time", 3.0, "seconds of timed calls per configuration (after the first call)")
flags.DEFINE_integer("min_reps", 2, "at least this many timed calls per configuration")
flags.DEFINE_integer("upsample", 0, "detector upsampling steps", lower_bound=0)
flags.DEFINE_bool("dlib", True, "also time dlib when it is importable")
FLAGS = flags.FLAGS

# Figures from the issue (dlib-bin 20.0.1 on this CPU), shown when dlib is not installed.
REFERENCE_DLIB = {"embed_chips_per_s": "11-12.5", "detect_512_ms": 1660.0}
PHOTO = "fr_two_people.jpg"  # two faces, ~130 px wide after the 512x512 resize


def _timed(fn, min_time: float, min_reps: int) -> tuple[float, float]:
  """(first call seconds, median seconds of the following calls)."""
  import numpy as np
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < min_reps or time.perf_counter() - start < min_time:
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return first, float(np.median(times))


def _inputs(sizes: list[int]):
  """Golden chips [82,150,150,3] and one photo resized to each size (random if no data)."""
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


def _jax_rows(chips, images, batches, upsample):
  import jax
  from jaxface import faces
  rows = {"embed": {}, "detect": {}}
  t = time.perf_counter()
  faces.embed(chips[:1])
  rows["encoder_load_s"] = time.perf_counter() - t  # conversion/cache restore + batch-1 compile
  for n in batches:
    x = _batch(chips, n)
    first, med = _timed(lambda: jax.block_until_ready(faces.embed(x)), FLAGS.min_time, FLAGS.min_reps)
    rows["embed"][n] = (first, med)
  t = time.perf_counter()
  faces.detect(images[min(images)][:80, :80])
  rows["detector_load_s"] = time.perf_counter() - t
  for s, img in images.items():
    found = []
    first, med = _timed(lambda: found.append(len(faces.detect(img, upsample=upsample))),
                        FLAGS.min_time, FLAGS.min_reps)
    rows["detect"][s] = (first, med, found[-1])
  return rows


def _dlib_rows(chips, images, batches, upsample):
  import dlib
  from jaxface import pretrained
  rows = {"embed": {}, "detect": {}, "version": dlib.__version__}
  rec = dlib.face_recognition_model_v1(pretrained.model_file("resnet"))
  det = dlib.cnn_face_detection_model_v1(pretrained.model_file("mmod"))
  for n in batches:
    x = list(_batch(chips, n))
    first, med = _timed(lambda: rec.compute_face_descriptor(x), FLAGS.min_time, 1)
    rows["embed"][n] = (first, med)
  for s, img in images.items():
    found = []
    first, med = _timed(lambda: found.append(len(det(img, upsample))), FLAGS.min_time, 1)
    rows["detect"][s] = (first, med, found[-1])
  return rows


def main(argv):
  if len(argv) > 1:
    flagutil.fail(f"unexpected arguments {argv[1:]}; settings are --flags")
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every cache restore at INFO; the script prints its own lines.
    logging.set_verbosity(logging.WARNING)
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
  ours = _jax_rows(chips, images, batches, FLAGS.upsample)
  theirs = None
  if FLAGS.dlib:
    try:
      import dlib  # noqa: F401
      theirs = _dlib_rows(chips, images, batches, FLAGS.upsample)
    except ImportError:
      pass
  print(f"\njaxface encoder load + first batch-1 call: {ours['encoder_load_s']:.1f} s; "
        f"detector load + first call: {ours['detector_load_s']:.1f} s")
  dl = f"dlib {theirs['version']}" if theirs else "dlib (NOT measured)"
  print("\nembedding (faces.embed), chips/s, median of warm calls")
  print(f"{'batch':>6s} {'jaxface':>10s} {'first call s':>13s} {dl + ' chips/s':>26s} {'speed-up':>9s}")
  for n in batches:
    first, med = ours["embed"][n]
    ref = f"{n / theirs['embed'][n][1]:.1f}" if theirs else REFERENCE_DLIB["embed_chips_per_s"] + " (issue)"
    ratio = f"{theirs['embed'][n][1] / med:.1f}x" if theirs else "-"
    print(f"{n:6d} {n / med:10.1f} {first:13.2f} {ref:>26s} {ratio:>9s}")
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
  app.run(main)
