"""A plain image classifier LightningModule for recipes and fine-tuning (callbacks never depend on it)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.batch import images_of
from negspace.batch import unpack_batch as _unpack
from negspace.metrics.report import data_split_names, split_names
from negspace.modules.finetune import (
    backbone_modules,
    find_head,
    load_weights,
    split_parameters,
    warmup_cosine_factor,
)

__all__ = ["ClassifierModule", "unpack_batch"]

LOSSES = ("ce", "bce")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


def unpack_batch(batch: Any, image_key: str = "image", label_key: str = "label") -> tuple[Tensor, Tensor]:
    """``(image (B, C, H, W), label (B,))`` from a dict batch or a tuple ``(x, y, ...)`` (:mod:`negspace.batch`)."""
    keys = None if (image_key, label_key) == ("image", "label") else {"image": image_key, "label": label_key}
    b = _unpack(batch, keys, require=("image", "label"), who="ClassifierModule")
    return b.image, b.label  # type: ignore[return-value]


def _check_number(name: str, value: Any, lo: float, hi: float | None = None, lo_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (value > lo if lo_open else value >= lo)
    if ok and hi is not None:
        ok = value < hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'})"
        raise ValueError(f"{name} must be a number in {rng}, got {value!r}")


class ClassifierModule(L.LightningModule):
    """Image classifier for training from scratch and fine-tuning: a timm/torchvision model by name, a negspace
    X-model, or any ``nn.Module``.

    Args:
        model: a name for :func:`negspace.models.zoo.create_model` (``"xsmallcnn"``, ``"xresnet18"``,
            ``"green_pixel"``, ``"motion"``, ``"timm:<name>"``, ``"torchvision:<name>"``) or an ``nn.Module``
            (in YAML: ``class_path``/``init_args``, e.g. ``negspace.models.xmodels.XSmallCNN`` with ``width``).
        num_classes: number of logits (>= 2). Each step checks that the model returns ``(B, num_classes)``; the
            first batch of each stage checks that labels are integer classes in ``[0, num_classes)``.
        loss: ``"ce"`` (softmax cross-entropy) or ``"bce"``: binary cross-entropy of *every* logit against the
            one-hot label (paper 000 B.2/B.4). Predictions are ``argmax`` either way.
        lr, weight_decay: learning rate of the head (and of everything without a backbone multiplier) and weight
            decay (Adam: coupled L2, paper 000; AdamW: decoupled; SGD: coupled).
        pretrained: load timm/torchvision published weights (needs network or a local cache).
        in_chans: input channels.
        checkpoint: deprecated name of ``weights``.
        splits: names of the validation/test dataloaders, by ``dataloader_idx`` (one per loader). ``None``: the
            data module's ``split_names``; a single unnamed loader is ``"val"``/``"test"``; several unnamed
            loaders are an error (see :func:`negspace.metrics.split_names`).
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"``. A top-level ``optimizer:`` section
            of the ``negspace`` CLI replaces it (the parameter groups below are kept).
        momentum: SGD momentum.
        backbone_lr_mult: the backbone's learning rate is ``lr · backbone_lr_mult`` (parameter groups
            ``head`` first, ``backbone`` last); the head is found by :func:`~negspace.modules.finetune.find_head`.
        freeze_backbone_epochs: train only the head for the first N epochs (backbone ``requires_grad=False``).
            For Lightning's ``BackboneFinetuning`` callback instead, the module exposes ``backbone``.
        label_smoothing: in [0, 1): CE's ``label_smoothing``; BCE targets ``(1 − ε)·one_hot + ε / num_classes``.
        schedule: ``"constant"`` or ``"cosine"`` (to ``min_lr_ratio · lr`` at the last step), stepped per optimizer
            step, after ``warmup_epochs`` of linear warm-up. A top-level CLI ``lr_scheduler:`` section is used
            instead when given (then keep ``schedule: constant`` and ``warmup_epochs: 0``).
        warmup_epochs, min_lr_ratio: see ``schedule``.
        weights: a local ``.safetensors`` or torch state-dict/Lightning checkpoint file (``weights_only=True``)
            loaded into the network after construction; a mismatch raises ``ValueError`` listing the missing,
            unexpected and shape-mismatched keys.
        weights_head: also load the head from ``weights`` (``False``: keep the freshly initialised head, e.g.
            when the checkpoint was trained on other classes).
        pretrained_file: a local file of pretrained weights for a ``timm:`` model, loaded the timm way
            (``pretrained_cfg_overlay=dict(file=...)``; a head of another size is re-initialised by timm).
        head: dotted name(s) of the classification head when it is not found automatically.

    ``forward(x: (B, C, H, W)) -> (B, num_classes)`` logits. ``training_step`` returns the loss tensor.
    Validation/test log ``{stage}/{split}/acc`` and ``{stage}/{split}/loss`` for every dataloader.
    """

    #: set by the ``negspace`` CLI from its ``optimizer:`` / ``lr_scheduler:`` sections
    optimizer_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None
    lr_scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None = None

    def __init__(
        self,
        model: str | nn.Module = "xsmallcnn",
        num_classes: int = 2,
        loss: str = "ce",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        pretrained: bool = False,
        in_chans: int = 3,
        checkpoint: str | None = None,
        splits: Sequence[str] | None = None,
        optimizer: str = "adam",
        *,
        momentum: float = 0.9,
        backbone_lr_mult: float = 1.0,
        freeze_backbone_epochs: int = 0,
        label_smoothing: float = 0.0,
        schedule: str = "constant",
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
        weights: str | None = None,
        weights_head: bool = True,
        pretrained_file: str | None = None,
        head: str | list[str] | None = None,
    ) -> None:
        super().__init__()
        for name, value, allowed in (("loss", loss, LOSSES), ("optimizer", optimizer, OPTIMIZERS),
                                     ("schedule", schedule, SCHEDULES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (one logit per class), got {num_classes!r}")
        _check_number("lr", lr, 0.0, lo_open=True)
        _check_number("weight_decay", weight_decay, 0.0)
        _check_number("momentum", momentum, 0.0)
        _check_number("backbone_lr_mult", backbone_lr_mult, 0.0)
        _check_number("label_smoothing", label_smoothing, 0.0, 1.0)
        _check_number("warmup_epochs", warmup_epochs, 0.0)
        _check_number("min_lr_ratio", min_lr_ratio, 0.0)
        if min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        if isinstance(freeze_backbone_epochs, bool) or not isinstance(freeze_backbone_epochs, int) or freeze_backbone_epochs < 0:
            raise ValueError(f"freeze_backbone_epochs must be an int >= 0, got {freeze_backbone_epochs!r}")
        if checkpoint is not None:
            warnings.warn("ClassifierModule(checkpoint=...) is deprecated; use weights=...", DeprecationWarning,
                          stacklevel=2)
            if weights is not None and weights != checkpoint:
                raise ValueError(f"pass either weights or the deprecated checkpoint, got {weights!r} and {checkpoint!r}")
            weights = checkpoint
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.model = self._build(model, num_classes, pretrained, in_chans, pretrained_file)
        self.head_names = find_head(self.model, head)
        if weights is not None:
            load_weights(self.model, weights, skip=() if weights_head else self.head_names)
            if not weights_head and not self.head_names:
                raise ValueError("weights_head=False needs a classification head; pass head='<dotted name>'")
        if (backbone_lr_mult != 1.0 or freeze_backbone_epochs) and not self.head_names:
            raise ValueError(
                f"backbone_lr_mult/freeze_backbone_epochs need the classification head of {type(self.model).__name__}, "
                f"which was not found (tried get_classifier() and {['fc', 'classifier', 'head', 'heads']}); pass head="
            )
        self.num_classes, self.loss_name, self.lr, self.weight_decay = num_classes, loss, lr, weight_decay
        if splits is not None:
            split_names(splits, len(splits), who="ClassifierModule")  # distinct non-empty names
        self.splits = tuple(splits) if splits is not None else None
        self.optimizer_name, self.momentum = optimizer, momentum
        self.backbone_lr_mult, self.freeze_backbone_epochs = float(backbone_lr_mult), freeze_backbone_epochs
        self.label_smoothing, self.schedule = float(label_smoothing), schedule
        self.warmup_epochs, self.min_lr_ratio = float(warmup_epochs), float(min_lr_ratio)
        self._freezable: list[nn.Parameter] = []
        self._labels_checked: set[str] = set()

    @staticmethod
    def _build(model: Any, num_classes: int, pretrained: bool, in_chans: int, pretrained_file: str | None) -> nn.Module:
        if isinstance(model, nn.Module):
            if pretrained_file is not None:
                raise ValueError("pretrained_file needs a model name 'timm:<name>', got an nn.Module")
            return model
        if not isinstance(model, str):
            raise TypeError(f"model must be a model name (str) or an nn.Module, got {type(model).__name__}")
        if pretrained_file is not None:
            if not model.startswith("timm:"):
                raise ValueError(f"pretrained_file is loaded through timm; model must be 'timm:<name>', got {model!r}")
            if not Path(pretrained_file).is_file():
                raise ValueError(f"pretrained_file not found: {pretrained_file!r}")
            import timm

            return timm.create_model(model[5:], pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                     pretrained_cfg_overlay={"file": str(pretrained_file)})
        from negspace.models.zoo import create_model

        return create_model(model, num_classes, pretrained=pretrained, in_chans=in_chans)

    # ------------------------------------------------------------------ fine-tuning structure
    @property
    def backbone(self) -> nn.ModuleList:
        """Everything but the head, as a flat list of modules sharing the network's parameters (what Lightning's
        ``BackboneFinetuning`` freezes and unfreezes)."""
        if not self.head_names:
            raise ValueError(f"no classification head found on {type(self.model).__name__}; pass head='<dotted name>'")
        return backbone_modules(self.model, self.head_names)

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters as groups ``[{"name": "head"}, {"name": "backbone", "lr_mult": m}]``, or one
        ``"all"`` group without a head or when neither a multiplier nor freezing is asked for; empty groups are
        left out."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not self.head_names or (self.backbone_lr_mult == 1.0 and not self.freeze_backbone_epochs):
            return [{"name": "all", "params": trainable, "lr_mult": 1.0}] if trainable else []
        head, backbone = split_parameters(self.model, self.head_names)
        ids = {id(p) for p in trainable}
        model_ids = {id(p) for p in self.model.parameters()}
        extra = [p for p in trainable if id(p) not in model_ids]  # parameters outside the network
        groups = [
            {"name": "head", "params": [p for p in head if id(p) in ids] + extra, "lr_mult": 1.0},
            {"name": "backbone", "params": [p for p in backbone if id(p) in ids], "lr_mult": self.backbone_lr_mult},
        ]
        return [g for g in groups if g["params"]]

    def on_fit_start(self) -> None:
        if self.freeze_backbone_epochs:
            from lightning.pytorch.callbacks import BaseFinetuning

            if any(isinstance(cb, BaseFinetuning) for cb in self.trainer.callbacks):  # type: ignore[union-attr]
                raise ValueError("use either freeze_backbone_epochs or a BaseFinetuning callback, not both")
            self._freezable = [p for p in split_parameters(self.model, self.head_names)[1] if p.requires_grad]

    def on_train_epoch_start(self) -> None:
        if self.freeze_backbone_epochs:
            frozen = self.current_epoch < self.freeze_backbone_epochs
            for p in self._freezable:
                p.requires_grad_(not frozen)

    def on_fit_end(self) -> None:
        for p in self._freezable:  # a fit shorter than freeze_backbone_epochs leaves no frozen parameters behind
            p.requires_grad_(True)

    # ------------------------------------------------------------------ steps
    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, C, H, W)`` → logits ``(B, num_classes)``."""
        return self.model(x)

    def compute_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean CE, or mean BCE of every logit against ``one_hot(y)`` (both with ``label_smoothing``)."""
        if self.loss_name == "ce":
            return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        target = F.one_hot(y, self.num_classes).to(logits.dtype)
        if self.label_smoothing:
            target = target * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return F.binary_cross_entropy_with_logits(logits, target)

    def _split_name(self, stage: str, dataloader_idx: int) -> str:
        trainer = self._trainer
        if trainer is None:
            return self.splits[dataloader_idx] if self.splits and dataloader_idx < len(self.splits) else stage
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        num = len(loaders) if isinstance(loaders, Sequence) else 1
        names = split_names(self.splits, max(num, 1), data_split_names(getattr(trainer, "datamodule", None), stage),
                            stage=stage, who="ClassifierModule")
        return names[dataloader_idx]

    def _checked_logits(self, x: Tensor, y: Tensor, stage: str) -> Tensor:
        """``self(x)`` after checking the output shape (every step) and the labels (first batch of a stage)."""
        logits = self(x)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape != (y.shape[0], self.num_classes):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"ClassifierModule: the model must return logits (B, num_classes) = "
                             f"({y.shape[0]}, {self.num_classes}), got {shape}; set num_classes to the model's "
                             "number of outputs")
        if stage not in self._labels_checked:
            if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
                raise ValueError(f"ClassifierModule: labels must be integer class indices (B,), got {y.dtype} "
                                 f"{tuple(y.shape)}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"ClassifierModule: labels must be in [0, num_classes={self.num_classes}), got "
                                 f"values in [{int(y.min())}, {int(y.max())}]")
            self._labels_checked.add(stage)
        return logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = unpack_batch(batch)
        logits = self._checked_logits(x, y, "train")
        loss = self.compute_loss(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        self.log("train/acc", acc, prog_bar=True, batch_size=y.shape[0])
        return loss

    def _eval_step(self, stage: str, batch: Any, dataloader_idx: int) -> dict[str, Tensor]:
        x, y = unpack_batch(batch)
        logits = self._checked_logits(x, y, stage)
        loss = self.compute_loss(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        name = self._split_name(stage, dataloader_idx)
        kw = {"batch_size": y.shape[0], "add_dataloader_idx": False, "sync_dist": True}
        self.log(f"{stage}/{name}/loss", loss, **kw)
        self.log(f"{stage}/{name}/acc", acc, prog_bar=True, **kw)
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self._eval_step("test", batch, dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(images_of(batch, who="ClassifierModule.predict_step"))

    # ------------------------------------------------------------------ optimisation
    def _optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(groups)
        elif self.optimizer_name == "sgd":
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        else:
            cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
            opt = cls(groups, lr=self.lr, weight_decay=self.weight_decay)
        for g in opt.param_groups:  # one lr per group: base lr (the optimizer's) times the group's multiplier
            g["lr"] = g["lr"] * g.get("lr_mult", 1.0)
        return opt

    def _steps(self) -> tuple[int, int]:
        """``(warm-up steps, total steps)`` from the trainer's estimate of optimizer steps."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = self.trainer.max_epochs
        if self.warmup_epochs and not (epochs and epochs > 0):
            raise ValueError("warmup_epochs needs trainer.max_epochs > 0 (the number of steps per epoch)")
        warmup = round(self.warmup_epochs * total / epochs) if self.warmup_epochs else 0
        return min(warmup, total), total

    def configure_optimizers(self) -> Any:
        groups = self.param_groups()
        if not groups:
            return None
        opt = self._optimizer(groups)
        own_schedule = self.schedule != "constant" or self.warmup_epochs > 0
        if self.lr_scheduler_factory is not None:
            if own_schedule:
                raise ValueError("an lr_scheduler section replaces schedule/warmup_epochs; set schedule: constant "
                                 "and warmup_epochs: 0, or drop the lr_scheduler section")
            sched = self.lr_scheduler_factory(opt)
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched,
                                                           "monitor": getattr(sched, "monitor", "val_loss")}}
            return [opt], [sched]
        if not own_schedule:
            return opt
        warmup, total = self._steps()
        cosine, floor = self.schedule == "cosine", self.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine_factor(step, warmup, total, cosine, floor)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
