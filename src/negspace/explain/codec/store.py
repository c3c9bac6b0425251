"""Where contribution rows live: :class:`ContributionSet` (in memory) and :class:`ContributionStore`
(safetensors shards on disk, for datasets larger than memory; every rank of a DDP run writes its own shards
into one shared directory, and :meth:`ContributionStore.open` reads them back in rank order).

Rows (paper 002 §2–3, supplementary 10.1), each ``(N, C)`` per layer: ``"{layer}.pos"`` (E, excitatory part),
``"{layer}.neg"`` (I, inhibitory part), ``"{layer}.act"`` (spatially summed activations), plus ``"label"``,
``"pred"``, ``"target_value"``, ``"rank"`` ``(N,)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["FEATURES", "ContributionSet", "ContributionStore"]

#: feature matrices :meth:`ContributionSet.features` can build
FEATURES = ("positive", "negative", "net", "concat", "activation")


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
