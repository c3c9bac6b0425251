"""Neuron-level analysis: concepts, linear explanations, simulation scores, tension, feature visualisation.

Public names are imported lazily (``from negspace.explain import X`` loads only X's module), so importing
one capability never pulls in the dependencies of another.
"""

from __future__ import annotations

from negspace._lazy import attach

# public name -> submodule of this package that defines it
_LAZY: dict[str, str] = {
    "layer_to_feature_attribution": "tension",
    "tension_stats": "tension",
    "TensionResult": "tension",
    "e_split": "tension",
    "phi_maps": "tension",
    "completeness_correlation": "tension",
    "select_images": "tension",
    "select_mti": "tension",
    "uniqueness": "tension",
    "activating_patches": "tension",
    "PatchResult": "tension",
    "insertion_test": "tension",
    "InsertionResult": "tension",
    "non_target_attribution": "tension",
    "visualize": "featureviz",
    "attribution_inversion": "featureviz",
    "dot_cos": "featureviz",
    "FourierImage": "featureviz",
    "random_transform": "featureviz",
    "attribution_atlas": "atlas",
    "Atlas": "atlas",
    "linear_explanation": "linear",
    "Explanation": "linear",
    "correlation_score": "simulation",
    "ablation_score": "simulation",
    "top_impact": "simulation",
    "area_chart": "simulation",
    "split_indices": "linear",
    "activation_summary": "concepts",
    "label_concepts": "concepts",
    "builtin_concepts": "concepts",
    "clip_concept_matrix": "concepts",
    "fit_sigmoid_calibration": "concepts",
    "load_clip": "clip",
    "encode_images": "clip",
    "encode_texts": "clip",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
