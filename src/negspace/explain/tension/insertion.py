"""Patch-insertion test (paper 000 §5.3, B.3): does pasting a channel's least activating patch inhibit it?"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.explain.tension._common import Data, check_pos_int, images
from negspace.explain.tension.patches import PatchResult, check_patch_fits, values_chunked
from negspace.hooks import get_layer

__all__ = ["InsertionResult", "insertion_test"]

_METHODS = ("none", "random", "least", "most")


@dataclass
class InsertionResult:
    """Patch-insertion test (paper 000 §5.3, Table 1/3).

    ``table``: one dict per method (``none``, ``random``, ``least``, ``most``) with ``method``, ``mean``, ``std``
    (activation over all channels × images) and ``p_value`` (``ttest_ind`` against ``random``, pooled);
    ``per_channel``: one dict per channel with the four means, ``p_least`` (least vs random) and ``inhibited``;
    ``fraction_inhibited``: share of channels with ``p_least < alpha`` and a lower mean than random;
    ``activations``: ``{method: (C, n)}``.
    """

    table: list[dict]
    per_channel: list[dict]
    fraction_inhibited: float
    activations: dict[str, Tensor] = field(repr=False)


def _paste(images: Tensor, patches: Tensor, corners: Tensor) -> Tensor:
    """Paste ``patches (n, C, ph, pw)`` into ``images (n, C, H, W)`` at corners 0..3 (TL, TR, BL, BR)."""
    out = images.clone()
    h, w = images.shape[-2:]
    ph, pw = patches.shape[-2:]
    for c in range(4):
        sel = corners == c
        if sel.any():
            top = 0 if c in (0, 1) else h - ph
            left = 0 if c in (0, 2) else w - pw
            out[sel, :, top : top + ph, left : left + pw] = patches[sel]
    return out


def insertion_test(
    model: nn.Module,
    layer: str,
    data: Data,
    patches: PatchResult,
    *,
    channels: Sequence[int] | None = None,
    n_images: int = 100,
    alpha: float = 0.01,
    reduce: str = "mean",
    seed: int = 0,
    chunk_size: int = 1024,
    max_images: int | None = None,
    batch_keys: object = None,
    batch_key: str | int | None = None,
    progress: bool = True,
) -> InsertionResult:
    """Insert no / a random / a least-activating / a most-activating patch into a random corner of each channel's
    ``n_images`` most activating images and measure the channel's activation (paper 000 §5.3, B.3).

    The random patch is a crop of the same size at a random place of a random image of ``data`` (tensor
    ``(N, C, H, W)`` or loader with layout ``batch_keys``; ``batch_key``: deprecated); the least (most) activating
    patch is one of the ``k`` found by :func:`activating_patches`, drawn at random. Per channel,
    ``scipy.stats.ttest_ind(least, random)`` decides whether the channel is significantly inhibited
    (``p < alpha`` and a lower mean).
    """
    from scipy.stats import ttest_ind  # scipy is only needed here

    get_layer(model, layer)
    if layer != patches.layer:
        raise ValueError(f"patches were searched on layer {patches.layer!r}, not {layer!r}")
    check_pos_int(n_images, "n_images")
    x_all = images(data, batch_keys, batch_key, who="insertion_test", max_images=max_images)
    check_patch_fits(x_all, patches.patch_size)
    n_ch = patches.least.shape[0]
    chans = list(range(n_ch)) if channels is None else [int(c) for c in channels]
    bad = [c for c in chans if not 0 <= c < n_ch]
    if bad:
        raise ValueError(f"channels {bad} do not exist in layer {layer!r}, which has {n_ch} channels")
    n_img = min(n_images, x_all.shape[0])
    if n_img < n_images:
        warnings.warn(
            f"insertion_test: n_images={n_images} but data has {x_all.shape[0]} images; each channel's 'most "
            f"activating images' are all {n_img} images. Fix: pass more images (max_images=) or a smaller n_images",
            UserWarning, stacklevel=2,
        )
    g = torch.Generator().manual_seed(seed)
    full = values_chunked(model, layer, x_all, reduce, chunk_size)  # (N, C)
    ph, pw = patches.patch_size
    h, w = x_all.shape[-2:]
    k = patches.least.shape[1]
    acts: dict[str, list[Tensor]] = {m: [] for m in _METHODS}
    for c in tqdm(chans, desc="insertion test", disable=not progress):
        top = full[:, c].topk(n_img).indices
        imgs = x_all[top]
        corners = torch.randint(0, 4, (n_img,), generator=g)
        src = torch.randint(0, x_all.shape[0], (n_img,), generator=g)
        ys = torch.randint(0, h - ph + 1, (n_img,), generator=g)
        xs = torch.randint(0, w - pw + 1, (n_img,), generator=g)
        rand = torch.stack([x_all[s, :, y : y + ph, q : q + pw] for s, y, q in zip(src, ys, xs)])
        least = patches.least[c][torch.randint(0, k, (n_img,), generator=g)]
        most = patches.most[c][torch.randint(0, k, (n_img,), generator=g)]
        variants = torch.cat([imgs, _paste(imgs, rand, corners), _paste(imgs, least, corners), _paste(imgs, most, corners)])
        vals = values_chunked(model, layer, variants, reduce, chunk_size)[:, c].view(4, n_img)
        for m, v in zip(_METHODS, vals):
            acts[m].append(v)
    stacked = {m: torch.stack(v) for m, v in acts.items()}  # (C_sel, n)
    with warnings.catch_warnings():  # near-constant samples (e.g. an all-zero channel): p is reported as is
        warnings.filterwarnings("ignore", message="Precision loss", category=RuntimeWarning)
        return _insertion_tables(stacked, chans, alpha, ttest_ind)


def _insertion_tables(stacked: dict[str, Tensor], chans: list[int], alpha: float, ttest_ind: Callable) -> InsertionResult:
    table = []
    for m in _METHODS:
        v = stacked[m].flatten().double()
        p = float("nan") if m == "random" else float(ttest_ind(v.numpy(), stacked["random"].flatten().double().numpy()).pvalue)
        table.append({"method": m, "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0, "p_value": p})
    per_channel = []
    for i, c in enumerate(chans):
        row: dict = {"channel": c}
        for m in _METHODS:
            row[m] = float(stacked[m][i].double().mean())
        p = float(ttest_ind(stacked["least"][i].double().numpy(), stacked["random"][i].double().numpy()).pvalue)
        p = 1.0 if math.isnan(p) else p  # identical constant samples: no evidence
        row["p_least"] = p
        row["inhibited"] = bool(p < alpha and row["least"] < row["random"])
        per_channel.append(row)
    frac = sum(r["inhibited"] for r in per_channel) / len(per_channel)
    return InsertionResult(table=table, per_channel=per_channel, fraction_inhibited=frac, activations=stacked)
