"""Choosing λ (issue 18): where is the useful window, and do ``normalize="fraction"`` / ``lam="auto"`` transfer?

``python benchmarks/priors_lambda.py [--settings lesions32,lesions16,cnn32,warm32,digits] [--seeds 0,1,2]
[--rows all|sweep|auto|none,mask:10,fraction:auto,...] [--json out.json]`` trains, per setting and seed, no prior,
the paper's form at several λ, the scale-free form at several λ and ``lam="auto"`` (both forms), one thread, and
writes one JSON row per run. ``--table a.json,b.json`` merges such files (e.g. of two processes with disjoint
``--settings``) into the markdown tables of docs/priors.md ("Choosing λ"): validation no_bias class-mean accuracy,
mean ± std over seeds, ``Cn`` = collapse flagged in n runs, ``Nn`` = no effect flagged in n runs, and per setting
and form the gap between ``lam="auto"`` and the best swept λ. ``--diagnose`` prints the gradient norms of CE and
of the unweighted penalty over training (the figure data of docs/priors.md); ``--cost`` times a step with a fixed λ
and with ``lam="auto"`` measuring once, every 10 steps (default) and every step.

Runs are deterministic on one thread: the training augmentation (albumentations) is seeded from the run's seed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from negspace.callbacks import AttributionPrior, BiasedSplitReport
from negspace.data_modules import SpuriousPatchDataModule, SyntheticLesionDataModule
from negspace.data_modules.transforms import paper_train_transforms
from negspace.models.xmodels import XSmallCNN
from negspace.modules import ClassifierModule
from negspace.priors import LamController, grad_norm, prior_loss

PAPER = [1.0, 10.0, 100.0, 1000.0]
FRACTION = [0.1, 1.0, 10.0]
SETTINGS = "lesions32,lesions16,cnn32,warm32,digits"


class PlainCNN(nn.Module):
    """An ordinary 3-conv CNN with biases, ReLU and max-pooling (not an X-model)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, 2 * width, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.Linear(2 * width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        return self.fc(F.relu(self.c3(h)).mean((2, 3)))


def seeded_augment(seed: int) -> Any:
    """The data modules' default augmentation (flip + colour jitter) with its own seed (reproducible runs)."""
    t = paper_train_transforms(3)
    t.set_random_seed(seed)
    return t


def digits_data(seed: int) -> SpuriousPatchDataModule:
    """scikit-learn digits 3 vs 8 (bundled, no download), upsampled to 16×16 RGB, colourful patch on class 0."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = [i for i, t in enumerate(d.target) if t in (3, 8)]
    x = torch.tensor(d.images[keep], dtype=torch.float32).div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    items = [(x[i].clone(), int(d.target[keep[i]] == 8)) for i in range(len(keep))]
    return SpuriousPatchDataModule(items, spurious_class=0, patch_size=0.25, val_fraction=0.3, batch_size=32,
                                   seed=seed, transforms=seeded_augment(seed))


def setting(name: str, seed: int, quick: bool) -> tuple[Any, nn.Module, int]:
    """``(data module, network, epochs)`` of a setting (the seed also draws the data and the split)."""
    n = 240 if quick else 400
    if name == "digits":
        return digits_data(seed), PlainCNN(8), 40
    if name not in ("lesions32", "lesions16", "cnn32", "warm32"):
        raise ValueError(f"setting must be one of {SETTINGS}, got {name!r}")
    size = 16 if name == "lesions16" else 32
    dm = SyntheticLesionDataModule(n_train=n, n_val=150, n_test=0, image_size=size, batch_size=32, seed=seed,
                                   transforms=seeded_augment(seed))
    net = PlainCNN(8) if name == "cnn32" else XSmallCNN(num_classes=2, in_channels=3, width=8)
    return dm, net, 6 if quick else 10


def pretrained(net: nn.Module, seed: int, epochs: int) -> None:
    """Warm start: train ``net`` on unbiased lesions from an independent data seed."""
    dm = SyntheticLesionDataModule(n_train=400, n_val=2, n_test=0, image_size=32, bias_ratio=0.0, batch_size=32,
                                   seed=seed, data_seed=1000 + seed, transforms=seeded_augment(1000 + seed))
    trainer = L.Trainer(max_epochs=epochs, limit_val_batches=0, **_kw())
    trainer.fit(ClassifierModule(model=net, num_classes=2, loss="bce", lr=1e-3), datamodule=dm)


def _kw() -> dict[str, Any]:
    return {"accelerator": "cpu", "devices": 1, "num_sanity_val_steps": 0, "logger": False,
            "enable_checkpointing": False, "enable_model_summary": False, "enable_progress_bar": False}


class Flags(L.Callback):
    """Whether the prior's monitor flagged a collapse / no effect at *any* step (not only the last one)."""

    def __init__(self, name: str = "attribution_prior") -> None:
        self.name, self.seen = name, {"collapsed": 0.0, "stalled": 0.0, "no_effect": 0.0}
        self.lams: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        for k in self.seen:
            v = trainer.callback_metrics.get(f"{self.name}/{k}")
            if v is not None:
                self.seen[k] = max(self.seen[k], float(v))
        lam = trainer.callback_metrics.get(f"{self.name}/lam")
        if lam is not None:
            self.lams.append(float(lam))


def run(name: str, lam: float | str | None, normalize: str, seed: int, quick: bool = False,
        auto: dict[str, Any] | None = None) -> dict[str, Any]:
    """One training run and its validation report; ``auto`` = :class:`LamController` options for ``lam="auto"``."""
    L.seed_everything(seed, verbose=False)
    dm, net, epochs = setting(name, seed, quick)
    if name.startswith("warm"):
        pretrained(net, seed, 4)
    module = ClassifierModule(model=net, num_classes=2, loss="bce", lr=1e-3, weight_decay=1e-4)
    report, flags = BiasedSplitReport(n_figures=0, print_table=False), Flags()
    cbs: list[Any] = [report, flags]
    prior = None
    if lam is not None:
        prior = AttributionPrior(lam=lam, normalize=normalize, norm_mode="shared")
        if auto and prior.auto is not None:  # a controller variant (benchmark only; the callback uses defaults)
            opts = auto[normalize] if isinstance(auto.get(normalize), dict) else auto  # per form or shared
            prior.auto = LamController(**opts)
        cbs.append(prior)
    trainer = L.Trainer(max_epochs=epochs, limit_val_batches=0, callbacks=cbs, **_kw())
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    last = {k.split("/")[-1]: float(v) for k, v in trainer.callback_metrics.items()
            if k.endswith(("/mass_in_mask", "/penalty", "/ratio"))}
    last["collapsed_end"] = float(trainer.callback_metrics.get("attribution_prior/collapsed", 0.0))
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=dm, verbose=False)
    res = report.result
    lams = flags.lams or [0.0]
    return {"setting": name, "lam": lam, "normalize": normalize, "seed": seed, "seconds": seconds,
            "no_bias": res["no_bias"]["avg"], "inverse_bias": res["inverse_bias"]["avg"], **last, **flags.seen,
            "lam_used": prior.lam if prior is not None else 0.0, "lam_min": min(lams), "lam_max": max(lams),
            "auto": auto or {}}


