"""Statistics shared by every method: Pearson correlation (one NaN rule), k-means, PCA dimensionality.

The NaN rule: a correlation with a constant (zero-variance) side is undefined and returned as ``NaN``,
never silently as 0 or 1. Callers that need a number for ranking say so explicitly, e.g.
``torch.nan_to_num(pearson_columns(a, b), nan=0.0)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["kmeans", "pca_dimensionality", "pearson", "pearson_columns", "pearson_rows"]

_TINY = 1e-300


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two flattened tensors of equal size (float64 inside); ``NaN`` if either is constant."""
    if a.numel() != b.numel():
        raise ValueError(f"pearson: a and b must have the same number of entries, got {a.numel()} and {b.numel()}")
    a = a.detach().flatten().double()
    b = b.detach().flatten().double().to(a.device)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > _TINY else float("nan")


def pearson_columns(a: Tensor, b: Tensor) -> Tensor:
    """Correlation of every column of ``a: (N, P)`` with every column of ``b: (N, Q)`` → ``(P, Q)`` float32.

    Entries with a constant column are ``NaN``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"pearson_columns: need (N, P) and (N, Q), got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a.detach().double()
    b = b.detach().double().to(a.device)
    a, b = a - a.mean(0), b - b.mean(0)
    den = a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :]
    r = (a.T @ b) / den.clamp_min(_TINY)
    return torch.where(den > _TINY, r, torch.full_like(r, float("nan"))).float()


def pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise correlation of ``a, b: (R, N)`` → ``(R,)`` float32 (``NaN`` for constant rows)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"pearson_rows: need two (R, N) tensors of equal shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    a = a.detach().double()
    b = b.detach().double().to(a.device)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    r = (a * b).sum(1) / den.clamp_min(_TINY)
    return torch.where(den > _TINY, r, torch.full_like(r, float("nan"))).float()


def kmeans(x: Tensor, k: int, *, seed: int = 0, n_init: int = 10) -> tuple[Tensor, Tensor]:
    """scikit-learn k-means of ``x: (N, D)`` → ``(labels (N,) long, centroids (k, D) float32)``."""
    from sklearn.cluster import KMeans

    if x.dim() != 2:
        raise ValueError(f"kmeans: x must be (N, D), got {tuple(x.shape)}")
    if not (isinstance(k, int) and 1 <= k <= x.shape[0]):
        raise ValueError(f"kmeans: need 1 <= k <= N={x.shape[0]}, got k={k!r}")
    bad = (~torch.isfinite(x)).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"kmeans: x contains NaN or inf in rows {bad[:10]}{'...' if len(bad) > 10 else ''}")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x.detach().double().cpu().numpy())
    return torch.as_tensor(km.labels_, dtype=torch.long), torch.as_tensor(km.cluster_centers_, dtype=torch.float32)


def pca_dimensionality(x: Tensor, variance: float = 0.95) -> int:
    """Number of principal components that explain ``variance`` of ``x: (N, D)`` (0 for constant data)."""
    from sklearn.decomposition import PCA

    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be (N, D) with N >= 2, got {tuple(x.shape)}")
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must be in (0, 1], got {variance!r}")
    ratios = PCA().fit(x.detach().double().cpu().numpy()).explained_variance_ratio_
    if not np.isfinite(ratios).all() or ratios.sum() == 0:
        return 0
    return int(np.searchsorted(np.cumsum(ratios), variance - 1e-12) + 1)
