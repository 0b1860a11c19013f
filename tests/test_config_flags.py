"""Tests for jaxface.train.config and the flag layer of experiments/."""

import dataclasses
import os
import subprocess
import sys

import pytest
from absl import flags

from experiments import flagutil
from jaxface import config_dict
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
  cfg = _flags(["--P=7", "--margin=0.5", "--widths=8,16", "--depths=1,2", "--l2_normalize=false",
                "--strategy=hard"])
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
    (["--data=ftp"], "--data='ftp': must be one of synthetic, folder, tfds"),
    (["--P=1"], "--P=1"),
    (["--K=1"], "--K=1"),
    (["--margin=nan"], "--margin=nan"),
    (["--crop_size=80,80"], "--crop_size"),
    (["--data=folder"], "--data_path"),
    (["--channels=2"], "--channels=2"),
])
def test_bad_values_name_the_flag(argv, match):
  # The library names the parameter (strategy='nearest'); the entry point says it as a flag.
  with pytest.raises(ValueError) as e:
    _flags(argv)
  assert not str(e.value).startswith("--")
  assert flagutil.flag_error(str(e.value), TripletConfig).startswith(match), str(e.value)


def test_flag_error_leaves_other_messages_alone():
  assert flagutil.flag_error("the data has 1 identities; training needs >= 2", TripletConfig) == \
      "the data has 1 identities; training needs >= 2"
  assert flagutil.flag_error("colour=red: no such setting", TripletConfig) == "colour=red: no such setting"


def test_one_flag_per_setting_with_help_from_the_field_metadata():
  import dataclasses

  from jaxface.style.config import NSTConfig
  from jaxface.train import config as config_lib
  fv = flags.FlagValues()
  flagutil.define_flags(TripletConfig, fv)
  assert set(fv) == set(config_lib.FLAT) | {"seed"}
  assert flagutil.flag_names(TripletConfig)["kind"] == "data" and len(flagutil.flag_names(TripletConfig)) == 70
  assert fv["strategy"].help.startswith("triplet mining") and fv["data"].help.startswith("synthetic | folder")
  assert fv["crop_size"].help.endswith("(comma-separated integers)")
  for group in config_lib.GROUPS.values():
    for f in dataclasses.fields(group):
      assert f.metadata.get("help"), f"{group.__name__}.{f.name} has no help"
  nst = flags.FlagValues()
  flagutil.define_flags(NSTConfig, nst)
  assert nst["pooling"].help == "max | avg" and nst["seed"].help.startswith("random seed")


def test_a_setting_without_help_is_refused():
  @dataclasses.dataclass
  class Undocumented:
    documented: int = config_dict.field(1, "has help")
    bare: int = 2

  with pytest.raises(TypeError, match="Undocumented.bare: no help text"):
    flagutil.define_flags(Undocumented, flags.FlagValues())


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


ENTRY_POINTS = ["triplet", "nst", "visualize", "lfw_eval", "recognition_eval", "faces",
                "bench.encoder_step", "bench.faces", "bench.gpu", "bench.identify",
                "bench.nst_step", "bench.triplet_loss"]


def test_every_entry_point_is_listed():
  found = sorted(
      [f"experiments.{n[:-3]}" for n in os.listdir(os.path.join(REPO, "experiments"))
       if n.endswith(".py") and "__main__" in open(os.path.join(REPO, "experiments", n)).read()]
      + [f"experiments.bench.{n[:-3]}" for n in os.listdir(os.path.join(REPO, "experiments", "bench"))
         if n.endswith(".py") and "__main__" in open(os.path.join(REPO, "experiments", "bench", n)).read()])
  assert found == sorted(f"experiments.{m}" for m in ENTRY_POINTS)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_unknown_flag_exits_2_naming_it_without_importing_jax(module, tmp_path):
  # A sitecustomize hook fails the run if JAX is imported: parsing comes first and is fast.
  (tmp_path / "sitecustomize.py").write_text(
      "import sys\n"
      "class _NoJax:\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name == 'jax':\n"
      "      raise ImportError('jax imported before the flags were parsed')\n"
      "sys.meta_path.insert(0, _NoJax())\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO])}
  r = subprocess.run([sys.executable, "-m", f"experiments.{module}", "--no_such_flag=1"], cwd=REPO,
                     capture_output=True, text=True, timeout=60, env=env)
  assert r.returncode == 2, (module, r.returncode, r.stderr[-2000:])
  assert r.stderr.startswith("error: ") and "no_such_flag" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr and r.stdout == ""


def test_parse_flags_exit2_reports_a_bad_value(capsys):
  fv = flags.FlagValues()
  flagutil.define_flags(TripletConfig, fv)
  saved = flags.FLAGS
  try:
    flags.FLAGS = fv  # parse_flags_exit2 parses the global FLAGS, as app.run does
    with pytest.raises(SystemExit) as e:
      flagutil.parse_flags_exit2(["prog", "--P=four"])
  finally:
    flags.FLAGS = saved
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith("error: flag --P=four")


def test_drop_small_is_a_flag_and_defaults_off():
  assert TripletConfig().drop_small is False
  assert _flags(["--drop_small"]).drop_small is True


def test_remove_if_worthless_keeps_anything_of_value(tmp_path):
  empty = tmp_path / "empty"
  (empty / "checkpoints").mkdir(parents=True)
  (empty / "config.json").write_text("{}")
  assert flagutil.remove_if_worthless(str(empty)) and not empty.exists()
  logged = tmp_path / "logged"
  (logged / "member0").mkdir(parents=True)
  (logged / "member0" / "train_log.jsonl").write_text("{}\n")
  assert not flagutil.remove_if_worthless(str(logged)) and logged.exists()
  assert not flagutil.remove_if_worthless(str(tmp_path / "missing"))


def test_use_compilation_cache_sets_jax_env_once_and_respects_the_user(monkeypatch, tmp_path):
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               "JAXFACE_NO_COMPILATION_CACHE"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("JAXFACE_CACHE", str(tmp_path / "cache"))
  assert flagutil.use_compilation_cache() == str(tmp_path / "cache" / "xla")
  assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "cache" / "xla")
  assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0.1"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
  assert flagutil.use_compilation_cache() == str(tmp_path / "mine")
  assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "2"
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("JAXFACE_NO_COMPILATION_CACHE", "1")
  assert flagutil.use_compilation_cache() is None and "JAX_COMPILATION_CACHE_DIR" not in os.environ


def test_compilation_cache_is_used_by_a_second_process(tmp_path):
  # The kernel compiled by the first process is loaded from the cache by the second.
  script = ("import os, sys\n"
            "from experiments import flagutil\n"
            "flagutil.use_compilation_cache(min_compile_seconds=0)\n"
            "import jax, jax.numpy as jnp\n"
            "print(float(jax.jit(lambda x: jnp.sin(x) * 3 + x ** 2)(jnp.float32(2.0))))\n")
  env = {**os.environ, "JAXFACE_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
            "JAXFACE_NO_COMPILATION_CACHE"):
    env.pop(k, None)
  first = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
  assert first.returncode == 0, first.stderr[-2000:]
  entries = os.listdir(tmp_path / "cache" / "xla")
  assert any(e.startswith("jit__lambda") for e in entries), entries
  second = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**env, "JAX_LOG_COMPILES": "1"},
                          capture_output=True, text=True, timeout=120)
  assert second.returncode == 0 and second.stdout == first.stdout
  assert "Persistent compilation cache hit for 'jit__lambda'" in second.stderr, second.stderr[-3000:]
