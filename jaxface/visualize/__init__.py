"""What ConvNet units respond to: receptive fields, running top-k, patch grids.

Modules (imported on use, so ``import jaxface.visualize`` loads no JAX):
``receptive`` (field size / stride / offset from a layer geometry list),
``topk`` (running per-unit top-k, pure jnp), ``render`` (crops and grid PNGs),
``adapters`` (intermediate activations and geometry per network) and ``run``
(``run(config, workdir)``, the ``python -m experiments.visualize`` job).
"""
