"""Per-step cost and peak memory of the attribution prior across real architectures (issue 11, item 5).

Run: ``python benchmarks/priors_archs.py [--models resnet18,...] [--repeats 3] [--threads 1] [--norm-mode auto]``

Architectures (random init, 2 classes, batch 32 × 3 × 64 × 64, a 16×16 mask on every sample): timm
``resnet18``, ``resnet50``, ``efficientnet_b0``, ``convnext_atto``, ``vit_tiny_patch16_224`` (``img_size=64``:
a 4×4 patch grid) and negspace's X-ResNet-18. One training step = zero_grad, forward, cross-entropy,
[prior], backward, Adam step, computed exactly as ``AttributionPrior`` does it (the same
``capture_training_forward`` / ``penalty_step`` calls, without Lightning), in each model's default mode
(``norm_mode="auto"``: the shared training forward on all six, since every sample is masked).

Printed per model: median CPU seconds per step (``time.process_time`` of this process: with one thread it
does not count the time other jobs on a shared machine take from us, which made wall-clock ratios swing by 2×
between runs) over interleaved repeats (round-robin over the variants), the ratios presence / plain (target ≤ 2.5×) and presence+absence / presence
(target ≤ 1.5×), and peak memory:

* ``peak MB`` — extra resident memory of one step (Linux): free the allocator's cached heap
  (``malloc_trim``), reset the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``), run the step,
  report ``VmHWM − VmRSS(before)``; model, optimizer state and data are already resident. (``tracemalloc``
  does not see torch's CPU allocations.) The ratio prior/plain is the memory target (≤ 2.5×).
* ``saved MB`` — bytes of the distinct tensors autograd saves during the step (``saved_tensors_hooks``),
  a deterministic proxy for activation memory.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from _measure import peak_step_memory_mb  # the sibling helper module
from negspace.priors import attributed_model, capture_training_forward, penalty_step

B, HW, PATCH = 32, 64, 16
MODELS = ("resnet18", "resnet50", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224", "xresnet18")
VARIANTS = ("plain", "presence", "presence_absence")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "xresnet18":
        from negspace.models import xresnet18

        return xresnet18(num_classes=2)
    import timm

    kw = {"img_size": HW} if name.startswith("vit") else {}
    return timm.create_model(name, num_classes=2, pretrained=False, **kw)


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, HW, HW, generator=g)
    mask = torch.zeros(B, 1, HW, HW)
    mask[:, :, :PATCH, :PATCH] = 1
    return x, torch.arange(B) % 2, mask


def make_steps(model: nn.Module, opt: torch.optim.Optimizer, norm_mode: str) -> tuple[dict[str, Callable], list]:
    """The three variants; the list collects the plan each prior step used."""
    x, y, mask = data()
    logits_of = attributed_model(model, None, None)
    plans: list[str] = []

    def step(mode: str | None) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            if mode is None:
                loss = F.cross_entropy(model(x), y)
            else:
                with capture_training_forward(logits_of, model, x, mask, norm_mode=norm_mode) as planned:
                    loss = F.cross_entropy(model(x), y)
                plans.append(planned["plan"])
                loss = loss + penalty_step(model, logits_of, x, y, mask, step=planned, mode=mode,
                                           norm_mode=norm_mode).loss
            loss.backward()
            opt.step()

        return run

    return {"plain": step(None), "presence": step("presence"), "presence_absence": step("presence_absence")}, plans


def saved_mb(fn: Callable[[], None]) -> float:
    """MB of the distinct tensors autograd saves while ``fn`` runs (forward and ``create_graph`` backward)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError):  # tensors without storage
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def bench(name: str, repeats: int, norm_mode: str, memory: bool) -> dict[str, dict[str, float]]:
    model = build(name).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    steps, plans = make_steps(model, opt, norm_mode)
    steps["plain"]()  # allocates Adam's state, so that it is not counted as step memory
    out: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
    for v, fn in steps.items():  # warm-up doubles as the memory measurement
        if memory:
            try:
                out[v]["peak"] = peak_step_memory_mb(fn)
            except OSError:
                memory = False
                fn()
            out[v]["saved"] = saved_mb(fn)
        else:
            fn()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for v, fn in steps.items():
            t0 = time.process_time()
            fn()
            times[v].append(time.process_time() - t0)
    for v in VARIANTS:
        out[v]["s"] = statistics.median(times[v])
    out["plan"] = {"/".join(sorted(set(plans))): 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--norm-mode", default="auto", choices=("auto", "shared", "eval", "separate"))
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {B}x3x{HW}x{HW}, 2 classes, {PATCH}x{PATCH} masks on all samples, input x gradient, "
          f"norm_mode={args.norm_mode!r}, torch {torch.__version__}, {args.threads} thread(s), median CPU s/step "
          f"of {args.repeats} interleaved repeats")
    head = (f"{'model':<22}{'plan':<9}{'plain':>8}{'pres':>8}{'p+a':>8}{'pres/plain':>11}{'p+a/pres':>9}"
            f"{'peak MB plain/pres/p+a':>25}{'peak pres/plain':>16}{'saved MB plain/pres/p+a':>25}")
    print(head)
    for name in args.models.split(","):
        t0 = time.perf_counter()
        r = bench(name, args.repeats, args.norm_mode, not args.no_memory)
        s = {v: r[v]["s"] for v in VARIANTS}
        pk = [r[v].get("peak", float("nan")) for v in VARIANTS]
        sv = [r[v].get("saved", float("nan")) for v in VARIANTS]
        peak_ratio = max(pk[1], pk[2]) / pk[0] if pk[0] > 0 else float("nan")
        print(f"{name:<22}{next(iter(r['plan'])):<9}{s['plain']:8.3f}{s['presence']:8.3f}"
              f"{s['presence_absence']:8.3f}{s['presence'] / s['plain']:10.2f}x"
              f"{s['presence_absence'] / s['presence']:8.2f}x"
              f"{f'{pk[0]:.0f}/{pk[1]:.0f}/{pk[2]:.0f}':>25}{peak_ratio:15.2f}x"
              f"{f'{sv[0]:.0f}/{sv[1]:.0f}/{sv[2]:.0f}':>25}   ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("targets: presence/plain <= 2.5x, presence+absence/presence <= 1.5x, peak (worse prior variant)/plain "
          "<= 2.5x")


if __name__ == "__main__":
    main()
