"""Input attributions: input×gradient and integrated gradients, batched and differentiable."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from negspace.attribution.engine import (
    Target,
    as_target,
    check_input,
    fix_objective,
    forward_objective,
    grads_per_target,
    make_baseline,
    quadrature,
    steps_per_chunk,
)
from negspace.hooks import frozen_relu_masks

__all__ = ["input_x_gradient", "integrated_gradients"]


def _double_backward_ctx(model: Callable[[Tensor], Tensor], create_graph: bool) -> contextlib.AbstractContextManager:
    """With ``create_graph`` the result will be differentiated again: hold ReLU masks constant (exact,
    and it spares autograd a backward pass of zeros; see :func:`negspace.hooks.frozen_relu_masks`)."""
    if create_graph and isinstance(model, nn.Module):
        return frozen_relu_masks(model)
    return contextlib.nullcontext()


def _k_last(grad: Tensor, multi: bool) -> Tensor:
    """(K, B, ...) → (B, K, ...) for multi-target results."""
    return grad.movedim(0, 1) if multi else grad


def input_x_gradient(
    model: Callable[[Tensor], Tensor], x: Tensor, target: Target, *, create_graph: bool = False
) -> Tensor:
    """Input × gradient of ``target`` w.r.t. ``x``.

    Args:
        model: callable returning logits ``(B, num_classes)``.
        x: ``(B, ...)`` input batch.
        target: int, LongTensor ``(B,)`` or ``(B, K)``, or an objective.
        create_graph: keep the graph so the result is differentiable w.r.t. the parameters.

    Returns:
        ``(B, ...)`` like ``x``, or ``(B, K, ...)`` for ``(B, K)`` targets (one forward, K batched backwards).
    """
    check_input(x)
    objective = as_target(target)
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad(), _double_backward_ctx(model, create_graph):
        vals = forward_objective(model, xg, objective)
        (grad,) = grads_per_target(vals, [xg], create_graph=create_graph)
    multi = vals.dim() == 2
    return _k_last(grad, multi) * (x.detach().unsqueeze(1) if multi else x.detach())


def integrated_gradients(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    target: Target,
    *,
    baseline: float | Tensor | None = None,
    n_steps: int = 32,
    create_graph: bool = False,
    internal_batch_size: int | None = None,
    method: str = "gausslegendre",
) -> Tensor:
    """Integrated gradients along the straight path from ``baseline`` to ``x``.

    All ``n_steps`` path points go through the model in one batched pass (``n_steps * B`` samples),
    split into chunks of at most ``internal_batch_size`` samples if given. ``method`` is the
    quadrature rule (Captum's default, Gauss–Legendre, unless set).

    Returns:
        ``(B, ...)`` or ``(B, K, ...)``; ``attr.flatten(1).sum(1) ≈ f(x)[t] - f(baseline)[t]``.
    """
    check_input(x)
    objective = fix_objective(model, x, as_target(target))
    base = make_baseline(baseline, x)
    alphas, weights = quadrature(n_steps, method)
    b = x.shape[0]
    per_chunk = steps_per_chunk(n_steps, b, internal_batch_size)
    delta = (x - base).detach()
    total: Tensor | None = None
    multi = False
    with torch.enable_grad(), _double_backward_ctx(model, create_graph):
        for start in range(0, n_steps, per_chunk):
            a = torch.as_tensor(alphas[start : start + per_chunk], dtype=x.dtype, device=x.device)
            w = torch.as_tensor(weights[start : start + per_chunk], dtype=x.dtype, device=x.device)
            shape = (-1,) + (1,) * x.dim()
            path = (base.detach().unsqueeze(0) + a.view(shape) * delta.unsqueeze(0)).flatten(0, 1)
            path.requires_grad_(True)
            vals = forward_objective(model, path, objective, groups=len(a))
            (grad,) = grads_per_target(vals, [path], create_graph=create_graph)
            multi = vals.dim() == 2
            if multi:  # (K, S*B, ...) → (K, S, B, ...), weighted sum over S
                g = grad.unflatten(1, (len(a), b))
                part = (g * w.view(1, -1, *(1,) * x.dim())).sum(1)
            else:
                g = grad.unflatten(0, (len(a), b))
                part = (g * w.view(shape)).sum(0)
            total = part if total is None else total + part
    if total is None:  # unreachable: quadrature() rejects n_steps < 1
        raise RuntimeError("integrated_gradients computed no step")
    return _k_last(total, multi) * (delta.unsqueeze(1) if multi else delta)
