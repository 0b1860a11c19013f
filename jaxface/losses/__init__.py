"""Embedding losses, the distances they use, and style transfer costs (plain `jax.numpy`)."""

from jaxface.losses.distances import pairwise_sq_distances, sq_distance
from jaxface.losses.style import content_cost, gram, style_cost, style_layer_cost, total_variation
from jaxface.losses.triplet import STRATEGIES, triplet_loss

__all__ = [
    "STRATEGIES",
    "content_cost",
    "gram",
    "pairwise_sq_distances",
    "sq_distance",
    "style_cost",
    "style_layer_cost",
    "total_variation",
    "triplet_loss",
]
