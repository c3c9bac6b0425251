"""Concept masks (``negspace.masks.ConceptMask``): cost of a mask and its IoU on the built-in lesions.

Run: ``python benchmarks/masks.py [--cost] [--iou] [--repeats N] [--threads N]`` (both parts by default).

``--cost``: one frozen-reference mask computation (forward stopped at the layer, projection, upsampling,
threshold, dilation) against one plain training step of the same model on the same batch (zero_grad, forward,
cross-entropy, backward, Adam step), batch 64, median of interleaved repeats. Target: ratio ≤ 0.3.
Models: ``XSmallCNN`` (width 16) at 32 px, layer ``features.8``; timm ``resnet18`` (random init) at 64 px,
layer ``layer3``.

``--iou``: ``SyntheticLesionDataModule(n_train=800, n_val=300, image_size=32, bias_ratio=1.0, seed=0)``; a fully
biased ``XSmallCNN`` trained 24 epochs (``ClassifierModule``, BCE, lr 1e-3; cached in ``/tmp``, seeds 0-2);
``ConceptMask.from_examples`` with default options on 200 training images of class 0 (all carry the sticker)
vs 200 of class 1 ("confounded", what a user has) or 200 class-0 images of ``bias_ratio=0`` data ("clean").
``--set KEY=VALUE ...`` passes other ``from_examples`` options (``pool=max``, ``rule=midpoint``, ``dilate=1``,
``method=mean_diff``, ``localize=contribution target=top_prob``) to measure the alternatives. Printed on the validation splits: mean IoU against ``batch["mask"]`` over images with a patch (groups 1, 3),
the fraction of true-mask pixels covered (recall), and the false-positive area fraction on images without one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from negspace.masks import ConceptMask, layer_features, mask_iou

BATCH = 64
CACHE = Path("/tmp/negspace_bench_masks")


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        import timm

        return timm.create_model("resnet18", pretrained=False, num_classes=2)
    from negspace.models.xmodels import XSmallCNN

    return XSmallCNN(num_classes=2, in_channels=3, width=16)


def cost(repeats: int) -> None:
    for name, layer, size in (("xsmall", "features.8", 32), ("resnet18", "layer3", 64)):
        model = _model(name)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(BATCH, 3, size, size, generator=g), torch.arange(BATCH) % 2
        c = layer_features(model, layer, x[:2]).shape[1]
        cm = ConceptMask(layer, torch.randn(c, generator=g), model=model, threshold=0.0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt, x: torch.Tensor = x,
                 y: torch.Tensor = y) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def mask(cm: ConceptMask = cm, x: torch.Tensor = x) -> None:
            cm(x)

        times: dict[str, list[float]] = {"step": [], "mask": []}
        for fn in (step, mask):  # warm-up
            fn()
        for _ in range(repeats):  # interleaved: load drift on a shared machine hits both alike
            for key, fn in (("step", step), ("mask", mask)):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
        s, m = statistics.median(times["step"]), statistics.median(times["mask"])
        print(f"{name:9s} {size}px layer={layer:10s} train step {s * 1e3:7.1f} ms   mask {m * 1e3:6.1f} ms   "
              f"ratio {m / s:.3f} (target <= 0.3)")


def _trained(seed: int) -> torch.nn.Module:
    from negspace.models.xmodels import XSmallCNN

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"xsmall32_seed{seed}.pt"
    torch.manual_seed(seed)
    net = XSmallCNN(num_classes=2, in_channels=3, width=16)
    if path.is_file():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net
    import lightning as L

    from negspace.modules import ClassifierModule

    L.seed_everything(seed)
    module = ClassifierModule(model=net, num_classes=2, loss="bce", lr=1e-3, weight_decay=1e-4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=24, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _data(1.0))
    torch.save(net.state_dict(), path)
    return net


def _data(bias: float):  # a LightningDataModule
    from negspace.data_modules import SyntheticLesionDataModule

    dm = SyntheticLesionDataModule(n_train=800, n_val=300, n_test=300, image_size=32, bias_ratio=bias,
                                   batch_size=64, seed=0, augment=False)
    dm.setup("fit")
    return dm


def _cat(loader: object) -> dict[str, torch.Tensor]:
    batches = list(loader)  # type: ignore[call-overload]
    return {k: torch.cat([b[k] for b in batches]) for k in ("image", "label", "mask", "group")}


def iou(seeds: list[int], layers: list[str], **options: object) -> None:
    biased, unbiased = _data(1.0), _data(0.0)
    train, train0 = _cat(biased.train_dataloader()), _cat(unbiased.train_dataloader())
    splits = [_cat(loader) for loader in biased.val_dataloader()]
    val = {k: torch.cat([s[k] for s in splits]) for k in splits[0]}
    has = val["group"] % 2 == 1
    split = torch.cat([torch.full((len(s["label"]),), i) for i, s in enumerate(splits)])  # train_bias, inverse_bias
    artifact = train["image"][train["label"] == 0][:200]
    cases = {"confounded": train["image"][train["label"] == 1][:200],
             "clean": train0["image"][train0["label"] == 0][:200]}
    for layer in layers:
        for case, clean in cases.items():
            ious, recalls, fps, per_split = [], [], [], []
            for seed in seeds:
                cm = ConceptMask.from_examples(_trained(seed), layer, artifact, clean, **options)
                m = torch.cat([cm(x) for x in val["image"].split(300)])
                ious.append(float(mask_iou(m[has], val["mask"][has])))
                per_split.append([float(mask_iou(m[has & (split == i)], val["mask"][has & (split == i)]))
                                  for i in (0, 1)])
                recalls.append(float((m[has] * val["mask"][has]).sum() / val["mask"][has].sum()))
                fps.append(float(m[~has].mean()))
            tb, ib = (statistics.mean(p[i] for p in per_split) for i in (0, 1))
            print(f"{layer:11s} {case:10s} seeds {seeds}: IoU {statistics.mean(ious):.3f} (min {min(ious):.3f}; "
                  f"train_bias {tb:.3f}, inverse_bias {ib:.3f}), recall {statistics.mean(recalls):.3f}, "
                  f"false-positive area {statistics.mean(fps):.4f}   {cm!r}")


def _option(kv: str) -> tuple[str, object]:
    key, sep, value = kv.partition("=")
    if not sep:
        raise SystemExit(f"--set takes KEY=VALUE pairs, got {kv!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cost", action="store_true")
    p.add_argument("--iou", action="store_true")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--layers", nargs="+", default=["features.8", "features.11"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="from_examples options, e.g. pool=max rule=midpoint dilate=1 localize=contribution")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    both = not (a.cost or a.iou)
    if a.cost or both:
        cost(a.repeats)
    if a.iou or both:
        iou(a.seeds, a.layers, **dict(_option(kv) for kv in a.set))


if __name__ == "__main__":
    main()
