"""Gatys neural style transfer: config, images, the pure step and ``run`` (``python -m experiments.nst``)."""
