"""The whole tension report of chosen channels in one call (what ``TensionReport`` runs on validation data)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from negspace.explain.tension._common import check_pos_int
from negspace.explain.tension.important import class_important_channels
from negspace.explain.tension.insertion import insertion_test
from negspace.explain.tension.patches import activating_patches
from negspace.explain.tension.selection import MTI_SUBTYPES, mti_subtypes, select_images, select_mti
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
    channels: int | Sequence[int] | str,
    x: Tensor,
    *,
    attribution_layer: str | None = None,
    reduce: str = "mean",
    feature_reduce: str | None = None,
    labels: Tensor | None = None,
    threshold: float = 0.05,
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

    For each channel ``c`` (feature ``f_v = neuron(layer, c, feature_reduce)``; ``None`` = ``reduce``, the
    spatial mean; ``"center"`` is paper 001's central activation): :func:`tension_stats` attributed to
    ``attribution_layer`` (``None``: pixels), the ``n_show`` MEIs / MIIs / MTIs and the MTI subtypes
    (``mti_separated`` / ``mti_colocated``: largest ``‖S_l‖₁`` among images of that subtype, no balance window);
    for all channels of ``layer`` (reduced with ``reduce``, GAP as paper 000): :func:`activating_patches`
    (``patch_size``, ``stride``, ``k``) and :func:`insertion_test` on ``channels`` (``n_images`` images each,
    significance ``alpha``, ``seed``). ``channels="important"``: the class-important channels of paper 000
    B.3 (:func:`class_important_channels` with ``labels``, ``None`` = predicted classes, and ``threshold``).

    Returns ``{"stats": {c: {name: float}}, "tension": {c: TensionResult}, "insertion": InsertionResult,
    "patches": PatchResult, "selections": {c: {"mei" | "mii" | "mti" | "mti_separated" | "mti_colocated":
    [indices]}}}`` plus ``"important": ImportantChannels`` with ``channels="important"``; ``stats[c]`` holds the :meth:`TensionResult.stats`
    numbers, the shares of separated / co-located images, the four insertion means, ``p_least`` and
    ``inhibited`` (0./1.).
    """
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a dotted name, got {layer!r}")
    important = None
    if channels == "important":
        important = class_important_channels(model, layer, x, labels, threshold=threshold)
        chans = important.union()
        if not chans:
            raise ValueError(f"no channel of {layer!r} reaches relative IG >= {threshold} for any class; lower threshold=")
    else:
        chans = check_channels(channels)  # type: ignore[arg-type]
    check_pos_int(n_show, "n_show")
    get_layer(model, layer)
    stats: dict[int, dict[str, float]] = {}
    tens = {}
    selections: dict[int, dict[str, list[int]]] = {}
    for c in chans:
        t = tension_stats(model, attribution_layer, x, neuron(layer, c, feature_reduce or reduce), progress=progress)
        tens[c] = t
        stats[c] = t.stats()
        selections[c] = {
            "mei": select_images(t.f, n_show).tolist(),
            "mii": select_images(t.f, n_show, largest=False).tolist(),
            "mti": select_mti(t, n_show).tolist(),
        }
        if t.phi_plus is not None:
            sub = mti_subtypes(t)
            for name in MTI_SUBTYPES:
                selections[c][f"mti_{name}"] = select_images(t.l1, n_show, mask=sub[name]).tolist()
                stats[c][f"share_{name}"] = float(sub[name].double().mean())
    patches = activating_patches(model, layer, x, patch_size=patch_size, stride=stride, k=k, reduce=reduce,
                                 progress=progress)  # fmt: skip
    ins = insertion_test(model, layer, x, patches, channels=chans, n_images=n_images, alpha=alpha, reduce=reduce,
                         seed=seed, progress=progress)  # fmt: skip
    for row in ins.per_channel:
        c = row["channel"]
        stats[c].update({m: row[m] for m in ("none", "random", "least", "most", "p_least")})
        stats[c]["inhibited"] = float(row["inhibited"])
    out = {"stats": stats, "tension": tens, "insertion": ins, "patches": patches, "selections": selections}
    if important is not None:
        out["important"] = important
    return out
