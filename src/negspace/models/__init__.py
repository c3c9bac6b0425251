"""X-models (bias-free, positively homogeneous), the toy networks of paper 000, timm/torchvision helpers.

Public names are imported lazily (``from negspace.models import X`` loads only X's module), so importing
one capability never pulls in the dependencies of another.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule of this package that defines it
_LAZY: dict[str, str] = {
    "XSmallCNN": "xmodels",
    "XResNet": "xmodels",
    "xresnet18": "xmodels",
    "xresnet50": "xmodels",
    "GreenPixelNet": "toy",
    "MotionDetector": "toy",
    "create_model": "zoo",
    "NEGSPACE_MODELS": "zoo",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
