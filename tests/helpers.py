"""Test-only helpers (not shipped in the package)."""

from __future__ import annotations

from torch import nn


def hook_count(model: nn.Module) -> int:
    """Number of forward/backward hooks currently registered anywhere in ``model``."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        total += len(getattr(m, "_backward_pre_hooks", {}))
    return total


def is_wrapped(module: nn.Module) -> bool:
    """True while an AttributionPrior wrapper is installed on ``module``."""
    return "_negspace_attribution_priors" in module.__dict__
