"""Defines absl flags from a config dataclass and builds the dataclass back.

Entry points stay thin: one flag per config field, with the field's default
and the comment beside it as help; only ``experiments/`` reads FLAGS.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing

from absl import flags


def _field_help(cls) -> dict[str, str]:
  """Trailing ``# comments`` of the dataclass source, as flag help."""
  helps = {}
  try:
    src = inspect.getsource(cls)
  except OSError:
    return helps
  for m in re.finditer(r"^\s+(\w+):[^=\n]+=[^#\n]*#\s*(.+)$", src, re.M):
    helps[m.group(1)] = m.group(2).strip()
  return helps


def define_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """One absl flag per field of dataclass ``cls`` (bool, int, float, str, tuple of int)."""
  helps = _field_help(cls)
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    hint, default = hints[f.name], f.default
    text = helps.get(f.name, f.name)
    if hint is bool:
      flags.DEFINE_bool(f.name, default, text, flag_values=flag_values)
    elif hint is int:
      flags.DEFINE_integer(f.name, default, text, flag_values=flag_values)
    elif hint is float:
      flags.DEFINE_float(f.name, default, text, flag_values=flag_values)
    elif hint is str:
      flags.DEFINE_string(f.name, default, text, flag_values=flag_values)
    elif typing.get_origin(hint) is tuple:
      flags.DEFINE_list(f.name, [str(v) for v in default], text + " (comma-separated integers)",
                        flag_values=flag_values)
    else:
      raise TypeError(f"no flag type for {cls.__name__}.{f.name}: {hint}")


def config_from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS):
  """Builds ``cls`` from parsed flags; a non-integer in a list flag is a ValueError."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    value = flag_values[f.name].value
    if typing.get_origin(hints[f.name]) is tuple:
      try:
        value = tuple(int(v) for v in value)
      except ValueError:
        raise ValueError(f"--{f.name}={','.join(value)}: expected comma-separated integers") from None
    kwargs[f.name] = value
  return cls(**kwargs)


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

  Measured with ``python -m experiments.bench.encoder_step`` on 2 CPU cores:
  the encoder train step took 12-15% less time with it (BUILD.md). Only the
  jaxlib line it was measured on gets it, because XLA aborts on flags it does
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
  recompiles the face detector and the ResNet (measured on 2 shared CPU cores:
  ``identify`` of one photo 3.6 s -> 2.7 s once cached). Kernels that compiled in at least
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
  except (ValueError, parallel.DistributedError) as e:
    fail(str(e))


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
