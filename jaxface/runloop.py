"""Run-loop scaffolding shared by the drivers (training, style transfer, visualisation).

The drivers differ in what a step does; they share how a long loop reports
(:func:`primary_printer`, :class:`MetricsLog`, :class:`Meter`), guards
(:func:`host_metrics`, :func:`check_bad_step`) and saves itself (:func:`every`,
:func:`save_copy`); ``jaxface.style.transfer`` shows the whole loop. All of it is
host-side and cheap; nothing compiles. Lines go through a ``printer`` (a
``str -> None`` callable, :func:`stderr_printer` by default): whole plain lines,
never ``\\r``. Per-item progress is :class:`jaxface.progress.Progress`, re-exported.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxface.parallel.distributed import is_primary
from jaxface.progress import Progress  # noqa: F401  (re-exported: per-item progress)

__all__ = ["LOG_NAME", "NonFiniteError", "MetricsLog", "Meter", "Progress", "bar",
           "check_bad_step", "check_finite", "every", "format_eta", "host_metrics", "is_primary",
           "primary_printer", "quiet", "save_copy", "stderr_printer"]

# The per-run metrics file every driver writes in its workdir.
LOG_NAME = "train_log.jsonl"


class NonFiniteError(RuntimeError):
  """A run stopped on a non-finite value (default error of the checks below)."""


# --------------------------------------------------------------------------- output


def stderr_printer(line: str) -> None:
  """The default ``printer``: progress and warnings go to stderr (results are files)."""
  print(line, file=sys.stderr, flush=True)


def quiet(line: str) -> None:
  """A ``printer`` that prints nothing."""
  del line


def primary_printer(printer: Callable[[str], None]) -> Callable[[str], None]:
  """``printer`` on process 0, :func:`quiet` on the others (one process speaks for all)."""
  return printer if is_primary() else quiet


class MetricsLog:
  """Appends one JSON object a line to ``<workdir>/<name>`` (``train_log.jsonl``).

  Only process 0 writes (``enabled`` defaults to :func:`is_primary`). Each
  record is appended and the file closed again, so a run killed at any point
  leaves whole lines; a resumed run appends after them.

  Args:
    workdir: the run directory (created by the caller).
    name: the file name.
    enabled: write at all; None: on the primary process only.
  """

  def __init__(self, workdir: str, name: str = LOG_NAME, *, enabled: bool | None = None):
    self.path = os.path.join(workdir, name)
    self.enabled = is_primary() if enabled is None else bool(enabled)

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends ``record`` (JSON-serialisable; key order kept) as one line."""
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(dict(record)) + "\n")


# --------------------------------------------------------------------------- cadence


def every(step: int, n: int, *, last: bool = False) -> bool:
  """Whether step ``step`` (1-based count of steps done) is an ``n``-th one, or ``last``.

  ``n <= 0`` (a cadence switched off) is never due, except at ``last``.
  """
  return bool(last) or (n > 0 and step % n == 0)


# --------------------------------------------------------------------------- health


def host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Device scalars -> ``{name: float}`` in one transfer (the step's metrics, to log)."""
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def check_finite(metrics: Mapping[str, Any], step: int, *,
                 error: Callable[[str], Exception] = NonFiniteError, hint: str = "") -> None:
  """Raises ``error`` naming the first non-finite metric and the step.

  Args:
    metrics: ``{name: number}`` (host values, see :func:`host_metrics`).
    step: the step they belong to.
    error: the exception type (or factory) to raise.
    hint: appended to the message (what to change).
  """
  for name, value in metrics.items():
    if not math.isfinite(float(value)):
      raise error(f"non-finite {name} ({float(value)}) at step {step}" + (f". {hint}" if hint else ""))


def check_bad_step(bad_step: Any, *, what: str, kept: str, hint: str = "",
                   error: Callable[[str], Exception] = NonFiniteError) -> None:
  """Raises when an in-graph guard recorded a non-finite step.

  The jitted steps keep the state unchanged on a non-finite value and record
  that step's number in a ``bad_step`` scalar (-1: none), so nothing after it
  is ever saved; the host reads the scalar at its log and checkpoint steps.

  Args:
    bad_step: the recorded step (array or int); < 0 means healthy.
    what: what was not finite ("cost", "loss or gradient").
    kept: what the state still holds; ``{step}`` is replaced by the bad step.
    hint: what to change, appended.
    error: the exception type (or factory) to raise.

  Raises:
    ``error("non-finite {what} at step {bad}; {kept} and nothing after it was saved. {hint}")``.
  """
  bad = int(bad_step)
  if bad >= 0:
    raise error(f"non-finite {what} at step {bad}; {kept.format(step=bad)} and nothing after it "
                f"was saved" + (f". {hint}" if hint else ""))


# --------------------------------------------------------------------------- checkpoints


def save_copy(checkpointer, step: int, state: Any, config: dict) -> bool:
  """Saves a copy of ``state`` as ``step`` (forced, whatever the manager's own cadence).

  A copy: the next jitted step donates (reuses) the state's buffers while
  orbax may still be writing them in the background. Every process must call
  it (orbax coordinates them; each writes the shards it holds).
  """
  return checkpointer.save(step, jax.tree.map(jnp.copy, state), config, force=True)


# --------------------------------------------------------------------------- rate and ETA


def format_eta(seconds: float) -> str:
  """``H:MM:SS`` (negative -> 0; unknown, e.g. infinite -> ``?``)."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def bar(done: int, total: int, width: int = 20) -> str:
  """``[#####...............]``: ``done`` of ``total`` as a fixed-width text bar."""
  n = int(width * done / max(total, 1))
  return "[" + "#" * n + "." * (width - n) + "]"


class Meter:
  """Steps per second over the latest interval between :meth:`tick` calls, and an ETA.

  The first interval includes compilation; later ones do not, so the rate
  and ETA follow the latest interval only.

  Args:
    step: the step the run starts (or resumes) at.
    clock: seconds, monotonic (tests pass a fake).
  """

  def __init__(self, step: int = 0, *, clock: Callable[[], float] = time.perf_counter):
    self.clock = clock
    self.start_time = self.last_time = clock()
    self.start_step = self.last_step = int(step)
    self.rate = 0.0

  def tick(self, step: int) -> float:
    """Marks ``step`` as reached now; returns steps/s since the previous tick."""
    now = self.clock()
    self.rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, int(step)
    return self.rate

  def eta(self, remaining: float) -> float:
    """Seconds for ``remaining`` more steps (at the latest rate; may be weighted
    step-equivalents, e.g. later scales that cost more per step)."""
    return remaining / self.rate if self.rate > 0 else float("inf")

  def elapsed(self) -> float:
    """Seconds since the meter started."""
    return self.clock() - self.start_time
