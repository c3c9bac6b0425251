"""Attribution-cropped feature visualisations of PURE reference samples (paper 004, A.1).

The neuron's spatial max is attributed to the input (here input×gradient, the Grad×Act rule PURE uses for
circuits, instead of the paper's LRP), the heatmap is summed over colour channels, its positive part
smoothed with a Gaussian of size ``K`` (default 5) and normalised to a maximum of one; the image is cropped
to the *squared* bounding box of the pixels above ``T`` (default 0.01) and resized. No masking (as for the
paper's CLIP evaluation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.attribution import input_x_gradient
from negspace.hooks import eval_mode
from negspace.objectives import neuron

__all__ = ["attribution_heatmaps", "crop_boxes", "crop_references", "gaussian_smooth"]


def _per_sample(neurons: int | Tensor, b: int) -> int | Tensor:
    if isinstance(neurons, bool) or not isinstance(neurons, int | Tensor):
        raise TypeError(f"neurons must be an int or a LongTensor (B,), got {type(neurons).__name__}")
    if isinstance(neurons, Tensor):
        if neurons.is_floating_point() or neurons.dim() != 1 or neurons.shape[0] != b:
            raise ValueError(f"neurons must be an int or a LongTensor of shape ({b},), got {neurons.dtype} {tuple(neurons.shape)}")
        return neurons.long()
    return neurons


def attribution_heatmaps(model: nn.Module, layer: str, x: Tensor, neurons: int | Tensor, *, reduce: str = "max") -> Tensor:
    """Input×gradient of the neuron's spatially reduced activation, summed over channels: ``(B, H, W)``.

    ``neurons``: one int for all samples or a LongTensor ``(B,)`` (each sample explains its own neuron).
    """
    obj = neuron(layer, _per_sample(neurons, x.shape[0]), reduce=reduce)
    with eval_mode(model):
        attr = input_x_gradient(model, x, obj)
    return attr.sum(dim=1)


def gaussian_smooth(maps: Tensor, kernel_size: int = 5) -> Tensor:
    """Gaussian blur of ``maps: (B, H, W)`` with an odd ``kernel_size`` and ``σ = 0.3((K−1)/2 − 1) + 0.8``.

    Written here (not torchvision's ``gaussian_blur``) because reflect padding fails when ``K`` exceeds
    the map size (the paper's plots use K=51); we pad by edge replication.
    """
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    if kernel_size == 1:
        return maps
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    m = maps[:, None]
    m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))
    return m[:, 0]


def crop_boxes(heatmaps: Tensor, *, kernel_size: int = 5, threshold: float = 0.01) -> Tensor:
    """Squared bounding boxes ``(B, 3)`` = ``(top, left, side)`` of the smoothed, max-normalised positive
    heatmap above ``threshold``. An all-zero heatmap gives the largest centred square."""
    if heatmaps.dim() != 3:
        raise ValueError(f"heatmaps must be (B, H, W), got {tuple(heatmaps.shape)}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    h, w = heatmaps.shape[-2:]
    sm = gaussian_smooth(heatmaps.clamp_min(0).float(), kernel_size)
    peak = sm.flatten(1).max(dim=1).values
    boxes = []
    for m, p in zip(sm, peak):
        mask = m / p > threshold if p > 0 else torch.ones_like(m, dtype=torch.bool)
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        side = min(max(r1 - r0 + 1, c1 - c0 + 1), h, w)
        top = min(max((r0 + r1 + 1) // 2 - side // 2, 0), h - side)
        left = min(max((c0 + c1 + 1) // 2 - side // 2, 0), w - side)
        boxes.append((top, left, side))
    return torch.tensor(boxes, dtype=torch.long)


def crop_references(
    model: nn.Module,
    layer: str,
    x: Tensor,
    neurons: int | Tensor,
    *,
    kernel_size: int = 5,
    threshold: float = 0.01,
    size: int | None = None,
    reduce: str = "max",
) -> Tensor:
    """Attribution-cropped feature visualisations (paper 004, A.1): ``x (B, C, H, W) → (B, C, size, size)``.

    ``size=None`` keeps ``H``. Crops are taken from ``x`` as given (de-normalise before embedding if needed).
    """
    heat = attribution_heatmaps(model, layer, x, neurons, reduce=reduce).detach()
    boxes = crop_boxes(heat, kernel_size=kernel_size, threshold=threshold)
    size = x.shape[-2] if size is None else size
    out = []
    for img, (t, left, s) in zip(x.detach(), boxes.tolist()):
        crop = img[None, :, t : t + s, left : left + s]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=s > size))
    return torch.cat(out)
