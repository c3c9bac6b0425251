"""GroupDRO (Sagawa et al. 2020, Algorithm 1): minimise ``Σ_g q_g ℓ_g`` while ``q`` follows exponentiated
gradient ascent on the group losses, ``q_g ← q_g · exp(η · (ℓ_g + C/√n_g))``, renormalised."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_mean_losses", "groupdro_loss", "groupdro_update"]


def group_mean_losses(losses: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Mean loss per group ``(G,)`` (0 for groups absent from the batch; differentiable) and batch counts ``(G,)``."""
    g = groups.long().to(losses.device).flatten()
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= num_groups):
        raise ValueError(f"groups must lie in [0, {num_groups}), got [{int(g.min())}, {int(g.max())}]")
    counts = torch.bincount(g, minlength=num_groups).to(losses.dtype)
    sums = losses.new_zeros(num_groups).index_add(0, g, losses)
    return sums / counts.clamp_min(1), counts


def groupdro_update(q: Tensor, group_losses: Tensor, eta: float, adjustment: Tensor | None = None) -> Tensor:
    """One exponentiated-gradient step on the simplex: ``q · exp(η (ℓ + adj))``, normalised (no gradient)."""
    step = group_losses.detach() if adjustment is None else group_losses.detach() + adjustment.to(group_losses)
    q = q.to(group_losses) * torch.exp(eta * step)
    return q / q.sum()


def groupdro_loss(
    losses: Tensor, groups: Tensor, q: Tensor, *, eta: float = 0.01, counts: Tensor | None = None,
    adjustment: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """GroupDRO's robust loss of one batch and the updated weights.

    Args:
        losses: ``(B,)`` per-sample losses. groups: ``(B,)`` group ids in ``[0, G)``. q: ``(G,)`` current weights.
        eta: step size of the group weights. counts: ``(G,)`` training-set group sizes, needed for the
            generalisation adjustment ``C / √n_g`` (``adjustment=C``; 0 turns it off).

    Returns:
        ``(Σ_g q'_g ℓ_g, q')`` with ``q'`` the weights after this batch's update (as in the paper's code).
    """
    gl, _ = group_mean_losses(losses, groups, q.numel())
    adj = None
    if adjustment:
        if counts is None:
            raise ValueError("adjustment > 0 needs counts= (the training-set group sizes)")
        adj = adjustment / counts.float().clamp_min(1).sqrt()
    q_new = groupdro_update(q, gl, eta, adj)
    return (gl * q_new).sum(), q_new
