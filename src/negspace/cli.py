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

__all__ = ["check_class_paths", "class_path_error", "demo_parser", "main", "run_cli"]

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
    check_class_paths(argv)
    from lightning.pytorch import LightningDataModule

    from negspace.modules.classifier import ClassifierModule

    return _cli_class()(
        ClassifierModule,
        LightningDataModule,
        subclass_mode_data=True,
        args=None if args is None else argv,
        parser_kwargs={"description": DESCRIPTION, "formatter_class": argparse.RawDescriptionHelpFormatter},
        save_config_kwargs={"overwrite": True},
    )


def _class_paths(node: Any) -> list[str]:
    """Every ``class_path`` string in a parsed YAML tree."""
    if isinstance(node, dict):
        found = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return found + [p for v in node.values() for p in _class_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in _class_paths(v)]
    return []


def class_path_error(path: str) -> str | None:
    """``None`` if ``path`` (``"pkg.module.Class"``) names an importable class, else a message saying what does
    not exist and which names close to it do."""
    import difflib
    import importlib

    if "." not in path:
        return None  # a short name: LightningCLI resolves it among the registered subclasses
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if not getattr(e, "name", None) or not module_name.startswith(e.name):
            return None  # the module exists but one of its own imports fails: LightningCLI reports it
        parent, _, leaf = module_name.rpartition(".")
        close: list[str] = []
        if parent:
            try:
                import pkgutil

                pkg = importlib.import_module(parent)
                subs = [m.name for m in pkgutil.iter_modules(getattr(pkg, "__path__", []))]
                close = [f"{parent}.{n}" for n in difflib.get_close_matches(leaf, subs, n=5)]
            except ImportError:
                pass
        return f"class_path {path!r}: module {module_name!r} does not exist" + (
            f"; close names: {close}" if close else "")
    if hasattr(module, attr):
        return None
    names = [n for n in dir(module) if not n.startswith("_")]
    close = difflib.get_close_matches(attr, names, n=5, cutoff=0.5)
    public = getattr(module, "__all__", None)
    hint = f"; close names: {[f'{module_name}.{n}' for n in close]}" if close else (
        f"; it defines {sorted(public)}" if public else "")
    return f"class_path {path!r}: {module_name!r} has no class {attr!r}{hint}"


def check_class_paths(argv: Sequence[str]) -> None:
    """Before LightningCLI parses: every ``class_path`` of the ``--config`` files and of ``--*.class_path``
    arguments must name an existing class, else ``ValueError`` saying which does not exist, with close names
    (LightningCLI would only say "Not a valid subclass of Callback")."""
    import yaml

    paths: list[str] = []
    for i, a in enumerate(argv):
        value = None
        if a.startswith("--config="):
            value = a.split("=", 1)[1]
        elif a in ("--config", "-c") and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None:
            from pathlib import Path

            p = Path(value)
            tree = yaml.safe_load(p.read_text()) if p.is_file() else yaml.safe_load(value)
            paths += _class_paths(tree)
        elif a.endswith("class_path") and i + 1 < len(argv) and a.startswith("--"):
            paths.append(argv[i + 1])
        elif a.startswith("--") and "class_path=" in a:
            paths.append(a.split("=", 1)[1])
    for path in paths:
        msg = class_path_error(path)
        if msg is not None:
            raise ValueError(msg)


def fill_normalize(model: Any, datamodule: Any) -> Any:
    """Set ``datamodule.normalize`` to the statistics of a timm/torchvision ``ClassifierModule`` network when the
    data module has a ``normalize`` setting left at ``None``. Returns the statistics used (or ``None``)."""
    from negspace.data_modules.normalize import model_normalization

    if datamodule is None or getattr(datamodule, "normalize", "absent") is not None:
        return None  # no normalize setting, or set explicitly in the recipe: the recipe wins
    net = getattr(model, "model", None)
    name = getattr(model, "hparams", {}).get("model") if hasattr(model, "hparams") else None
    stats = model_normalization(net, name if isinstance(name, str) else None)
    if stats is not None:
        datamodule.normalize = stats
    return stats


def _cli_class() -> type:
    """The ``negspace`` LightningCLI: fills ``data.normalize`` from the model; its ``optimizer:`` and
    ``lr_scheduler:`` sections keep ``ClassifierModule``'s parameter groups (head / backbone multiplier)."""
    from lightning.pytorch.cli import LightningCLI, instantiate_class
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from negspace.modules.classifier import ClassifierModule

    class NegspaceCLI(LightningCLI):
        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            stats = fill_normalize(self.model, self.datamodule)
            if stats is not None:
                rank_zero_info(f"negspace: data normalize set from the model's own statistics: mean {stats[0]}, "
                               f"std {stats[1]}")

        def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
            if not isinstance(self.model, ClassifierModule):
                return super()._add_configure_optimizers_method_to_model(subcommand)
            parser = self._parser(subcommand)
            inits = {}
            for key in ("optimizer", "lr_scheduler"):
                registry = parser._optimizers if key == "optimizer" else parser._lr_schedulers
                init = self._get(self.config_init, key) if key in registry else None
                inits[key] = init.as_dict() if hasattr(init, "as_dict") else init
            if inits["optimizer"]:
                self.model.optimizer_factory = lambda groups, init=inits["optimizer"]: instantiate_class(groups, init)
            if inits["lr_scheduler"]:
                self.model.lr_scheduler_factory = lambda opt, init=inits["lr_scheduler"]: instantiate_class(opt, init)
            return None

    return NegspaceCLI


if __name__ == "__main__":
    main()
