r"""What do ConvNet units respond to? Top-9 receptive-field patches per unit, one grid PNG per layer.

  python -m experiments.visualize --flagfile=experiments/configs/visualize_lfw.flags
  python -m experiments.visualize --network=vgg19 --images=$JAXFACE_DATA/nst/content \
      --image_size=224,224 --workdir=runs/visualize_vgg19
  python -m experiments.visualize --network=checkpoint:runs/att_orl --images=$JAXFACE_DATA/faces/att_orl

Every field of ``jaxface.visualize.config.VisualizeConfig`` is a flag. Writes
``layer{i}_{name}.png`` and ``summary.json`` into ``--workdir`` and their
paths, one a line, to stdout (progress and warnings go to stderr).

Default "layers 1-5" (``--layers`` picks any tap names; a wrong name lists them):
  dlib:     stem (7x7/2 conv, field 7 px), s1b3 (59 px), s2b4 (179 px), s3b3, s4b3
            (ends of residual stages 1-4; fields of the last two exceed the 150 px chip)
  vgg19:    relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
  encoder:  stem, then the last block of each stage (s1b1, s2b1, ...)
Images are aligned dlib face chips for --network=dlib (--align=auto), otherwise
resized whole (or --center_crop). Patches are receptive-field crops clipped to
the image (--noclip pads them to the full field); when clipped, a red square
marks the unit's own stride-sized cell.
"""

import os

from absl import app, flags

from experiments import flagutil
from jaxface.visualize import config as config_lib

flagutil.define_flags(config_lib.VisualizeConfig)
flags.DEFINE_string("workdir", "runs/visualize", "output folder (grid PNGs, summary.json)")
FLAGS = flags.FLAGS


def main(argv):
  flagutil.tune_cpu_xla()
  flagutil.start(argv)
  try:
    cfg = flagutil.config_from_flags(config_lib.VisualizeConfig).validate()
  except ValueError as e:  # the library names config fields; say the flags
    flagutil.fail(flagutil.flag_error(str(e), config_lib.VisualizeConfig))
  from jaxface import checkpointing  # heavy imports after the config is known to be valid
  from jaxface.visualize import run as run_lib
  try:
    summary = run_lib.run(cfg, FLAGS.workdir, printer=flagutil.progress)
  except (ValueError, FileNotFoundError, checkpointing.CheckpointError) as e:
    flagutil.fail(flagutil.flag_error(str(e), config_lib.VisualizeConfig))
  # Results on stdout (progress and warnings went to stderr): the files written.
  for layer in summary["layers"]:
    print(os.path.join(FLAGS.workdir, layer["png"]), flush=True)
  print(os.path.join(FLAGS.workdir, "summary.json"), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=flagutil.parse_flags_exit2)
