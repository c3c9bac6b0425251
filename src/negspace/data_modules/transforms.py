"""Joint image+mask augmentation with albumentations (paper 000, B.4: random flip + colour jitter)."""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
import torch
from torch import Tensor

__all__ = ["apply_albumentations", "paper_train_transforms"]


def paper_train_transforms(channels: int = 3, seed: int | None = None) -> A.Compose:
    """``HorizontalFlip(p=0.5)`` + ``ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0, p=1)``.

    Colour jitter needs RGB; for ``channels != 3`` only the flip is used. ``seed`` seeds albumentations' own
    random state (``A.Compose(seed=...)``): it does not follow ``torch``/``seed_everything``, so without it two
    runs with the same seed augment differently.
    """
    ops: list[Any] = [A.HorizontalFlip(p=0.5)]
    if channels == 3:
        ops.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=1.0))
    return A.Compose(ops, seed=seed)


def apply_albumentations(transform: Any, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Apply an albumentations transform jointly. ``image: (C, H, W)`` float in [0, 1], ``mask: (1, H, W)``.

    Geometric ops move image and mask together (albumentations' ``mask=`` target); pixel ops touch the image
    only. The image is clipped back to [0, 1] and the mask re-binarised (> 0.5) after interpolation.
    """
    img = np.ascontiguousarray(image.permute(1, 2, 0).numpy().astype(np.float32))
    msk = np.ascontiguousarray(mask[0].numpy().astype(np.float32))
    out = transform(image=img, mask=msk)
    img_t = torch.from_numpy(np.ascontiguousarray(out["image"]))
    if img_t.dim() == 2:
        img_t = img_t.unsqueeze(-1)
    msk_t = torch.from_numpy(np.ascontiguousarray(out["mask"])).float()
    if msk_t.dim() == 3:
        msk_t = msk_t[..., 0]
    return img_t.permute(2, 0, 1).clamp(0.0, 1.0).contiguous(), (msk_t > 0.5).float().unsqueeze(0)
