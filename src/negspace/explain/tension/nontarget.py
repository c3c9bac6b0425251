"""Non-target attribution (paper 000 §4): a class explained on samples of *other* classes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from negspace.attribution import input_x_gradient, integrated_gradients
from negspace.attribution.engine import check_input

__all__ = ["non_target_attribution"]


def non_target_attribution(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    target: int | str = "complement",
    *,
    method: str = "integrated_gradients",
    n_steps: int = 32,
) -> tuple[Tensor, Tensor]:
    """Attributions of a class on samples of *other* classes (paper 000 §4).

    ``target``: an int class ``t`` → attributions of ``t`` for every sample with ``label != t``;
    ``"complement"`` (binary tasks) → for every sample, the attribution of ``1 - label``.
    ``method``: ``"integrated_gradients"`` (zero baseline, as in the paper) or ``"input_x_gradient"``.

    Returns ``(attributions (M, ...), indices (M,))`` into ``x: (B, ...)``.
    """
    check_input(x)
    labels = torch.as_tensor(labels).long().flatten()
    if labels.numel() != x.shape[0]:
        raise ValueError(f"labels must have one entry per sample ({x.shape[0]}), got {labels.numel()}")
    if method not in ("integrated_gradients", "input_x_gradient"):
        raise ValueError(f"method must be 'integrated_gradients' or 'input_x_gradient', got {method!r}")
    if target == "complement":
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 1):
            raise ValueError(f"target='complement' needs binary labels in {{0, 1}}, got labels {sorted(set(labels.tolist()))[:5]}")
        idx = torch.arange(x.shape[0])
        tgt: int | Tensor = 1 - labels
    elif isinstance(target, int) and not isinstance(target, bool):
        idx = (labels != target).nonzero().flatten()
        tgt = target
    else:
        raise ValueError(f"target must be a class index or 'complement', got {target!r}")
    if idx.numel() == 0:
        return x.new_zeros((0, *x.shape[1:])), idx
    xs = x[idx]
    if method == "integrated_gradients":
        return integrated_gradients(model, xs, tgt, n_steps=n_steps), idx
    return input_x_gradient(model, xs, tgt), idx
