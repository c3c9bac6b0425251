"""The demo's mask-free variant (``negspace demo --masks discovered``): discover the sticker on the biased model,
fit a concept mask from the top candidate, and measure the masks against the true ones.

The true masks are withheld from everything that trains or discovers: discovery reads images and labels only;
the true masks of the *validation* splits are used only to measure the IoU of the discovered masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from negspace.batch import collect_images, iter_batches
from negspace.masks import artifact_patch, discover_artifacts, insertion_effect, mask_iou

__all__ = ["DiscoveredMasks", "discover_masks", "insertion", "mask_quality"]


@dataclass
class DiscoveredMasks:
    """The concept mask of one seed and how it was found."""

    source: Any  # negspace.masks.ConceptMask, bound to a frozen copy of the biased model
    candidate: str  # kind and description of the top candidate
    score: float
    quality: dict[str, float] = field(default_factory=dict)  # iou (patched val images), false_positive_area
    patch: torch.Tensor | None = None  # (C, h, w): the artifact cut out of a reference image by its mask
    candidates: list[Any] = field(default_factory=list, repr=False)  # every Candidate, best first


def _images_and_labels(loader: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches as ``(image, label)`` pairs: masks are dropped here, so discovery cannot see them."""
    return [(b.image, b.label) for b in iter_batches(loader, require=("image", "label"), who="negspace demo")]


def discover_masks(net: nn.Module, dm: Any, layer: str, *, methods: tuple[str, ...] | None = None,
                   seed: int = 0, progress: bool = False) -> DiscoveredMasks:
    """Rank artifact candidates of the biased ``net`` on ``dm``'s training images (no masks) and turn the top
    one into a :class:`negspace.masks.ConceptMask` (frozen reference: the biased ``net`` as it is now)."""
    data = _images_and_labels(dm.train_dataloader())
    kwargs: dict[str, Any] = {"methods": methods} if methods else {}
    candidates = discover_artifacts(net, data, layer, num_classes=2, seed=seed, progress=progress, **kwargs)
    if not candidates:
        raise RuntimeError(f"artifact discovery on layer {layer!r} found no candidate on the biased model")
    top = candidates[0]
    source = top.to_concept_mask(net, data)
    art, _ = top.examples(data)
    return DiscoveredMasks(source=source, candidate=f"{top.kind}: {top.description}", score=float(top.score),
                           patch=artifact_patch(art, source(art)), candidates=candidates)


def insertion(net: nn.Module, dm: Any, patch: torch.Tensor, target: int = 0) -> dict[str, float]:
    """Paste the discovered artifact into the clean (``no_bias``) validation images of ``dm``: the mean change of
    the logit of the class it stands for (excitation) and of the other class (inhibition, encoded absence)."""
    images = collect_images(dm.val_dataloader()[2], who="negspace demo")  # no_bias: no stickers
    out = insertion_effect(net, images, patch, target=target)
    return {"excitation": out["excitation"], "inhibition": out["inhibition"]}


def mask_quality(source: Any, loaders: list[Any]) -> dict[str, float]:
    """IoU of the source's masks with the true (dilated) sticker masks over validation images that carry a
    sticker, and the mean masked area on images without one (false positives)."""
    ious, false_area = [], []
    for loader in loaders:
        for b in iter_batches(loader, require=("image", "mask"), who="negspace demo"):
            pred, true = source(b.image), b.mask.float()
            has = true.flatten(1).amax(1) > 0
            if has.any():
                ious.append(mask_iou(pred[has], true[has], reduction="none"))
            if (~has).any():
                false_area.append(pred[~has].flatten(1).mean(1))
    iou = torch.cat(ious) if ious else torch.zeros(0)
    area = torch.cat(false_area) if false_area else torch.zeros(0)
    return {"iou": float(iou.mean()) if iou.numel() else float("nan"),
            "false_positive_area": float(area.mean()) if area.numel() else float("nan"),
            "n_patched": int(iou.numel())}
