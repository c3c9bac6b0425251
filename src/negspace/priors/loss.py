"""Paper 000's prior term (eqs. 2/3) and the prior loss built from it.

For an input ``x`` with spurious-region mask ``P`` (1 inside the region), label ``t`` and model ``f``:

* presence (eq. 2):          ``L = 2·prior(A(x, t))``
* presence+absence (eq. 3):  ``L = prior(A(x, t)) + mean_{t' ∈ non_target} prior(A(x, t'))``

with ``prior(A) = Σ|A·P| / (ΣP + 1e-5)`` (|A| summed over channels and pixels, ``P`` broadcast over
channels) and ``A`` an input attribution (input×gradient, or integrated gradients with a zero baseline as
in the paper). The batch loss is the mean over *all* samples; samples with an empty mask contribute
exactly 0 and are not even sent through the model.

Target and non-target attributions come from one forward pass with K = 1 + #non-targets batched
backward passes (:func:`negspace.attribution.attribute` with a ``(B, K)`` objective and
``create_graph=True``), never one full pass per class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from negspace.attribution.dispatch import attribute
from negspace.attribution.engine import check_input, grads_per_target
from negspace.hooks import frozen_norm_stats
from negspace.priors.checks import (
    check_attribution_batch,
    check_labels,
    check_mask,
    check_normalize,
    check_options,
)
from negspace.priors.targets import prior_targets, resolve_targets
from negspace.reduce import relative_mass_in_mask

__all__ = ["EPS", "PriorResult", "attribution_prior", "compute_prior", "compute_prior_from_logits",
           "masked_index", "prior_loss"]

EPS = 1e-5  # paper 000, eq. 2/3: "we add 10^-5 to the denominator"


def attribution_prior(attributions: Tensor, mask: Tensor, normalize: str = "mask") -> Tensor:
    """Paper 000's prior term ``Σ|A·P| / (ΣP + 1e-5)`` per sample (and per target).

    ``normalize="fraction"`` gives the scale-free ``Σ|A·P| / (Σ|A| + 1e-5)`` instead: the share of the
    attribution mass inside the mask, in [0, 1], unchanged when the input or the logits are rescaled.

    Args:
        attributions: ``(B, C, H, W)`` or, for K targets per sample, ``(B, K, C, H, W)``.
        mask: broadcastable to ``(B, 1, H, W)`` (or ``(B, H, W)``), values in [0, 1]; ``ΣP`` sums pixels
            only (the mask is broadcast over channels, the numerator sums |A| over channels and pixels).

    Returns:
        ``(B,)`` or ``(B, K)``. Samples with an empty mask give exactly 0.
    """
    if not isinstance(attributions, Tensor):
        raise TypeError(f"attributions must be a Tensor, got {type(attributions).__name__}")
    if attributions.dim() not in (4, 5):
        raise ValueError(
            f"attributions must be (B, C, H, W) or (B, K, C, H, W), got shape {tuple(attributions.shape)}"
        )
    multi = attributions.dim() == 5
    m = check_mask(mask, attributions[:, 0] if multi else attributions)  # (B, 1, H, W)
    a = attributions.abs()
    if check_normalize(normalize) == "fraction":
        inside = (a * (m.unsqueeze(1) if multi else m)).flatten(2 if multi else 1)
        return inside.sum(-1) / (a.flatten(2 if multi else 1).sum(-1) + EPS)  # (B, K) or (B,)
    denom = m.flatten(1).sum(1) + EPS  # (B,)
    if multi:
        return (a * m.unsqueeze(1)).flatten(2).sum(2) / denom.unsqueeze(1)  # (B, K)
    return (a * m).flatten(1).sum(1) / denom


@dataclass
class PriorResult:
    """Everything one prior evaluation produced.

    ``loss``: scalar (differentiable). ``per_sample``: ``(B,)`` per-sample prior (0 for empty masks).
    ``index``: ``(M,)`` indices of the masked samples that were attributed. ``attributions``:
    ``(M, K, C, H, W)`` (graph-connected; column 0 is the target attribution). ``targets``: ``(M, K)``.
    """

    loss: Tensor
    per_sample: Tensor
    index: Tensor
    attributions: Tensor | None
    targets: Tensor | None
    mask: Tensor

    def mass_in_mask(self) -> Tensor | None:
        """Mean share of |target attribution| inside the mask over masked samples (``None`` if none)."""
        if self.attributions is None or self.index.numel() == 0:
            return None
        a = self.attributions[:, 0].detach()
        return relative_mass_in_mask(a, self.mask[self.index]).mean()


def _empty(x: Tensor, m: Tensor, index: Tensor) -> PriorResult:
    # Nothing to attribute: exactly zero, no model call. A grad-requiring leaf keeps
    # `prior_loss(...).backward()` valid; it adds nothing to any parameter's gradient.
    zero = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=torch.is_grad_enabled())
    return PriorResult(zero, x.new_zeros(x.shape[0]), index, None, None, m)


def _combine(
    attr: Tensor, ms: Tensor, m: Tensor, index: Tensor, targets: Tensor | None, mode: str, b: int, scale: float = 1.0,
    normalize: str = "mask",
) -> PriorResult:
    """Eq. 2/3 from the ``(M, K, C, H, W)`` attributions of the M attributed samples of a batch of B
    (``scale`` = #masked / M when only a random subset of the masked samples was attributed)."""
    terms = attribution_prior(attr, ms, normalize)  # (M, K)
    per = 2.0 * terms[:, 0] if mode == "presence" else terms[:, 0] + terms[:, 1:].mean(1)
    per_sample = per if index.numel() == b else per.new_zeros(b).index_copy(0, index, per)
    loss = per.sum() * scale / b if scale != 1.0 else per.sum() / b  # unmasked samples contribute exactly 0
    return PriorResult(loss, per_sample, index, attr, targets, m)


def masked_index(
    m: Tensor, attribution_batch: int | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, float]:
    """Indices ``(M,)`` of the samples to attribute and the rescaling factor of their sum.

    All masked samples (factor 1), or, with ``attribution_batch=K`` and more than K masked samples, K of the
    M_all masked ones drawn uniformly without replacement (``generator``) with factor ``M_all / K``: every
    masked sample is drawn with probability K / M_all, so the rescaled sum is an unbiased estimate of the
    full-batch sum (exactly its mean over all K-subsets when per-sample priors do not depend on the subset).
    """
    index = (m.flatten(1).sum(1) > 0).nonzero().flatten()
    k = check_attribution_batch(attribution_batch)
    if k is None or index.numel() <= k:
        return index, 1.0
    gen_device = generator.device if generator is not None else torch.device("cpu")
    pick = torch.randperm(index.numel(), generator=generator, device=gen_device)[:k].sort().values
    return index[pick.to(index.device)], index.numel() / k


def compute_prior(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    *,
    mode: str = "presence_absence",
    method: str = "input_x_gradient",
    non_target: str = "complement",
    n_steps: int = 16,
    baseline: float | Tensor | None = None,
    internal_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    keep_norm_stats: bool = True,
    attribution_batch: int | None = None,
    normalize: str = "mask",
) -> PriorResult:
    """:func:`prior_loss` with its intermediate results (used by the callback for logging)."""
    kind, k = check_options(mode, method, non_target, n_steps)
    check_normalize(normalize)
    check_input(x)
    b = x.shape[0]
    yl = check_labels(y, b)
    m = check_mask(mask, x)
    index, scale = masked_index(m, attribution_batch, generator)
    if index.numel() == 0:
        return _empty(x, m, index)
    all_masked = index.numel() == b
    xs = x if all_masked else x.index_select(0, index)
    ms = m if all_masked else m.index_select(0, index)
    ys = yl if all_masked else yl.index_select(0, index.to(yl.device))
    objective = prior_targets(ys, mode, kind, k, generator)
    ctx = frozen_norm_stats(model) if keep_norm_stats and isinstance(model, nn.Module) else contextlib.nullcontext()
    with ctx:
        attr = attribute(model, xs, objective, method=method, create_graph=True, baseline=baseline,
                         n_steps=n_steps, internal_batch_size=internal_batch_size)
    if attr.dim() == x.dim():  # single target came back without the K axis
        attr = attr.unsqueeze(1)
    return _combine(attr, ms, m, index, objective._targets, mode, b, scale, normalize)


def compute_prior_from_logits(
    logits: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    *,
    mode: str = "presence_absence",
    non_target: str = "complement",
    generator: torch.Generator | None = None,
    attribution_batch: int | None = None,
    normalize: str = "mask",
) -> PriorResult:
    """Input×gradient prior from ``logits = model(x)`` computed *in the training forward* (shared forward).

    ``x: (B, C, H, W)`` must require grad and ``logits: (B, num_classes)`` must come from it in the current
    graph (e.g. ``x.requires_grad_(); logits = model(x); loss = ce(logits, y) + lam * prior.loss``). This
    saves the prior's own forward pass and, because the prior's double backward and the loss backward then
    share one graph, the second backward through the forward activations. The values equal
    :func:`prior_loss` with ``method="input_x_gradient"`` whenever samples do not interact in the forward
    (no train-mode BatchNorm); with train-mode BatchNorm the attributions are those of the training
    forward (full-batch statistics). Gradients are taken for the whole batch (masked rows only contribute),
    so skipping unmasked samples saves nothing here.
    """
    kind, k = check_options(mode, "input_x_gradient", non_target, 1)
    check_normalize(normalize)
    if not isinstance(x, Tensor) or not x.requires_grad:
        raise ValueError("x must be the tensor the logits were computed from, with requires_grad=True")
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be (B, num_classes) with B = {x.shape[0]}, got {shape}")
    b = x.shape[0]
    yl = check_labels(y, b)
    m = check_mask(mask, x.detach())
    index, scale = masked_index(m, attribution_batch, generator)
    if index.numel() == 0:
        return _empty(x, m, index)
    sub = logits.index_select(0, index)
    targets = resolve_targets(yl.index_select(0, index.to(yl.device)), sub, mode, kind, k, generator)
    vals = sub.gather(1, targets)  # (M, K)
    (grad,) = grads_per_target(vals, [x], create_graph=True)  # (K, B, C, H, W)
    attr = grad.index_select(1, index).movedim(0, 1) * x.detach().index_select(0, index).unsqueeze(1)
    return _combine(attr, m.index_select(0, index), m, index, targets, mode, b, scale, normalize)


def prior_loss(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    *,
    mode: str = "presence_absence",
    method: str = "input_x_gradient",
    non_target: str = "complement",
    n_steps: int = 16,
    baseline: float | Tensor | None = None,
    internal_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    keep_norm_stats: bool = True,
    attribution_batch: int | None = None,
    normalize: str = "mask",
) -> Tensor:
    """Attribution-prior loss of paper 000 (eq. 2 ``mode="presence"``, eq. 3 ``"presence_absence"``).

    Args:
        model: callable ``x -> logits (B, num_classes)`` (an ``nn.Module`` or a function).
        x: ``(B, C, H, W)`` images. y: ``(B,)`` integer labels.
        mask: spurious-region mask broadcastable to ``(B, 1, H, W)`` (or ``(B, H, W)``), values in [0, 1].
        mode: ``"presence"`` → ``2·mean_b prior(A(x, y))``; ``"presence_absence"`` →
            ``mean_b [prior(A(x, y)) + mean_{t'} prior(A(x, t'))]``.
        method: ``"input_x_gradient"`` (default; equals IG exactly for bias-free positively homogeneous
            X-models) or ``"integrated_gradients"`` (zero baseline unless ``baseline``; ``n_steps`` points).
        non_target: ``"complement"`` (binary, 1 − y), ``"all"``, ``"top:K"`` (K highest non-target logits,
            chosen at ``x``), ``"sample:K"`` (K distinct random other classes, drawn with ``generator``).
        keep_norm_stats: run the extra passes on cloned BatchNorm running statistics (see
            :func:`negspace.hooks.frozen_norm_stats`) so that the prior never changes them.
        attribution_batch: attribute at most this many masked samples, drawn at random with ``generator``;
            their sum is rescaled by #masked / K, an unbiased estimate of the full penalty (:func:`masked_index`).
        normalize: ``"mask"`` (paper: divide by the mask area) or ``"fraction"`` (divide by the sample's total
            attribution: scale-free, see :func:`attribution_prior`).

    Returns:
        Scalar loss, differentiable w.r.t. the model parameters. Samples with an empty mask contribute
        exactly 0 and are not run through the model; if no sample has a mask the model is not called.
    """
    return compute_prior(
        model, x, y, mask, mode=mode, method=method, non_target=non_target, n_steps=n_steps, baseline=baseline,
        internal_batch_size=internal_batch_size, generator=generator, keep_norm_stats=keep_norm_stats,
        attribution_batch=attribution_batch, normalize=normalize,
    ).loss
