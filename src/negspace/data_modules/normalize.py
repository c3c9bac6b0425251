"""Input normalisation of image data modules: ``normalize=None | "imagenet" | (mean, std)``.

Normalisation is the *last* step of every item: patches are drawn and masks computed in [0, 1] pixel space,
then ``image ← (image − mean) / std`` (per channel). Masks are never normalised. The statistics of a
pretrained timm or torchvision model come from the model itself (:func:`model_normalization`), which is what
the ``negspace`` CLI fills in when a recipe names such a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalization",
    "NormalizeMixin",
    "NormalizedDataset",
    "denormalize",
    "maybe_normalized",
    "model_normalization",
    "normalize_image",
    "resolve_normalize",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: what ``normalize=`` accepts (YAML: ``imagenet`` or ``[[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]``)
NormalizeSpec = str | tuple[float | Sequence[float], float | Sequence[float]] | None

#: resolved statistics: ``(mean, std)`` as tuples of floats (length 1 = every channel, else one per channel)
Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def _floats(value: Any, what: str, spec: Any) -> tuple[float, ...]:
    if isinstance(value, Tensor):
        value = value.flatten().tolist()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (float(value),)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0 and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        return tuple(float(v) for v in value)
    raise ValueError(
        f"normalize must be None, 'imagenet' or (mean, std) with mean/std a number or a list of numbers per "
        f"channel; its {what} is {value!r} (normalize={spec!r})"
    )


def resolve_normalize(normalize: Any) -> Normalization | None:
    """``None`` | ``"imagenet"`` | ``(mean, std)`` → ``((mean...), (std...))`` or ``None``; ``ValueError`` otherwise.

    ``mean``/``std`` are numbers (all channels) or one number per channel; every ``std`` must be > 0.
    """
    if normalize is None:
        return None
    if isinstance(normalize, str):
        if normalize.lower() == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        raise ValueError(f"normalize must be None, 'imagenet' or (mean, std), got {normalize!r}")
    if isinstance(normalize, dict) and set(normalize) == {"mean", "std"}:
        normalize = (normalize["mean"], normalize["std"])
    if not isinstance(normalize, Sequence) or len(normalize) != 2:
        raise ValueError(f"normalize must be None, 'imagenet' or (mean, std), got {normalize!r}")
    mean, std = _floats(normalize[0], "mean", normalize), _floats(normalize[1], "std", normalize)
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise ValueError(f"normalize: mean and std have {len(mean)} and {len(std)} channels, got {normalize!r}")
    if any(not s > 0 for s in std):
        raise ValueError(f"normalize: every std must be > 0, got {std}")
    return mean, std


def _view(stats: tuple[float, ...], image: Tensor, spec: Normalization) -> Tensor:
    c = image.shape[-3]
    if len(stats) not in (1, c):
        raise ValueError(
            f"normalize has {len(stats)} channel values (mean/std {spec}) but the images have {c} channels"
        )
    return torch.tensor(stats, dtype=image.dtype, device=image.device).view(-1, 1, 1)


def normalize_image(image: Tensor, stats: Normalization) -> Tensor:
    """``(image − mean) / std`` per channel; ``image: (..., C, H, W)``."""
    return (image - _view(stats[0], image, stats)) / _view(stats[1], image, stats)


def denormalize(image: Tensor, stats: Normalization | Any) -> Tensor:
    """Inverse of the normalisation: ``image · std + mean``; ``image: (..., C, H, W)``; ``stats`` as accepted by
    :func:`resolve_normalize` (``None`` → unchanged)."""
    resolved = resolve_normalize(stats)
    if resolved is None:
        return image
    return image * _view(resolved[1], image, resolved) + _view(resolved[0], image, resolved)


class NormalizedDataset(Dataset):
    """Items of ``dataset`` (dicts with ``"image"`` or tuples ``(image, ...)``) with the image normalised last."""

    def __init__(self, dataset: Dataset, normalize: Any) -> None:
        stats = resolve_normalize(normalize)
        if stats is None:
            raise ValueError("NormalizedDataset needs statistics, got normalize=None")
        self.dataset, self.stats = dataset, stats

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # targets, classes, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, dict):
            return {**item, "image": normalize_image(item["image"], self.stats)}
        return (normalize_image(item[0], self.stats), *item[1:])


def maybe_normalized(dataset: Dataset, stats: Normalization | None) -> Dataset:
    """``dataset`` itself without statistics, else a :class:`NormalizedDataset`."""
    return dataset if stats is None else NormalizedDataset(dataset, stats)


def model_normalization(model: nn.Module | None = None, name: str | None = None) -> Normalization | None:
    """The input statistics a timm or torchvision model expects, or ``None`` for other models.

    timm: ``timm.data.resolve_model_data_config(model)`` (from the model's ``pretrained_cfg``); torchvision:
    the mean/std of the default weights' ``transforms()`` for ``name="torchvision:<arch>"``.
    """
    if name is not None and name.startswith("torchvision:"):
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name[len("torchvision:"):])
        except (ValueError, KeyError):
            return None
        tf = weights.DEFAULT.transforms() if hasattr(weights, "DEFAULT") else None
        if tf is None or not hasattr(tf, "mean"):
            return None
        return tuple(float(v) for v in tf.mean), tuple(float(v) for v in tf.std)
    if model is not None and (name is None or name.startswith("timm:")) and hasattr(model, "pretrained_cfg"):
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    return None


class NormalizeMixin:
    """``normalize`` attribute of data modules: validated on assignment; loaders wrap their datasets with it."""

    _norm_stats: Normalization | None = None
    _norm_spec: Any = None

    @property
    def normalize(self) -> Any:
        """The ``normalize`` setting (``None``, ``"imagenet"`` or ``(mean, std)``); settable before loaders are made."""
        return self._norm_spec

    @normalize.setter
    def normalize(self, value: Any) -> None:
        self._norm_stats = resolve_normalize(value)
        self._norm_spec = value

    @property
    def normalization(self) -> Normalization | None:
        """Resolved ``(mean, std)`` tuples, or ``None``."""
        return self._norm_stats

    def _normalized(self, dataset: Dataset) -> Dataset:
        return maybe_normalized(dataset, self._norm_stats)
