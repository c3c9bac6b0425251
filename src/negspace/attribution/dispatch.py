"""The one method-name dispatch for input attributions: ``"input_x_gradient" | "integrated_gradients"``.

Priors, reports and the demo name the attribution method with a string (YAML-expressible); this module turns
the name into the call, so the list of names and the error for a wrong one exist once.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from negspace.attribution.input import input_x_gradient, integrated_gradients
from negspace.objectives import Target

__all__ = ["ATTRIBUTION_METHODS", "attribute", "check_method"]

#: input-attribution methods by name (``layer_contributions`` has its own ``METHODS`` for hidden units)
ATTRIBUTION_METHODS: tuple[str, ...] = ("input_x_gradient", "integrated_gradients")


def check_method(method: object, name: str = "method") -> str:
    """Return ``method`` if it is one of :data:`ATTRIBUTION_METHODS`, else raise a ``ValueError``."""
    if not isinstance(method, str) or method not in ATTRIBUTION_METHODS:
        raise ValueError(f"{name} must be one of {list(ATTRIBUTION_METHODS)}, got {method!r}")
    return method


def attribute(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    target: Target,
    *,
    method: str = "input_x_gradient",
    create_graph: bool = False,
    baseline: float | Tensor | None = None,
    n_steps: int = 32,
    internal_batch_size: int | None = None,
) -> Tensor:
    """Input attribution of ``target`` by the method called ``method``.

    ``x: (B, ...)``; ``target`` as in :func:`input_x_gradient` (int, ``(B,)``, ``(B, K)`` or an objective).
    ``baseline``, ``n_steps`` and ``internal_batch_size`` are used by ``"integrated_gradients"`` only.

    Returns:
        ``(B, ...)`` like ``x``, or ``(B, K, ...)`` for ``(B, K)`` targets.
    """
    if check_method(method) == "input_x_gradient":
        return input_x_gradient(model, x, target, create_graph=create_graph)
    return integrated_gradients(
        model,
        x,
        target,
        baseline=baseline,
        n_steps=n_steps,
        create_graph=create_graph,
        internal_batch_size=internal_batch_size,
    )
