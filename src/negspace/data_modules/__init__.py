"""LightningDataModules with biased validation splits and masks.

Public names are imported lazily (``from negspace.data_modules import X`` loads only X's module), so importing
one capability never pulls in the dependencies of another.
"""

from __future__ import annotations

from negspace._lazy import attach

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
    "check_same_size": "folder",
    "collate_items": "folder",
    "IMAGENET_MEAN": "normalize",
    "IMAGENET_STD": "normalize",
    "denormalize": "normalize",
    "model_normalization": "normalize",
    "resolve_normalize": "normalize",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
