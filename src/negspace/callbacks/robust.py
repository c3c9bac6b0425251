"""Group-robust baselines as callbacks: ``GroupReweighting``, ``GroupDRO``, ``JTT`` (loss reweighting of an
unmodified module) and ``DFR`` (last-layer refit after training). The maths is :mod:`negspace.robust`.

The three loss callbacks register with the same ``training_step`` wrapper as ``AttributionPrior``
(:func:`negspace.priors.shared.install_step_wrapper`, restored in ``teardown``): the user's step runs
unchanged, a scoped forward hook keeps the logits of the network's call on the batch image, and the returned
loss is replaced by the weighted per-sample ``criterion`` of those logits (``"ce"`` or ``"bce"``, as
``ClassifierModule(loss=...)``; other terms your step adds are dropped). They do not combine with
``AttributionPrior`` or with each other (checked at setup).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from negspace.batch import BatchKeys, iter_batches
from negspace.hooks import get_layer
from negspace.priors.shared import install_step_wrapper, uninstall_step_wrapper
from negspace.robust.dfr import fit_dfr, head_features, set_head
from negspace.robust.groupdro import groupdro_loss
from negspace.robust.jtt import error_set, jtt_weights
from negspace.robust.losses import (
    check_criterion,
    group_counts,
    inverse_frequency_weights,
    per_sample_loss,
    weighted_mean,
)

__all__ = ["DFR", "JTT", "GroupDRO", "GroupReweighting"]

class _RobustLoss(Callback):
    """Shared machinery: wrap ``training_step``, capture the logits, replace the loss by ``self._loss(...)``."""

    role = "group"

    def __init__(self, *, criterion: str = "ce", batch_keys: Any = None, forward: str | None = None) -> None:
        super().__init__()
        self.criterion, self.batch_keys, self._keys = check_criterion(criterion), batch_keys, BatchKeys(batch_keys)
        if forward is not None and not isinstance(forward, str):
            raise TypeError(f"forward must be a dotted submodule name or None, got {type(forward).__name__}")
        self.forward = forward

    def _loss(self, losses: Tensor, batch: Any, module: LightningModule) -> Tensor | None:
        """The replacement loss of one batch (``None``: keep the module's own loss)."""
        return None

    def _on_batch(self, batch: Any) -> None:
        """See the raw training batch before the user's step runs (JTT reads its sample ids)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from negspace.callbacks.prior import AttributionPrior

        clash = [type(c).__name__ for c in trainer.callbacks if c is not self and isinstance(c, _RobustLoss | AttributionPrior)]
        if clash:
            raise ValueError(f"{type(self).__name__} replaces the training loss and cannot be combined with {clash}")
        self._net = pl_module if self.forward is None else get_layer(pl_module, self.forward)
        install_step_wrapper(pl_module, self)  # the one training_step wrapper (shared with AttributionPrior)

    @contextlib.contextmanager
    def _capture(self, module: LightningModule, batch: Any) -> Iterator[None]:
        """While the user's step runs, keep the network's output of its call on the batch image."""
        b = self._keys.unpack(batch, require=("image", "label", self.role), who=type(self).__name__)
        self._on_batch(batch)
        slot: dict[str, Any] = {}

        def hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
            if "out" not in slot and inputs and inputs[0] is b.image:
                slot["out"] = out

        handle = self._net.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        self._step = (b, slot.get("out"))

    def _add_to_output(self, module: LightningModule, batch: Any, out: Any) -> Any:
        b, net_out = self._step
        self._step = (None, None)
        if out is None:
            return out
        if net_out is None:
            raise ValueError(f"{type(self).__name__}: training_step did not call the network (forward="
                             f"{self.forward!r}) on the batch image tensor; pass forward= naming the submodule")
        logits = net_out["logits"] if isinstance(net_out, Mapping) else net_out
        logits = logits[0] if isinstance(logits, tuple | list) else logits
        loss = self._loss(per_sample_loss(logits, b.label, self.criterion), b, module)
        if loss is None:
            return out
        return loss if isinstance(out, Tensor) else {**out, "loss": loss}

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        uninstall_step_wrapper(pl_module, self)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        uninstall_step_wrapper(pl_module, self)

    def _train_counts(self, trainer: Trainer, num: int | None = None) -> Tensor:
        keys = [getattr(b, self.role) for b in iter_batches(trainer.train_dataloader, self._keys,
                                                           require=("image", self.role), who=type(self).__name__)]
        return group_counts(torch.cat([k.flatten().cpu() for k in keys]), num)


class GroupReweighting(_RobustLoss):
    """Class or group reweighting: sample weights ``N / (G · n_g)`` from the training set's counts (``by="group"``
    or ``"class"``), so every group (class) carries the same total weight."""

    def __init__(self, by: str = "group", **kw: Any) -> None:
        if by not in ("group", "class"):
            raise ValueError(f"by must be 'group' or 'class', got {by!r}")
        super().__init__(**kw)
        self.by, self.role = by, "group" if by == "group" else "label"
        self.weights: Tensor | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.weights is None:
            self.weights = inverse_frequency_weights(self._train_counts(trainer))

    def _loss(self, losses: Tensor, batch: Any, module: LightningModule) -> Tensor:
        if self.weights is None:  # on_train_start did not run (a step outside fit)
            raise ValueError("GroupReweighting: the training-set counts are computed at fit start; call trainer.fit")
        ids = getattr(batch, self.role).long().cpu()
        if int(ids.max()) >= self.weights.numel():
            raise ValueError(f"GroupReweighting: {self.role} id {int(ids.max())} was never seen in the training data")
        return weighted_mean(losses, self.weights[ids])

    def state_dict(self) -> dict[str, Any]:
        return {} if self.weights is None else {"weights": self.weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.weights = state_dict.get("weights", self.weights)


class GroupDRO(_RobustLoss):
    """GroupDRO (Sagawa et al. 2020): loss ``Σ_g q_g ℓ_g``, ``q`` updated by exponentiated gradient with step
    ``eta`` (and the ``adjustment / √n_g`` generalisation term); ``q`` is checkpointed."""

    def __init__(self, num_groups: int | None = None, eta: float = 0.01, adjustment: float = 0.0, **kw: Any) -> None:
        super().__init__(**kw)
        if not eta > 0 or not adjustment >= 0:
            raise ValueError(f"eta must be > 0 and adjustment >= 0, got eta={eta!r}, adjustment={adjustment!r}")
        self.num_groups, self.eta, self.adjustment = num_groups, float(eta), float(adjustment)
        self.q: Tensor | None = None if num_groups is None else torch.full((num_groups,), 1.0 / num_groups)
        self.counts: Tensor | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.q is None or (self.adjustment and self.counts is None):
            self.counts = self._train_counts(trainer, self.num_groups)
            g = self.counts.numel()
            if self.q is None:
                self.num_groups, self.q = g, torch.full((g,), 1.0 / g)

    def _loss(self, losses: Tensor, batch: Any, module: LightningModule) -> Tensor:
        if self.q is None:  # on_train_start did not run (a step outside fit)
            raise ValueError("GroupDRO: pass num_groups= or call trainer.fit (the groups are counted at fit start)")
        loss, q = groupdro_loss(losses, batch.group, self.q, eta=self.eta, counts=self.counts,
                                adjustment=self.adjustment)
        self.q = q.detach().cpu()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {} if self.q is None else {"q": self.q}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "q" in state_dict:
            self.q, self.num_groups = state_dict["q"], int(state_dict["q"].numel())


class JTT(_RobustLoss):
    """Just Train Twice (Liu et al. 2021): ERM for ``first_epochs``, then the misclassified training samples
    (by ``batch[index_key]``) are weighted ``lam_up``; ``reset=True`` restarts from the initial weights with a
    fresh optimizer state, as the paper's second model (LR schedulers are not reset)."""

    role = "label"

    def __init__(self, first_epochs: int = 1, lam_up: float = 5.0, index_key: str = "index", reset: bool = True,
                 **kw: Any) -> None:
        super().__init__(**kw)
        if isinstance(first_epochs, bool) or not isinstance(first_epochs, int) or first_epochs < 1:
            raise ValueError(f"first_epochs must be a positive int, got {first_epochs!r}")
        jtt_weights(torch.zeros(0), torch.zeros(0), lam_up)  # validates lam_up
        self.first_epochs, self.lam_up, self.index_key, self.reset = first_epochs, float(lam_up), index_key, reset
        self.errors: Tensor | None = None
        self.normalizer = 1.0
        self._init: dict[str, Tensor] | None = None
        self._ids = torch.zeros(0, dtype=torch.long)  # sample ids of the current batch (set by the wrapper)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.errors is None:
            self._init = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.errors is not None or trainer.current_epoch + 1 != self.first_epochs:
            return
        net = pl_module if self.forward is None else get_layer(pl_module, self.forward)
        self.errors = error_set(net, trainer.train_dataloader, self._keys, index_key=self.index_key)
        n = len(trainer.train_dataloader.dataset)
        self.normalizer = (n + (self.lam_up - 1) * self.errors.numel()) / n  # mean weight over the training set
        if self.reset and self._init is not None:
            pl_module.load_state_dict(self._init)
            for opt in trainer.optimizers:
                opt.state.clear()

    def _loss(self, losses: Tensor, batch: Any, module: LightningModule) -> Tensor | None:
        if self.errors is None:
            return None  # stage 1: the module's own loss
        return weighted_mean(losses, jtt_weights(self._ids, self.errors, self.lam_up),
                             losses.shape[0] * self.normalizer)

    def _on_batch(self, batch: Any) -> None:
        if not isinstance(batch, Mapping) or self.index_key not in batch:
            raise ValueError(f"JTT needs dict batches with an {self.index_key!r} key (sample ids)")
        self._ids = torch.as_tensor(batch[self.index_key])

    def state_dict(self) -> dict[str, Any]:
        return {} if self.errors is None else {"errors": self.errors, "normalizer": self.normalizer}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "errors" in state_dict:
            self.errors, self.normalizer = state_dict["errors"], float(state_dict["normalizer"])


