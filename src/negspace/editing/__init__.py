"""Model edits: reversible context managers and persistent, checkpointable edit objects (no Lightning).

Public names are imported lazily (``from negspace.editing import X`` loads only X's module), so importing
one capability never pulls in the dependencies of another.
"""

from __future__ import annotations

from negspace._lazy import attach

# public name -> submodule of this package that defines it
_LAZY: dict[str, str] = {
    "ablate_channels": "channels",
    "preserve_channels": "channels",
    "ChannelEdit": "channels",
    "ContributionSAE": "codec",
    "ContributionSet": "contributions",
    "ContributionStore": "contributions",
    "compute_contributions": "contributions",
    "contribution_statistics": "codec",
    "fit_modes": "codec",
    "select_channels": "codec",
    "perturbation_sweep": "codec",
    "contribution_map": "codec",
    "VirtualNeurons": "pure",
    "VirtualNeuronRouter": "pure",
    "fit_virtual_neurons": "pure",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