def diagnose(seed: int = 0, lam: float = 10.0, epochs: int = 8) -> list[dict[str, float]]:
    """‖∇CE‖ and ‖∇penalty‖ (unweighted, both forms) on a fixed batch after every epoch (lesions 32, XSmallCNN)."""
    L.seed_everything(seed, verbose=False)
    dm, net, _ = setting("lesions32", seed, quick=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    x, y, m = batch["image"], batch["label"], batch["mask"]
    rows: list[dict[str, float]] = []

    class Probe(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
            params = [p for p in net.parameters() if p.requires_grad]
            with torch.enable_grad():
                ce = F.cross_entropy(net(x), y)
                row = {"epoch": trainer.current_epoch, "ce": float(ce), "grad_ce": grad_norm(ce, params)}
                for form in ("mask", "fraction"):
                    pen = prior_loss(net, x, y, m, normalize=form)
                    row[f"pen_{form}"], row[f"grad_{form}"] = float(pen), grad_norm(pen, params)
            rows.append(row)

    module = ClassifierModule(model=net, num_classes=2, loss="bce", lr=1e-3, weight_decay=1e-4)
    trainer = L.Trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[Probe(), AttributionPrior(lam=lam)], **_kw())
    trainer.fit(module, datamodule=dm)
    return rows


def cost(repeats: int = 3) -> dict[str, float]:
    """Seconds per training step (best of ``repeats`` fits, lesions32, X-SmallCNN, paper form) with a fixed λ and
    with ``lam="auto"`` measuring once, every 10 steps (the default) and every step: the price of recalibration."""
    variants: dict[str, dict[str, Any] | None] = {"fixed λ=10": None, "auto, once": {"every": 0},
                                                  "auto, every 10 steps": {}, "auto, every step": {"every": 1}}
    out: dict[str, float] = {}
    for label, auto in variants.items():
        best = math.inf
        for _ in range(repeats):
            L.seed_everything(0, verbose=False)
            dm, net, epochs = setting("lesions32", 0, quick=False)
            prior = AttributionPrior(lam=10.0 if auto is None else "auto", norm_mode="shared", monitor=False)
            if auto is not None:
                prior.auto = LamController(**auto)
            module = ClassifierModule(model=net, num_classes=2, loss="bce", lr=1e-3)
            trainer = L.Trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[prior], **_kw())
            t0 = time.perf_counter()
            trainer.fit(module, datamodule=dm)
            best = min(best, (time.perf_counter() - t0) / max(1, trainer.global_step))
        out[label] = best
    return out


