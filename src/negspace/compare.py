"""``negspace demo --compare``: negspace's prior against the baselines users would pick instead, in one harness.

Every method trains the same X-model (``XSmallCNN``, BCE on one-hot labels) on the same biased synthetic lesions
(every benign training image carries a patch), for the same epochs, with the same sweep budget (at most
``budget`` values of its one hyper-parameter), picked on the *validation* ``no_bias`` Avg. (mean over seeds);
the table reports the held-out *test* splits as mean ± std over seeds, the worst group (worst class of any
split; every (split, class) cell is one group) and the wall-clock per epoch relative to plain training (ERM).

Methods: ``erm`` (plain training), ``negspace`` (presence+absence prior), ``rrr``, ``rrr_gradcam`` (mask-based,
:mod:`negspace.priors.rightreasons`), ``reweight``, ``groupdro``, ``jtt``, ``dfr`` (no masks,
:mod:`negspace.robust`). DFR refits the last layer of each seed's ERM model on the group-balanced validation
``train_bias`` + ``inverse_bias`` splits (never on ``no_bias``, the selection split). See docs/baselines.md.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from negspace.demo.common import CLASS_NAMES, SPLITS, LesionRunConfig, evaluate_splits, mean_std

__all__ = ["COMPARE_METHODS", "CompareConfig", "run_compare"]

#: name -> (row label, hyper-parameter name or None)
COMPARE_METHODS: dict[str, tuple[str, str | None]] = {
    "erm": ("ERM (no debiasing)", None),
    "negspace": ("negspace presence+absence prior", "λ"),
    "rrr": ("RRR (Ross et al. 2017)", "λ"),
    "rrr_gradcam": ("RRR-GradCAM", "λ"),
    "reweight": ("group reweighting", None),
    "groupdro": ("GroupDRO", "η"),
    "jtt": ("JTT", "λ_up"),
    "dfr": ("DFR (last layer on held-out groups)", "C"),
}


@dataclass
class CompareConfig(LesionRunConfig):
    """Everything a comparison run depends on (written to ``results.json``)."""

    budget: int = 4
    methods: list[str] = field(default_factory=lambda: list(COMPARE_METHODS))
    grids: dict[str, list[float]] = field(default_factory=lambda: {
        "negspace": [3.0, 10.0, 30.0, 100.0],
        "rrr": [1.0, 10.0, 100.0, 1000.0],
        "rrr_gradcam": [1.0, 10.0, 100.0, 1000.0],
        "groupdro": [0.001, 0.01, 0.1, 1.0],
        "jtt": [2.0, 5.0, 10.0, 20.0],
        "dfr": [1.0, 0.3, 0.1, 0.03],
    })
    gradcam_layer: str = "model.features.10"  # the last conv of XSmallCNN
    threads: int = 1


def _callbacks(cfg: CompareConfig, method: str, value: float) -> list[Any]:
    from negspace.callbacks import JTT, AttributionPrior, GroupDRO, GroupReweighting

    if method == "negspace":
        return [AttributionPrior(lam=value, mode="presence_absence", norm_mode="shared")]
    if method in ("rrr", "rrr_gradcam"):
        layer = cfg.gradcam_layer if method == "rrr_gradcam" else None
        return [AttributionPrior(lam=value, loss=method, layer=layer)]
    if method == "reweight":
        return [GroupReweighting(by="group", criterion="bce")]
    if method == "groupdro":
        return [GroupDRO(num_groups=4, eta=value, criterion="bce")]
    if method == "jtt":
        return [JTT(first_epochs=max(1, cfg.epochs // 4), lam_up=value, criterion="bce")]
    return []


def _run(cfg: CompareConfig, method: str, value: float, seed: int, erm: Any = None) -> dict[str, Any]:
    """Train (or, for DFR, refit ``erm``'s head) and evaluate one model; returns val/test results and timing."""
    import lightning as L

    from negspace.callbacks import BiasedSplitReport
    from negspace.data_modules import SyntheticLesionDataModule
    from negspace.models.xmodels import XSmallCNN
    from negspace.modules import ClassifierModule
    from negspace.robust import fit_dfr, head_features, set_head

    L.seed_everything(seed, workers=True, verbose=False)
    dm = SyntheticLesionDataModule(n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                                   image_size=cfg.image_size, bias_ratio=1.0, batch_size=cfg.batch_size, seed=seed,
                                   augment=False)
    report = BiasedSplitReport(class_names=CLASS_NAMES, n_figures=0, print_table=False)
    kw = {"accelerator": "cpu", "devices": 1, "num_sanity_val_steps": 0, "logger": False,
          "enable_checkpointing": False, "enable_model_summary": False, "enable_progress_bar": False}
    t0 = time.perf_counter()
    if method == "dfr":
        module = copy.deepcopy(erm["module"])
        dm.setup("fit")
        loaders = dm.val_dataloader()[:2]  # train_bias + inverse_bias: all four groups; no_bias stays for selection
        parts = [head_features(module.model, "classifier", dl) for dl in loaders]
        f, y, g = (torch.cat([p[i] for p in parts]) for i in range(3))
        set_head(module.model, "classifier", fit_dfr(f, y, g, num_classes=2, c=value, bias=False, seed=seed))
        seconds = erm["seconds"] + time.perf_counter() - t0
        trainer = L.Trainer(max_epochs=0, callbacks=[report], **kw)
    else:
        net = XSmallCNN(num_classes=2, in_channels=3, width=cfg.width)
        module = ClassifierModule(model=net, num_classes=2, loss="bce", lr=cfg.lr, weight_decay=cfg.weight_decay)
        trainer = L.Trainer(max_epochs=cfg.epochs, limit_val_batches=0,
                            callbacks=[report, *_callbacks(cfg, method, value)], **kw)
        trainer.fit(module, datamodule=dm)
        seconds = time.perf_counter() - t0
    val, test = evaluate_splits(trainer, module, dm, report)
    return {"val": val, "test": test, "seconds_per_epoch": seconds / cfg.epochs, "module": module,
            "seconds": seconds}


def _aggregate(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for split in SPLITS:
        for key in runs[0]["test"][split]:
            mean.setdefault(split, {})[key], std.setdefault(split, {})[key] = mean_std(
                [r["test"][split][key] for r in runs])
    mean["worst"], std["worst"] = mean_std([r["test"]["worst"] for r in runs])
    return mean, std


def run_compare(out: str = "negspace_compare", progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Run every method of ``CompareConfig.methods`` over its sweep and seeds; write ``<out>/table.md`` and
    ``<out>/results.json``; return the summary (``rows``, ``stds``, ``picked``, ``time``, ``table``)."""
    import logging

    from negspace.metrics.report import format_table

    cfg = CompareConfig()
    for key, value in overrides.items():
        if key not in CompareConfig.__dataclass_fields__:
            raise ValueError(f"unknown compare option {key!r}; allowed: {sorted(CompareConfig.__dataclass_fields__)}")
        if value is not None:
            setattr(cfg, key, value)
    bad = [m for m in cfg.methods if m not in COMPARE_METHODS]
    if bad:
        raise ValueError(f"methods must be among {list(COMPARE_METHODS)}, got {bad}")
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    t_start = time.perf_counter()
    runs: dict[str, dict[float, list[dict[str, Any]]]] = {}
    needs_erm = "dfr" in cfg.methods or "erm" in cfg.methods
    for seed in range(cfg.seeds):
        erm = _run(cfg, "erm", 0.0, seed) if needs_erm else None
        for method in cfg.methods:
            grid = cfg.grids.get(method, [0.0])[: cfg.budget] if COMPARE_METHODS[method][1] else [0.0]
            for value in grid:
                res = erm if method == "erm" else _run(cfg, method, value, seed, erm)
                runs.setdefault(method, {}).setdefault(value, []).append(res)
                if progress:
                    print(f"  {method:>12s} {value:<7g} seed={seed}: val no_bias Avg. {res['val']['no_bias']['avg']:.3f}, "
                          f"test worst group {res['test']['worst']:.3f} ({res['seconds']:.0f} s)", flush=True)
    base = mean_std([r["seconds_per_epoch"] for r in runs.get("erm", {}).get(0.0, [])])[0]
    rows, stds, picked, rel = {}, {}, {}, {}
    for method, by_value in runs.items():
        scores = {v: mean_std([r["val"]["no_bias"]["avg"] for r in rs])[0] for v, rs in by_value.items()}
        best = max(scores, key=lambda v: (scores[v], -v))
        label, param = COMPARE_METHODS[method]
        name = label + (f" ({param}={best:g})" if param else "")
        rows[name], stds[name] = _aggregate(by_value[best])
        picked[method] = {"value": best, "val_no_bias": scores}
        rel[name] = mean_std([r["seconds_per_epoch"] for r in by_value[best]])[0] / base if base else float("nan")
    table = format_table(rows, class_names=CLASS_NAMES, splits=SPLITS, spurious_class=0,
                         stds=stds if cfg.seeds > 1 else None)
    extra = ["| Method | worst group (test) | time / epoch vs ERM |", "|---|---|---|"]
    for name in rows:
        pm = " ± " + f"{stds[name]['worst']:.3f}" if cfg.seeds > 1 else ""
        extra.append(f"| {name} | {rows[name]['worst']:.3f}{pm} | {rel[name]:.2f}× |")
    elapsed = time.perf_counter() - t_start
    text = "\n".join([
        f"# negspace demo --compare ({cfg.seeds} seed(s), {cfg.epochs} epochs, n_train={cfg.n_train}, "
        f"budget {cfg.budget}; {elapsed / 60:.1f} min)", "", table, "", *extra, "",
    ])
    if progress:
        print("\n" + text)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    clean = {m: {str(v): [{k: r[k] for k in ("val", "test", "seconds_per_epoch")} for r in rs]
                 for v, rs in bv.items()} for m, bv in runs.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": asdict(cfg), "picked": {m: {"value": p["value"], "val_no_bias": {str(k): s for k, s in
                   p["val_no_bias"].items()}} for m, p in picked.items()}, "runs": clean, "seconds": elapsed}, f,
                  indent=1)
    return {"rows": rows, "stds": stds, "picked": picked, "time": rel, "table": text, "config": asdict(cfg)}
