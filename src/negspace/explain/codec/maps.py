"""Contribution maps (paper 002 §6, supplementary 10.7–10.8): the InputGrad decomposition of a target through a
chosen set of channels, and the figure of images, maps and masked images.

Paper defaults (10.8), all on by default here: the gradient of the *softmax* output of the class; each hidden
unit's (channel × position) map ``x ⊙ ∂T/∂a_u · ∂a_u/∂x`` split into its positive and negative parts *before*
the sum over units (``split="unit"``; ``split="sum"`` takes the part after the sum, cheaper but it lets units
cancel: 27 % L1 difference for 3 channels, 70 % for all 32, on the digits example of docs/codec.md); a median
filter of size 4 in the figure.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from negspace.attribution import input_x_gradient
from negspace.hooks import capture, get_layer, intervene
from negspace.objectives import Objective, named_target

__all__ = ["MAP_PARTS", "MAP_SPLITS", "contribution_map", "save_contribution_maps"]

#: what :func:`contribution_map` returns, and where it splits the signs
MAP_PARTS = ("positive", "negative", "net")
MAP_SPLITS = ("unit", "sum")


def _objective(model: nn.Module, x: Tensor, target: object, softmax: bool) -> Callable[[Tensor], Tensor] | Tensor:
    """The scalar-per-sample target, frozen at ``x``: class indices become the softmax probability (or logit)."""
    if isinstance(target, str):
        target = named_target(target)
        if target == "label":
            raise ValueError("contribution_map: pass the labels tensor as target instead of 'label'")
    if isinstance(target, Objective):
        with torch.no_grad():
            return target.fix(model(x))
    if isinstance(target, int | Tensor) and not isinstance(target, bool):
        idx = torch.as_tensor(target, dtype=torch.long, device=x.device).reshape(-1, 1).expand(len(x), 1)
        if not softmax:
            return idx[:, 0]
        return lambda out: out.softmax(dim=1).gather(1, idx.to(out.device))[:, 0]
    if callable(target):
        return target  # type: ignore[return-value]
    raise TypeError(f"target must be a class index, a (B,) tensor, a target name or an objective, got {target!r}")


def _channel_mask(a: Tensor, ch: Tensor, layer: str) -> Tensor:
    dim = -1 if a.dim() == 3 else 1
    c = a.shape[dim]
    if ch.numel() and (int(ch.min()) < 0 or int(ch.max()) >= c):
        raise ValueError(f"channels must lie in [0, {c}) for layer {layer!r}, got {ch.tolist()}")
    keep = torch.zeros(c, dtype=torch.bool, device=a.device)
    keep[ch.to(a.device)] = True
    shape = [1] * a.dim()
    shape[dim] = c
    return keep.view(shape)


def _unit_parts(model: nn.Module, layer: str, x: Tensor, objective: object, ch: Tensor,
                max_elements: int) -> tuple[Tensor, Tensor]:
    """``(Σ_u max(m_u, 0), Σ_u max(−m_u, 0))`` over the selected units ``u`` (channel × position), with
    ``m_u = x ⊙ ∂T/∂a_u · ∂a_u/∂x``: one batched vector–Jacobian product per chunk of units."""
    x = x.detach().requires_grad_(True)
    with capture(model, layer) as cap:
        out = model(x)
    a = cap.activations[layer]
    t = objective(out) if callable(objective) else out.gather(1, objective[:, None])[:, 0]
    (g,) = torch.autograd.grad(t.sum(), a, retain_graph=True)  # ∂T/∂a, (B, *unit shape)
    sel = (_channel_mask(a, ch, layer) & (g != 0)).any(0).flatten()  # units selected and used by some sample
    units = sel.nonzero()[:, 0]
    pos, neg = torch.zeros_like(x), torch.zeros_like(x)
    if units.numel() == 0:  # no selected unit reaches the target: both parts are exactly zero
        return pos.detach(), neg.detach()
    g_flat = g.flatten(1)
    k = max(1, max_elements // (a.numel() + x.numel()))
    for chunk in units.split(k):
        go = torch.zeros(len(chunk), *g_flat.shape, dtype=g.dtype, device=g.device)
        go[torch.arange(len(chunk)), :, chunk] = g_flat[:, chunk].T
        with warnings.catch_warnings():  # torch's batched backward calls the deprecated torch.jit.script
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            (jac,) = torch.autograd.grad(a, x, go.view(len(chunk), *a.shape), retain_graph=True,
                                         is_grads_batched=True)
        m = (x.detach() * jac).detach()  # (K, B, *x.shape[1:])
        pos += m.clamp_min(0).sum(0)
        neg += (-m).clamp_min(0).sum(0)
    return pos, neg


def contribution_map(
    model: nn.Module,
    layer: str,
    x: Tensor,
    target: int | Tensor | Objective | str = "top_prob",
    channels: Sequence[int] | Tensor | None = None,
    *,
    part: str = "positive",
    split: str = "unit",
    softmax: bool = True,
    max_elements: int = 2**24,
) -> Tensor:
    """InputGrad decomposition of ``target`` through ``channels`` of ``layer`` (default: all channels).

    ``x: (B, C_in, H, W)`` → ``(B, C_in, H, W)``. Per selected unit ``u`` (channel × position) the map is
    ``m_u = x ⊙ ∂T/∂a_u · ∂a_u/∂x`` (the forward pass is unchanged).

    Args:
        target: ``"top_prob"`` (default, paper 10.8: the softmax output of the top class), a class index or a
            ``(B,)`` tensor of classes (their softmax probability; the logit with ``softmax=False``), a target
            name or an objective.
        part: ``"positive"`` (default, the paper's excitatory map), ``"negative"`` or ``"net"`` (``Σ_u m_u``;
            its sum over the input equals the selected channels' ``layer_contributions(..., "input_grad")``).
        split: ``"unit"`` (default, paper): the part is taken per unit before the sum; ``"sum"``: of ``Σ_u m_u``
            (one backward pass instead of one vector–Jacobian product per unit).
        max_elements: memory bound of a chunk of units (``units × (activation + input)`` elements).
    """
    if part not in MAP_PARTS:
        raise ValueError(f"part must be one of {MAP_PARTS}, got {part!r}")
    if split not in MAP_SPLITS:
        raise ValueError(f"split must be one of {MAP_SPLITS}, got {split!r}")
    get_layer(model, layer)
    objective = _objective(model, x, target, softmax)
    if channels is None:
        with torch.no_grad(), capture(model, layer, detach=True) as cap:
            model(x[:1])
        a = cap.activations[layer]
        channels = range(a.shape[-1 if a.dim() == 3 else 1])
    ch = torch.as_tensor(list(channels) if isinstance(channels, range) else channels, dtype=torch.long).flatten()
    if part != "net" and split == "unit":
        pos, neg = _unit_parts(model, layer, x, objective, ch, max_elements)
        return pos if part == "positive" else neg

    def gate(a: Tensor) -> Tensor:
        return torch.where(_channel_mask(a, ch, layer), a, a.detach())

    with intervene(model, {layer: gate}):
        net = input_x_gradient(model, x, objective)
    return net if part == "net" else net.clamp_min(0) if part == "positive" else (-net).clamp_min(0)


def save_contribution_maps(
    images: Tensor,
    maps: Tensor,
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    filter_size: int = 4,
    contrast: float = 7.0,
) -> Path:
    """Save :func:`negspace.plots.codec_contribution_maps` (images ``(B, C, H, W)``, their positive maps, the
    masked images; paper 10.8: median filter of size 4, contrast 7) as a PNG at ``path``; returns the path."""
    from negspace.plots import codec_contribution_maps

    fig = codec_contribution_maps(images, maps, titles=titles, filter_size=filter_size, contrast=contrast)
    import matplotlib.pyplot as plt  # after plots chose the Agg backend
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
