"""LightningDataModules with biased validation splits and masks.

Public names are imported lazily (``from negspace.data_modules import X`` loads only X's module), so importing
one capability never pulls in the dependencies of another.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule of this package that defines it
_LAZY: dict[str, str] = {
    "SpuriousPatchDataModule": "spurious",
    "SyntheticLesionDataModule": "lesions",
    "GreenPixelDataModule": "toy",
    "MotionDataModule": "toy",
    "ImageFolderWithMasks": "folder",
    "CSVImageDataset": "folder",
    "DictTensorDataset": "folder",
    "ImageDataModule": "folder",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
