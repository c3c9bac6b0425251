"""Explain and score a whole layer in one call (what :class:`negspace.callbacks.LinearExplanations` runs).

:func:`collect_activations` makes one pass over the data (neuron summaries, inputs, labels, per-batch concept
columns); :func:`explain_layer` gathers the rows of every rank (DDP), builds the concept matrix, fits the
explanations and their ablation scores on rank 0 and shares the result, so every rank returns the same
:class:`LayerExplanations`. :func:`write_explanations_csv` writes the table.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from negspace.distributed import all_gather_object, all_gather_rows, is_distributed, rank_world
from negspace.hooks import get_layer

from .ablation import SCALINGS, ablation_score
from .concepts import (
    ConceptSource,
    batch_concepts,
    check_concepts,
    concept_matrix,
    iter_summaries,
    required_roles,
)
from .correlation import correlation_score
from .explanation import Explanation
from .linear import linear_explanation
from .simulator import SAME, ConceptSimulator, MatrixSimulator, check_simulator, simulator_name

__all__ = ["Collected", "LayerExplanations", "collect_activations", "explain_layer", "write_explanations_csv"]


@dataclass
class Collected:
    """One pass over the data: ``images (N, ...)``, ``labels (N,)``, ``activations (N, D)`` (neuron summaries) and
    ``extra (N, M')`` concept columns taken from the batches (``(N, 0)`` when the source needs none)."""

    images: Tensor
    labels: Tensor
    activations: Tensor
    extra: Tensor


def collect_activations(
    model: nn.Module,
    layer: str,
    data: Iterable[Any],
    *,
    concepts: ConceptSource = "labels",
    reduce: str = "mean",
    batch_keys: Any = None,
    max_samples: int | None = None,
    progress: bool = False,
) -> Collected:
    """Neuron summaries of ``layer``, inputs, labels and per-batch concept columns over labelled batches (CPU).

    The first ``max_samples`` rows are kept (``None`` = all). Fails on the first batch that lacks a label (or a
    mask, for a concept set that reads masks).
    """
    check_concepts(concepts)
    xs, ys, acts, extra = [], [], [], []
    n = 0
    gen = iter_summaries(model, layer, data, reduce=reduce, batch_keys=batch_keys, require=required_roles(concepts),
                         progress=progress)
    with contextlib.closing(gen):
        for raw, b, q in gen:
            acts.append(q)
            xs.append(b.image.detach().cpu())
            ys.append(torch.as_tensor(b.label).long().flatten().cpu())
            cols = batch_concepts(concepts, raw, b)
            if cols is not None:
                extra.append(cols)
            n += b.image.shape[0]
            if max_samples is not None and n >= max_samples:
                break
    if not acts:
        raise ValueError("data is empty")
    x, y, a = torch.cat(xs), torch.cat(ys), torch.cat(acts)
    p = torch.cat(extra) if extra else torch.zeros(len(y), 0)
    k = len(y) if max_samples is None else max_samples
    return Collected(x[:k], y[:k], a[:k], p[:k])


@dataclass
class LayerExplanations:
    """Explanations of ``units`` of ``layer``, their ablation scores (``nan`` when not computed / dead), their
    simulation correlation scores on the test split (eq. 10 with ``simulator``; ``nan`` for dead neurons), and the
    data they were fitted on: ``activations (N, len(units))``, ``concepts (N, M)`` named ``concept_names``."""

    layer: str
    units: list[int]
    explanations: list[Explanation]
    ablation: list[float]
    activations: Tensor = field(repr=False)
    concepts: Tensor = field(repr=False)
    concept_names: list[str] = field(repr=False)
    with_ablation: bool = True
    simulation: list[float] = field(default_factory=list)
    simulator: str = SAME

    def scores(self) -> dict[str, float]:
        """Means over live neurons: ``val_correlation``, ``test_correlation`` (explainer's concepts),
        ``simulation_correlation`` (test split, the simulator's concepts; = ``test_correlation`` with
        ``simulator="explainer"``), ``length``; ``dead`` (count); ``ablation`` when ablation scores were computed."""
        live = [e for e in self.explanations if not e.dead]
        out = {
            "val_correlation": _mean([e.val_correlation for e in live]),
            "test_correlation": _mean([e.test_correlation for e in live]),
            "simulation_correlation": _mean(self.simulation),
            "length": _mean([len(e.concepts) for e in live]),
            "dead": float(len(self.explanations) - len(live)),
        }
        if self.with_ablation:
            out["ablation"] = _mean(self.ablation)
        return out


def _mean(vals: Sequence[float]) -> float:
    v = [float(a) for a in vals if not math.isnan(float(a))]
    return sum(v) / len(v) if v else float("nan")


def explain_layer(
    model: nn.Module,
    layer: str,
    data: Iterable[Any],
    *,
    concepts: ConceptSource = "labels",
    neurons: Sequence[int] | None = None,
    concept_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    superclasses: Mapping[str, Sequence[int | str]] | None = None,
    reduce: str = "mean",
    ablation: bool = True,
    scaling: str = "optim",
    simulator: str | ConceptSimulator = SAME,
    max_samples: int | None = None,
    batch_size: int = 256,
    batch_keys: Any = None,
    progress: bool = False,
    **le_kwargs: Any,
) -> LayerExplanations:
    """Explain ``neurons`` of ``layer`` (``None`` = all) on labelled batches of ``data`` and score them.

    ``concepts``: ``"labels"`` (``class_names``/``superclasses``), a built-in set name, a tensor ``(N, M)`` aligned
    with ``data`` (not under DDP), or a callable ``batch -> (B, M)`` (``concept_names`` names the columns).
    ``le_kwargs`` go to :func:`linear_explanation` (``max_concepts``, ``width``, ``tolerance``, ``split``, ``seed``,
    ...). Live neurons are scored by simulation on the test split (eq. 10) and, with ``ablation``, by
    :func:`ablation_score` (``scaling``; ``reduce="cls"`` reads/writes the CLS token, otherwise the mean).
    ``simulator``: ``"explainer"`` (default; the explainer's own concept matrix: held-out self-consistency, which
    with label concepts scores against the ground truth) or a simulator ``(images, names) -> (N, len(names))``
    evaluated on the collected inputs: :class:`~negspace.explain.le.ClipSimulator` (paper 003 §4: SigLIP
    ``ViT-SO400M-14-SigLIP-384``, a model different from the explainer) or a ``MatrixSimulator``. Under DDP every
    rank passes its shard; rows are gathered, rank 0 fits, and every rank returns rank 0's explanations and scores.
    """
    get_layer(model, layer)
    check_concepts(concepts)
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    check_simulator(simulator)
    if isinstance(simulator, MatrixSimulator) and is_distributed():
        raise ValueError("a MatrixSimulator is aligned with the unsharded data; under DDP use a ClipSimulator")
    if isinstance(concepts, Tensor) and is_distributed():
        raise ValueError(
            "a concepts tensor is aligned with the unsharded data; under DDP pass a callable batch -> (B, M), "
            "'labels' or a built-in concept set name instead"
        )
    c = collect_activations(model, layer, data, concepts=concepts, reduce=reduce, batch_keys=batch_keys,
                            max_samples=max_samples, progress=progress)
    table = {"x": c.images, "y": c.labels, "a": c.activations}
    if c.extra.shape[1]:  # the same on every rank: it depends on the concept source only
        table["p"] = c.extra
    rows = all_gather_rows(table)
    x, y, acts = rows["x"], rows["y"], rows["a"]
    p, names = concept_matrix(concepts, y, rows.get("p"), concept_names=concept_names, class_names=class_names,
                              superclasses=superclasses)
    units = list(range(acts.shape[1])) if neurons is None else [int(u) for u in neurons]
    if units and (max(units) >= acts.shape[1] or min(units) < 0):
        raise ValueError(f"neurons {units} out of range for layer {layer!r} with {acts.shape[1]} neurons")
    payload = None
    if rank_world()[0] == 0:
        exps = linear_explanation(acts[:, units], p, concept_names=names, units=units, **le_kwargs)
        live = [i for i, e in enumerate(exps) if not e.dead]
        if simulator == SAME:
            p_sim, sim_names = p, None
        else:
            sim_names = sorted({c for e in exps for c in e.concepts})
            p_sim = torch.as_tensor(simulator(x, sim_names)).float()
        sim = [float("nan")] * len(exps)
        for i in live:
            sim[i] = float(correlation_score(exps[i], acts[:, units[i]], p_sim, concept_names=sim_names, rows="test"))
        abl = [float("nan")] * len(exps)
        if ablation and live:
            with torch.enable_grad():
                res = ablation_score(model, layer, [units[i] for i in live], [exps[i] for i in live], (x, y),
                                     concepts=p_sim, concept_names=sim_names, scaling=scaling,
                                     reduce="cls" if reduce == "cls" else "mean", batch_size=batch_size,
                                     progress=progress)
            for i, s in zip(live, res):
                abl[i] = float(s)
        payload = {"explanations": [e.to_dict() for e in exps], "ablation": abl, "simulation": sim}
    if is_distributed():
        payload = all_gather_object(payload)[0]  # rank 0's result on every rank
    return LayerExplanations(layer, units, [Explanation.from_dict(d) for d in payload["explanations"]],
                             list(payload["ablation"]), acts[:, units], p, names, ablation,
                             list(payload["simulation"]), simulator_name(simulator))


CSV_HEADER = ("layer", "unit", "val_correlation", "test_correlation", "simulation_correlation", "ablation", "bias",
              "n_concepts", "concepts", "weights")


def write_explanations_csv(path: str | Path, result: LayerExplanations) -> Path:
    """One row per neuron, columns :data:`CSV_HEADER` (concepts and weights ``|``-separated, in selection order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        sims = result.simulation or [float("nan")] * len(result.explanations)
        for e, a, sc in zip(result.explanations, result.ablation, sims):
            w.writerow([result.layer, e.unit, e.val_correlation, e.test_correlation, sc, a, e.bias, len(e.concepts),
                        "|".join(e.concepts), "|".join(f"{v:.6g}" for v in e.weights)])
    return path
