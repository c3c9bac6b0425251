"""Artifact discovery: wall time of ``discover_artifacts`` per method, and the batched parts against naive loops.

    python benchmarks/discover.py [--images 512] [--epochs 8] [--repeats 3] [--threads 1] [--quick]

Data: ``SyntheticLesionDataModule`` training images (32 px, every benign image carries the sticker), an
``XSmallCNN(width=16)`` trained ``--epochs`` epochs on them (biased), layer ``features.8``. Prints the median over
``--repeats`` runs of each method, the top candidate of each method (does it carry the sticker? the true masks are
used only here), and for the batched parts the median time of the batched call vs a per-image loop that computes
the same numbers: SpRAy's input×gradient maps, the patch features behind every consistency score, and the
pasted-image forwards of ``insertion_effect``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from _measure import median_time  # the sibling helper module
from negspace.attribution import input_x_gradient
from negspace.data_modules import SyntheticLesionDataModule
from negspace.explain.tension import channel_values
from negspace.masks.discover import METHODS, discover_artifacts
from negspace.masks.discovery.spray import attribution_maps
from negspace.masks.verify import artifact_patch, insertion_effect, paste
from negspace.models.xmodels import XSmallCNN

LAYER = "features.8"



def lesion_data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dm = SyntheticLesionDataModule(n_train=max(n, 800), n_val=300, n_test=300, image_size=32, bias_ratio=1.0,
                                   batch_size=64, seed=0, augment=False)
    dm.setup("fit")
    items = [dm.train_set[i] for i in range(n)]  # type: ignore[index]
    return (torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items]),
            torch.stack([it["mask"] for it in items]))


def train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    net = XSmallCNN(num_classes=2, in_channels=3, width=16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="128 images, 3 epochs, 1 repeat")
    args = p.parse_args()
    if args.quick:
        args.images, args.epochs, args.repeats = 128, 3, 1
    torch.set_num_threads(args.threads)
    x, y, m = lesion_data(args.images)
    net = train(x, y, args.epochs)
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())
    print(f"{len(x)} lesion images 32x32, XSmallCNN width 16 trained {args.epochs} epochs (train acc {acc:.3f}), "
          f"layer {LAYER}, {args.threads} thread(s), median of {args.repeats}\n")
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]
    carries = m.flatten(1).amax(1) > 0
    print("| method | seconds | top candidate | score | reference images with the sticker |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        sec, cands = median_time(lambda method=method: discover_artifacts(net, data, LAYER, methods=(method,),
                                                                          progress=False), args.repeats)
        top = cands[0]  # type: ignore[index]
        print(f"| {method} | {sec:.2f} | {top.description} | {top.score:.3f} | "
              f"{float(carries[top.reference_indices].float().mean()):.0%} |")

    print("\n| batched part | batched s | per-image loop s | ratio |")
    print("|---|---|---|---|")
    x0 = x[y == 0]
    rows = []
    t_b, a = median_time(lambda: attribution_maps(net, x0, 0, 128), args.repeats)
    t_n, b = median_time(lambda: torch.cat([input_x_gradient(net, x0[i : i + 1], 0).sum(1, keepdim=True).clamp_min(0)
                                            for i in range(len(x0))]), args.repeats)
    if not torch.allclose(a, b, atol=1e-5):  # type: ignore[arg-type]
        raise RuntimeError("batched and per-image attribution maps differ")
    rows.append((f"SpRAy input×gradient maps ({len(x0)} images)", t_b, t_n))
    crops = x[:256, :, :8, :8].contiguous()
    t_b, a = median_time(lambda: channel_values(net, LAYER, crops), args.repeats)
    t_n, b = median_time(lambda: torch.cat([channel_values(net, LAYER, crops[i : i + 1]) for i in range(len(crops))]),
                         args.repeats)
    if not torch.allclose(a, b, atol=1e-4):  # type: ignore[arg-type]
        raise RuntimeError("batched and per-patch features differ")
    rows.append(("patch features for consistency (256 patches)", t_b, t_n))
    patch = artifact_patch(x0[:20], m[y == 0][:20])
    clean = x[y == 1][:200]
    t_b, res = median_time(lambda: insertion_effect(net, clean, patch, target=0), args.repeats)

    def naive() -> float:
        where = res["positions"]  # type: ignore[index]
        with torch.no_grad():
            d = [net(paste(clean[i : i + 1], patch, where[i, j : j + 1]))[0, 0] - net(clean[i : i + 1])[0, 0]
                 for i in range(len(clean)) for j in range(where.shape[1])]
        return float(torch.stack(d).double().mean())

    t_n, exc = median_time(naive, args.repeats)
    if abs(exc - res["excitation"]) > 1e-3 * max(1.0, abs(exc)):  # type: ignore[index, operator]
        raise RuntimeError("batched and per-image insertion effects differ")
    rows.append((f"insertion_effect ({len(clean)} images x 4 positions)", t_b, t_n))
    for name, tb, tn in rows:
        print(f"| {name} | {tb:.3f} | {tn:.3f} | {tn / tb:.1f}x |")


if __name__ == "__main__":
    main()
