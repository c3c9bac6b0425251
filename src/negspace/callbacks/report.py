"""``BiasedSplitReport``: paper 000 Table 2 layout (per split: per-class accuracy, Avg., Attr.) at validation and
test end, plus figures of target / non-target attribution maps. The core is :mod:`negspace.metrics.report`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from negspace.attribution.dispatch import check_method
from negspace.batch import BatchKeys
from negspace.callbacks.base import log_figure, output_dir
from negspace.metrics.report import (
    SplitReport,
    check_class_index,
    data_split_names,
    figure_samples,
    flatten_result,
    format_table,
    split_names,
    target_and_other_attributions,
    unflatten_result,
)

__all__ = ["BiasedSplitReport", "format_table"]


class BiasedSplitReport(L.Callback):
    """Per-split accuracy and attribution-in-mask report for biased validation/test splits.

    At validation end and test end it computes, for each dataloader (named by ``splits``, else by the data
    module's ``split_names``, e.g. ``train_bias``, ``inverse_bias``, ``no_bias``): per-class accuracy, ``avg`` (mean over classes), ``worst``
    (worst class), ``attr`` (paper 000 "Attr.": mean over masked samples of ``Σ|A·P| / Σ|A|`` of the target
    attribution ``A(x, y)``) and ``attr_nontarget`` (the same for ``A(x, t')``, ``t' = 1 − y`` for two classes,
    else the highest non-target logit). It logs ``report/{stage}/{split}/{key}``, prints a markdown table on
    rank 0, keeps ``self.result`` (``{split: {key: float}}`` plus ``"worst"``) and ``self.results[stage]``,
    and sends a figure with image+mask, target and non-target attribution maps of a fixed set of samples
    (chosen in the first evaluated epoch) to the loggers, saved as PNG under
    ``<save_dir or log_dir>/biased_split_report/`` (nothing is written with ``logger=False`` and no ``save_dir``).

    Args:
        splits: dataloader names by ``dataloader_idx``; must name every loader of the stage. ``None`` (default):
            the data module's ``split_names``; a single loader without names is called ``"val"`` / ``"test"``;
            several loaders without names are an error.
        class_names: for the printed table (one per class).
        spurious_class: the class that carries the patch in ``train_bias`` (starred in the table); must be a
            class index of the data (checked on the first batch) or None.
        method: ``"input_x_gradient"`` or ``"integrated_gradients"``.
        n_steps: IG steps.
        max_attr_samples: masked samples per split and epoch that get attributions (``None``: all).
        n_figures: samples per split in the figure (0 disables figures).
        batch_keys: other batch layouts, see :mod:`negspace.batch` (default: dicts with ``image``/``label``/
            ``mask``/``group`` keys, tuples ``(image, label[, mask[, group]])``).
        print_table: print the table at each evaluation end (rank 0).
        save_dir: directory for the PNG files (default: the first logger's directory).
    """

    def __init__(
        self,
        splits: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        spurious_class: int | None = 0,
        method: str = "input_x_gradient",
        n_steps: int = 16,
        max_attr_samples: int | None = 256,
        n_figures: int = 4,
        batch_keys: Any = None,
        print_table: bool = True,
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_method(method)
        if max_attr_samples is not None and max_attr_samples < 0:
            raise ValueError(f"max_attr_samples must be None or >= 0, got {max_attr_samples!r}")
        if n_figures < 0:
            raise ValueError(f"n_figures must be >= 0, got {n_figures!r}")
        if splits is not None:
            split_names(splits, len(splits))  # names must be distinct non-empty strings
        if spurious_class is not None and (isinstance(spurious_class, bool) or not isinstance(spurious_class, int)
                                           or spurious_class < 0):
            raise ValueError(f"BiasedSplitReport: spurious_class must be None or a class index >= 0, "
                             f"got {spurious_class!r}")
        if class_names is not None and (isinstance(class_names, str) or len(class_names) == 0):
            raise ValueError(f"BiasedSplitReport: class_names must be a non-empty list of names, got {class_names!r}")
        self._keys = BatchKeys(batch_keys)
        self.splits = tuple(splits) if splits is not None else None
        self.class_names = list(class_names) if class_names else None
        self.spurious_class = spurious_class
        self.method, self.n_steps = method, n_steps
        self.max_attr_samples, self.n_figures = max_attr_samples, n_figures
        self.batch_keys, self.print_table, self.save_dir = batch_keys, print_table, save_dir
        self.result: dict[str, Any] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.figure_paths: list[str] = []
        self._report: SplitReport | None = None
        self._names: tuple[str, ...] = ()
        self._attr_seen: dict[int, int] = {}
        self._fig_samples: dict[int, dict[str, Tensor]] = {}

    def _split(self, idx: int) -> str:
        return self._names[idx] if idx < len(self._names) else f"split_{idx}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check ``spurious_class`` / ``class_names`` against a known class count before any epoch runs."""
        for owner in (pl_module, getattr(trainer, "datamodule", None)):
            n = getattr(owner, "num_classes", None)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                self._check_classes(n)
                return

    def _check_classes(self, num_classes: int) -> None:
        check_class_index(self.spurious_class, num_classes)
        if self.class_names is not None and len(self.class_names) != num_classes:
            raise ValueError(f"BiasedSplitReport: class_names has {len(self.class_names)} names "
                             f"{self.class_names} but the data has {num_classes} classes")

    # ------------------------------------------------------------------ epoch start
    def _reset(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        num = 1 if loaders is None else len(loaders) if isinstance(loaders, Sequence) else 1
        data_names = data_split_names(getattr(trainer, "datamodule", None), stage)
        self._names = split_names(self.splits, max(num, 1), data_names, stage=stage)
        self._report, self._attr_seen, self._device = None, {}, pl_module.device

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer, pl_module, "test")

    # ------------------------------------------------------------------ per batch
    def _on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, dl_idx: int) -> None:
        if trainer.sanity_checking:
            return
        b = self._keys.unpack(batch, require=("image", "label"), who="BiasedSplitReport")
        x, y, mask = b.image, b.label.long(), b.mask
        with torch.no_grad():
            logits = pl_module(x)
        if self._report is None:
            self._check_classes(logits.shape[1])
            self._report = SplitReport(logits.shape[1], self._names, device=self._device)
        split = min(dl_idx, len(self._names) - 1)
        self._report.update(logits, y, split)
        if mask is None:
            return
        idx = (mask.flatten(1).amax(1) > 0).nonzero().flatten()
        seen = self._attr_seen.get(dl_idx, 0)
        if self.max_attr_samples is not None:
            idx = idx[: max(self.max_attr_samples - seen, 0)]
        if idx.numel():
            attr = target_and_other_attributions(pl_module, x[idx], logits[idx], y[idx], method=self.method,
                                                 n_steps=self.n_steps)
            self._report.update_attributions(attr, mask[idx], split)
            self._attr_seen[dl_idx] = seen + int(idx.numel())
        if self.n_figures and dl_idx not in self._fig_samples and trainer.is_global_zero:
            order = figure_samples(y, self.n_figures)
            self._fig_samples[dl_idx] = {k: v[order].detach().cpu().clone() for k, v in
                                         (("x", x), ("y", y), ("mask", mask))}

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._on_batch_end(trainer, pl_module, batch, dataloader_idx)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._on_batch_end(trainer, pl_module, batch, dataloader_idx)

    # ------------------------------------------------------------------ epoch end
    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.sanity_checking or self._report is None:
            return
        result = self._report.compute()
        self.result = self.results[stage] = result
        for name in self._names:
            for key, v in result[name].items():
                if not math.isnan(v):
                    # identical on all ranks (metrics are synced), and every rank skips the same NaN keys
                    pl_module.log(f"report/{stage}/{name}/{key}", v, add_dataloader_idx=False, sync_dist=True)
        if trainer.is_global_zero:
            if self.print_table:
                table = format_table({f"{stage} (epoch {trainer.current_epoch})": result},
                                     num_classes=self._report.num_classes, class_names=self.class_names,
                                     splits=list(self._names), spurious_class=self.spurious_class)
                rank_zero_info("\nBiasedSplitReport\n" + table)
            if self.n_figures and self._fig_samples:
                self._figure(trainer, pl_module, stage)
        self._report.reset()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    def _figure(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from negspace.plots import biased_split_attributions

        rows = []
        for dl_idx in sorted(self._fig_samples):
            s = self._fig_samples[dl_idx]
            x, y = s["x"].to(pl_module.device), s["y"].to(pl_module.device)
            with torch.no_grad():
                logits = pl_module(x)
            attr = target_and_other_attributions(pl_module, x, logits, y, method=self.method, n_steps=self.n_steps)
            attr = attr.sum(2).cpu()  # (n, 2, H, W)
            rows += [{"split": self._split(dl_idx), "image": s["x"][i], "mask": s["mask"][i], "label": int(s["y"][i]),
                      "attr": attr[i], "pred": int(logits[i].argmax())} for i in range(x.shape[0])]
        if not rows:
            return
        fig = biased_split_attributions(rows, self.class_names)
        where = output_dir(trainer, "biased_split_report", f"epoch{trainer.current_epoch:03d}_step{trainer.global_step}",
                           save_dir=self.save_dir)  # rank-0 safe (no broadcast)
        path = log_figure(trainer, f"biased_split_report/{stage}", fig, where)
        if path is not None:
            self.figure_paths.append(str(path))

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Last result as ``{"result/{split}/{key}": float}`` (primitives only)."""
        return flatten_result(self.result)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.result = unflatten_result(state_dict)
