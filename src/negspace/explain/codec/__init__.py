"""CODEC (paper 002): contribution datasets, contribution statistics, contribution modes (sparse autoencoder),
mode–class correlation, mode-guided channel selection, the ablation/preservation sweep and contribution maps.

Pipeline (functional, no Lightning)::

    data  = compute_contributions(model, loader, ["layer3"], method="integrated", n_steps=10)
    stats = contribution_statistics(data, "layer3")          # Hoyer, E/I correlation, PCA dimensionality
    modes = fit_modes(data, "layer3", num_classes=10)        # ContributionSAE on E (+ activation, untrained baselines)
    m     = modes.mode_for_class(3)                          # most class-correlated mode (rank=0)
    ch    = modes.channels(3, percent=10)                    # top 10 % of that mode's atom
    with ablate_channels(model, {"layer3": ch}): ...         # negspace.editing
    sweep = perturbation_sweep(model, "layer3", (x, y), modes.atom(m), target_class=3, num_classes=10)

Modules: ``contributions`` (datasets over a loader, DDP), ``store`` (in-memory set, safetensors store),
``statistics``, ``sae`` (the SAE and its one trainer), ``modes`` (fit, correlate, select), ``sweep`` and ``maps``.
Public names are imported lazily.
"""

from __future__ import annotations

from negspace._lazy import attach

_MODULES: dict[str, tuple[str, ...]] = {
    "contributions": ("compute_contributions", "contributions_batch"),
    "store": ("FEATURES", "ContributionSet", "ContributionStore"),
    "statistics": ("contribution_statistics", "ei_correlation"),
    "negspace.stats": ("pca_dimensionality",),
    "sae": ("ACTIVATIONS", "PAPER_LR", "PAPER_STEPS", "SAE_KEYS", "ContributionSAE", "LowR2Warning", "SAEFit",
            "SAEOutput", "auto_lr", "encode_dataset", "init_sae", "r2_score", "sae_loss", "sae_optimizers",
            "train_sae"),
    "modes": ("LayerModes", "class_masks", "default_kind", "fit_codec", "fit_modes", "mode_class_correlation",
              "select_channels", "selection_sign", "target_sign"),
    "sweep": ("DEFAULT_PERCENTS", "OFF_TARGETS", "SweepResult", "per_class_accuracy", "perturbation_sweep"),
    "maps": ("MAP_PARTS", "MAP_SPLITS", "contribution_map", "save_contribution_maps"),
}

_LAZY = {name: module for module, names in _MODULES.items() for name in names}

#: names of the 0.1 modules (negspace.editing.codec / .contributions) replaced by the ground floor
_DEPRECATED = {
    "TARGETS": "negspace.objectives:TARGET_NAMES",
    "make_target": "negspace.objectives:named_target",
    "unpack_batch": "negspace.batch:unpack_batch",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, _DEPRECATED)
