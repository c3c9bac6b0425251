"""Group metrics for biased validation splits (paper 000, Table 2), DDP-synced via torchmetrics.

Both metrics keep *sums* as state (``dist_reduce_fx="sum"``), so ``compute()`` on every rank returns the
values of the full, all-rank data set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from negspace.reduce import mask_like, relative_mass_in_mask

__all__ = ["DEFAULT_SPLITS", "AttributionInMask", "GroupAccuracy"]

#: The order in which biased-split data modules return their validation loaders.
DEFAULT_SPLITS: tuple[str, ...] = ("train_bias", "inverse_bias", "no_bias")


def _check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    if isinstance(splits, str) or not isinstance(splits, Sequence) or len(splits) == 0:
        raise ValueError(f"splits must be a non-empty sequence of names, got {splits!r}")
    if len(set(splits)) != len(splits):
        raise ValueError(f"splits must be unique, got {list(splits)}")
    return tuple(str(s) for s in splits)


def _split_index(split: int | str, splits: tuple[str, ...]) -> int:
    if isinstance(split, str):
        if split not in splits:
            raise ValueError(f"split must be one of {list(splits)} or an index, got {split!r}")
        return splits.index(split)
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split < len(splits):
        raise ValueError(f"split must be an int in [0, {len(splits)}) or one of {list(splits)}, got {split!r}")
    return split


class GroupAccuracy(Metric):
    """Accuracy per class per split, the per-split average over classes, and the worst group.

    Args:
        num_classes: number of classes ``C``.
        splits: split names; ``update(..., split=i)`` adds to split ``i`` (e.g. a ``dataloader_idx``).
        num_groups: if given, also track accuracy per ``group`` id (e.g. ``2 * label + patch_present``)
            per split; ``update`` then needs ``group``.

    ``update(preds, target, split=0, group=None)``: ``preds`` logits ``(B, C)`` (argmax is taken) or class
    indices ``(B,)``; ``target (B,)``.

    ``compute()`` returns a flat ``dict[str, Tensor]`` (ready for ``log_dict``), with NaN where a cell is empty:
    ``"{split}/class_{c}"``, ``"{split}/avg"`` (mean of the non-empty per-class accuracies, the paper's
    "Avg."), ``"{split}/worst"`` (min over non-empty classes, or groups if ``num_groups``),
    ``"{split}/group_{g}"`` (with ``num_groups``), and ``"worst"`` (min over all non-empty cells of all splits).
    ``table()`` returns the raw ``(S, C)`` accuracy matrix.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        splits: Sequence[str] = DEFAULT_SPLITS,
        num_groups: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if num_groups is not None and (
            isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1
        ):
            raise ValueError(f"num_groups must be None or a positive int, got {num_groups!r}")
        self.num_classes = num_classes
        self.splits = _check_splits(splits)
        self.num_groups = num_groups
        s = len(self.splits)
        self.add_state("correct", torch.zeros(s, num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(s, num_classes, dtype=torch.long), dist_reduce_fx="sum")
        g = num_groups or 1
        self.add_state("group_correct", torch.zeros(s, g, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("group_total", torch.zeros(s, g, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, split: int | str = 0, group: Tensor | None = None) -> None:
        """Add a batch: ``preds (B, C)`` logits or ``(B,)`` indices, ``target (B,)``, ``group (B,)``."""
        i = _split_index(split, self.splits)
        target = torch.as_tensor(target, device=self.correct.device).flatten()
        if target.is_floating_point() and not bool((target == target.round()).all()):
            raise ValueError(f"target must hold integer class indices, got non-integer values {target[:5].tolist()}")
        target = target.long()
        if preds.dim() == 2:
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"preds must be (B, num_classes={self.num_classes}) logits or (B,) indices, "
                    f"got shape {tuple(preds.shape)}"
                )
            preds = preds.argmax(dim=1)
        elif preds.dim() != 1:
            raise ValueError(f"preds must be (B, C) logits or (B,) class indices, got shape {tuple(preds.shape)}")
        preds = preds.long().to(target.device)
        if preds.shape != target.shape:
            raise ValueError(f"preds and target must have the same batch size, got {preds.shape} and {target.shape}")
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(
                f"target must hold class indices in [0, {self.num_classes}), "
                f"got values in [{int(target.min())}, {int(target.max())}]"
            )
        hit = (preds == target).long()
        self.total[i] += torch.bincount(target, minlength=self.num_classes)
        self.correct[i] += torch.bincount(target, weights=hit.double(), minlength=self.num_classes).long()
        if self.num_groups is not None:
            if group is None:
                raise ValueError("group is required when GroupAccuracy was built with num_groups")
            group = torch.as_tensor(group, device=target.device).long().flatten()
            if group.shape != target.shape:
                raise ValueError(f"group must be (B,) like target, got shape {tuple(group.shape)}")
            if group.numel() and (group.min() < 0 or group.max() >= self.num_groups):
                raise ValueError(
                    f"group must hold ids in [0, {self.num_groups}), got values in "
                    f"[{int(group.min())}, {int(group.max())}]"
                )
            self.group_total[i] += torch.bincount(group, minlength=self.num_groups)
            self.group_correct[i] += torch.bincount(group, weights=hit.double(), minlength=self.num_groups).long()

    @staticmethod
    def _ratio(correct: Tensor, total: Tensor) -> Tensor:
        acc = correct.double() / total.double().clamp_min(1)
        return torch.where(total > 0, acc, torch.full_like(acc, float("nan"))).float()

    def table(self) -> Tensor:
        """``(S, C)`` per-split, per-class accuracy (NaN for empty cells); reads the current (local) state."""
        return self._ratio(self.correct, self.total)

    def compute(self) -> dict[str, Tensor]:
        acc = self._ratio(self.correct, self.total)
        gacc = self._ratio(self.group_correct, self.group_total) if self.num_groups else None
        out: dict[str, Tensor] = {}
        cells = []
        for i, name in enumerate(self.splits):
            row = acc[i]
            for c in range(self.num_classes):
                out[f"{name}/class_{c}"] = row[c]
            valid = row[~row.isnan()]
            out[f"{name}/avg"] = valid.mean() if valid.numel() else row.new_tensor(float("nan"))
            worst_row = row
            if gacc is not None:
                for g in range(self.num_groups):
                    out[f"{name}/group_{g}"] = gacc[i, g]
                worst_row = gacc[i]
            wv = worst_row[~worst_row.isnan()]
            out[f"{name}/worst"] = wv.min() if wv.numel() else row.new_tensor(float("nan"))
            cells.append(wv)
        allv = torch.cat(cells)
        out["worst"] = allv.min() if allv.numel() else acc.new_tensor(float("nan"))
        return out


class AttributionInMask(Metric):
    """Paper 000's "Attr." column: mean over masked samples of ``Σ|A·P| / Σ|A|``, per split.

    ``update(attributions, mask, split=0)``: ``attributions (B, C, H, W)``, ``mask`` broadcastable to
    ``(B, 1, H, W)`` with values in ``[0, 1]``. Samples whose mask is empty are skipped (they have no
    spurious region). ``compute()`` returns ``{"{split}": Tensor}`` (NaN for a split without masked samples).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, splits: Sequence[str] = DEFAULT_SPLITS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.splits = _check_splits(splits)
        s = len(self.splits)
        self.add_state("ratio_sum", torch.zeros(s, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(s, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, attributions: Tensor, mask: Tensor, split: int | str = 0) -> None:
        """Add a batch of attributions ``(B, C, H, W)`` and masks ``(B, 1, H, W)`` / ``(B, H, W)``."""
        i = _split_index(split, self.splits)
        if attributions.dim() < 2:
            raise ValueError(f"attributions must be (B, C, H, W), got shape {tuple(attributions.shape)}")
        mask = mask_like(mask, attributions).to(attributions.device)
        has = mask.flatten(1).amax(1) > 0
        if not has.any():
            return
        ratio = relative_mass_in_mask(attributions[has].detach(), mask[has])
        self.ratio_sum[i] += ratio.double().sum()
        self.count[i] += int(has.sum())

    def compute(self) -> dict[str, Tensor]:
        mean = self.ratio_sum / self.count.clamp_min(1)
        mean = torch.where(self.count > 0, mean, torch.full_like(mean, float("nan"))).float()
        return {name: mean[i] for i, name in enumerate(self.splits)}
