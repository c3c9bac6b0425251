"""Spurious-patch drawing and mask dilation (plain functions, no Lightning; ``dilate_mask`` and
``default_dilation`` live in :mod:`negspace.masks.source` and are re-exported here).

Patches are deterministic per ``(seed, index)``: :func:`patch_rng` gives a NumPy generator seeded with both,
so the same base sample always gets the same patch, independently of worker order or split.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from negspace.masks.source import default_dilation, dilate_mask

__all__ = [
    "PALETTE",
    "PATCH_STYLES",
    "POSITIONS",
    "default_dilation",
    "dilate_mask",
    "draw_patch",
    "patch_rng",
    "resolve_patch_size",
]

#: Patch styles understood by :func:`draw_patch`.
PATCH_STYLES: tuple[str, ...] = ("colorful", "ellipse", "solid")
#: Patch placements: ``"border"`` (touching a band along a random image edge, like stickers) or ``"random"``.
POSITIONS: tuple[str, ...] = ("border", "random")

#: Saturated calibration-sticker colours (RGB) for the ``"colorful"`` style.
PALETTE: Tensor = torch.tensor(
    [
        [1.0, 0.0, 0.0],
        [0.0, 0.8, 0.0],
        [0.0, 0.2, 1.0],
        [1.0, 1.0, 0.0],
        [0.0, 1.0, 1.0],
        [1.0, 0.0, 1.0],
        [1.0, 1.0, 1.0],
        [1.0, 0.5, 0.0],
        [0.1, 0.1, 0.1],
    ]
)


def patch_rng(seed: int, index: int, salt: int = 0) -> np.random.Generator:
    """NumPy generator determined by ``(seed, index, salt)`` only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), int(salt)])


def resolve_patch_size(patch_size: int | float, height: int, width: int) -> int:
    """Patch side in pixels: an ``int`` is pixels, a ``float`` in ``(0, 1]`` a fraction of ``min(H, W)``."""
    side = min(height, width)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int | float):
        raise TypeError(f"patch_size must be an int (pixels) or a float in (0, 1], got {patch_size!r}")
    if isinstance(patch_size, float):
        if not 0.0 < patch_size <= 1.0:
            raise ValueError(f"patch_size as a fraction must be in (0, 1], got {patch_size}")
        return max(1, round(patch_size * side))
    if not 1 <= patch_size <= side:
        raise ValueError(f"patch_size in pixels must be in [1, {side}] for a {height}x{width} image, got {patch_size}")
    return patch_size


def _square_origin(rng: np.random.Generator, h: int, w: int, s: int, position: str) -> tuple[int, int]:
    if position == "random":
        return int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    band = max(1, s // 2)  # the patch starts within half a side of the chosen edge
    edge = int(rng.integers(0, 4))
    along_h, along_w = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    off = int(rng.integers(0, band))
    off_h, off_w = min(off, h - s), min(off, w - s)
    return [(off_h, along_w), (h - s - off_h, along_w), (along_h, off_w), (along_h, w - s - off_w)][edge]


def _colour(rng: np.random.Generator, channels: int) -> Tensor:
    return torch.from_numpy(rng.random(channels)).float()


def draw_patch(
    image: Tensor, style: str, size: int, rng: np.random.Generator, position: str = "border"
) -> tuple[Tensor, Tensor]:
    """Draw one patch on a copy of ``image``.

    Args:
        image: ``(C, H, W)`` float in [0, 1].
        style: ``"colorful"`` (a square of g×g blocks of sticker colours, g = 3 if side ≥ 9 else 2; for
            ``C != 3`` random grey levels), ``"ellipse"`` (a random-colour ellipse with semi-axes
            ``U(0.6, 1)·size`` and ``U(0.35, 0.7)·size``, random rotation, centred on a random point of the image
            border, so partly cut off, as in paper 000's code), ``"solid"`` (a square of one random colour).
        size: patch side (squares) or longest semi-axis (ellipse), pixels.
        rng: source of randomness (see :func:`patch_rng`).
        position: ``"border"`` or ``"random"`` (squares only; ellipses are always on the border).

    Returns:
        ``(patched (C, H, W), mask (1, H, W))``; the mask is 1 exactly where patch pixels were written, and
        ``patched`` equals ``image`` outside it.
    """
    if style not in PATCH_STYLES:
        raise ValueError(f"patch style must be one of {list(PATCH_STYLES)}, got {style!r}")
    if position not in POSITIONS:
        raise ValueError(f"patch position must be one of {list(POSITIONS)}, got {position!r}")
    c, h, w = image.shape
    size = max(1, min(int(size), h, w))
    out = image.clone()
    mask = torch.zeros(1, h, w, dtype=image.dtype)
    if style in ("colorful", "solid"):
        top, left = _square_origin(rng, h, w, size, position)
        if style == "solid":
            out[:, top : top + size, left : left + size] = _colour(rng, c).view(c, 1, 1)
        else:
            g = 3 if size >= 9 else 2 if size >= 2 else 1
            edges = np.linspace(0, size, g + 1).round().astype(int)
            for i in range(g):
                for j in range(g):
                    if c == 3:
                        col = PALETTE[int(rng.integers(0, len(PALETTE)))]
                    else:
                        col = torch.full((c,), float(rng.integers(0, 5)) / 4)
                    r0, r1 = top + edges[i], top + edges[i + 1]
                    c0, c1 = left + edges[j], left + edges[j + 1]
                    out[:, r0:r1, c0:c1] = col.view(c, 1, 1).to(image.dtype)
        mask[:, top : top + size, left : left + size] = 1
        return out, mask
    # ellipse centred on the border
    edge = int(rng.integers(0, 4))
    t = float(rng.random())
    cy, cx = [(0.0, t * (w - 1)), (h - 1.0, t * (w - 1)), (t * (h - 1), 0.0), (t * (h - 1), w - 1.0)][edge]
    a = size * float(rng.uniform(0.6, 1.0))
    b = size * float(rng.uniform(0.35, 0.7))
    theta = float(rng.uniform(0.0, math.pi))
    colour = _colour(rng, c).to(image.dtype)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    dy, dx = yy - cy, xx - cx
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if not bool(inside.any()):  # degenerate tiny ellipse: keep at least the centre pixel
        inside[round(cy), round(cx)] = True
    out[:, inside] = colour.view(c, 1)
    mask[0, inside] = 1
    return out, mask
