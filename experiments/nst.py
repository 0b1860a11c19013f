r"""Gatys neural style transfer.

  python -m experiments.nst                      # built-in images, 256 px, < ~3 min on 2 cores
  python -m experiments.nst --content=$JAXFACE_DATA/nst/content/skimage_chelsea.png \
      --style=$JAXFACE_DATA/nst/style/vangogh_starry_night_1889.jpg --size=512 --workdir=runs/cat
  python -m experiments.nst --flagfile=experiments/configs/nst_default.flags
  python -m experiments.nst --content=a.png,b.png,c.png,d.png --num_devices=0   # batch split over all devices
  # 2 processes on one machine (run both; 2 forced CPU devices each: 1 image per device)
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m experiments.nst \
      --content=a.png,b.png,c.png,d.png --num_devices=0 --distributed=on \
      --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0   # and =1
  # TPU VM pod slice: run on every worker (JAX detects the cluster); --workdir
  # must be one directory shared by all hosts (Filestore / gcsfuse mount)
  python -m experiments.nst --content=... --num_devices=0 --distributed=on --workdir=/mnt/shared/nst

Every field of ``jaxface.style.config.NSTConfig`` is a flag. A run resumes from
the latest checkpoint in ``--workdir`` and writes ``<content>_stylized.png``
there; ``--num_devices`` (default 1; 0 = all) must divide the number of content
images (BUILD.md, "Style transfer batch sharded over devices"). Progress and
warnings go to stderr; stdout gets the paths of the stylised images, one a line.
"""

from absl import app, flags

from experiments import flagutil
from jaxface.style import config as config_lib

flagutil.define_flags(config_lib.NSTConfig)
flags.DEFINE_string("workdir", "runs/nst", "run directory (checkpoints, snapshots, output PNGs)")
flags.DEFINE_integer("stop_after", None, "stop after this step, checkpointed, as a pre-empted job would")
FLAGS = flags.FLAGS


def main(argv):
  # No flagutil.tune_cpu_xla() here: for VGG19 style transfer the flag that
  # helps the encoder measured slower (BUILD.md, "Neural style transfer").
  flagutil.start(argv)
  try:
    cfg = flagutil.config_from_flags(config_lib.NSTConfig).validate()
  except ValueError as e:
    flagutil.fail(flagutil.flag_error(str(e), config_lib.NSTConfig))
  flagutil.start_distributed(cfg)  # before anything touches a device
  from jaxface import checkpointing  # heavy imports after the config is known to be valid
  from jaxface.style import transfer
  try:
    result = transfer.run(cfg, FLAGS.workdir, stop_after=FLAGS.stop_after, printer=flagutil.progress)
  except (ValueError, FileNotFoundError, checkpointing.CheckpointError, transfer.TransferError) as e:
    flagutil.fail(flagutil.flag_error(str(e), config_lib.NSTConfig))
  import jax
  if jax.process_index() == 0:  # one process speaks for all
    for path in result.get("outputs", []):  # results on stdout; progress and warnings: stderr
      print(path, flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=flagutil.parse_flags_exit2)
