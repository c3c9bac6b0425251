"""Feature attribution atlas (paper 001 §5): a global map of the ways images excite/inhibit one feature.

1. *Selection*: the images with the largest ``‖S_l‖₂`` (:func:`select_top_norm`);
2. *Layout*: a 2-D embedding of their attribution vectors — UMAP when ``umap-learn`` is importable (as in the
   paper), otherwise scikit-learn's PCA (default fallback, deterministic) or t-SNE;
3. *Coarse graining*: an ``n × n`` grid over the layout, attribution vectors averaged per cell;
4. *Icons*: each cell's average ``|S|`` inverted into an image with the dot·cos objective
   (:func:`negspace.explain.tension.attribution_inversion`), bordered by the icon's own ``f_v`` value;
   the figure (:func:`negspace.plots.tension_atlas_figure`) is saved as PNG on request.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from negspace.attribution.engine import forward_objective
from negspace.explain.tension.featureviz import attribution_inversion
from negspace.explain.tension.stats import Feature, as_feature

__all__ = ["Atlas", "attribution_atlas", "embed_2d", "grid_average", "select_top_norm"]


def select_top_norm(s: Tensor, n: int, *, norm: str = "l2") -> Tensor:
    """Indices of the ``n`` samples of ``s: (N, ...)`` with the largest ``‖S‖`` (``"l2"`` as in the paper, or ``"l1"``)."""
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    flat = s.flatten(1)
    v = flat.norm(dim=1) if norm == "l2" else flat.abs().sum(1)
    return v.argsort(descending=True)[: min(n, v.numel())]


def embed_2d(vectors: Tensor, *, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """``vectors: (N, D)`` → ``(N, 2)`` layout and the method used (``"auto"``: UMAP if installed, else PCA)."""
    methods = ("auto", "umap", "pca", "tsne")
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    v = vectors.detach().double().cpu().numpy()
    if v.shape[0] < 3:
        raise ValueError(f"an atlas needs at least 3 samples, got {v.shape[0]}")
    if method == "auto":
        method = "umap" if importlib.util.find_spec("umap") is not None else "pca"
    if method == "umap":
        if importlib.util.find_spec("umap") is None:
            raise ValueError("method='umap' needs the umap-learn package; use method='pca' or 'tsne'")
        import umap

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(v), "umap"
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (v.shape[0] - 1) // 3)))
        return TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(v), "tsne"
    from sklearn.decomposition import PCA

    if v.shape[1] < 2:
        return np.concatenate([v, np.zeros_like(v)], 1), "pca"
    return PCA(2, random_state=seed).fit_transform(v), "pca"


def grid_average(coords: np.ndarray, vectors: Tensor, grid: int, *, min_count: int = 1) -> dict[tuple[int, int], tuple[Tensor, int]]:
    """Average ``vectors (N, ...)`` over the cells of a ``grid × grid`` lattice laid over ``coords (N, 2)``.

    Returns ``{(row, col): (mean vector, count)}`` for cells holding at least ``min_count`` points.
    """
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    lo, hi = coords.min(0), coords.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    cell = np.clip(((coords - lo) / span * grid).astype(int), 0, grid - 1)
    out: dict[tuple[int, int], tuple[Tensor, int]] = {}
    for r in range(grid):
        for c in range(grid):
            sel = np.nonzero((cell[:, 1] == r) & (cell[:, 0] == c))[0]
            if len(sel) >= min_count:
                out[(r, c)] = (vectors[torch.as_tensor(sel)].mean(0), len(sel))
    return out


@dataclass
class Atlas:
    """``coords (N, 2)`` layout of the selected samples, ``index`` into the data, ``method`` used, ``cells``:
    ``{(row, col): (mean S, count)}``, ``icons``: ``{(row, col): image (C, H, W)}``, ``icon_values``: ``f_v`` of each icon."""

    coords: np.ndarray
    index: Tensor
    method: str
    cells: dict = field(repr=False)
    icons: dict = field(repr=False, default_factory=dict)
    icon_values: dict = field(default_factory=dict)
    path: str | None = None


def attribution_atlas(
    model: nn.Module,
    layer: str,
    attributions: Tensor,
    values: Tensor,
    feature: Feature,
    *,
    n_select: int = 1000,
    grid: int = 6,
    method: str = "auto",
    min_count: int = 2,
    icon_size: int | tuple[int, int] = 32,
    channels: int = 3,
    steps: int = 64,
    icons: bool = True,
    path: str | Path | None = None,
    seed: int = 0,
) -> Atlas:
    """Attribution atlas of ``feature`` from ``attributions = S_l (N, C, H, W)`` (or ``(N, C)``) and ``values = f_v (N,)``.

    The layout uses the spatially summed attribution vectors ``(N, C)``; icons invert each cell's mean ``|S|``
    (a channel vector) into an ``icon_size`` image. ``path``: where to save the PNG (scatter coloured by ``f_v``
    next to the icon grid).
    """
    feat = as_feature(model, feature)
    if attributions.shape[0] != values.shape[0]:
        raise ValueError(f"attributions ({attributions.shape[0]}) and values ({values.shape[0]}) differ in length")
    vec = attributions.flatten(2).sum(2) if attributions.dim() > 2 else attributions
    idx = select_top_norm(attributions, n_select)
    coords, used = embed_2d(vec[idx], method=method, seed=seed)
    cells = grid_average(coords, vec[idx], grid, min_count=min_count)
    atlas = Atlas(coords=coords, index=idx, method=used, cells=cells)
    if icons:
        for key, (mean_s, _) in cells.items():
            if float(mean_s.abs().sum()) == 0:
                continue
            img = attribution_inversion(model, layer, mean_s, sign="abs", size=icon_size, channels=channels,
                                        steps=steps, seed=seed)  # fmt: skip
            atlas.icons[key] = img[0]
            with torch.no_grad():
                atlas.icon_values[key] = float(forward_objective(model, img, feat)[0])
    if path is not None:
        atlas.path = str(_save(atlas, values[idx], grid, Path(path)))
    return atlas


def _save(atlas: Atlas, values: Tensor, grid: int, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from negspace.plots import tension_atlas_figure

    fig = tension_atlas_figure(atlas, values, grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
