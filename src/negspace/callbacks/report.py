"""``BiasedSplitReport``: paper 000 Table 2 layout (per split: per-class accuracy, Avg., Attr.) at
validation and test end, plus PNG figures of target / non-target attribution maps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from negspace.attribution import input_x_gradient, integrated_gradients
from negspace.batch import BatchKeys
from negspace.callbacks.base import output_dir
from negspace.metrics.group import DEFAULT_SPLITS, AttributionInMask, GroupAccuracy

__all__ = ["BiasedSplitReport", "format_table"]

METHODS = ("input_x_gradient", "integrated_gradients")


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
            star = ""
            if spurious_class is not None:
                if (split == "train_bias" and c == spurious_class) or (
                    split == "inverse_bias" and c != spurious_class
                ):
                    star = "*"
            header.append(f"{split}: {names[c]}{star}")
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


class BiasedSplitReport(L.Callback):
    """Per-split accuracy and attribution-in-mask report for biased validation/test splits.

    At validation end and test end it computes, for each dataloader (``splits`` in order, default
    ``train_bias``, ``inverse_bias``, ``no_bias``): per-class accuracy, ``avg`` (mean over classes), ``worst``
    (worst class), ``attr`` (paper 000 "Attr.": mean over masked samples of ``Σ|A·P| / Σ|A|`` of the target
    attribution ``A(x, y)``) and ``attr_nontarget`` (the same for ``A(x, t')``, ``t' = 1 − y`` for two classes,
    else the highest non-target logit). It logs ``report/{stage}/{split}/{key}``, prints a markdown table on
    rank 0, keeps ``self.result`` (``{split: {key: float}}`` plus ``"worst"``) and ``self.results[stage]``,
    and saves a PNG with image+mask, target and non-target attribution maps of a fixed set of samples
    (chosen in the first evaluated epoch) to ``<log_dir>/biased_split_report/``.

    Args:
        splits: dataloader names by ``dataloader_idx``.
        class_names: for the printed table.
        spurious_class: the class that carries the patch in ``train_bias`` (starred in the table).
        method: ``"input_x_gradient"`` or ``"integrated_gradients"``.
        n_steps: IG steps.
        max_attr_samples: masked samples per split and epoch that get attributions (``None``: all).
        n_figures: samples per split in the figure (0 disables figures).
        batch_keys: other batch layouts, see :mod:`negspace.batch` (default: dicts with ``image``/``label``/
            ``mask``/``group`` keys, tuples ``(image, label[, mask[, group]])``).
        print_table: print the table at each evaluation end (rank 0).
    """

    def __init__(
        self,
        splits: Sequence[str] = DEFAULT_SPLITS,
        class_names: Sequence[str] | None = None,
        spurious_class: int | None = 0,
        method: str = "input_x_gradient",
        n_steps: int = 16,
        max_attr_samples: int | None = 256,
        n_figures: int = 4,
        batch_keys: Any = None,
        print_table: bool = True,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        if max_attr_samples is not None and max_attr_samples < 0:
            raise ValueError(f"max_attr_samples must be None or >= 0, got {max_attr_samples!r}")
        if n_figures < 0:
            raise ValueError(f"n_figures must be >= 0, got {n_figures!r}")
        self._keys = BatchKeys(batch_keys)
        self.splits = tuple(splits)
        self.class_names = list(class_names) if class_names else None
        self.spurious_class = spurious_class
        self.method = method
        self.n_steps = n_steps
        self.max_attr_samples = max_attr_samples
        self.n_figures = n_figures
        self.batch_keys = batch_keys
        self.print_table = print_table
        self.result: dict[str, Any] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.figure_paths: list[str] = []
        self._metrics: dict[str, Any] | None = None
        self._attr_seen: dict[int, int] = {}
        self._fig_samples: dict[int, dict[str, Tensor]] = {}
        self._num_classes: int | None = None

    # ------------------------------------------------------------------ batch parsing
    def _parse(self, batch: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        b = self._keys.unpack(batch, require=("image", "label"), who="BiasedSplitReport")
        return b.image, b.label, b.mask, b.group

    def _split(self, idx: int) -> str:
        return self.splits[idx] if idx < len(self.splits) else f"split_{idx}"

    # ------------------------------------------------------------------ metrics lifecycle
    def _reset(self, pl_module: L.LightningModule, num_splits: int) -> None:
        names = tuple(self._split(i) for i in range(max(num_splits, 1)))
        self._metrics = None
        self._names = names
        self._attr_seen = {}
        self._device = pl_module.device

    def _ensure_metrics(self, num_classes: int) -> dict[str, Any]:
        if self._metrics is None:
            self._num_classes = num_classes
            self._metrics = {
                "acc": GroupAccuracy(num_classes, splits=self._names).to(self._device),
                "attr": AttributionInMask(splits=self._names).to(self._device),
                "attr_nt": AttributionInMask(splits=self._names).to(self._device),
            }
        return self._metrics

    def _num_dataloaders(self, trainer: L.Trainer, stage: str) -> int:
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        if loaders is None:
            return 1
        return len(loaders) if isinstance(loaders, Sequence) else 1

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(pl_module, self._num_dataloaders(trainer, "val"))

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(pl_module, self._num_dataloaders(trainer, "test"))

    # ------------------------------------------------------------------ per batch
    def _targets(self, logits: Tensor, y: Tensor) -> Tensor:
        """``(B, 2)``: target ``y`` and non-target (``1 − y`` for 2 classes, else the top other logit)."""
        if logits.shape[1] == 2:
            other = 1 - y
        else:
            masked = logits.detach().clone()
            masked.scatter_(1, y[:, None], float("-inf"))
            other = masked.argmax(1)
        return torch.stack([y, other], dim=1)

    def _attribute(self, pl_module: L.LightningModule, x: Tensor, targets: Tensor) -> Tensor:
        """``(B, 2, C, H, W)``; runs outside inference mode (Lightning evaluates under ``inference_mode``)."""
        with torch.inference_mode(False), torch.enable_grad():
            xc, tc = x.clone(), targets.clone()
            if self.method == "input_x_gradient":
                return input_x_gradient(pl_module, xc, tc).detach()
            return integrated_gradients(pl_module, xc, tc, n_steps=self.n_steps).detach()

    def _on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, dl_idx: int) -> None:
        if trainer.sanity_checking:
            return
        x, y, mask, _ = self._parse(batch)
        y = y.long()
        with torch.no_grad():
            logits = pl_module(x)
        metrics = self._ensure_metrics(logits.shape[1])
        split = min(dl_idx, len(self._names) - 1)
        metrics["acc"].update(logits, y, split=split)
        if mask is None:
            return
        has = mask.flatten(1).amax(1) > 0
        seen = self._attr_seen.get(dl_idx, 0)
        budget = None if self.max_attr_samples is None else self.max_attr_samples - seen
        idx = has.nonzero().flatten()
        if budget is not None:
            idx = idx[: max(budget, 0)]
        if idx.numel():
            attr = self._attribute(pl_module, x[idx], self._targets(logits[idx], y[idx]))
            metrics["attr"].update(attr[:, 0], mask[idx], split=split)
            metrics["attr_nt"].update(attr[:, 1], mask[idx], split=split)
            self._attr_seen[dl_idx] = seen + int(idx.numel())
        # fixed figure samples: the first n_figures samples of each split (balanced over classes if possible)
        if self.n_figures and dl_idx not in self._fig_samples and trainer.is_global_zero:
            order = torch.cat([(y == c).nonzero().flatten()[: max(1, self.n_figures // 2)] for c in y.unique()])
            order = order[: self.n_figures]
            self._fig_samples[dl_idx] = {
                "x": x[order].detach().cpu().clone(),
                "y": y[order].detach().cpu().clone(),
                "mask": mask[order].detach().cpu().clone(),
            }

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._on_batch_end(trainer, pl_module, batch, dataloader_idx)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._on_batch_end(trainer, pl_module, batch, dataloader_idx)

    # ------------------------------------------------------------------ epoch end
    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.sanity_checking or self._metrics is None:
            return
        acc = self._metrics["acc"].compute()
        attr = self._metrics["attr"].compute()
        attr_nt = self._metrics["attr_nt"].compute()
        result: dict[str, Any] = {}
        for name in self._names:
            row = {k.split("/", 1)[1]: float(v) for k, v in acc.items() if k.startswith(f"{name}/")}
            row["attr"] = float(attr[name])
            row["attr_nontarget"] = float(attr_nt[name])
            result[name] = row
        result["worst"] = float(acc["worst"])
        self.result = result
        self.results[stage] = result
        for name in self._names:
            for key, v in result[name].items():
                if not math.isnan(v):
                    # identical on all ranks (metrics are synced), and every rank skips the same NaN keys
                    pl_module.log(f"report/{stage}/{name}/{key}", v, add_dataloader_idx=False, sync_dist=True)
        if trainer.is_global_zero:
            if self.print_table:
                table = format_table(
                    {f"{stage} (epoch {trainer.current_epoch})": result},
                    num_classes=self._num_classes or 2,
                    class_names=self.class_names,
                    splits=[n for n in self._names if n in result],
                    spurious_class=self.spurious_class,
                )
                rank_zero_info("\nBiasedSplitReport\n" + table)
            if self.n_figures and self._fig_samples:
                self._save_figure(trainer, pl_module, stage)
        for m in self._metrics.values():
            m.reset()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    # ------------------------------------------------------------------ figures
    def _save_figure(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from matplotlib.figure import Figure

        rows = []
        for dl_idx in sorted(self._fig_samples):
            s = self._fig_samples[dl_idx]
            x = s["x"].to(pl_module.device)
            y = s["y"].to(pl_module.device)
            with torch.no_grad():
                logits = pl_module(x)
            attr = self._attribute(pl_module, x, self._targets(logits, y)).sum(2).cpu()  # (n, 2, H, W)
            for i in range(x.shape[0]):
                rows.append((self._split(dl_idx), s["x"][i], s["mask"][i], int(s["y"][i]), attr[i],
                             int(logits[i].argmax())))
        if not rows:
            return
        names = self.class_names
        fig = Figure(figsize=(7.5, 2.3 * len(rows)))
        axes = fig.subplots(len(rows), 3, squeeze=False)
        for r, (split, img, m, label, a, pred) in enumerate(rows):
            img = img.float()
            show = img.permute(1, 2, 0) if img.shape[0] == 3 else img.mean(0)
            lo, hi = float(show.min()), float(show.max())
            show = (show - lo) / (hi - lo + 1e-8)
            axes[r, 0].imshow(show.numpy(), cmap=None if img.shape[0] == 3 else "gray")
            if m.numel() and float(m.max()) > 0:
                axes[r, 0].contour(m.reshape(m.shape[-2:]).float().numpy(), levels=[0.5], colors="yellow",
                                   linewidths=0.8)
            lab = names[label] if names else str(label)
            prd = names[pred] if names else str(pred)
            axes[r, 0].set_title(f"{split}\nlabel {lab}, pred {prd}", fontsize=7)
            for j, title in ((0, "target A(x, y)"), (1, "non-target A(x, t')")):
                v = float(a[j].abs().max()) or 1.0
                axes[r, j + 1].imshow(a[j].numpy(), cmap="RdBu", vmin=-v, vmax=v)
                axes[r, j + 1].set_title(f"{title}\n(blue +, red −)", fontsize=7)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        out_dir = str(output_dir(trainer, "biased_split_report"))  # rank-0 safe (no broadcast)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{stage}_epoch{trainer.current_epoch:03d}_step{trainer.global_step}.png")
        fig.savefig(path, dpi=80)
        self.figure_paths.append(path)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Last result as ``{"result/{split}/{key}": float}`` (primitives only)."""
        flat: dict[str, Any] = {}
        for split, row in self.result.items():
            if isinstance(row, Mapping):
                for k, v in row.items():
                    flat[f"result/{split}/{k}"] = float(v)
            else:
                flat[f"result/{split}"] = float(row)
        return flat

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        result: dict[str, Any] = {}
        for key, v in state_dict.items():
            parts = key.split("/")
            if len(parts) == 3:
                result.setdefault(parts[1], {})[parts[2]] = float(v)
            elif len(parts) == 2:
                result[parts[1]] = float(v)
        self.result = result
