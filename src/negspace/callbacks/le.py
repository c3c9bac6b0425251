"""``LinearExplanations`` callback (LE, paper 003): explain neurons of a layer on validation data during or after
training with :func:`negspace.explain.le.explain_layer`, log the simulation scores, write a CSV of explanations
and area charts. Under DDP every rank passes its validation shard and every rank holds the same ``result``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from negspace.batch import unpack_batch
from negspace.callbacks.base import AnalysisCallback, deprecated_kwarg, progress_enabled
from negspace.explain.le import (
    SCALINGS,
    Explanation,
    area_chart,
    check_concepts,
    check_simulator,
    correlation_score,
    explain_layer,
    required_roles,
    write_explanations_csv,
)
from negspace.hooks import get_layer
from negspace.reduce import check_reduce

__all__ = ["LinearExplanations"]

#: old ``fit_at=`` values -> ``every_n_epochs``
FIT_AT: dict[str, int | None] = {"train_end": None, "validation_end": 1}


class LinearExplanations(AnalysisCallback):
    """Explain ``neurons`` of ``layer`` as sparse linear combinations of concepts, on validation data.

    Args:
        layer: dotted name of the layer (relative to ``forward``), e.g. ``"layer4"`` for the penultimate layer.
        concepts: the concept matrix source, in validation-loader order (use a non-shuffled val loader):
            ``"labels"`` (one-hot classes, ``class_names``/``superclasses``), a built-in set name
            (``"digits"``, ``"lesions"``; :data:`negspace.explain.le.BUILTIN_CONCEPT_SETS`), a tensor
            ``(N, M)``, or a callable ``batch -> (B, M)``.
        neurons: channel indices to explain (``None`` = all). concept_names: names for tensor/callable concepts.
        class_names, superclasses: for ``concepts="labels"``.
        every_n_epochs: ``None`` = once at the end of fit; ``N`` = every N-th validation epoch (also on
            ``trainer.validate``). ``fit_at`` is its deprecated name (``"train_end"`` → ``None``,
            ``"validation_end"`` → ``1``, ``N`` → ``N``).
        reduce: neuron summary (``"mean"``, ``"max"``, ``"cls"``).
        ablation: also compute ablation scores (``scaling``: ``"optim"``, ``"norm"`` or ``"none"``); uses the
            exact linear-head fast path when the layer feeds a linear head through average pooling.
        simulator: who predicts the concepts when scoring: ``"explainer"`` (default: the explainer's own concept
            matrix, held-out self-consistency) or a simulator such as
            :class:`~negspace.explain.le.ClipSimulator` (paper 003 §4: SigLIP ``ViT-SO400M-14-SigLIP-384``, a
            different model than the explainer) applied to the validation inputs.
        max_concepts, width, tolerance, split, seed, rank: :func:`negspace.explain.le.linear_explanation`
            arguments (``rank="abs"`` by default, so inhibitory concepts are found; ``"signed"`` is the paper's).
        max_samples: cap on validation samples used (``None`` = all). n_figures: area charts for the first
            ``n_figures`` neurons. batch_keys, forward, dataloader_idx, save_dir: the shared vocabulary.

    Logged: ``le/val_correlation``, ``le/test_correlation``, ``le/simulation_correlation`` (test split, with
    ``simulator``), ``le/ablation`` (means over explained, live neurons),
    ``le/length`` (mean explanation length), ``le/dead`` (dead neurons). Files (when there is a directory):
    ``<log_dir>/linear_explanations/explanations_epoch<E>.csv`` (and ``explanations.csv``, the latest) and area
    charts. ``callback.result`` is the list of :class:`~negspace.explain.le.Explanation`; ``callback.scores`` the dict.
    """

    def __init__(
        self,
        layer: str,
        concepts: str | Tensor | Callable[[Any], Tensor] = "labels",
        neurons: int | Sequence[int] | None = None,
        *,
        concept_names: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        superclasses: Mapping[str, Sequence[int | str]] | None = None,
        every_n_epochs: int | None = None,
        reduce: str = "mean",
        ablation: bool = True,
        scaling: str = "optim",
        simulator: str | Callable[[Tensor, Sequence[str]], Tensor] = "explainer",
        max_concepts: int = 10,
        width: int = 10,
        tolerance: float = 0.02,
        split: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        max_samples: int | None = None,
        n_figures: int = 0,
        rank: str = "abs",
        dataloader_idx: int = 0,
        batch_keys: Any = None,
        forward: str | None = None,
        save_dir: str | None = None,
        batch_size: int = 256,
        fit_at: str | int | None = None,
    ) -> None:
        if fit_at is not None:
            if not (fit_at in FIT_AT or (isinstance(fit_at, int) and not isinstance(fit_at, bool) and fit_at >= 1)):
                raise ValueError(f"fit_at must be one of {tuple(FIT_AT)} or a positive int, got {fit_at!r}")
            deprecated_kwarg("LinearExplanations", "fit_at", "every_n_epochs", fit_at, every_n_epochs)
            every_n_epochs = FIT_AT.get(fit_at, fit_at) if isinstance(fit_at, str) else fit_at
        super().__init__(every_n_epochs=every_n_epochs, batch_keys=batch_keys, forward=forward,
                         dataloader_idx=dataloader_idx, save_dir=save_dir)
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a dotted name, got {type(layer).__name__}")
        check_concepts(concepts)
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        check_simulator(simulator)
        if rank not in ("abs", "signed"):
            raise ValueError(f"rank must be 'abs' or 'signed', got {rank!r}")
        self.reduce = check_reduce(reduce, ("mean", "max", "cls"))
        self.layer, self.concepts, self.ablation, self.scaling, self.simulator = (layer, concepts, ablation, scaling,
                                                                                  simulator)
        self.neurons = [neurons] if isinstance(neurons, int) else (None if neurons is None else list(neurons))
        self.concept_kwargs = {
            "concept_names": list(concept_names) if concept_names is not None else None,
            "class_names": list(class_names) if class_names is not None else None,
            "superclasses": dict(superclasses) if superclasses else None,
        }
        self.le_kwargs = {"max_concepts": max_concepts, "width": width, "tolerance": tolerance,
                          "split": tuple(split), "seed": seed, "rank": rank}
        self.max_samples, self.n_figures, self.batch_size = max_samples, n_figures, batch_size
        self.result: list[Explanation] | None = None
        self.scores: dict[str, float] = {}
        self.ablation_scores: list[float] = []
        self.csv_path: str | None = None
        self.figure_paths: list[str] = []
        self._checked = False

    # ------------------------------------------------------------------------------------------ early failure
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        get_layer(self.network(pl_module), self.layer)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if not self._checked and dataloader_idx == self.dataloader_idx:
            unpack_batch(batch, self.batch_keys, require=required_roles(self.concepts), who="LinearExplanations")
            self._checked = True

    # ------------------------------------------------------------------------------------------ run
    def explain(self, trainer: Trainer, pl_module: LightningModule) -> list[Explanation] | None:
        """Explain and score now on the validation dataloader (also callable by hand)."""
        self._run(trainer, pl_module)
        return self.result

    def run(self, trainer: Trainer, pl_module: LightningModule, loader: Any) -> None:
        res = explain_layer(
            self.network(pl_module), self.layer, loader, concepts=self.concepts, neurons=self.neurons,
            reduce=self.reduce, ablation=self.ablation, scaling=self.scaling, simulator=self.simulator,
            max_samples=self.max_samples,
            batch_size=self.batch_size, batch_keys=self.batch_keys, progress=progress_enabled(trainer),
            **self.concept_kwargs, **self.le_kwargs,
        )
        self.result, self.ablation_scores = res.explanations, res.ablation
        self.scores = {f"le/{k}": v for k, v in res.scores().items()}
        self.log_metrics(trainer, pl_module, self.scores)
        epoch = trainer.current_epoch
        folder = self.files_dir(trainer, "linear_explanations")
        if folder is not None and trainer.is_global_zero:
            self.csv_path = str(write_explanations_csv(folder / f"explanations_epoch{epoch}.csv", res))
            write_explanations_csv(folder / "explanations.csv", res)
        for j, e in enumerate(res.explanations[: max(0, self.n_figures)]):
            fig = area_chart(res.activations[:, j], res.concepts, res.concept_names,
                             explanation=e if e.concepts else None, title=f"{self.layer} {e}")
            path = self.figure(trainer, f"le/area_unit{e.unit}_epoch{epoch}", fig, "linear_explanations")
            if path is not None:
                self.figure_paths.append(str(path))
        s = self.scores
        rank_zero_info(
            f"LinearExplanations({self.layer}): {len(res.explanations) - int(s['le/dead'])} neurons, mean val ρ "
            f"{s['le/val_correlation']:.3f}, test ρ {s['le/test_correlation']:.3f}, simulation ρ "
            f"{s['le/simulation_correlation']:.3f} ({res.simulator})"
            + (f", ablation {s['le/ablation']:.3f}" if self.ablation else "") + f"; CSV {self.csv_path}"
        )

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Strings and floats only (checkpoints load with ``weights_only=True``)."""
        if self.result is None:
            return {}
        return {
            "explanations_json": json.dumps([e.to_dict() for e in self.result]),
            "scores": {k: float(v) for k, v in self.scores.items()},
            "ablation_json": json.dumps(self.ablation_scores),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.result = [Explanation.from_dict(d) for d in json.loads(state_dict["explanations_json"])]
        self.scores = dict(state_dict.get("scores", {}))
        self.ablation_scores = list(json.loads(state_dict.get("ablation_json", "[]")))

    def correlation(self, activations: Tensor, concepts: Tensor) -> list[float]:
        """Correlation scores of the fitted explanations on other data (activations ``(N, D_explained)``)."""
        if self.result is None:
            raise RuntimeError("LinearExplanations has not been fitted yet")
        out = correlation_score(self.result, activations, concepts)
        return out if isinstance(out, list) else [out]
