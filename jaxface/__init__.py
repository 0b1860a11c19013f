"""jaxface: face verification, recognition and neural style transfer in JAX/Flax.

Importing the package does no work: submodules are imported on first use.
"""

__version__ = "0.1.0"
