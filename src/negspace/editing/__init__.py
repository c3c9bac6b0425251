"""Model edits, and only edits: channel ablation/preservation and virtual-neuron routing — reversible context
managers and persistent, checkpointable edit objects — and their way out of the library: ``bake`` (fold an
edit into a plain module), ``save_edit``/``load_edited`` (safetensors + JSON). No Lightning.

Public names are imported lazily. The analyses that used to live here (CODEC contributions and modes, PURE
virtual-neuron fitting) moved to :mod:`negspace.explain`; their old names still work with a warning.
"""

from __future__ import annotations

from negspace._lazy import attach

_LAZY: dict[str, str] = {
    "ablate_channels": "channels",
    "preserve_channels": "channels",
    "ChannelEdit": "channels",
    "VirtualNeuronRouter": "router",
    **{n: "baking" for n in ("bake", "bake_plan", "BakeStep", "ChannelFill", "EditedLayer", "edit_channels")},
    **{n: "io" for n in ("save_edit", "load_edit", "load_edited", "check_edit")},
    **{n: "routing_module" for n in ("RoutedLayer", "RoutedBlock")},
}

_MOVED: dict[str, str] = {
    **{n: f"negspace.explain.codec:{n}" for n in (
        "ContributionSAE", "ContributionSet", "ContributionStore", "compute_contributions", "contribution_statistics",
        "fit_modes", "select_channels", "perturbation_sweep", "contribution_map",
    )},
    "VirtualNeurons": "negspace.explain.pure:VirtualNeuronSet",
    "fit_virtual_neurons": "negspace.explain.pure:fit_virtual_neurons",
}  # fmt: skip

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, _MOVED)
