"""Least/most activating patch search over a dataset: unfold + batched forward vs a naive per-window loop.

    python benchmarks/tension.py [--images 64] [--size 32] [--patch 8] [--stride 4] [--repeats 3] [--quick]

Both sides rank every channel of the same layer of the same small CNN and must return the same values.
Prints medians (seconds) over interleaved repeats and the ratio (target >= 10x faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from negspace.explain.tension import activating_patches, channel_values


def small_cnn(channels: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
    ).eval()  # fmt: skip


def naive(model: nn.Module, layer: str, x: torch.Tensor, patch: int, stride: int, k: int) -> torch.Tensor:
    """One forward per window, then a sort per channel (what a per-window loop does)."""
    vals = []
    for i in range(x.shape[0]):
        for top in range(0, x.shape[2] - patch + 1, stride):
            for left in range(0, x.shape[3] - patch + 1, stride):
                vals.append(channel_values(model, layer, x[i : i + 1, :, top : top + patch, left : left + patch])[0])
    v = torch.stack(vals).T  # (C, n_windows)
    return v.topk(k, dim=1, largest=False).values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="16 images, 1 repeat")
    args = p.parse_args()
    if args.quick:
        args.images, args.repeats = 16, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from negspace.models.toy import GreenPixelNet

    x = torch.rand(args.images, 3, args.size, args.size)
    n_win = args.images * ((args.size - args.patch) // args.stride + 1) ** 2
    print(f"{args.images} images {args.size}x{args.size}, {n_win} windows of {args.patch}x{args.patch} "
          f"(stride {args.stride}), all channels ranked, k=8, {args.threads} thread(s), median of {args.repeats}")  # fmt: skip
    for title, model, layer in (
        ("GreenPixelNet (paper 000 toy net), layer conv2", GreenPixelNet().eval(), "conv2"),
        ("3-layer CNN (3x3 convs, 32 ch), last conv", small_cnn(), "4"),
    ):

        def fast(model: nn.Module = model, layer: str = layer) -> torch.Tensor:
            return activating_patches(model, layer, x, patch_size=args.patch, stride=args.stride, k=8,
                                      progress=False).least_values  # fmt: skip

        def slow(model: nn.Module = model, layer: str = layer) -> torch.Tensor:
            return naive(model, layer, x, args.patch, args.stride, 8)

        torch.testing.assert_close(fast(), slow(), rtol=1e-4, atol=1e-5)  # same answer (also the warm-up)
        times: dict[str, list[float]] = {"batched": [], "naive": []}
        for _ in range(args.repeats):
            for name, fn in (("batched", fast), ("naive", slow)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{title}")
        print(f"  batched (unfold + chunked forward): {med['batched']:.4f} s")
        print(f"  naive per-window loop:              {med['naive']:.4f} s")
        print(f"  speed-up: {med['naive'] / med['batched']:.1f}x (target >= 10x)")

if __name__ == "__main__":
    main()
