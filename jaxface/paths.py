"""Where jaxface finds data and keeps its cache.

One setting locates the real test/benchmark data: the environment variable
``JAXFACE_DATA`` (default ``../shared/data`` relative to the working directory).
Paths in flagfiles may say ``$JAXFACE_DATA/faces/att_orl``.
"""

from __future__ import annotations

import os

DATA_ENV = "JAXFACE_DATA"
DEFAULT_DATA_ROOT = os.path.join("..", "shared", "data")


def data_root() -> str:
  """Root folder of the shared real data (may not exist on someone else's clone)."""
  return os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT


def expand(path: str) -> str:
  """Expands ``$JAXFACE_DATA`` (with its default), other env vars and ``~`` in ``path``."""
  path = path.replace("${" + DATA_ENV + "}", data_root()).replace("$" + DATA_ENV, data_root())
  return os.path.expanduser(os.path.expandvars(path))


def cache_dir() -> str:
  """User cache directory for converted weights (``$JAXFACE_CACHE`` or ~/.cache/jaxface)."""
  base = os.environ.get("JAXFACE_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxface")
  return base
