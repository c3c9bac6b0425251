"""Evaluation of PURE virtual neurons (paper 004, §4): image embeddings of cropped references (open_clip by
default; anything with ``encode_image``), inter/intra-cluster distances, the activation-clustering baseline
and the distance-correlation analysis.

Distances (eqs. 4–5): ``D_ij = ‖e_i − e_j‖₂``; for cluster labels ``c``:
``ρ_intra = mean_{i≠j, c_i=c_j} D_ij``, ``ρ_inter = mean_{c_i≠c_j} D_ij``; polysemanticity score =
``ρ_inter − ρ_intra`` (k-means with k=2 on the embeddings themselves, §4.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from negspace.batch import Data
from negspace.explain.pure.circuit import circuits
from negspace.explain.pure.crops import crop_references
from negspace.explain.pure.references import reference_images
from negspace.explain.pure.virtual import VirtualNeuronSet, inter_intra
from negspace.hooks import capture, eval_mode, model_device, run_until
from negspace.reduce import summarize
from negspace.stats import kmeans, pearson

__all__ = [
    "NeuronReport",
    "activation_clustering",
    "activation_vectors",
    "cluster_distances",
    "compare_clusterings",
    "distance_correlation",
    "embed",
    "evaluate_virtual_neurons",
    "polysemanticity",
]


def _encoder(encoder: nn.Module | str, pretrained: str | None) -> nn.Module:
    from negspace.models.clip import load_clip

    if isinstance(encoder, str):
        encoder = load_clip(encoder, pretrained=pretrained)[0]
    if not hasattr(encoder, "encode_image"):
        raise TypeError(f"encoder must have encode_image (an open_clip model) or be a name, got {type(encoder).__name__}")
    return encoder


def embed(
    images: Tensor,
    encoder: nn.Module | str = "ViT-B-32",
    *,
    pretrained: str | None = "default",
    preprocess: Callable[[Tensor], Tensor] | str | None = "auto",
    batch_size: int = 64,
) -> Tensor:
    """L2-normalised image embeddings ``(N, E)`` of ``images (N, 3, H, W)`` in ``[0, 1]``.

    ``encoder``: a model with ``encode_image`` (e.g. from :func:`negspace.models.clip.load_clip`) or an
    open_clip name loaded with ``load_clip(encoder, pretrained)``: ``"default"`` = the model's pretrained tag from
    the local cache (a clear error when missing); random weights only with an explicit ``pretrained=None``.
    ``preprocess="auto"`` resizes to the model's image size and applies its mean/std; ``None`` = as is.
    """
    from negspace.models.clip import clip_preprocess, encode_images

    encoder = _encoder(encoder, pretrained)
    if preprocess == "auto":
        preprocess = clip_preprocess(encoder)
    elif preprocess is not None and not callable(preprocess):
        raise TypeError(f"preprocess must be 'auto', None or a callable, got {preprocess!r}")
    x = images.detach().float().cpu()
    x = preprocess(x) if preprocess is not None else x
    return encode_images(encoder, x, batch_size=batch_size)


def cluster_distances(embeddings: Tensor, labels: Tensor) -> tuple[float, float]:
    """``(ρ_inter, ρ_intra)`` of paper 004, eq. 5, with Euclidean distances of ``embeddings (N, E)``."""
    lab = torch.as_tensor(labels).flatten()
    if embeddings.dim() != 2 or lab.numel() != embeddings.shape[0]:
        raise ValueError(f"embeddings (N, E) and labels (N,) must match, got {tuple(embeddings.shape)}, {tuple(lab.shape)}")
    return inter_intra(embeddings, lab)


def _kmeans_labels(x: Tensor, k: int, seed: int) -> Tensor:
    if not isinstance(k, int) or isinstance(k, bool) or k < 2 or k > x.shape[0]:
        raise ValueError(f"k must be an int in [2, n={x.shape[0]}], got {k!r}")
    return kmeans(x.flatten(1), k, seed=seed, n_init=10)[0]


def polysemanticity(embeddings: Tensor, labels: Tensor | None = None, *, k: int = 2, seed: int = 0) -> float:
    """``ρ_inter − ρ_intra``; ``labels=None`` clusters the embeddings themselves with k-means (paper §4.1)."""
    lab = _kmeans_labels(embeddings, k, seed) if labels is None else torch.as_tensor(labels)
    inter, intra = cluster_distances(embeddings, lab)
    return inter - intra


@torch.no_grad()
def activation_vectors(model: nn.Module, layer: str, x: Tensor, *, reduce: str = "mean", relu: bool = True) -> Tensor:
    """Activations of all channels of ``layer`` reduced over space, ``(B, C)`` — the features of the
    activation-based baseline (O'Mahony et al., paper 004 §4.2).

    Default as the paper's reference code: the spatial mean of the ReLU'd activations (``reduce="mean"``,
    ``relu=True``); ``reduce="max", relu=False`` is negspace ≤ 0.2's baseline.
    """
    with eval_mode(model), capture(model, layer, detach=True, stop_after=True) as cap:
        run_until(model, x)
    act = cap[layer]
    return summarize(act.clamp_min(0) if relu else act, reduce)


def activation_clustering(activations: Tensor, k: int = 2, *, seed: int = 0) -> Tensor:
    """Baseline: k-means labels ``(N,)`` of the reference samples' activation vectors ``(N, C)``."""
    return _kmeans_labels(activations, k, seed)


def distance_correlation(a: Tensor, b: Tensor, *, method: str = "pearson") -> float:
    """Correlation between the pairwise Euclidean distances of two representations of the same N samples
    (paper 004, Fig. 4 bottom left): e.g. CLIP embeddings of the crops vs PURE circuits or activations.

    Not Székely's distance correlation: the Pearson (or Spearman) correlation over the ``N(N−1)/2`` pairs;
    ``NaN`` when either side's distances are all equal.
    """
    if a.shape[0] != b.shape[0] or a.shape[0] < 3:
        raise ValueError(f"a and b must describe the same N >= 3 samples, got {a.shape[0]} and {b.shape[0]}")
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    da = torch.pdist(a.detach().double().cpu().flatten(1))
    db = torch.pdist(b.detach().double().cpu().flatten(1))
    if method == "spearman":  # Pearson of the (average) ranks
        from scipy.stats import rankdata

        da, db = torch.from_numpy(rankdata(da.numpy())), torch.from_numpy(rankdata(db.numpy()))
    return pearson(da, db)


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


@dataclass
class NeuronReport:
    """Cropped references of one fitted neuron and, with an encoder, its scores: ``clip_pure``,
    ``clip_activation``, ``polysemanticity`` (inter − intra CLIP distances of the PURE, activation and
    embedding clusterings), ``corr_pure``, ``corr_activation``."""

    neuron: int
    crops: Tensor  # (n, C, H, W), on CPU
    labels: Tensor  # (n,) virtual neuron of each crop
    n_virtual: int
    scores: dict[str, float] = field(default_factory=dict)


def evaluate_virtual_neurons(
    model: nn.Module,
    vn: VirtualNeuronSet,
    data: Data,
    *,
    encoder: nn.Module | str | None = None,
    pretrained: str | None = "default",
    max_neurons: int = 8,
    kernel_size: int = 5,
    threshold: float = 0.01,
    batch_size: int = 64,
    batch_keys: object = None,
    seed: int = 0,
    rank: int = 0,
    activation_reduce: str = "mean",
    activation_relu: bool = True,
) -> list[NeuronReport]:
    """Crop the references of the first ``max_neurons`` fitted neurons (those ``rank`` holds: under DDP
    ``data`` is this rank's shard) and, with an ``encoder``, compare PURE with activation clustering in its
    embedding space (:func:`compare_clusterings`). ``vn`` must come from :func:`fit_virtual_neurons`.
    Crops explain the neuron's spatial max (A.1); the activation baseline uses :func:`activation_vectors`
    with ``activation_reduce`` / ``activation_relu`` (default: mean of ReLU'd activations, the paper's code)."""
    refs, ranks = vn.references, vn.reference_ranks
    if refs is None or ranks is None:
        raise ValueError("vn has no references; fit it with fit_virtual_neurons()")
    enc = None if encoder is None else _encoder(encoder, pretrained)
    device = model_device(model)
    reports = []
    for row, n in enumerate(vn.neurons[:max_neurons]):
        mine = ranks[row] == rank
        if not bool(mine.any()):
            continue
        idx, lab = refs.indices[row][mine], vn.labels[n][mine]
        x = reference_images(data, idx, batch_size=batch_size, batch_keys=batch_keys).to(device)
        crops = crop_references(model, vn.layer, x, n, kernel_size=kernel_size, threshold=threshold, reduce="max")
        report = NeuronReport(n, crops.detach().cpu(), lab, vn.n_virtual(n))
        if enc is not None and len(idx) > max(report.n_virtual, 2):
            emb = embed(report.crops, enc)
            c = circuits(model, vn.layer, vn.circuit_layer, x, n, reduce=vn.reduce, fast=vn.fast)
            act = activation_vectors(model, vn.layer, x, reduce=activation_reduce, relu=activation_relu)
            res = compare_clusterings(emb, c.detach().cpu(), act.cpu(), pure_labels=lab, k=report.n_virtual, seed=seed)
            report.scores = {
                "clip_pure": res["pure"]["score"],
                "clip_activation": res["activation"]["score"],
                "polysemanticity": res["embedding"]["score"],
                "corr_pure": res["corr_pure"],
                "corr_activation": res["corr_activation"],
            }
        reports.append(report)
    return reports
