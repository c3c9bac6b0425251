"""The ``negspace`` LightningCLI and what every command that runs a recipe shares (``negspace fit|validate|test``,
``negspace sweep``, ``negspace discover``): ``class_path`` checks with close names before LightningCLI parses,
``data.normalize`` filled from the model, and ``ClassifierModule``'s parameter groups kept under the recipe's
``optimizer:``/``lr_scheduler:`` sections. The console script's dispatch lives in :mod:`negspace.cli`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["check_class_paths", "class_path_error", "fill_normalize", "negspace_cli_class", "run_recipe"]


def run_recipe(args: Sequence[str] | None, description: str | None = None) -> Any:
    """Run LightningCLI (``fit``/``validate``/``test``/``predict``) with :class:`~negspace.modules.ClassifierModule`
    and any data module (subclass mode); ``args=None`` reads ``sys.argv``. Returns the ``LightningCLI`` object."""
    argv = list(sys.argv[1:] if args is None else args)
    check_class_paths(argv)
    from lightning.pytorch import LightningDataModule

    from negspace.modules.classifier import ClassifierModule

    return negspace_cli_class()(
        ClassifierModule,
        LightningDataModule,
        subclass_mode_data=True,
        args=None if args is None else argv,
        parser_kwargs={"description": description, "formatter_class": argparse.RawDescriptionHelpFormatter},
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


def negspace_cli_class() -> type:
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
