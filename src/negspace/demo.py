"""``negspace demo``: paper 000's debiasing experiment (§5.4, Table 2/4) on synthetic lesions.

Four settings are trained on :class:`~negspace.data_modules.SyntheticLesionDataModule` with an X-model
(bias-free, positively homogeneous, so input×gradient = IG exactly) and BCE on one-hot labels:

- ``unbiased``: training data without patches (the upper bound, paper's "None" row);
- ``none``: every benign (class 0) training sample carries a colourful patch, no prior;
- ``presence``: the same biased data with the presence prior (eq. 2) via ``AttributionPrior``;
- ``presence_absence``: with the presence+absence prior (eq. 3).

For the two priors, λ is swept and picked on the *validation* ``no_bias`` split (mean over seeds), as in
paper 000 B.4; the table reports the held-out *test* splits (``train_bias``, ``inverse_bias``, ``no_bias``) of
the picked λ, as mean ± std over seeds, evaluated by :class:`~negspace.callbacks.BiasedSplitReport`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from negspace.sweep import select_lam

__all__ = ["SETTINGS", "DemoConfig", "FinetuneConfig", "check_pattern", "run_demo", "run_finetune_demo", "summarise"]

#: (name, row label, prior mode or None, unbiased training data)
SETTINGS: tuple[tuple[str, str, str | None, bool], ...] = (
    ("unbiased", "None (unbiased training; upper bound)", None, True),
    ("none", "Benign*: no debiasing", None, False),
    ("presence", "Benign*: presence debiasing", "presence", False),
    ("presence_absence", "Benign*: presence+absence debiasing", "presence_absence", False),
)
CLASS_NAMES = ("benign", "malignant")
SPLITS = ("train_bias", "inverse_bias", "no_bias")


@dataclass
class LesionRunConfig:
    """What every run on the built-in lesions shares (the demo's and the comparison's configs extend it)."""

    seeds: int = 3
    epochs: int = 24
    n_train: int = 800
    n_val: int = 300
    n_test: int = 300
    image_size: int = 32
    width: int = 16
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4


@dataclass
class DemoConfig(LesionRunConfig):
    """Everything a demo run depends on (written to ``config.json``)."""

    lambdas: list[float] = field(default_factory=lambda: [3.0, 10.0, 30.0, 100.0])
    method: str = "input_x_gradient"
    start_step: int = 0
    pretrain_epochs: int = 0
    augment: bool = False
    pretrain_data_seed: int = 1000
    threads: int = 1
    quick: bool = False


def _config(quick: bool, seeds, epochs, lambdas, n_train, image_size) -> DemoConfig:
    cfg = DemoConfig(quick=quick)
    if quick:
        cfg.seeds = 1
        cfg.lambdas = [10.0, 100.0]
    for name, value in (("seeds", seeds), ("epochs", epochs), ("n_train", n_train), ("image_size", image_size)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            setattr(cfg, name, value)
    if lambdas is not None:
        if not lambdas or any(not (isinstance(v, int | float) and v > 0) for v in lambdas):
            raise ValueError(f"lambdas must be a non-empty list of positive numbers, got {lambdas!r}")
        cfg.lambdas = [float(v) for v in lambdas]
    return cfg


def _trainer_kwargs(progress: bool) -> dict[str, Any]:
    return {
        "accelerator": "cpu",
        "devices": 1,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": progress,
    }


def pretrain(cfg: DemoConfig, seed: int, progress: bool = False) -> dict[str, torch.Tensor]:
    """Stand-in for the paper's ImageNet pre-training: train the X-model on *unbiased* lesions drawn from an
    independent data seed (``pretrain_data_seed + seed``; disjoint from the images of the experiment) for
    ``pretrain_epochs``. Returns the state dict every setting of this seed starts from."""
    import lightning as L

    from negspace.data_modules import SyntheticLesionDataModule
    from negspace.models.xmodels import XSmallCNN
    from negspace.modules import ClassifierModule

    L.seed_everything(seed, workers=True, verbose=False)
    dm = SyntheticLesionDataModule(
        n_train=cfg.n_train, n_val=2, n_test=0, image_size=cfg.image_size, bias_ratio=0.0,
        batch_size=cfg.batch_size, seed=seed, data_seed=cfg.pretrain_data_seed + seed, augment=cfg.augment,
    )
    net = XSmallCNN(num_classes=2, in_channels=3, width=cfg.width)
    module = ClassifierModule(model=net, num_classes=2, loss="bce", lr=cfg.lr, weight_decay=cfg.weight_decay)
    trainer = L.Trainer(max_epochs=cfg.pretrain_epochs, limit_val_batches=0, **_trainer_kwargs(progress))
    trainer.fit(module, datamodule=dm)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _run_one(cfg: DemoConfig, setting: str, mode: str | None, unbiased: bool, lam: float, seed: int,
             out_dir: str, progress: bool, init: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train one model and return ``{"val": report result, "test": report result, "seconds": float}``."""
    import lightning as L

    from negspace.callbacks import AttributionPrior, BiasedSplitReport
    from negspace.data_modules import SyntheticLesionDataModule
    from negspace.models.xmodels import XSmallCNN
    from negspace.modules import ClassifierModule

    L.seed_everything(seed, workers=True, verbose=False)
    dm = SyntheticLesionDataModule(
        n_train=cfg.n_train,
        n_val=cfg.n_val,
        n_test=cfg.n_test,
        image_size=cfg.image_size,
        bias_ratio=0.0 if unbiased else 1.0,
        batch_size=cfg.batch_size,
        seed=seed,
        augment=cfg.augment,
    )
    net = XSmallCNN(num_classes=2, in_channels=3, width=cfg.width)
    if init is not None:
        net.load_state_dict(init)
    module = ClassifierModule(
        model=net,
        num_classes=2,
        loss="bce",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    run_dir = os.path.join(out_dir, "runs", f"{setting}_lam{lam:g}_seed{seed}")
    report = BiasedSplitReport(class_names=CLASS_NAMES, n_figures=2, print_table=False, method=cfg.method,
                               save_dir=run_dir)
    callbacks: list[Any] = [report]
    if mode is not None:
        # norm_mode="shared": the prior differentiates the training forward's own logits (input×gradient only)
        callbacks.append(AttributionPrior(lam=lam, mode=mode, method=cfg.method, start_step=cfg.start_step,
                                          norm_mode="shared" if cfg.method == "input_x_gradient" else "auto"))
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        limit_val_batches=0,  # the report evaluates once after training (validate + test below)
        default_root_dir=run_dir,
        callbacks=callbacks,
        **_trainer_kwargs(progress),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    val, test = evaluate_splits(trainer, module, dm, report)
    return {"val": val, "test": test, "seconds": time.perf_counter() - t0}


def evaluate_splits(trainer: Any, module: Any, dm: Any, report: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate (all batches) and test a fitted module; ``(val, test)`` results of its ``BiasedSplitReport``."""
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=dm, verbose=False)
    val = report.result
    trainer.test(module, datamodule=dm, verbose=False)
    return val, report.result


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def _aggregate(results: list[dict[str, Any]], stage: str) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        keys = results[0][stage][split].keys()
        for key in keys:
            m, s = mean_std([r[stage][split][key] for r in results])
            mean.setdefault(split, {})[key] = m
            std.setdefault(split, {})[key] = s
    return mean, std


def summarise(runs: dict[tuple[str, float], list[dict[str, Any]]]) -> dict[str, Any]:
    """Pick λ per prior on validation ``no_bias`` Avg. (mean over seeds); aggregate test results (mean, std)."""
    summary: dict[str, Any] = {"rows": {}, "stds": {}, "lambda": {}, "sweep": {}}
    for setting, label, mode, _ in SETTINGS:
        candidates = {lam: rs for (s, lam), rs in runs.items() if s == setting}
        if not candidates:
            continue
        scores = {lam: mean_std([r["val"]["no_bias"]["avg"] for r in rs])[0] for lam, rs in candidates.items()}
        summary["sweep"][setting] = scores
        best = select_lam([{"lam": lam, "score": r["val"]["no_bias"]["avg"], "collapsed": bool(r.get("collapsed"))}
                           for lam, rs in candidates.items() for r in rs])  # the `negspace sweep` rule
        mean, std = _aggregate(candidates[best], "test")
        name = label + (f" (λ={best:g})" if mode else "")
        summary["rows"][name] = mean
        summary["stds"][name] = std
        summary["lambda"][setting] = best
        summary.setdefault("by_setting", {})[setting] = mean
    return summary


def check_pattern(by_setting: dict[str, dict[str, dict[str, float]]], tol: float = 0.05) -> list[tuple[str, bool]]:
    """The issue's expected pattern, evaluated honestly on the test splits (``tol`` = "comes close")."""
    def avg(s: str, split: str) -> float:
        return by_setting[s][split]["avg"]

    checks = []
    checks.append(("no debiasing fails on inverse_bias and no_bias (Avg. < 0.65)",
                   avg("none", "inverse_bias") < 0.65 and avg("none", "no_bias") < 0.65))
    checks.append(("presence helps at most partly (no_bias Avg. below the unbiased bound - tol, or "
                   "inverse_bias Avg. below presence+absence)",
                   avg("presence", "no_bias") < avg("unbiased", "no_bias") - tol
                   or avg("presence", "inverse_bias") < avg("presence_absence", "inverse_bias")))
    checks.append(("presence+absence is best of the biased-data models on inverse_bias and no_bias",
                   all(avg("presence_absence", sp) >= max(avg("none", sp), avg("presence", sp))
                       for sp in ("inverse_bias", "no_bias"))))
    checks.append((f"presence+absence comes close to the unbiased bound on no_bias (within {tol})",
                   avg("presence_absence", "no_bias") >= avg("unbiased", "no_bias") - tol))
    return checks


def run_demo(
    quick: bool = False,
    seeds: int | None = None,
    out: str = "negspace_demo",
    epochs: int | None = None,
    lambdas: list[float] | None = None,
    n_train: int | None = None,
    image_size: int | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the four settings (λ sweep for the priors) and print/write the Table 2 analogue.

    ``overrides`` set any other :class:`DemoConfig` field (e.g. ``width=8, pretrain_epochs=12, augment=True``).

    Writes ``<out>/table.md``, ``<out>/table.csv``, ``<out>/results.json`` and per-run attribution figures in
    ``<out>/runs/*/biased_split_report/``. Returns the summary dict.
    """
    import logging

    from tqdm.auto import tqdm

    from negspace.metrics.report import format_table

    cfg = _config(quick, seeds, epochs, lambdas, n_train, image_size)
    for key, value in overrides.items():
        if key not in DemoConfig.__dataclass_fields__:
            raise ValueError(f"unknown demo option {key!r}; allowed: {sorted(DemoConfig.__dataclass_fields__)}")
        setattr(cfg, key, value)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(cfg.threads)  # tiny convs: one thread is fastest on small, shared CPUs
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)

    jobs = []
    for seed in range(cfg.seeds):
        if cfg.pretrain_epochs:
            jobs.append(("pretrain", None, True, 0.0, seed))
        for setting, _, mode, unbiased in SETTINGS:
            for lam in cfg.lambdas if mode else [0.0]:
                jobs.append((setting, mode, unbiased, lam, seed))
    t0 = time.perf_counter()
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    bar = tqdm(jobs, desc="negspace demo", unit="run", disable=not progress)
    init: dict[int, dict[str, torch.Tensor]] = {}
    for setting, mode, unbiased, lam, seed in bar:
        bar.set_postfix_str(f"{setting} λ={lam:g} seed={seed}")
        if setting == "pretrain":
            t1 = time.perf_counter()
            init[seed] = pretrain(cfg, seed, progress)
            tqdm.write(f"  pre-trained seed {seed} on unbiased lesions ({time.perf_counter() - t1:.0f} s)")
            continue
        res = _run_one(cfg, setting, mode, unbiased, lam, seed, out, progress=progress, init=init.get(seed))
        res.update(setting=setting, lam=lam, seed=seed)
        runs.setdefault((setting, lam), []).append(res)
        tqdm.write(
            f"  {setting:>17s} λ={lam:<7g} seed={seed}: val no_bias Avg. {res['val']['no_bias']['avg']:.3f}, "
            f"test inverse_bias/no_bias Avg. {res['test']['inverse_bias']['avg']:.3f}/"
            f"{res['test']['no_bias']['avg']:.3f} ({res['seconds']:.0f} s)"
        )
    elapsed = time.perf_counter() - t0
    summary = summarise(runs)
    table = format_table(summary["rows"], class_names=CLASS_NAMES, splits=SPLITS, spurious_class=0,
                         stds=summary["stds"] if cfg.seeds > 1 else None)
    checks = check_pattern(summary["by_setting"])
    lines = [
        f"# negspace demo: paper 000 Table 2 analogue ({'quick' if quick else 'full'} run)",
        "",
        f"Test splits, accuracy per class, Avg. and Attr. (relative |attribution| in the patch), mean"
        f"{' ± std' if cfg.seeds > 1 else ''} over {cfg.seeds} seed(s); λ picked on the validation no_bias split "
        f"from {cfg.lambdas}. Total time {elapsed / 60:.1f} min.",
        "",
        table,
        "",
        "λ sweep (validation no_bias Avg.): "
        + "; ".join(f"{s}: " + ", ".join(f"λ={lam:g}→{v:.3f}" for lam, v in sc.items())
                    for s, sc in summary["sweep"].items() if len(sc) > 1),
        "",
        "Pattern check:",
        *[f"- [{'x' if ok else ' '}] {text}" for text, ok in checks],
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "lambda", "split", "metric", "mean", "std"])
        for setting, _, mode, _ in SETTINGS:
            if setting not in summary["by_setting"]:
                continue
            lam = summary["lambda"][setting]
            mean, std = _aggregate(runs[(setting, lam)], "test")
            for split in SPLITS:
                for key in mean[split]:
                    w.writerow([setting, lam if mode else "", split, key, mean[split][key], std[split][key]])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "config": asdict(cfg),
                "seconds": elapsed,
                "lambda": summary["lambda"],
                "sweep": {s: {str(k): v for k, v in sc.items()} for s, sc in summary["sweep"].items()},
                "checks": [{"check": t, "ok": ok} for t, ok in checks],
                "runs": [
                    {k: r[k] for k in ("setting", "lam", "seed", "seconds", "val", "test")}
                    for rs in runs.values() for r in rs
                ],
            },
            f,
            indent=1,
        )
    summary.update(table=text, seconds=elapsed, checks=checks, config=asdict(cfg))
    return summary


# === fine-tuning demo (`negspace demo --finetune`) ===
@dataclass
class FinetuneConfig:
    """The fine-tuning demo: pretrain ``model`` on unbiased lesions from an independent data seed (the stand-in for
    ImageNet weights), save it as a local file, then fine-tune it on the biased data (written to ``config.json``)."""

    model: str = "timm:resnet10t"
    seeds: int = 3
    image_size: int = 32
    n_pretrain: int = 1500
    pretrain_epochs: int = 6
    pretrain_lr: float = 1e-3
    n_train: int = 800
    n_val: int = 300
    n_test: int = 300
    epochs: int = 10
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    freeze_backbone_epochs: int = 1
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    batch_size: int = 64
    lambdas: list[float] = field(default_factory=lambda: [3.0, 10.0, 30.0, 100.0])
    pretrain_data_seed: int = 1000
    threads: int = 1
    quick: bool = False


def _pretrain_backbone(cfg: FinetuneConfig, seed: int, path: str, progress: bool) -> float:
    """Train ``cfg.model`` from scratch on unbiased lesions (data seed ``pretrain_data_seed + seed``), save its
    state dict to ``path`` (safetensors); returns its no-patch accuracy on 300 held-out images."""
    import lightning as L
    from safetensors.torch import save_file

    from negspace.cli import fill_normalize
    from negspace.data_modules import SyntheticLesionDataModule
    from negspace.modules import ClassifierModule

    L.seed_everything(seed, workers=True, verbose=False)
    dm = SyntheticLesionDataModule(n_train=cfg.n_pretrain, n_val=300, n_test=0, image_size=cfg.image_size,
                                   bias_ratio=0.0, batch_size=cfg.batch_size, seed=seed, augment=False,
                                   data_seed=cfg.pretrain_data_seed + seed)
    module = ClassifierModule(model=cfg.model, num_classes=2, loss="bce", lr=cfg.pretrain_lr, optimizer="adamw",
                              weight_decay=cfg.weight_decay, schedule="cosine")
    fill_normalize(module, dm)
    trainer = L.Trainer(max_epochs=cfg.pretrain_epochs, limit_val_batches=0, **_trainer_kwargs(progress))
    trainer.fit(module, datamodule=dm)
    trainer.limit_val_batches = 1.0
    acc = trainer.validate(module, datamodule=dm, verbose=False)[-1]["val/no_bias/acc"]
    save_file({k: v.detach().contiguous() for k, v in module.model.state_dict().items()}, path)
    return float(acc)


def _finetune_one(cfg: FinetuneConfig, setting: str, mode: str | None, unbiased: bool, lam: float, seed: int,
                  weights: str, out_dir: str, progress: bool) -> dict[str, Any]:
    """Fine-tune the pretrained file on (un)biased lesions with an optional prior; evaluate like ``_run_one``."""
    import lightning as L

    from negspace.callbacks import AttributionPrior, BiasedSplitReport
    from negspace.cli import fill_normalize
    from negspace.data_modules import SyntheticLesionDataModule
    from negspace.modules import ClassifierModule

    L.seed_everything(seed, workers=True, verbose=False)
    dm = SyntheticLesionDataModule(n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                                   image_size=cfg.image_size, bias_ratio=0.0 if unbiased else 1.0,
                                   batch_size=cfg.batch_size, seed=seed, augment=False)
    load = ({"pretrained_file": weights} if cfg.model.startswith("timm:")
            else {"weights": weights, "weights_head": False})  # a fresh head either way
    module = ClassifierModule(model=cfg.model, num_classes=2, loss="bce", lr=cfg.lr, optimizer="adamw",
                              weight_decay=cfg.weight_decay, backbone_lr_mult=cfg.backbone_lr_mult,
                              freeze_backbone_epochs=cfg.freeze_backbone_epochs, schedule="cosine",
                              warmup_epochs=cfg.warmup_epochs, **load)
    fill_normalize(module, dm)  # what the CLI does: the model's own mean/std, applied after the patches
    report = BiasedSplitReport(class_names=CLASS_NAMES, n_figures=2, print_table=False)
    callbacks: list[Any] = [report]
    if mode is not None:
        callbacks.append(AttributionPrior(lam=lam, mode=mode))
    trainer = L.Trainer(max_epochs=cfg.epochs, limit_val_batches=0, callbacks=callbacks,
                        default_root_dir=os.path.join(out_dir, "runs", f"{setting}_lam{lam:g}_seed{seed}"),
                        **_trainer_kwargs(progress))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    val, test = evaluate_splits(trainer, module, dm, report)
    return {"val": val, "test": test, "seconds": time.perf_counter() - t0}


def run_finetune_demo(quick: bool = False, out: str = "negspace_finetune_demo", progress: bool = True,
                      **overrides: Any) -> dict[str, Any]:
    """Pretrain, save, fine-tune with none / presence / presence+absence (λ picked on validation ``no_bias``) and
    an unbiased fine-tuning bound; print and write ``<out>/table.md`` and ``<out>/results.json``.

    ``quick``: 1 seed, λ ∈ {10, 100}. ``overrides``: any :class:`FinetuneConfig` field (``None`` = default)."""
    import logging

    from tqdm.auto import tqdm

    from negspace.metrics.report import format_table

    cfg = FinetuneConfig(quick=quick)
    if quick:
        cfg.seeds, cfg.lambdas = 1, [10.0, 100.0]
    for key, value in overrides.items():
        if key not in FinetuneConfig.__dataclass_fields__:
            raise ValueError(f"unknown fine-tuning demo option {key!r}; allowed: {sorted(FinetuneConfig.__dataclass_fields__)}")
        if value is not None:
            setattr(cfg, key, value)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    pretrain_acc: dict[int, float] = {}
    for seed in range(cfg.seeds):
        path = os.path.join(out, f"pretrained_seed{seed}.safetensors")
        t1 = time.perf_counter()
        pretrain_acc[seed] = _pretrain_backbone(cfg, seed, path, progress)
        tqdm.write(f"  pretrained {cfg.model} seed {seed} on unbiased lesions: no_bias acc {pretrain_acc[seed]:.3f} "
                   f"({time.perf_counter() - t1:.0f} s) -> {path}")
        for setting, _, mode, unbiased in SETTINGS:
            for lam in cfg.lambdas if mode else [0.0]:
                res = _finetune_one(cfg, setting, mode, unbiased, lam, seed, path, out, progress)
                res.update(setting=setting, lam=lam, seed=seed)
                runs.setdefault((setting, lam), []).append(res)
                tqdm.write(f"  {setting:>17s} λ={lam:<5g} seed={seed}: val no_bias {res['val']['no_bias']['avg']:.3f}, "
                           f"test inverse_bias/no_bias {res['test']['inverse_bias']['avg']:.3f}/"
                           f"{res['test']['no_bias']['avg']:.3f} ({res['seconds']:.0f} s)")
    elapsed = time.perf_counter() - t0
    summary = summarise(runs)
    table = format_table(summary["rows"], class_names=CLASS_NAMES, splits=SPLITS, spurious_class=0,
                         stds=summary["stds"] if cfg.seeds > 1 else None)
    by = summary["by_setting"]
    checks = [
        ("presence+absence within 0.05 of unbiased fine-tuning on no_bias",
         by["presence_absence"]["no_bias"]["avg"] >= by["unbiased"]["no_bias"]["avg"] - 0.05),
        ("no debiasing fails on inverse_bias (Avg. < 0.65)", by["none"]["inverse_bias"]["avg"] < 0.65),
    ]
    text = "\n".join([
        f"# negspace demo --finetune ({'quick' if quick else 'full'} run): {cfg.model}",
        "",
        f"Pretrained on {cfg.n_pretrain} unbiased lesions (no_bias acc "
        + ", ".join(f"{a:.3f}" for a in pretrain_acc.values())
        + f"), fine-tuned {cfg.epochs} epochs: AdamW lr {cfg.lr:g}, backbone ×{cfg.backbone_lr_mult:g}, "
        f"backbone frozen {cfg.freeze_backbone_epochs} epoch(s), warm-up {cfg.warmup_epochs:g} epoch + cosine. "
        f"Test splits, mean over {cfg.seeds} seed(s); λ picked on validation no_bias from {cfg.lambdas}. "
        f"Total time {elapsed / 60:.1f} min.",
        "",
        table,
        "",
        "λ sweep (validation no_bias Avg.): " + "; ".join(
            f"{s}: " + ", ".join(f"λ={lam:g}→{v:.3f}" for lam, v in sc.items())
            for s, sc in summary["sweep"].items() if len(sc) > 1),
        "",
        "Pattern check:",
        *[f"- [{'x' if ok else ' '}] {t}" for t, ok in checks],
        "",
    ])
    print("\n" + text)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": asdict(cfg), "seconds": elapsed, "pretrain_acc": pretrain_acc,
                   "lambda": summary["lambda"], "checks": [{"check": t, "ok": ok} for t, ok in checks],
                   "runs": [{k: r[k] for k in ("setting", "lam", "seed", "seconds", "val", "test")}
                            for rs in runs.values() for r in rs]}, f, indent=1)
    summary.update(table=text, seconds=elapsed, checks=checks, config=asdict(cfg), pretrain_acc=pretrain_acc)
    return summary
