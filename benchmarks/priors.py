"""Per-step cost of the attribution prior (paper 000, eqs. 2/3) on a timm ResNet-18 and the X-ResNet-18.

Run: ``python benchmarks/priors.py [--quick] [--no-memory] [--threads N]``

One training step = zero_grad, forward, cross-entropy, [prior], backward, Adam step; batch 32 at 64×64,
2 classes, a 16×16 mask on every sample ("full") or on half of them ("half"). Printed: median seconds
over interleaved repeats (round-robin over variants, so load drift on a shared machine hits all variants
alike) and the ratios the issue asks for:

* presence vs plain (target ≤ 2.5×), presence with half the batch unmasked vs plain (target ≤ 1.8×),
* presence+absence vs presence (target ≤ 1.5×; paper 000 reports ≈ 2×),
* our ``prior_loss`` (one forward, K = 2 backwards batched with ``is_grads_batched``) vs a naive per-class
  loop (one full forward + attribution backward per class), both for presence+absence.

Peak memory: tracemalloc does not see torch's CPU allocations, so each (model, variant) runs in a fresh
subprocess that reports the growth of ``ru_maxrss`` (peak resident set) from just before the first step
to after two steps — the extra memory the step needs on top of model, optimizer state and data.

Threads default to 1: the benchmark machine is shared and oversubscribed OpenMP threads made timings
10–30× noisier; ratios are what matters.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from negspace.priors import attribution_prior, prior_loss

B, HW, PATCH = 32, 64, 16
VARIANTS = ("plain", "presence", "presence_half", "presence_absence", "naive_presence_absence")


def build(model_name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if model_name == "resnet18":
        import timm

        return timm.create_model("resnet18", num_classes=2)
    if model_name == "xresnet18":
        from negspace.models import xresnet18

        return xresnet18(num_classes=2)
    raise ValueError(f"model must be 'resnet18' or 'xresnet18', got {model_name!r}")


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, HW, HW, generator=g)
    y = torch.arange(B) % 2
    full = torch.zeros(B, 1, HW, HW)
    full[:, :, :PATCH, :PATCH] = 1
    half = full.clone()
    half[B // 2 :] = 0
    return x, y, full, half


def naive_prior(model, x, y, mask) -> torch.Tensor:
    """The way it is usually written: one forward + one attribution backward per class."""
    terms = []
    for t in (y, 1 - y):
        xr = x.detach().requires_grad_(True)
        logit = model(xr).gather(1, t[:, None]).sum()
        (g,) = torch.autograd.grad(logit, xr, create_graph=True)
        terms.append(attribution_prior(g * x, mask))
    return (terms[0] + terms[1]).mean()


def make_steps(model, opt) -> dict[str, Callable[[], None]]:
    x, y, full, half = data()

    def step(extra: Callable[[], torch.Tensor] | None) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if extra is not None:
                loss = loss + extra()
            loss.backward()
            opt.step()

        return run

    return {
        "plain": step(None),
        "presence": step(lambda: prior_loss(model, x, y, full, mode="presence")),
        "presence_half": step(lambda: prior_loss(model, x, y, half, mode="presence")),
        "presence_absence": step(lambda: prior_loss(model, x, y, full, mode="presence_absence")),
        "naive_presence_absence": step(lambda: naive_prior(model, x, y, full)),
    }


def check_equal(model) -> float:
    """Our batched prior equals the naive per-class loop (and IxG = IG on the X-model is tested elsewhere)."""
    x, y, full, _ = data()
    ours = prior_loss(model, x, y, full, mode="presence_absence")
    naive = naive_prior(model, x, y, full)
    return abs(float(ours) - float(naive)) / max(abs(float(naive)), 1e-12)


def time_model(model_name: str, repeats: int) -> dict[str, float]:
    model = build(model_name).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    steps = make_steps(model, opt)
    for fn in steps.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def memory_child(model_name: str, variant: str, threads: int) -> None:
    torch.set_num_threads(threads)
    model = build(model_name).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    fn = make_steps(model, opt)[variant]
    with torch.no_grad():  # touch model and data once so they are resident before measuring
        model(data()[0][:2])
    for p in model.parameters():  # Adam state allocated lazily: count it as baseline, not as step memory
        opt.state[p]["exp_avg"] = torch.zeros_like(p)
        opt.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        opt.state[p]["step"] = torch.tensor(0.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": (after - before) / 1024}))


def memory(model_name: str, threads: int) -> dict[str, float]:
    procs = {
        v: subprocess.Popen(
            [sys.executable, __file__, "--child", model_name, v, "--threads", str(threads)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for v in VARIANTS
    }
    out = {}
    for v, p in procs.items():
        stdout, _ = p.communicate(timeout=600)
        out[v] = json.loads(stdout.strip().splitlines()[-1])["peak_mb"] if p.returncode == 0 else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 5")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="resnet18,xresnet18")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        memory_child(*args.child, args.threads)
        return
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 5
    print(f"batch {B}x3x{HW}x{HW}, 2 classes, {PATCH}x{PATCH} masks, torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {repeats} interleaved repeats; input x gradient attributions")
    for name in args.models.split(","):
        med = time_model(name, repeats)
        rel = check_equal(build(name).train())
        mem = {} if args.no_memory else memory(name, args.threads)
        print(f"\n== {name} ==  (ours vs naive loss: rel. diff {rel:.1e})")
        print(f"{'variant':<26}{'median s/step':>14}{'x plain':>9}{'peak MB':>10}")
        for v in VARIANTS:
            m = f"{mem[v]:10.0f}" if v in mem else f"{'-':>10}"
            print(f"{v:<26}{med[v]:14.3f}{med[v] / med['plain']:9.2f}{m}")
        pr = med["presence"] / med["plain"]
        ph = med["presence_half"] / med["plain"]
        pa = med["presence_absence"] / med["presence"]
        nv = med["naive_presence_absence"] / med["presence_absence"]
        print(f"presence / plain                 {pr:5.2f}x  (target <= 2.5x)")
        print(f"presence, half unmasked / plain  {ph:5.2f}x  (target <= 1.8x)")
        print(f"presence+absence / presence      {pa:5.2f}x  (target <= 1.5x)")
        print(f"naive per-class loop / ours      {nv:5.2f}x  (presence+absence step)")


if __name__ == "__main__":
    main()
