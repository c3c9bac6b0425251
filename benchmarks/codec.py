"""CODEC benchmark: hidden contributions for all 16 bottleneck blocks of a ResNet-50 in one pass
(``negspace.attribution.layer_contributions``, method ``act_grad``) vs one Captum ``LayerGradientXActivation``
call per block, at equal results; plus ContributionSAE training throughput.

``--fidelity`` instead measures the paper-default choices of docs/fidelity.md (002) on a planted network
(600 samples × 12 channels; class k drives channels 3k..3k+2): SAE schedule (paper vs default), encoder
(sigmoid vs identity) and target (softmax probability vs logit). About 30 s on one thread.

Run: ``python benchmarks/codec.py [--quick] [--size 64] [--batch 8] [--threads 1] [--fidelity]``
"""

from __future__ import annotations

import argparse
import time
import warnings

import timm
import torch
from captum.attr import LayerGradientXActivation
from torch import nn

from _measure import median_time  # the sibling helper module
from negspace.attribution import layer_contributions
from negspace.explain.codec import compute_contributions, fit_modes, train_sae
from negspace.hooks import get_layer


def planted(n_per_class: int = 150, classes: int = 4, group: int = 3) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Identity 1×1 conv + ReLU + a head where class k reads channels group·k.. (+2) and the others (−0.5);
    class-k images light up those channels (the network of tests/test_codec_fidelity.py)."""
    c = classes * group
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(c)[:, :, None, None])
        net[0].bias.zero_()
        w = torch.full((classes, c), -0.5)
        for k in range(classes):
            w[k, k * group : (k + 1) * group] = 2.0
        net[4].weight.copy_(w)
        net[4].bias.zero_()
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.rand(len(y), c, 4, 4, generator=g) * 0.3
    for k in range(classes):
        idx = y == k
        amp = 0.5 + 1.5 * torch.rand(int(idx.sum()), group, 1, 1, generator=g)
        x[idx, k * group : (k + 1) * group] += amp * (torch.rand(int(idx.sum()), group, 4, 4, generator=g) > 0.5)
    return net.eval(), x, y


def fidelity() -> None:
    net, x, y = planted()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=200)
    print("planted 600 × 12: planted modes found / SAE R² / mode–class corr (untrained SAE) / seconds")
    for target in ("top_prob", "top_logit"):
        data = compute_contributions(net, loader, "1", target=target, progress=False)
        for label, kw in (("paper schedule (300 ep, lr 5e-5)", {"epochs": 300, "lr": 5e-5, "early_stopping": False}),
                          ("defaults (sigmoid)", {}), ("defaults, activation='identity'", {"activation": "identity"})):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = fit_modes(data, "1", num_classes=4, baseline=False, statistics=False, progress=False, **kw)
            found = sum(m.channels(k, 25).tolist() == list(range(3 * k, 3 * k + 3)) for k in range(4))
            print(f"  {target:9s} {label:34s} {found}/4  R² {m.r2:6.3f}  corr {m.stats['mode_class_corr']:.3f} "
                  f"({m.stats['untrained_mode_class_corr']:.3f})  {time.perf_counter() - t0:5.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a smaller SAE run")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 avoids contention on shared CPUs)")
    ap.add_argument("--fidelity", action="store_true", help="only the paper-default measurements (planted network)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.fidelity:
        fidelity()
        return
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

    # ContributionSAE training throughput (paper defaults: 3x dictionary, sigmoid codes, threshold 0.9, batch 128);
    # one epoch says nothing about R², so the low-R² warning is off here
    for feats, n in ((256, 4096), (1024, 1024)):  # layer3-/layer4-sized blocks have 1024/2048 channels
        n = n // 2 if args.quick else n
        data = torch.rand(n, feats) * (torch.rand(n, feats) > 0.8)
        fit = train_sae(data, epochs=1, lr=5e-5, batch_size=128, progress=False, min_r2=None, early_stopping=False)
        print(f"  ContributionSAE F={feats:5d} (M={3 * feats}, hidden={feats}): {fit.samples_per_second:10.0f} samples/s")


if __name__ == "__main__":
    main()
