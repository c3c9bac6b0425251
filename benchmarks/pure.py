"""PURE circuits for all 512 channels of a ResNet-18 ``layer4`` (100 reference samples each).

Compared with the naive way: one forward of a neuron's 100 references + one backward per neuron (the
paper's per-neuron partial backward pass). The naive loop is timed on a subset of neurons and
extrapolated linearly to 512 (it is linear in the number of neurons); the printed ratio says so.

Two settings:
* ``layer4`` (block output, the paper's penultimate layer) with circuits on ``layer4.0`` — general autograd
  path: each needed sample is forwarded once, the backwards of all neurons it serves are batched;
* ``layer4.1.conv2`` with circuits on ``layer4.1.act1`` — exact fast path (no backward at all).

Random-init timm ResNet-18 at 64×64 (no downloads), ``N`` random images. Run:
``python benchmarks/pure.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from negspace.editing.pure import circuits, reference_circuits, reference_samples


def naive(model, layer, circuit_layer, x, refs, neurons: list[int], reduce: str) -> torch.Tensor:
    """Per-neuron loop: forward the neuron's references, one backward of its reduced activation."""
    out = []
    for row in neurons:
        xs = x[refs.indices[row]]
        out.append(circuits(model, layer, circuit_layer, xs, int(refs.neurons[row]), reduce=reduce, fast=False))
    return torch.stack(out)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, res = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer images, neurons in the naive loop and repeats")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--n-ref", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    n_img = 200 if args.quick else args.images
    n_naive = 4 if args.quick else 8
    repeats = 1 if args.quick else 3
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.rand(n_img, 3, 64, 64)

    t0 = time.perf_counter()
    refs = reference_samples(model, "layer4", x, n_ref=args.n_ref)
    t_refs = time.perf_counter() - t0
    print(f"ResNet-18 (random init), {n_img} images 64x64, 512 neurons x n_ref={args.n_ref}; references: {t_refs:.2f} s")
    subset = torch.linspace(0, 511, n_naive).long().tolist()

    for layer, circuit_layer, fast in (("layer4", "layer4.0", "auto"), ("layer4.1.conv2", "layer4.1.act1", True)):
        refs_l = refs if layer == "layer4" else reference_samples(model, layer, x, n_ref=args.n_ref)
        t_ours, ours = timed(lambda: reference_circuits(model, circuit_layer, x, refs_l, fast=fast), repeats)  # noqa: B023
        t_naive, ref = timed(lambda: naive(model, layer, circuit_layer, x, refs_l, subset, "max"), repeats)  # noqa: B023
        err = float((ours[subset] - ref).abs().max())
        t_naive_all = t_naive * 512 / len(subset)
        path = "fast path (no backward)" if fast is True else "batched autograd"
        print(f"\n{layer} <- {circuit_layer} [{path}]")
        print(f"  negspace, all 512 neurons            : {t_ours:8.2f} s (median of {repeats})")
        print(f"  naive loop, {len(subset)} neurons measured      : {t_naive:8.2f} s -> extrapolated to 512: {t_naive_all:8.1f} s")
        print(f"  ratio (naive extrapolated / negspace): {t_naive_all / t_ours:8.1f}x   max |diff| on the subset: {err:.2e}")


if __name__ == "__main__":
    main()
