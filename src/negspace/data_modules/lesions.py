"""``SyntheticLesionDataModule``: procedural benign/malignant "lesions" with a spurious-patch bias.

A stand-in for paper 000's ISIC experiment (§5.4) that needs no download. Each image is a skin-coloured
background with one lesion. A latent *severity* ``s ∈ [0, 1]`` controls the ABCD-like cues a dermatologist
would use, so the class can be learnt from shape and colour irregularity:

With the cue strength ``c = s^1.5``:

- **border**: radius ``r(θ) = R·(1 + Σ_{k=2..8} a_k cos(kθ + φ_k))`` with ``a_k ∝ (0.015 + 0.2·c)/√k``;
- **asymmetry**: a first harmonic of amplitude ``0.25·c`` and an off-centre colour gradient;
- **colour variegation**: the uniform brown is mixed with two other lesion colours (dark brown,
  black, blue-grey, red) through smooth random fields with weight ``∝ c``;
- **border sharpness**: soft edge of width ``0.02 + 0.03·c·u``.

Benign (class 0) lesions draw ``s ~ U(0, 0.5 + overlap/2)``, malignant (class 1) ``s ~ U(0.5 − overlap/2, 1)``;
with the default ``overlap=0.1`` about 5 % of the samples are ambiguous (Bayes accuracy ≈ 97.5 %).
Generation is vectorised torch, deterministic per seed and cached in memory (≈ 0.5 s for 2000 images at 64 px).

The data module subclasses :class:`~negspace.data_modules.SpuriousPatchDataModule` (same splits, items,
patches and arguments), with independent generated sets for training, validation and test.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from negspace.data_modules.folder import DictTensorDataset
from negspace.data_modules.normalize import NormalizeSpec
from negspace.data_modules.spurious import SpuriousPatchDataModule

__all__ = ["SyntheticLesionDataModule", "lesion_images"]

_SKIN = torch.tensor([0.87, 0.68, 0.56])
_BROWN = torch.tensor([0.55, 0.36, 0.22])
_OTHERS = torch.tensor(
    [
        [0.28, 0.16, 0.10],  # dark brown
        [0.10, 0.08, 0.09],  # black
        [0.38, 0.42, 0.52],  # blue-grey
        [0.72, 0.32, 0.30],  # red
    ]
)


def _smooth_field(n: int, size: int, g: torch.Generator, cells: int = 5) -> Tensor:
    """Random smooth field in (0, 1), ``(n, 1, S, S)``: bicubic upsampling of ``cells×cells`` noise, sigmoid."""
    low = torch.randn(n, 1, cells, cells, generator=g)
    return torch.sigmoid(2.0 * F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False))


@lru_cache(maxsize=8)
def _generate(n: int, image_size: int, seed: int, overlap: float) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    s_ = image_size
    labels = torch.zeros(n, dtype=torch.long)
    labels[torch.randperm(n, generator=g)[: n // 2]] = 1
    lo = torch.where(labels == 1, 0.5 - overlap / 2, 0.0)
    hi = torch.where(labels == 1, 1.0, 0.5 + overlap / 2)
    sev = lo + (hi - lo) * torch.rand(n, generator=g)
    cue = (sev**1.5).view(n, 1, 1)  # convex: typical benign lesions stay round and uniform
    coords = (torch.arange(s_, dtype=torch.float32) + 0.5) / s_ * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cy = (torch.rand(n, 1, 1, generator=g) - 0.5) * 0.25
    cx = (torch.rand(n, 1, 1, generator=g) - 0.5) * 0.25
    dy, dx = yy - cy, xx - cx
    # mild ellipticity (both classes), random orientation
    ang = torch.rand(n, 1, 1, generator=g) * math.pi
    stretch = 1 + 0.2 * torch.rand(n, 1, 1, generator=g)
    u = (dx * torch.cos(ang) + dy * torch.sin(ang)) / stretch
    v = -dx * torch.sin(ang) + dy * torch.cos(ang)
    rho, theta = torch.sqrt(u**2 + v**2), torch.atan2(v, u)
    # border profile r(θ) tabulated on 256 angles per sample (cheap), then looked up per pixel
    bins = 256
    tb = torch.linspace(-math.pi, math.pi, bins + 1)[:-1].view(1, 1, bins)
    ks = torch.arange(1, 9, dtype=torch.float32).view(1, 8, 1)
    amp = (0.015 + 0.2 * cue.view(n, 1, 1)) / ks.sqrt() * (0.5 + torch.rand(n, 8, 1, generator=g))
    amp[:, 0] = 0.25 * cue.view(n, 1)  # first harmonic: asymmetry
    phase = 2 * math.pi * torch.rand(n, 8, 1, generator=g)
    profile = 1 + (amp * torch.cos(ks * tb + phase)).sum(1)  # (n, bins)
    idx = ((theta + math.pi) / (2 * math.pi) * bins).long().clamp(0, bins - 1).view(n, -1)
    shape = profile.gather(1, idx).view(n, s_, s_)
    radius = 0.32 + 0.18 * torch.rand(n, 1, 1, generator=g)
    edge = 0.02 + 0.03 * cue * torch.rand(n, 1, 1, generator=g)
    alpha = torch.sigmoid((radius * shape - rho) / edge).unsqueeze(1)  # (n, 1, S, S) lesion opacity
    # colours: uniform brown, variegated with other lesion colours by smooth fields weighted by the cue
    lesion = _BROWN.view(1, 3, 1, 1) * (0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=g))
    lesion = lesion.expand(n, 3, s_, s_)
    for _ in range(2):
        other = _OTHERS[torch.randint(0, len(_OTHERS), (n,), generator=g)].view(n, 3, 1, 1)
        w = (_smooth_field(n, s_, g) * cue.unsqueeze(1) * 1.3).clamp(max=1.0)
        lesion = lesion * (1 - w) + other * w
    lesion = lesion * (1 - 0.25 * cue * (xx * torch.cos(ang) + yy * torch.sin(ang))).unsqueeze(1)
    skin = _SKIN.view(1, 3, 1, 1) * (0.85 + 0.2 * torch.rand(n, 1, 1, 1, generator=g))
    skin = skin * (1 - 0.08 * (xx**2 + yy**2))
    img = skin * (1 - alpha) + lesion * alpha
    img = img + 0.02 * torch.randn(n, 3, s_, s_, generator=g)
    return img.clamp(0.0, 1.0).contiguous(), labels


def lesion_images(n: int, image_size: int = 64, seed: int = 0, overlap: float = 0.1) -> tuple[Tensor, Tensor]:
    """``images (n, 3, S, S)`` in [0, 1] and ``labels (n,)`` (0 = benign, 1 = malignant; exactly ``n // 2``
    malignant). Cached: the returned tensors are shared, do not modify them in place."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if not isinstance(overlap, int | float) or not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap!r}")
    return _generate(n, image_size, int(seed), float(overlap))


