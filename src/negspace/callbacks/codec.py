"""Lightning glue for CODEC (paper 002): :class:`CodecModes` (fit contribution modes) and :class:`ChannelEdit`
(a persistent activation-level ablation/preservation during validation/test), plus :func:`fit_sae`, the
SAE fit as a small Lightning run with a progress bar. The maths lives in :mod:`negspace.editing.codec`.

Layer names are dotted paths relative to the LightningModule (``"model.layer3"``), or relative to the
submodule named by ``root=`` (``root="model"``, ``"layer3"``). The module (or ``root``) must map an image
batch to logits ``(B, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from negspace.callbacks.base import output_dir
from negspace.editing import channels as _channels
from negspace.editing.codec import (
    ContributionSAE,
    LayerModes,
    SAEFit,
    default_kind,
    encode_dataset,
    fit_modes,
    r2_score,
    sae_loss,
    sae_optimizers,
    selection_sign,
)
from negspace.editing.contributions import ContributionSet, ContributionStore, compute_contributions
from negspace.hooks import get_layer

__all__ = ["ChannelEdit", "CodecModes", "SAEModule", "fit_sae"]

STAGES = ("fit", "validate", "test", "predict")


def _root(pl_module: nn.Module, root: str | None) -> nn.Module:
    return pl_module if root is None else get_layer(pl_module, root)


# --------------------------------------------------------------------------------------- SAE as Lightning
class SAEModule(L.LightningModule):
    """A :class:`ContributionSAE` trained with :func:`negspace.editing.codec.sae_loss` (Adam + ReduceLROnPlateau
    on the epoch loss, logged as ``sae/loss``)."""

    def __init__(
        self, sae: ContributionSAE, *, lr: float = 5e-5, atom_l1: float = 5e-5, code_l1: float = 0.0,
        factor: float = 0.5, patience: int = 10,
    ) -> None:
        super().__init__()
        self.sae = sae
        self.lr, self.atom_l1, self.code_l1, self.factor, self.patience = lr, atom_l1, code_l1, factor, patience

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        loss, _ = sae_loss(self.sae, x, atom_l1=self.atom_l1, code_l1=self.code_l1)
        self.log("sae/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict:
        opt, sched = sae_optimizers(self.sae, lr=self.lr, factor=self.factor, patience=self.patience)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "sae/loss", "interval": "epoch"}}


def fit_sae(
    features: Tensor,
    *,
    epochs: int = 300,
    lr: float = 5e-5,
    batch_size: int = 128,
    atom_l1: float = 5e-5,
    code_l1: float = 0.0,
    seed: int = 0,
    trainer_kwargs: Mapping[str, Any] | None = None,
    **sae_kwargs: Any,
) -> SAEFit:
    """Fit a :class:`ContributionSAE` on ``features: (N, F)`` with a small ``lightning.Trainer`` (progress bar,
    CPU by default; pass ``trainer_kwargs`` for accelerators/loggers). Returns R² and throughput."""
    import time

    L.seed_everything(seed, verbose=False)
    sae = ContributionSAE(features.shape[1], **sae_kwargs).fit_scale_(features)
    ds = torch.utils.data.TensorDataset(features.float())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True)
    kw: dict[str, Any] = {
        "max_epochs": epochs, "accelerator": "cpu", "devices": 1, "logger": False,
        "enable_checkpointing": False, "enable_model_summary": False,
    }
    kw.update(trainer_kwargs or {})
    module = SAEModule(sae, lr=lr, atom_l1=atom_l1, code_l1=code_l1)
    trainer = L.Trainer(**kw)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    rate = len(ds) * trainer.current_epoch / max(time.perf_counter() - t0, 1e-9)
    codes, recon = encode_dataset(sae.cpu(), features)
    sae.eval()
    losses = [float(trainer.callback_metrics.get("sae/loss", float("nan")))]
    return SAEFit(sae, losses, r2_score(features, recon), rate, int((codes > 0).any(0).sum()))


# ----------------------------------------------------------------------------------------- ChannelEdit
class ChannelEdit(Callback):
    """Persistent activation-level ablation (or preservation) of channels during the chosen stages.

    Args:
        edits: ``{layer: channels}`` (layers relative to the LightningModule, or to ``root``).
        mode: ``"ablate"`` (replace the listed channels) or ``"preserve"`` (replace all others).
        value: ``"zero"``, ``"mean"``, a float or ``{layer: Tensor (C,)}``.
        stages: any of ``"fit"`` (training, and validation inside fit), ``"validate"``, ``"test"``, ``"predict"``.
        root: dotted name of the submodule the layer names are relative to.

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
        root: str | None = None,
    ) -> None:
        self.edit = _channels.ChannelEdit(edits, mode=mode, value=value)
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        bad = [s for s in stages if s not in STAGES]
        if bad or not stages:
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {stages!r}")
        self.stages = stages
        self.root = root
        self.enabled = True
        self._owner: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.edit.mode, layers=tuple(self.edit.layers), root=self.root)

    @property
    def active(self) -> bool:
        return self.edit.active

    def _on(self, pl_module: nn.Module, stage: str) -> None:
        if self.enabled and stage in self.stages and not self.edit.active:
            self.edit.apply(_root(pl_module, self.root))
            self._owner = stage

    def _off(self, stage: str | None = None) -> None:
        if stage is None or self._owner == stage:
            self.edit.remove()
            self._owner = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on(pl_module, "fit")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._off("fit")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on(pl_module, "validate")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._off("validate")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on(pl_module, "test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._off("test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on(pl_module, "predict")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._off("predict")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._off()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
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


# -------------------------------------------------------------------------------------------- CodecModes
class CodecModes(Callback):
    """Compute contribution datasets on validation data and fit CODEC contribution modes per layer.

    Args:
        layers: dotted layer names (relative to the LightningModule or ``root``).
        num_classes: number of classes (default: from the labels).
        fit_on: ``"train_end"`` (after ``fit``), ``"validation_end"`` (after each validation outside the sanity
            check) or ``"manual"`` (call :meth:`fit` yourself).
        method, target, n_steps, k: contribution algorithm/target (paper: ``integrated``, ``top_logit``, 10).
        kind: SAE features (default ``"positive"``: E, the paper's choice; ``"negative"`` (I) for an ``entropy``
            target; or ``"net"``, ``"concat"``). Channel selection signs follow the target (``selection_sign``).
        superclasses: ``{"name": [classes]}`` extra concept masks for the mode–class correlation.
        dataloader_idx: which validation dataloader to use; ``max_batches`` caps the data.
        store_dir: stream contributions to safetensors shards there (for large validation sets).
        baseline: also fit the activation-SAE baseline.
        sae: keyword arguments of :func:`negspace.editing.codec.train_sae` (epochs, lr, batch_size, threshold,
            expansion, hidden, nonneg, atom_l1, code_l1, seed).

    After fitting, ``callback.result`` is ``{layer: LayerModes}`` and the statistics (Hoyer, E/I correlation,
    PCA dimensionality, R²) are logged as ``codec/{layer}/{name}``. Under DDP every rank computes its share,
    the rows are gathered, and every rank fits the same seeded SAE on the same data.
    The SAE is trained with a plain loop here (a nested Trainer inside a running one would clash with its
    loops and loggers); use :func:`fit_sae` for a standalone Lightning fit.
    """

    def __init__(
        self,
        layers: str | Sequence[str],
        *,
        num_classes: int | None = None,
        fit_on: str = "train_end",
        method: str = "integrated",
        target: str = "top_logit",
        n_steps: int = 10,
        k: int = 5,
        kind: str | None = None,
        superclasses: Mapping[str, Sequence[int]] | None = None,
        dataloader_idx: int = 0,
        max_batches: int | None = None,
        store_dir: str | None = None,
        baseline: bool = True,
        batch_keys: Sequence[str] | None = None,
        root: str | None = None,
        progress: bool = True,
        sae: Mapping[str, Any] | None = None,
    ) -> None:
        if fit_on not in ("train_end", "validation_end", "manual"):
            raise ValueError(f"fit_on must be 'train_end', 'validation_end' or 'manual', got {fit_on!r}")
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.num_classes = num_classes
        self.fit_on = fit_on
        self.method, self.target, self.n_steps, self.k = method, target, n_steps, k
        self.kind = default_kind(target) if kind is None else kind
        self.superclasses = superclasses
        self.dataloader_idx = dataloader_idx
        self.max_batches = max_batches
        self.store_dir = store_dir
        self.baseline = baseline
        self.batch_keys = batch_keys
        self.root = root
        self.progress = progress
        self.sae_kwargs = dict(sae or {})
        self.sae_kwargs.setdefault("progress", progress)
        self.result: dict[str, LayerModes] | None = None
        self.data: ContributionSet | None = None

    def fit(self, model: nn.Module, dataloader: Any) -> dict[str, LayerModes]:
        """Compute the contribution dataset over ``dataloader`` and fit the modes of every layer (on demand)."""
        for n in self.layers:
            get_layer(model, n)
        with torch.inference_mode(False), torch.enable_grad():
            out = compute_contributions(
                model, dataloader, self.layers, target=self.target, method=self.method, n_steps=self.n_steps,
                k=self.k, store=self.store_dir, batch_keys=self.batch_keys, max_batches=self.max_batches,
                progress=self.progress,
            )
            data = out.to_set() if isinstance(out, ContributionStore) else out
            self.data = data
            self.result = {
                n: fit_modes(data, n, kind=self.kind, num_classes=self.num_classes,
                             superclasses=self.superclasses, baseline=self.baseline,
                             sign=selection_sign(self.target, self.kind), **self.sae_kwargs)
                for n in self.layers
            }
        return self.result

    def metrics(self) -> dict[str, float]:
        if self.result is None:
            return {}
        return {f"codec/{n}/{k}": float(v) for n, m in self.result.items() for k, v in m.stats.items()}

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.datamodule is not None:
            loaders = trainer.datamodule.val_dataloader()
        if loaders is None:
            raise RuntimeError("CodecModes needs validation dataloaders (or call .fit(model, dataloader))")
        if isinstance(loaders, list | tuple):
            if not 0 <= self.dataloader_idx < len(loaders):
                raise ValueError(f"dataloader_idx must be in [0, {len(loaders)}), got {self.dataloader_idx}")
            loaders = loaders[self.dataloader_idx]
        self.fit(_root(pl_module, self.root), loaders)
        metrics = self.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            self.save_figures(output_dir(trainer, "codec"))

    def save_figures(self, directory: str | Path) -> list[Path]:
        """Mode–class correlation heatmaps (contributions vs activations) per layer, as PNG files."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        paths = []
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for n, m in (self.result or {}).items():
            mats = [("contributions", m.correlation)]
            if m.act_correlation is not None:
                mats.append(("activations", m.act_correlation))
            fig, axes = plt.subplots(1, len(mats), figsize=(5 * len(mats), 4), squeeze=False)
            for ax, (title, c) in zip(axes[0], mats):
                im = ax.imshow(c.T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
                ax.set(title=f"{n}: {title}", xlabel="mode", ylabel="class")
                fig.colorbar(im, ax=ax)
            p = d / f"mode_class_correlation_{n.replace('.', '_')}.png"
            fig.tight_layout()
            fig.savefig(p, dpi=80)
            plt.close(fig)
            paths.append(p)
        return paths

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fit_on == "train_end":
            self._run(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fit_on == "validation_end" and not trainer.sanity_checking:
            self._run(trainer, pl_module)

    def __repr__(self) -> str:
        fitted = list(self.result) if self.result else "not fitted"
        return f"CodecModes(layers={self.layers}, method={self.method!r}, target={self.target!r}, {fitted})"
