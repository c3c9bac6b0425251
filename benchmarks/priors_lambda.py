"""Choosing λ (issue 18): where is the useful window, and do ``normalize="fraction"`` / ``lam="auto"`` transfer?

``python benchmarks/priors_lambda.py [--settings lesions32,lesions16,cnn32,warm32,digits] [--quick]`` trains, per
setting, no prior, the paper's form at several λ, the scale-free form at several λ and ``lam="auto"`` (both
forms), and prints one markdown table (validation no_bias class-mean accuracy; ``C`` = collapse flagged,
``N`` = no effect flagged). ``--diagnose`` prints the gradient norms of CE and of the unweighted penalty
over training (the figure data of docs/priors.md, "Choosing λ").
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from negspace.callbacks import AttributionPrior, BiasedSplitReport
from negspace.data_modules import SpuriousPatchDataModule, SyntheticLesionDataModule
from negspace.models.xmodels import XSmallCNN
from negspace.modules import ClassifierModule
from negspace.priors import grad_norm, prior_loss

PAPER = [1.0, 10.0, 100.0, 1000.0]
FRACTION = [0.1, 1.0, 10.0]


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


def digits_data(seed: int) -> SpuriousPatchDataModule:
    """scikit-learn digits 3 vs 8 (bundled, no download), upsampled to 16×16 RGB, colourful patch on class 0."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = [i for i, t in enumerate(d.target) if t in (3, 8)]
    x = torch.tensor(d.images[keep], dtype=torch.float32).div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    items = [(x[i].clone(), int(d.target[keep[i]] == 8)) for i in range(len(keep))]
    return SpuriousPatchDataModule(items, spurious_class=0, patch_size=0.25, val_fraction=0.3, batch_size=32,
                                   seed=seed)


def setting(name: str, seed: int, quick: bool) -> tuple[Any, nn.Module, int]:
    n = 240 if quick else 400
    if name == "digits":
        return digits_data(seed), PlainCNN(8), 40
    size = 16 if name == "lesions16" else 32
    dm = SyntheticLesionDataModule(n_train=n, n_val=150, n_test=0, image_size=size, batch_size=32, seed=seed)
    net = PlainCNN(8) if name == "cnn32" else XSmallCNN(num_classes=2, in_channels=3, width=8)
    return dm, net, 6 if quick else 10


def pretrained(net: nn.Module, seed: int, epochs: int) -> None:
    """Warm start: train ``net`` on unbiased lesions from an independent data seed."""
    dm = SyntheticLesionDataModule(n_train=400, n_val=2, n_test=0, image_size=32, bias_ratio=0.0, batch_size=32,
                                   seed=seed, data_seed=1000 + seed)
    trainer = L.Trainer(max_epochs=epochs, limit_val_batches=0, **_kw())
    trainer.fit(ClassifierModule(model=net, num_classes=2, loss="bce", lr=1e-3), datamodule=dm)


def _kw() -> dict[str, Any]:
    return {"accelerator": "cpu", "devices": 1, "num_sanity_val_steps": 0, "logger": False,
            "enable_checkpointing": False, "enable_model_summary": False, "enable_progress_bar": False}


def run(name: str, lam: float | str | None, normalize: str, seed: int, quick: bool) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    dm, net, epochs = setting(name, seed, quick)
    if name.startswith("warm"):
        pretrained(net, seed, 4)
    module = ClassifierModule(model=net, num_classes=2, loss="bce", lr=1e-3, weight_decay=1e-4)
    report = BiasedSplitReport(n_figures=0, print_table=False)
    cbs: list[Any] = [report]
    prior = None
    if lam is not None:
        prior = AttributionPrior(lam=lam, normalize=normalize, norm_mode="shared")
        cbs.append(prior)
    trainer = L.Trainer(max_epochs=epochs, limit_val_batches=0, callbacks=cbs, **_kw())
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    flags = {k.split("/")[-1]: float(v) for k, v in trainer.callback_metrics.items()
             if k.endswith(("/collapsed", "/no_effect", "/mass_in_mask", "/penalty", "/ratio"))}
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=dm, verbose=False)
    res = report.result
    return {"setting": name, "lam": lam, "normalize": normalize, "seed": seed, "seconds": time.perf_counter() - t0,
            "no_bias": res["no_bias"]["avg"], "inverse_bias": res["inverse_bias"]["avg"], **flags,
            "lam_used": prior.lam if prior is not None else 0.0}


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--settings", default="lesions32,lesions16,cnn32,warm32,digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--diagnose", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.diagnose:
        print(json.dumps(diagnose(args.seed), indent=1))
        return
    rows = []
    for name in args.settings.split(","):
        grid = [(None, "mask")] + [(v, "mask") for v in PAPER] + [("auto", "mask")]
        grid += [(v, "fraction") for v in FRACTION] + [("auto", "fraction")]
        for lam, form in grid:
            r = run(name, lam, form, args.seed, args.quick)
            rows.append(r)
            flag = ("C" if r.get("collapsed") else "") + ("N" if r.get("no_effect") else "")
            print(f"{name:10s} {form:8s} lam={lam!s:6s} used={r['lam_used']:.3g} no_bias={r['no_bias']:.3f} "
                  f"inv={r['inverse_bias']:.3f} {flag} ({r['seconds']:.0f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
