"""Evaluation of PURE virtual neurons (paper 004, §4 and A.1): attribution-cropped reference samples,
image embeddings (open_clip by default; anything with ``encode_image``), inter/intra-cluster distances,
the activation-clustering baseline and the distance-correlation analysis.

Feature visualisations (A.1): the neuron's spatial max is attributed to the input (here input×gradient,
the Grad×Act rule PURE uses for circuits, instead of the paper's LRP), the heatmap is summed over colour
channels, its positive part smoothed with a Gaussian of size ``K`` (default 5) and normalised to a
maximum of one; the image is cropped to the *squared* bounding box of the pixels above ``T`` (default
0.01) and resized for the embedding model. No masking (as for the paper's CLIP evaluation).

Distances (eqs. 4–5): ``D_ij = ‖e_i − e_j‖₂``; for cluster labels ``c``:
``ρ_intra = mean_{i≠j, c_i=c_j} D_ij``, ``ρ_inter = mean_{c_i≠c_j} D_ij``; polysemanticity score =
``ρ_inter − ρ_intra`` (k-means with k=2 on the embeddings themselves, §4.1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.attribution import input_x_gradient
from negspace.editing.pure import eval_mode, inter_intra
from negspace.hooks import capture, run_until
from negspace.objectives import neuron
from negspace.reduce import channels_last as _channels_last
from negspace.reduce import reduce_positions as _reduce_space

__all__ = [
    "activation_clustering",
    "activation_vectors",
    "attribution_heatmaps",
    "cluster_distances",
    "compare_clusterings",
    "crop_boxes",
    "crop_references",
    "distance_correlation",
    "embed",
    "gaussian_smooth",
    "polysemanticity",
    "reference_images",
]


def _per_sample(neurons: int | Tensor, b: int) -> int | Tensor:
    if isinstance(neurons, bool) or not isinstance(neurons, int | Tensor):
        raise TypeError(f"neurons must be an int or a LongTensor (B,), got {type(neurons).__name__}")
    if isinstance(neurons, Tensor):
        if neurons.is_floating_point() or neurons.dim() != 1 or neurons.shape[0] != b:
            raise ValueError(f"neurons must be an int or a LongTensor of shape ({b},), got {neurons.dtype} {tuple(neurons.shape)}")
        return neurons.long()
    return neurons


def attribution_heatmaps(model: nn.Module, layer: str, x: Tensor, neurons: int | Tensor, *, reduce: str = "max") -> Tensor:
    """Input×gradient of the neuron's spatially reduced activation, summed over channels: ``(B, H, W)``.

    ``neurons``: one int for all samples or a LongTensor ``(B,)`` (each sample explains its own neuron).
    """
    obj = neuron(layer, _per_sample(neurons, x.shape[0]), reduce=reduce)
    with eval_mode(model):
        attr = input_x_gradient(model, x, obj)
    return attr.sum(dim=1)


def gaussian_smooth(maps: Tensor, kernel_size: int = 5) -> Tensor:
    """Gaussian blur of ``maps: (B, H, W)`` with an odd ``kernel_size`` and ``σ = 0.3((K−1)/2 − 1) + 0.8``.

    Written here (not torchvision's ``gaussian_blur``) because reflect padding fails when ``K`` exceeds
    the map size (the paper's plots use K=51); we pad by edge replication.
    """
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    if kernel_size == 1:
        return maps
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    m = maps[:, None]
    m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))
    return m[:, 0]


def crop_boxes(heatmaps: Tensor, *, kernel_size: int = 5, threshold: float = 0.01) -> Tensor:
    """Squared bounding boxes ``(B, 3)`` = ``(top, left, side)`` of the smoothed, max-normalised positive
    heatmap above ``threshold``. An all-zero heatmap gives the largest centred square."""
    if heatmaps.dim() != 3:
        raise ValueError(f"heatmaps must be (B, H, W), got {tuple(heatmaps.shape)}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    h, w = heatmaps.shape[-2:]
    sm = gaussian_smooth(heatmaps.clamp_min(0).float(), kernel_size)
    peak = sm.flatten(1).max(dim=1).values
    boxes = []
    for m, p in zip(sm, peak):
        mask = m / p > threshold if p > 0 else torch.ones_like(m, dtype=torch.bool)
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
        side = min(max(r1 - r0 + 1, c1 - c0 + 1), h, w)
        top = min(max((r0 + r1 + 1) // 2 - side // 2, 0), h - side)
        left = min(max((c0 + c1 + 1) // 2 - side // 2, 0), w - side)
        boxes.append((top, left, side))
    return torch.tensor(boxes, dtype=torch.long)


def crop_references(
    model: nn.Module,
    layer: str,
    x: Tensor,
    neurons: int | Tensor,
    *,
    kernel_size: int = 5,
    threshold: float = 0.01,
    size: int | None = None,
    reduce: str = "max",
) -> Tensor:
    """Attribution-cropped feature visualisations (paper 004, A.1): ``x (B, C, H, W) → (B, C, size, size)``.

    ``size=None`` keeps ``H``. Crops are taken from ``x`` as given (de-normalise before embedding if needed).
    """
    heat = attribution_heatmaps(model, layer, x, neurons, reduce=reduce).detach()
    boxes = crop_boxes(heat, kernel_size=kernel_size, threshold=threshold)
    size = x.shape[-2] if size is None else size
    out = []
    for img, (t, left, s) in zip(x.detach(), boxes.tolist()):
        crop = img[None, :, t : t + s, left : left + s]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=s > size))
    return torch.cat(out)


def _clip_preprocess(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """Resize to the model's image size and normalise with its mean/std (open_clip ``preprocess_cfg``)."""
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(getattr(model, "visual", None), "image_size", None))
    mean, std = cfg.get("mean"), cfg.get("std")

    def prep(x: Tensor) -> Tensor:
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            if tuple(x.shape[-2:]) != hw:
                x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        if mean is not None and std is not None:
            x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        return x

    return prep


def embed(
    images: Tensor,
    encoder: nn.Module | str = "ViT-B-32",
    *,
    pretrained: str | None = None,
    preprocess: Callable[[Tensor], Tensor] | str | None = "auto",
    batch_size: int = 64,
) -> Tensor:
    """L2-normalised image embeddings ``(N, E)`` of ``images (N, 3, H, W)`` in ``[0, 1]``.

    ``encoder``: a model with ``encode_image`` (e.g. from :func:`negspace.models.clip.load_clip`) or an
    open_clip name loaded with ``load_clip(encoder, pretrained)`` (random weights unless ``pretrained``).
    ``preprocess="auto"`` resizes to the model's image size and applies its mean/std; ``None`` = as is.
    """
    from negspace.models.clip import encode_images, load_clip

    if isinstance(encoder, str):
        encoder = load_clip(encoder, pretrained=pretrained)[0]
    if not hasattr(encoder, "encode_image"):
        raise TypeError(f"encoder must have encode_image (an open_clip model) or be a name, got {type(encoder).__name__}")
    if preprocess == "auto":
        preprocess = _clip_preprocess(encoder)
    elif preprocess is not None and not callable(preprocess):
        raise TypeError(f"preprocess must be 'auto', None or a callable, got {preprocess!r}")
    x = images.detach().float().cpu()
    x = preprocess(x) if preprocess is not None else x
    return encode_images(encoder, x, batch_size=batch_size)


def _pairwise(x: Tensor) -> Tensor:
    x = x.detach().double().flatten(1)
    return torch.cdist(x, x)


def cluster_distances(embeddings: Tensor, labels: Tensor) -> tuple[float, float]:
    """``(ρ_inter, ρ_intra)`` of paper 004, eq. 5, with Euclidean distances of ``embeddings (N, E)``."""
    lab = torch.as_tensor(labels).flatten()
    if embeddings.dim() != 2 or lab.numel() != embeddings.shape[0]:
        raise ValueError(f"embeddings (N, E) and labels (N,) must match, got {tuple(embeddings.shape)}, {tuple(lab.shape)}")
    return inter_intra(embeddings, lab)


def _kmeans_labels(x: Tensor, k: int, seed: int) -> Tensor:
    from sklearn.cluster import KMeans

    if not isinstance(k, int) or k < 2 or k > x.shape[0]:
        raise ValueError(f"k must be an int in [2, n={x.shape[0]}], got {k!r}")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x.detach().double().flatten(1).numpy())
    return torch.as_tensor(km.labels_, dtype=torch.long)


