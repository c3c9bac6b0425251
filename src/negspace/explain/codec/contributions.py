"""Contribution datasets over a DataLoader (paper 002, CODEC §2–3 and supplementary 10.1).

For every batch and every requested layer we compute hidden-unit contributions with
:func:`negspace.attribution.layer_contributions` (all layers in the same passes), split them into
excitatory and inhibitory parts *before* the spatial sum (``ei_split`` then ``spatial_sum``, eq. 2 of 10.1),
and record the matching spatially summed activations (the activation baseline of the paper). Rows are::

    "{layer}.pos": (N, C)   Σ_space max(c, 0)       excitatory part  E
    "{layer}.neg": (N, C)   Σ_space max(-c, 0)      inhibitory part  I   (net contribution = E - I)
    "{layer}.act": (N, C)   Σ_space a               activations
    "label": (N,), "pred": (N,), "target_value": (N,)  T(x) of the scalar target, "rank": (N,)

Targets (one scalar per sample, paper §2) are resolved by :func:`negspace.objectives.named_target`:
``"top_prob"`` (the default: the softmax probability of the top class, as in the reference code and
supplement 10.5/10.8), ``"top_logit"`` (the main text's wording, §2), ``"topk"`` (sum of the ``k`` largest
logits), ``"entropy"``, ``"contrastive"`` (top-1 minus top-2 logit), ``"label"`` (the logit of the true class), or any
objective from :mod:`negspace.objectives`.

Storage: small datasets stay in memory (:class:`~negspace.explain.codec.store.ContributionSet`); pass
``store=`` a directory (or a :class:`~negspace.explain.codec.store.ContributionStore`) and the rows are
streamed to safetensors shards.

DDP: with ``rank``/``world_size`` (taken from ``torch.distributed`` when it is initialised) each rank
computes its share (its own ``DistributedSampler`` shard, or every ``world_size``-th batch of a plain
DataLoader) and the results are gathered so that every rank returns the full dataset: in memory with
:func:`negspace.distributed.all_gather_rows` (rank 0's rows first); on disk each rank writes
``...-r{rank}-{i}.safetensors`` into the *shared* directory and the shard names (strings only) are exchanged
with :func:`negspace.distributed.all_gather_object`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.attribution import layer_contributions
from negspace.batch import BatchKeys
from negspace.distributed import all_gather_object, all_gather_rows, is_distributed, rank_world
from negspace.explain.codec.store import ContributionSet, ContributionStore
from negspace.hooks import capture, eval_mode, get_layer, model_device, normalize_layers
from negspace.objectives import Objective, logit, named_target
from negspace.reduce import ei_split, spatial_sum

__all__ = ["compute_contributions", "contributions_batch"]


def _check_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    names, _ = normalize_layers(layers)
    for n in names:
        get_layer(model, n)  # ValueError listing close names
    return names


def contributions_batch(
    model: nn.Module,
    layers: str | Sequence[str],
    x: Tensor,
    target: str | Objective = "top_prob",
    *,
    labels: Tensor | None = None,
    method: str = "integrated",
    n_steps: int = 10,
    k: int = 5,
    activations: bool = True,
    internal_batch_size: int | None = None,
) -> dict[str, Tensor]:
    """Rows of one batch ``x: (B, ...)``: ``{"{layer}.pos"/".neg"/".act": (B, C), "pred", "target_value": (B,)}``
    (detached, on CPU). The E/I split is applied per unit *before* the spatial sum."""
    names = _check_layers(model, layers)
    objective = named_target(target, k=k)
    with torch.no_grad(), capture(model, names, detach=True) as cap:
        logits = model(x)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise TypeError("the model must return logits of shape (B, num_classes)")
    if objective == "label":
        if labels is None:
            raise ValueError("target='label' needs labelled batches (image, label)")
        objective = logit(labels.to(logits.device).long())
    objective = objective.fix(logits) if isinstance(objective, Objective) else objective
    contrib = layer_contributions(
        model, names, x, objective, method=method, n_steps=n_steps, internal_batch_size=internal_batch_size
    )
    rows: dict[str, Tensor] = {}
    for n in names:
        c = contrib[n]
        if c.shape != cap.activations[n].shape:
            raise ValueError(
                f"contribution datasets need one scalar target per sample; got contributions of shape "
                f"{tuple(c.shape)} for layer {n!r} with output {tuple(cap.activations[n].shape)} (K targets?)"
            )
        pos, neg = ei_split(c)
        rows[f"{n}.pos"] = spatial_sum(pos).detach().float().cpu()
        rows[f"{n}.neg"] = spatial_sum(neg).detach().float().cpu()
        if activations:
            rows[f"{n}.act"] = spatial_sum(cap.activations[n]).float().cpu()
    with torch.no_grad():
        tv = objective(logits) if callable(objective) else logits.max(1).values
    rows["pred"] = logits.argmax(1).cpu()
    rows["target_value"] = tv.detach().float().cpu().reshape(len(x))
    return rows


def compute_contributions(
    model: nn.Module,
    dataloader: Iterable,
    layers: str | Sequence[str],
    *,
    target: str | Objective = "top_prob",
    method: str = "integrated",
    n_steps: int = 10,
    k: int = 5,
    activations: bool = True,
    store: str | Path | ContributionStore | None = None,
    rows_per_shard: int = 4096,
    batch_keys: object = None,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    gather: bool = True,
    progress: bool = True,
    internal_batch_size: int | None = None,
    require_labels: bool = False,
) -> ContributionSet | ContributionStore:
    """Contribution dataset of ``model`` over ``dataloader`` for ``layers`` (paper 002 defaults:
    ``method="integrated"``, ``n_steps=10``, ``target="top_prob"``).

    Args:
        dataloader: yields ``(image, label, ...)`` tuples or ``{"image", "label"}`` dicts (``batch_keys``).
        store: ``None`` → in-memory :class:`ContributionSet`; a directory or store → safetensors shards.
        rank, world_size: default from ``torch.distributed`` when initialised. A DataLoader whose sampler is a
            ``DistributedSampler`` is used as is; otherwise this rank takes every ``world_size``-th batch.
        gather: gather all ranks' rows so every rank returns the full dataset (see the module doc).
        require_labels: fail on the first batch if it carries no labels (unlabelled rows get label −1).

    Returns:
        :class:`ContributionSet` (rows ``"{layer}.pos"``, ``".neg"``, ``".act"``, ``"label"``, ``"pred"``,
        ``"target_value"``, ``"rank"``, each ``(N, C)`` or ``(N,)``) or the closed :class:`ContributionStore`.

    The model is in eval mode during the computation (:func:`negspace.hooks.eval_mode`).
    """
    names = _check_layers(model, layers)
    named_target(target, k=k)  # validate early
    r0, w0 = rank_world()
    rank = r0 if rank is None else rank
    world_size = w0 if world_size is None else world_size
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    distributed = is_distributed() and world_size > 1
    sampler = getattr(dataloader, "sampler", None)
    split_batches = world_size > 1 and not isinstance(sampler, torch.utils.data.DistributedSampler)
    if isinstance(store, str | Path):
        store = ContributionStore(store, rows_per_shard=rows_per_shard, rank=rank)
    elif store is not None and not isinstance(store, ContributionStore):
        raise TypeError(f"store must be None, a directory or a ContributionStore, got {type(store).__name__}")
    device = model_device(model) if device is None else device
    keys = BatchKeys(batch_keys)
    require = ("image", "label") if require_labels else ("image",)
    parts: dict[str, list[Tensor]] = {}
    with eval_mode(model):
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        bar = tqdm(dataloader, total=total, desc=f"contributions[{rank}]", disable=not progress, leave=False)
        for i, batch in enumerate(bar):
            if max_batches is not None and i >= max_batches:
                break
            if split_batches and i % world_size != rank:
                continue
            b = keys.unpack(batch, require=require, who="compute_contributions")
            x, y = b.image.to(device), b.label
            rows = contributions_batch(
                model, names, x, target, labels=y, method=method, n_steps=n_steps, k=k,
                activations=activations, internal_batch_size=internal_batch_size,
            )
            rows["label"] = y.long().cpu() if y is not None else torch.full((len(x),), -1, dtype=torch.long)
            rows["rank"] = torch.full((len(x),), rank, dtype=torch.long)
            if store is not None:
                store.append(rows)
            else:
                for key, t in rows.items():
                    parts.setdefault(key, []).append(t)
    if store is not None:
        store.close()
        if distributed and gather:  # a collective: every rank has closed (written) its shards before it returns
            store.set_shards([s for shards in all_gather_object(list(store.shards)) for s in shards])
        return store
    if not parts:
        raise ValueError("the dataloader yielded no batches for this rank")
    rows = {key: torch.cat(v) for key, v in parts.items()}
    if distributed and gather:
        rows = all_gather_rows(rows)  # type: ignore[assignment]
    return ContributionSet(rows)
