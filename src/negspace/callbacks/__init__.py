"""Thin Lightning glue around the functional core.

Public names are imported lazily (``from negspace.callbacks import X`` loads only X's module), so importing
one capability never pulls in the dependencies of another.
"""

from __future__ import annotations

from negspace._lazy import attach

# public name -> submodule of this package that defines it
_LAZY: dict[str, str] = {
    "AttributionPrior": "prior",
    "ChannelEdit": "edit",
    "CodecModes": "codec",
    "VirtualNeurons": "pure",
    "LinearExplanations": "le",
    "TensionReport": "tension",
    "BiasedSplitReport": "report",
    "GroupReweighting": "robust",
    "GroupDRO": "robust",
    "JTT": "robust",
    "DFR": "robust",
    "ArtifactInsertion": "masks",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
