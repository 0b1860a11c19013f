"""Progress reporting on a stream: a one-line bar on a terminal, sparse lines in a log.

  bar = Progress(len(images), "identify")
  for path in images:
    ...
    bar.step(path)
  bar.close()
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 24
LOG_FRACTION = 0.1   # a log line at least every 10% of the work ...
LOG_SECONDS = 5.0    # ... or every 5 seconds, whichever comes first


def _is_tty(stream) -> bool:
  isatty = getattr(stream, "isatty", None)
  try:
    return bool(isatty()) if isatty is not None else False
  except (ValueError, OSError):  # a closed stream
    return False


class Progress:
  """Progress of ``total`` steps named ``label`` on ``stream`` (nothing when not ``enabled``).

  On a terminal (``stream.isatty()``) one line is redrawn with ``\\r``; anywhere
  else (a log file, a pipe, CI) plain lines such as ``identify: 50/200 (25%),
  R img/s`` are written at most every ``LOG_FRACTION`` of the work or every
  ``LOG_SECONDS``, and a final line when the work is done, so logs are not
  filled with ``\\r``. Usable as a context manager (closed on exit).
  """

  def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool = True, *,
               clock: Callable[[], float] = time.perf_counter):
    if total < 0:
      raise ValueError(f"total={total}: expected >= 0")
    self.total, self.label = int(total), label
    self.stream = sys.stderr if stream is None else stream
    self.enabled = bool(enabled) and self.total > 0
    self.tty = _is_tty(self.stream)
    self.clock = clock
    self.start = clock()
    self.done = 0
    self.closed = False
    self._last_time = self.start
    self._last_done = 0

  def rate(self) -> float:
    return self.done / max(self.clock() - self.start, 1e-9)

  def step(self, what: str = "") -> None:
    """One step done (``what``, e.g. the file, is shown on a terminal)."""
    self.done += 1
    if not self.enabled or self.closed:
      return
    if self.tty:
      self._draw_bar(what)
      if self.done >= self.total:
        self.close()
      return
    now = self.clock()
    if self.done >= self.total:
      self.close()
    elif (self.done - self._last_done >= max(1, LOG_FRACTION * self.total)
          or now - self._last_time >= LOG_SECONDS):
      self._write_line()
      self._last_time, self._last_done = now, self.done

  def close(self) -> None:
    """Ends the bar (a newline on a terminal, the final line in a log); idempotent."""
    if self.closed:
      return
    self.closed = True
    if not self.enabled or self.done == 0:
      return
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()
    else:
      self._write_line()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _draw_bar(self, what: str) -> None:
    filled = int(BAR_WIDTH * min(self.done, self.total) / self.total)
    self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
                      f"{self.done}/{self.total} {self.rate():.1f} img/s "
                      f"{os.path.basename(what)[:30]:<30}")
    self.stream.flush()

  def _write_line(self) -> None:
    pct = int(100 * self.done / self.total)
    self.stream.write(f"{self.label}: {self.done}/{self.total} ({pct}%), {self.rate():.1f} img/s\n")
    self.stream.flush()
