"""``lam="auto"``: choose λ from the ratio of gradient norms, and keep choosing it. Pure torch.

λ is set so that the prior's gradient has a fixed share of the task loss's gradient norm (over the parameters
that require grad):

    λ = fraction · ‖∇θ L_task‖ / ‖∇θ penalty‖

first on the first batch that carries masks, then again every :data:`AUTO_EVERY` global steps: the measured
ratios are averaged geometrically (an exponential moving average of their logs), and λ may rise at most ``rise``
times above the smallest value it has taken. The ratio moves during training (in our probes by up to two orders
of magnitude within a run: the paper's penalty grows with the logit scale, the scale-free one,
``normalize="fraction"``, fades once the mask holds little attribution), so a λ from step 0 goes stale; the cap
keeps a fading penalty from being chased into a collapse. A detected collapse (the monitor's ``"collapsed"``
cause, not a ``"stalled"`` task loss) divides λ by ``backoff`` from then on.

The defaults (:data:`AUTO_FRACTION` = 0.3 for both forms, every 10 steps, smoothing 0.3, rise 3) are what the
multi-seed measurements in docs/priors.md ("Choosing λ") support. A measurement costs two ``autograd.grad`` calls
through the penalty's double-backward graph. Under DDP each rank measures on its own batch and the ranks fold the
mean of their log ratios into the same average, so that every rank trains with the same λ
(:class:`LamController`; the collective lives in :meth:`LamController.sync`, never in the penalty step).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from negspace.distributed import all_gather_object, gather_stack, is_distributed

__all__ = ["AUTO_EVERY", "AUTO_FRACTION", "LamController", "calibrate_lam", "check_lam", "grad_norm"]

AUTO_FRACTION = 0.3
AUTO_EVERY = 10


def _check_positive(name: str, value: object, finite: bool = True) -> None:
    if (isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value <= 0
            or (finite and not math.isfinite(value))):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}float > 0, got {value!r}")


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
    _check_positive("fraction", fraction)
    ps = [p for p in params if p.requires_grad]
    g_task = grad_norm(task_loss, ps) if task_loss.requires_grad else 0.0
    g_pen = grad_norm(penalty, ps) if penalty.requires_grad else 0.0
    lam = fraction * g_task / g_pen if g_pen > 0 and math.isfinite(g_pen) else None
    if sync and is_distributed():
        vals = [v for v in all_gather_object(lam) if v is not None]
        lam = sum(vals) / len(vals) if vals else None
    return lam


class LamController:
    """``lam="auto"``: λ from the gradient-norm ratio, recalibrated every ``every`` global steps, divided by
    ``backoff`` on every detected collapse, identical on every DDP rank. Pure torch; checkpointable (floats and
    ints only).

    λ = ``fraction · scale · exp(ē)`` where ``ē`` is an exponential moving average (weight ``smoothing`` for the
    newest value) of ``log(‖∇task‖ / ‖∇penalty‖)`` measured on the first penalised step and then every ``every``
    global steps (``every=0``: once), averaged over the ranks that measured; ``scale`` is ``backoff^-n`` after
    ``n`` flagged collapses. ``rise`` caps how far λ may rise above the smallest λ used so far (``1``: λ only
    falls; ``inf``: tracks the ratio both ways).

    Each rank calls :meth:`propose` on its penalised steps (a measurement when one is due, used locally at once)
    and :meth:`flag_collapse` when its monitor flags a collapse; :meth:`sync` is called on **every** rank after
    **every** training batch (also batches where a rank skipped the prior): it folds the ranks' mean measurement
    into ``ē`` and applies the back-off if any rank collapsed, with one small collective under DDP — never inside
    the penalty computation, so that a rank skipping its prior (``on_nan="skip"``, no mask) cannot deadlock the
    others.
    """

    def __init__(self, fraction: float = AUTO_FRACTION, backoff: float = 10.0, *, every: int = AUTO_EVERY,
                 smoothing: float = 0.3, rise: float = 3.0) -> None:
        _check_positive("auto_fraction", fraction)
        _check_positive("backoff", backoff)
        _check_positive("rise", rise, finite=False)
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0 (0: calibrate once), got {every!r}")
        if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be a float in (0, 1], got {smoothing!r}")
        if backoff < 1 or rise < 1:
            raise ValueError(f"backoff and rise must be >= 1, got backoff={backoff!r}, rise={rise!r}")
        self.fraction, self.backoff, self.every = float(fraction), float(backoff), int(every)
        self.smoothing, self.rise = float(smoothing), float(rise)
        self.lam, self.calibrated = 1.0, False
        self.log_ratio, self.scale, self.floor = 0.0, 1.0, math.inf
        self.next_step, self.measurements = 0, 0
        self._candidate: float | None = None
        self._step = -1
        self._collapsed = False

    def _value(self, log_ratio: float) -> float:
        """λ for the smoothed log ratio (before the back-off scale), with the ``rise`` cap."""
        return min(self.fraction * math.exp(log_ratio), self.floor * self.rise)

    def _blend(self, log_ratio: float) -> float:
        return log_ratio if not self.calibrated else (1 - self.smoothing) * self.log_ratio + self.smoothing * log_ratio

    def due(self, step: int) -> bool:
        """Whether :meth:`propose` measures at global step ``step``."""
        return not self.calibrated or (self.every > 0 and step >= self.next_step)

    def propose(self, task_loss: Tensor, penalty: Tensor, params: Iterable[nn.Parameter], step: int = 0) -> float | None:
        """Called on every penalised step (``step`` = ``trainer.global_step``). When a measurement is due (the
        first penalised step, then every ``every`` steps): two extra ``autograd.grad`` calls, and this rank's new λ,
        adopted locally for this step; otherwise ``None`` and nothing is computed. Also ``None`` when the penalty
        or the task loss has no gradient (a batch without masks)."""
        if not self.due(step):
            return None
        ratio = calibrate_lam(task_loss, penalty, params, 1.0, sync=False)
        if ratio is None or not ratio > 0 or not math.isfinite(ratio):
            return None
        self._candidate, self._step = math.log(ratio), int(step)
        self.lam = self._value(self._blend(self._candidate)) * self.scale
        return self.lam

    def flag_collapse(self) -> None:
        """This rank's monitor flagged a collapse: back off at the next :meth:`sync`."""
        self._collapsed = True

    def sync(self) -> float:
        """Agree on λ across ranks (the mean of the ranks' measurements of this batch folded into the average;
        back-off if any rank collapsed); returns the λ every rank uses from the next step on."""
        cand = self._candidate
        local = torch.tensor([0.0 if cand is None else cand, float(cand is not None), float(self._collapsed),
                              float(self._step)], dtype=torch.float64)
        rows = gather_stack(local) if is_distributed() else local[None]
        total, step = rows[:, :3].sum(0), int(rows[:, 3].max())
        if total[1] > 0:
            self.log_ratio = self._blend(float(total[0] / total[1]))
            self.calibrated, self.next_step = True, step + self.every
            self.measurements += 1
            self.floor = min(self.floor, self._value(self.log_ratio))
        if total[2] > 0:
            self.scale /= self.backoff
        self.lam = (self._value(self.log_ratio) if self.calibrated else 1.0) * self.scale
        self._candidate, self._collapsed, self._step = None, False, -1
        return self.lam

    def state_dict(self) -> dict[str, float | int]:
        return {"lam": float(self.lam), "calibrated": int(self.calibrated), "log_ratio": float(self.log_ratio),
                "scale": float(self.scale), "floor": float(self.floor), "next_step": int(self.next_step),
                "measurements": int(self.measurements)}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.lam, self.calibrated = float(state.get("lam", self.lam)), bool(state.get("calibrated", 0))
        self.scale = float(state.get("scale", 1.0 if self.calibrated else self.lam))  # old: a back-off before calibration
        if "log_ratio" in state:
            self.log_ratio = float(state["log_ratio"])
        elif self.calibrated:  # a checkpoint of the calibrate-once controller: keep its λ
            self.log_ratio = math.log(self.lam / (self.fraction * self.scale))
        self.floor = float(state.get("floor", self._value(self.log_ratio) if self.calibrated else math.inf))
        self.next_step, self.measurements = int(state.get("next_step", 0)), int(state.get("measurements", 0))
