"""``SpuriousPatchDataModule``: any labelled image dataset → biased training set + three biased val splits.

Paper 000 §5.4 / Table 2: during training a fraction ``bias_ratio`` of the ``spurious_class`` samples carry
a synthetic patch (with masks), the other classes never do. Validation (and test) data come in three
splits, returned by ``val_dataloader()`` in this order:

- ``train_bias``: the training bias — every ``spurious_class`` sample carries a patch, no other sample does;
- ``inverse_bias``: every sample of the *other* classes carries a patch, no ``spurious_class`` sample does;
- ``no_bias``: no patches at all.

All three splits contain the same base images. Items are dicts ``{"image": (C, H, W), "label": int,
"mask": (1, H, W) in {0, 1} (dilated patch mask; all zero without patch), "group": 2·label + present,
"index": base-dataset index}``, where ``present`` = 1 iff this item carries a synthetic patch
(e.g. group 0 = class 0 without patch, 1 = class 0 with patch, 2 = class 1 without, 3 = class 1 with).
Images differ from the base image only inside the undilated patch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from negspace.data_modules.folder import _check_loader_args, _loader
from negspace.data_modules.normalize import NormalizeMixin, NormalizeSpec
from negspace.data_modules.patches import (
    PATCH_STYLES,
    POSITIONS,
    default_dilation,
    dilate_mask,
    draw_patch,
    patch_rng,
    resolve_patch_size,
)

__all__ = ["SPLITS", "PatchedDataset", "SpuriousPatchDataModule", "read_item"]

#: Validation/test split order of biased-split data modules.
SPLITS: tuple[str, ...] = ("train_bias", "inverse_bias", "no_bias")


def read_item(dataset: Dataset, index: int) -> tuple[Tensor, int, Tensor | None]:
    """``(image (C, H, W), label, mask (1, H, W) | None)`` of a tuple ``(image, label[, mask])`` or dict item.

    Raises ``ValueError`` for a non-float image, an image that looks channels-last (``(H, W, C)`` with more than
    4 leading entries and 1, 3 or 4 trailing ones: it is never transposed silently), values outside [0, 1] or
    non-finite, a non-int label, or a mask whose size differs from the image's.
    """
    item = dataset[index]
    if isinstance(item, Mapping):
        if "image" not in item or "label" not in item:
            raise ValueError(f"dataset item {index} is a dict without 'image'/'label' keys: {sorted(item)}")
        image, label, mask = item["image"], item["label"], item.get("mask")
    elif isinstance(item, Sequence) and len(item) >= 2:
        image, label = item[0], item[1]
        mask = item[2] if len(item) > 2 else None
    else:
        raise ValueError(f"dataset item {index} must be (image, label[, mask]) or a dict, got {type(item).__name__}")
    if not isinstance(image, Tensor) or image.dim() != 3 or not image.is_floating_point():
        desc = f"{type(image).__name__} {tuple(image.shape)} {image.dtype}" if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"dataset item {index}: image must be a float tensor (C, H, W) in [0, 1], got {desc}")
    if image.shape[0] > 4 and image.shape[-1] in (1, 3, 4):
        raise ValueError(
            f"dataset item {index}: image has shape {tuple(image.shape)}, which looks like (H, W, C); images must be "
            f"(C, H, W) (the layout is never guessed): convert with image.permute(2, 0, 1)"
        )
    if not bool(torch.isfinite(image).all()) or float(image.min()) < 0.0 or float(image.max()) > 1.0:
        raise ValueError(
            f"dataset item {index}: image values must be finite and in [0, 1], got "
            f"[{float(image.min()):.3g}, {float(image.max()):.3g}]"
        )
    label = _as_label(label, index)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise ValueError(f"dataset item {index}: mask must be a tensor, got {type(mask).__name__}")
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if mask.shape != (1, *image.shape[-2:]):
            raise ValueError(
                f"dataset item {index}: mask has shape {tuple(mask.shape)} but the image is "
                f"{tuple(image.shape)}; expected (1, {image.shape[-2]}, {image.shape[-1]})"
            )
        mask = (mask > 0.5).to(image.dtype)
    return image, label, mask


def _as_label(label: Any, index: int | str) -> int:
    if isinstance(label, Tensor):
        if label.numel() != 1 or label.is_floating_point():
            raise ValueError(f"dataset item {index}: label must be an int, got tensor {label}")
        label = int(label.item())
    if isinstance(label, np.integer):
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"dataset item {index}: label must be an int, got {label!r}")
    return label


def _labels_of(dataset: Dataset) -> list[int]:
    """Labels of all items: from ``dataset.targets``/``.labels`` if present, else by reading every item."""
    n = len(dataset)  # type: ignore[arg-type]
    for attr in ("targets", "labels"):
        t = getattr(dataset, attr, None)
        if t is not None and not callable(t) and len(t) == n:
            return [_as_label(v, f"#{i} ({attr})") for i, v in enumerate(t)]
    return [read_item(dataset, i)[1] for i in range(n)]


class PatchedDataset(Dataset):
    """Items of ``base[indices[i]]`` with a synthetic patch where ``patched[i]``; see the module doc.

    ``transform``: optional albumentations transform applied jointly to image and mask (after patching).
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        patched: Sequence[bool],
        *,
        num_classes: int,
        patch: str = "colorful",
        patch_size: int | float = 0.2,
        position: str = "border",
        dilation: int | None = None,
        seed: int = 0,
        transform: Any = None,
        labels: Sequence[int] | None = None,
    ) -> None:
        if len(indices) != len(patched):
            raise ValueError(f"indices and patched must have the same length, got {len(indices)} and {len(patched)}")
        self.base, self.indices, self.patched = base, [int(i) for i in indices], [bool(p) for p in patched]
        self.num_classes, self.patch, self.patch_size, self.position = num_classes, patch, patch_size, position
        self.dilation, self.seed, self.transform = dilation, seed, transform
        self._targets: list[int] | None = list(labels) if labels is not None else None

    @property
    def targets(self) -> list[int]:
        """Labels of the items (read from the base dataset once, then cached)."""
        if self._targets is None:
            base = _labels_of(self.base)
            self._targets = [base[i] for i in self.indices]
        return self._targets

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        idx = self.indices[i]
        image, label, base_mask = read_item(self.base, idx)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"dataset item {idx}: label {label} is outside the classes [0, {self.num_classes})")
        h, w = image.shape[-2:]
        mask = torch.zeros(1, h, w, dtype=image.dtype)
        present = self.patched[i]
        if present:
            size = resolve_patch_size(self.patch_size, h, w)
            image, pmask = draw_patch(image, self.patch, size, patch_rng(self.seed, idx), self.position)
            mask = dilate_mask(pmask, default_dilation(h) if self.dilation is None else self.dilation)
        if base_mask is not None:  # real masks (e.g. stickers) are kept, united with the synthetic patch
            mask = torch.maximum(mask, base_mask)
        if self.transform is not None:
            from negspace.data_modules.transforms import apply_albumentations

            image, mask = apply_albumentations(self.transform, image, mask)
        return {"image": image, "label": label, "mask": mask, "group": 2 * label + int(present), "index": idx}


