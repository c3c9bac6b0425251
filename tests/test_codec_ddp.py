"""compute_contributions under DDP (2 gloo processes): per-rank shares gathered in memory and on disk."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from helpers import free_port
from negspace.explain.codec import ContributionStore, compute_contributions


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    x, y = torch.rand(40, 1, 6, 6), torch.randint(0, 3, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)  # 6 uneven batches
    return model.eval(), loader


def _worker(rank: int, world: int, port: int, directory: str, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, loader = _setup()
        ref = compute_contributions(model, loader, "1", method="act_grad", progress=False, rank=0, world_size=1)
        # rank r computes batches r, r+2, r+4; gathered rows are rank 0's then rank 1's
        order = torch.cat([torch.arange(i * 7, min(i * 7 + 7, 40)) for r in range(2) for i in range(r, 6, 2)])
        mem = compute_contributions(model, loader, "1", method="act_grad", progress=False)
        disk = compute_contributions(model, loader, "1", method="act_grad", progress=False, store=directory,
                                     rows_per_shard=5)
        disk_set = disk.to_set()
        ok = {}
        for name, got in (("mem", mem), ("disk", disk_set)):
            ok[name] = len(got) == 40 and all(
                torch.allclose(got.tensors[k], ref.tensors[k][order]) for k in ("1.pos", "1.neg", "1.act", "label")
            )
        ok["ranks"] = got.tensors["rank"].tolist() == [0] * 21 + [1] * 19
        ok["reopen"] = len(ContributionStore.open(directory)) == 40
        queue.put((rank, ok))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_compute_contributions_gathers_across_two_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), queue), nprocs=2, join=True)
    results = dict(queue.get() for _ in range(2))
    for rank in (0, 1):
        assert results[rank] == {"mem": True, "disk": True, "ranks": True, "reopen": True}, results
