"""Presence / presence+absence attribution priors (paper 000, appendix B.4, eqs. 2 and 3). Pure torch.

* :mod:`.loss` — the eq. 2/3 term (:func:`attribution_prior`), :func:`prior_loss`, :func:`compute_prior`,
  :func:`compute_prior_from_logits` (shared forward), :class:`PriorResult`;
* :mod:`.targets` — the one non-target class choice (``complement | all | top:K | sample:K``);
* :mod:`.checks` — mask, label and option checks;
* :mod:`.rightreasons` — the literature's mask-based losses as ``loss=`` options (RRR, RRR-GradCAM);
* :mod:`.monitor` — collapse / no-effect detection (:class:`PriorMonitor`);
* :mod:`.calibration` — ``lam="auto"`` (:func:`calibrate_lam`: λ from the gradient-norm ratio;
  :class:`LamController`: calibration, back-off and DDP agreement);
* :mod:`.shared` — what :class:`negspace.callbacks.AttributionPrior` decides and computes without Lightning
  (attributed model, λ schedules, the BatchNorm semantics ``norm_mode`` and the per-step plan, the shared
  forward, one penalised step).

BatchNorm protection is :func:`negspace.hooks.frozen_norm_stats` (also exported here).
"""

from __future__ import annotations

from negspace._lazy import attach

# public name -> submodule of this package that defines it
_LAZY: dict[str, str] = {
    "EPS": "loss",
    "PriorResult": "loss",
    "attribution_prior": "loss",
    "compute_prior": "loss",
    "compute_prior_from_logits": "loss",
    "prior_loss": "loss",
    "masked_index": "loss",
    "METHODS": "checks",
    "MODES": "checks",
    "NORM_MODES": "checks",
    "check_attribution_batch": "checks",
    "check_callback_options": "checks",
    "check_labels": "checks",
    "check_mask": "checks",
    "check_options": "checks",
    "NON_TARGETS": "targets",
    "non_target_classes": "targets",
    "parse_non_target": "targets",
    "target_and_other": "targets",
    "LogitsOf": "shared",
    "eval_norms": "shared",
    "forward_error": "shared",
    "install_step_wrapper": "shared",
    "uninstall_step_wrapper": "shared",
    "plan_step": "shared",
    "attributed_model": "shared",
    "capture_training_forward": "shared",
    "parse_schedule": "shared",
    "penalty_step": "shared",
    "samples_independent": "shared",
    "shared_input": "shared",
    "twice_differentiable_attention": "shared",
    "LOSSES": "rightreasons",
    "check_loss": "rightreasons",
    "gradcam_map": "rightreasons",
    "right_reason_prior": "rightreasons",
    "rrr_gradcam_penalty": "rightreasons",
    "rrr_penalty": "rightreasons",
    "frozen_norm_stats": "negspace.hooks",
    "NORMALIZES": "checks",
    "check_normalize": "checks",
    "PriorMonitor": "monitor",
    "step_signals": "monitor",
    "AUTO_FRACTION": "calibration",
    "AUTO_EVERY": "calibration",
    "LamController": "calibration",
    "calibrate_lam": "calibration",
    "check_lam": "calibration",
    "grad_norm": "calibration",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