def _split_indices(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Stratified (scikit-learn) split of ``arange(N)`` into ``[rest, *fractions]`` parts."""
    from sklearn.model_selection import train_test_split

    rest = np.arange(len(labels))
    parts: list[np.ndarray] = []
    remaining = 1.0
    for frac in fractions:
        if frac <= 0:
            parts.append(np.zeros(0, dtype=np.int64))
            continue
        rel = frac / remaining
        sub = labels[rest]
        counts = np.bincount(sub)
        stratify = sub if counts[counts > 0].min() >= 2 else None
        n_take = max(1, round(rel * len(rest)))
        if n_take >= len(rest):
            raise ValueError(f"empty split: fractions {list(fractions)} leave no training samples of {len(labels)}")
        if stratify is not None and (n_take < len(np.unique(sub)) or len(rest) - n_take < len(np.unique(sub))):
            stratify = None
        rest, part = train_test_split(rest, test_size=n_take, stratify=stratify, random_state=seed)
        parts.append(np.sort(part))
        remaining -= frac
    return [np.sort(rest), *parts]


class SpuriousPatchDataModule(NormalizeMixin, L.LightningDataModule):
    """Biased training data and ``train_bias`` / ``inverse_bias`` / ``no_bias`` evaluation splits.

    Args:
        dataset: any labelled image dataset; items ``(image (C, H, W) float in [0, 1], label)`` or dicts with
            ``image``/``label`` (an optional real ``mask`` is validated and united with the patch mask).
        spurious_class: the class whose training samples carry the patch (paper: benign = 0).
        patch: ``"colorful"`` | ``"ellipse"`` | ``"solid"`` (see :func:`~negspace.data_modules.patches.draw_patch`).
        patch_size: int pixels, or float fraction of ``min(H, W)`` (default 0.2).
        patch_position: ``"border"`` (default, like stickers) or ``"random"`` (squares only).
        bias_ratio: fraction in [0, 1] of training ``spurious_class`` samples that carry a patch (1.0: all, as the
            paper; 0.0: unbiased training). Which ones is fixed by ``seed``.
        val_fraction: fraction of ``dataset`` held out for validation (stratified), unless ``val_dataset``.
        test_fraction: fraction held out for testing (0 → ``test_dataloader`` reuses the validation splits,
            unless ``test_dataset``).
        val_dataset, test_dataset: explicit evaluation datasets (same item format) instead of fractions.
        batch_size, num_workers: DataLoader settings (Lightning adds a DistributedSampler under DDP).
        seed: fixes the splits, which training samples are patched, and every patch (per base index).
        transforms: albumentations transform for training items (joint image+mask); ``None`` → paper 000's
            ``HorizontalFlip`` + ``ColorJitter(0.2, 0.2, 0.2, hue=0)`` if ``augment``.
        augment: augment training items (evaluation items are never augmented).
        dilation: mask dilation in pixels; ``None`` → ``round(10 · H / 224)`` (paper: 10 px at 224 px).
        num_classes: default ``len(dataset.classes)`` if present, else ``max(label) + 1`` (at least 2).
        normalize: ``None`` (images in [0, 1]), ``"imagenet"`` or ``(mean, std)`` (numbers or one per channel):
            ``(image − mean) / std``, applied last, by the loaders, after patches are drawn, masks computed and
            augmentations applied (patches and masks live in [0, 1] pixel space; masks are never normalised).
            The ``negspace`` CLI fills it from a timm/torchvision model's own statistics when left ``None``.
    """

    split_names: tuple[str, ...] = SPLITS

    def __init__(
        self,
        dataset: Dataset,
        *,
        spurious_class: int = 0,
        patch: str = "colorful",
        patch_size: int | float = 0.2,
        patch_position: str = "border",
        bias_ratio: float = 1.0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        val_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        transforms: Any = None,
        augment: bool = True,
        dilation: int | None = None,
        num_classes: int | None = None,
        normalize: NormalizeSpec = None,
    ) -> None:
        super().__init__()
        self.normalize = normalize  # validated now
        if isinstance(spurious_class, bool) or not isinstance(spurious_class, int) or spurious_class < 0:
            raise ValueError(f"spurious_class must be an int >= 0 (a class index), got {spurious_class!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if patch not in PATCH_STYLES:
            raise ValueError(f"patch must be one of {list(PATCH_STYLES)}, got {patch!r}")
        if patch_position not in POSITIONS:
            raise ValueError(f"patch_position must be one of {list(POSITIONS)}, got {patch_position!r}")
        if isinstance(bias_ratio, bool) or not isinstance(bias_ratio, int | float) or not 0.0 <= bias_ratio <= 1.0:
            raise ValueError(f"bias_ratio must be a number in [0, 1], got {bias_ratio!r}")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not isinstance(frac, int | float) or not 0.0 <= frac < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
        if val_dataset is None and val_fraction <= 0:
            raise ValueError("val_fraction must be > 0 when no val_dataset is given (empty validation split)")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
        if dilation is not None and (isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 0):
            raise ValueError(f"dilation must be None or an int >= 0 (pixels), got {dilation!r}")
        if isinstance(patch_size, float):
            resolve_patch_size(patch_size, 1, 1)  # validates the fraction now
        elif isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be an int >= 1 (pixels) or a float in (0, 1], got {patch_size!r}")
        _check_loader_args(batch_size, num_workers)
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("empty split: dataset has no samples")
        self.dataset, self.val_dataset, self.test_dataset = dataset, val_dataset, test_dataset
        self.spurious_class, self.patch, self.patch_size = spurious_class, patch, patch_size
        self.patch_position, self.bias_ratio = patch_position, float(bias_ratio)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, int(seed)
        self.transforms, self.augment, self.dilation = transforms, augment, dilation
        self._num_classes = num_classes
        self._built = False
        self.train_set: PatchedDataset | None = None
        self.val_sets: list[PatchedDataset] = []
        self.test_sets: list[PatchedDataset] = []

    # ------------------------------------------------------------------ building
    @property
    def num_classes(self) -> int:
        self._build()
        return int(self._num_classes)  # type: ignore[arg-type]

    @property
    def class_names(self) -> tuple[str, ...]:
        """``dataset.classes`` if the base dataset has them, else ``("0", "1", ...)``."""
        classes = getattr(self.dataset, "classes", None)
        if classes is not None and not callable(classes):
            return tuple(str(c) for c in classes)
        return tuple(str(i) for i in range(self.num_classes))

    def _resolve_num_classes(self, all_labels: list[int]) -> int:
        if self._num_classes is not None:
            nc = self._num_classes
        else:
            classes = getattr(self.dataset, "classes", None)
            nc = len(classes) if classes is not None and not callable(classes) else max(max(all_labels) + 1, 2)
        if isinstance(nc, bool) or not isinstance(nc, int) or nc < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {nc!r}")
        bad = sorted({lab for lab in all_labels if not 0 <= lab < nc})
        if bad:
            raise ValueError(f"labels {bad[:10]} are outside the classes [0, {nc})")
        if not 0 <= self.spurious_class < nc:
            raise ValueError(f"spurious_class must be in [0, {nc}), got {self.spurious_class!r}")
        return nc

    def _eval_splits(self, base: Dataset, idx: np.ndarray, labels: np.ndarray, name: str) -> list[PatchedDataset]:
        if len(idx) == 0:
            raise ValueError(f"empty split: the {name} split has no samples")
        is_spur = labels == self.spurious_class
        if not is_spur.any():
            raise ValueError(
                f"empty split: the {name} split has no samples of spurious_class={self.spurious_class}, so "
                "'train_bias' would carry no patch"
            )
        if is_spur.all():
            raise ValueError(
                f"empty split: the {name} split has only spurious_class={self.spurious_class} samples, so "
                "'inverse_bias' would carry no patch"
            )
        kw = {**self._patch_kw(), "labels": labels.tolist()}
        return [
            PatchedDataset(base, idx, is_spur, **kw),
            PatchedDataset(base, idx, ~is_spur, **kw),
            PatchedDataset(base, idx, np.zeros(len(idx), dtype=bool), **kw),
        ]

    def _patch_kw(self) -> dict[str, Any]:
        return {
            "num_classes": self._num_classes,
            "patch": self.patch,
            "patch_size": self.patch_size,
            "position": self.patch_position,
            "dilation": self.dilation,
            "seed": self.seed,
        }

    def _build(self) -> None:
        if self._built:
            return
        labels = np.asarray(_labels_of(self.dataset), dtype=np.int64)
        val_labels = np.asarray(_labels_of(self.val_dataset), dtype=np.int64) if self.val_dataset is not None else None
        test_labels = (
            np.asarray(_labels_of(self.test_dataset), dtype=np.int64) if self.test_dataset is not None else None
        )
        all_labels = [*labels.tolist()]
        for extra in (val_labels, test_labels):
            if extra is not None:
                all_labels += extra.tolist()
        if min(all_labels) < 0:
            raise ValueError(f"labels must be >= 0, got {min(all_labels)}")
        self._num_classes = self._resolve_num_classes(all_labels)
        fr_val = 0.0 if self.val_dataset is not None else self.val_fraction
        fr_test = 0.0 if self.test_dataset is not None else self.test_fraction
        train_idx, val_idx, test_idx = _split_indices(labels, [fr_val, fr_test], self.seed)
        if len(train_idx) == 0:
            raise ValueError("empty split: no training samples")
        tr_labels = labels[train_idx]
        spur_pos = np.flatnonzero(tr_labels == self.spurious_class)
        if len(spur_pos) == 0 and self.bias_ratio > 0:
            raise ValueError(
                f"empty split: the training split has no samples of spurious_class={self.spurious_class} "
                f"to carry the patch (bias_ratio={self.bias_ratio})"
            )
        n_patched = round(self.bias_ratio * len(spur_pos))
        chosen = np.random.default_rng([self.seed, 7919]).permutation(spur_pos)[:n_patched]
        patched = np.zeros(len(train_idx), dtype=bool)
        patched[chosen] = True
        transform = None
        if self.augment:
            if self.transforms is not None:
                transform = self.transforms
            else:
                from negspace.data_modules.transforms import paper_train_transforms

                channels = read_item(self.dataset, int(train_idx[0]))[0].shape[0]
                transform = paper_train_transforms(channels, seed=self.seed)
        self.train_set = PatchedDataset(
            self.dataset, train_idx, patched, transform=transform, labels=tr_labels.tolist(), **self._patch_kw()
        )
        if self.val_dataset is not None:
            self.val_sets = self._eval_splits(self.val_dataset, np.arange(len(val_labels)), val_labels, "validation")
        else:
            self.val_sets = self._eval_splits(self.dataset, val_idx, labels[val_idx], "validation")
        if self.test_dataset is not None:
            self.test_sets = self._eval_splits(self.test_dataset, np.arange(len(test_labels)), test_labels, "test")
        elif len(test_idx) > 0:
            self.test_sets = self._eval_splits(self.dataset, test_idx, labels[test_idx], "test")
        else:
            self.test_sets = self.val_sets
        self._built = True

    def setup(self, stage: str | None = None) -> None:
        self._build()

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        self._build()
        return _loader(self._normalized(self.train_set), self.batch_size, self.num_workers, True)

    def val_dataloader(self) -> list[DataLoader]:
        """``[train_bias, inverse_bias, no_bias]`` loaders (not shuffled)."""
        self._build()
        return [_loader(self._normalized(d), self.batch_size, self.num_workers, False) for d in self.val_sets]

    def test_dataloader(self) -> list[DataLoader]:
        """Same three splits on the test data (``test_dataset``/``test_fraction``; else the validation data)."""
        self._build()
        return [_loader(self._normalized(d), self.batch_size, self.num_workers, False) for d in self.test_sets]
