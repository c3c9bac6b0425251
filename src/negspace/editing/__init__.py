"""Model edits, and only edits: channel ablation/preservation and virtual-neuron routing — reversible context
managers and persistent, checkpointable edit objects (no Lightning).

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
