"""Model edits: reversible context managers and persistent, checkpointable edit objects (no Lightning).

Public names are imported lazily (``from negspace.editing import X`` loads only X's module), so importing
one capability never pulls in the dependencies of another.
"""

from __future__ import annotations

import importlib
from typing import Any

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

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
