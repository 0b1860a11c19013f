"""Per-program XLA compiler options shared by jaxface's inference code.

On CPU with jaxlib 0.10.x, XLA's YNN fusion slows the face detector's and
dlib's ResNet's convolutions (figures: BUILD.md, "dlib face pipeline").
``experiments.flagutil.tune_cpu_xla``
turns it off process-wide through ``XLA_FLAGS``; library code cannot (the flag
must be set before JAX starts), so it passes the same setting to ``jax.jit`` as
``compiler_options`` for its own programs. The user's own ``XLA_FLAGS`` entry
for the option, or ``JAXFACE_NO_XLA_TUNING=1``, wins; other backends and jaxlib
lines (which may not know the option) get none.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os

import jax
import numpy as np

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def cpu_compiler_options() -> dict[str, str] | None:
  """``{YNN_OPTION: ""}`` where it applies (see the module docstring), else None."""
  if os.environ.get("JAXFACE_NO_XLA_TUNING") or YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
    return None
  if jax.default_backend() != "cpu":
    return None
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  return {YNN_OPTION: ""} if version.startswith("0.10.") and _options_accepted() else None


@functools.cache
def _options_accepted() -> bool:
  """Whether this XLA build compiles with the option (one trivial compile per
  process): a build that rejects it gets a plain ``jax.jit`` instead of an error."""
  try:
    jax.jit(lambda x: x + 1, compiler_options={YNN_OPTION: ""}).lower(np.float32(0)).compile()
    return True
  except Exception:  # noqa: BLE001 - any rejection means "do not use it"
    return False
