"""Image selection (paper 001 §4): MEIs / MIIs, maximally tense images (MTIs) and the uniqueness ``U`` of eq. 6."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from negspace.explain.tension._common import check_pos_int
from negspace.explain.tension.stats import TensionResult

__all__ = ["select_images", "select_mti", "uniqueness"]


def select_images(values: Tensor, k: int, *, largest: bool = True, mask: Tensor | None = None) -> Tensor:
    """Indices of the ``k`` largest (smallest) ``values: (N,)`` among ``mask`` (MEIs: ``f``, MIIs: ``largest=False``)."""
    check_pos_int(k, "k")
    v = values.detach().double().clone()
    fill = -math.inf if largest else math.inf
    if mask is not None:
        v[~mask] = fill
    n_ok = int(torch.isfinite(v).sum())
    order = v.argsort(descending=largest)
    return order[: min(k, n_ok)]


def select_mti(result: TensionResult, k: int = 10, *, balance: float = 0.5, norm: str = "l1") -> Tensor:
    """MTIs: the ``k`` images with the largest ``‖S_l‖`` (``norm="l1"|"l2"``) subject to
    ``−balance·σ(f_v(X)) < f_v(x) < 0`` (paper 001 §4), so that excitation and inhibition cancel.

    Returns a LongTensor of at most ``k`` indices (empty when no image satisfies the constraint, e.g. for a
    post-ReLU feature: pick a pre-activation layer).
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if not isinstance(balance, int | float) or balance <= 0:
        raise ValueError(f"balance must be a positive number, got {balance!r}")
    sigma = float(result.f.std()) if result.f.numel() > 1 else 0.0
    mask = (result.f > -balance * sigma) & (result.f < 0)
    return select_images(result.l1 if norm == "l1" else result.l2, k, mask=mask)


def uniqueness(selections: Sequence[Sequence[int] | Tensor]) -> float:
    """``U = |∪_i X_i| / (n m)`` (paper 001, eq. 6) for ``n`` selections of ``m`` distinct images each; ``1/n ≤ U ≤ 1``."""
    if isinstance(selections, Tensor):
        selections = list(selections)
    if not isinstance(selections, Sequence) or len(selections) == 0:
        raise ValueError("selections must be a non-empty list of index sets (one per feature)")
    sets = [torch.as_tensor(s).flatten().tolist() for s in selections]
    m = len(sets[0])
    if m == 0 or any(len(s) != m for s in sets):
        raise ValueError(f"every selection must hold the same number m >= 1 of images, got sizes {[len(s) for s in sets]}")
    for i, s in enumerate(sets):
        if len(set(s)) != m:
            raise ValueError(f"selection {i} contains repeated images: {s}")
    union = set().union(*map(set, sets))
    return len(union) / (len(sets) * m)
