"""Most / least activating patches per channel (paper 000, B.3).

Every sliding window of every image is fed to the network on its own; all channels of the layer are ranked
at once with a running per-channel top-/bottom-``k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.explain.tension._common import Data, check_pos_int, chunks, images
from negspace.hooks import capture, get_layer, run_until
from negspace.reduce import summarize

__all__ = ["PatchResult", "activating_patches", "channel_values", "gather_windows", "unfold_windows"]


def pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    """``v`` or ``(v, v)`` as a pair of positive ints; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not (isinstance(v, Sequence) and len(v) == 2 and all(isinstance(i, int) and i >= 1 for i in v)):
        raise ValueError(f"{name} must be a positive int or a pair (h, w) of positive ints, got {v!r}")
    return int(v[0]), int(v[1])


def channel_values(model: nn.Module, layer: str, x: Tensor, *, reduce: str = "mean") -> Tensor:
    """Every channel of ``layer`` reduced over space (``"mean"`` = GAP), no grad. ``x: (B, ...)`` → ``(B, C)``."""
    with torch.no_grad(), capture(model, layer, stop_after=True, detach=True) as cap:
        run_until(model, x)
    return summarize(cap.activations[layer], reduce)


def values_chunked(model: nn.Module, layer: str, x: Tensor, reduce: str, chunk: int) -> Tensor:
    """:func:`channel_values` of ``x: (N, ...)`` computed ``chunk`` images at a time → ``(N, C)``."""
    return torch.cat([channel_values(model, layer, x[sl], reduce=reduce) for sl in chunks(x.shape[0], chunk)])


def unfold_windows(x: Tensor, patch: tuple[int, int], stride: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Sliding windows of ``x: (B, C, H, W)`` as a strided view ``(B, C, nH, nW, ph, pw)`` (no copy) and their
    ``(image, top, left)`` coordinates ``(B·nH·nW, 3)``; :func:`gather_windows` copies out a batch of them."""
    win = x.unfold(2, patch[0], stride[0]).unfold(3, patch[1], stride[1])
    b, _, nh, nw = win.shape[:4]
    bi, ii, jj = torch.meshgrid(torch.arange(b), torch.arange(nh) * stride[0], torch.arange(nw) * stride[1], indexing="ij")
    return win, torch.stack([bi.flatten(), ii.flatten(), jj.flatten()], 1)


def gather_windows(win: Tensor, ids: Tensor) -> Tensor:
    """Windows number ``ids`` (any shape, row-major over ``(B, nH, nW)``) of an :func:`unfold_windows` view →
    ``(*ids.shape, C, ph, pw)``; only these windows are copied."""
    _, _, nh, nw = win.shape[:4]
    flat = ids.flatten()
    out = win[flat // (nh * nw), :, (flat // nw) % nh, flat % nw]  # (n, C, ph, pw)
    return out.reshape(*ids.shape, *out.shape[1:])


@dataclass
class PatchResult:
    """Most/least activating patches per channel of ``layer``.

    ``most_values``/``least_values``: ``(C, k)``; ``most_where``/``least_where``: ``(C, k, 3)`` rows
    ``(image, top, left)``; ``most``/``least``: the crops ``(C, k, C_in, ph, pw)``; ``patch_size``, ``stride``.
    """

    layer: str
    patch_size: tuple[int, int]
    stride: tuple[int, int]
    most_values: Tensor
    most_where: Tensor
    least_values: Tensor
    least_where: Tensor
    most: Tensor = field(repr=False)
    least: Tensor = field(repr=False)


def check_patch_fits(x: Tensor, patch: tuple[int, int]) -> None:
    """``ValueError`` unless ``x`` is ``(N, C, H, W)`` with ``patch <= (H, W)``."""
    if x.dim() != 4:
        raise ValueError(f"patch search needs images (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if patch[0] > h or patch[1] > w:
        raise ValueError(f"patch_size {patch} is larger than the images ({h}, {w}); use patch_size <= image size")


def activating_patches(
    model: nn.Module,
    layer: str,
    data: Data,
    *,
    patch_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    k: int = 8,
    reduce: str = "mean",
    chunk_size: int = 1024,
    max_images: int | None = None,
    batch_keys: object = None,
    batch_key: str | int | None = None,
    progress: bool = True,
) -> PatchResult:
    """Most and least activating ``patch_size`` windows for every channel of ``layer`` at once (paper 000, B.3).

    Windows (stride ``stride``, default ``patch_size // 2``) are cut from every image by ``unfold``, stacked into a
    batch and fed to the network on their own — one batched forward per ``chunk_size`` windows, stopped at
    ``layer``; each channel is reduced over space (``reduce``, default GAP) and a running top-/bottom-``k`` per
    channel is kept. ``data``: ``(N, C, H, W)`` tensor or loader (layout ``batch_keys``; ``batch_key``: deprecated).
    """
    get_layer(model, layer)
    patch = pair(patch_size, "patch_size")
    st = pair(stride if stride is not None else (max(1, patch[0] // 2), max(1, patch[1] // 2)), "stride")
    check_pos_int(k, "k")
    check_pos_int(chunk_size, "chunk_size")
    x_all = images(data, batch_keys, batch_key, who="activating_patches", max_images=max_images)
    check_patch_fits(x_all, patch)
    windows, where = unfold_windows(x_all, patch, st)  # a view: windows are copied chunk by chunk
    n = where.shape[0]
    if k > n:
        raise ValueError(f"k={k} exceeds the number of windows ({n}); lower k or the stride")
    top_v = bot_v = top_i = bot_i = None
    for sl in tqdm(list(chunks(n, chunk_size)), desc="patch search", disable=not progress):
        ids = torch.arange(sl.start, sl.stop)
        vals = channel_values(model, layer, gather_windows(windows, ids), reduce=reduce).T  # (C, n_chunk)
        ids = ids.expand_as(vals)
        if top_v is None:
            top_v, top_i, bot_v, bot_i = vals[:, :0], ids[:, :0], vals[:, :0], ids[:, :0]
        cv, ci = torch.cat([top_v, vals], 1), torch.cat([top_i, ids], 1)
        t = cv.topk(min(k, cv.shape[1]), dim=1)
        top_v, top_i = t.values, ci.gather(1, t.indices)
        cv, ci = torch.cat([bot_v, vals], 1), torch.cat([bot_i, ids], 1)
        b = cv.topk(min(k, cv.shape[1]), dim=1, largest=False)
        bot_v, bot_i = b.values, ci.gather(1, b.indices)
    return PatchResult(
        layer=layer, patch_size=patch, stride=st,
        most_values=top_v, most_where=where[top_i], least_values=bot_v, least_where=where[bot_i],
        most=gather_windows(windows, top_i), least=gather_windows(windows, bot_i),
    )  # fmt: skip
