"""Exact Grad×Act contributions through one ``nn.Conv2d`` / ``nn.Linear``, without autograd.

For a unit ``k`` of a layer ``z = conv(a) + b`` (or ``linear``) and a spatial reduction ``reduce`` of its map,
the gradient of ``reduce(z_k)`` w.r.t. the layer input is the transposed convolution of the reduce weights
``r(p)`` (one-hot at the argmax for ``"max"`` and ``"center"``, ``1/P`` for ``"mean"``, ``1`` for ``"sum"``,
``ReLU(z_k(p))`` for ``"relu"``, PURE's reference seed)
with the filter ``W_k``. Grad×Act summed over space is therefore

    R_i = Σ_p r(p) Σ_j W_k[i, j] · U[i, j, p]        (U = unfolded input patches, j = kernel offset)

i.e. the bias-free contribution of input channel ``i`` to ``z_k``, weighted by ``r``. Used by PURE circuits
(:mod:`negspace.explain.pure`) and the virtual-neuron router (:mod:`negspace.editing.router`); tested against
the autograd path for every reduction, stride, padding and dilation, and for ``Linear`` on ``(B, D)`` and
``(B, T, D)`` inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.hooks import StopForward, capture, get_layer, run_until
from negspace.reduce import channels_last

__all__ = [
    "fast_forward",
    "fast_rows",
    "is_fast_module",
    "position_contributions",
    "positions_last",
    "reduce_weights",
    "row_weights",
    "unfold_patches",
    "unit_filters",
]


def is_fast_module(module: nn.Module) -> bool:
    """True for the layers the fast path is exact for: ``nn.Linear`` and ``nn.Conv2d`` (groups=1, zero padding)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" and (
        not isinstance(module.padding, str)
    )


def reduce_weights(z: Tensor, reduce: str) -> Tensor:
    """Weights ``r (N, P)`` with ``reduce(z) = Σ_p r_p z_p`` locally (the gradient of the reduction) for
    ``z: (N, P)``, positions last (``"max"``, ``"mean"``, ``"sum"``; ``"relu"``: ``r = ReLU(z)``, the seed of
    PURE's reference code, the gradient of ``½ Σ_p ReLU(z_p)²``; anything else gives zeros)."""
    if reduce == "relu":
        return z.clamp_min(0)
    if reduce == "mean":
        return torch.full_like(z, 1.0 / z.shape[1])
    if reduce == "sum":
        return torch.ones_like(z)
    r = torch.zeros_like(z)
    if reduce == "max":
        r.scatter_(1, z.argmax(dim=1, keepdim=True), 1.0)
    return r


