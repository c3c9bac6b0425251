"""The whole tension report of chosen channels in one call (what ``TensionReport`` runs on validation data)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from negspace.explain.tension._common import check_pos_int
from negspace.explain.tension.insertion import insertion_test
from negspace.explain.tension.patches import activating_patches
from negspace.explain.tension.selection import select_images, select_mti
from negspace.explain.tension.stats import tension_stats
from negspace.hooks import get_layer
from negspace.objectives import neuron

__all__ = ["check_channels", "tension_report"]


def check_channels(channels: int | Sequence[int]) -> list[int]:
    """``channels`` as a non-empty list of non-negative ints (a single int is allowed); ``ValueError`` otherwise."""
    chans = [channels] if isinstance(channels, int) and not isinstance(channels, bool) else channels
    if isinstance(chans, str) or not isinstance(chans, Sequence):
        raise ValueError(f"channels must be a non-empty list of non-negative ints, got {channels!r}")
    chans = list(chans)
    if not chans or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chans):
        raise ValueError(f"channels must be a non-empty list of non-negative ints, got {channels!r}")
    return chans


def tension_report(
    model: nn.Module,
    layer: str,
    channels: int | Sequence[int],
    x: Tensor,
    *,
    attribution_layer: str | None = None,
    reduce: str = "mean",
    patch_size: int | Sequence[int] = 8,
    stride: int | Sequence[int] | None = None,
    k: int = 8,
    n_images: int = 50,
    n_show: int = 4,
    alpha: float = 0.01,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """The inhibitory side of ``channels`` of ``layer`` on images ``x: (N, C, H, W)`` (papers 001, 000).

    For each channel ``c`` (feature ``neuron(layer, c, reduce)``): :func:`tension_stats` attributed to
    ``attribution_layer`` (``None``: pixels), the ``n_show`` MEIs / MIIs / MTIs; for all channels of ``layer``:
    :func:`activating_patches` (``patch_size``, ``stride``, ``k``) and :func:`insertion_test` on ``channels``
    (``n_images`` images each, significance ``alpha``, ``seed``).

    Returns ``{"stats": {c: {name: float}}, "tension": {c: TensionResult}, "insertion": InsertionResult,
    "patches": PatchResult, "selections": {c: {"mei" | "mii" | "mti": [indices]}}}``; ``stats[c]`` holds the
    :meth:`TensionResult.stats` numbers, the four insertion means, ``p_least`` and ``inhibited`` (0./1.).
    """
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a dotted name, got {layer!r}")
    chans = check_channels(channels)
    check_pos_int(n_show, "n_show")
    get_layer(model, layer)
    stats: dict[int, dict[str, float]] = {}
    tens = {}
    selections: dict[int, dict[str, list[int]]] = {}
    for c in chans:
        t = tension_stats(model, attribution_layer, x, neuron(layer, c, reduce), progress=progress)
        tens[c] = t
        stats[c] = t.stats()
        selections[c] = {
            "mei": select_images(t.f, n_show).tolist(),
            "mii": select_images(t.f, n_show, largest=False).tolist(),
            "mti": select_mti(t, n_show).tolist(),
        }
    patches = activating_patches(model, layer, x, patch_size=patch_size, stride=stride, k=k, reduce=reduce,
                                 progress=progress)  # fmt: skip
    ins = insertion_test(model, layer, x, patches, channels=chans, n_images=n_images, alpha=alpha, reduce=reduce,
                         seed=seed, progress=progress)  # fmt: skip
    for row in ins.per_channel:
        c = row["channel"]
        stats[c].update({m: row[m] for m in ("none", "random", "least", "most", "p_least")})
        stats[c]["inhibited"] = float(row["inhibited"])
    return {"stats": stats, "tension": tens, "insertion": ins, "patches": patches, "selections": selections}
