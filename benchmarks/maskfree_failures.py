"""Failure modes of mask-free debiasing (issue 16): an artifact that overlaps the object, one that is not
localised.

    python benchmarks/maskfree_failures.py [--seeds 2] [--tint-seeds N] [--epochs 24] [--lams 10 30]
        [--settings reference random random_large tint] [--out DIR] [--threads 1] [--progress] [--quick]

Data: ``SyntheticLesionDataModule`` at 32 px (800 / 300 / 300 images, ``bias_ratio=1.0``, ``augment=False``):
every benign training image carries the artifact. Four settings:

* ``reference`` — the default 6 px colourful sticker at the image border (``patch_position="border"``);
* ``random`` — the same sticker anywhere in the image (it can land on the lesion);
* ``random_large`` — an 11 px sticker (``patch_size=0.35``) anywhere, so it often covers part of the lesion;
* ``tint`` — not localised: benign training images are tinted (+0.15 on the red channel, clamped), the
  ``inverse_bias`` splits tint the malignant images; its "true mask" is the whole image.

Per setting and seed: an ``XSmallCNN(width=16)`` trained 24 epochs with BCE (``ClassifierModule``) on the
biased data (no prior); ``discover_artifacts`` on its first 512 training images (images and labels only, layer
``features.8``, methods channels/codec/spray); the top candidate's concept mask; then presence+absence priors
(``AttributionPrior(mode="presence_absence", norm_mode="shared")``) trained from scratch with the discovered
masks at each λ and, for the sticker settings, with the true masks.

Prints one line per (setting, seed) and three markdown tables (also ``table.md`` and ``results.json`` under
``--out``):

1. discovery — top candidate (kind, score, purity: the fraction of its reference images that carry the
   artifact / of its clean images that do not), the size of the artifact patch cut out by its mask, IoU of the
   concept masks with the true (dilated) sticker masks on the validation images that carry one (``tint``: the
   masked area fraction of tinted images), the masked area on images without the artifact, and the fraction of
   the discovered (and of the true) mask lying on the lesion (lesion = pixels far from the skin colour of the
   sticker-free image, :func:`lesion_masks`);
2. debiasing — test ``no_bias`` / ``inverse_bias`` class-mean accuracy of the biased model and of each prior;
3. verification — the insertion test (:func:`negspace.demo.discovered.insertion`: the discovered artifact pasted
   at the border of clean validation images; mean change of the benign / of the malignant logit) of each model,
   and for ``tint`` the response to the true artifact (the clean images tinted).

Numbers are means over seeds (every run is in ``results.json``). The true masks are used only to measure the
discovered ones and for the true-mask prior columns. Full run: 18 trainings per seed, 31 min wall / 21.5 CPU-min
on one thread; ``--quick`` (1 seed, 3 epochs, 200 images, one λ) is a smoke run of about a minute.

Measured (2 seeds): border sticker IoU 0.70, no_bias/inverse_bias 0.82/0.81 with discovered masks at λ=10
(true masks 0.83/0.79); sticker anywhere IoU 0.68, 27 % of the discovered mask on the lesion (true masks: 26 %),
0.81/0.74 (true 0.77/0.65); 11 px sticker anywhere IoU 0.75 but no λ in {10, 30} debiases, with discovered or
true masks (0.50/0.00–0.25; λ=100 collapses to 0.50/0.50, 1 seed); tint: the top candidate is a mode of the
*other* class (score 0.37–0.52 vs ≥ 0.84 for stickers) whose mask covers 70 % of untinted and 0 % of tinted
images, no debiasing (0.50/0.03 at λ=10).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from negspace.data_modules import SyntheticLesionDataModule
from negspace.data_modules.spurious import PatchedDataset, read_item
from negspace.demo.common import CLASS_NAMES, LesionRunConfig, evaluate_splits, mean_std, trainer_kwargs
from negspace.demo.discovered import discover_masks, insertion, mask_quality
from negspace.hooks import eval_mode, model_device

LAYER = "features.8"
TINT = (0.15, 0.0, 0.0)


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    dm_kw: dict[str, Any] = field(default_factory=dict)
    tint: bool = False


SETTINGS = (
    Setting("reference", "6 px sticker at the border", {"patch_position": "border"}),
    Setting("random", "6 px sticker anywhere", {"patch_position": "random"}),
    Setting("random_large", "11 px sticker anywhere", {"patch_position": "random", "patch_size": 0.35}),
    Setting("tint", "global red tint (+0.15)", tint=True),
)


@dataclass
class Config(LesionRunConfig):
    """The demo's run configuration (``negspace.demo.common.LesionRunConfig``) and the λ values tried."""

    lams: tuple[float, ...] = (10.0, 30.0)


