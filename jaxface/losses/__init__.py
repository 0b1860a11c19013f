"""Embedding losses, the distances they use, and style transfer costs (plain `jax.numpy`)."""

from jaxface.losses.distances import pairwise_sq_distances
from jaxface.losses.distances import sq_distance
from jaxface.losses.style import content_cost
from jaxface.losses.style import gram
from jaxface.losses.style import style_cost
from jaxface.losses.style import style_layer_cost
from jaxface.losses.style import total_variation
from jaxface.losses.triplet import STRATEGIES
from jaxface.losses.triplet import triplet_loss

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
