"""A plain image classifier LightningModule for recipes (callbacks never depend on it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.metrics.group import DEFAULT_SPLITS

__all__ = ["ClassifierModule", "unpack_batch"]

LOSSES = ("ce", "bce")
OPTIMIZERS = ("adam", "adamw")


def unpack_batch(batch: Any, image_key: str = "image", label_key: str = "label") -> tuple[Tensor, Tensor]:
    """``(image (B, C, H, W), label (B,))`` from a dict batch (``image``/``label`` keys) or a tuple ``(x, y, ...)``."""
    if isinstance(batch, Mapping):
        missing = [k for k in (image_key, label_key) if k not in batch]
        if missing:
            raise ValueError(f"batch dict is missing keys {missing}; it has {sorted(batch)}")
        return batch[image_key], batch[label_key]
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"batch must be a dict with {image_key!r}/{label_key!r} keys or a tuple (image, label, ...), "
        f"got {type(batch).__name__}"
    )


class ClassifierModule(L.LightningModule):
    """Image classifier: a timm/torchvision model by name, a negspace X-model, or any ``nn.Module``.

    Args:
        model: a name for :func:`negspace.models.zoo.create_model` (``"xsmallcnn"``, ``"xresnet18"``,
            ``"green_pixel"``, ``"motion"``, ``"timm:<name>"``, ``"torchvision:<name>"``) or an ``nn.Module``
            (in YAML: ``class_path``/``init_args``, e.g. ``negspace.models.xmodels.XSmallCNN`` with ``width``).
        num_classes: number of logits.
        loss: ``"ce"`` (softmax cross-entropy) or ``"bce"``: binary cross-entropy of *every* logit against the
            one-hot label, ``BCEWithLogits(logits (B, C), one_hot(y))`` (paper 000 B.2/B.4). Either way the
            model has one logit per class and predictions are ``argmax``, so attribution targets are class
            indices (target ``y``, non-target ``1 − y``) for both losses.
        lr, weight_decay: Adam (paper 000 B.4: lr 1e-4, wd 1e-4; B.2: lr 1e-2).
        pretrained: load timm/torchvision weights (needs network or a local cache).
        in_chans: input channels.
        checkpoint: optional ``.safetensors`` state dict for the network (e.g. set weights).
        splits: names of the validation/test dataloaders, by ``dataloader_idx``.
        optimizer: ``"adam"`` (paper 000; coupled L2 weight decay) or ``"adamw"`` (decoupled weight decay).

    ``forward(x: (B, C, H, W)) -> (B, num_classes)`` logits. ``training_step`` returns the loss tensor.
    Validation/test log ``{stage}/{split}/acc`` and ``{stage}/{split}/loss`` for every dataloader.
    """

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
        splits: Sequence[str] = DEFAULT_SPLITS,
        optimizer: str = "adam",
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if isinstance(model, nn.Module):
            self.model = model
            if checkpoint is not None:
                from safetensors.torch import load_file

                self.model.load_state_dict(load_file(checkpoint))
        elif isinstance(model, str):
            from negspace.models.zoo import create_model

            self.model = create_model(
                model, num_classes, pretrained=pretrained, in_chans=in_chans, checkpoint=checkpoint
            )
        else:
            raise TypeError(f"model must be a model name (str) or an nn.Module, got {type(model).__name__}")
        self.num_classes = num_classes
        self.loss_name = loss
        self.lr = lr
        self.weight_decay = weight_decay
        self.splits = tuple(splits)
        self.optimizer_name = optimizer

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, C, H, W)`` → logits ``(B, num_classes)``."""
        return self.model(x)

    def compute_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean CE, or mean BCE of every logit against ``one_hot(y)``."""
        if self.loss_name == "ce":
            return F.cross_entropy(logits, y)
        return F.binary_cross_entropy_with_logits(logits, F.one_hot(y, self.num_classes).to(logits.dtype))

    def _split_name(self, dataloader_idx: int) -> str:
        return self.splits[dataloader_idx] if dataloader_idx < len(self.splits) else f"split_{dataloader_idx}"

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = unpack_batch(batch)
        logits = self(x)
        loss = self.compute_loss(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        self.log("train/acc", acc, prog_bar=True, batch_size=y.shape[0])
        return loss

    def _eval_step(self, stage: str, batch: Any, dataloader_idx: int) -> dict[str, Tensor]:
        x, y = unpack_batch(batch)
        logits = self(x)
        loss = self.compute_loss(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        name = self._split_name(dataloader_idx)
        kw = {"batch_size": y.shape[0], "add_dataloader_idx": False, "sync_dist": True}
        self.log(f"{stage}/{name}/loss", loss, **kw)
        self.log(f"{stage}/{name}/acc", acc, prog_bar=True, **kw)
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self._eval_step("test", batch, dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = unpack_batch(batch)[0] if isinstance(batch, Mapping | Sequence) else batch
        return self(x)

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return None
        opt = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        return opt(params, lr=self.lr, weight_decay=self.weight_decay)
