"""Reductions shared by every method: channel layout, per-channel summaries, spatial sums, E/I split,
Hoyer sparsity and attribution mass inside a mask. Pure torch.

Layouts: conv maps ``(B, C, H, W)`` keep channels on axis 1; token layers ``(B, T, D)`` and dense layers
``(B, D)`` keep them on the last axis.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = [
    "REDUCES",
    "channel_dim",
    "channels_last",
    "ei_split",
    "hoyer",
    "mask_like",
    "num_channels",
    "reduce_positions",
    "relative_mass_in_mask",
    "spatial_sum",
    "summarize",
]

#: per-channel spatial reductions understood by :func:`reduce_positions` and :func:`summarize`
REDUCES: tuple[str, ...] = ("mean", "max", "sum", "center", "cls")


def channel_dim(t: Tensor) -> int:
    """Channel axis of an activation: 1 for ``(B, C, H, W)``/``(B, C)``, -1 for tokens ``(B, T, D)``."""
    return -1 if t.dim() == 3 else 1


def channels_last(act: Tensor) -> Tensor:
    """Positions then channels: ``(B, C, H, W) → (B, H·W, C)``; ``(B, T, D)`` stays; ``(B, D) → (B, 1, D)``."""
    if act.dim() == 4:
        return act.flatten(2).transpose(1, 2)
    if act.dim() == 3:
        return act
    if act.dim() == 2:
        return act[:, None, :]
    raise ValueError(f"unsupported activation shape {tuple(act.shape)}; expected (B,C,H,W), (B,T,D) or (B,D)")


def num_channels(act: Tensor) -> int:
    """Number of channels (neurons) of an activation in any supported layout."""
    return channels_last(act).shape[-1]


def check_reduce(reduce: object, allowed: tuple[str, ...] = REDUCES, who: str = "reduce") -> str:
    """Validate a reduction name against ``allowed``; return it."""
    if reduce not in allowed:
        raise ValueError(f"{who} must be one of {allowed}, got {reduce!r}")
    return reduce  # type: ignore[return-value]


def reduce_positions(vals: Tensor, reduce: str, act: Tensor) -> Tensor:
    """Reduce over positions: ``vals: (B, S, K) → (B, K)``, where ``S`` are the positions of ``act``.

    ``"center"`` takes the central pixel of a conv map (the middle token of a token layer); ``"cls"`` the
    first token (token layers only).
    """
    check_reduce(reduce)
    if reduce == "mean":
        return vals.mean(dim=1)
    if reduce == "sum":
        return vals.sum(dim=1)
    if reduce == "max":
        return vals.max(dim=1).values
    if reduce == "cls":
        if act.dim() != 3:
            raise ValueError(f"reduce='cls' needs a token layer (B, T, D), got an output of shape {tuple(act.shape)}")
        return vals[:, 0]
    if act.dim() == 4:
        h, w = act.shape[-2:]
        return vals[:, (h // 2) * w + w // 2]
    return vals[:, vals.shape[1] // 2]


def summarize(act: Tensor, reduce: str = "mean") -> Tensor:
    """Per-channel summary of a layer output: ``(B, C, H, W) | (B, T, D) | (B, D) → (B, C)``.

    The one per-channel summary every method uses (LE neuron values, PURE reference ranking, tension
    feature values, CLIP baselines). ``(B, D)`` is returned as is for every ``reduce``.
    """
    if act.dim() == 2:
        check_reduce(reduce)
        return act
    return reduce_positions(channels_last(act), reduce, act)


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


def mask_like(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """``mask (B, 1, H, W)`` or ``(B, H, W)`` checked against ``like (B, C, H, W)`` → ``(B, 1, H, W)``.

    Raises ``TypeError`` for a non-tensor and ``ValueError`` naming both shapes for any other shape (a mask is
    never silently broadcast over the batch or resized)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor (B, 1, H, W), got {type(mask).__name__}")
    m = mask.unsqueeze(1) if mask.dim() == like.dim() - 1 else mask
    want = (like.shape[0], 1, *like.shape[2:])
    if m.dim() != like.dim() or m.shape[0] != like.shape[0] or m.shape[1] != 1 or m.shape[2:] != like.shape[2:]:
        raise ValueError(f"{name} must have shape {want} (or {(want[0], *want[2:])}) to match {tuple(like.shape)}, "
                         f"got {tuple(mask.shape)}")
    return m


def relative_mass_in_mask(attributions: Tensor, mask: Tensor, eps: float = 1e-12) -> Tensor:
    """Share of absolute attribution inside the mask: ``Σ|A·P| / Σ|A|`` per sample.

    ``attributions: (B, C, H, W)``, ``mask`` broadcastable to ``(B, 1, H, W)`` → ``(B,)`` (paper 000,
    Table 2 "Attr." column). Samples with zero attribution give 0.
    """
    a = attributions.abs()
    m = mask_like(mask, attributions).to(a.dtype)
    inside = (a * m).flatten(1).sum(1)
    return inside / a.flatten(1).sum(1).clamp_min(eps)
