"""Plain LightningModules for recipes (callbacks never depend on them).

Public names are imported lazily (``from negspace.modules import X`` loads only X's module), so importing
one capability never pulls in the dependencies of another.
"""

from __future__ import annotations

from negspace._lazy import attach

# public name -> submodule of this package that defines it
_LAZY: dict[str, str] = {
    "ClassifierModule": "classifier",
    "find_head": "finetune",
    "load_weights": "finetune",
    "warmup_cosine_factor": "finetune",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
