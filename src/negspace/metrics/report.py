"""Biased-split report core (paper 000, Table 2): per split per-class accuracy, ``avg``, ``worst`` and the share
of target / non-target attribution inside the spurious mask; the markdown table. Pure torch + torchmetrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from negspace.attribution.dispatch import attribute
from negspace.metrics.group import DEFAULT_SPLITS, AttributionInMask, GroupAccuracy
from negspace.priors.targets import target_and_other

__all__ = [
    "SplitReport",
    "check_class_index",
    "data_split_names",
    "figure_samples",
    "flatten_result",
    "format_table",
    "split_names",
    "target_and_other_attributions",
    "unflatten_result",
]


def _fmt(v: float | None, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.2f}" if std is None or math.isnan(std) else f"{v:.2f} ± {std:.2f}"


def format_table(
    rows: Mapping[str, Mapping[str, Any]],
    num_classes: int = 2,
    class_names: Sequence[str] | None = None,
    splits: Sequence[str] = DEFAULT_SPLITS,
    spurious_class: int | None = 0,
    stds: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """Markdown table in the paper's layout: one row per model/setting, per split the per-class accuracy,
    ``Avg.`` and ``Attr.``.

    ``rows``: ``{row_name: result}`` with ``result[split][key]`` floats as in ``BiasedSplitReport.result``
    (keys ``class_{c}``, ``avg``, ``attr``). ``stds``: same layout, printed as ``mean ± std``. Classes that
    carry the patch in a split are starred (``spurious_class`` in ``train_bias``, the others in
    ``inverse_bias``).
    """
    names = list(class_names) if class_names else [f"class {c}" for c in range(num_classes)]
    header, keys = ["Model"], []
    for split in splits:
        for c in range(num_classes):
            starred = spurious_class is not None and (
                (split == "train_bias" and c == spurious_class) or (split == "inverse_bias" and c != spurious_class)
            )
            header.append(f"{split}: {names[c]}{'*' if starred else ''}")
            keys.append((split, f"class_{c}"))
        header.append(f"{split}: Avg.")
        keys.append((split, "avg"))
        if split != "no_bias":
            header.append(f"{split}: Attr.")
            keys.append((split, "attr"))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, res in rows.items():
        cells = [name]
        for split, key in keys:
            v = res.get(split, {}).get(key)
            s = stds.get(name, {}).get(split, {}).get(key) if stds else None
            cells.append(_fmt(None if v is None else float(v), None if s is None else float(s)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def data_split_names(datamodule: Any, stage: str) -> Sequence[str] | None:
    """A data module's loader names for ``stage``: ``test_split_names`` (test, when present), else
    ``split_names``; ``None`` without a data module or names."""
    if datamodule is None:
        return None
    names = getattr(datamodule, "test_split_names", None) if stage == "test" else None
    return names if names is not None else getattr(datamodule, "split_names", None)


def split_names(
    splits: Sequence[str] | None, num_loaders: int, data_names: Sequence[str] | None = None, *, stage: str = "val",
    who: str = "BiasedSplitReport",
) -> tuple[str, ...]:
    """Names of ``num_loaders`` evaluation dataloaders, by ``dataloader_idx``.

    ``splits`` (explicit) wins and must have exactly ``num_loaders`` distinct names; else the data module's
    ``split_names`` (``data_names``) when their count matches; else a single loader is called ``stage``. Several
    loaders without names are an error (a name is never guessed: a plain validation loader is not "train_bias").
    """
    if splits is not None:
        if isinstance(splits, str) or not all(isinstance(s, str) and s for s in splits):
            raise ValueError(f"{who}: splits must be a list of non-empty names, got {splits!r}")
        names = tuple(splits)
        if len(set(names)) != len(names):
            raise ValueError(f"{who}: splits must be distinct, got {list(names)}")
        if len(names) != num_loaders:
            raise ValueError(
                f"{who}: splits={list(names)} names {len(names)} dataloader(s) but the {stage} stage has "
                f"{num_loaders}; pass one name per dataloader (or splits=None to take the data module's split_names)"
            )
        return names
    if data_names is not None and len(tuple(data_names)) == num_loaders and num_loaders:
        return tuple(str(n) for n in data_names)
    if num_loaders == 1:
        return (stage,)
    got = "" if data_names is None else f" (the data module's split_names {list(data_names)} do not match)"
    raise ValueError(
        f"{who}: the {stage} stage has {num_loaders} dataloaders but no split names{got}; pass splits=[...] with "
        f"{num_loaders} names, or give the data module a split_names attribute"
    )


def check_class_index(value: int | None, num_classes: int, name: str = "spurious_class",
                      who: str = "BiasedSplitReport") -> None:
    """``value`` must be None or an int in ``[0, num_classes)``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_classes:
        raise ValueError(f"{who}: {name} must be None or a class index in [0, {num_classes}), got {value!r}")


