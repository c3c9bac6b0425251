"""Per-step cost of the attribution prior (paper 000, eqs. 2/3) on a timm ResNet-18 and the X-ResNet-18.

Run: ``python benchmarks/priors.py [--quick] [--no-memory] [--threads N]``

One training step = zero_grad, forward, cross-entropy, [prior], backward, Adam step; batch 32 at 64×64,
2 classes, a 16×16 mask on every sample ("full") or on half of them ("half"). Printed: median seconds
over interleaved repeats (round-robin over variants, so load drift on a shared machine hits all variants
alike) and the ratios the issue asks for:

* presence vs plain (target ≤ 2.5×), presence with half the batch unmasked vs plain (target ≤ 1.8×),
* presence+absence vs presence (target ≤ 1.5×; paper 000 reports ≈ 2×),
* our ``prior_loss`` (one forward, K = 2 backwards batched with ``is_grads_batched``) vs a naive per-class
  loop (one full forward + attribution backward per class), both for presence+absence;
* mask-free debiasing (issue 16): computing the batch's masks with a ``ConceptMask`` on a frozen reference
  model (one no-grad forward stopped at ``layer3``, projection, upsampling, threshold, dilation) vs a plain
  step (target ≤ 0.3×), and the shared presence+absence step with those masks vs with given masks.

Peak memory: tracemalloc does not see torch's CPU allocations (they bypass Python's allocator), and
``ru_maxrss`` cannot be reset, so it would only show the largest variant. Instead, per variant: free the
allocator's cached heap (``malloc_trim``), reset the kernel's high-water mark (``/proc/self/clear_refs``
← 5), run one step and report ``VmHWM − VmRSS`` — the extra resident memory the step needs on top of
model, optimizer state and data (Linux only; skipped elsewhere).

Variants without suffix are the separate attribution pass (``prior_loss``; ``AttributionPrior(norm_mode=
"separate")``). ``*_shared`` variants are ``AttributionPrior(norm_mode="shared")`` — the default (``"auto"``)
with input×gradient on BatchNorm nets, and on BN-free models such as the X-ResNet when more than half the
batch is masked: the prior differentiates the logits of the training forward, so the loss and the prior
share one forward and one backward through it. With half the batch unmasked, "auto" on BN-free models uses
the separate pass on the masked half (``presence_half``). ``benchmarks/priors_archs.py`` runs the default
mode on six architectures.

Threads default to 1: the benchmark machine is shared and oversubscribed OpenMP threads made timings
10–30× noisier; ratios are what matters.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _measure import peak_step_memory_mb  # the sibling helper module
from negspace.masks import ConceptMask
from negspace.priors import attribution_prior, compute_prior_from_logits, prior_loss

B, HW, PATCH = 32, 64, 16
VARIANTS = (
    "plain",
    "presence",
    "presence_half",
    "presence_absence",
    "naive_presence_absence",
    "presence_shared",
    "presence_absence_shared",
    "concept_masks",
    "presence_absence_shared_concept",
)


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

    concept = ConceptMask("layer3", torch.ones(256) / 16.0, threshold=0.5, model=model)  # frozen reference copy

    def shared(mode: str, masks: Callable[[], torch.Tensor] = lambda: full) -> Callable[[], None]:
        """``AttributionPrior(norm_mode="shared")``: the prior differentiates the training forward's logits."""

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            mask = masks()
            xr = x.detach().requires_grad_(True)
            logits = model(xr)
            loss = F.cross_entropy(logits, y) + compute_prior_from_logits(logits, xr, y, mask, mode=mode).loss
            loss.backward()
            opt.step()

        return run

    return {
        "plain": step(None),
        "presence": step(lambda: prior_loss(model, x, y, full, mode="presence")),
        "presence_half": step(lambda: prior_loss(model, x, y, half, mode="presence")),
        "presence_absence": step(lambda: prior_loss(model, x, y, full, mode="presence_absence")),
        "naive_presence_absence": step(lambda: naive_prior(model, x, y, full)),
        "presence_shared": shared("presence"),
        "presence_absence_shared": shared("presence_absence"),
        "concept_masks": lambda: concept(x),
        "presence_absence_shared_concept": shared("presence_absence", lambda: concept(x)),
    }


def check_equal(model) -> float:
    """Our batched prior equals the naive per-class loop (and IxG = IG on the X-model is tested elsewhere)."""
    x, y, full, _ = data()
    ours = float(prior_loss(model, x, y, full, mode="presence_absence").detach())
    naive = float(naive_prior(model, x, y, full).detach())
    return abs(ours - naive) / max(abs(naive), 1e-12)


def time_model(model_name: str, repeats: int, with_memory: bool) -> tuple[dict[str, float], dict[str, float]]:
    model = build(model_name).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    steps = make_steps(model, opt)
    steps["plain"]()  # allocates Adam's state, so that it is not counted as step memory
    mem = {}
    for name, fn in steps.items():  # warm-up; doubles as the memory measurement
        if with_memory:
            try:
                mem[name] = peak_step_memory_mb(fn)
                continue
            except OSError:  # not Linux / no /proc
                with_memory = False
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, mem




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 3")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="resnet18,xresnet18")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 3
    print(f"batch {B}x3x{HW}x{HW}, 2 classes, {PATCH}x{PATCH} masks, torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {repeats} interleaved repeats; input x gradient attributions")
    for name in args.models.split(","):
        med, mem = time_model(name, repeats, not args.no_memory)
        rel = check_equal(build(name).train())
        print(f"\n== {name} ==  (ours vs naive loss: rel. diff {rel:.1e})")
        print(f"{'variant':<34}{'median s/step':>14}{'x plain':>9}{'peak MB':>10}")
        for v in VARIANTS:
            m = f"{mem[v]:10.0f}" if v in mem else f"{'-':>10}"
            print(f"{v:<34}{med[v]:14.3f}{med[v] / med['plain']:9.2f}{m}")
        pr = med["presence"] / med["plain"]
        ph = med["presence_half"] / med["plain"]
        pa = med["presence_absence"] / med["presence"]
        nv = med["naive_presence_absence"] / med["presence_absence"]
        print(f"presence / plain                 {pr:5.2f}x  (target <= 2.5x)")
        print(f"presence, half unmasked / plain  {ph:5.2f}x  (target <= 1.8x)")
        print(f"presence+absence / presence      {pa:5.2f}x  (target <= 1.5x)")
        print(f"naive per-class loop / ours      {nv:5.2f}x  (presence+absence step)")
        sp = med["presence_shared"] / med["plain"]
        sa = med["presence_absence_shared"] / med["presence_shared"]
        print(f"shared forward: presence / plain {sp:5.2f}x,  presence+absence / presence {sa:5.2f}x")
        cm = med["concept_masks"] / med["plain"]
        cs = med["presence_absence_shared_concept"] / med["presence_absence_shared"]
        print(f"concept masks (frozen reference) / plain {cm:5.2f}x  (target <= 0.3x); shared p+a step with "
              f"concept masks / with given masks {cs:5.2f}x")


if __name__ == "__main__":
    main()
