"""``LinearExplanations`` callback (LE, paper 003): explain neurons of a layer on validation data during or after
training, score the explanations by simulation, log the scores and write a CSV of explanations.

Thin glue around :mod:`negspace.explain.concepts`, :mod:`negspace.explain.linear` and
:mod:`negspace.explain.simulation`. Under DDP every rank passes its validation shard; activations, concepts, inputs
and labels are all-gathered, rank 0 fits and scores, and the explanations and scores are broadcast, so every rank
holds the same ``callback.result``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from negspace.callbacks.base import output_dir
from negspace.explain.concepts import BUILTIN_CONCEPT_SETS, label_concepts, split_batch, summarize
from negspace.explain.linear import Explanation, linear_explanation
from negspace.explain.simulation import ablation_score, area_chart, correlation_score
from negspace.hooks import capture, get_layer

__all__ = ["LinearExplanations"]

FIT_AT = ("train_end", "validation_end")


class LinearExplanations(L.Callback):
    """Explain ``neurons`` of ``layer`` as sparse linear combinations of concepts, on validation data.

    Args:
        layer: dotted name of the layer (e.g. ``"layer4"`` / ``"features"`` for the penultimate layer).
        concepts: the concept matrix source, in validation-loader order (use a non-shuffled val loader):
            ``"labels"`` (one-hot classes, ``class_names``/``superclasses``), a built-in set name
            (``"digits"``, ``"lesions"``; :data:`negspace.explain.concepts.BUILTIN_CONCEPT_SETS`), a tensor
            ``(N, M)``, or a callable ``batch -> (B, M)``.
        neurons: channel indices to explain (``None`` = all).
        concept_names: names for tensor/callable concepts.
        class_names, superclasses: for ``concepts="labels"``.
        fit_at: ``"train_end"`` (default), ``"validation_end"`` (end of ``trainer.validate``), or an int ``N``:
            at the end of every N-th validation epoch during fit (epochs N−1, 2N−1, …).
        reduce: neuron summary (``"mean"``, ``"max"``, ``"cls"``).
        ablation: also compute ablation scores (``scaling``: ``"optim"``, ``"norm"`` or ``"none"``); uses the
            exact linear-head fast path when the layer feeds a linear head through average pooling.
        max_concepts, width, tolerance, split, seed: :func:`negspace.explain.linear_explanation` arguments.
        max_samples: cap on validation samples used (``None`` = all).
        n_figures: area charts saved for the first ``n_figures`` neurons.
        batch_keys: ``(image_key, label_key)`` for dict batches with other names.

    Logged: ``le/val_correlation``, ``le/test_correlation``, ``le/ablation`` (means over explained, live neurons),
    ``le/length`` (mean explanation length), ``le/dead`` (dead neurons). Files: ``<log_dir>/linear_explanations/
    explanations_epoch<E>.csv`` (and ``explanations.csv``, the latest) with columns ``layer, unit, val_correlation,
    test_correlation, ablation, bias, n_concepts, concepts, weights`` (``|``-separated); PNG area charts.
    ``callback.result`` is the list of :class:`~negspace.explain.linear.Explanation`; ``callback.scores`` the dict.
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
        fit_at: str | int = "train_end",
        reduce: str = "mean",
        ablation: bool = True,
        scaling: str = "optim",
        max_concepts: int = 10,
        width: int = 10,
        tolerance: float = 0.02,
        split: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        max_samples: int | None = None,
        n_figures: int = 0,
        dataloader_idx: int = 0,
        batch_keys: Sequence[str] | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a dotted name, got {type(layer).__name__}")
        if isinstance(concepts, str) and concepts != "labels" and concepts not in BUILTIN_CONCEPT_SETS:
            raise ValueError(
                f"concepts must be 'labels', one of {sorted(BUILTIN_CONCEPT_SETS)}, a Tensor (N, M) or a callable; "
                f"got {concepts!r}"
            )
        if not (isinstance(concepts, (str, Tensor)) or callable(concepts)):
            raise TypeError(f"concepts must be a string, a Tensor or a callable, got {type(concepts).__name__}")
        if not (fit_at in FIT_AT or (isinstance(fit_at, int) and not isinstance(fit_at, bool) and fit_at >= 1)):
            raise ValueError(f"fit_at must be one of {FIT_AT} or a positive int (every N epochs), got {fit_at!r}")
        if scaling not in ("optim", "norm", "none"):
            raise ValueError(f"scaling must be 'optim', 'norm' or 'none', got {scaling!r}")
        if reduce not in ("mean", "max", "cls"):
            raise ValueError(f"reduce must be 'mean', 'max' or 'cls', got {reduce!r}")
        self.layer = layer
        self.concepts = concepts
        self.neurons = [neurons] if isinstance(neurons, int) else (None if neurons is None else list(neurons))
        self.concept_names = list(concept_names) if concept_names is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.superclasses = dict(superclasses) if superclasses else None
        self.fit_at = fit_at
        self.reduce = reduce
        self.ablation = ablation
        self.scaling = scaling
        self.le_kwargs = {"max_concepts": max_concepts, "width": width, "tolerance": tolerance,
                          "split": tuple(split), "seed": seed}
        self.max_samples = max_samples
        self.n_figures = n_figures
        self.dataloader_idx = dataloader_idx
        self.batch_keys = batch_keys
        self.batch_size = batch_size
        self.result: list[Explanation] | None = None
        self.scores: dict[str, float] = {}
        self.ablation_scores: list[float] = []
        self.csv_path: str | None = None
        self.figure_paths: list[str] = []
        self._root: str | None = None

    # ------------------------------------------------------------------------------------------ data
    def _val_loader(self, trainer: L.Trainer) -> Any:
        loaders = trainer.val_dataloaders
        if loaders is None:
            raise RuntimeError("LinearExplanations explains on validation data, but the trainer has no val dataloader")
        if isinstance(loaders, Mapping):
            return list(loaders.values())[self.dataloader_idx]
        if isinstance(loaders, Sequence):
            return loaders[self.dataloader_idx]
        return loaders

    def _collect(self, pl_module: L.LightningModule, loader: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One pass over the loader: ``(x, y, summaries (N, D), concepts (N, M))`` of this rank."""
        xs, ys, acts, concs = [], [], [], []
        n = 0
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), capture(pl_module, self.layer, detach=True, stop_after=False) as cap:
                for batch in loader:
                    x, y, extras = split_batch(batch, self.batch_keys)
                    if y is None:
                        raise ValueError("LinearExplanations needs labelled validation batches")
                    pl_module(x.to(pl_module.device))
                    acts.append(summarize(cap.activations[self.layer], self.reduce).float().cpu())
                    xs.append(x.cpu())
                    ys.append(torch.as_tensor(y).long().flatten().cpu())
                    if callable(self.concepts) and not isinstance(self.concepts, Tensor):
                        concs.append(torch.as_tensor(self.concepts(batch)).float().cpu())
                    elif self.concepts == "lesions":
                        mask = extras.get("mask")
                        if mask is None:
                            raise ValueError("concepts='lesions' needs a 'mask' in every validation batch")
                        concs.append((mask.flatten(1) > 0).any(1).float().cpu()[:, None])
                    n += x.shape[0]
                    if self.max_samples is not None and n >= self.max_samples:
                        break
        finally:
            pl_module.train(was_training)
        x, y, a = torch.cat(xs), torch.cat(ys), torch.cat(acts)
        c = torch.cat(concs) if concs else torch.zeros(len(y), 0)
        if self.max_samples is not None:
            x, y, a, c = x[: self.max_samples], y[: self.max_samples], a[: self.max_samples], c[: self.max_samples]
        return x, y, a, c

    def _concept_matrix(self, y: Tensor, extra: Tensor, n_classes: int) -> tuple[Tensor, list[str]]:
        if isinstance(self.concepts, Tensor):
            p = self.concepts.float()
            if p.ndim != 2 or p.shape[0] < len(y):
                raise ValueError(
                    f"concepts tensor must be (N, M) with N >= {len(y)} validation samples, got {tuple(p.shape)}"
                )
            p = p[: len(y)]
            names = self.concept_names or [f"c{i}" for i in range(p.shape[1])]
            return p, names
        if callable(self.concepts):
            names = self.concept_names or [f"c{i}" for i in range(extra.shape[1])]
            return extra, names
        if self.concepts == "labels":
            names = self.class_names or [f"class {i}" for i in range(n_classes)]
            return label_concepts(y, names, self.superclasses)
        spec = BUILTIN_CONCEPT_SETS[self.concepts]
        p, names = label_concepts(y, spec["class_names"], spec["superclasses"])
        if spec.get("mask_concept"):
            p = torch.cat([p, extra], 1)
            names.append(spec["mask_concept"])
        return p, names

    @staticmethod
    def _gather(trainer: L.Trainer, t: Tensor) -> Tensor:
        """Concatenate ``t`` (N_r, ...) over ranks (unequal N_r allowed)."""
        if trainer.world_size <= 1:
            return t
        strategy = trainer.strategy
        n = torch.tensor([t.shape[0]], device=strategy.root_device)
        sizes = strategy.all_gather(n).flatten().tolist()
        pad = max(sizes) - t.shape[0]
        tt = t.to(strategy.root_device)
        if pad:
            tt = torch.cat([tt, tt.new_zeros(pad, *tt.shape[1:])])
        g = strategy.all_gather(tt).cpu()  # (W, max, ...)
        return torch.cat([g[r, : sizes[r]] for r in range(len(sizes))])

    # ------------------------------------------------------------------------------------------ fitting
    def explain(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Explanation]:
        """Explain and score now on the validation dataloader (also callable by hand)."""
        get_layer(pl_module, self.layer)
        if isinstance(self.concepts, Tensor) and trainer.world_size > 1:
            raise ValueError(
                "a concepts tensor is aligned with the unsharded validation set; under DDP pass a callable "
                "batch -> (B, M), 'labels' or a built-in concept set name instead"
            )
        self._root = str(output_dir(trainer))
        with torch.inference_mode(False):
            x, y, acts, extra = self._collect(pl_module, self._val_loader(trainer))
            x, y = self._gather(trainer, x), self._gather(trainer, y)
            acts, extra = self._gather(trainer, acts), self._gather(trainer, extra)
            payload = None
            if trainer.is_global_zero:
                payload = self._fit(trainer, pl_module, x, y, acts, extra)
            if trainer.world_size > 1:
                payload = trainer.strategy.broadcast(payload, src=0)
        exps = [Explanation.from_dict(d) for d in payload["explanations"]]
        self.result = exps
        self.scores = dict(payload["scores"])
        self.ablation_scores = list(payload["ablation"])
        self.csv_path = payload["csv"]
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(self.scores, step=trainer.global_step)
        return exps

    def _fit(self, trainer: L.Trainer, pl_module: L.LightningModule, x: Tensor, y: Tensor, acts: Tensor,
             extra: Tensor) -> dict[str, Any]:
        n_classes = int(y.max()) + 1 if len(y) else 1
        if self.class_names:
            n_classes = len(self.class_names)
        p, names = self._concept_matrix(y, extra, n_classes)
        units = list(range(acts.shape[1])) if self.neurons is None else self.neurons
        if units and max(units) >= acts.shape[1]:
            raise ValueError(f"neurons {units} out of range for layer {self.layer!r} with {acts.shape[1]} neurons")
        exps = linear_explanation(acts[:, units], p, concept_names=names, units=units, **self.le_kwargs)
        live = [i for i, e in enumerate(exps) if not e.dead]
        abl = [float("nan")] * len(exps)
        if self.ablation and live:
            was_training = pl_module.training
            try:
                with torch.enable_grad():
                    res = ablation_score(
                        pl_module, self.layer, [units[i] for i in live], [exps[i] for i in live], (x, y),
                        concepts=p, scaling=self.scaling, reduce="cls" if self.reduce == "cls" else "mean",
                        batch_size=self.batch_size,
                    )
            finally:
                pl_module.train(was_training)
            for i, s in zip(live, res):
                abl[i] = s

        def mean(vals: Sequence[float]) -> float:
            v = [float(a) for a in vals if not math.isnan(float(a))]
            return sum(v) / len(v) if v else float("nan")

        scores = {
            "le/val_correlation": mean([exps[i].val_correlation for i in live]),
            "le/test_correlation": mean([exps[i].test_correlation for i in live]),
            "le/length": mean([len(exps[i].concepts) for i in live]),
            "le/dead": float(len(exps) - len(live)),
        }
        if self.ablation:
            scores["le/ablation"] = mean(abl)
        csv_path = self._write_csv(trainer, exps, abl)
        self._figures(trainer, exps, acts[:, units], p, names)
        rank_zero_info(
            f"LinearExplanations({self.layer}): {len(live)} neurons, mean val ρ {scores['le/val_correlation']:.3f}, "
            f"test ρ {scores['le/test_correlation']:.3f}"
            + (f", ablation {scores['le/ablation']:.3f}" if self.ablation else "")
            + f"; CSV {csv_path}"
        )
        return {"explanations": [e.to_dict() for e in exps], "scores": scores, "ablation": abl, "csv": csv_path}

    def _folder(self, trainer: L.Trainer) -> str:
        root = self._root or trainer.default_root_dir
        folder = os.path.join(root, "linear_explanations")
        os.makedirs(folder, exist_ok=True)
        return folder

    def _write_csv(self, trainer: L.Trainer, exps: list[Explanation], abl: list[float]) -> str:
        folder = self._folder(trainer)
        header = ["layer", "unit", "val_correlation", "test_correlation", "ablation", "bias", "n_concepts",
                  "concepts", "weights"]
        rows = [
            [self.layer, e.unit, e.val_correlation, e.test_correlation, a, e.bias, len(e.concepts),
             "|".join(e.concepts), "|".join(f"{w:.6g}" for w in e.weights)]
            for e, a in zip(exps, abl)
        ]
        path = os.path.join(folder, f"explanations_epoch{trainer.current_epoch}.csv")
        for p in (path, os.path.join(folder, "explanations.csv")):
            with open(p, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows(rows)
        return path

    def _figures(self, trainer: L.Trainer, exps: list[Explanation], acts: Tensor, p: Tensor, names: list[str]) -> None:
        if self.n_figures <= 0:
            return
        import matplotlib.pyplot as plt

        folder = self._folder(trainer)
        for j, e in enumerate(exps[: self.n_figures]):
            path = os.path.join(folder, f"area_unit{e.unit}_epoch{trainer.current_epoch}.png")
            fig = area_chart(acts[:, j], p, names, explanation=e if e.concepts else None, path=path,
                             title=f"{self.layer} {e}")
            plt.close(fig)
            self.figure_paths.append(path)

    # ------------------------------------------------------------------------------------------ hooks
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not isinstance(self.fit_at, int) or trainer.state.fn != "fit":
            return
        if (trainer.current_epoch + 1) % self.fit_at == 0:
            self.explain(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fit_at == "train_end":
            self.explain(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fit_at == "validation_end" and trainer.state.fn == "validate":
            self.explain(trainer, pl_module)

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