def polysemanticity(embeddings: Tensor, labels: Tensor | None = None, *, k: int = 2, seed: int = 0) -> float:
    """``ρ_inter − ρ_intra``; ``labels=None`` clusters the embeddings themselves with k-means (paper §4.1)."""
    lab = _kmeans_labels(embeddings, k, seed) if labels is None else torch.as_tensor(labels)
    inter, intra = cluster_distances(embeddings, lab)
    return inter - intra


@torch.no_grad()
def activation_vectors(model: nn.Module, layer: str, x: Tensor, *, reduce: str = "max") -> Tensor:
    """Activations of all channels of ``layer`` reduced over space, ``(B, C)`` — the features of the
    activation-based baseline (O'Mahony et al., paper 004 §4.2)."""
    with eval_mode(model), capture(model, layer, detach=True, stop_after=True) as cap:
        run_until(model, x)
    act = cap[layer]
    return _reduce_space(_channels_last(act), reduce, act)


def activation_clustering(activations: Tensor, k: int = 2, *, seed: int = 0) -> Tensor:
    """Baseline: k-means labels ``(N,)`` of the reference samples' activation vectors ``(N, C)``."""
    return _kmeans_labels(activations, k, seed)


def distance_correlation(a: Tensor, b: Tensor, *, method: str = "pearson") -> float:
    """Correlation between the pairwise Euclidean distances of two representations of the same N samples
    (paper 004, Fig. 4 bottom left): e.g. CLIP embeddings of the crops vs PURE circuits or activations.

    Not Székely's distance correlation: the Pearson (or Spearman) correlation over the ``N(N−1)/2`` pairs.
    """
    from scipy.stats import pearsonr, spearmanr

    if a.shape[0] != b.shape[0] or a.shape[0] < 3:
        raise ValueError(f"a and b must describe the same N >= 3 samples, got {a.shape[0]} and {b.shape[0]}")
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    iu = torch.triu_indices(a.shape[0], a.shape[0], offset=1)
    da, db = _pairwise(a)[iu[0], iu[1]].numpy(), _pairwise(b)[iu[0], iu[1]].numpy()
    if np.ptp(da) == 0 or np.ptp(db) == 0:
        return float("nan")
    fn = pearsonr if method == "pearson" else spearmanr
    return float(fn(da, db)[0])


