"""X-models (bias-free, positively homogeneous), the toy networks of paper 000, timm/torchvision helpers.

Public names are imported lazily (``from negspace.models import X`` loads only X's module), so importing
one capability never pulls in the dependencies of another.
"""

from __future__ import annotations

from negspace._lazy import attach

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
    "load_clip": "clip",
    "encode_images": "clip",
    "encode_texts": "clip",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
