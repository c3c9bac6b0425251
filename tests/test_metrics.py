"""GroupAccuracy / AttributionInMask against hand-computed tables, plus DDP sync on 2 gloo processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port
from negspace.metrics import AttributionInMask, GroupAccuracy


def _close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) < tol


def test_group_accuracy_hand_table():
    m = GroupAccuracy(num_classes=2)
    # split 0 (train_bias): class 0: 3/4 right, class 1: 2/2 right
    m.update(torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 0, 1, 1]), split=0)
    # split 1 (inverse_bias), given as logits: class 0: 1/2, class 1: 0/3
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [5.0, -1.0], [0.2, 0.1]])
    m.update(logits, torch.tensor([0, 0, 1, 1, 1]), split="inverse_bias")
    # split 2 (no_bias): only class 1 present: 1/1
    m.update(torch.tensor([1]), torch.tensor([1]), split=2)
    out = m.compute()
    assert _close(out["train_bias/class_0"], 0.75)
    assert _close(out["train_bias/class_1"], 1.0)
    assert _close(out["train_bias/avg"], 0.875)
    assert _close(out["train_bias/worst"], 0.75)
    assert _close(out["inverse_bias/class_0"], 0.5)
    assert _close(out["inverse_bias/class_1"], 0.0)
    assert _close(out["inverse_bias/avg"], 0.25)
    assert math.isnan(float(out["no_bias/class_0"]))
    assert _close(out["no_bias/avg"], 1.0)  # mean over non-empty classes only
    assert _close(out["worst"], 0.0)
    table = m.table()
    assert table.shape == (3, 2)
    assert _close(table[0, 0], 0.75)


def test_group_accuracy_groups_and_errors():
    m = GroupAccuracy(num_classes=2, splits=["a"], num_groups=4)
    # group = 2*label + patch; (label, patch, pred): hand table below
    y = torch.tensor([0, 0, 1, 1, 1])
    g = torch.tensor([1, 1, 2, 2, 3])
    p = torch.tensor([0, 1, 1, 1, 0])
    m.update(p, y, group=g)
    out = m.compute()
    assert _close(out["a/group_1"], 0.5)
    assert _close(out["a/group_2"], 1.0)
    assert _close(out["a/group_3"], 0.0)
    assert math.isnan(float(out["a/group_0"]))
    assert _close(out["a/worst"], 0.0)
    with pytest.raises(ValueError, match="group is required"):
        m.update(p, y)
    with pytest.raises(ValueError, match="split"):
        m.update(p, y, split="nope", group=g)
    with pytest.raises(ValueError, match="target must hold class indices"):
        m.update(p, torch.tensor([0, 0, 1, 1, 2]), group=g)
    with pytest.raises(ValueError, match="num_classes"):
        GroupAccuracy(num_classes=0)


def test_attribution_in_mask_hand_values():
    m = AttributionInMask(splits=["s0", "s1"])
    a = torch.zeros(3, 1, 2, 2)
    a[0, 0] = torch.tensor([[1.0, -1.0], [2.0, 0.0]])  # |A| = 4, inside top row = 2 -> 0.5
    a[1, 0] = torch.tensor([[3.0, 0.0], [0.0, -1.0]])  # |A| = 4, inside top row = 3 -> 0.75
    a[2, 0] = torch.tensor([[5.0, 5.0], [5.0, 5.0]])  # unmasked: skipped
    mask = torch.zeros(3, 1, 2, 2)
    mask[0, 0, 0] = 1
    mask[1, 0, 0] = 1
    m.update(a, mask, split=0)
    m.update(a[1:2], mask[1:2, 0], split=1)  # (B, H, W) mask
    out = m.compute()
    assert _close(out["s0"], (0.5 + 0.75) / 2)
    assert _close(out["s1"], 0.75)
    m2 = AttributionInMask(splits=["s0"])
    m2.update(a[2:], mask[2:])
    assert math.isnan(float(m2.compute()["s0"]))



def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ga = GroupAccuracy(num_classes=2)
        am = AttributionInMask()
        if rank == 0:
            ga.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), split=0)
            am.update(torch.ones(1, 1, 2, 2), torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]), split=0)  # 0.25
        else:
            ga.update(torch.tensor([1, 0]), torch.tensor([0, 0]), split=0)
            ga.update(torch.tensor([1]), torch.tensor([1]), split=2)
            am.update(torch.ones(1, 1, 2, 2), torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]]), split=0)  # 0.75
        out = {k: float(v) for k, v in ga.compute().items()}
        out.update({f"attr/{k}": float(v) for k, v in am.compute().items()})
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_sync_two_gloo_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_ddp_worker, args=(2, free_port(), queue), nprocs=2, join=True)
    results = dict(queue.get() for _ in range(2))
    for rank in (0, 1):
        out = results[rank]
        # all-rank table: split 0 class 0: preds 0 (rank0), 1, 0 (rank1) -> 2/3; class 1: 1/2
        assert _close(out["train_bias/class_0"], 2 / 3)
        assert _close(out["train_bias/class_1"], 0.5)
        assert _close(out["no_bias/class_1"], 1.0)
        assert math.isnan(out["inverse_bias/avg"])
        assert _close(out["attr/train_bias"], 0.5)
    assert results[0] == pytest.approx(results[1], nan_ok=True)
