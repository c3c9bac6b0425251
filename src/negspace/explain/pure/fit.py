"""Fitting PURE virtual neurons from a dataset: reference samples → circuits → k-means, in two passes over
the data, also under ``torch.distributed`` (every rank ends with the same fitted set)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.batch import Data
from negspace.distributed import broadcast, gather_stack, rank_world
from negspace.explain.pure._common import data_keys
from negspace.explain.pure.circuit import reference_circuits
from negspace.explain.pure.references import References, reference_samples
from negspace.explain.pure.virtual import VirtualNeuronSet

__all__ = ["fit_virtual_neurons"]


def _merge_ranks(refs: References, circ: Tensor, n_ref: int) -> tuple[References, Tensor, Tensor]:
    """Global top-``n_ref`` over the ranks' local references; returns merged refs, circuits ``(K, n_ref, C)``
    and the rank holding each merged reference ``(K, n_ref)``."""
    pad = n_ref - refs.values.shape[1]
    vals = F.pad(refs.values, (0, pad), value=float("-inf"))
    idx = F.pad(refs.indices, (0, pad), value=-1)
    circ = F.pad(circ, (0, 0, 0, pad))
    g_vals, g_idx, g_circ = gather_stack(vals), gather_stack(idx), gather_stack(circ)  # (W, K, n_ref, ...)
    world = g_vals.shape[0]
    ranks = torch.arange(world)[:, None, None].expand_as(g_vals)

    def cat(t: Tensor) -> Tensor:  # (W, K, n_ref, ...) -> (K, W*n_ref, ...)
        return t.permute(1, 0, 2, *range(3, t.dim())).flatten(1, 2)

    vals_all, pos = cat(g_vals).topk(n_ref, dim=1)
    idx_all = cat(g_idx).gather(1, pos)
    rank_all = cat(ranks).gather(1, pos)
    circ_all = cat(g_circ).gather(1, pos[..., None].expand(-1, -1, g_circ.shape[-1]))
    if bool(torch.isinf(vals_all).any()):
        raise ValueError(f"n_ref={n_ref} is larger than the number of samples on all ranks")
    return References(refs.layer, refs.neurons, idx_all, vals_all), circ_all, rank_all


def _share_fit(vn: VirtualNeuronSet, rank: int, neurons: Tensor, circ: Tensor) -> None:
    """k-means ran on rank 0: broadcast its centroids, labels and separations into ``vn`` on every rank."""
    if rank == 0:
        counts = torch.tensor([vn.n_virtual(n) for n in vn.neurons], dtype=torch.long)
    else:
        counts = torch.zeros(len(neurons), dtype=torch.long)
    counts = broadcast(counts)
    if rank == 0:
        cents = torch.cat([vn.centroids[n] for n in vn.neurons])
        labels = torch.stack([vn.labels[n] for n in vn.neurons])
        sep = torch.cat([torch.stack([vn.separation[n] for n in vn.neurons]),
                         torch.stack([vn.structure[n] for n in vn.neurons])], dim=1).double()
    else:
        cents = torch.zeros(int(counts.sum()), circ.shape[-1])
        labels = torch.zeros(circ.shape[:2], dtype=torch.long)
        sep = torch.zeros(len(counts), 5).double()
    cents, labels, sep = broadcast(cents), broadcast(labels), broadcast(sep)
    vn.neurons = neurons.tolist()
    vn.centroids = dict(zip(vn.neurons, cents.split(counts.tolist())))
    vn.labels = dict(zip(vn.neurons, labels))
    vn.separation = dict(zip(vn.neurons, sep[:, :2].float()))
    vn.structure = dict(zip(vn.neurons, sep[:, 2:].float()))


def fit_virtual_neurons(
    model: nn.Module,
    layer: str,
    circuit_layer: str,
    data: Data,
    *,
    neurons: int | Sequence[int] | Tensor | None = None,
    n_ref: int = 100,
    k: int | str = 2,
    k_range: tuple[int, int] = (2, 5),
    reduce: str = "relu",
    fast: bool | str = "auto",
    batch_size: int = 64,
    seed: int = 0,
    batch_keys: object = None,
    distributed: bool | str = "auto",
    replicate_at: str | None = None,
    progress: bool = False,
    image_key: str | None = None,
) -> VirtualNeuronSet:
    """Reference samples → circuits → k-means, in two passes over ``data``; returns a fitted :class:`VirtualNeuronSet`.

    ``data``: a tensor ``(N, ...)`` or an iterable of batches read with ``batch_keys`` (not shuffled: it is
    read twice and positions must match). Under ``torch.distributed`` (``distributed="auto"`` and an
    initialised process group) every rank passes its own shard: local top-``n_ref`` references and their
    circuits are all-gathered, the global top-``n_ref`` kept, k-means runs on rank 0 and the centroids are
    broadcast, so every rank holds the same edit. ``vn.references.indices`` index each rank's own ``data``;
    ``vn.reference_ranks`` tells which rank. ``image_key=`` is the deprecated name of ``batch_keys={"image": ...}``.
    """
    keys = data_keys(batch_keys, image_key, "fit_virtual_neurons")
    if distributed not in ("auto", True, False):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
    vn = VirtualNeuronSet(layer, circuit_layer, k=k, k_range=k_range, reduce=reduce, fast=fast, seed=seed)
    need = k_range[0] if k == "auto" else k
    if isinstance(need, int) and isinstance(n_ref, int) and need > n_ref:
        raise ValueError(f"k={k} is larger than n_ref={n_ref}")
    rank, world = rank_world() if distributed in ("auto", True) else (0, 1)
    if distributed is True and world == 1:
        raise ValueError("distributed=True but torch.distributed is not initialised")
    # under DDP each rank may hold fewer than n_ref samples: take what it has, merge globally
    refs = reference_samples(model, layer, data, n_ref=n_ref, neurons=neurons, batch_size=batch_size,
                             batch_keys=keys, progress=progress, strict=world == 1)
    circ = reference_circuits(model, circuit_layer, data, refs, reduce=reduce, fast=fast, batch_size=batch_size,
                              replicate_at=replicate_at, batch_keys=keys, progress=progress)
    if world == 1:
        vn.fit(circ, refs.neurons)
        vn.references = refs
        vn.reference_ranks = torch.zeros_like(refs.indices)
        return vn
    refs, circ, ranks = _merge_ranks(refs, circ, n_ref)
    if rank == 0:
        vn.fit(circ, refs.neurons)
    _share_fit(vn, rank, refs.neurons, circ)
    vn.references = refs
    vn.reference_ranks = ranks
    return vn