class DFR(Callback):
    """Deep Feature Reweighting (Kirichenko et al. 2023): at the end of fit, refit the linear ``head`` (dotted
    name inside ``forward``) on group-balanced held-out data: ``holdout`` (a loader or list of loaders), else the
    datamodule's validation loaders ``holdout_idx`` (default all)."""

    def __init__(self, head: str, *, holdout: Any = None, holdout_idx: Sequence[int] | None = None, c: float = 1.0,
                 n_subsets: int = 10, seed: int = 0, batch_keys: Any = None, forward: str | None = None) -> None:
        super().__init__()
        if not isinstance(head, str) or not head:
            raise ValueError(f"head must be the dotted name of the last nn.Linear, got {head!r}")
        self.head, self.holdout, self.holdout_idx, self.c = head, holdout, holdout_idx, float(c)
        self.n_subsets, self.seed, self.batch_keys, self.forward = n_subsets, seed, batch_keys, forward
        self.fitted = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # fail before training on a wrong name
            get_layer(pl_module if self.forward is None else get_layer(pl_module, self.forward), self.head)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = self.holdout
        if loaders is None:
            dm = trainer.datamodule
            if dm is None:
                raise ValueError("DFR: pass holdout= (held-out loaders with group labels) or use a datamodule")
            loaders = dm.val_dataloader()
            loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
            loaders = [loaders[i] for i in self.holdout_idx] if self.holdout_idx is not None else loaders
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        net = pl_module if self.forward is None else get_layer(pl_module, self.forward)
        parts = [head_features(net, self.head, dl, self.batch_keys) for dl in loaders]
        f, y, g = (torch.cat([p[i] for p in parts]) for i in range(3))
        layer = get_layer(net, self.head)
        res = fit_dfr(f, y, g, num_classes=layer.out_features, c=self.c, n_subsets=self.n_subsets,
                      bias=layer.bias is not None, seed=self.seed)
        set_head(net, self.head, res)
        self.fitted = True

    def state_dict(self) -> dict[str, Any]:
        return {"fitted": self.fitted}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fitted = bool(state_dict.get("fitted", False))