# ------------------------------------------------------------------------------------------------ grid / table
def grid(rows: str) -> list[tuple[float | str | None, str]]:
    """``"all"`` (every row of the table), ``"sweep"`` (no prior and the fixed λ), ``"auto"`` (both forms' auto)
    or a comma list of ``none`` / ``<form>:<λ|auto>`` (form ``mask`` = the paper's, or ``fraction``)."""
    full = [(None, "mask")] + [(v, "mask") for v in PAPER] + [("auto", "mask")]
    full += [(v, "fraction") for v in FRACTION] + [("auto", "fraction")]
    if rows == "all":
        return full
    if rows == "sweep":
        return [r for r in full if r[0] != "auto"]
    if rows == "auto":
        return [r for r in full if r[0] == "auto"]
    out: list[tuple[float | str | None, str]] = []
    for part in rows.split(","):
        if part == "none":
            out.append((None, "mask"))
            continue
        form, _, lam = part.partition(":")
        if form not in ("mask", "fraction") or not lam:
            raise ValueError(f"--rows: each entry must be 'none' or '<mask|fraction>:<λ|auto>', got {part!r}")
        out.append(("auto" if lam == "auto" else float(lam), form))
    return out


def _cell(rs: list[dict[str, Any]], lam_used: bool = False) -> str:
    nb = [r["no_bias"] for r in rs]
    inv = statistics.mean(r["inverse_bias"] for r in rs)
    sd = statistics.stdev(nb) if len(nb) > 1 else 0.0
    text = f"{statistics.mean(nb):.2f} ± {sd:.2f} ({inv:.2f})"
    end = sum(r.get("collapsed_end", 0) > 0 for r in rs)
    ever, n = sum(r.get("collapsed", 0) > 0 for r in rs), sum(r.get("no_effect", 0) > 0 for r in rs)
    text += (f" C{end}" if ever else "") + (f"+{ever - end}" if ever > end else "") + (f" N{n}" if n else "")
    if lam_used:
        text += f" [λ {statistics.mean(r['lam_min'] for r in rs):.2g}–{statistics.mean(r['lam_max'] for r in rs):.2g}]"
    return text


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown tables of docs/priors.md from benchmark rows (several seeds per cell)."""
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        form = "none" if r["lam"] is None else r["normalize"]
        by.setdefault((r["setting"], form, str(r["lam"])), []).append(r)
    names = [s for s in SETTINGS.split(",") if any(k[0] == s for k in by)]
    seeds = sorted({r["seed"] for r in rows})
    out = [f"no_bias mean ± std over seeds {seeds} (inverse_bias mean); Cn+m = collapse (or stall) still flagged at "
           "the end of n runs and flagged for a while in m more; Nn = no effect flagged in n runs; [λ] = mean "
           "smallest–largest λ used by auto", ""]
    for form, lams in (("mask", PAPER), ("fraction", FRACTION)):
        head = ["setting", "no prior", *[f"{form} λ={v:g}" for v in lams], f"{form} auto"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in names:
            cells = [s, _cell(by[(s, "none", "None")]) if (s, "none", "None") in by else ""]
            cells += [_cell(by[(s, form, str(v))]) if (s, form, str(v)) in by else "" for v in lams]
            cells.append(_cell(by[(s, form, "auto")], lam_used=True) if (s, form, "auto") in by else "")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += ["| setting | form | best swept λ | its no_bias | auto | auto − best | within 0.05 |",
            "|---|---|---|---|---|---|---|"]
    for s in names:
        for form, lams in (("mask", PAPER), ("fraction", FRACTION)):
            swept = {v: statistics.mean(r["no_bias"] for r in by[(s, form, str(v))]) for v in lams
                     if (s, form, str(v)) in by}
            if not swept or (s, form, "auto") not in by:
                continue
            best = max(swept, key=lambda v: (swept[v], -v))
            auto = [r["no_bias"] for r in by[(s, form, "auto")]]
            gap = statistics.mean(auto) - swept[best]
            sd = [statistics.stdev(x) if len(x) > 1 else 0.0 for x in
                  ([r["no_bias"] for r in by[(s, form, str(best))]], auto)]
            out.append(f"| {s} | {form} | {best:g} | {swept[best]:.2f} ± {sd[0]:.2f} | {statistics.mean(auto):.2f} ± "
                       f"{sd[1]:.2f} | {gap:+.2f} | {'yes' if gap >= -0.05 else 'no'} |")
    def at_chance(r: dict[str, Any]) -> bool:
        return r["no_bias"] <= 0.55 and r["inverse_bias"] >= 0.45 and abs(r["no_bias"] - r["inverse_bias"]) < 0.05

    silent = [r for r in rows if r["lam"] is not None and at_chance(r) and not r.get("collapsed")]
    plain = {(r["setting"], r["seed"]) for r in rows if r["lam"] is None and at_chance(r)}
    out += ["", f"runs at chance (no_bias ≤ 0.55, inverse_bias ≈ no_bias) without a collapse flag: {len(silent)}"
            + "".join(f"\n  {r['setting']} {r['normalize']} λ={r['lam']} seed {r['seed']}: "
                      f"{r['no_bias']:.2f} / {r['inverse_bias']:.2f}"
                      + (" (no prior is at chance in this seed too)" if (r["setting"], r["seed"]) in plain else "")
                      for r in silent)]
    flagged = [r for r in rows if r.get("collapsed")]
    fine = [r for r in flagged if r["no_bias"] >= 0.6]
    out.append(f"runs flagged collapsed (incl. stalled) at some step: {len(flagged)}, of which {len(fine)} ended with "
               f"no_bias >= 0.6 (false alarms: slow starts); still flagged at the end: "
               f"{sum(bool(r.get('collapsed_end')) for r in flagged)}")
    secs = [r["seconds"] for r in rows]
    out.append(f"{len(rows)} runs, {sum(secs) / 60:.1f} min of training")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--settings", default=SETTINGS)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default="all", help="all | sweep | auto | none,mask:10,fraction:auto,...")
    p.add_argument("--auto", default=None, help="JSON of LamController options for the auto rows (a variant); "
                   'per form: {"mask": {...}, "fraction": {...}}')
    p.add_argument("--quick", action="store_true")
    p.add_argument("--diagnose", action="store_true")
    p.add_argument("--cost", action="store_true", help="seconds per step: fixed λ vs lam='auto' (recalibration)")
    p.add_argument("--json", default=None, help="write the rows here (appended to the file's rows if it exists)")
    p.add_argument("--table", default=None, help="comma-separated JSON files of rows: print the tables and exit")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.table:
        rows = [r for path in args.table.split(",") for r in json.load(open(path))]
        print(table(rows))
        return
    if args.diagnose:
        print(json.dumps(diagnose(), indent=1))
        return
    if args.cost:
        for label, sec in cost().items():
            print(f"{label:22s} {1000 * sec:6.1f} ms / step")
        return
    auto = json.loads(args.auto) if args.auto else None
    rows: list[dict[str, Any]] = []
    if args.json:
        try:
            rows = json.load(open(args.json))
        except FileNotFoundError:
            rows = []
    for name in args.settings.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for lam, form in grid(args.rows):
                r = run(name, lam, form, seed, args.quick, auto=auto if lam == "auto" else None)
                rows.append(r)
                flag = ("C" if r.get("collapsed") else "") + ("N" if r.get("no_effect") else "")
                print(f"{name:10s} s{seed} {form:8s} lam={lam!s:6s} used={r['lam_min']:.3g}..{r['lam_max']:.3g} "
                      f"no_bias={r['no_bias']:.3f} inv={r['inverse_bias']:.3f} {flag} ({r['seconds']:.0f}s)",
                      flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)
                if not math.isfinite(r["no_bias"]):
                    raise FloatingPointError(f"no_bias is {r['no_bias']} in {r}")


if __name__ == "__main__":
    main()
