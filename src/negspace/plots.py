"""Every matplotlib figure negspace draws. Functions take tensors and return ``matplotlib.figure.Figure``
objects; callbacks hand them to the Trainer's loggers (``negspace.callbacks.base.log_figure``), scripts save
them. The Agg backend is used, so no display is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["image_array", "phi_rgb"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def image_array(img: Tensor) -> Any:
    """``(C, H, W)`` → an array matplotlib shows: RGB for 3 channels, grey for 1, channels side by side otherwise."""
    a = img.detach().float().cpu()
    if a.dim() == 2:
        a = a[None]
    if a.shape[0] == 3:
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:  # normalised inputs: show them min-max scaled
            a = (a - lo) / max(hi - lo, 1e-12)
        return a.clamp(0, 1).permute(1, 2, 0).numpy()
    if a.shape[0] == 1:
        return a[0].numpy()
    return torch.cat(list(a), dim=1).numpy()


def phi_rgb(phi_plus: Tensor, phi_minus: Tensor) -> Any:
    """φ⁺ in red and φ⁻ in blue, ``(H, W)`` each in [0, 1] → ``(H, W, 3)``."""
    p, m = phi_plus.detach().float().cpu(), phi_minus.detach().float().cpu()
    return torch.stack([p, torch.zeros_like(p), m], dim=-1).clamp(0, 1).numpy()


# === priors and biased splits ===

# === CODEC ===

# === PURE ===

# === LE ===

# === tension ===
