"""Analyses, one wing per paper: ``codec`` (002), ``pure`` (004), ``le`` (003), ``tension`` (001, 000).

Public names are imported lazily (``from negspace.explain import X`` loads only X's wing), so importing one
capability never pulls in the dependencies of another.
"""

from __future__ import annotations

from negspace._lazy import attach

_WINGS: dict[str, tuple[str, ...]] = {
    "codec": (
        "ContributionSAE", "ContributionSet", "ContributionStore", "compute_contributions", "contribution_statistics",
        "fit_modes", "select_channels", "perturbation_sweep", "contribution_map",
    ),
    "pure": ("VirtualNeuronSet", "fit_virtual_neurons", "reference_samples", "circuits", "compare_clusterings"),
    "le": (
        "linear_explanation", "Explanation", "correlation_score", "ablation_score", "top_impact", "area_chart",
        "split_indices", "activation_summary", "label_concepts", "builtin_concepts", "clip_concept_matrix",
        "fit_sigmoid_calibration",
    ),
    "tension": (
        "layer_to_feature_attribution", "tension_stats", "TensionResult", "e_split", "phi_maps",
        "completeness_correlation", "select_images", "select_mti", "uniqueness", "activating_patches",
        "PatchResult", "insertion_test", "InsertionResult", "non_target_attribution", "visualize",
        "attribution_inversion", "dot_cos", "FourierImage", "random_transform", "attribution_atlas", "Atlas",
    ),
}  # fmt: skip

_LAZY = {n: wing for wing, names in _WINGS.items() for n in names}
_LAZY.update({n: "negspace.models.clip" for n in ("load_clip", "encode_images", "encode_texts")})

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
