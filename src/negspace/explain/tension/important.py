"""Class-important channels (paper 000, B.3): the channels of a layer whose positive Integrated-Gradients
attribution to a class logit is at least a share ``threshold`` (0.05) of the class's total.

Per class ``t``: IG of logit ``t`` w.r.t. the layer on the samples of class ``t`` (zero baseline), summed
over space per channel, negative values discarded (per sample and channel), averaged over the samples; the
relative attribution is that average divided by its sum over channels. The insertion test can then be run
on these channels (``tension_report(..., channels="important")``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from negspace.attribution import layer_contributions
from negspace.batch import iter_batches
from negspace.explain.tension._common import Data, check_pos_int
from negspace.hooks import eval_mode, get_layer
from negspace.reduce import spatial_sum

__all__ = ["ImportantChannels", "class_important_channels"]


@dataclass
class ImportantChannels:
    """``relative (K, C)``: relative positive IG of each channel for each of the ``classes (K,)`` present;
    ``channels``: ``{class: [channels with relative >= threshold]}``; ``counts (K,)``: samples per class."""

    layer: str
    classes: Tensor
    relative: Tensor
    counts: Tensor
    threshold: float
    channels: dict[int, list[int]]

    def union(self) -> list[int]:
        """Every channel important for at least one class, sorted."""
        return sorted({c for cs in self.channels.values() for c in cs})


def class_important_channels(
    model: nn.Module,
    layer: str,
    data: Data,
    labels: Tensor | None = None,
    *,
    threshold: float = 0.05,
    method: str = "integrated",
    n_steps: int = 32,
    batch_size: int = 64,
    batch_keys: object = None,
) -> ImportantChannels:
    """Channels of ``layer`` important for each class (paper 000, B.3: relative IG ``>= 0.05``).

    ``data``: images ``(N, ...)`` with ``labels (N,)`` (``None``: the model's predicted classes — the paper
    uses the true labels), or an iterable of batches carrying labels (layout ``batch_keys``).
    ``method``: a :func:`negspace.attribution.layer_contributions` method (``"integrated"``, the paper's IG,
    ``n_steps`` intervals; ``"act_grad"`` is a cheaper approximation).
    """
    get_layer(model, layer)
    check_pos_int(batch_size, "batch_size")
    if not isinstance(threshold, int | float) or not 0 < threshold < 1:
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
    sums: dict[int, Tensor] = {}
    counts: dict[int, int] = {}
    if isinstance(data, Tensor):
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape[:1] != data.shape[:1]):
            raise ValueError(f"labels must be a LongTensor (N,) = ({data.shape[0]},), got {labels!r}")
        batches = [(data[i : i + batch_size], None if labels is None else labels[i : i + batch_size])
                   for i in range(0, data.shape[0], batch_size)]  # fmt: skip
    else:
        batches = ((b.image, b.label) for b in iter_batches(data, batch_keys, require=("image", "label"),
                                                             who="class_important_channels"))  # fmt: skip
    with eval_mode(model):
        for x, y in batches:
            if y is None:
                with torch.no_grad():
                    y = model(x).argmax(1)
            y = torch.as_tensor(y).long().flatten().to(x.device)
            a = spatial_sum(layer_contributions(model, layer, x, y, method=method, n_steps=n_steps).detach())
            a = a.clamp_min(0).double().cpu()  # (B, C): negative attributions discarded
            for t in y.unique().tolist():
                sel = (y == t).cpu()
                sums[t] = sums.get(t, torch.zeros(a.shape[1], dtype=torch.float64)) + a[sel].sum(0)
                counts[t] = counts.get(t, 0) + int(sel.sum())
    if not sums:
        raise ValueError("class_important_channels: data is empty")
    classes = torch.tensor(sorted(sums))
    mean = torch.stack([sums[t] / counts[t] for t in classes.tolist()])
    relative = mean / mean.sum(1, keepdim=True).clamp_min(1e-300)
    chans = {t: (relative[i] >= threshold).nonzero().flatten().tolist() for i, t in enumerate(classes.tolist())}
    return ImportantChannels(layer=layer, classes=classes, relative=relative.float(),
                             counts=torch.tensor([counts[t] for t in classes.tolist()]), threshold=float(threshold),
                             channels=chans)  # fmt: skip
