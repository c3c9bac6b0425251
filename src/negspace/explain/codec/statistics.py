"""Paper 002 §3 statistics of contributions vs activations: Hoyer sparsity, E/I correlation, PCA dimensionality."""

from __future__ import annotations

import torch
from torch import Tensor

from negspace.explain.codec.store import ContributionSet
from negspace.reduce import hoyer
from negspace.stats import pca_dimensionality, pearson_rows

__all__ = ["contribution_statistics", "ei_correlation"]


def ei_correlation(pos: Tensor, neg: Tensor) -> Tensor:
    """Per-channel Pearson correlation across samples between E and I magnitudes, ``(N, C), (N, C) → (C,)``
    (paper 002 §3, Fig. 3C–D: high in early layers, decorrelating with depth). Constant channels give 0."""
    if pos.shape != neg.shape or pos.dim() != 2:
        raise ValueError(f"pos and neg must both be (N, C), got {tuple(pos.shape)} and {tuple(neg.shape)}")
    return torch.nan_to_num(pearson_rows(pos.T, neg.T), nan=0.0)


def _class_average(x: Tensor, labels: Tensor | None) -> Tensor:
    if labels is None or (labels < 0).all():
        return x
    classes = labels.unique()
    classes = classes[classes >= 0]
    return torch.stack([x[labels == c].mean(0) for c in classes])


def contribution_statistics(
    data: ContributionSet, layer: str, *, class_average: bool = True, variance: float = 0.95
) -> dict[str, float]:
    """Paper 002 §3 statistics of one layer, contributions vs activations.

    * ``hoyer_contrib`` / ``hoyer_act``: Hoyer sparsity across channels per sample (net contributions
      ``E − I`` / spatially summed activations), averaged over samples;
    * ``ei_corr``: mean over channels of the E/I correlation across samples;
    * ``dim_contrib`` / ``dim_act``: PCA components for ``variance`` of the (class-averaged) matrices.
    """
    net = data.features(layer, "net")
    out = {"hoyer_contrib": float(hoyer(net, dim=1).mean())}
    out["ei_corr"] = float(ei_correlation(data.features(layer, "positive"), data.features(layer, "negative")).mean())
    labels = data.labels if class_average else None
    out["dim_contrib"] = float(pca_dimensionality(_class_average(net, labels), variance))
    if f"{layer}.act" in data.tensors:
        act = data.features(layer, "activation")
        out["hoyer_act"] = float(hoyer(act, dim=1).mean())
        out["dim_act"] = float(pca_dimensionality(_class_average(act, labels), variance))
    return out
