"""Inference time of an edited model: baked vs hooked vs unedited (target: baked ≤ 1.05× unedited).

Three edits of a random-init torchvision ResNet-18 (eval mode, ``no_grad``, float32, batch 8 at 112×112):

* ``folded``: channel ablations on ``layer1.0.bn1``, ``layer3.0.conv1`` (value 0.5) and ``fc`` — all folded into
  the layers' own weights, so the baked model is the plain architecture with other numbers;
* ``masked``: the block outputs ``layer3`` and ``layer4`` (no weights to fold into): a ``ChannelFill`` after each;
* ``router``: a ``VirtualNeuronRouter`` on ``layer4.1.conv2`` (two neurons) vs its ``RoutedLayer`` module (the
  routing work itself is input-dependent; here the point is that the module costs what the hook costs).

Timings are medians of interleaved repeats (unedited, hooked, baked, unedited, ...), so a load change on the
machine hits all three alike. Run: ``python benchmarks/editing.py [--repeats 15] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from negspace.editing.baking import bake, bake_plan
from negspace.editing.channels import ChannelEdit
from negspace.editing.router import VirtualNeuronRouter
from negspace.explain.pure import VirtualNeuronSet


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=112)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(8, 3, args.size, args.size)
    example = x[:2]
    g = torch.Generator().manual_seed(0)
    vn = VirtualNeuronSet("layer4.1.conv2", "layer4.1.relu", k=2)
    vn.fit({k: torch.rand(12, 512, generator=g) / 512 for k in (3, 7)})
    edits = {
        "folded": ChannelEdit({"layer1.0.bn1": [1, 5], "layer3.0.conv1": [0, 3], "fc": [1, 2]}, value=0.5),
        "masked": ChannelEdit({"layer3": [0, 9], "layer4": [7, 100]}),
        "router": VirtualNeuronRouter(vn, {3: {0: 0.0}, 7: {1: 2.0}}),
    }
    print(f"ResNet-18, input {tuple(x.shape)}, {args.threads} thread(s), medians of {args.repeats} interleaved repeats")
    print(f"{'edit':8s} {'unedited':>10s} {'hooked':>10s} {'baked':>10s} {'baked/unedited':>15s} {'hooked/unedited':>16s}")
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for name, edit in edits.items():
            baked = bake(model, edit, example)
            edit.apply(model)
            try:
                torch.testing.assert_close(baked(x), model(x), atol=1e-4, rtol=1e-4)
                fns = {"plain": lambda: plain(x), "hooked": lambda: model(x), "baked": lambda b=baked: b(x)}
                t = interleaved(fns, args.repeats)
            finally:
                edit.remove()
            print(
                f"{name:8s} {t['plain'] * 1e3:8.1f}ms {t['hooked'] * 1e3:8.1f}ms {t['baked'] * 1e3:8.1f}ms "
                f"{t['baked'] / t['plain']:14.3f}x {t['hooked'] / t['plain']:15.3f}x"
            )
            if isinstance(edit, ChannelEdit):
                print("         baked as: " + ", ".join(f"{s.layer} -> {s.how}" for s in bake_plan(model, edit, example)))


if __name__ == "__main__":
    main()
