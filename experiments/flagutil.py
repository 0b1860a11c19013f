"""Defines absl flags from a config dataclass and builds the dataclass back.

Entry points stay thin: one flag per config setting, with the field's default
and the help text of its metadata (``jaxface.config_dict.field``); only
``experiments/`` reads FLAGS. A field whose type is itself a dataclass is a
group: its fields become flags too, so a nested config keeps flat flag names
(a field's metadata may name its flag, ``field(..., flag="data")``).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from collections.abc import Iterator

from absl import flags


def _settings(cls) -> Iterator[tuple[dataclasses.Field, type, str, str]]:
  """(field, type, flag name, help) of every leaf setting of dataclass ``cls``, groups expanded."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    hint = hints[f.name]
    if dataclasses.is_dataclass(hint):
      yield from _settings(hint)
      continue
    text = f.metadata.get("help")
    if text is None:  # every setting documents itself: a config without help is a bug here, not a blank --help
      raise TypeError(f"{cls.__name__}.{f.name}: no help text (use jaxface.config_dict.field(default, help))")
    yield f, hint, f.metadata.get("flag", f.name), text


def flag_names(cls) -> dict[str, str]:
  """{field name: flag name} of every leaf setting of ``cls`` (they differ where metadata says)."""
  return {f.name: flag for f, _, flag, _ in _settings(cls)}


def define_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """One absl flag per leaf field of dataclass ``cls`` (bool, int, float, str, tuple of int)."""
  for f, hint, name, text in _settings(cls):
    default = f.default
    if hint is bool:
      flags.DEFINE_bool(name, default, text, flag_values=flag_values)
    elif hint is int:
      flags.DEFINE_integer(name, default, text, flag_values=flag_values)
    elif hint is float:
      flags.DEFINE_float(name, default, text, flag_values=flag_values)
    elif hint is str:
      flags.DEFINE_string(name, default, text, flag_values=flag_values)
    elif typing.get_origin(hint) is tuple:
      flags.DEFINE_list(name, [str(v) for v in default], text + " (comma-separated integers)",
                        flag_values=flag_values)
    else:
      raise TypeError(f"no flag type for {cls.__name__}.{f.name}: {hint}")


