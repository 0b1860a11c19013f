"""Tests for jaxface.train.config and the flag layer of experiments/."""

import os
import subprocess
import sys

import pytest
from absl import flags

from experiments import flagutil
from jaxface.train.config import TripletConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(argv):
  fv = flags.FlagValues()
  flagutil.define_flags(TripletConfig, fv)
  fv(["prog"] + argv)
  return flagutil.config_from_flags(TripletConfig, fv)


def test_flags_round_trip_every_field_and_defaults():
  cfg = _flags([])
  assert cfg == TripletConfig()
  cfg = _flags(["--P=7", "--margin=0.5", "--widths=8,16", "--l2_normalize=false", "--strategy=hard"])
  assert (cfg.P, cfg.margin, cfg.widths, cfg.l2_normalize, cfg.strategy) == (7, 0.5, (8, 16), False, "hard")
  assert TripletConfig.from_dict(cfg.to_dict()) == cfg


def test_demo_flagfiles_parse_and_validate():
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    for name in sorted(os.listdir("experiments/configs")):
      if name.startswith("triplet"):
        _flags(_strip_workdir(f"experiments/configs/{name}")).validate()
  finally:
    os.chdir(cwd)


def test_every_flagfile_has_a_tiny_variant_that_includes_it():
  # The tests run the tiny variants end to end; a config without one is never exercised.
  configs = os.path.join(REPO, "experiments", "configs")
  names = sorted(os.listdir(configs))
  for name in names:
    if not name.endswith(".flags") or name.endswith("_tiny.flags"):
      continue
    base = name[:-len(".flags")]
    stem = base[:-len("_default")] if base.endswith("_default") else base
    tiny = f"{stem}_tiny.flags"
    assert tiny in names, f"{name} has no tiny variant {tiny}"
    text = open(os.path.join(configs, tiny)).read()
    assert f"--flagfile=experiments/configs/{name}" in text, f"{tiny} does not build on {name}"


def _strip_workdir(path):
  # --workdir is the entry point's flag, not a config field: expand the flagfile by hand.
  out = []
  for line in open(path):
    line = line.strip()
    if not line or line.startswith("#") or line.startswith("--workdir"):
      continue
    if line.startswith("--flagfile="):
      out += _strip_workdir(line.split("=", 1)[1])
    else:
      out.append(line)
  return out


@pytest.mark.parametrize("argv,match", [
    (["--strategy=nearest"], "--strategy='nearest'"),
    (["--P=1"], "--P=1"),
    (["--K=1"], "--K=1"),
    (["--margin=nan"], "--margin=nan"),
    (["--crop_size=80,80"], "--crop_size"),
    (["--data=folder"], "--data_path"),
    (["--channels=2"], "--channels=2"),
])
def test_bad_values_name_the_flag(argv, match):
  with pytest.raises(ValueError, match=match.replace("(", r"\(")):
    _flags(argv).validate()


def test_non_integer_list_value_is_a_clear_error():
  with pytest.raises(ValueError, match="--widths=8,x"):
    _flags(["--widths=8,x"])


def _run_cli(args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "experiments.triplet", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120)


def test_cli_rejects_unknown_flag_in_flagfile(tmp_path):
  ff = tmp_path / "bad.flags"
  ff.write_text("--P=4\n--no_such_flag=3\n")
  r = _run_cli([f"--flagfile={ff}", f"--workdir={tmp_path / 'w'}"])
  assert r.returncode != 0
  assert "no_such_flag" in r.stderr
  assert not (tmp_path / "w").exists()


def test_cli_rejects_bad_value_before_any_compute(tmp_path):
  ff = tmp_path / "bad.flags"
  ff.write_text("--strategy=median\n")
  r = _run_cli([f"--flagfile={ff}", f"--workdir={tmp_path / 'w'}"])
  assert r.returncode == 2
  assert "error: --strategy='median'" in r.stderr
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "w").exists()


def test_cli_rejects_wrong_type_in_flagfile(tmp_path):
  ff = tmp_path / "bad.flags"
  ff.write_text("--P=four\n")
  r = _run_cli([f"--flagfile={ff}"])
  assert r.returncode != 0 and "--P" in r.stderr


def test_tune_cpu_xla_adds_the_flag_once_and_respects_opt_out(monkeypatch):
  import importlib.metadata
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
  monkeypatch.delenv("JAXFACE_NO_XLA_TUNING", raising=False)
  flagutil.tune_cpu_xla()
  flagutil.tune_cpu_xla()
  assert os.environ["XLA_FLAGS"] == "--xla_foo=1 " + flagutil.YNN_FLAG
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAXFACE_NO_XLA_TUNING", "1")
  flagutil.tune_cpu_xla()
  assert os.environ["XLA_FLAGS"] == ""
  monkeypatch.delenv("JAXFACE_NO_XLA_TUNING")
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.0")
  flagutil.tune_cpu_xla()
  assert os.environ["XLA_FLAGS"] == ""
