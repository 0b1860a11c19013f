"""Publishing a cache folder atomically: build it in a temporary sibling, then rename it::

  tmp = staging.make_temp(final)                # stale siblings of killed processes removed first
  with staging.removed_on_failure(tmp):         # tmp removed on any exception or SIGTERM
    write_everything_into(tmp)
    os.rename(tmp, final)   # readers see no folder or a complete one
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

# A temporary folder this old is stale whatever its process (another host's, a reused pid).
STALE_SECONDS = 600.0


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname() or "host")[:64]


def _prefix(final: str) -> str:
  return f".{os.path.basename(os.path.normpath(final))}.tmp-"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OSError):
    return True  # exists (another user's), or we cannot tell: keep its folder
  return True


def remove_stale(final: str, *, now: float | None = None) -> list[str]:
  """Removes the stale temporary siblings of ``final``; returns their paths.

  Stale: left behind by a killed earlier process (SIGKILL or power loss run no
  cleanup), that is, its process is gone (same host) or it is older than
  :data:`STALE_SECONDS` (any host; a conversion takes seconds).
  """
  parent, prefix = os.path.dirname(os.path.normpath(final)) or ".", _prefix(final)
  try:
    entries = os.listdir(parent)
  except OSError:
    return []
  now = time.time() if now is None else now
  host, removed = _host(), []
  for entry in entries:
    if not entry.startswith(prefix):
      continue
    path = os.path.join(parent, entry)
    parts = entry[len(prefix):].rsplit("-", 2)  # host-pid-random; a host may hold "-"
    dead = (len(parts) == 3 and parts[1].isdigit() and parts[0] == host
            and int(parts[1]) != os.getpid() and not _alive(int(parts[1])))
    try:
      old = now - os.lstat(path).st_mtime > STALE_SECONDS
    except OSError:
      continue  # removed meanwhile
    if dead or old:
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


def make_temp(final: str) -> str:
  """A new empty temporary folder next to ``final`` (stale ones removed first):
  ``<parent>/.<name>.tmp-<host>-<pid>-<random>`` for ``final`` = ``<parent>/<name>``.

  Raises:
    OSError: the parent folder cannot be created or written.
  """
  parent = os.path.dirname(os.path.normpath(final)) or "."
  os.makedirs(parent, exist_ok=True)
  remove_stale(final)
  return tempfile.mkdtemp(prefix=f"{_prefix(final)}{_host()}-{os.getpid()}-", dir=parent)


class _Terminated(SystemExit):
  """SIGTERM arrived while a temporary folder was being written."""


@contextlib.contextmanager
def removed_on_failure(tmp: str) -> Iterator[str]:
  """Removes ``tmp`` (if it still exists) when the block ends, however it ends.

  Rename ``tmp`` into place inside the block to keep it. In the main thread, a
  SIGTERM that would kill the process with no cleanup (no handler of the
  program's own) is turned into ``SystemExit(143)`` for the duration, so the
  folder is removed before the process exits.
  """
  previous = None
  if threading.current_thread() is threading.main_thread():
    try:
      if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        def on_term(signum, frame):
          raise _Terminated(128 + signum)
        previous = signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError, AttributeError):
      previous = None
  try:
    yield tmp
  finally:
    try:
      if os.path.lexists(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
      if previous is not None:
        signal.signal(signal.SIGTERM, previous)
