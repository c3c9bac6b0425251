"""Is λ inside its useful window? Collapse and no-effect detection for the attribution prior. Pure torch.

The prior's strength λ has a narrow useful window that depends on the data, the architecture, the image scale
and the initialisation (docs/priors.md, "Choosing λ"). Outside it, training fails silently in two ways:

* **collapse** (λ too strong): the network stops depending on its input (a constant predictor, dead ReLUs).
  The input attributions shrink everywhere, so the penalty drops towards (or to exactly) 0, although no
  attribution moved *out of* the mask, and the task loss stays at its chance value. Detected when, for
  ``patience`` consecutive penalised steps, the total target attribution ``Σ|A|`` over the whole image is
  exactly 0, or at most ``1 / collapse_drop`` of its peak while the task loss (a running mean) has not fallen
  below ``(1 − loss_tol)`` times its first value (cause ``"collapsed"``); or when that task loss has not moved
  for ``stall`` penalised steps (cause ``"stalled"``: the scale-free form can pin a model at chance without
  shrinking its attributions, but a slow start looks the same, so ``lam="auto"`` backs off only on
  ``"collapsed"``). The logged ``collapsed`` flag is 1 for both causes, ``stalled`` for the second only.
* **no effect** (λ too weak): the attribution mass inside the mask stays high. Detected when, after ``warmup``
  penalised steps and for ``patience`` consecutive ones, the share of ``|A|`` inside the mask is at least
  ``mass_factor`` times the mask's area share (what a uniform attribution would put there) and
  ``λ·penalty / task loss < ratio_floor``. The ratio test is off by default (``ratio_floor=inf``): in our
  measurements (docs/priors.md, "Choosing λ") a prior without effect can reach a loss ratio of 0.5 — its
  gradient, not its value, is what is too small — so the mass alone is the reliable signal.

:class:`PriorMonitor` holds only counters and floats (checkpointable); :func:`step_signals` reads one
:class:`negspace.priors.PriorResult`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from negspace.priors.loss import PriorResult

__all__ = ["PriorMonitor", "step_signals"]


def step_signals(result: PriorResult) -> dict[str, float] | None:
    """Per-step statistics of the masked samples of one prior evaluation (``None`` if nothing was attributed).

    Returns ``{"penalty", "attr_total", "mass_in_mask", "mask_area"}``: the unweighted penalty, the mean total
    ``Σ|A|`` of the target attribution per sample, the mean share of ``|A|`` inside the mask, and the mean share
    of mask pixels (mass a uniform attribution would put inside the mask).
    """
    if result.attributions is None or result.index.numel() == 0:
        return None
    with torch.no_grad():
        a = result.attributions[:, 0].detach().abs().float()  # (M, C, H, W)
        m = result.mask.index_select(0, result.index).float()  # (M, 1, H, W)
        total = a.flatten(1).sum(1)  # (M,)
        inside = (a * m).flatten(1).sum(1)
        share = torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))
        area = m.flatten(1).mean(1)
    return {"penalty": float(result.loss.detach()), "attr_total": float(total.mean()),
            "mass_in_mask": float(share.mean()), "mask_area": float(area.mean())}


@dataclass
class PriorMonitor:
    """Watches the prior step by step and flags collapse / no effect (see the module docstring).

    ``update(signals, lam, task_loss)`` returns the metrics to log (``collapsed``, ``stalled`` and ``no_effect``
    as 0/1, ``ratio`` = ``λ·penalty / task loss``) and the causes newly detected (``"collapsed"``, ``"stalled"``,
    ``"no_effect"``); :meth:`message` names cause and fix.
    """

    patience: int = 20
    warmup: int = 50
    collapse_drop: float = 10.0
    loss_tol: float = 0.1
    stall: int = 100
    stuck_run: int = 0
    mass_factor: float = 3.0
    ratio_floor: float = math.inf
    steps: int = 0
    ref_total: float = -1.0
    first_loss: float = -1.0
    mean_loss: float = -1.0
    zero_run: int = 0
    weak_run: int = 0
    collapsed: bool = False
    vanished: bool = False
    stalled: bool = False
    no_effect: bool = False
    last: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("patience", "warmup", "stall"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "patience" else 0):
                raise ValueError(f"{key} must be an int >= {1 if key == 'patience' else 0}, got {v!r}")
        for key in ("collapse_drop", "loss_tol", "mass_factor", "ratio_floor"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) or v < 0:
                raise ValueError(f"{key} must be a float >= 0, got {v!r}")

    def update(self, signals: dict[str, float], lam: float, task_loss: float) -> tuple[dict[str, float], list[str]]:
        """One penalised step. ``signals`` from :func:`step_signals`; ``task_loss`` = the loss without the prior."""
        self.steps += 1
        total = signals["attr_total"]
        self.ref_total = max(self.ref_total, total)  # the peak input dependence
        if self.first_loss < 0:
            self.first_loss = self.mean_loss = task_loss
        self.mean_loss = 0.9 * self.mean_loss + 0.1 * task_loss
        stuck = self.mean_loss >= (1.0 - self.loss_tol) * self.first_loss
        self.stuck_run = self.stuck_run + 1 if stuck else 0
        vanished = total == 0.0 or (stuck and total * self.collapse_drop <= self.ref_total)
        self.zero_run = self.zero_run + 1 if vanished else 0
        ratio = lam * signals["penalty"] / task_loss if task_loss > 0 else math.inf
        weak = (signals["mass_in_mask"] >= self.mass_factor * signals["mask_area"] and ratio < self.ratio_floor)
        self.weak_run = self.weak_run + 1 if weak and self.steps > self.warmup else 0
        was = (self.vanished, self.stalled and not self.vanished, self.no_effect)
        self.vanished, self.stalled = self.zero_run >= self.patience, self.stuck_run >= self.stall
        self.collapsed, self.no_effect = self.vanished or self.stalled, self.weak_run >= self.patience
        self.last = {**signals, "lam": lam, "task_loss": task_loss, "ratio": ratio}
        now = (self.vanished, self.stalled and not self.vanished, self.no_effect)
        new = [k for k, before, after in zip(("collapsed", "stalled", "no_effect"), was, now, strict=True)
               if after and not before]
        metrics = {"collapsed": float(self.collapsed), "stalled": float(self.stalled),
                   "no_effect": float(self.no_effect), "ratio": ratio if math.isfinite(ratio) else 0.0}
        return metrics, new

    def message(self, cause: str) -> str:
        """The warning for ``cause`` (``"collapsed"``, ``"stalled"`` or ``"no_effect"``): what happened and what
        to do."""
        s = self.last
        if cause == "stalled":
            return (f"the model is stuck: its task loss has stayed at {self.mean_loss:.3g} (first step "
                    f"{self.first_loss:.3g}) for {self.stuck_run} penalised steps while its input attributions are "
                    f"intact (Σ|A| = {s.get('attr_total', 0.0):.3g}). Either lam={s.get('lam', 0.0):.3g} pins the model "
                    "at chance (the prior forbids the shortcut before the real cue is learnt: lower it 10x, start "
                    "later with start_step= or lam_schedule='linear:N', or train longer) or the task simply learns "
                    "slowly (then raise monitor={'stall': ...}); lam='auto' does not back off on this signal")
        if cause == "collapsed":
            return (f"the model collapsed: for {self.zero_run} penalised steps its input attributions shrank over "
                    f"the whole image (Σ|A| = {s.get('attr_total', 0.0):.3g}, peak {max(self.ref_total, 0.0):.3g}) "
                    f"while the task loss stayed at {self.mean_loss:.3g} (first step {self.first_loss:.3g}): the "
                    "penalty is small because the network ignores its input (a constant predictor), not because it "
                    f"ignores the mask. lam={s.get('lam', 0.0):.3g} is too strong for this data and model: lower it "
                    "10x, use lam='auto' or normalize='fraction', start later (start_step=, lam_schedule='linear:N'), "
                    "or find the window with `negspace sweep`")
        if cause == "no_effect":
            return (f"the prior has no effect: {100 * s.get('mass_in_mask', 0.0):.0f}% of the attribution stays "
                    f"inside the mask (a uniform attribution would put {100 * s.get('mask_area', 0.0):.0f}% there) "
                    f"while lam·penalty is only {s.get('ratio', 0.0):.2g} x the task loss for {self.weak_run} steps. "
                    f"lam={s.get('lam', 0.0):.3g} is too weak for this data and model: raise it 10x, use lam='auto' "
                    "or normalize='fraction', or find the window with `negspace sweep`")
        raise ValueError(f"cause must be 'collapsed', 'stalled' or 'no_effect', got {cause!r}")

    def state_dict(self) -> dict[str, Any]:
        """Counters and floats only (``weights_only=True`` loadable)."""
        return {"steps": self.steps, "ref_total": self.ref_total, "first_loss": self.first_loss,
                "mean_loss": self.mean_loss, "zero_run": self.zero_run, "stuck_run": self.stuck_run,
                "weak_run": self.weak_run, "collapsed": int(self.collapsed), "vanished": int(self.vanished),
                "stalled": int(self.stalled), "no_effect": int(self.no_effect)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.ref_total = int(state.get("steps", 0)), float(state.get("ref_total", -1.0))
        self.first_loss, self.mean_loss = float(state.get("first_loss", -1.0)), float(state.get("mean_loss", -1.0))
        self.zero_run, self.weak_run = int(state.get("zero_run", 0)), int(state.get("weak_run", 0))
        self.stuck_run = int(state.get("stuck_run", 0))
        self.collapsed, self.no_effect = bool(state.get("collapsed", 0)), bool(state.get("no_effect", 0))
        self.vanished = bool(state.get("vanished", self.zero_run >= self.patience))
        self.stalled = bool(state.get("stalled", self.stuck_run >= self.stall))