def compare_clusterings(
    embeddings: Tensor,
    circuits: Tensor,
    activations: Tensor,
    *,
    pure_labels: Tensor | None = None,
    k: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Paper 004 §4.2 for one neuron: CLIP inter/intra distances of the clusters found by PURE (circuits),
    by activations (baseline) and by the embeddings themselves (upper reference), and the correlation of
    pairwise distances with the embedding distances.

    Returns ``{"pure": {"inter", "intra", "score"}, "activation": {...}, "embedding": {...},
    "corr_pure": float, "corr_activation": float}`` (score = inter − intra).
    """
    lab = {
        "pure": _kmeans_labels(circuits, k, seed) if pure_labels is None else torch.as_tensor(pure_labels),
        "activation": activation_clustering(activations, k, seed=seed),
        "embedding": _kmeans_labels(embeddings, k, seed),
    }
    out: dict[str, Any] = {}
    for name, lb in lab.items():
        inter, intra = cluster_distances(embeddings, lb)
        out[name] = {"inter": inter, "intra": intra, "score": inter - intra}
    out["corr_pure"] = distance_correlation(embeddings, circuits)
    out["corr_activation"] = distance_correlation(embeddings, activations)
    return out


def reference_images(data: Any, indices: Sequence[int] | Tensor, *, batch_size: int = 64, image_key: str = "image") -> Tensor:
    """Collect the samples at ``indices`` (positions in the order ``data`` yields them) → ``(n, ...)``."""
    from negspace.editing.pure import iter_images

    idx = torch.as_tensor(indices, dtype=torch.long).flatten()
    if isinstance(data, Tensor):
        return data[idx]
    want = {int(i): p for p, i in enumerate(idx.tolist())}
    got: dict[int, Tensor] = {}
    seen = 0
    for x in iter_images(data, batch_size, image_key):
        for j in range(x.shape[0]):
            if seen + j in want:
                got[seen + j] = x[j]
        seen += x.shape[0]
        if len(got) == len(want):
            break
    missing = sorted(set(want) - set(got))
    if missing:
        raise ValueError(f"data has no samples at positions {missing[:10]} (it yielded {seen})")
    return torch.stack([got[int(i)] for i in idx.tolist()])
