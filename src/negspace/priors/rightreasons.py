"""Mask-based right-reason losses of the literature, as alternatives to paper 000's prior (pure torch).

Both are selected with ``loss=`` (``AttributionPrior(loss="rrr")``, :func:`negspace.priors.penalty_step`);
``mode=`` keeps its meaning for ``loss="negspace"`` (paper 000's eqs. 2/3) and is ignored otherwise.

* ``"rrr"`` — Ross et al. (2017), *Right for the right reasons*, eq. 1: the input gradient of the summed
  log-probabilities over all classes, squared inside the mask::

      per_sample(x) = Σ_{c,h,w} ( P · ∂/∂x Σ_k log softmax(f(x))_k )²

* ``"rrr_gradcam"`` — RRR with a GradCAM map (the XIL typology's "RRR-G"): the GradCAM map of the label
  class at ``layer`` (Selvaraju et al. 2017: ``ReLU(Σ_k α_k A_k)``, ``α_k`` the spatial mean of
  ``∂f_y/∂A_k``), squared inside the mask average-pooled to the map's resolution::

      per_sample(x) = Σ_{i,j} ( pool(P)_{ij} · GradCAM_y(x)_{ij} )²

The batch value is the mean over *all* B samples (Ross sums over samples: ``λ_here = B · λ_Ross``); samples
with an empty mask contribute exactly 0 and are not run through the model. Left out (docs/baselines.md):
RBR (influence functions need a Hessian-inverse-vector product per sample inside every step) and CDEP
(contextual decomposition needs a decomposition rule for every layer type; not generic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.attribution.engine import check_input
from negspace.hooks import capture
from negspace.priors.checks import check_labels, check_mask
from negspace.priors.loss import PriorResult, masked_index

__all__ = ["LOSSES", "check_loss", "gradcam_map", "right_reason_prior", "rrr_gradcam_penalty", "rrr_penalty"]

LOSSES = ("negspace", "rrr", "rrr_gradcam")


def check_loss(loss: object, layer: object = None) -> str:
    """Validate ``loss`` (one of :data:`LOSSES`) and, for ``"rrr_gradcam"``, that ``layer`` is a dotted name."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "rrr_gradcam" and (not isinstance(layer, str) or not layer):
        raise ValueError(f"loss='rrr_gradcam' needs layer= (the dotted name of a conv layer), got {layer!r}")
    return str(loss)


def rrr_penalty(model: Callable[[Tensor], Tensor], x: Tensor, mask: Tensor) -> Tensor:
    """Ross et al.'s per-sample term ``Σ (P · ∇_x Σ_k log p_k)²`` for ``x: (B, C, H, W)``; returns ``(B,)``
    (differentiable w.r.t. the parameters) and the input gradient ``(B, C, H, W)`` (graph-connected)."""
    xr = x.detach().requires_grad_(True)
    logp = F.log_softmax(model(xr), dim=1)
    (grad,) = torch.autograd.grad(logp.sum(), xr, create_graph=True)
    return ((mask * grad) ** 2).flatten(1).sum(1), grad


def gradcam_map(
    model: Callable[[Tensor], Tensor], layer: str, x: Tensor, y: Tensor, *, network: nn.Module | None = None
) -> Tensor:
    """GradCAM of class ``y: (B,)`` at ``layer`` of ``network`` (default ``model``; output ``(B, K, h, w)``):
    ``ReLU(Σ_k α_k A_k)`` with ``α_k = mean_{ij} ∂f_y/∂A_kij``; returns ``(B, h, w)``, differentiable w.r.t.
    the parameters. ``model``: ``x -> logits``."""
    net = network if network is not None else model
    if not isinstance(net, nn.Module):
        raise TypeError(f"GradCAM needs an nn.Module holding layer={layer!r} (network=), got {type(net).__name__}")
    with capture(net, layer) as cap:  # the one layer-output capture (scoped hook, kept in the graph)
        logits = model(x)
    act = cap.activations.get(layer)
    if act is None or act.dim() != 4:
        raise ValueError(f"layer={layer!r} must run in the forward and return (B, K, h, w) activations")
    (grad,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), act, create_graph=True)
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    return F.relu((alpha * act).sum(1))


def rrr_gradcam_penalty(
    model: Callable[[Tensor], Tensor], layer: str, x: Tensor, y: Tensor, mask: Tensor, *,
    network: nn.Module | None = None,
) -> Tensor:
    """Per-sample ``Σ (pool(P) · GradCAM_y)²`` for ``x: (B, C, H, W)``, ``mask: (B, 1, H, W)``; ``(B,)``."""
    cam = gradcam_map(model, layer, x, y, network=network)
    m = F.adaptive_avg_pool2d(mask, cam.shape[-2:])[:, 0]
    return ((m * cam) ** 2).flatten(1).sum(1)


def right_reason_prior(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    *,
    loss: str = "rrr",
    layer: str | None = None,
    network: nn.Module | None = None,
    attribution_batch: int | None = None,
    generator: torch.Generator | None = None,
    all_rows: bool = False,
) -> PriorResult:
    """RRR / RRR-GradCAM of a batch as a :class:`~negspace.priors.PriorResult` (mean over all B samples).

    ``model``: ``x -> logits``; ``network``: the ``nn.Module`` holding ``layer`` for ``"rrr_gradcam"``
    (default ``model``). ``attribution_batch`` subsamples masked samples as in :func:`~negspace.priors.prior_loss`.
    ``attributions`` is the input gradient ``(M, 1, C, H, W)`` for ``"rrr"`` and ``None`` for GradCAM.
    ``all_rows``: run the model on the whole batch (train-mode BatchNorm then sees the full-batch statistics,
    as in ``norm_mode="shared"``) and keep the masked rows' values; otherwise only masked rows are run.
    """
    check_loss(loss, layer)
    if loss == "negspace":
        raise ValueError("right_reason_prior computes loss='rrr' or 'rrr_gradcam'; use compute_prior for 'negspace'")
    check_input(x)
    b = x.shape[0]
    yl = check_labels(y, b)
    m = check_mask(mask, x)
    index, scale = masked_index(m, attribution_batch, generator)
    if index.numel() == 0:
        zero = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=torch.is_grad_enabled())
        return PriorResult(zero, x.new_zeros(b), index, None, None, m)
    rows = torch.arange(b, device=index.device) if all_rows else index
    xs, ms, ys = x.index_select(0, rows), m.index_select(0, rows), yl.index_select(0, rows.to(yl.device))
    attr = None
    if loss == "rrr":
        per, grad = rrr_penalty(model, xs, ms)
        attr = grad.unsqueeze(1)
    else:
        per = rrr_gradcam_penalty(model, str(layer), xs.detach(), ys, ms, network=network)
    if all_rows:
        keep = index.to(per.device)
        per, ys = per.index_select(0, keep), ys.index_select(0, index.to(ys.device))
        attr = None if attr is None else attr.index_select(0, keep)
    per_sample = per.new_zeros(b).index_copy(0, index, per)
    return PriorResult(per.sum() * scale / b, per_sample, index, attr, ys[:, None], m)
