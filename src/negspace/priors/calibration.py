"""``lam="auto"``: choose λ from the ratio of gradient norms at the first penalised step. Pure torch.

λ is set once, on the first batch that carries masks, so that the prior's gradient has a fixed fraction of the
task loss's gradient norm (over the parameters that require grad):

    λ = fraction · ‖∇θ L_task‖ / ‖∇θ penalty‖

With ``fraction=1`` both terms pull equally hard at the start; the default (:data:`AUTO_FRACTION`) is what the
measurements in docs/priors.md ("Choosing λ") support. Under DDP each rank computes its own value and the
mean is used, so that every rank trains with the same λ (:class:`LamController`, which also backs off by 10×
when a collapse is flagged on any rank).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from negspace.distributed import all_gather_object, gather_stack, is_distributed

__all__ = ["AUTO_FRACTION", "LamController", "calibrate_lam", "check_lam", "grad_norm"]

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
    task_loss: Tensor, penalty: Tensor, params: Iterable[nn.Parameter], fraction: float = AUTO_FRACTION,
    *, sync: bool = True,
) -> float | None:
    """``fraction · ‖∇task_loss‖ / ‖∇penalty‖`` (both scalars with graphs to ``params``); with ``sync`` averaged
    over DDP ranks (a collective: every rank must call it; :class:`LamController` syncs outside the step instead).

    Returns ``None`` when the penalty has no gradient (e.g. the batch has no mask): calibrate on a later batch.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not math.isfinite(fraction) or fraction <= 0:
        raise ValueError(f"fraction must be a finite float > 0, got {fraction!r}")
    ps = [p for p in params if p.requires_grad]
    g_task = grad_norm(task_loss, ps) if task_loss.requires_grad else 0.0
    g_pen = grad_norm(penalty, ps) if penalty.requires_grad else 0.0
    lam = fraction * g_task / g_pen if g_pen > 0 and math.isfinite(g_pen) else None
    if sync and is_distributed():
        vals = [v for v in all_gather_object(lam) if v is not None]
        lam = sum(vals) / len(vals) if vals else None
    return lam


class LamController:
    """``lam="auto"``: λ calibrated on the first penalised step, divided by 10 on every detected collapse, and
    identical on every DDP rank. Pure torch; checkpointable (floats and ints only).

    Each rank calls :meth:`propose` on its penalised steps (the calibration candidate of the step, used locally at
    once) and :meth:`flag_collapse` when its monitor flags a collapse; :meth:`sync` is called on **every** rank
    after **every** training batch (also batches where a rank skipped the prior): it agrees on the mean candidate
    (first calibration) and applies the back-off if any rank collapsed, with one small collective under DDP —
    never inside the penalty computation, so that a rank skipping its prior (``on_nan="skip"``, no mask) cannot
    deadlock the others.
    """

    def __init__(self, fraction: float = AUTO_FRACTION, backoff: float = 10.0) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not math.isfinite(fraction) or fraction <= 0:
            raise ValueError(f"auto_fraction must be a finite float > 0, got {fraction!r}")
        self.fraction, self.backoff = float(fraction), float(backoff)
        self.lam, self.calibrated = 1.0, False
        self._candidate: float | None = None
        self._collapsed = False

    def propose(self, task_loss: Tensor, penalty: Tensor, params: Iterable[nn.Parameter], step: int = 0) -> float | None:
        """Called on every penalised step (``step`` = ``trainer.global_step``). Before calibration: this rank's λ
        (see :func:`calibrate_lam`, local), adopted locally for this step; ``None`` when the penalty has no
        gradient (a batch without masks) or λ is already calibrated (then nothing is computed)."""
        if self.calibrated:
            return None
        lam = calibrate_lam(task_loss, penalty, params, self.fraction, sync=False)
        if lam is not None:
            self._candidate, self.lam = lam, lam
        return lam

    def flag_collapse(self) -> None:
        """This rank's monitor flagged a collapse: back off at the next :meth:`sync`."""
        self._collapsed = True

    def sync(self) -> float:
        """Agree on λ across ranks (mean of the candidates for the first calibration; back-off if any rank
        collapsed); returns the λ every rank uses from the next step on."""
        cand, collapsed = self._candidate, self._collapsed
        local = torch.tensor([0.0 if cand is None else cand, float(cand is not None), float(collapsed)],
                             dtype=torch.float64)
        total = gather_stack(local).sum(0) if is_distributed() else local
        if not self.calibrated and total[1] > 0:
            self.lam, self.calibrated = float(total[0] / total[1]), True
        if total[2] > 0:
            self.lam /= self.backoff
        self._candidate, self._collapsed = None, False
        return self.lam

    def state_dict(self) -> dict[str, float | int]:
        return {"lam": float(self.lam), "calibrated": int(self.calibrated)}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.lam, self.calibrated = float(state.get("lam", self.lam)), bool(state.get("calibrated", 0))
