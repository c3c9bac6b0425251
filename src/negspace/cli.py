"""The ``negspace`` console script.

``negspace fit|validate|test --config recipes/<name>.yaml [--trainer.devices 4 --trainer.num_nodes 2 ...]`` is a
``LightningCLI`` with :class:`negspace.modules.ClassifierModule` as the model and any ``LightningDataModule``
(subclass mode: ``data.class_path``). ``negspace demo [--quick] [--seeds N] [--out DIR]`` runs the main job,
paper 000's debiasing experiment (Table 2) on synthetic lesions, ``negspace demo --finetune`` its fine-tuning
version; both are dispatched before LightningCLI. The CLI fills ``data.normalize`` from a timm/torchvision model
and hands its ``optimizer:``/``lr_scheduler:`` sections to ``ClassifierModule`` (parameter groups kept).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from negspace.lightning_cli import check_class_paths, class_path_error, fill_normalize, run_recipe

__all__ = ["check_class_paths", "class_path_error", "demo_parser", "fill_normalize", "main", "run_cli"]

DESCRIPTION = """negspace: mechanistic-interpretability methods inside PyTorch Lightning loops.

Subcommands: fit, validate, test (LightningCLI; e.g. `negspace fit --config recipes/lesions_presence_absence.yaml`),
and `negspace demo [--quick] [--seeds N] [--out DIR]`, the main job: paper 000's debiasing experiment
(no debiasing / presence / presence+absence / unbiased bound) on synthetic lesions; see `negspace demo --help`.
`negspace demo --finetune [--quick]` does the same by fine-tuning a pretrained timm backbone (docs/finetune.md).
`negspace sweep --config recipes/<x>.yaml --lam 1,3,10,30,100 [--seeds 0,1] [--select no_bias]` runs the λ sweep
of a prior recipe, selects on a validation split and writes the selected recipe (see `negspace sweep --help`).
`negspace discover --config recipes/<x>.yaml --ckpt_path biased.ckpt --layer features.8` ranks candidate artifacts
of a trained model and writes a concept-mask file per candidate for the prior (see `negspace discover --help`).
"""


def demo_parser() -> argparse.ArgumentParser:
    """Arguments of ``negspace demo``."""
    p = argparse.ArgumentParser(
        prog="negspace demo",
        description="Paper 000 Table 2 analogue on SyntheticLesionDataModule: trains the unbiased bound, no "
        "debiasing, presence and presence+absence debiasing (lambda picked on the no_bias validation split), "
        "then prints and writes the table (mean ± std over seeds).",
    )
    p.add_argument("--quick", action="store_true", help="1 seed, smaller data and lambda sweep (a few minutes on CPU)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, or 1 with --quick)")
    p.add_argument("--out", default="negspace_demo", help="output directory for the table (.md/.csv/.json) and logs")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per run (default depends on --quick)")
    p.add_argument(
        "--lambdas", type=float, nargs="+", default=None, help="prior strengths to sweep (default depends on --quick)"
    )
    p.add_argument("--n-train", type=int, default=None, help="training samples (default depends on --quick)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default 32)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.add_argument("--masks", choices=("true", "discovered", "both"), default="both",
                   help="masks of the presence+absence prior: the data's true masks, masks discovered on the biased "
                   "model with the true ones withheld (docs/maskfree.md), or both rows (default)")
    ft = p.add_argument_group(
        "fine-tuning demo (--finetune)",
        "pretrain a backbone on unbiased lesions, save it as a local file, fine-tune it on the biased data with "
        "none / presence / presence+absence and an unbiased bound (see docs/finetune.md)",
    )
    ft.add_argument("--finetune", action="store_true", help="run the fine-tuning demo instead")
    p.add_argument("--compare", action="store_true", help="compare negspace's prior with RRR, RRR-GradCAM, "
                   "reweighting, GroupDRO, JTT and DFR in one harness (docs/baselines.md; --quick: 1 seed, budget 2)")
    p.add_argument("--budget", type=int, default=None, help="with --compare: values tried per method's hyper-parameter "
                   "(default 4; --quick: 2)")
    ft.add_argument("--model", default=None, help="backbone, e.g. timm:resnet10t (default), timm:resnet18 or xsmallcnn")
    ft.add_argument("--lr", type=float, default=None, help="fine-tuning lr of the head (default 1e-3; the backbone gets lr x multiplier)")
    ft.add_argument("--backbone-lr-mult", type=float, default=None, help="backbone lr multiplier (default 0.1)")
    ft.add_argument("--freeze-epochs", type=int, default=None, help="epochs with a frozen backbone (default 1)")
    ft.add_argument("--pretrain-epochs", type=int, default=None, help="pretraining epochs (default 6)")
    return p


def _run_demo(argv: Sequence[str]) -> dict[str, Any]:
    args = demo_parser().parse_args(list(argv))
    if args.compare:
        from negspace.compare import run_compare

        quick = {"seeds": 1, "budget": 2} if args.quick else {}
        given = {k: v for k, v in (("seeds", args.seeds), ("budget", args.budget)) if v is not None}
        return run_compare(out=args.out if args.out != "negspace_demo" else "negspace_compare",
                           progress=not args.no_progress, **{**quick, **given},
                           epochs=args.epochs, n_train=args.n_train, image_size=args.image_size)
    if args.finetune:
        from negspace.demo import run_finetune_demo

        return run_finetune_demo(
            quick=args.quick, out=args.out if args.out != "negspace_demo" else "negspace_finetune_demo",
            progress=not args.no_progress, seeds=args.seeds, epochs=args.epochs, lambdas=args.lambdas,
            n_train=args.n_train, image_size=args.image_size, model=args.model, lr=args.lr,
            backbone_lr_mult=args.backbone_lr_mult, freeze_backbone_epochs=args.freeze_epochs,
            pretrain_epochs=args.pretrain_epochs,
        )
    from negspace.demo import run_demo

    return run_demo(
        quick=args.quick,
        seeds=args.seeds,
        out=args.out,
        epochs=args.epochs,
        lambdas=args.lambdas,
        n_train=args.n_train,
        image_size=args.image_size,
        progress=not args.no_progress,
        masks=args.masks,
    )


def main(args: Sequence[str] | None = None) -> None:
    """Console-script entry point (returns ``None`` so that ``sys.exit(main())`` exits with 0). A recipe error
    found before LightningCLI runs (e.g. a misspelt ``class_path``) exits with status 2 and the message."""
    argv = list(sys.argv[1:] if args is None else args)
    if not (argv and argv[0] in ("demo", "sweep", "discover")):
        try:
            check_class_paths(argv)
        except ValueError as e:
            sys.exit(f"negspace: error: {e}")
    run_cli(argv)


def run_cli(args: Sequence[str] | None = None) -> Any:
    """``negspace demo ...`` or the LightningCLI subcommands ``fit``/``validate``/``test``/``predict``.

    Returns the ``LightningCLI`` object (``.model``, ``.datamodule``, ``.trainer``) or the demo summary dict.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "demo":
        return _run_demo(argv[1:])
    if argv and argv[0] == "sweep":
        from negspace.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv and argv[0] == "discover":
        from negspace.discover_cli import main as discover_main

        return discover_main(argv[1:])
    return run_recipe(None if args is None else argv, description=DESCRIPTION)


if __name__ == "__main__":
    main()
