"""Image selection (paper 001 §§3–4, 6): MEIs / MIIs, maximally tense images (MTIs), their two subtypes
(separated / co-located, §3) and the uniqueness ``U`` of eq. 6."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from negspace.explain.tension._common import check_pos_int
from negspace.explain.tension.stats import TensionResult
from negspace.stats import pearson

__all__ = ["MTI_SUBTYPES", "mti_subtypes", "select_images", "select_mti", "uniqueness"]

#: the two MTI subtypes of paper 001 §3 (Fig. 4 e, f)
MTI_SUBTYPES = ("separated", "colocated")
#: below this Pearson(f_v, E_l) the attribution does not add up to the feature and MTIs selected by ‖S_l‖ mean little
MIN_COMPLETENESS = 0.8


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


def select_mti(
    result: TensionResult,
    k: int = 10,
    *,
    balance: float = 0.5,
    norm: str = "l1",
    subtype: str | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
    warn: bool = True,
) -> Tensor:
    """MTIs: the ``k`` images with the largest ``‖S_l‖`` (``norm="l1"|"l2"``) subject to
    ``−balance·σ(f_v(X)) < f_v(x) < 0`` (paper 001 §4), so that excitation and inhibition cancel;
    ``subtype="separated"|"colocated"`` keeps only that subtype (:func:`mti_subtypes`).

    Returns a LongTensor of at most ``k`` indices. Warns once (``warn=False`` silences it) when the selection
    is empty (e.g. a post-ReLU feature: pick a pre-activation layer) or when ``Pearson(f_v, E_l) < 0.8``
    (the attribution is not complete, so ``‖S_l‖`` does not measure tension).
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if not isinstance(balance, int | float) or balance <= 0:
        raise ValueError(f"balance must be a positive number, got {balance!r}")
    sigma = float(result.f.std()) if result.f.numel() > 1 else 0.0
    mask = (result.f > -balance * sigma) & (result.f < 0)
    if subtype is not None:
        mask = mask & mti_subtypes(result, percentiles=percentiles)[_check_subtype(subtype)]
    idx = select_images(result.l1 if norm == "l1" else result.l2, k, mask=mask)
    if warn:
        _warn_meaningless(result, len(idx), balance, subtype)
    return idx


def _check_subtype(subtype: object) -> str:
    if subtype not in MTI_SUBTYPES:
        raise ValueError(f"subtype must be one of {MTI_SUBTYPES} or None, got {subtype!r}")
    return str(subtype)


def _warn_meaningless(result: TensionResult, n: int, balance: float, subtype: str | None) -> None:
    """One warning naming the fix when the MTI selection is empty or rests on an incomplete attribution."""
    r = float("nan") if result.f.numel() < 3 else pearson(result.f, result.e)
    problems = []
    if n == 0:
        problems.append(
            f"no image satisfies -{balance:g}·σ(f_v) < f_v < 0{' and subtype ' + repr(subtype) if subtype else ''} "
            f"(f_v ranges {float(result.f.min()):.3g}..{float(result.f.max()):.3g}): use a pre-activation layer for "
            "the feature, a larger balance=, or more images"
        )
    if not r >= MIN_COMPLETENESS:
        problems.append(
            f"Pearson(f_v, E_l) = {r:.2f} < {MIN_COMPLETENESS}: the attribution does not add up to the feature, so "
            "‖S_l‖ is no measure of tension (paper 001 §2): attribute to a later layer (not pixels), avoid "
            "BatchNorm between the layers, or check completeness_correlation()"
        )
    if problems:
        warnings.warn("select_mti: " + "; ".join(problems), UserWarning, stacklevel=3)


def mti_subtypes(result: TensionResult, *, percentiles: tuple[float, float] = (1.0, 99.0)) -> dict[str, Tensor]:
    """Paper 001 §3 (Fig. 4 e, f): which images excite and inhibit at different places or at the same place.

    With ``P_lo``/``P_hi`` the percentiles of the maps' values over all images and positions:
    ``"separated"``: ``φ⁺ − φ⁻`` has values ``< P_lo`` and ``> P_hi`` (of ``φ⁺ − φ⁻``);
    ``"colocated"``: at some position both ``φ⁺ > P_hi(φ⁺)`` and ``φ⁻ > P_hi(φ⁻)``.
    Returns ``{"separated": (N,) bool, "colocated": (N,) bool}``; needs φ maps (a conv or token layer).
    """
    if result.phi_plus is None or result.phi_minus is None:
        raise ValueError("mti_subtypes needs φ maps: attribute to a convolutional or token layer (or pixels)")
    lo, hi = percentiles
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"percentiles must be (low, high) with 0 <= low < high <= 100, got {percentiles!r}")
    p, m = result.phi_plus.detach().double().flatten(1), result.phi_minus.detach().double().flatten(1)
    d = p - m
    q = torch.tensor([lo / 100, hi / 100], dtype=torch.float64)
    d_lo, d_hi = torch.quantile(d.flatten(), q).tolist()
    p_hi = float(torch.quantile(p.flatten(), q[1]))
    m_hi = float(torch.quantile(m.flatten(), q[1]))
    separated = (d < d_lo).any(1) & (d > d_hi).any(1)
    colocated = ((p > p_hi) & (m > m_hi)).any(1)
    return {"separated": separated, "colocated": colocated}


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