class SyntheticLesionDataModule(SpuriousPatchDataModule):
    """Synthetic benign/malignant lesions with paper 000's patch bias (benign = ``spurious_class`` 0).

    Args:
        n_train, n_val, n_test: generated images per split (``n_test=0``: test reuses validation).
        image_size: side ``S`` of the square RGB images.
        overlap: overlap of the classes' severity ranges (0: perfectly separable cues).
        data_seed: seed of the generated images (default ``seed``); keep it fixed and vary ``seed`` to
            re-run training on the same data.
        **kw: every other :class:`SpuriousPatchDataModule` argument (``spurious_class=0``, ``patch="colorful"``,
            ``patch_size=0.2``, ``patch_position="border"``, ``bias_ratio=1.0``, ``batch_size``, ``seed``,
            ``augment``, ``transforms``, ``dilation``, ``num_workers``, ``normalize``).
    """

    class_names = ("benign", "malignant")

    def __init__(
        self,
        n_train: int = 2000,
        n_val: int = 500,
        n_test: int = 500,
        image_size: int = 64,
        overlap: float = 0.1,
        data_seed: int | None = None,
        *,
        spurious_class: int = 0,
        patch: str = "colorful",
        patch_size: int | float = 0.2,
        patch_position: str = "border",
        bias_ratio: float = 1.0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        transforms: Any = None,
        augment: bool = True,
        dilation: int | None = None,
        normalize: NormalizeSpec = None,
    ) -> None:
        for name, v, lo in (("n_train", n_train, 2), ("n_val", n_val, 2), ("n_test", n_test, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        ds = int(seed if data_seed is None else data_seed)
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.image_size, self.overlap, self.data_seed = image_size, overlap, ds
        train = DictTensorDataset(*lesion_images(n_train, image_size, 3 * ds, overlap))
        val = DictTensorDataset(*lesion_images(n_val, image_size, 3 * ds + 1, overlap))
        test = DictTensorDataset(*lesion_images(n_test, image_size, 3 * ds + 2, overlap)) if n_test > 0 else None
        super().__init__(
            train,
            spurious_class=spurious_class,
            patch=patch,
            patch_size=patch_size,
            patch_position=patch_position,
            bias_ratio=bias_ratio,
            val_dataset=val,
            test_dataset=test,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            transforms=transforms,
            augment=augment,
            dilation=dilation,
            num_classes=2,
            normalize=normalize,
        )
