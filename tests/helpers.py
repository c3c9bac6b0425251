"""Test-only helpers (not shipped in the package)."""

from __future__ import annotations

import socket

from torch import nn


def free_port() -> int:
    """A TCP port that is free on localhost now (for ``MASTER_PORT`` of gloo test process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
