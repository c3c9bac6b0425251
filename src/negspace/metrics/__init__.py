"""torchmetrics metrics (DDP-synced) and the biased-split report core (tables, per-split aggregation).

Public names are imported lazily (``from negspace.metrics import X`` loads only X's module), so importing
one capability never pulls in the dependencies of another.
"""

from __future__ import annotations

from negspace._lazy import attach

# public name -> submodule of this package that defines it
_LAZY: dict[str, str] = {
    "GroupAccuracy": "group",
    "AttributionInMask": "group",
    "DEFAULT_SPLITS": "group",
    "SplitReport": "report",
    "figure_samples": "report",
    "flatten_result": "report",
    "format_table": "report",
    "split_names": "report",
    "check_class_index": "report",
    "data_split_names": "report",
    "target_and_other_attributions": "report",
    "unflatten_result": "report",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
