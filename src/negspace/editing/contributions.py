"""Contribution datasets over a DataLoader (paper 002, CODEC §2–3 and supplementary 10.1).

For every batch and every requested layer we compute hidden-unit contributions with
:func:`negspace.attribution.layer_contributions` (all layers in the same passes), split them into
excitatory and inhibitory parts *before* the spatial sum (``ei_split`` then ``spatial_sum``, eq. 2 of 10.1),
and record the matching spatially summed activations (the activation baseline of the paper). Rows are::

    "{layer}.pos": (N, C)   Σ_space max(c, 0)       excitatory part  E
    "{layer}.neg": (N, C)   Σ_space max(-c, 0)      inhibitory part  I   (net contribution = E - I)
    "{layer}.act": (N, C)   Σ_space a               activations
    "label": (N,), "pred": (N,), "target_value": (N,)  T(x) of the scalar target, "rank": (N,)

Targets (one scalar per sample, paper §2): ``"top_logit"`` (default of the paper), ``"topk"`` (sum of the
``k`` largest logits), ``"entropy"``, ``"contrastive"`` (top-1 minus top-2 logit), ``"label"`` (the logit
of the true class), or any objective from :mod:`negspace.objectives`.

Storage: small datasets stay in memory (:class:`ContributionSet`); pass ``store=`` a directory (or a
:class:`ContributionStore`) and the rows are streamed to safetensors shards of ``rows_per_shard`` rows,
read back lazily (:meth:`ContributionStore.iter_shards`) or as concatenated tensors (:meth:`ContributionStore.load`).

DDP: with ``rank``/``world_size`` (taken from ``torch.distributed`` when it is initialised) each rank
computes its share (its own ``DistributedSampler`` shard, or every ``world_size``-th batch of a plain
DataLoader) and the results are gathered so that every rank returns the full dataset:

* in memory: sizes are exchanged, rows padded to the largest rank and ``all_gather``-ed as tensors
  (works with gloo and nccl; no pickling of tensors);
* on disk: each rank writes shards named ``...-r{rank}-{i}.safetensors`` into the *shared* directory; after a
  barrier the shard file names are exchanged with ``all_gather_object`` (strings only) and every rank's
  store lists all shards in rank order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.attribution import layer_contributions
from negspace.batch import unpack_batch as _unpack
from negspace.hooks import capture, get_layer, normalize_layers
from negspace.objectives import Objective, contrastive, entropy, logit, top_logit, topk_sum
from negspace.reduce import ei_split, spatial_sum

__all__ = [
    "FEATURES",
    "TARGETS",
    "ContributionSet",
    "ContributionStore",
    "compute_contributions",
    "contributions_batch",
    "make_target",
    "unpack_batch",
]

TARGETS = ("top_logit", "topk", "entropy", "contrastive", "label")
FEATURES = ("positive", "negative", "net", "concat", "activation")


# ----------------------------------------------------------------------------------------- targets/batches
def make_target(target: str | Objective, *, k: int = 5) -> Objective | str:
    """Resolve a target name to an objective (``"label"`` stays a string: it needs the batch labels)."""
    if isinstance(target, Objective) or (callable(target) and not isinstance(target, str)):
        return target
    if target == "top_logit":
        return top_logit()
    if target == "topk":
        return topk_sum(k)
    if target == "entropy":
        return entropy()
    if target == "contrastive":
        return contrastive()
    if target == "label":
        return "label"
    raise ValueError(f"target must be one of {TARGETS} or an objective from negspace.objectives, got {target!r}")


def unpack_batch(batch: object, batch_keys: object = None) -> tuple[Tensor, Tensor | None]:
    """``(image, label or None)`` of a batch, by the shared layout rules of :mod:`negspace.batch`."""
    b = _unpack(batch, batch_keys, who="contributions")
    return b.image, b.label


def _check_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    names, _ = normalize_layers(layers)
    for n in names:
        get_layer(model, n)  # ValueError listing close names
    return names


def contributions_batch(
    model: nn.Module,
    layers: str | Sequence[str],
    x: Tensor,
    target: str | Objective = "top_logit",
    *,
    labels: Tensor | None = None,
    method: str = "integrated",
    n_steps: int = 10,
    k: int = 5,
    activations: bool = True,
    internal_batch_size: int | None = None,
) -> dict[str, Tensor]:
    """Rows of one batch: ``{"{layer}.pos"/".neg"/".act": (B, C), "pred", "target_value": (B,)}`` (detached).

    The E/I split is applied per unit *before* the spatial sum (``ei_split`` then ``spatial_sum``).
    """
    names = _check_layers(model, layers)
    objective = make_target(target, k=k)
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


# ------------------------------------------------------------------------------------------ in-memory set
class ContributionSet:
    """Spatially summed contributions/activations of N samples for several layers (tensors on CPU).

    ``features(layer, kind)`` gives the matrix an SAE is fitted on: ``"positive"`` (E, the paper's default,
    10.1), ``"negative"`` (I), ``"net"`` (E − I), ``"concat"`` (``[E, I]``, 2C columns), ``"activation"``.
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = dict(tensors)
        lens = {t.shape[0] for t in self.tensors.values()}
        if len(lens) > 1:
            raise ValueError(f"all rows must have the same length, got {sorted(lens)}")

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    @property
    def layers(self) -> list[str]:
        return [k[: -len(".pos")] for k in self.tensors if k.endswith(".pos")]

    @property
    def labels(self) -> Tensor | None:
        return self.tensors.get("label")

    def _get(self, layer: str, suffix: str) -> Tensor:
        key = f"{layer}.{suffix}"
        if key not in self.tensors:
            raise ValueError(f"layer {layer!r} has no {suffix!r} rows; layers in this set: {self.layers}")
        return self.tensors[key]

    def features(self, layer: str, kind: str = "positive") -> Tensor:
        """``(N, C)`` (``(N, 2C)`` for ``"concat"``) feature matrix of ``layer``."""
        if kind not in FEATURES:
            raise ValueError(f"kind must be one of {FEATURES}, got {kind!r}")
        if kind == "activation":
            return self._get(layer, "act")
        pos, neg = self._get(layer, "pos"), self._get(layer, "neg")
        if kind == "positive":
            return pos
        if kind == "negative":
            return neg
        if kind == "net":
            return pos - neg
        return torch.cat([pos, neg], dim=1)

    def __repr__(self) -> str:
        return f"ContributionSet(N={len(self)}, layers={self.layers})"


