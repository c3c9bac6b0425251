"""Layer-to-feature attribution and its statistics (paper 001).

For a feature ``f_v`` (a channel via :func:`negspace.objectives.neuron` or a direction via
:func:`negspace.objectives.direction`) and an earlier layer ``l`` with activation ``h_l``:

* layer-to-feature attribution (eq. 1): ``S_l(x) = ∇_{h_l} f_v(x) ⊙ h_l`` (``method="act_grad"``; any
  hidden-contribution method of :func:`negspace.attribution.layer_contributions` works), ``E_l = Σ S_l``;
* ``E_l^± = Σ ReLU(±S_l)`` (eq. 2) and the maps ``φ^± = Σ_c ReLU(±S_{l,c})`` (eq. 3), so that
  ``Σφ⁺ − Σφ⁻ = E_l``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.attribution import input_x_gradient, layer_contributions
from negspace.attribution.engine import check_input, forward_objective
from negspace.explain.tension._common import Data, check_pos_int, chunks, images
from negspace.hooks import capture, get_layer, run_until
from negspace.objectives import Objective, direction, neuron
from negspace.reduce import channel_dim, ei_split
from negspace.stats import pearson

__all__ = [
    "Feature",
    "TensionResult",
    "as_feature",
    "completeness_correlation",
    "e_split",
    "layer_to_feature_attribution",
    "phi_maps",
    "phi_normalize",
    "tension_stats",
]

#: values of ``across=`` in :func:`phi_normalize`
PHI_NORMS = ("images", "image")

#: a feature: ``objectives.neuron(layer, c)``, ``objectives.direction(layer, v)`` or ``(layer, channel)``
Feature = Objective | tuple[str, int]


def as_feature(model: nn.Module, feature: Feature) -> Objective:
    """Validate a feature: ``objectives.neuron``/``direction`` (or ``(layer, channel)``) on a layer of ``model``.

    Raises ``ValueError`` for unknown layers (listing close names); the channel range is checked once the
    layer's width is known (by the functions that take images).
    """
    if isinstance(feature, tuple) and len(feature) == 2 and isinstance(feature[0], str):
        if not isinstance(feature[1], int) or isinstance(feature[1], bool):
            raise TypeError(f"feature=(layer, channel) needs an int channel, got {feature[1]!r}")
        feature = neuron(feature[0], feature[1])
    if not isinstance(feature, Objective):
        raise TypeError(
            "feature must be objectives.neuron(layer, index), objectives.direction(layer, vector), another "
            f"negspace objective, or a (layer, channel) tuple; got {type(feature).__name__}"
        )
    if feature.layer is not None:
        get_layer(model, feature.layer)
    return feature


def _check_feature_width(feature: Objective, act: Tensor) -> None:
    c = act.shape[channel_dim(act)]
    if isinstance(feature, neuron):
        idx = torch.as_tensor(feature.index).flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= c):
            raise ValueError(
                f"feature: channel {feature.index!r} does not exist in layer {feature.layer!r}, which has {c} "
                f"channels (valid: 0..{c - 1})"
            )
    if isinstance(feature, direction) and feature.vector.numel() != c:
        raise ValueError(
            f"feature: direction has {feature.vector.numel()} entries but layer {feature.layer!r} has {c} channels"
        )


def _validated_feature(model: nn.Module, feature: Feature, x: Tensor) -> Objective:
    """:func:`as_feature` plus a channel-range check on one sample of ``x: (B, ...)``."""
    feat = as_feature(model, feature)
    check_input(x)
    if feat.layer is not None:
        with torch.no_grad(), capture(model, feat.layer, stop_after=True) as cap:
            run_until(model, x[:1])
        if feat.layer not in cap.activations:
            raise ValueError(f"feature layer {feat.layer!r} did not run in the forward pass")
        _check_feature_width(feat, cap.activations[feat.layer])
    return feat


def _attribute(model: nn.Module, layer: str | None, x: Tensor, feat: Objective, method: str, n_steps: int) -> Tensor:
    if layer is None:
        return input_x_gradient(model, x, feat)
    return layer_contributions(model, layer, x, feat, method=method, n_steps=n_steps)


def layer_to_feature_attribution(
    model: nn.Module,
    layer: str | None,
    x: Tensor,
    feature: Feature,
    *,
    method: str = "act_grad",
    n_steps: int = 10,
) -> Tensor:
    """``S_l(x, f_v) = ∇_{h_l} f_v(x) ⊙ h_l`` (paper 001, eq. 1), via :func:`negspace.attribution.layer_contributions`.

    Args:
        layer: the attribution layer ``l`` (must run before the feature's layer); ``None`` → pixels
            (input × gradient).
        x: ``(B, ...)``. feature: ``objectives.neuron(layer, c)``, ``objectives.direction(layer, v)`` or ``(layer, c)``.
        method: ``"act_grad"`` (eq. 1) or another hidden-contribution method.

    Returns:
        ``(B, C, H, W)`` shaped like ``h_l`` (or like ``x`` for ``layer=None``).
    """
    feat = _validated_feature(model, feature, x)
    if layer is not None:
        get_layer(model, layer)
    return _attribute(model, layer, x, feat, method, n_steps)


def e_split(s: Tensor) -> tuple[Tensor, Tensor]:
    """``(E⁺, E⁻)`` of eq. 2: sums of ``ReLU(±S)`` over every non-batch dim. ``s: (B, ...)`` → two ``(B,)``."""
    ep, em = ei_split(s.flatten(1))
    return ep.sum(1), em.sum(1)


def phi_maps(s: Tensor) -> tuple[Tensor, Tensor]:
    """``(φ⁺, φ⁻)`` of eq. 3: ``Σ_c ReLU(±S_c)``. ``(B, C, H, W)`` → two ``(B, H, W)``; tokens ``(B, T, D)`` → ``(B, T)``."""
    if s.dim() not in (3, 4):
        raise ValueError(f"phi_maps needs S of shape (B, C, H, W) or (B, T, D), got {tuple(s.shape)}")
    d = channel_dim(s)
    ep, em = ei_split(s)
    return ep.sum(d), em.sum(d)


def phi_normalize(phi_plus: Tensor, phi_minus: Tensor, *, across: str = "images") -> tuple[Tensor, Tensor]:
    """φ± maps ``(N, H, W)`` scaled to ``[0, 1]`` for display.

    ``across="images"`` (paper 001 §3: "normalized *across* images"): one scale, the largest value of φ⁺ and
    φ⁻ over all ``N`` maps, so an image that neither excites nor inhibits the feature shows (near) nothing;
    ``"image"``: each image by its own maximum (negspace ≤ 0.2; every map lights up, even a flat one).
    """
    if across not in PHI_NORMS:
        raise ValueError(f"across must be one of {PHI_NORMS}, got {across!r}")
    p, m = phi_plus.detach().float(), phi_minus.detach().float()
    if p.shape != m.shape or p.dim() < 2:
        raise ValueError(f"phi_plus and phi_minus must be (N, ...) of equal shape, got {tuple(p.shape)}, {tuple(m.shape)}")
    if across == "images":
        scale = torch.maximum(p.max(), m.max()).clamp_min(1e-30)
    else:
        scale = torch.maximum(p.flatten(1).amax(1), m.flatten(1).amax(1)).clamp_min(1e-30)
        scale = scale.view(-1, *([1] * (p.dim() - 1)))
    return (p / scale).clamp(0, 1), (m / scale).clamp(0, 1)


@dataclass
class TensionResult:
    """Per-image statistics of a feature over a dataset (all ``(N,)`` unless noted).

    ``f``: feature value ``f_v(x)``; ``e``: ``E_l = Σ S_l``; ``e_plus``/``e_minus``: eq. 2; ``l1``/``l2``: ``‖S_l‖``;
    ``phi_plus``/``phi_minus``: eq. 3 maps ``(N, H, W)`` (``None`` for flat layers); ``s``: ``S_l`` itself when
    ``keep_attributions=True``.
    """

    f: Tensor
    e: Tensor
    e_plus: Tensor
    e_minus: Tensor
    l1: Tensor
    l2: Tensor
    phi_plus: Tensor | None = None
    phi_minus: Tensor | None = None
    s: Tensor | None = None

    def stats(self) -> dict[str, float]:
        """Summary numbers (floats) for logging; ``completeness_corr`` is NaN when ``f`` or ``E`` is constant."""
        return {
            "e_plus_mean": float(self.e_plus.mean()),
            "e_minus_mean": float(self.e_minus.mean()),
            "e_mean": float(self.e.mean()),
            "f_mean": float(self.f.mean()),
            "f_std": float(self.f.std()) if self.f.numel() > 1 else 0.0,
            "completeness_corr": pearson(self.f, self.e),
            "tension_mean": float(torch.minimum(self.e_plus, self.e_minus).mean()),
        }


def tension_stats(
    model: nn.Module,
    layer: str | None,
    data: Data,
    feature: Feature,
    *,
    method: str = "act_grad",
    n_steps: int = 10,
    batch_size: int = 64,
    keep_attributions: bool = False,
    batch_keys: object = None,
    batch_key: str | int | None = None,
    progress: bool = False,
) -> TensionResult:
    """Feature values, ``E_l``, ``E_l^±``, norms and φ± maps of ``feature`` over ``data`` (tensor ``(N, ...)``
    or loader; ``batch_keys``: the batch layout, see :mod:`negspace.batch`; ``batch_key``: deprecated)."""
    check_pos_int(batch_size, "batch_size")
    x_all = images(data, batch_keys, batch_key, who="tension_stats")
    feat = _validated_feature(model, feature, x_all)
    if layer is not None:
        get_layer(model, layer)
    cols: dict[str, list[Tensor]] = {k: [] for k in ("f", "e", "ep", "em", "l1", "l2", "pp", "pm", "s")}
    for sl in tqdm(list(chunks(x_all.shape[0], batch_size)), desc="tension", disable=not progress):
        x = x_all[sl]
        s = _attribute(model, layer, x, feat, method, n_steps)
        with torch.no_grad():
            f = forward_objective(model, x, feat)
        ep, em = e_split(s)
        cols["f"].append(f.detach())
        cols["e"].append(s.flatten(1).sum(1))
        cols["ep"].append(ep)
        cols["em"].append(em)
        cols["l1"].append(s.flatten(1).abs().sum(1))
        cols["l2"].append(s.flatten(1).norm(dim=1))
        if s.dim() in (3, 4):
            pp, pm = phi_maps(s)
            cols["pp"].append(pp)
            cols["pm"].append(pm)
        if keep_attributions:
            cols["s"].append(s)
    cat = {k: (torch.cat(v) if v else None) for k, v in cols.items()}
    return TensionResult(
        f=cat["f"], e=cat["e"], e_plus=cat["ep"], e_minus=cat["em"], l1=cat["l1"], l2=cat["l2"],
        phi_plus=cat["pp"], phi_minus=cat["pm"], s=cat["s"],
    )  # fmt: skip


def completeness_correlation(
    model: nn.Module,
    layers: Sequence[str],
    data: Data,
    feature: Feature,
    *,
    method: str = "act_grad",
    batch_size: int = 64,
    batch_keys: object = None,
    batch_key: str | int | None = None,
) -> dict[str, float]:
    """Pearson correlation between ``f_v(x)`` and ``E_l(x) = Σ S_l`` across ``data``, per layer (paper 001, Fig. 3).

    All layers are attributed in the same passes; the key ``"pixels"`` holds input × gradient when
    ``"pixels"`` is listed. A constant ``f_v`` or ``E_l`` gives NaN.
    """
    if isinstance(layers, str) or not layers:
        raise TypeError(f"layers must be a non-empty list of dotted names, got {layers!r}")
    hidden = [n for n in layers if n != "pixels"]
    x_all = images(data, batch_keys, batch_key, who="completeness_correlation")
    feat = _validated_feature(model, feature, x_all)
    fs: list[Tensor] = []
    es: dict[str, list[Tensor]] = {n: [] for n in layers}
    for sl in chunks(x_all.shape[0], check_pos_int(batch_size, "batch_size")):
        x = x_all[sl]
        with torch.no_grad():
            fs.append(forward_objective(model, x, feat))
        if hidden:
            contrib = layer_contributions(model, hidden, x, feat, method=method)
            for n in hidden:
                es[n].append(contrib[n].flatten(1).sum(1))
        if "pixels" in layers:
            es["pixels"].append(input_x_gradient(model, x, feat).flatten(1).sum(1))
    f = torch.cat(fs)
    return {n: pearson(f, torch.cat(v)) for n, v in es.items()}
