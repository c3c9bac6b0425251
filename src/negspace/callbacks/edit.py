"""``ChannelEdit`` callback: a persistent activation-level ablation/preservation of channels
(:class:`negspace.editing.ChannelEdit`) applied during the chosen Trainer stages and saved in checkpoints.

Layer names are dotted paths relative to the LightningModule (``"model.layer3"``), or relative to the
submodule named by ``forward=`` (``forward="model"``, ``"layer3"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from negspace.callbacks.base import deprecated_kwarg
from negspace.editing import channels as _channels
from negspace.hooks import get_layer

__all__ = ["ChannelEdit"]

STAGES = ("fit", "validate", "test", "predict")


class ChannelEdit(Callback):
    """Persistent activation-level ablation (or preservation) of channels during the chosen stages.

    Args:
        edits: ``{layer: channels}`` (layers relative to the LightningModule, or to ``forward``).
        mode: ``"ablate"`` (replace the listed channels) or ``"preserve"`` (replace all others).
        value: ``"zero"``, ``"mean"``, a float or ``{layer: Tensor (C,)}``.
        stages: any of ``"fit"`` (training, and validation inside fit), ``"validate"``, ``"test"``, ``"predict"``.
        forward: dotted name of the submodule that is the network (the layer names are relative to it);
            ``root=`` is its deprecated name.

    The edit is a :class:`negspace.editing.ChannelEdit`: applied at the start of each chosen stage, removed at
    its end (and on exceptions/teardown); saved in checkpoints (tensors/strings only, loads with
    ``weights_only=True``); :meth:`remove` removes it and disables the callback. Evaluate on biased splits by
    passing several val dataloaders (e.g. ``SpuriousPatchDataModule``'s three): every one is edited.
    """

    def __init__(
        self,
        edits: Mapping[str, Sequence[int] | Tensor],
        mode: str = "ablate",
        value: str | float | Mapping[str, Tensor] = "zero",
        stages: Sequence[str] = ("validate", "test"),
        forward: str | None = None,
        *,
        root: str | None = None,
    ) -> None:
        forward = deprecated_kwarg("ChannelEdit", "root", "forward", root, forward)
        if forward is not None and not isinstance(forward, str):
            raise TypeError(f"forward must be a dotted submodule name or None, got {type(forward).__name__}")
        self.edit = _channels.ChannelEdit(edits, mode=mode, value=value)
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        bad = [s for s in stages if s not in STAGES]
        if bad or not stages:
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {stages!r}")
        self.stages = stages
        self.forward = forward
        self.enabled = True
        self._owner: str | None = None

    @property
    def state_key(self) -> str:
        # the key keeps its 0.1 field name ``root`` so that checkpoints written before the rename still load
        return self._generate_state_key(mode=self.edit.mode, layers=tuple(self.edit.layers), root=self.forward)

    @property
    def active(self) -> bool:
        return self.edit.active

    def _on(self, pl_module: nn.Module, stage: str) -> None:
        if self.enabled and stage in self.stages and not self.edit.active:
            self.edit.apply(pl_module if self.forward is None else get_layer(pl_module, self.forward))
            self._owner = stage

    def _off(self, stage: str | None = None) -> None:
        if stage is None or self._owner == stage:
            self.edit.remove()
            self._owner = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._on(pl_module, "fit")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._off("fit")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._on(pl_module, "validate")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._off("validate")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._on(pl_module, "test")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._off("test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._on(pl_module, "predict")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._off("predict")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._off()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._off()

    def remove(self) -> None:
        """Remove the hooks now and disable the callback (the model is exactly as before)."""
        self._off()
        self.enabled = False

    def state_dict(self) -> dict[str, Any]:
        return {"edit": self.edit.state_dict(), "stages": list(self.stages), "enabled": int(self.enabled)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._off()
        self.edit.load_state_dict(state_dict["edit"])
        self.stages = tuple(str(s) for s in state_dict.get("stages", self.stages))
        self.enabled = bool(state_dict.get("enabled", 1))

    def __repr__(self) -> str:
        return f"ChannelEdit(stages={self.stages}, enabled={self.enabled}, edit={self.edit!r})"
