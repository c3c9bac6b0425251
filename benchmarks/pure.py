"""PURE circuits for all 512 channels of a ResNet-18 ``layer4`` (100 reference samples each).

Compared with the naive way: one forward of a neuron's 100 references + one backward per neuron (the
paper's per-neuron partial backward pass). The naive loop is timed on a subset of neurons (8) and
extrapolated linearly to 512 (it is exactly linear in the number of neurons); so is negspace's autograd
path on the block output (``--general-neurons``, default 128; pass 512 to time all). Printed lines say
which numbers are measured and which extrapolated.

Two settings:
* ``layer4`` (block output, the paper's penultimate layer) with circuits on ``layer4.0`` — general autograd
  path: each needed sample is forwarded once, the backwards of all neurons it serves are batched;
* ``layer4.1.conv2`` with circuits on ``layer4.1.act1`` — exact fast path (no backward at all).

Random-init timm ResNet-18 at 64×64 (no downloads), ``N`` random images. Run:
``python benchmarks/pure.py [--quick]``.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from _measure import median_time  # the sibling helper module
from negspace.explain.pure import References, circuits, reference_circuits, reference_samples


def naive(model, layer, circuit_layer, x, refs, neurons: list[int], reduce: str) -> torch.Tensor:
    """Per-neuron loop: forward the neuron's references, one backward of its reduced activation."""
    out = []
    for row in neurons:
        xs = x[refs.indices[row]]
        out.append(circuits(model, layer, circuit_layer, xs, int(refs.neurons[row]), reduce=reduce, fast=False))
    return torch.stack(out)



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer images and neurons")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--n-ref", type=int, default=100)
    ap.add_argument("--general-neurons", type=int, default=128,
                    help="neurons timed for negspace on the block output (autograd path); 512 = all")
    ap.add_argument("--fast-only", action="store_true", help="only the exact fast path (layer4.1.conv2)")
    args = ap.parse_args()
    torch.manual_seed(0)
    n_img = 150 if args.quick else args.images
    n_naive = 4 if args.quick else 8
    n_general = 64 if args.quick else args.general_neurons
    # zero_init_last=False: timm otherwise zeroes each block's last BN scale (blocks would be identities)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False).eval()
    x = torch.rand(n_img, 3, 64, 64)
    print(f"ResNet-18 (random init), {n_img} random images 64x64, circuits for 512 neurons x n_ref={args.n_ref}, "
          f"{torch.get_num_threads()} threads")
    subset = torch.linspace(0, 511, n_naive).long().tolist()
    settings = (
        ("layer4.1.conv2", "layer4.1.act1", True, 512, 3),  # layer4's last conv: exact fast path
        ("layer4", "layer4.0", "auto", n_general, 1),  # block output (paper's penultimate layer): autograd path
    )
    for layer, circuit_layer, fast, n_ours, repeats in settings[:1] if args.fast_only else settings:
        t0 = time.perf_counter()
        refs = reference_samples(model, layer, x, n_ref=args.n_ref)
        t_refs = time.perf_counter() - t0
        rows = torch.linspace(0, 511, n_ours).long()
        refs_ours = References(refs.layer, refs.neurons[rows], refs.indices[rows], refs.values[rows])
        t_ours, ours = median_time(lambda: reference_circuits(model, circuit_layer, x, refs_ours, fast=fast), repeats)  # noqa: B023
        t_naive, ref = median_time(lambda: naive(model, layer, circuit_layer, x, refs, subset, "relu"), 1)  # noqa: B023
        common = [i for i, r in enumerate(rows.tolist()) if r in subset]
        err = float((ours[common] - ref[[subset.index(int(rows[i])) for i in common]]).abs().max()) if common else float("nan")
        t_ours_all = t_ours * 512 / n_ours
        t_naive_all = t_naive * 512 / len(subset)
        path = "exact fast path, no backward" if fast is True else "autograd: 1 forward/sample + 1 replicated backward"
        print(f"\n{layer} <- {circuit_layer} [{path}]  (reference search: {t_refs:.1f} s)")
        extra = "" if n_ours == 512 else f" -> extrapolated to 512: {t_ours_all:7.1f} s"
        print(f"  negspace, {n_ours:3d} neurons measured   : {t_ours:7.2f} s (median of {repeats}){extra}")
        print(f"  naive loop, {len(subset)} neurons measured: {t_naive:7.2f} s -> extrapolated to 512: {t_naive_all:7.1f} s")
        print(f"  ratio naive/negspace for 512 neurons: {t_naive_all / t_ours_all:6.1f}x   "
              f"max |diff| on shared neurons: {err:.1e}")


if __name__ == "__main__":
    main()
