"""CODEC benchmark: hidden contributions for all 16 bottleneck blocks of a ResNet-50 in one pass
(``negspace.attribution.layer_contributions``, method ``act_grad``) vs one Captum ``LayerGradientXActivation``
call per block, at equal results; plus ContributionSAE training throughput.

Run: ``python benchmarks/codec.py [--quick] [--size 64] [--batch 8] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from captum.attr import LayerGradientXActivation

from negspace.attribution import layer_contributions
from negspace.explain.codec import train_sae
from negspace.hooks import get_layer


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a smaller SAE run")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 avoids contention on shared CPUs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = 2 if args.quick else 3

    model = timm.create_model("resnet50", pretrained=False).eval()
    blocks = [f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)]
    assert len(blocks) == 16
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        target = model(x).argmax(1)

    def ours() -> dict[str, torch.Tensor]:
        return layer_contributions(model, blocks, x, target, method="act_grad")

    def captum() -> dict[str, torch.Tensor]:
        return {b: LayerGradientXActivation(model, get_layer(model, b)).attribute(x, target=target) for b in blocks}

    ours()  # warm-up
    t_ours, a = median_time(ours, repeats)
    t_cap, b = median_time(captum, repeats)
    rel = max(float((a[k] - b[k]).detach().abs().max() / b[k].detach().abs().max().clamp_min(1e-30)) for k in blocks)
    print(f"ResNet-50 (random init), x {tuple(x.shape)}, 16 blocks, act_grad to the top logit, {args.threads} thread(s)")
    print(f"  negspace layer_contributions, one pass : {t_ours * 1e3:9.1f} ms (median of {repeats})")
    print(f"  Captum LayerGradientXActivation x16    : {t_cap * 1e3:9.1f} ms (median of {repeats})")
    print(f"  speed-up                               : {t_cap / t_ours:9.2f}x   (target >= 5x)")
    print(f"  max relative difference over blocks    : {rel:9.2e}   (must be <= 1e-5)")
    if rel > 1e-5:
        raise SystemExit("results differ")

    # ContributionSAE training throughput (paper defaults: 3x dictionary, threshold 0.9, batch 128)
    for feats, n in ((256, 4096), (1024, 1024)):  # layer3-/layer4-sized blocks have 1024/2048 channels
        n = n // 2 if args.quick else n
        data = torch.rand(n, feats) * (torch.rand(n, feats) > 0.8)
        fit = train_sae(data, epochs=1, lr=5e-5, batch_size=128, progress=False)
        print(f"  ContributionSAE F={feats:5d} (M={3 * feats}, hidden={feats}): {fit.samples_per_second:10.0f} samples/s")


if __name__ == "__main__":
    main()
