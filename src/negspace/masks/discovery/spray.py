"""Discovery method ``"spray"``: clusters of attribution maps (SpRAy, Lapuschkin et al. 2019).

Per class: input×gradient maps of the class logit (:func:`negspace.attribution.input_x_gradient`, one batched call
per chunk), summed over colour, positive part, area-pooled to at most 16×16 and normalised to unit mass. The
affinity is the symmetrised k-nearest-neighbour graph (10 neighbours, ``0.5·(A + Aᵀ)``, what
``SpectralClustering(affinity="nearest_neighbors")`` builds); the number of clusters is the eigengap of its
normalised Laplacian (1 to 10 clusters, at most one per ``k`` images); the clusters are
``sklearn.cluster.SpectralClustering`` on that graph.

At most the first 2048 images of a class are clustered. A cluster of at least ``k`` images is a candidate; its
reference images are its members closest to its mean map, its preview their maps (box-blurred).
``score = L · S · size``: ``L`` the localisation of the cluster's mean map, ``S`` the consistency of the crops at
the peaks of its reference maps (:mod:`.common`), ``size = min(1, n / 2k)``. Clean examples: the images least
like the cluster at the layer (:func:`.common.presence`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.attribution import input_x_gradient
from negspace.hooks import model_device
from negspace.masks.discovery.candidate import Candidate
from negspace.masks.discovery.common import (
    CONCENTRATION_SIZE,
    Inputs,
    concentration,
    consistency,
    normalize_maps,
    peak_crops,
    presence,
    split_examples,
)

__all__ = ["MAX_CLUSTERS", "MAX_PER_CLASS", "N_NEIGHBORS", "attribution_maps", "eigengap_clusters",
           "spray_candidates"]

MAX_CLUSTERS = 10
N_NEIGHBORS = 10
#: images of a class that are clustered (the first ones; the eigengap takes a dense eigendecomposition)
MAX_PER_CLASS = 2048


def attribution_maps(model: nn.Module, x: Tensor, target: int, chunk: int) -> Tensor:
    """Positive part of the colour-summed input×gradient of logit ``target``: ``x (n, C, H, W)`` → ``(n, 1, H, W)``."""
    dev = model_device(model)
    parts = [input_x_gradient(model, xs.to(dev), target).detach().sum(1, keepdim=True).clamp_min(0).cpu()
             for xs in x.split(chunk)]
    return torch.cat(parts)


def eigengap_clusters(v: Tensor, *, max_clusters: int, seed: int) -> Tensor:
    """Spectral clustering of the rows of ``v (n, F)`` on their k-NN graph, the number of clusters chosen by the
    eigengap (1 ≤ m ≤ ``max_clusters``). Returns labels ``(n,)``."""
    from scipy.sparse.csgraph import laplacian
    from sklearn.cluster import SpectralClustering
    from sklearn.neighbors import kneighbors_graph

    n = v.shape[0]
    if max_clusters < 2 or n < 3:
        return torch.zeros(n, dtype=torch.long)
    graph = kneighbors_graph(v.double().numpy(), min(N_NEIGHBORS, n - 1), include_self=True)
    affinity = (0.5 * (graph + graph.T)).toarray()
    ev = np.linalg.eigvalsh(laplacian(affinity, normed=True))[: max_clusters + 1]
    m = int(np.argmax(np.diff(ev)[: max_clusters])) + 1  # gap after the m smallest eigenvalues
    if m < 2:
        return torch.zeros(n, dtype=torch.long)
    with warnings.catch_warnings():  # separate groups are what the eigengap found, not a problem
        warnings.filterwarnings("ignore", message="Graph is not fully connected", category=UserWarning)
        sc = SpectralClustering(m, affinity="precomputed", random_state=seed).fit(affinity)
    return torch.as_tensor(sc.labels_, dtype=torch.long)


def spray_candidates(model: nn.Module, inp: Inputs, *, per_method: int) -> list[Candidate]:
    """The ``per_method`` best SpRAy clusters over all classes as candidates (see the module doc)."""
    x, y, k = inp.x, inp.labels, inp.k
    if y is None:  # checked by discover_artifacts
        raise ValueError("the 'spray' method needs labelled data")
    size = (min(x.shape[-2], CONCENTRATION_SIZE), min(x.shape[-1], CONCENTRATION_SIZE))
    out = []
    classes = [c for c in sorted(set(y.tolist())) if int((y == c).sum()) >= 2 * k]
    if not classes:
        raise ValueError(f"the 'spray' method needs at least 2k = {2 * k} images of some class; the class sizes are "
                         f"{torch.bincount(y).tolist()}. Fix: pass more images (max_images=) or a smaller k")
    for c in classes:
        idx = (y == c).nonzero()[:MAX_PER_CLASS, 0]
        maps = attribution_maps(model, x[idx], c, inp.chunk)
        v = F.adaptive_avg_pool2d(maps, size).flatten(1)
        v = v / v.sum(1, keepdim=True).clamp_min(1e-30)
        labels = eigengap_clusters(v, max_clusters=min(MAX_CLUSTERS, len(idx) // k), seed=inp.seed)
        for j in labels.unique().tolist():
            mem = (labels == j).nonzero()[:, 0]
            if len(mem) < k:
                continue
            mean = v[mem].mean(0)
            loc = float(concentration(mean.view(1, *size))[0])
            mem = mem[F.cosine_similarity(v[mem], mean[None], dim=1).argsort(descending=True, stable=True)]
            ref = idx[mem[: inp.n_examples]]
            preview = normalize_maps(maps[mem[:k]], blur=inp.patch // 2)
            cons = float(consistency(model, inp, peak_crops(x[ref[:k]], preview, inp.patch))[0])
            factor = min(1.0, len(mem) / (2 * k))
            _, clean = split_examples(presence(inp.acts(model), preview, ref), y, c, inp, reference=ref)
            out.append(Candidate(
                kind="spray", score=loc * cons * factor, layer=inp.layer, class_index=c, channels=None, mode=None,
                reference_indices=ref, clean_indices=clean, preview=preview,
                patches=peak_crops(x[ref[:k]], preview, inp.patch),
                description=f"SpRAy cluster {j} of class {c}: {len(mem)} of {len(idx)} attribution maps; "
                            f"{len(ref)} reference images",
                details={"localisation": loc, "consistency": cons, "size": factor, "n_members": float(len(mem)),
                         "n_reference": float(len(ref))},
            ))  # fmt: skip
    return sorted(out, key=lambda cand: -cand.score)[:per_method]