# ------------------------------------------------------------------------------------------------ the tint data
class TintedDataset(PatchedDataset):
    """The items of a :class:`PatchedDataset` with a global colour tint instead of a sticker where ``patched``:
    ``image + tint`` clamped to [0, 1]; the mask is the whole image (1 everywhere) on tinted items, else 0."""

    def __init__(self, src: PatchedDataset, tint: Tensor) -> None:
        super().__init__(src.base, src.indices, src.patched, num_classes=src.num_classes, seed=src.seed,
                         labels=src.targets)
        self.tint = tint

    def __getitem__(self, i: int) -> dict[str, Any]:
        idx = self.indices[i]
        image, label, _ = read_item(self.base, idx)
        present = self.patched[i]
        if present:
            image = (image + self.tint.view(-1, 1, 1)).clamp(0.0, 1.0)
        mask = torch.full((1, *image.shape[-2:]), float(present), dtype=image.dtype)
        return {"image": image, "label": label, "mask": mask, "group": 2 * label + int(present), "index": idx}


class TintLesionDataModule(SyntheticLesionDataModule):
    """The lesions with the tint as the spurious feature (same splits, same base images, same items)."""

    def __init__(self, *, tint: tuple[float, ...] = TINT, **kw: Any) -> None:
        super().__init__(**kw)
        self.tint = torch.tensor(tint, dtype=torch.float32)

    def _build(self) -> None:
        if self._built:
            return
        super()._build()
        self.train_set = TintedDataset(self.train_set, self.tint)  # type: ignore[arg-type]
        self.val_sets = [TintedDataset(d, self.tint) for d in self.val_sets]
        self.test_sets = [TintedDataset(d, self.tint) for d in self.test_sets]


def make_dm(setting: Setting, seed: int, cfg: Config) -> SyntheticLesionDataModule:
    kw: dict[str, Any] = {"n_train": cfg.n_train, "n_val": cfg.n_val, "n_test": cfg.n_test,
                          "image_size": cfg.image_size, "bias_ratio": 1.0, "batch_size": cfg.batch_size,
                          "seed": seed, "augment": False}
    return TintLesionDataModule(**kw) if setting.tint else SyntheticLesionDataModule(**kw, **setting.dm_kw)


