"""Concept directions in a hidden layer (CAVs), their localisation maps, and the threshold that turns a map
into a mask — the pieces :class:`negspace.masks.ConceptMask` is made of. Pure torch (+ scikit-learn for the
logistic direction).

Layouts: conv layers ``(B, C, h, w)`` are used as they are; token layers ``(B, T, D)`` (ViT) are reshaped to a
grid ``(B, D, s, s)`` when ``T = s²`` (no class token) or ``T = 1 + s²`` (the first token, the class token,
is dropped); any other token count raises ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from negspace.attribution import layer_contributions
from negspace.hooks import capture, eval_mode, get_layer, run_until
from negspace.masks.source import default_dilation
from negspace.objectives import TARGET_NAMES, as_target, named_target

__all__ = [
    "DIRECTION_METHODS",
    "LOCALIZE",
    "THRESHOLD_RULES",
    "as_grid",
    "channel_direction",
    "check_target",
    "choose_threshold",
    "codec_direction",
    "default_dilate",
    "fit_direction",
    "layer_channels",
    "layer_features",
    "localization_map",
    "otsu_threshold",
    "project",
]

DIRECTION_METHODS = ("logistic", "mean_diff")
LOCALIZE = ("projection", "contribution")
THRESHOLD_RULES = ("otsu", "midpoint", "half_peak", "clean_max")


def as_grid(act: Tensor, layer: str = "layer") -> Tensor:
    """A layer output as a spatial grid ``(B, C, h, w)``: conv maps as they are; tokens ``(B, T, D)`` with
    ``T = s²`` or ``1 + s²`` (class token dropped) → ``(B, D, s, s)``."""
    if act.dim() == 4:
        return act
    if act.dim() == 3:
        t = act.shape[1]
        for drop in (0, 1):
            s = math.isqrt(t - drop)
            if s > 0 and s * s == t - drop:
                return act[:, drop:].transpose(1, 2).reshape(act.shape[0], act.shape[2], s, s)
        raise ValueError(f"layer {layer!r} outputs {t} tokens (B, T, D) = {tuple(act.shape)}; a concept mask needs "
                         "a square grid of tokens (T = s² or 1 + s² with a class token)")
    raise ValueError(f"layer {layer!r} outputs shape {tuple(act.shape)}; a concept mask needs a spatial layer "
                     "(B, C, h, w) or tokens (B, T, D)")


def check_target(target: object) -> object:
    """A ``localize="contribution"`` target: a target name (not ``"label"``) or an int class index."""
    if isinstance(target, bool) or not isinstance(target, str | int):
        raise TypeError(f"target must be a target name {TARGET_NAMES[:-1]} or an int class index, got {target!r}")
    if isinstance(target, str) and (target == "label" or target not in TARGET_NAMES):
        raise ValueError(f"target must be one of {TARGET_NAMES[:-1]} or an int class index, got {target!r}")
    return target


def _check_direction(direction: object, channels: int | None = None, who: str = "direction") -> Tensor:
    if not isinstance(direction, Tensor):
        raise TypeError(f"{who} must be a Tensor (C,), got {type(direction).__name__}")
    if direction.dim() != 1 or direction.numel() == 0:
        raise ValueError(f"{who} must be a non-empty vector (C,), got shape {tuple(direction.shape)}")
    if not torch.isfinite(direction).all():
        raise ValueError(f"{who} contains NaN or inf")
    if channels is not None and direction.numel() != channels:
        raise ValueError(f"{who} has {direction.numel()} entries but the layer has {channels} channels")
    return direction


def layer_channels(model: nn.Module, layer: str) -> int:
    """Channels of ``layer`` without a forward pass, from module attributes (``out_channels``, ``out_features``,
    ``num_features``): the layer's own, else its last submodule's, else the last module registered before it
    (an activation after its conv)."""
    mods = dict(model.named_modules())
    names = list(mods)
    get_layer(model, layer)
    i = names.index(layer)
    inside = [n for n in names[i + 1 :] if n.startswith(layer + ".")]
    for n in [layer, *reversed(inside), *reversed(names[:i])]:
        for attr in ("out_channels", "out_features", "num_features"):
            v = getattr(mods[n], attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    raise ValueError(f"cannot tell how many channels layer {layer!r} has; pass examples=(artifact, clean)")


def layer_features(model: nn.Module, layer: str, images: Tensor, *, batch_size: int = 64) -> Tensor:
    """Detached grid activations ``(N, C, h, w)`` of ``layer`` for ``images (N, C, H, W)``.

    Eval mode (restored after), no grad, and every forward stops at ``layer`` (``hooks.run_until``).
    """
    get_layer(model, layer)
    parts = []
    with torch.no_grad(), eval_mode(model), capture(model, layer, detach=True, stop_after=True) as cap:
        for chunk in images.split(batch_size):
            cap.activations.pop(layer, None)
            run_until(model, chunk)
            if layer not in cap.activations:
                raise ValueError(f"layer {layer!r} did not run in the forward pass of {type(model).__name__}")
            parts.append(as_grid(cap.activations[layer], layer))
    return torch.cat(parts)


def project(features: Tensor, direction: Tensor) -> Tensor:
    """Projection map ``<a_{:, i, j}, d>``: ``features (B, C, h, w)``, ``direction (C,)`` → ``(B, 1, h, w)``."""
    d = _check_direction(direction, features.shape[1]).to(features)
    return torch.einsum("bchw,c->bhw", features, d).unsqueeze(1)


def localization_map(model: nn.Module, layer: str, images: Tensor, direction: Tensor, *,
                     localize: str = "projection", target: object = "top_logit") -> Tensor:
    """Where the concept ``direction (C,)`` of ``layer`` is in ``images (B, C, H, W)``: ``(B, 1, h, w)`` at the
    layer's resolution. Runs in eval mode (restored after).

    * ``"projection"``: ``<a(x)_{:, i, j}, d>`` at every position (no grad; the forward stops at the layer);
    * ``"contribution"``: ``Σ_c d_c · a_c · ∂T/∂a_c`` at every position — the activation×gradient contributions
      (``attribution.layer_contributions``, ``act_grad``) of the layer to ``target`` (a target name or a class
      index), weighted by the direction: where the concept *drives the output*, not only where it is present.
      The default target is ``"top_logit"``: the softmax of a confident (biased) model saturates, and with
      ``"top_prob"`` the gradients, hence the maps, vanish (IoU 0.01 vs 0.69 on the lesions, ``benchmarks/masks.py``).
    """
    if localize not in LOCALIZE:
        raise ValueError(f"localize must be one of {LOCALIZE}, got {localize!r}")
    if localize == "projection":
        return project(layer_features(model, layer, images, batch_size=max(1, images.shape[0])), direction)
    target = check_target(target)
    objective = as_target(named_target(target) if isinstance(target, str) else target)
    with eval_mode(model):
        contrib = layer_contributions(model, layer, images, objective, method="act_grad")
    return project(as_grid(contrib.detach(), layer), direction)


def default_dilate(image_size: int, map_size: int) -> int:
    """Default dilation (pixels) of a concept mask: paper 000's mask dilation (``round(10·H/224)``,
    ``masks.source.default_dilation``) minus half the layer's stride ``(H // h) // 2``, at least 0.

    The bilinearly upsampled map already reaches about half a stride beyond the concept, so only the rest of
    the paper's margin is added (measured on the lesions, see ``negspace.masks.concept``)."""
    return max(0, default_dilation(image_size) - max(1, image_size // max(1, map_size)) // 2)


def fit_direction(pos: Tensor, neg: Tensor, method: str = "logistic", *, C: float = 1.0, seed: int = 0) -> Tensor:
    """Unit concept direction ``(C,)`` separating pooled features ``pos (N1, C)`` (concept present) from
    ``neg (N2, C)`` (absent); positive projections mean "present".

    * ``"logistic"``: scikit-learn's L2 logistic regression (inverse strength ``C``) on standardised features;
      the coefficient is mapped back to the raw feature space (divided by each feature's std; constant
      features get 0), then normalised;
    * ``"mean_diff"``: ``mean(pos) − mean(neg)``, normalised (the "pattern" CAV).
    """
    if method not in DIRECTION_METHODS:
        raise ValueError(f"method must be one of {DIRECTION_METHODS}, got {method!r}")
    for name, x in (("pos", pos), ("neg", neg)):
        if not isinstance(x, Tensor):
            raise TypeError(f"fit_direction: {name} must be a Tensor (N, C), got {type(x).__name__}")
        if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"fit_direction: {name} must be a non-empty (N, C) matrix (both classes needed), "
                             f"got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"fit_direction: {name} contains NaN or inf")
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"fit_direction: pos and neg must have the same number of channels, got {pos.shape[1]} "
                         f"and {neg.shape[1]}")
    p, n = pos.detach().double().cpu(), neg.detach().double().cpu()
    if method == "mean_diff":
        d = p.mean(0) - n.mean(0)
    else:
        if isinstance(C, bool) or not isinstance(C, int | float) or not C > 0:
            raise ValueError(f"fit_direction: C must be a positive number, got {C!r}")
        from sklearn.linear_model import LogisticRegression

        x = torch.cat([p, n])
        y = torch.cat([torch.ones(len(p)), torch.zeros(len(n))]).numpy()
        mu, sd = x.mean(0), x.std(0, unbiased=False)
        keep = sd > 1e-12
        z = ((x - mu) / torch.where(keep, sd, torch.ones_like(sd))).numpy()
        clf = LogisticRegression(C=float(C), max_iter=2000, random_state=seed).fit(z, y)
        w = torch.as_tensor(clf.coef_[0], dtype=torch.float64)
        d = torch.where(keep, w / torch.where(keep, sd, torch.ones_like(sd)), torch.zeros_like(w))
    norm = d.norm()
    if not norm > 1e-12:
        raise ValueError("fit_direction: pos and neg are not separable along any direction (zero direction); "
                         "the examples look the same at this layer")
    return (d / norm).float()


def channel_direction(num_channels: int, channels: Sequence[int] | Tensor,
                      weights: Sequence[float] | None = None) -> Tensor:
    """Unit direction ``(num_channels,)`` with ``weights`` (default 1) on ``channels`` and 0 elsewhere."""
    ch = channels.tolist() if isinstance(channels, Tensor) else list(channels) if isinstance(channels, Sequence) else None
    if not ch or any(isinstance(c, bool) or not isinstance(c, int) for c in ch) or len(set(ch)) != len(ch):
        raise ValueError(f"channels must be a non-empty sequence of distinct ints, got {channels!r}")
    if min(ch) < 0 or max(ch) >= num_channels:
        raise ValueError(f"channels must lie in [0, {num_channels}), got {ch}")
    w = torch.ones(len(ch)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    if w.shape != (len(ch),) or not torch.isfinite(w).all() or not (w != 0).any():
        raise ValueError(f"weights must be {len(ch)} finite numbers, not all zero, got {weights!r}")
    d = torch.zeros(num_channels)
    d[torch.tensor(ch)] = w
    return d / d.norm()


def codec_direction(modes: Any, mode: int) -> Tensor:
    """Unit direction of CODEC ``mode``: the atom of ``modes`` (a ``LayerModes``), ``[E, I]`` atoms as ``E − I``."""
    atom = modes.atom(mode).float()
    c = modes.num_channels
    if atom.numel() == 2 * c:
        atom = atom[:c] - atom[c:]
    if not atom.norm() > 0:
        raise ValueError(f"CODEC mode {mode} has an all-zero atom; pick another mode")
    return atom / atom.norm()


def otsu_threshold(values: Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape): the histogram split (``bins`` bins) with the largest
    between-class variance; the minimum when all values are equal."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist = torch.histc(values, bins=bins, min=lo, max=hi).double()
    centers = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[1:]  # upper edge of each bin
    w0 = hist.cumsum(0)
    m0 = (hist * centers).cumsum(0)
    total, mtotal = w0[-1], m0[-1]
    w1 = total - w0
    between = w0 * w1 * (m0 / w0.clamp_min(1e-12) - (mtotal - m0) / w1.clamp_min(1e-12)) ** 2
    return float(centers[int(between[:-1].argmax())])


def choose_threshold(art_maps: Tensor, clean_maps: Tensor, *, rule: str = "otsu") -> float:
    """Threshold of localisation maps chosen on examples only (no true masks). ``art_maps (N1, 1, H, W)`` are
    maps of images that carry the concept, ``clean_maps (N2, 1, H, W)`` of images that do not (any resolution).

    With ``a`` = the median over artifact images of their map maximum, ``c`` = the same over clean images:

    * ``"otsu"`` (default): ``max(otsu, q95)`` — Otsu's threshold on the pixels of the artifact maps (the
      artifact/background split that is best within them), but never below ``q95``, the 95th percentile of the
      clean images' maxima (so that at most ≈ 5 % of clean images get any mask);
    * ``"midpoint"``: ``(a + c) / 2`` — halfway between a typical concept peak and a typical clean peak;
    * ``"half_peak"``: ``b + (a − b) / 2`` with ``b`` the median clean *pixel* (the background level): the
      half-maximum contour of a typical concept peak;
    * ``"clean_max"``: ``q95`` alone (the lowest threshold that keeps ≈ 95 % of clean images mask-free).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    for name, m in (("art_maps", art_maps), ("clean_maps", clean_maps)):
        if not isinstance(m, Tensor):
            raise TypeError(f"choose_threshold: {name} must be a Tensor (N, 1, H, W), got {type(m).__name__}")
        if m.dim() != 4 or m.shape[0] == 0 or m.shape[1] != 1 or m[0].numel() == 0:
            raise ValueError(f"choose_threshold: {name} must be non-empty maps (N, 1, H, W), got {tuple(m.shape)}")
        if not torch.isfinite(m).all():
            raise ValueError(f"choose_threshold: {name} contains NaN or inf")
    art, clean = art_maps.detach().float().cpu(), clean_maps.detach().float().cpu()
    a = float(art.flatten(1).max(1).values.median())
    c = float(clean.flatten(1).max(1).values.median())
    q95 = float(torch.quantile(clean.flatten(1).max(1).values, 0.95))
    if rule == "otsu":
        return max(otsu_threshold(art.flatten()), q95)
    if rule == "midpoint":
        return (a + c) / 2
    if rule == "half_peak":
        b = float(clean.flatten().median())
        return b + (a - b) / 2
    return q95
