"""``CodecModes`` callback (CODEC, paper 002): fit contribution modes of some layers on validation data and log
their statistics, SAE R² and mode–class correlation. Thin glue around :func:`negspace.explain.codec.fit_codec`.

Layer names are dotted paths relative to the LightningModule (``"model.layer3"``), or relative to the
submodule named by ``forward=`` (``forward="model"``, ``"layer3"``). That module must map an image batch to
logits ``(B, num_classes)``. The ``ChannelEdit`` callback lives in :mod:`negspace.callbacks.edit`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import nn

from negspace.attribution.hidden import METHODS as CONTRIBUTION_METHODS
from negspace.callbacks.base import AnalysisCallback, deprecated_kwarg, progress_enabled
from negspace.explain.codec import ContributionSet, LayerModes, default_kind, fit_codec
from negspace.hooks import get_layer

__all__ = ["CodecModes"]

#: deprecated ``fit_on=`` values → ``every_n_epochs`` (``"manual"``: never automatically, call :meth:`fit`)
_FIT_ON: dict[str, int | None] = {"train_end": None, "validation_end": 1, "manual": None}


class CodecModes(AnalysisCallback):
    """Compute a contribution dataset on validation data and fit CODEC contribution modes per layer.

    Args:
        layers: dotted layer names (relative to the LightningModule or ``forward``).
        num_classes: number of classes (default: from the labels).
        every_n_epochs: ``None`` (once, at the end of ``fit``) or ``N`` (every N-th validation epoch);
            ``fit_on=`` is its deprecated name (``"manual"``: only when you call :meth:`fit`).
        method, target, n_steps, k: contribution algorithm/target (paper: ``integrated``, ``top_prob`` (the
            softmax probability of the top class, supplement 10.5/10.8), 10 steps).
        kind: SAE features (default ``"positive"``: E, the paper's choice; ``"negative"`` (I) for an ``entropy``
            target; or ``"net"``, ``"concat"``). Channel selection signs follow the target (``selection_sign``).
        superclasses: ``{"name": [classes]}`` extra concept masks for the mode–class correlation.
        dataloader_idx: which validation dataloader to use; ``max_batches`` caps the data.
        store_dir: stream contributions to safetensors shards there (for large validation sets).
        baseline: also fit the activation-SAE baseline.
        batch_keys, forward, save_dir: the shared callback vocabulary (``root=`` is ``forward``'s old name).
        sae: keyword arguments of :func:`negspace.explain.codec.train_sae` (steps or epochs, lr, batch_size,
            threshold, activation, expansion, hidden, nonneg, atom_l1, code_l1, min_r2, seed). The defaults converge
            on hundreds of samples (step budget, lr scaled to it, early stopping); a low R² warns.

    After fitting, ``callback.result`` is ``{layer: LayerModes}`` and ``callback.data`` the contribution set.
    Logged as ``codec/{layer}/{name}``: the statistics (Hoyer, E/I correlation, PCA dimensionality), ``r2``,
    ``act_r2``, ``alive_modes``, ``mode_class_corr`` (mean over classes of the best mode's correlation) next to
    ``untrained_mode_class_corr`` (the same for the SAE before training: the chance level) and
    ``act_mode_class_corr``.
    Figures: mode–class correlation heatmaps ``codec/mode_class_correlation_{layer}``. Under DDP every rank
    computes its share, the rows are gathered, and every rank fits the same seeded SAE on the same data.
    """

    def __init__(
        self,
        layers: str | Sequence[str],
        *,
        num_classes: int | None = None,
        every_n_epochs: int | None = None,
        method: str = "integrated",
        target: str = "top_prob",
        n_steps: int = 10,
        k: int = 5,
        kind: str | None = None,
        superclasses: Mapping[str, Sequence[int]] | None = None,
        dataloader_idx: int = 0,
        max_batches: int | None = None,
        store_dir: str | None = None,
        baseline: bool = True,
        batch_keys: Any = None,
        forward: str | None = None,
        save_dir: str | None = None,
        progress: bool = True,
        sae: Mapping[str, Any] | None = None,
        fit_on: str | None = None,
        root: str | None = None,
    ) -> None:
        schedule = deprecated_kwarg("CodecModes", "fit_on", "every_n_epochs", fit_on, every_n_epochs)
        self.manual = fit_on == "manual"
        if isinstance(schedule, str):
            if schedule not in _FIT_ON:
                raise ValueError(f"fit_on must be one of {sorted(_FIT_ON)}, got {schedule!r}")
            schedule = _FIT_ON[schedule]
        forward = deprecated_kwarg("CodecModes", "root", "forward", root, forward)
        super().__init__(every_n_epochs=schedule, batch_keys=batch_keys, forward=forward,
                         dataloader_idx=dataloader_idx, save_dir=save_dir)
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        if method not in CONTRIBUTION_METHODS:
            raise ValueError(f"CodecModes: method must be one of {CONTRIBUTION_METHODS}, got {method!r}")
        for name, value in (("k", k), ("n_steps", n_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CodecModes: {name} must be a positive int, got {value!r}")
        self.num_classes = num_classes
        self.method, self.target, self.n_steps, self.k = method, target, n_steps, k
        self.kind = default_kind(target) if kind is None else kind
        self.superclasses = superclasses
        self.max_batches = max_batches
        self.store_dir = store_dir
        self.baseline = baseline
        self.progress = progress
        self.sae_kwargs = dict(sae or {})
        self.result: dict[str, LayerModes] | None = None
        self.data: ContributionSet | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        net = self.network(pl_module)
        for n in self.layers:  # unknown layers fail now, not after the fit
            get_layer(net, n)

    def fit(self, model: nn.Module, dataloader: Any, *, progress: bool | None = None) -> dict[str, LayerModes]:
        """Compute the contribution dataset over ``dataloader`` and fit the modes of every layer (on demand)."""
        progress = self.progress if progress is None else progress
        self.data, self.result = fit_codec(
            model, dataloader, self.layers, target=self.target, method=self.method, n_steps=self.n_steps, k=self.k,
            kind=self.kind, num_classes=self.num_classes, superclasses=self.superclasses, baseline=self.baseline,
            store=self.store_dir, batch_keys=self.batch_keys, max_batches=self.max_batches, progress=progress,
            **self.sae_kwargs,
        )
        return self.result

    def metrics(self) -> dict[str, float]:
        """``{"codec/{layer}/{name}": value}`` of the fitted layers (empty before fitting)."""
        out: dict[str, float] = {}
        for n, m in (self.result or {}).items():
            out.update({f"codec/{n}/{k}": float(v) for k, v in m.stats.items()})
            out.setdefault(f"codec/{n}/mode_class_corr", float(m.correlation.max(0).values.mean()))
        return out

    def run(self, trainer: Trainer, pl_module: LightningModule, loader: Any) -> None:
        self.fit(self.network(pl_module), loader, progress=self.progress and progress_enabled(trainer))
        self.log_metrics(trainer, pl_module, self.metrics())
        from negspace.plots import codec_mode_class_correlation

        for n, m in (self.result or {}).items():
            fig = codec_mode_class_correlation(n, m.correlation, m.act_correlation)
            self.figure(trainer, f"mode_class_correlation_{n.replace('.', '_')}", fig, "codec")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.manual:
            super().on_train_end(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.manual:
            super().on_validation_epoch_end(trainer, pl_module)

    def __repr__(self) -> str:
        fitted = list(self.result) if self.result else "not fitted"
        return f"CodecModes(layers={self.layers}, method={self.method!r}, target={self.target!r}, {fitted})"
