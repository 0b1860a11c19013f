"""Embedding losses and the distances they use (plain `jax.numpy`)."""

from jaxface.losses.distances import pairwise_sq_distances
from jaxface.losses.distances import sq_distance
from jaxface.losses.triplet import STRATEGIES
from jaxface.losses.triplet import triplet_loss

__all__ = [
    "STRATEGIES",
    "pairwise_sq_distances",
    "sq_distance",
    "triplet_loss",
]