def target_and_other_attributions(
    model: Callable[[Tensor], Tensor], x: Tensor, logits: Tensor, y: Tensor, *, method: str = "input_x_gradient",
    n_steps: int = 16,
) -> Tensor:
    """``(B, 2, C, H, W)`` detached attributions of the label and of the most competitive other class
    (:func:`negspace.priors.target_and_other`). Runs outside inference mode (Lightning evaluates inside it)."""
    with torch.inference_mode(False), torch.enable_grad():
        targets = target_and_other(logits, y).clone()
        return attribute(model, x.clone(), targets, method=method, n_steps=n_steps).detach()


def figure_samples(y: Tensor, n: int) -> Tensor:
    """Indices of at most ``n`` samples of the batch labelled ``y (B,)``, balanced over the classes present."""
    order = torch.cat([(y == c).nonzero().flatten()[: max(1, n // 2)] for c in y.unique()])
    return order[:n]


class SplitReport:
    """Accumulates one evaluation epoch over the splits (DDP-synced torchmetrics underneath).

    ``update(logits, y, split)``, ``update_attributions(attributions, mask, split)``; ``compute()`` →
    ``{split: {"class_{c}", "avg", "worst", "attr", "attr_nontarget": float}, "worst": float}``; ``reset()``.
    """

    def __init__(self, num_classes: int, splits: Sequence[str], device: torch.device | str = "cpu") -> None:
        self.num_classes, self.splits = num_classes, tuple(splits)
        self.acc = GroupAccuracy(num_classes, splits=self.splits).to(device)
        self.attr = AttributionInMask(splits=self.splits).to(device)
        self.attr_nt = AttributionInMask(splits=self.splits).to(device)

    def update(self, logits: Tensor, y: Tensor, split: int) -> None:
        """Accuracy of ``logits (B, C)`` against ``y (B,)`` in split ``split``."""
        self.acc.update(logits, y, split=split)

    def update_attributions(self, attributions: Tensor, mask: Tensor, split: int) -> None:
        """``attributions (B, 2, C, H, W)`` (target, non-target) of masked samples with ``mask (B, 1, H, W)``."""
        self.attr.update(attributions[:, 0], mask, split=split)
        self.attr_nt.update(attributions[:, 1], mask, split=split)

    def compute(self) -> dict[str, Any]:
        acc, attr, attr_nt = self.acc.compute(), self.attr.compute(), self.attr_nt.compute()
        result: dict[str, Any] = {}
        for name in self.splits:
            row = {k.split("/", 1)[1]: float(v) for k, v in acc.items() if k.startswith(f"{name}/")}
            row["attr"] = float(attr[name])
            row["attr_nontarget"] = float(attr_nt[name])
            result[name] = row
        result["worst"] = float(acc["worst"])
        return result

    def reset(self) -> None:
        for m in (self.acc, self.attr, self.attr_nt):
            m.reset()


def flatten_result(result: Mapping[str, Any]) -> dict[str, float]:
    """``{split: {key: v}, "worst": v}`` → ``{"result/{split}/{key}": float, "result/worst": float}``."""
    flat: dict[str, float] = {}
    for split, row in result.items():
        if isinstance(row, Mapping):
            for k, v in row.items():
                flat[f"result/{split}/{k}"] = float(v)
        else:
            flat[f"result/{split}"] = float(row)
    return flat


def unflatten_result(state: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_result`."""
    result: dict[str, Any] = {}
    for key, v in state.items():
        parts = key.split("/")
        if len(parts) == 3:
            result.setdefault(parts[1], {})[parts[2]] = float(v)
        elif len(parts) == 2:
            result[parts[1]] = float(v)
    return result
