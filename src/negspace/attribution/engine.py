"""Shared machinery of every attribution method: input checks, target resolution, the objective's
forward pass, and batched gradients for K targets per sample.

Captum is our test oracle but cannot be used here: its attributions are computed under
``torch.no_grad``-style graphs that are not differentiable w.r.t. the parameters (we need
``create_graph=True`` for training losses), it runs one backward per target, and it cannot fix a
data-dependent objective (top logit) along an integration path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from negspace.hooks import capture, run_until
from negspace.objectives import Objective, Target, as_target

__all__ = ["Target", "as_target", "check_input", "forward_objective", "grads_per_target", "make_baseline", "model_output", "quadrature"]


def check_input(x: Tensor, name: str = "x") -> None:
    """Raise a clear error for non-tensors, integer tensors, empty batches and NaN/inf values."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{name} contains NaN or inf (samples {bad[:10]}{'...' if len(bad) > 10 else ''})")


def _check_values(vals: object, batch: int, who: str) -> Tensor:
    if not isinstance(vals, Tensor):
        raise TypeError(f"{who} must return a Tensor of shape (B,) or (B, K), got {type(vals).__name__}")
    if vals.dim() not in (1, 2) or vals.shape[0] != batch:
        raise ValueError(f"{who} must return shape (B,)=({batch},) or (B, K), got {tuple(vals.shape)}")
    return vals


def model_output(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out = model(x)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__}, not a logits Tensor; wrap it, e.g. "
            "`lambda x: model(x)['logits']` (callbacks take forward=...)"
        )
    if out.dim() == 0 or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"the model returned outputs of shape {tuple(out.shape)} for a batch of {x.shape[0]} inputs "
            f"{tuple(x.shape)}; the first output dimension must be the batch (B, num_classes)"
        )
    return out


def forward_objective(
    model: Callable[[Tensor], Tensor], x: Tensor, objective: Callable[[Tensor], Tensor], groups: int = 1
) -> Tensor:
    """Run the model on ``x: (G*B, ...)`` and evaluate ``objective``.

    ``groups > 1`` means ``x`` stacks G copies/variants of one batch of B samples (IG steps); the
    objective is applied per group so that per-sample targets line up. Returns ``(G*B,)`` or
    ``(G*B, K)``. Objectives with a ``layer`` attribute get that layer's output, and the forward pass
    stops as soon as it is computed.
    """
    layer = getattr(objective, "layer", None)
    if layer is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"objective on layer {layer!r} needs an nn.Module model, got {type(model).__name__}")
        with capture(model, layer, stop_after=True) as cap:
            run_until(model, x)
        if layer not in cap.activations:
            raise RuntimeError(f"layer {layer!r} did not run during the forward pass")
        out = cap.activations[layer]
    else:
        out = model_output(model, x)
    n = out.shape[0]
    if n % groups:
        raise RuntimeError(f"model output batch {n} is not a multiple of {groups} groups")
    b = n // groups
    who = f"objective {objective!r}"
    if groups == 1:
        return _check_values(objective(out), b, who)
    parts = [_check_values(objective(o), b, who) for o in out.split(b)]
    return torch.cat(parts)


def fix_objective(model: Callable[[Tensor], Tensor], x: Tensor, objective: Callable) -> Callable:
    """Freeze data-dependent choices (``top_logit`` etc.) at the actual input ``x``."""
    if isinstance(objective, Objective) and type(objective).fix is not Objective.fix:
        with torch.no_grad():
            layer = getattr(objective, "layer", None)
            out = model_output(model, x) if layer is None else None
        if out is not None:
            return objective.fix(out)
    return objective


def grads_per_target(
    vals: Tensor, inputs: Sequence[Tensor], *, create_graph: bool = False, retain_graph: bool | None = None
) -> list[Tensor]:
    """Gradients of each target w.r.t. ``inputs``, per sample.

    ``vals: (N,)`` → list of tensors shaped like each input. ``vals: (N, K)`` → list of ``(K, *input.shape)``:
    one forward, and all K backward passes batched through ``is_grads_batched`` (vmap over the
    grad outputs) instead of K separate calls.

    Per-sample gradients come from differentiating the *sum* over the batch, which is exact when samples
    do not interact (eval-mode BatchNorm, no batch statistics).
    """
    inputs = list(inputs)
    if vals.dim() == 1:
        return list(
            torch.autograd.grad(vals.sum(), inputs, create_graph=create_graph, retain_graph=retain_graph)
        )
    k = vals.shape[1]
    if k == 1:
        gs = torch.autograd.grad(vals[:, 0].sum(), inputs, create_graph=create_graph, retain_graph=retain_graph)
        return [g.unsqueeze(0) for g in gs]
    eye = torch.eye(k, dtype=vals.dtype, device=vals.device)
    grad_out = eye[:, None, :].expand(k, vals.shape[0], k)
    return list(
        torch.autograd.grad(
            vals,
            inputs,
            grad_outputs=grad_out,
            is_grads_batched=True,
            create_graph=create_graph,
            retain_graph=retain_graph,
        )
    )


def quadrature(n_steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alpha`` in [0, 1] and weights for ∫₀¹ f(α) dα with ``n_steps`` evaluations."""
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return (nodes + 1) / 2, weights / 2
    if method == "riemann_middle":
        return (np.arange(n_steps) + 0.5) / n_steps, np.full(n_steps, 1.0 / n_steps)
    if method == "riemann_right":
        return np.arange(1, n_steps + 1) / n_steps, np.full(n_steps, 1.0 / n_steps)
    if method == "riemann_left":
        return np.arange(n_steps) / n_steps, np.full(n_steps, 1.0 / n_steps)
    if method == "riemann_trapezoid":
        if n_steps < 2:
            raise ValueError("riemann_trapezoid needs n_steps >= 2")
        alphas = np.linspace(0, 1, n_steps)
        w = np.full(n_steps, 1.0 / (n_steps - 1))
        w[[0, -1]] /= 2
        return alphas, w
    raise ValueError(
        "method must be one of 'gausslegendre', 'riemann_middle', 'riemann_left', 'riemann_right', "
        f"'riemann_trapezoid'; got {method!r}"
    )


def make_baseline(baseline: float | Tensor | None, x: Tensor) -> Tensor:
    """``None`` → zeros, a float → constant, a tensor broadcastable to ``x``."""
    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, int | float):
        return torch.full_like(x, float(baseline))
    if isinstance(baseline, Tensor):
        try:
            b = torch.broadcast_to(baseline.to(x), x.shape)
        except RuntimeError as e:
            raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to x {tuple(x.shape)}") from e
        check_input(b.reshape(x.shape), "baseline")
        return b
    raise TypeError(f"baseline must be None, a float or a Tensor, got {type(baseline).__name__}")


def steps_per_chunk(n_steps: int, batch: int, internal_batch_size: int | None) -> int:
    if internal_batch_size is None:
        return n_steps
    if not isinstance(internal_batch_size, int) or internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be a positive int or None, got {internal_batch_size!r}")
    return max(1, min(n_steps, internal_batch_size // batch))
