"""End-to-end tests of ``python -m experiments.nst`` (tiny flagfile, subprocesses)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--flagfile=experiments/configs/nst_tiny.flags"]


def _env(cache):
  # Runs must not pick up weights from the developer's cache or $JAXFACE_VGG19.
  env = {k: v for k, v in os.environ.items() if k != "JAXFACE_VGG19"}
  env["JAXFACE_CACHE"] = str(cache)
  return env


def _nst(*args, timeout=300):
  env = _env(os.path.join(os.path.dirname(args[-1].split("=", 1)[-1]), "cache"))
  return subprocess.run([sys.executable, "-m", "experiments.nst", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env=env)


def test_tiny_run_warns_about_random_weights_and_killed_run_resumes_bitwise(tmp_path):
  ref_dir, kill_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
  r = _nst(*TINY, f"--workdir={ref_dir}")
  assert r.returncode == 0, r.stderr
  # Warnings and progress on stderr; stdout holds only the result: the stylised image's path.
  assert "NOT pretrained style transfer" in r.stderr and "python -m jaxface.weights fetch vgg19" in r.stderr
  assert "ETA" in r.stderr and "scale 2/2 32x32" in r.stderr
  out = os.path.join(ref_dir, "scene_stylized.png")
  assert r.stdout.splitlines() == [out]
  assert Image.open(out).size == (32, 32)

  env = _env(tmp_path / "cache")
  proc = subprocess.Popen([sys.executable, "-m", "experiments.nst", *TINY, f"--workdir={kill_dir}"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  killed_at, deadline = None, time.time() + 300
  for line in proc.stdout:
    if line.startswith("scale") and int(line.split("step")[1].split("/")[0]) >= 5:
      os.kill(proc.pid, signal.SIGKILL)  # after the step-4 checkpoint, mid scale 2
      killed_at = int(line.split("step")[1].split("/")[0])
      break
    assert time.time() < deadline
  proc.wait(timeout=60)
  assert killed_at is not None and proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(kill_dir, "scene_stylized.png"))
  r = _nst(*TINY, f"--workdir={kill_dir}")
  assert r.returncode == 0, r.stderr
  assert "resumed from" in r.stderr and r.stdout.splitlines() == [os.path.join(kill_dir, "scene_stylized.png")]
  np.testing.assert_array_equal(np.asarray(Image.open(out)),
                                np.asarray(Image.open(os.path.join(kill_dir, "scene_stylized.png"))))
  ref_final = json.load(open(os.path.join(ref_dir, "result.json")))["final"]
  assert json.load(open(os.path.join(kill_dir, "result.json")))["final"] == ref_final


def test_bad_input_is_a_clear_error_before_compute(tmp_path):
  cases = [
      (["--content=" + str(tmp_path / "missing.jpg")], "no such file"),
      (["--style_layers=relu1_1,relu7_1"], "unknown VGG19 layer 'relu7_1'"),
      (["--beta=-1"], "--beta=-1.0: must be finite and >= 0"),
      (["--weights=" + str(tmp_path / "nope.h5")], "no such file"),
  ]
  for args, message in cases:
    r = _nst(*TINY, *args, f"--workdir={tmp_path / 'w'}", timeout=120)
    assert r.returncode == 2, (args, r.stderr)
    assert message in r.stderr, (args, r.stderr)
    assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_no_flags_equals_the_default_flagfile_and_passes_the_input_checks():
  from absl import flags as absl_flags

  from experiments import flagutil
  from jaxface.style import transfer
  from jaxface.style.config import NSTConfig
  fv = absl_flags.FlagValues()
  flagutil.define_flags(NSTConfig, flag_values=fv)
  absl_flags.DEFINE_string("workdir", "", "", flag_values=fv)
  fv(["prog", "--flagfile=" + os.path.join(REPO, "experiments/configs/nst_default.flags")])
  from_file = flagutil.config_from_flags(NSTConfig, flag_values=fv)
  assert from_file == NSTConfig()
  problem = transfer.prepare(NSTConfig())
  assert problem.shapes == [(128, 128), (256, 256)]


def test_library_default_printer_keeps_stdout_clean(tmp_path, capsys, monkeypatch):
  # transfer.run called without a printer: its warning and progress lines go to stderr.
  monkeypatch.delenv("JAXFACE_VGG19", raising=False)
  monkeypatch.setenv("JAXFACE_CACHE", str(tmp_path / "cache"))
  from absl import flags as absl_flags

  from experiments import flagutil
  from jaxface.style import transfer
  from jaxface.style.config import NSTConfig
  fv = absl_flags.FlagValues()
  flagutil.define_flags(NSTConfig, flag_values=fv)
  absl_flags.DEFINE_string("workdir", "", "", flag_values=fv)
  fv(["prog", "--flagfile=" + os.path.join(REPO, "experiments/configs/nst_tiny.flags"),
      "--num_scales=1", "--steps=2", "--checkpoint_every=2"])
  cfg = flagutil.config_from_flags(NSTConfig, flag_values=fv)
  result = transfer.run(cfg, str(tmp_path / "w"))
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "warning: no VGG19 weights found" in captured.err and "ETA" in captured.err
  assert "done in" in captured.err and os.path.exists(result["outputs"][0])
