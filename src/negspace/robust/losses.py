"""Per-sample criteria and inverse-frequency class/group weights (the "reweighting" baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CRITERIA", "check_criterion", "group_counts", "inverse_frequency_weights", "per_sample_loss",
           "weighted_mean"]

CRITERIA = ("ce", "bce")  # as negspace.modules.ClassifierModule(loss=...)


def check_criterion(criterion: object) -> str:
    """``criterion`` must be one of :data:`CRITERIA`."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    return str(criterion)


def per_sample_loss(logits: Tensor, y: Tensor, criterion: str = "ce") -> Tensor:
    """``(B,)`` losses of ``logits: (B, K)`` against labels ``y: (B,)``: softmax CE, or BCE of every logit against
    ``one_hot(y)`` averaged over the K logits (so ``.mean()`` equals the ClassifierModule's mean loss)."""
    check_criterion(criterion)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be (B, num_classes), got {getattr(logits, 'shape', type(logits).__name__)}")
    y = y.long().to(logits.device)
    if criterion == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)


def group_counts(groups: Tensor, num_groups: int | None = None) -> Tensor:
    """``(G,)`` number of samples per group id (``groups: (N,)`` ints ``>= 0``)."""
    g = groups.long().flatten()
    if g.numel() and int(g.min()) < 0:
        raise ValueError(f"groups must be ints >= 0, got min {int(g.min())}")
    return torch.bincount(g, minlength=int(num_groups or 0)).float()


def inverse_frequency_weights(counts: Tensor) -> Tensor:
    """``(G,)`` weights ``N / (G_present · n_g)`` (0 for empty groups): every present group carries the same total
    weight, and the mean weight over the training set is 1 (so the loss scale of ERM is kept)."""
    counts = counts.float()
    present = counts > 0
    if not bool(present.any()):
        raise ValueError("counts must contain at least one non-empty group")
    w = torch.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def weighted_mean(losses: Tensor, weights: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """``Σ w_i ℓ_i / normalizer`` (default ``B``: an unbiased estimate of the weighted training-set mean when the
    weights average 1 over the training set)."""
    denom = losses.shape[0] if normalizer is None else normalizer
    return (weights.to(losses) * losses).sum() / denom
