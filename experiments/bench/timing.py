"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any], min_time: float, min_reps: int) -> tuple[Any, float, float]:
  """Calls ``fn`` once (compile + first run), then again until both ``min_reps``
  calls and ``min_time`` seconds are reached.

  Returns:
    (result of the first call, first call seconds, median seconds of the rest).
  """
  import numpy as np
  t = time.perf_counter()
  out = fn()
  first = time.perf_counter() - t
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < min_reps or time.perf_counter() - start < min_time:
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return out, first, float(np.median(times))