# --------------------------------------------------------------------------------------------- disk store
class ContributionStore:
    """Disk-backed rows in safetensors shards of ``rows_per_shard`` rows (for datasets larger than memory).

    Write with :meth:`append` (any number of rows per call) and :meth:`close`; read back lazily with
    :meth:`iter_shards` or as one concatenated tensor per key with :meth:`load` / :meth:`to_set`.
    Shards are named ``{prefix}-r{rank:03d}-{i:05d}.safetensors``; a JSON index per rank lists them.
    ``ContributionStore.open(directory)`` reopens every rank's shards (rank order, then shard order).
    """

    def __init__(self, directory: str | Path, *, rows_per_shard: int = 4096, prefix: str = "contrib", rank: int = 0):
        if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be a positive int, got {rows_per_shard!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.prefix = prefix
        self.rank = rank
        self.shards: list[str] = []
        self._buffer: dict[str, list[Tensor]] = {}
        self._buffered = 0
        self._written = 0

    # writing ------------------------------------------------------------------------------------
    def append(self, rows: Mapping[str, Tensor]) -> None:
        """Add rows ``{key: (n, ...)}`` (same n for every key); full shards are written immediately."""
        if not rows:
            return
        n = {int(t.shape[0]) for t in rows.values()}
        if len(n) != 1:
            raise ValueError(f"all tensors appended together need the same number of rows, got {sorted(n)}")
        if self._buffer and set(rows) != set(self._buffer):
            raise ValueError(f"keys changed: store has {sorted(self._buffer)}, got {sorted(rows)}")
        for key, t in rows.items():
            self._buffer.setdefault(key, []).append(t.detach().cpu().contiguous())
        self._buffered += n.pop()
        while self._buffered >= self.rows_per_shard:
            self._write(self.rows_per_shard)

    def _write(self, n: int) -> None:
        merged = {k: torch.cat(v) for k, v in self._buffer.items()}
        out = {k: t[:n].contiguous() for k, t in merged.items()}
        rest = {k: [t[n:]] for k, t in merged.items()}
        name = f"{self.prefix}-r{self.rank:03d}-{len(self.shards):05d}.safetensors"
        save_file(out, str(self.directory / name), metadata={"rows": str(n)})
        self.shards.append(name)
        self._written += n
        self._buffered -= n
        self._buffer = rest if self._buffered else {}

    def close(self) -> ContributionStore:
        """Flush the last partial shard and write this rank's index (JSON)."""
        if self._buffered:
            self._write(self._buffered)
        index = {"shards": self.shards, "rows": self._written, "rank": self.rank}
        (self.directory / f"{self.prefix}-index-r{self.rank:03d}.json").write_text(json.dumps(index))
        return self

    # reading ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, *, prefix: str = "contrib") -> ContributionStore:
        """Reopen the shards of all ranks written under ``directory``."""
        d = Path(directory)
        indices = sorted(d.glob(f"{prefix}-index-r*.json"))
        if not indices:
            raise FileNotFoundError(f"no {prefix}-index-r*.json in {d}; was the store closed?")
        store = cls(d, prefix=prefix)
        for p in indices:
            store.shards.extend(json.loads(p.read_text())["shards"])
        store._written = len(store)
        return store

    def set_shards(self, shards: Iterable[str]) -> None:
        """Replace the shard list (used after gathering the shard names of all ranks)."""
        self.shards = list(shards)

    def keys(self) -> list[str]:
        if not self.shards:
            return []
        with safe_open(str(self.directory / self.shards[0]), framework="pt") as f:
            return list(f.keys())

    def __len__(self) -> int:
        total = 0
        for s in self.shards:
            with safe_open(str(self.directory / s), framework="pt") as f:
                total += int(f.metadata()["rows"])
        return total

    def iter_shards(self, keys: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
        """Yield one ``{key: Tensor}`` per shard, loading only the requested keys."""
        for s in self.shards:
            with safe_open(str(self.directory / s), framework="pt") as f:
                ks = f.keys() if keys is None else keys
                yield {k: f.get_tensor(k) for k in ks}

    def load(self, key: str) -> Tensor:
        """All rows of one key, concatenated over the shards."""
        if key not in self.keys():
            raise KeyError(f"key {key!r} not in store; keys: {self.keys()}")
        return torch.cat([part[key] for part in self.iter_shards([key])])

    def to_set(self, keys: Sequence[str] | None = None) -> ContributionSet:
        """Load (the requested keys of) every shard into a :class:`ContributionSet`."""
        ks = self.keys() if keys is None else list(keys)
        parts = list(self.iter_shards(ks))
        return ContributionSet({k: torch.cat([p[k] for p in parts]) for k in ks})

    def __repr__(self) -> str:
        return f"ContributionStore({str(self.directory)!r}, shards={len(self.shards)}, rows_per_shard={self.rows_per_shard})"


# ------------------------------------------------------------------------------------------------- DDP
def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    return rank, world_size, initialised and world_size > 1


def _gather_tensors(rows: dict[str, Tensor]) -> dict[str, Tensor]:
    """all_gather variable-length rows from every rank (pad to the longest, then trim)."""
    dist = torch.distributed
    ws = dist.get_world_size()
    n = next(iter(rows.values())).shape[0]
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(ws)]
    dist.all_gather(sizes, torch.tensor([n]))
    m = int(max(s.item() for s in sizes))
    out = {}
    for key in sorted(rows):
        t = rows[key]
        pad = torch.zeros((m - n, *t.shape[1:]), dtype=t.dtype)
        buf = [torch.zeros((m, *t.shape[1:]), dtype=t.dtype) for _ in range(ws)]
        dist.all_gather(buf, torch.cat([t, pad]).contiguous())
        out[key] = torch.cat([b[: int(s.item())] for b, s in zip(buf, sizes)])
    return out


# --------------------------------------------------------------------------------------------- driver
def compute_contributions(
    model: nn.Module,
    dataloader: Iterable,
    layers: str | Sequence[str],
    *,
    target: str | Objective = "top_logit",
    method: str = "integrated",
    n_steps: int = 10,
    k: int = 5,
    activations: bool = True,
    store: str | Path | ContributionStore | None = None,
    rows_per_shard: int = 4096,
    batch_keys: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    gather: bool = True,
    progress: bool = True,
    internal_batch_size: int | None = None,
) -> ContributionSet | ContributionStore:
    """Contribution dataset of ``model`` over ``dataloader`` for ``layers`` (paper 002 defaults:
    ``method="integrated"``, ``n_steps=10``, ``target="top_logit"``).

    Args:
        dataloader: yields ``(image, label, ...)`` tuples or ``{"image", "label"}`` dicts (``batch_keys``).
        store: ``None`` → in-memory :class:`ContributionSet`; a directory or store → safetensors shards.
        rank, world_size: default from ``torch.distributed`` when initialised. A DataLoader whose sampler is a
            ``DistributedSampler`` is used as is; otherwise this rank takes every ``world_size``-th batch.
        gather: gather all ranks' rows so every rank returns the full dataset (see the module doc).

    Returns:
        :class:`ContributionSet` (rows ``"{layer}.pos"``, ``".neg"``, ``".act"``, ``"label"``, ``"pred"``,
        ``"target_value"``, ``"rank"``) or the closed :class:`ContributionStore`.

    The model is put in ``eval()`` mode for the computation and restored afterwards.
    """
    names = _check_layers(model, layers)
    make_target(target, k=k)  # validate early
    rank, world_size, distributed = _dist_info(rank, world_size)
    sampler = getattr(dataloader, "sampler", None)
    split_batches = world_size > 1 and not isinstance(sampler, torch.utils.data.DistributedSampler)
    if isinstance(store, str | Path):
        store = ContributionStore(store, rows_per_shard=rows_per_shard, rank=rank)
    elif store is not None and not isinstance(store, ContributionStore):
        raise TypeError(f"store must be None, a directory or a ContributionStore, got {type(store).__name__}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {}
    try:
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        bar = tqdm(dataloader, total=total, desc=f"contributions[{rank}]", disable=not progress, leave=False)
        for i, batch in enumerate(bar):
            if max_batches is not None and i >= max_batches:
                break
            if split_batches and i % world_size != rank:
                continue
            x, y = unpack_batch(batch, batch_keys)
            x = x.to(device)
            rows = contributions_batch(
                model, names, x, target, labels=y, method=method, n_steps=n_steps, k=k,
                activations=activations, internal_batch_size=internal_batch_size,
            )
            rows["label"] = (y.long().cpu() if y is not None else torch.full((len(x),), -1, dtype=torch.long))
            rows["rank"] = torch.full((len(x),), rank, dtype=torch.long)
            if store is not None:
                store.append(rows)
            else:
                for key, t in rows.items():
                    parts.setdefault(key, []).append(t)
    finally:
        model.train(was_training)
    if store is not None:
        store.close()
        if distributed and gather:
            torch.distributed.barrier()
            names_per_rank: list = [None] * world_size
            torch.distributed.all_gather_object(names_per_rank, list(store.shards))
            store.set_shards([s for r in names_per_rank for s in r])
        return store
    if not parts:
        raise ValueError("the dataloader yielded no batches for this rank")
    rows = {key: torch.cat(v) for key, v in parts.items()}
    if distributed and gather:
        rows = _gather_tensors(rows)
    return ContributionSet(rows)

