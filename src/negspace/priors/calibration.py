"""``lam="auto"``: choose λ from the ratio of gradient norms at the first penalised step. Pure torch.

λ is set once, on the first batch that carries masks, so that the prior's gradient has a fixed fraction of the
task loss's gradient norm (over the parameters that require grad):

    λ = fraction · ‖∇θ L_task‖ / ‖∇θ penalty‖

With ``fraction=1`` both terms pull equally hard at the start; the default (:data:`AUTO_FRACTION`) is what the
measurements in docs/priors.md ("Choosing λ") support. Under DDP each rank computes its own value and the
mean is used, so that every rank trains with the same λ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from negspace.distributed import all_gather_object, is_distributed

__all__ = ["AUTO_FRACTION", "calibrate_lam", "check_lam", "grad_norm"]

AUTO_FRACTION = 1.0


def check_lam(lam: object) -> bool:
    """Validate ``lam`` (finite float >= 0 or ``"auto"``); return whether it is ``"auto"``."""
    if lam == "auto":
        return True
    if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite float >= 0 or 'auto', got {lam!r}")
    return False


def grad_norm(value: Tensor, params: list[nn.Parameter]) -> float:
    """L2 norm of ``∂value/∂params`` (scalar ``value``; the graph is kept for the training backward)."""
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def calibrate_lam(
    task_loss: Tensor, penalty: Tensor, params: Iterable[nn.Parameter], fraction: float = AUTO_FRACTION
) -> float | None:
    """``fraction · ‖∇task_loss‖ / ‖∇penalty‖`` (both scalars with graphs to ``params``), averaged over DDP ranks.

    Returns ``None`` when the penalty has no gradient (e.g. the batch has no mask): calibrate on a later batch.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not math.isfinite(fraction) or fraction <= 0:
        raise ValueError(f"fraction must be a finite float > 0, got {fraction!r}")
    ps = [p for p in params if p.requires_grad]
    g_task = grad_norm(task_loss, ps) if task_loss.requires_grad else 0.0
    g_pen = grad_norm(penalty, ps) if penalty.requires_grad else 0.0
    lam = fraction * g_task / g_pen if g_pen > 0 and math.isfinite(g_pen) else None
    if is_distributed():
        vals = [v for v in all_gather_object(lam) if v is not None]
        lam = sum(vals) / len(vals) if vals else None
    return lam
