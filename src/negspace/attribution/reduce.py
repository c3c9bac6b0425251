"""Reductions shared by every method: spatial sums, E/I split, Hoyer sparsity, mass inside a mask."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["channel_dim", "ei_split", "hoyer", "relative_mass_in_mask", "spatial_sum"]


def channel_dim(t: Tensor) -> int:
    """Channel axis of an activation: 1 for ``(B, C, H, W)``/``(B, C)``, -1 for tokens ``(B, T, D)``."""
    return -1 if t.dim() == 3 else 1


def spatial_sum(t: Tensor) -> Tensor:
    """Sum over space (or tokens), keeping ``(B, C)``: ``(B, C, H, W) → (B, C)``, ``(B, T, D) → (B, D)``.

    A leading target axis is kept: ``(B, K, C, H, W) → (B, K, C)`` when ``t.dim() == 5``.
    """
    if t.dim() == 5:
        return t.sum(dim=(-2, -1))
    if t.dim() == 4:
        return t.sum(dim=(2, 3))
    if t.dim() == 3:
        return t.sum(dim=1)
    if t.dim() == 2:
        return t
    raise ValueError(f"spatial_sum: unsupported shape {tuple(t.shape)}")


def ei_split(t: Tensor) -> tuple[Tensor, Tensor]:
    """Excitatory and inhibitory parts, ``(t.clamp(min=0), (-t).clamp(min=0))``; ``t = E - I``.

    Apply *before* spatial summation to keep positive and negative contributions separately.
    """
    return t.clamp(min=0), (-t).clamp(min=0)


def hoyer(t: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """Hoyer sparsity ``(√n − ‖t‖₁/‖t‖₂) / (√n − 1)`` along ``dim``: 0 for flat, 1 for one-hot."""
    n = t.shape[dim]
    if n < 2:
        raise ValueError(f"hoyer needs at least 2 entries along dim {dim}, got {n}")
    l1 = t.abs().sum(dim=dim)
    l2 = t.pow(2).sum(dim=dim).sqrt().clamp_min(eps)
    return (math.sqrt(n) - l1 / l2) / (math.sqrt(n) - 1)


def relative_mass_in_mask(attributions: Tensor, mask: Tensor, eps: float = 1e-12) -> Tensor:
    """Share of absolute attribution inside the mask: ``Σ|A·P| / Σ|A|`` per sample.

    ``attributions: (B, C, H, W)``, ``mask`` broadcastable to ``(B, 1, H, W)`` → ``(B,)`` (paper 000,
    Table 2 "Attr." column). Samples with zero attribution give 0.
    """
    a = attributions.abs()
    m = mask.to(a.dtype)
    if m.dim() == a.dim() - 1:
        m = m.unsqueeze(1)
    inside = (a * m).flatten(1).sum(1)
    return inside / a.flatten(1).sum(1).clamp_min(eps)


def channel_mask(num_channels: int, channels: Tensor | list[int], device: torch.device | None = None) -> Tensor:
    """Boolean ``(C,)`` mask with ``True`` at ``channels``."""
    m = torch.zeros(num_channels, dtype=torch.bool, device=device)
    m[torch.as_tensor(channels, dtype=torch.long, device=device)] = True
    return m
