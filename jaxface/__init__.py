"""jaxface: face verification, recognition and neural style transfer in JAX/Flax.

Importing the package does no work: submodules are imported on first use.
"""

__version__ = "0.1.0"

# Top-level names, each imported from its module on first use (none of these loads JAX).
_EXPORTS = {"conv_output_shape": "conv"}


def __getattr__(name: str):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'jaxface' has no attribute {name!r}")
  import importlib
  value = getattr(importlib.import_module(f"jaxface.{module}"), name)
  globals()[name] = value
  return value