def config_from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS):
  """Builds ``cls`` (and its groups) from parsed flags; a non-integer in a list flag is a ValueError."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    hint = hints[f.name]
    if dataclasses.is_dataclass(hint):
      kwargs[f.name] = config_from_flags(hint, flag_values)
      continue
    name = f.metadata.get("flag", f.name)
    value = flag_values[name].value
    if typing.get_origin(hint) is tuple:
      try:
        value = tuple(int(v) for v in value)
      except ValueError:
        raise ValueError(f"--{name}={','.join(value)}: expected comma-separated integers") from None
    kwargs[f.name] = value
  return cls(**kwargs)


def flag_error(message: str, cls) -> str:
  """A library error about a setting, ``name=value: why``, as the command line says it:
  ``--flag=value: why`` (``name``: a leaf field of ``cls``). Other messages pass unchanged."""
  name, sep, rest = message.partition("=")
  flag = flag_names(cls).get(name) if sep else None
  return f"--{flag}={rest}" if flag else message


def parse_flags_exit2(argv: list[str]) -> list[str]:
  """absl's flag parser for ``app.run(main, flags_parser=...)``: an unknown or
  malformed flag is a usage error, ``error: <absl's message naming the flag>``
  on stderr and exit status 2 (absl's own parser exits 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))


def fail(message: str) -> typing.NoReturn:
  """Prints ``error: message`` to stderr and exits with status 2 (no traceback)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def progress(line: str) -> None:
  """The ``printer`` of the entry points: human progress, notes and warnings go
  to stderr, so stdout holds only results (and stays clean in a pipe)."""
  print(line, file=sys.stderr, flush=True)


# Files a failed run may leave in a workdir it created that hold nothing of value.
_WORTHLESS_FILES = ("config.json",)


def remove_if_worthless(workdir: str) -> bool:
  """Removes ``workdir`` when it holds nothing but empty folders and ``config.json``
  (what a run that failed before its first checkpoint or log line leaves behind);
  returns whether it was removed. Call it only for a workdir the run created."""
  import os
  import shutil
  if not os.path.isdir(workdir):
    return False
  for _, _, files in os.walk(workdir):
    if any(f not in _WORTHLESS_FILES for f in files):
      return False
  shutil.rmtree(workdir, ignore_errors=True)
  return not os.path.exists(workdir)


YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def tune_cpu_xla() -> None:
  """Sets ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` for jaxlib 0.10.x.

  Measured with ``python -m experiments.bench.encoder_step``: the encoder train
  step is faster with it (BUILD.md, "Encoder train step"). Only the jaxlib line
  it was measured on gets it, because XLA aborts on flags it does
  not know; the user's own XLA_FLAGS entry for it, or
  ``JAXFACE_NO_XLA_TUNING=1``, wins. Must run before JAX starts its backend.
  """
  import importlib.metadata
  import os
  if os.environ.get("JAXFACE_NO_XLA_TUNING"):
    return
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  flags_now = os.environ.get("XLA_FLAGS", "")
  if version.startswith("0.10.") and "xla_cpu_experimental_ynn_fusion_type" not in flags_now:
    os.environ["XLA_FLAGS"] = (flags_now + " " + YNN_FLAG).strip()


def use_compilation_cache(min_compile_seconds: float = 0.1) -> str | None:
  """Turns on JAX's persistent compilation cache in ``<cache dir>/xla`` (``$JAXFACE_CACHE``,
  default ~/.cache/jaxface) for commands started again and again on the same
  inputs, such as ``python -m experiments.faces``: each start otherwise
  recompiles the face detector and the ResNet (saving: BUILD.md, "dlib face pipeline").
  Kernels that compiled in at least
  ``min_compile_seconds`` are kept (JAX's own default, 1 s, keeps none of those).

  Sets ``JAX_COMPILATION_CACHE_DIR`` and
  ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` unless already set (the
  user's values win); ``JAXFACE_NO_COMPILATION_CACHE=1`` turns it off. Must
  run before JAX is imported. Returns the cache folder, or None when off.
  """
  import os
  if os.environ.get("JAXFACE_NO_COMPILATION_CACHE"):
    return None
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    from jaxface import paths
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(paths.cache_dir(), "xla")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(min_compile_seconds))
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


def start_distributed(cfg) -> None:
  """Joins the multi-process cluster that ``cfg``'s distributed fields describe
  (``distributed``, ``coordinator_address``, ``num_processes``, ``process_id``),
  or exits 2 with the reason. Call before anything touches a device: JAX fixes
  its backends at first use."""
  from jaxface import parallel
  try:
    parallel.initialize(cfg.distributed, coordinator_address=cfg.coordinator_address,
                        num_processes=cfg.num_processes, process_id=cfg.process_id)
  except ValueError as e:
    fail(_distributed_flags(str(e)))
  except parallel.DistributedError as e:  # JAX's reason inside stays as JAX wrote it
    fail(str(e).replace("pass coordinator_address='host:port', num_processes=N and process_id=I",
                        "pass --coordinator_address=host:port --num_processes=N --process_id=I"))


def _distributed_flags(message: str) -> str:
  """``parallel.initialize``'s argument errors (they name its parameters) in flags: its
  ``mode`` is ``--distributed``, the other parameters are flags of the same name."""
  message = (message.replace("mode='off'", "--distributed=off")
             .replace("mode='on' (or 'auto')", "--distributed=on (or auto)"))
  return re.sub(r"(?<![\w-])(coordinator_address|num_processes|process_id)\b", r"--\1", message)


def start(argv: list[str]) -> None:
  """What every entry point does first: refuse positional arguments (settings
  are --flags; exit 2) and quiet absl logging to WARNING unless --verbosity was
  given (orbax logs every checkpoint save and restore at INFO; the programs
  print their own progress lines)."""
  from absl import logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; settings are --flags")
