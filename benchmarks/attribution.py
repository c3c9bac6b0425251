"""Attribution core vs Captum and vs the naive way, on the same model and batch, in one run.

    python benchmarks/attribution.py [--repeats 7] [--batch 8] [--size 64]

Prints medians (seconds) and ratios. Measurements of the two sides are interleaved, repeat by repeat,
so that machine noise hits both alike; quote the ratios.

(a) our integrated_gradients vs Captum's IntegratedGradients at the same n_steps     (target <= 1.0x)
(b) act_grad contributions of all four ResNet-18 stages in one call vs four Captum
    LayerGradientXActivation calls                                                     (target >= 3x faster)
(c) K = 2 targets per sample in one call vs one call                                  (target <= 1.7x)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from captum.attr import IntegratedGradients, LayerGradientXActivation

from negspace.attribution import input_x_gradient, integrated_gradients, layer_contributions


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n-steps", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    for q in model.parameters():
        q.requires_grad_(False)  # attribution needs no parameter gradients (both sides alike)
    x = torch.rand(args.batch, 3, args.size, args.size)
    t = torch.randint(0, 10, (args.batch,))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, resnet18, batch {tuple(x.shape)}, "
          f"{args.repeats} repeats (medians)\n")

    # (a) IG vs Captum, same quadrature (Gauss-Legendre) and n_steps, all steps in one pass on both sides
    ig = IntegratedGradients(model)
    ours = integrated_gradients(model, x, t, n_steps=args.n_steps)
    ref = ig.attribute(x, target=t, n_steps=args.n_steps)
    diff = ((ours - ref).abs().max() / ref.abs().max()).item()
    m = interleaved(
        {
            "negspace": lambda: integrated_gradients(model, x, t, n_steps=args.n_steps),
            "captum": lambda: ig.attribute(x, target=t, n_steps=args.n_steps),
        },
        args.repeats,
    )
    print(f"(a) IG, n_steps={args.n_steps}: negspace {m['negspace']:.3f}s  captum {m['captum']:.3f}s  "
          f"ratio {m['negspace'] / m['captum']:.2f}x (target <= 1.0x; max rel. diff {diff:.1e})")

    # (b) act_grad on four stages at once vs four Captum LayerGradientXActivation calls
    stages = ["layer1", "layer2", "layer3", "layer4"]
    lgxa = {s: LayerGradientXActivation(model, model.get_submodule(s)) for s in stages}
    ours_b = layer_contributions(model, stages, x, t, method="act_grad")
    rel_b = max(
        ((ours_b[s] - lgxa[s].attribute(x, target=t)).abs().max() / ours_b[s].abs().max()).item() for s in stages
    )
    m = interleaved(
        {
            "negspace": lambda: layer_contributions(model, stages, x, t, method="act_grad"),
            "captum": lambda: [lgxa[s].attribute(x, target=t) for s in stages],
        },
        args.repeats,
    )
    print(f"(b) act_grad, 4 stages: negspace {m['negspace']:.3f}s  captum x4 {m['captum']:.3f}s  "
          f"speed-up {m['captum'] / m['negspace']:.2f}x (target >= 3x; max rel. diff {rel_b:.1e})")

    # (c) K = 2 targets in one call (one forward, vmapped backward) vs one target
    t2 = torch.stack([t, (t + 1) % 10], dim=1)
    m = interleaved(
        {
            "one": lambda: input_x_gradient(model, x, t),
            "two": lambda: input_x_gradient(model, x, t2),
            "ig_one": lambda: integrated_gradients(model, x, t, n_steps=8),
            "ig_two": lambda: integrated_gradients(model, x, t2, n_steps=8),
        },
        args.repeats,
    )
    print(f"(c) K=2 targets, input x gradient: one {m['one']:.3f}s  two {m['two']:.3f}s  "
          f"ratio {m['two'] / m['one']:.2f}x (target <= 1.7x; two separate calls = 2.0x)")
    print(f"    K=2 targets, IG n_steps=8:     one {m['ig_one']:.3f}s  two {m['ig_two']:.3f}s  "
          f"ratio {m['ig_two'] / m['ig_one']:.2f}x")


if __name__ == "__main__":
    main()