# ------------------------------------------------------------------------------------------------ training
def train(setting: Setting, seed: int, cfg: Config, *, lam: float = 0.0, mask: Any = "none") -> dict[str, Any]:
    """One model from scratch on the setting's biased data. ``mask="none"``: no prior; ``None``: the prior with the
    batches' true masks; a mask source: the prior with its masks. Returns test results, the net and the data."""
    import lightning as L

    from negspace.callbacks import AttributionPrior, BiasedSplitReport
    from negspace.models.xmodels import XSmallCNN
    from negspace.modules import ClassifierModule

    L.seed_everything(seed, workers=True, verbose=False)
    dm = make_dm(setting, seed, cfg)
    net = XSmallCNN(num_classes=2, in_channels=3, width=cfg.width)
    module = ClassifierModule(model=net, num_classes=2, loss="bce", lr=cfg.lr, weight_decay=cfg.weight_decay)
    report = BiasedSplitReport(class_names=CLASS_NAMES, n_figures=0, print_table=False)
    callbacks: list[Any] = [report]
    if not (isinstance(mask, str) and mask == "none"):
        callbacks.append(AttributionPrior(lam=lam, mode="presence_absence", norm_mode="shared", mask=mask))
    trainer = L.Trainer(max_epochs=cfg.epochs, limit_val_batches=0, callbacks=callbacks, **trainer_kwargs(False))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    _, test = evaluate_splits(trainer, module, dm, report)
    return {"test": {s: {"avg": test[s]["avg"]} for s in ("inverse_bias", "no_bias")}, "net": net, "dm": dm,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ measurements
def lesion_masks(images: Tensor, threshold: float = 0.1, ring: int = 2) -> Tensor:
    """Lesion masks ``(N, 1, H, W)`` of sticker-free lesion images ``(N, 3, H, W)``: pixels farther than
    ``threshold`` (max over channels) from the image's skin colour. The skin colour is the per-channel median of
    the outer ``ring`` pixels divided by the generator's radial shading ``1 − 0.08·r²``."""
    h, w = images.shape[-2:]
    yy, xx = torch.meshgrid(*[(torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1 for s in (h, w)],
                            indexing="ij")
    shade = 1 - 0.08 * (yy**2 + xx**2)
    edge = torch.ones(h, w, dtype=torch.bool)
    edge[ring:-ring, ring:-ring] = False
    skin = (images / shade)[:, :, edge].median(-1).values  # (N, 3)
    return ((images - skin[:, :, None, None] * shade).abs().amax(1, keepdim=True) > threshold).float()


def lesion_overlap(source: Any, dm: SyntheticLesionDataModule) -> dict[str, float]:
    """On validation images that carry a sticker: the fraction of the discovered mask's and of the true
    (dilated) mask's pixels that lie on the lesion (lesion masks from the sticker-free base images)."""
    base = dm.val_dataset
    lesion = lesion_masks(torch.stack([read_item(base, i)[0] for i in range(len(base))]))  # type: ignore[arg-type]
    on = {"pred": 0.0, "true": 0.0}
    tot = {"pred": 0.0, "true": 0.0}
    for loader in dm.val_dataloader()[:2]:  # train_bias, inverse_bias: the splits with stickers
        for b in loader:
            has = b["mask"].flatten(1).amax(1) > 0
            if not has.any():
                continue
            les = lesion[b["index"][has]]
            for key, m in (("pred", source(b["image"][has])), ("true", b["mask"][has].float())):
                on[key] += float((m * les).sum())
                tot[key] += float(m.sum())
    return {f"on_lesion_{k}": on[k] / tot[k] if tot[k] > 0 else float("nan") for k in on}


def tint_effect(net: nn.Module, dm: SyntheticLesionDataModule, tint: tuple[float, ...] = TINT) -> dict[str, float]:
    """The true global artifact's insertion test: the mean change of each logit when the clean (``no_bias``)
    validation images are tinted."""
    x = torch.cat([b["image"] for b in dm.val_dataloader()[2]])
    tinted = (x + torch.tensor(tint).view(1, -1, 1, 1)).clamp(0.0, 1.0)
    dev = model_device(net)
    with eval_mode(net), torch.no_grad():
        delta = (net(tinted.to(dev)) - net(x.to(dev))).float().mean(0).cpu()
    return {"excitation": float(delta[0]), "inhibition": float(delta[1])}


def discover(net: nn.Module, dm: SyntheticLesionDataModule, seed: int) -> dict[str, Any]:
    """Discovery on the biased ``net``'s training images (no masks), as the demo does
    (:func:`negspace.demo.discovered.discover_masks`), plus the top candidate's purity: the share of its
    reference images that carry the artifact and of its clean images that do not."""
    t0 = time.perf_counter()
    found = discover_masks(net, dm, LAYER, seed=seed)
    seconds = time.perf_counter() - t0
    cands, labels = found.candidates, torch.cat([b["label"] for b in dm.train_dataloader()])
    top = cands[0]
    # every benign (class 0) training image carries the artifact (bias_ratio=1), no malignant one does
    return {"candidate": top.kind, "description": top.description, "score": float(top.score),
            "ref_purity": float((labels[top.reference_indices] == 0).float().mean()),
            "clean_purity": float((labels[top.clean_indices] == 1).float().mean()),
            "runner_up": f"{cands[1].kind} {cands[1].score:.2f}" if len(cands) > 1 else "-",
            "source": found.source, "patch": found.patch, "seconds": seconds}


# ------------------------------------------------------------------------------------------------ one setting
def run_setting(setting: Setting, seed: int, cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"setting": setting.name, "seed": seed, "runs": {}}
    biased = train(setting, seed, cfg)
    net, dm = biased.pop("net"), biased.pop("dm")
    found = discover(net, dm, seed)
    source, patch = found.pop("source"), found.pop("patch")
    out["discovery"] = found
    quality = mask_quality(source, list(dm.val_dataloader()))
    out["masks"] = {**quality, **({} if setting.tint else lesion_overlap(source, dm))}
    out["patch_shape"] = list(patch.shape)
    biased["insertion"] = insertion(net, dm, patch)
    if setting.tint:
        biased["tint_effect"] = tint_effect(net, dm)
    out["runs"]["none"] = biased
    priors: list[tuple[str, float, Any]] = [(f"discovered λ={lam:g}", lam, source) for lam in cfg.lams]
    if not setting.tint:
        priors += [(f"true λ={lam:g}", lam, None) for lam in cfg.lams]
    for name, lam, mask in priors:
        res = train(setting, seed, cfg, lam=lam, mask=mask)
        pnet, pdm = res.pop("net"), res.pop("dm")
        res["insertion"] = insertion(pnet, pdm, patch)
        if setting.tint:
            res["tint_effect"] = tint_effect(pnet, pdm)
        out["runs"][name] = res
    return out


# ------------------------------------------------------------------------------------------------ tables
def _m(values: list[float], fmt: str = "{:.2f}") -> str:
    m, _ = mean_std(values)
    return "–" if math.isnan(m) else fmt.format(m)


def tables(results: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["setting"], []).append(r)
    labels = {s.name: s.label for s in SETTINGS}
    head = ("setting", "seeds", "top candidate per seed (score)", "ref. / clean purity", "artifact patch",
            "IoU with true masks", "masked area, clean images", "discovered mask on lesion", "true mask on lesion")
    lines = ["### Discovery and concept masks (validation images; mean over seeds)", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, rs in by.items():
        d = [r["discovery"] for r in rs]
        mk = [r["masks"] for r in rs]
        nan = float("nan")
        cells = [
            labels[name], str(len(rs)), ", ".join(f"{x['candidate']} ({x['score']:.2f})" for x in d),
            f"{_m([x['ref_purity'] for x in d])} / {_m([x['clean_purity'] for x in d])}",
            ", ".join("×".join(str(v) for v in r["patch_shape"][1:]) for r in rs),
            _m([x["iou"] for x in mk]) + (" (area of tinted images)" if name == "tint" else ""),
            _m([x["false_positive_area"] for x in mk], "{:.3f}"),
            _m([x.get("on_lesion_pred", nan) for x in mk]), _m([x.get("on_lesion_true", nan) for x in mk]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "### Debiasing (test class-mean accuracy no_bias / inverse_bias; mean over seeds)", "",
              "| setting | no prior | " + " | ".join(_run_names(results)) + " |",
              "|---|---|" + "---|" * len(_run_names(results))]
    for name, rs in by.items():
        cells = []
        for run in ["none", *_run_names(results)]:
            got = [r["runs"][run]["test"] for r in rs if run in r["runs"]]
            nb, ib = [g["no_bias"]["avg"] for g in got], [g["inverse_bias"]["avg"] for g in got]
            cells.append(f"{_m(nb)} / {_m(ib)}" if got else "–")
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    lines += ["", "### Insertion test (Δ benign logit / Δ malignant logit on clean validation images; mean over "
              "seeds)", "",
              "| setting | artifact pasted | no prior | " + " | ".join(_run_names(results)) + " |",
              "|---|---|---|" + "---|" * len(_run_names(results))]
    for name, rs in by.items():
        for key, what in (("insertion", "discovered patch"), ("tint_effect", "true tint")):
            cells = []
            for run in ["none", *_run_names(results)]:
                got = [r["runs"][run][key] for r in rs if run in r["runs"] and key in r["runs"][run]]
                cells.append(f"{_m([g['excitation'] for g in got], '{:+.1f}')} / "
                             f"{_m([g['inhibition'] for g in got], '{:+.1f}')}" if got else "–")
            if any(c != "–" for c in cells):
                lines.append(f"| {labels[name]} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run_names(results: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [k for k in r["runs"] if k != "none" and k not in names]
    return sorted(names, key=lambda k: (not k.startswith("discovered"), float(k.split("=")[1])))


# ------------------------------------------------------------------------------------------------ main
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=2, help="training seeds of the sticker settings")
    p.add_argument("--tint-seeds", type=int, default=None, help="seeds of the tint setting (default --seeds)")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--lams", type=float, nargs="+", default=[10.0, 30.0])
    p.add_argument("--settings", nargs="+", default=[s.name for s in SETTINGS],
                   choices=[s.name for s in SETTINGS])
    p.add_argument("--out", default=None, help="directory for results.json and table.md")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 3 epochs, 200 training images, one λ (smoke run)")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = Config(epochs=args.epochs, lams=tuple(args.lams))
    seeds, tint_seeds = args.seeds, args.seeds if args.tint_seeds is None else args.tint_seeds
    if args.quick:
        cfg = Config(epochs=3, n_train=200, n_val=100, n_test=100, lams=(cfg.lams[0],))
        seeds = tint_seeds = 1
    jobs = [(s, seed) for s in SETTINGS if s.name in args.settings
            for seed in range(tint_seeds if s.tint else seeds)]
    t0 = time.perf_counter()
    results = []
    for setting, seed in tqdm(jobs, desc="maskfree failures", disable=not args.progress):
        r = run_setting(setting, seed, cfg)
        results.append(r)
        d, mk = r["discovery"], r["masks"]
        print(f"[{setting.name} seed {seed}] top {d['candidate']} ({d['score']:.2f}; {d['description']}), purity "
              f"{d['ref_purity']:.2f}/{d['clean_purity']:.2f}; IoU {mk['iou']:.2f}, clean area "
              f"{mk['false_positive_area']:.3f}; " + ", ".join(
                  f"{k}: {v['test']['no_bias']['avg']:.3f}/{v['test']['inverse_bias']['avg']:.3f}"
                  for k, v in r["runs"].items()) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    text = (f"## Mask-free debiasing: failure modes ({cfg.epochs} epochs, {cfg.n_train} training images, "
            f"seeds: {seeds} (sticker settings), {tint_seeds} (tint); {minutes:.1f} min on {args.threads} "
            f"thread(s))\n\n" + tables(results) + "\n")
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(text)
        (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
    return text


if __name__ == "__main__":
    main()