def _center_index(out: Tensor) -> int:
    if out.dim() == 4:
        h, w = out.shape[-2:]
        return (h // 2) * w + w // 2
    return (channels_last(out).shape[1]) // 2


def row_weights(out: Tensor, reduce: str, sample: Tensor, unit: Tensor) -> Tensor:
    """Reduce weights ``(R, P)`` of rows (``sample (R,)``, ``unit (R,)``) of the layer output ``out``."""
    flat = channels_last(out)  # (N, P, C)
    z = flat[sample, :, unit]  # (R, P)
    if reduce == "center":
        r = torch.zeros_like(z)
        r[:, _center_index(out)] = 1.0
        return r
    return reduce_weights(z, reduce)


def unfold_patches(module: nn.Conv2d, a: Tensor) -> Tensor:
    """Input patches of a conv: ``a (N, C, H, W) → (N, C, kk, P)``."""
    u = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return u.view(a.shape[0], a.shape[1], -1, u.shape[-1])


def positions_last(module: nn.Module, a: Tensor) -> Tensor:
    """Input of a fast-path layer as ``(N, C, kk, P)`` (conv patches) or ``(N, D, 1, T)`` (linear)."""
    if isinstance(module, nn.Conv2d):
        return unfold_patches(module, a)
    flat = a[:, None, :] if a.dim() == 2 else a  # (N, T, D)
    return flat.transpose(1, 2)[:, :, None, :]


def unit_filters(module: nn.Module, k: Tensor) -> Tensor:
    """Filters of output units ``k`` as ``(*k.shape, C, kk)``."""
    w = module.weight
    return w[k].flatten(k.dim() + 1) if isinstance(module, nn.Conv2d) else w[k][..., None]


def fast_rows(
    module: nn.Module, a: Tensor, out: Tensor, sample: Tensor, unit: Tensor, reduce: str, max_rows: int = 1024
) -> Tensor:
    """Grad×Act of the input channels of ``module`` for rows (``sample``, ``unit``), summed over space: ``(R, C)``.

    ``a``: the module's input, ``out``: its output. ``R_i = Σ_j W_unit[i, j] · Σ_p r(p) U[i, j, p]``: for
    ``max``/``center`` ``r`` is one-hot (one patch is gathered), for ``mean``/``sum`` it is constant (the patch
    sum is shared by all units of a sample).
    """
    u = positions_last(module, a)  # (N, C, kk, P)
    parts = []
    shared = None
    if reduce in ("mean", "sum"):
        shared = u.sum(-1) / (u.shape[-1] if reduce == "mean" else 1)  # (N, C, kk)
    for lo in range(0, len(sample), max_rows):
        s, k = sample[lo : lo + max_rows], unit[lo : lo + max_rows]
        if shared is not None:
            v = shared[s]
        elif reduce == "relu":  # dense weights ReLU(z_k(p)): a weighted sum of the patches
            v = torch.einsum("rckp,rp->rck", u[s], row_weights(out, reduce, s, k).to(u.dtype))
        else:
            pos = row_weights(out, reduce, s, k).argmax(dim=1)  # one-hot weights: the chosen position
            v = u[s, :, :, pos]  # (R, C, kk)
        parts.append((v * unit_filters(module, k).to(v.dtype)).sum(-1))
    return torch.cat(parts)


def position_contributions(module: nn.Module, a: Tensor, unit: Tensor) -> Tensor:
    """Per-position contributions ``c_i(p) = Σ_j W_unit[i, j] · U[i, j, p]`` of each input channel ``i`` to
    one unit per sample (``unit (N,)``): ``(N, P, C)`` (``z_unit(p) = Σ_i c_i(p) + b_unit``)."""
    u = positions_last(module, a)  # (N, C, kk, P)
    return (u * unit_filters(module, unit)[..., None].to(u.dtype)).sum(2).transpose(1, 2)


def fast_forward(
    model: nn.Module, layer: str, circuit_layer: str, x: Tensor, strict: bool
) -> tuple[nn.Module, Tensor, Tensor] | None:
    """Run ``model`` until ``layer``; return ``(module, its input, its output)`` (detached) if the input is the
    output of ``circuit_layer``; otherwise raise ``ValueError`` (``strict``) or return ``None``."""
    module = get_layer(model, layer)
    seen: dict[str, Tensor] = {}

    def pre(_m: nn.Module, args: tuple) -> None:
        seen["input"] = args[0]

    def post(_m: nn.Module, _args: tuple, output: Tensor) -> None:
        seen["output"] = output
        raise StopForward

    with capture(model, circuit_layer, detach=True) as cap:
        h1 = module.register_forward_pre_hook(pre)
        h2 = module.register_forward_hook(post)
        try:
            run_until(model, x)
        finally:
            h1.remove()
            h2.remove()
    a = cap.activations.get(circuit_layer)
    inp = seen.get("input")
    if a is None or inp is None or a.shape != inp.shape or not torch.equal(a, inp.detach()):
        if not strict:
            return None
        raise ValueError(
            f"fast=True needs layer {layer!r} to be applied directly to the output of circuit_layer "
            f"{circuit_layer!r}; its input differs (use fast='auto' or False for the autograd path)"
        )
    return module, inp.detach(), seen["output"].detach()
