"""``negspace discover``: rank candidate artifacts of a trained recipe model and write one concept-mask file each.

``negspace discover --config recipes/<x>.yaml [--ckpt_path biased.ckpt] --layer features.8 [--methods
channels,codec,spray] [--top 5] [--out negspace_discover] [--split train]``

Model and data module are built from the recipe as ``negspace fit`` builds them (LightningCLI, ``run=False``), the
checkpoint's ``state_dict`` is loaded (``weights_only=True``), and :func:`negspace.masks.discover.discover_artifacts`
runs on the first ``--max-images`` images of the split (read once, in order; the masks of the data are never
read). Written to ``--out``: ``candidate_<i>.png`` and ``candidates.json`` (:func:`save_candidates`), and for the
``--top`` candidates ``candidate_<i>.safetensors`` (+ ``.json``): the concept mask with the trained network's
weights as its frozen reference (``ConceptMask(file=...)``, right also in a run that trains a fresh model), and
``candidate_<i>_patch.safetensors``: the artifact cut from a reference image by that mask
(:func:`negspace.masks.verify.artifact_patch`; for ``negspace.callbacks.ArtifactInsertion``). Prints the table
and the recipe lines that use the top candidate.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["discover_parser", "format_candidates", "main", "prior_snippet", "split_data"]


def discover_parser() -> argparse.ArgumentParser:
    """Arguments of ``negspace discover``; anything after ``--`` goes to LightningCLI (e.g. ``--data.init_args...``)."""
    p = argparse.ArgumentParser(prog="negspace discover", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the recipe the model was trained with")
    p.add_argument("--ckpt_path", default=None, help="Lightning checkpoint of the trained (biased) model")
    p.add_argument("--layer", required=True, help="dotted layer name of the network, e.g. features.8 or layer3")
    p.add_argument("--methods", default="channels,codec,spray", help="comma-separated: channels, codec, spray")
    p.add_argument("--top", type=int, default=5, help="candidates that get a figure, a mask and a patch file")
    p.add_argument("--out", default="negspace_discover", help="output directory")
    p.add_argument("--split", default="train", help="train, val, val:<i>, test or test:<i> (default train)")
    p.add_argument("--forward", default="model", help="submodule of the LightningModule that is the network "
                   "(default model, the ClassifierModule's; '' for the module itself)")
    p.add_argument("--max-images", type=int, default=512, help="images read from the split (default 512)")
    p.add_argument("--k", type=int, default=8, help="images and patches per candidate (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return p


def _build(config: str, extra: Sequence[str]) -> Any:
    """Model and data module of a recipe, as ``negspace fit`` builds them, without running anything."""
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from negspace.lightning_cli import check_class_paths, fill_normalize
    from negspace.modules.classifier import ClassifierModule

    argv = ["--config", config, *extra]
    check_class_paths(argv)
    with warnings.catch_warnings():  # args= is how this subcommand hands its own arguments over
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        cli = LightningCLI(ClassifierModule, LightningDataModule, subclass_mode_data=True, args=argv, run=False,
                           save_config_callback=None)
    fill_normalize(cli.model, cli.datamodule)
    return cli


def split_data(datamodule: Any, split: str, max_images: int) -> list[tuple[torch.Tensor, ...]]:
    """The first ``max_images`` ``(image, label)`` batches (``(image,)`` without labels) of a data module's split,
    read once, unshuffled; masks are dropped."""
    from torch.utils.data import DataLoader

    from negspace.batch import iter_batches

    name, _, idx = split.partition(":")
    if name not in ("train", "val", "test") or (idx and not idx.isdigit()):
        raise ValueError(f"--split must be train, val, val:<i>, test or test:<i>, got {split!r}")
    if name == "train":
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        if getattr(loader, "dataset", None) is not None:  # the same items, unshuffled
            loader = DataLoader(loader.dataset, batch_size=loader.batch_size or 64, shuffle=False,
                                collate_fn=loader.collate_fn)
    else:
        datamodule.setup("validate" if name == "val" else "test")
        loader = datamodule.val_dataloader() if name == "val" else datamodule.test_dataloader()
        if isinstance(loader, list | tuple):
            i = int(idx or 0)
            if i >= len(loader):
                raise ValueError(f"--split {split}: the data module has {len(loader)} {name} loaders")
            loader = loader[i]
        elif idx and int(idx):
            raise ValueError(f"--split {split}: the data module has one {name} loader")
    out, n = [], 0
    for b in iter_batches(loader, who="negspace discover"):
        out.append((b.image,) if b.label is None else (b.image, b.label))
        n += b.image.shape[0]
        if n >= max_images:
            break
    return out


def format_candidates(candidates: Sequence[Any], files: Sequence[str | None]) -> str:
    """Markdown table: rank, kind, score, class, description, concept-mask file."""
    lines = ["| rank | kind | score | class | description | file |", "|---|---|---|---|---|---|"]
    for i, c in enumerate(candidates):
        f = files[i] if i < len(files) else None
        lines.append(f"| {i} | {c.kind} | {c.score:.3f} | {'-' if c.class_index is None else c.class_index} | "
                     f"{c.description} | {f or ''} |")
    return "\n".join(lines)


def prior_snippet(mask_file: str, patch_file: str | None, target: int | None, forward: str | None = "model") -> str:
    """Recipe lines: the presence+absence prior with the discovered mask (its layer is named relative to the
    network ``forward``, which the prior then attributes too) and the insertion check."""
    text = ("trainer:\n  callbacks:\n    - class_path: negspace.callbacks.AttributionPrior\n      init_args:\n"
            "        mode: presence_absence\n" + (f"        forward: {forward}\n" if forward else "") +
            "        mask:\n          class_path: negspace.masks.ConceptMask\n"
            f"          init_args: {{file: {mask_file}}}\n")
    if patch_file is not None and target is not None:
        text += ("    - class_path: negspace.callbacks.ArtifactInsertion\n"
                 f"      init_args: {{patch: {patch_file}, target: {target}}}\n")
    return text


def main(argv: Sequence[str]) -> dict[str, Any]:
    """``negspace discover ...``; returns ``{"candidates", "masks", "patches", "table"}``."""
    from negspace.hooks import get_layer
    from negspace.masks.discover import discover_artifacts, save_candidates
    from negspace.masks.verify import artifact_patch, save_patch

    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = discover_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.top < 1 or args.max_images < 1:
        raise ValueError(f"--top and --max-images must be positive, got {args.top} and {args.max_images}")
    cli = _build(args.config, extra)
    if args.ckpt_path is not None:
        state = torch.load(args.ckpt_path, map_location="cpu", weights_only=True)
        cli.model.load_state_dict(state["state_dict"] if "state_dict" in state else state)
    net = get_layer(cli.model, args.forward) if args.forward else cli.model
    data = split_data(cli.datamodule, args.split, args.max_images)
    cands = discover_artifacts(net, data, args.layer, methods=methods, k=args.k, max_images=args.max_images,
                               seed=args.seed, progress=not args.no_progress)
    out = Path(args.out)
    images = torch.cat([b[0] for b in data])[: args.max_images]
    save_candidates(cands, images, out, top=args.top)
    masks: list[str | None] = []
    patches: list[str | None] = []
    for i, c in enumerate(cands[: args.top]):
        path = out / f"candidate_{i}.safetensors"
        cm = c.to_concept_mask(net, data)
        cm.save(str(path), weights=True)  # the frozen reference: this trained network, also for a fresh run
        masks.append(str(path))
        ref = images[c.reference_indices[: c.preview.shape[0]]]
        where = cm(ref).cpu()
        if not where.any():  # the mask's threshold misses these images: cut by the preview instead
            where = c.preview > 0.5
        patch = None
        if where.any():
            patch = str(save_patch(artifact_patch(ref, where), out / f"candidate_{i}_patch.safetensors"))
        patches.append(patch)
    table = format_candidates(cands, masks)
    print(table)
    if masks:
        print(f"\nFigures and candidates.json in {out}/. Debias with the top candidate's mask (recipe lines):\n")
        print(prior_snippet(masks[0], patches[0], cands[0].class_index, args.forward or None))
    return {"candidates": cands, "masks": masks, "patches": patches, "table": table}
