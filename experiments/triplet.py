r"""Triplet-loss training of a face encoder.

  python -m experiments.triplet --flagfile=experiments/configs/triplet_demo.flags
  python -m experiments.triplet --flagfile=experiments/configs/triplet_att_orl.flags \
      --workdir=runs/att_orl
  # fine-tune dlib's pretrained ResNet (--num_steps=0: its zero-shot accuracy)
  python -m experiments.triplet --flagfile=experiments/configs/triplet_att_orl_dlib.flags

  # data parallel on 4 forced CPU devices; 2 processes on one machine (run both)
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.triplet \
      --flagfile=experiments/configs/triplet_demo_tiny.flags --mining=global
  python -m experiments.triplet --flagfile=... --distributed=on \
      --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0   # and =1
  # TPU VM pod slice: run on every worker; JAX detects the cluster; the workdir
  # must be one directory shared by all hosts (Filestore / gcsfuse mount)
  python -m experiments.triplet --flagfile=... --distributed=on --workdir=/mnt/shared/run

  # any <identity>/<images> folder; LFW-style ones hold many identities with fewer
  # than K images: --drop_small leaves them out (and says how many)
  python -m experiments.triplet --data=folder --data_path=$JAXFACE_DATA/faces/lfw_subset \
      --drop_small --workdir=runs/lfw

Every setting of ``jaxface.train.config.TripletConfig`` is a flag, named as
the setting (``--P`` sets ``data.P``, ``--strategy`` sets ``loss.strategy``;
``--data`` sets ``data.kind``); errors name the flag. A run always
resumes from the latest checkpoint in ``--workdir``. Progress, notes and
warnings go to stderr; stdout gets the result files written (``metrics.json``,
``roc.png``), one path a line. A wrong flag or input exits 2 with ``error:
...`` on stderr; a run that fails before writing anything of value removes the
``--workdir`` it created.
"""

import os

from absl import app, flags

from experiments import flagutil
from jaxface.train import config as config_lib

flagutil.define_flags(config_lib.TripletConfig)
flags.DEFINE_string("workdir", "runs/triplet", "run directory (checkpoints, metrics.json, roc.png)")
flags.DEFINE_integer("stop_after", None, "stop after this step, checkpointed, as a pre-empted job would")
FLAGS = flags.FLAGS


def main(argv):
  flagutil.tune_cpu_xla()
  flagutil.start(argv)
  try:
    cfg = flagutil.config_from_flags(config_lib.TripletConfig)
  except ValueError as e:
    flagutil.fail(flagutil.flag_error(str(e), config_lib.TripletConfig))
  flagutil.start_distributed(cfg.runtime)  # before anything touches a device
  from jaxface import checkpointing  # heavy imports after the config is known to be valid
  from jaxface.data import source as source_lib
  from jaxface.train import triplet
  workdir = FLAGS.workdir
  existed = os.path.exists(workdir)
  try:
    results = triplet.run(cfg, workdir, stop_after=FLAGS.stop_after, printer=flagutil.progress)
  except (ValueError, FileNotFoundError, checkpointing.CheckpointError, triplet.TrainingError) as e:
    if not existed:
      flagutil.remove_if_worthless(workdir)  # a run that failed early leaves no empty workdir
    if isinstance(e, source_lib.SmallIdentitiesError):  # the fix, in flags
      flagutil.fail(f"--K={e.K} is larger than the number of images of {len(e.names)} of "
                    f"{e.num_identities} training identities: {e.listing}. Lower --K, or pass "
                    f"--drop_small to leave those identities out")
    flagutil.fail(flagutil.flag_error(str(e), config_lib.TripletConfig))
  import jax
  if results and jax.process_index() == 0:  # results on stdout (progress: stderr): the files written
    for name in ("metrics.json", "roc.png"):
      if os.path.exists(os.path.join(workdir, name)):
        print(os.path.join(workdir, name), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=flagutil.parse_flags_exit2)
