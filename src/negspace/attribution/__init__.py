"""Functional attribution core (pure torch; no Lightning)."""

from negspace.attribution.dispatch import ATTRIBUTION_METHODS, attribute, check_method
from negspace.attribution.hidden import METHODS, layer_contributions
from negspace.attribution.input import input_x_gradient, integrated_gradients
from negspace.reduce import ei_split, hoyer, relative_mass_in_mask, spatial_sum

__all__ = [
    "ATTRIBUTION_METHODS",
    "METHODS",
    "attribute",
    "check_method",
    "ei_split",
    "hoyer",
    "input_x_gradient",
    "integrated_gradients",
    "layer_contributions",
    "relative_mass_in_mask",
    "spatial_sum",
]
