"""The ``negspace`` console script.

``negspace fit|validate|test --config recipes/<name>.yaml [--trainer.devices 4 --trainer.num_nodes 2 ...]`` is a
``LightningCLI`` with :class:`negspace.modules.ClassifierModule` as the model and any ``LightningDataModule``
(subclass mode: ``data.class_path``). ``negspace demo [--quick] [--seeds N] [--out DIR]`` runs the main job,
paper 000's debiasing experiment (Table 2) on synthetic lesions; it is dispatched before LightningCLI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["demo_parser", "main", "run_cli"]

DESCRIPTION = """negspace: mechanistic-interpretability methods inside PyTorch Lightning loops.

Subcommands: fit, validate, test (LightningCLI; e.g. `negspace fit --config recipes/lesions_presence_absence.yaml`),
and `negspace demo [--quick] [--seeds N] [--out DIR]`, the main job: paper 000's debiasing experiment
(no debiasing / presence / presence+absence / unbiased bound) on synthetic lesions; see `negspace demo --help`.
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
    return p


def _run_demo(argv: Sequence[str]) -> dict[str, Any]:
    args = demo_parser().parse_args(list(argv))
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
    )


def main(args: Sequence[str] | None = None) -> None:
    """Console-script entry point (returns ``None`` so that ``sys.exit(main())`` exits with 0)."""
    run_cli(args)


def run_cli(args: Sequence[str] | None = None) -> Any:
    """``negspace demo ...`` or the LightningCLI subcommands ``fit``/``validate``/``test``/``predict``.

    Returns the ``LightningCLI`` object (``.model``, ``.datamodule``, ``.trainer``) or the demo summary dict.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "demo":
        return _run_demo(argv[1:])
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from negspace.modules.classifier import ClassifierModule

    return LightningCLI(
        ClassifierModule,
        LightningDataModule,
        subclass_mode_data=True,
        args=None if args is None else argv,
        parser_kwargs={"description": DESCRIPTION, "formatter_class": argparse.RawDescriptionHelpFormatter},
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
