"""``negspace demo --finetune``: fine-tuning a pretrained backbone with the prior (docs/finetune.md)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from negspace.demo.common import CLASS_NAMES, SPLITS, evaluate_splits, trainer_kwargs
from negspace.demo.table2 import settings_for, summarise

__all__ = ["FinetuneConfig", "run_finetune_demo"]


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

    from negspace.data_modules import SyntheticLesionDataModule
    from negspace.lightning_cli import fill_normalize
    from negspace.modules import ClassifierModule

    L.seed_everything(seed, workers=True, verbose=False)
    dm = SyntheticLesionDataModule(n_train=cfg.n_pretrain, n_val=300, n_test=0, image_size=cfg.image_size,
                                   bias_ratio=0.0, batch_size=cfg.batch_size, seed=seed, augment=False,
                                   data_seed=cfg.pretrain_data_seed + seed)
    module = ClassifierModule(model=cfg.model, num_classes=2, loss="bce", lr=cfg.pretrain_lr, optimizer="adamw",
                              weight_decay=cfg.weight_decay, schedule="cosine")
    fill_normalize(module, dm)
    trainer = L.Trainer(max_epochs=cfg.pretrain_epochs, limit_val_batches=0, **trainer_kwargs(progress))
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
    from negspace.data_modules import SyntheticLesionDataModule
    from negspace.lightning_cli import fill_normalize
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
                        **trainer_kwargs(progress))
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
        for setting, _, mode, unbiased in settings_for("true"):  # the data's masks (no discovery here)
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

