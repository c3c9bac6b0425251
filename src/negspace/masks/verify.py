"""Verification of an artifact (issue 16, step 5): cut it out of example images, paste it into clean images and
measure how the logits move. On a model that uses the artifact, pasting it raises the logit of the class it
"means" (excitation > 0) and lowers the others (inhibition < 0: the encoded absence of paper 000); after
presence+absence debiasing both shrink.

    patch = artifact_patch(artifact_images, concept_mask(artifact_images))      # (C, ph, pw)
    effect = insertion_effect(model, clean_images, patch, target=0)            # {"excitation", "inhibition", ...}
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from negspace.attribution.engine import check_input
from negspace.hooks import eval_mode, model_device

__all__ = ["artifact_patch", "border_positions", "insertion_effect", "load_patch", "paste", "save_patch"]


def _check_images(images: object, name: str = "images") -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a Tensor (N, C, H, W), got {type(images).__name__}")
    check_input(images, name)
    if images.dim() != 4:
        raise ValueError(f"{name} must be (N, C, H, W), got shape {tuple(images.shape)}")
    return images


def artifact_patch(images: Tensor, masks: Tensor) -> Tensor:
    """The artifact cut out of one example: ``images (N, C, H, W)``, ``masks (N, 1, H, W)`` or ``(N, H, W)``
    (``> 0.5`` = artifact) → ``(C, h, w)``.

    Each non-empty mask has a bounding box; ``h``/``w`` are the medians of their heights/widths (lower median).
    The crop is the ``h × w`` box centred on the box of the example whose box size is closest to that median
    box (first such example), kept inside the image.
    """
    x = _check_images(images)
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a Tensor (N, 1, H, W), got {type(masks).__name__}")
    m = masks[:, 0] if masks.dim() == 4 and masks.shape[1] == 1 else masks
    if m.shape != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"masks must be (N, 1, H, W) = ({x.shape[0]}, 1, {x.shape[2]}, {x.shape[3]}) like images, "
                         f"got {tuple(masks.shape)}")
    m = m.detach().cpu().float() > 0.5
    rows, cols = m.any(2), m.any(1)  # (N, H), (N, W)
    has = rows.any(1).nonzero()[:, 0]
    if has.numel() == 0:
        raise ValueError("masks are empty for every image: there is no artifact to cut out")
    h_ar, w_ar = torch.arange(m.shape[1]), torch.arange(m.shape[2])
    top = torch.where(rows[has], h_ar, m.shape[1]).amin(1)
    bottom = torch.where(rows[has], h_ar, -1).amax(1)
    left = torch.where(cols[has], w_ar, m.shape[2]).amin(1)
    right = torch.where(cols[has], w_ar, -1).amax(1)
    hs, ws = bottom - top + 1, right - left + 1
    h, w = int(hs.median()), int(ws.median())
    j = int(((hs - h).abs() + (ws - w).abs()).argmin())
    t = int(((top[j] + bottom[j]).item() + 1 - h) // 2)
    q = int(((left[j] + right[j]).item() + 1 - w) // 2)
    t, q = min(max(t, 0), m.shape[1] - h), min(max(q, 0), m.shape[2] - w)
    return x[int(has[j]), :, t : t + h, q : q + w].detach().clone()


def border_positions(n: int, size: tuple[int, int], patch_size: tuple[int, int], n_positions: int,
                     generator: torch.Generator) -> Tensor:
    """Random top-left corners ``(n, n_positions, 2)`` of a ``patch_size`` patch touching a random edge of a
    ``size`` image (like a sticker): a uniformly drawn edge, a uniform offset along it."""
    (hh, ww), (ph, pw) = size, patch_size
    edge = torch.randint(0, 4, (n, n_positions), generator=generator)
    along_h = torch.randint(0, hh - ph + 1, (n, n_positions), generator=generator)
    along_w = torch.randint(0, ww - pw + 1, (n, n_positions), generator=generator)
    top = torch.where(edge == 0, 0, torch.where(edge == 1, hh - ph, along_h))
    left = torch.where(edge == 2, 0, torch.where(edge == 3, ww - pw, along_w))
    return torch.stack([top, left], -1)


def paste(images: Tensor, patch: Tensor, where: Tensor) -> Tensor:
    """Copies of ``images (n, C, H, W)`` with ``patch (C, ph, pw)`` written at top-left corners ``where (n, 2)``."""
    n, c = images.shape[:2]
    ph, pw = patch.shape[-2:]
    rows = (where[:, 0:1] + torch.arange(ph)).to(images.device)  # (n, ph)
    cols = (where[:, 1:2] + torch.arange(pw)).to(images.device)  # (n, pw)
    out = images.clone()
    i = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    ch = torch.arange(c, device=images.device).view(1, c, 1, 1)
    out[i, ch, rows.view(n, 1, ph, 1), cols.view(n, 1, 1, pw)] = patch.to(images).unsqueeze(0)
    return out


def insertion_effect(model: nn.Module, images: Tensor, patch: Tensor, *, target: int, n_positions: int = 4,
                     seed: int = 0, chunk: int = 256) -> dict:
    """Mean logit changes when ``patch (C, ph, pw)`` is pasted into ``images (N, C, H, W)`` at ``n_positions``
    random border positions each (:func:`border_positions`, seeded).

    Returns ``{"excitation": mean Δlogit of class target, "inhibition": mean over the other classes of their
    mean Δlogit, "abs_excitation", "abs_inhibition": their absolute values, "per_class": [mean Δlogit per class],
    "n_images", "n_positions", "positions": (N, n_positions, 2) LongTensor}``. Eval mode, no grad; the clean and
    the pasted images go through the model ``chunk`` images per forward.
    """
    x = _check_images(images)
    if not isinstance(patch, Tensor):
        raise TypeError(f"patch must be a Tensor (C, ph, pw), got {type(patch).__name__}")
    check_input(patch, "patch")
    if patch.dim() != 3 or patch.shape[0] != x.shape[1]:
        raise ValueError(f"patch must be (C, ph, pw) with C = {x.shape[1]} like images, got {tuple(patch.shape)}")
    if patch.shape[1] > x.shape[2] or patch.shape[2] > x.shape[3]:
        raise ValueError(f"patch {tuple(patch.shape[1:])} is larger than the images {tuple(x.shape[2:])}")
    for name, v in (("n_positions", n_positions), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    where = border_positions(x.shape[0], tuple(x.shape[2:]), tuple(patch.shape[1:]), n_positions,
                             torch.Generator().manual_seed(int(seed)))
    dev = model_device(model)
    with eval_mode(model), torch.no_grad():
        clean = torch.cat([model(xs.to(dev)).float().cpu() for xs in x.split(chunk)])
        if clean.dim() != 2 or clean.shape[1] < 2:
            raise ValueError(f"the model must return logits (B, num_classes >= 2), got {tuple(clean.shape)}")
        k = clean.shape[1]
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < k:
            raise ValueError(f"target must be a class index in [0, {k}), got {target!r}")
        img = torch.arange(x.shape[0]).repeat_interleave(n_positions)
        flat = where.view(-1, 2)
        pasted = torch.cat([
            model(paste(x[img[s : s + chunk]].to(dev), patch, flat[s : s + chunk])).float().cpu()
            for s in range(0, img.numel(), chunk)
        ])  # fmt: skip
    delta = (pasted.view(x.shape[0], n_positions, k) - clean[:, None]).double()
    per_class = delta.mean((0, 1))
    exc = float(per_class[target])
    inh = float(torch.cat([per_class[:target], per_class[target + 1 :]]).mean())
    return {"excitation": exc, "inhibition": inh, "abs_excitation": abs(exc), "abs_inhibition": abs(inh),
            "per_class": per_class.tolist(), "n_images": int(x.shape[0]), "n_positions": n_positions,
            "positions": where}


def save_patch(patch: Tensor, path: str | Path) -> Path:
    """Write ``patch (C, ph, pw)`` as a safetensors file (key ``"patch"``); returns the path."""
    from safetensors.torch import save_file

    if not isinstance(patch, Tensor) or patch.dim() != 3:
        raise ValueError(f"patch must be a Tensor (C, ph, pw), got {getattr(patch, 'shape', type(patch).__name__)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"patch": patch.detach().cpu().contiguous()}, str(path))
    return path


def load_patch(path: str | Path) -> Tensor:
    """A patch ``(C, ph, pw)`` from a ``.safetensors`` file (key ``"patch"``, or its only tensor) or a ``.pt`` file
    (a tensor, or a dict with ``"patch"``; read with ``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"patch file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(p))
    elif p.suffix in (".pt", ".pth"):
        obj = torch.load(p, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"patch file must end in .safetensors, .pt or .pth, got {str(p)!r}")
    if isinstance(obj, dict):
        obj = obj.get("patch", next(iter(obj.values())) if len(obj) == 1 else None)
    if not isinstance(obj, Tensor) or obj.dim() != 3:
        raise ValueError(f"{str(p)!r} must hold a tensor (C, ph, pw) (key 'patch'), got "
                         f"{getattr(obj, 'shape', type(obj).__name__)}")
    return obj.float()
