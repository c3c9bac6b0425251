"""``ChannelEdit`` callback: a persistent activation-level ablation/preservation of channels
(:class:`negspace.editing.ChannelEdit`) applied during the chosen Trainer stages, saved in checkpoints and, with
``make_permanent=True``, baked into the network's weights at the end of fit (:func:`negspace.editing.bake`).

Layer names are dotted paths relative to the LightningModule (``"model.layer3"``), or relative to the
submodule named by ``forward=`` (``forward="model"``, ``"layer3"``).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from negspace.batch import BatchKeys, collect_images, images_of
from negspace.callbacks.base import deprecated_kwarg
from negspace.editing import channels as _channels
from negspace.editing.baking import bake, bake_plan
from negspace.hooks import PersistentEdit, get_layer, model_device

__all__ = ["ChannelEdit", "bake_at_fit_end"]

STAGES = ("fit", "validate", "test", "predict")
EXAMPLE_IMAGES = 8  # validation images passed to bake (next-layer folds, and the check against the hooked model)


def _network(pl_module: nn.Module, forward: str | None) -> nn.Module:
    return pl_module if forward is None else get_layer(pl_module, forward)


def _example(trainer: Trainer, batch_keys: BatchKeys, who: str) -> Tensor | None:
    """The first images of the first validation loader (else the training loader), or None without data."""
    for loaders in (trainer.val_dataloaders, trainer.train_dataloader):
        if isinstance(loaders, Mapping):
            loaders = next(iter(loaders.values()), None)
        if isinstance(loaders, list | tuple):
            loaders = loaders[0] if loaders else None
        if loaders is not None:
            return collect_images(loaders, batch_keys, max_images=EXAMPLE_IMAGES, who=who)
    return None


def bake_at_fit_end(
    trainer: Trainer, pl_module: LightningModule, edit: PersistentEdit, *, forward: str | None = None,
    batch_keys: Any = None, who: str = "ChannelEdit",
) -> nn.Module:
    """Bake ``edit`` (inactive) into the network in place (:func:`negspace.editing.bake` with ``inplace=True`` and
    validation images as ``example``) and return the network. Warns when the network's state-dict keys changed (a
    mask or router module was inserted): checkpoints then load only into the baked architecture."""
    net = _network(pl_module, forward)
    is_channel_edit = isinstance(edit, _channels.ChannelEdit)  # a router needs no example
    with torch.inference_mode(False), torch.enable_grad():
        x = _example(trainer, BatchKeys(batch_keys), who) if is_channel_edit else None
        example = None if x is None else x.to(model_device(net))
        plan = bake_plan(net, edit, example) if is_channel_edit else []
        before = set(pl_module.state_dict())  # the checkpoint's keys
        bake(net, edit, example, inplace=True)
    added = sorted(set(pl_module.state_dict()) - before)
    if added:
        why = "; ".join(f"{s.layer}: {s.reason}" for s in plan if s.how == "mask") if is_channel_edit else (
            "a router depends on the input and becomes a RoutedLayer/RoutedBlock module")
        rank_zero_warn(
            f"{who}(make_permanent=True): the edit could not be folded into weights everywhere "
            f"({why or 'a next-layer fold did not reproduce the hooked outputs'}); modules were inserted, adding "
            f"state-dict keys such as {added[:3]}. Checkpoints saved from now on load only into the baked "
            "architecture: rebuild it with negspace.editing.bake(net, edit, example, inplace=True) before "
            "load_state_dict(strict=True); or keep the unedited weights of the ModelCheckpoint files written during "
            "fit and re-apply the edit (negspace.editing.save_edit(edit, path) now, load_edited(net, path) later). "
            "See docs/editing.md, 'In a Lightning fit'."
        )
    return net


class ChannelEdit(Callback):
    """Persistent activation-level ablation (or preservation) of channels during the chosen stages.

    Args:
        edits: ``{layer: channels}`` (layers relative to the LightningModule, or to ``forward``).
        mode: ``"ablate"`` (replace the listed channels) or ``"preserve"`` (replace all others).
        value: ``"zero"``, ``"mean"``, a float or ``{layer: Tensor (C,)}``.
        stages: any of ``"fit"`` (training, and validation inside fit), ``"validate"``, ``"test"``, ``"predict"``.
        forward: dotted name of the submodule that is the network (the layer names are relative to it);
            ``root=`` is its deprecated name.
        make_permanent: at the end of fit (``on_fit_end``) bake the edit into the network in place
            (:func:`negspace.editing.bake`, with the first validation images as ``example``), so that a checkpoint
            saved after fit holds the edited weights; the callback then stops hooking that network. Warns when a
            module had to be inserted (the checkpoint then needs the baked architecture). ModelCheckpoint files
            written during fit hold the unedited weights (and this edit in the callback state).
        batch_keys: where the images are in a batch (only read with ``make_permanent``; checked on the first batch).
        adopt_checkpoint: when a checkpoint (same layers, mode and ``forward``) holds other channels or another
            value, use the checkpoint's edit instead of raising ``ValueError``.

    The edit is a :class:`negspace.editing.ChannelEdit`: applied at the start of each chosen stage, removed at
    its end (and on exceptions/teardown); saved in checkpoints (tensors/strings only, loads with
    ``weights_only=True``); :meth:`remove` removes it and disables the callback. Evaluate on biased splits by
    passing several val dataloaders (e.g. ``SpuriousPatchDataModule``'s three): every one is edited. The
    configuration wins over a checkpoint: ``stages`` and ``enabled`` are not taken from it.
    """

    def __init__(
        self,
        edits: Mapping[str, Sequence[int] | Tensor],
        mode: str = "ablate",
        value: str | float | Mapping[str, Tensor] = "zero",
        stages: Sequence[str] = ("validate", "test"),
        forward: str | None = None,
        *,
        make_permanent: bool = False,
        batch_keys: Any = None,
        adopt_checkpoint: bool = False,
        root: str | None = None,
    ) -> None:
        forward = deprecated_kwarg("ChannelEdit", "root", "forward", root, forward)
        if forward is not None and not isinstance(forward, str):
            raise TypeError(f"forward must be a dotted submodule name or None, got {type(forward).__name__}")
        for name, flag in (("make_permanent", make_permanent), ("adopt_checkpoint", adopt_checkpoint)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.edit = _channels.ChannelEdit(edits, mode=mode, value=value)
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        bad = [s for s in stages if s not in STAGES]
        if bad or not stages:
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {stages!r}")
        self.stages = stages
        self.forward = forward
        self.make_permanent, self.adopt_checkpoint = make_permanent, adopt_checkpoint
        self.batch_keys = BatchKeys(batch_keys)
        self.enabled = True
        self._owner: str | None = None
        self._baked: weakref.ref | None = None  # the network the edit was baked into
        self._checked: set[str] = set()  # batch layouts checked (make_permanent reads images at the end of fit)

    @property
    def state_key(self) -> str:
        # the key keeps its 0.1 field name ``root`` so that checkpoints written before the rename still load
        return self._generate_state_key(mode=self.edit.mode, layers=tuple(self.edit.layers), root=self.forward)

    @property
    def active(self) -> bool:
        return self.edit.active

    @property
    def baked(self) -> bool:
        """True once the edit is part of the weights of the network it was baked into (``make_permanent``)."""
        return self._baked is not None and self._baked() is not None

    def _on(self, pl_module: nn.Module, stage: str) -> None:
        net = _network(pl_module, self.forward)
        if self.enabled and stage in self.stages and not self.edit.active and not (self.baked and self._baked() is net):
            self.edit.apply(net)
            self._owner = stage

    def _off(self, stage: str | None = None) -> None:
        if stage is None or self._owner == stage:
            self.edit.remove()
            self._owner = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        net = _network(pl_module, self.forward)
        for name in self.edit.layers:  # a misspelt layer fails now, not at the end of fit
            get_layer(net, name)

    def _check_layout(self, batch: Any, source: str) -> None:
        if self.make_permanent and source not in self._checked:
            images_of(batch, self.batch_keys, who="ChannelEdit(make_permanent=True)")
            self._checked.add(source)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._check_layout(batch, "train")

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.state.fn == "fit":
            self._check_layout(batch, "val")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._on(pl_module, "fit")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._off("fit")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.make_permanent and self.enabled and not self.baked:
            self._off()
            self._baked = weakref.ref(bake_at_fit_end(trainer, pl_module, self.edit, forward=self.forward,
                                                      batch_keys=self.batch_keys, who="ChannelEdit"))

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
        """``edit`` (tensors/strings), ``stages``, ``enabled`` and ``permanent`` (1: the weights hold the edit)."""
        return {"edit": self.edit.state_dict(), "stages": list(self.stages), "enabled": int(self.enabled),
                "permanent": int(self.baked)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the checkpoint's edit against the configured one: equal, or ``adopt_checkpoint=True``, or a
        ``ValueError`` naming both. ``stages`` and ``enabled`` stay as configured."""
        saved = state_dict.get("edit") if isinstance(state_dict, Mapping) else None
        if not isinstance(saved, Mapping) or not {"edits", "mode", "value"} <= set(saved):
            raise ValueError(f"not a ChannelEdit checkpoint state: expected {{'edit': {{'edits', 'mode', 'value'}}, "
                             f"...}}, got {sorted(state_dict) if isinstance(state_dict, Mapping) else state_dict!r}")
        theirs = _channels.ChannelEdit.from_state_dict(saved)
        if theirs.same_as(self.edit):
            return
        if not self.adopt_checkpoint:
            raise ValueError(
                f"the checkpoint holds the edit {theirs.describe()}, but this ChannelEdit callback is configured "
                f"with {self.edit.describe()}; configure the checkpoint's edit, or pass "
                "ChannelEdit(..., adopt_checkpoint=True) to evaluate the checkpoint's edit"
            )
        self._off()
        self.edit.load_state_dict(saved)

    def __repr__(self) -> str:
        extra = ", make_permanent=True" + (" (baked)" if self.baked else "") if self.make_permanent else ""
        return f"ChannelEdit(stages={self.stages}, enabled={self.enabled}{extra}, edit={self.edit!r})"
