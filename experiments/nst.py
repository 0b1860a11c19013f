r"""Gatys neural style transfer.

  python -m experiments.nst                      # built-in images, 256 px, < ~3 min on 2 cores
  python -m experiments.nst --content=$JAXFACE_DATA/nst/content/skimage_chelsea.png \
      --style=$JAXFACE_DATA/nst/style/vangogh_starry_night_1889.jpg --size=512 --workdir=runs/cat
  python -m experiments.nst --flagfile=experiments/configs/nst_default.flags

Every field of ``jaxface.style.config.NSTConfig`` is a flag. A run always
resumes from the latest checkpoint in ``--workdir``; the stylised images are
written there as ``<content>_stylized.png``.
"""

from absl import app
from absl import flags
from absl import logging

from experiments import flagutil
from jaxface import checkpointing
from jaxface.style import config as config_lib

flagutil.define_flags(config_lib.NSTConfig)
flags.DEFINE_string("workdir", "runs/nst", "run directory (checkpoints, snapshots, output PNGs)")
flags.DEFINE_integer("stop_after", None, "stop after this step, checkpointed, as a pre-empted job would")
FLAGS = flags.FLAGS


def main(argv):
  # No flagutil.tune_cpu_xla() here: for VGG19 style transfer the flag that
  # helps the encoder measured 1.1x slower at 512 px and 1.9x slower for a
  # batch of 4 (python -m experiments.bench.nst_step; BUILD.md).
  if not FLAGS["verbosity"].present:
    # orbax logs every checkpoint step at INFO; progress lines are printed instead.
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    flagutil.fail(f"unexpected arguments {argv[1:]}; settings are --flags")
  try:
    cfg = flagutil.config_from_flags(config_lib.NSTConfig).validate()
  except ValueError as e:
    flagutil.fail(str(e))
  from jaxface.style import transfer  # heavy imports after the config is known to be valid
  try:
    transfer.run(cfg, FLAGS.workdir, stop_after=FLAGS.stop_after,
                 printer=lambda s: print(s, flush=True))
  except (ValueError, FileNotFoundError, checkpointing.CheckpointError, transfer.TransferError) as e:
    flagutil.fail(str(e))


if __name__ == "__main__":
  app.run(main)
