"""Distributed helpers on plain ``torch.distributed`` (no Lightning): rank and world size, gathering rows of
different lengths from every rank, and broadcasting rank 0's result, so that every rank holds the same
fitted artefact. Outside an initialised process group every function is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_object", "all_gather_rows", "broadcast", "gather_stack", "is_distributed", "rank_world"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    """Tensors for collectives live on the backend's device (CUDA for NCCL, CPU for gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_stack(t: Tensor) -> Tensor:
    """Stack ``t`` (the same shape on every rank) from all ranks → ``(world, *t.shape)`` on ``t``'s device."""
    if not is_distributed():
        return t[None]
    x = t.detach().to(_device()).contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.stack(parts).to(t.device)


def all_gather_rows(rows: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
    """Concatenate rows from every rank in rank order; ranks may hold different numbers of rows.

    ``rows``: a tensor ``(N_r, ...)`` or a dict of such tensors with the same ``N_r`` (gathered key by key
    in sorted order, so every rank issues the same collectives). Rows are padded to the longest rank,
    gathered, and trimmed.
    """
    if not is_distributed():
        return rows
    single = isinstance(rows, Tensor)
    table = {"": rows} if single else dict(rows)
    if not table:
        raise ValueError("all_gather_rows: nothing to gather")
    n = {t.shape[0] for t in table.values()}
    if len(n) != 1:
        raise ValueError(f"all_gather_rows: every tensor must have the same number of rows, got {sorted(n)}")
    dev, ws = _device(), dist.get_world_size()
    local = torch.tensor([n.pop()], device=dev)
    sizes = [torch.zeros_like(local) for _ in range(ws)]
    dist.all_gather(sizes, local)
    counts = [int(s.item()) for s in sizes]
    m = max(counts)
    out: dict[str, Tensor] = {}
    for key in sorted(table):
        t = table[key]
        x = t.detach().to(dev)
        x = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))]).contiguous()
        buf = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(buf, x)
        out[key] = torch.cat([b[:c] for b, c in zip(buf, counts)]).to(t.device)
    return out[""] if single else out


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """Rank ``src``'s ``t`` on every rank (same shape and dtype required), on ``t``'s device."""
    if not is_distributed():
        return t
    x = t.detach().to(_device()).contiguous()
    dist.broadcast(x, src=src)
    return x.to(t.device)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` (keep it to strings and numbers), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
