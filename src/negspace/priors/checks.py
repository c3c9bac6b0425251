"""Checks of the prior's inputs and options: masks, labels, mode/method/non-target/n_steps."""

from __future__ import annotations

import torch
from torch import Tensor

from negspace.attribution.dispatch import ATTRIBUTION_METHODS, check_method
from negspace.priors.calibration import check_lam
from negspace.priors.targets import parse_non_target

__all__ = ["METHODS", "MODES", "NORM_MODES", "check_attribution_batch", "check_callback_options", "check_labels", "check_mask", "check_normalize", "check_options"]

MODES = ("presence", "presence_absence")
METHODS = ATTRIBUTION_METHODS
NORM_MODES = ("auto", "shared", "eval", "separate")  # BatchNorm semantics, see negspace.priors.shared
NORMALIZES = ("mask", "fraction")  # Σ|A·P| / (ΣP + 1e-5) (paper) or Σ|A·P| / (Σ|A| + 1e-5) (scale-free)


def check_normalize(normalize: object) -> str:
    """``normalize`` of the prior term: ``"mask"`` (paper 000) or ``"fraction"`` (scale-free)."""
    if not isinstance(normalize, str) or normalize not in NORMALIZES:
        raise ValueError(f"normalize must be one of {NORMALIZES}, got {normalize!r}")
    return normalize


def check_mask(mask: object, x: Tensor, name: str = "mask") -> Tensor:
    """Validate ``mask`` against the image batch ``x: (B, C, *S)`` and return it as ``(B, 1, *S)``.

    Accepted: any shape that broadcasts to ``(B, 1, *S)`` (e.g. ``(B, 1, H, W)``, ``(1, H, W)``,
    ``(H, W)``), and ``(B, *S)`` (a channel axis is inserted). Values must be finite and in [0, 1];
    bool and integer masks are converted to ``x.dtype``.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor broadcastable to (B, 1, H, W), got {type(mask).__name__}")
    if x.dim() < 3:
        raise ValueError(f"x must be a batch of images (B, C, H, W) for a {name}, got shape {tuple(x.shape)}")
    target = (x.shape[0], 1, *x.shape[2:])
    m = mask
    if m.dim() == x.dim() - 1 and m.shape[0] == x.shape[0] and tuple(m.shape[1:]) == tuple(x.shape[2:]):
        m = m.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    try:
        m = torch.broadcast_to(m, target)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to (B, 1, H, W) = {target} of the image "
            f"batch x {tuple(x.shape)}; use one mask channel, e.g. shape (B, 1, H, W) or (B, H, W)"
        ) from None
    if m.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {m.dtype}")
    m = m.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    if m.numel():
        if not torch.isfinite(m).all():
            raise ValueError(f"{name} contains NaN or inf; it must hold values in [0, 1]")
        lo, hi = float(m.min()), float(m.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} values must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    return m


def check_labels(y: object, batch: int) -> Tensor:
    """``y``: integer class indices ``(B,)`` (or ``(B, 1)``) → LongTensor ``(B,)``."""
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a LongTensor of class indices (B,), got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"y must have shape (B,) = ({batch},), got {tuple(y.shape)}")
    return y.long()


def check_options(mode: object, method: object, non_target: object, n_steps: object) -> tuple[str, int]:
    """Validate the prior's options; return the parsed ``non_target`` as ``(kind, K)``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_method(method)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    return parse_non_target(non_target)


def check_attribution_batch(attribution_batch: object) -> int | None:
    """``None`` or a positive int (the number of masked samples attributed per batch)."""
    if attribution_batch is not None and (
        isinstance(attribution_batch, bool) or not isinstance(attribution_batch, int) or attribution_batch < 1
    ):
        raise ValueError(f"attribution_batch must be None or a positive int, got {attribution_batch!r}")
    return attribution_batch


def check_callback_options(
    *, lam: object, start_step: object, on_nan: object, name: object, forward: object, norm_mode: object,
    method: object, attribution_batch: object = None,
) -> None:
    """The ``AttributionPrior`` keywords beyond :func:`check_options` (errors name argument, allowed, received)."""
    check_lam(lam)
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
    if on_nan not in ("raise", "skip"):
        raise ValueError(f"on_nan must be 'raise' or 'skip', got {on_nan!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if forward is not None and not isinstance(forward, str) and not callable(forward):
        raise TypeError(
            f"forward must be None, a dotted attribute path or a callable (module, x) -> logits, got {forward!r}"
        )
    if not isinstance(norm_mode, str) or norm_mode not in NORM_MODES:
        raise ValueError(f"norm_mode must be one of {NORM_MODES}, got {norm_mode!r}")
    if norm_mode == "shared" and method != "input_x_gradient":
        raise ValueError(
            "norm_mode='shared' (share_forward=True) differentiates the training forward's logits and needs "
            f"method='input_x_gradient', got method={method!r}; use norm_mode='eval' or 'separate' with "
            "integrated gradients"
        )
    check_attribution_batch(attribution_batch)
