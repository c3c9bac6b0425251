"""Datasets for real data (image folders / CSV files with optional mask files) and a plain data module.

Every dataset here yields the library's item dict ``{"image": (C, H, W) float in [0, 1], "label": int,
"mask": (1, H, W) float in {0, 1}, "group": 2·label + (mask non-empty), "index": int}``. They can be wrapped
by :class:`~negspace.data_modules.SpuriousPatchDataModule` (synthetic patches) or used directly with their
real masks (e.g. ISIC images with sticker masks) via :class:`ImageDataModule`.

Bad data raises ``ValueError`` naming the file/row; nothing is silently dropped.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from negspace.data_modules.normalize import NormalizeMixin, NormalizeSpec

__all__ = [
    "IMAGE_EXTENSIONS",
    "CSVImageDataset",
    "DictTensorDataset",
    "ImageDataModule",
    "ImageFolderWithMasks",
    "check_same_size",
    "collate_items",
    "load_image",
    "load_mask",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _size_hw(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return (size, size)
    if isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"size must be None, a positive int or (H, W), got {size!r}")


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> Tensor:
    """RGB image file → ``(3, H, W)`` float in [0, 1] (resized bilinearly to ``size=(H, W)`` if given)."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image file not found: {str(p)!r}")
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size is not None:
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise ValueError(f"cannot read image {str(p)!r}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_mask(path: str | Path, expected_hw: tuple[int, int], size: tuple[int, int] | None = None) -> Tensor:
    """Mask file (non-zero = 1) → ``(1, H, W)`` float in {0, 1}; its size must equal the image's original size."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"mask file not found: {str(p)!r}")
    try:
        with Image.open(p) as im:
            im = im.convert("L")
            hw = (im.height, im.width)
            if hw != expected_hw:
                raise ValueError(
                    f"mask {str(p)!r} has size {hw[0]}x{hw[1]} but its image is {expected_hw[0]}x{expected_hw[1]}"
                )
            if size is not None:
                im = im.resize((size[1], size[0]), Image.Resampling.NEAREST)
            arr = np.asarray(im, dtype=np.float32)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read mask {str(p)!r}: {e}") from e
    return torch.from_numpy((arr > 127).astype(np.float32)).unsqueeze(0)


def _image_hw(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return (im.height, im.width)
    except Exception as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from e


def check_same_size(samples: Sequence[tuple[Path, int, Path | None]], where: str) -> None:
    """Without ``size=`` every image must have the same size (a batch stacks them): else ``ValueError`` naming
    the sizes found, example files of each and the fix."""
    by_size: dict[tuple[int, int], list[str]] = {}
    for path, _, _ in samples:
        by_size.setdefault(_image_hw(path), []).append(str(path))
    if len(by_size) > 1:
        found = "; ".join(f"{h}x{w}: {len(v)} file(s), e.g. {v[:2]}" for (h, w), v in
                          sorted(by_size.items(), key=lambda kv: -len(kv[1]))[:5])
        common = max(by_size, key=lambda k: len(by_size[k]))
        raise ValueError(
            f"images in {where} have {len(by_size)} different sizes (H x W) and size=None: {found}. A batch needs "
            f"one size: pass size=({common[0]}, {common[1]}) (or any (H, W)) to resize images and masks"
        )


class _FileDataset(Dataset):
    """Shared item logic: ``self.samples = [(image_path, label, mask_path | None)]``."""

    samples: list[tuple[Path, int, Path | None]]
    classes: list[str]
    size: tuple[int, int] | None

    @property
    def targets(self) -> list[int]:
        return [s[1] for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label, mask_path = self.samples[index]
        image = load_image(path, self.size)
        if mask_path is None:
            mask = torch.zeros(1, *image.shape[-2:])
        else:
            mask = load_mask(mask_path, _image_hw(path), self.size)
        present = int(bool(mask.any()))
        return {"image": image, "label": label, "mask": mask, "group": 2 * label + present, "index": index}


class ImageFolderWithMasks(_FileDataset):
    """``root/<class>/<image>`` (torchvision ``ImageFolder`` layout) with optional masks.

    Args:
        root: image root; every sub-directory is a class (sorted), unless ``class_names`` fixes them.
        masks_root: optional ``masks_root/<class>/<stem>.<ext>``; an image without a mask file gets an
            all-zero mask unless ``require_masks=True`` (then it is an error).
        class_names: the allowed classes in label order; a sub-directory not in it is an error.
        size: resize images (bilinear) and masks (nearest) to ``size`` (int or ``(H, W)``). ``None``: every
            image must have the same size (checked at construction; mixed sizes are an error naming them).
        ignore_other_files: files that are not images (by extension, see ``IMAGE_EXTENSIONS``) in ``root`` or a
            class folder are an error listing them unless True (then they are skipped with a warning). Hidden
            files (``.DS_Store``, ...) are always ignored.

    A class in ``class_names`` without a folder is an error (an empty class is never silently accepted).
    """

    def __init__(
        self,
        root: str | Path,
        masks_root: str | Path | None = None,
        *,
        class_names: Sequence[str] | None = None,
        size: int | Sequence[int] | None = None,
        require_masks: bool = False,
        ignore_other_files: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root is not a directory: {str(self.root)!r}")
        self.size = _size_hw(size)
        dirs = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if class_names is None:
            self.classes = dirs
        else:
            self.classes = [str(c) for c in class_names]
            unknown = [d for d in dirs if d not in self.classes]
            if unknown:
                raise ValueError(f"class folders {unknown} in {str(self.root)!r} are not in class_names={self.classes}")
        if not self.classes:
            raise ValueError(f"no class sub-directories found in {str(self.root)!r}")
        mroot = Path(masks_root) if masks_root is not None else None
        if mroot is not None and not mroot.is_dir():
            raise ValueError(f"masks_root is not a directory: {str(mroot)!r}")
        self.samples = []
        missing: list[str] = []
        absent = [c for c in self.classes if not (self.root / c).is_dir()]
        if absent:
            raise ValueError(f"class_names {absent} have no folder in {str(self.root)!r} (folders: {dirs})")
        other = [str(f) for f in self.root.iterdir() if f.is_file() and not f.name.startswith(".")]
        for label, cls in enumerate(self.classes):
            cdir = self.root / cls
            for f in sorted(cdir.iterdir()):
                if f.name.startswith("."):
                    continue
                if f.is_dir() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                    other.append(str(f))
                    continue
                mask_path = None
                if mroot is not None:
                    cands = [mroot / cls / (f.stem + ext) for ext in IMAGE_EXTENSIONS]
                    found = [c for c in cands if c.is_file()]
                    if found:
                        mask_path = found[0]
                    elif require_masks:
                        missing.append(str(mroot / cls / f.stem) + ".*")
                self.samples.append((f, label, mask_path))
        if missing:
            raise ValueError(f"{len(missing)} mask file(s) missing (require_masks=True), e.g. {missing[:5]}")
        if other:
            msg = (f"{len(other)} file(s) or folder(s) under {str(self.root)!r} are not images with extensions "
                   f"{IMAGE_EXTENSIONS} in a class folder, e.g. {sorted(other)[:5]}")
            if not ignore_other_files:
                raise ValueError(msg + "; remove them or pass ignore_other_files=True to skip them")
            warnings.warn(msg + "; skipped (ignore_other_files=True)", stacklevel=2)
        if not self.samples:
            raise ValueError(f"no images with extensions {IMAGE_EXTENSIONS} found under {str(self.root)!r}")
        if self.size is None:
            check_same_size(self.samples, repr(str(self.root)))


class CSVImageDataset(_FileDataset):
    """Images listed in a CSV file, with labels and optional mask paths.

    Args:
        csv_path: CSV with a header row.
        image_col, label_col: column names of the image path and of the label (class name or int index).
        mask_col: optional column of mask paths (an empty cell = no mask, all zeros).
        class_names: allowed classes in label order; default: the sorted distinct labels (ints if all are ints,
            then ``class_names = ["0", ..., str(max)]``). A label outside ``class_names`` is an error.
        root: directory that relative paths are resolved against (default: the CSV's directory).
        size: resize to ``size`` (int or ``(H, W)``). ``None``: every image must have the same size (checked at
            construction; mixed sizes are an error naming them and the fix).

    All image (and mask) files must exist at construction; missing ones raise ``ValueError`` listing rows.
    """

    def __init__(
        self,
        csv_path: str | Path,
        image_col: str,
        label_col: str,
        mask_col: str | None = None,
        class_names: Sequence[str] | None = None,
        *,
        root: str | Path | None = None,
        size: int | Sequence[int] | None = None,
    ) -> None:
        path = Path(csv_path)
        if not path.is_file():
            raise ValueError(f"csv_path not found: {str(path)!r}")
        base = Path(root) if root is not None else path.parent
        self.size = _size_hw(size)
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            for arg, col in (("image_col", image_col), ("label_col", label_col), ("mask_col", mask_col)):
                if col is not None and col not in cols:
                    raise ValueError(f"{arg}={col!r} is not a column of {str(path)!r}; columns: {cols}")
            rows = list(reader)
        if not rows:
            raise ValueError(f"{str(path)!r} has no data rows")
        raw = [r[label_col].strip() for r in rows]
        if class_names is None:
            if all(v.lstrip("-").isdigit() for v in raw):
                ints = [int(v) for v in raw]
                if min(ints) < 0:
                    raise ValueError(f"labels must be >= 0, got {min(ints)} in {str(path)!r}")
                self.classes = [str(i) for i in range(max(ints) + 1)]
            else:
                self.classes = sorted(set(raw))
        else:
            self.classes = [str(c) for c in class_names]
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        bad_labels, missing = [], []
        for i, (r, v) in enumerate(zip(rows, raw)):
            if v in index:
                label = index[v]
            elif v.isdigit() and int(v) < len(self.classes) and class_names is not None:
                label = int(v)
            else:
                bad_labels.append((i + 2, v))  # +2: header row and 1-based lines
                continue
            img = base / r[image_col].strip()
            if not img.is_file():
                missing.append((i + 2, str(img)))
            mask = None
            if mask_col is not None and r[mask_col].strip():
                mask = base / r[mask_col].strip()
                if not mask.is_file():
                    missing.append((i + 2, str(mask)))
            self.samples.append((img, label, mask))
        if bad_labels:
            raise ValueError(
                f"{len(bad_labels)} label(s) outside the classes {self.classes} in {str(path)!r} "
                f"(line, label): {bad_labels[:5]}"
            )
        if missing:
            raise ValueError(f"{len(missing)} file(s) listed in {str(path)!r} do not exist (line, path): {missing[:5]}")
        if self.size is None:
            check_same_size(self.samples, repr(str(path)))


class DictTensorDataset(Dataset):
    """In-memory item dicts from tensors. ``images (N, C, H, W)``, ``labels (N,)``, ``masks (N, 1, H, W)`` or None.

    ``group`` = ``2·label + (mask non-empty)``; ``index`` = position.
    """

    def __init__(self, images: Tensor, labels: Tensor, masks: Tensor | None = None) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be (N,) = ({images.shape[0]},), got {tuple(labels.shape)}")
        if masks is not None and masks.shape != (images.shape[0], 1, *images.shape[-2:]):
            raise ValueError(f"masks must be (N, 1, H, W) = {(images.shape[0], 1, *images.shape[-2:])}, got {tuple(masks.shape)}")
        if labels.is_floating_point() and not bool((labels == labels.round()).all()):
            raise ValueError(f"labels must be integer class indices, got non-integer values {labels[:5].tolist()}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
        self.images = images
        self.labels = labels.long()
        self.masks = masks if masks is not None else torch.zeros(images.shape[0], 1, *images.shape[-2:])
        self.present = self.masks.flatten(1).amax(1) > 0

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = int(self.labels[index])
        return {
            "image": self.images[index],
            "label": label,
            "mask": self.masks[index],
            "group": 2 * label + int(self.present[index]),
            "index": int(index),
        }


class _Augmented(Dataset):
    """Apply an albumentations transform jointly to ``image`` and ``mask`` of item dicts."""

    def __init__(self, dataset: Dataset, transform: Any) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        from negspace.data_modules.transforms import apply_albumentations

        item = dict(self.dataset[index])
        item["image"], item["mask"] = apply_albumentations(self.transform, item["image"], item["mask"])
        return item


def collate_items(items: list[Any]) -> Any:
    """``default_collate`` that turns a size mismatch into a ``ValueError`` naming the items and their shapes."""
    from torch.utils.data import default_collate

    try:
        return default_collate(items)
    except RuntimeError as e:
        shapes = []
        for i, it in enumerate(items):
            img = it.get("image") if isinstance(it, Mapping) else it[0] if isinstance(it, Sequence) else it
            idx = it.get("index", i) if isinstance(it, Mapping) else i
            shapes.append((idx, tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__))
        if len({s for _, s in shapes}) <= 1:
            raise
        raise ValueError(
            f"cannot batch items of different shapes (index, image shape): {shapes[:8]}; every image of a dataset "
            "must have one size: resize them (e.g. ImageFolderWithMasks/CSVImageDataset size=(H, W), or a resize "
            "in your dataset)"
        ) from e


def _loader(ds: Dataset, batch_size: int, num_workers: int, shuffle: bool) -> DataLoader:
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, persistent_workers=num_workers > 0,
        collate_fn=collate_items,
    )


def _check_loader_args(batch_size: int, num_workers: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")


class ImageDataModule(NormalizeMixin, L.LightningDataModule):
    """Plain data module over item-dict datasets (e.g. real images with real masks).

    Args:
        train: training dataset (item dicts).
        val: a dataset, or ``{name: dataset}`` (→ ``val_dataloader()`` returns a list in that order;
            names in ``split_names``), or None.
        test: like ``val`` (names in ``test_split_names``); None → the validation loaders are reused for
            ``test_dataloader()``.
        augment: apply ``transforms`` (default: paper 000's flip + colour jitter) to training items.
        normalize: ``None``, ``"imagenet"`` or ``(mean, std)``, applied last by the loaders (after augmentation;
            masks stay in [0, 1]); see :class:`~negspace.data_modules.SpuriousPatchDataModule`.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset | Mapping[str, Dataset] | None = None,
        test: Dataset | Mapping[str, Dataset] | None = None,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        augment: bool = True,
        transforms: Any = None,
        normalize: NormalizeSpec = None,
    ) -> None:
        super().__init__()
        _check_loader_args(batch_size, num_workers)
        self.normalize = normalize
        if len(train) == 0:  # type: ignore[arg-type]
            raise ValueError("empty split: the training dataset has no samples")
        self.train, self.batch_size, self.num_workers = train, batch_size, num_workers
        self.val = dict(val) if isinstance(val, Mapping) else ({"val": val} if val is not None else {})
        self.test = dict(test) if isinstance(test, Mapping) else ({"test": test} if test is not None else {})
        for name, ds in {**self.val, **self.test}.items():
            if len(ds) == 0:  # type: ignore[arg-type]
                raise ValueError(f"empty split: {name!r} has no samples")
        self.split_names = tuple(self.val)
        self.test_split_names = tuple(self.test or self.val)
        self.augment, self.transforms = augment, transforms

    def train_dataloader(self) -> DataLoader:
        ds = self.train
        if self.augment:
            from negspace.data_modules.transforms import paper_train_transforms

            ds = _Augmented(ds, self.transforms if self.transforms is not None else paper_train_transforms())
        return _loader(self._normalized(ds), self.batch_size, self.num_workers, True)

    def _loaders(self, splits: dict[str, Dataset]) -> DataLoader | list[DataLoader]:
        loaders = [_loader(self._normalized(d), self.batch_size, self.num_workers, False) for d in splits.values()]
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loaders(self.val) if self.val else []

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loaders(self.test or self.val) if (self.test or self.val) else []
