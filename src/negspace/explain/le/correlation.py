"""Correlation score of linear explanations (paper 003, eq. 10): Pearson correlation between the simulated
activation ``s(x, E)`` and the neuron, on all rows or on a part of the explanation's seeded split; the concepts
come from the explainer's matrix or from a simulator (§4, :mod:`.simulator`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from negspace.stats import pearson

from .explanation import Explanation, split_indices
from .simulator import ConceptSimulator

__all__ = ["correlation_score"]


def _rows_of(rows: str | Tensor | None, explanation: Explanation, n: int) -> Tensor | None:
    if rows is None:
        return None
    if isinstance(rows, Tensor):
        return rows.long()
    if rows not in ("train", "val", "test"):
        raise ValueError(f"rows must be None, 'train', 'val', 'test' or an index tensor, got {rows!r}")
    if explanation.n_samples != n:
        raise ValueError(
            f"rows={rows!r} refers to the split the explanation was fitted on ({explanation.n_samples} rows), "
            f"but {n} rows were given"
        )
    tr, va, te = split_indices(n, explanation.split, explanation.seed)
    return {"train": tr, "val": va, "test": te}[rows]


def _score(sim: Tensor, act: Tensor) -> float:
    r = pearson(sim, act)
    if math.isnan(r) and float((act.double() - act.double().mean()).abs().max()) > 0:
        return 0.0  # a constant simulation of a varying neuron explains nothing: 0 (NaN only if both are constant)
    return r


def correlation_score(
    explanation: Explanation | Sequence[Explanation],
    activations: Tensor,
    concepts: Tensor | None = None,
    *,
    concept_names: Sequence[str] | None = None,
    simulator: ConceptSimulator | None = None,
    images: Tensor | None = None,
    rows: str | Tensor | None = None,
) -> float | list[float]:
    """Pearson correlation between the simulation ``s(x, E)`` and ``activations`` (eq. 10).

    Args:
        explanation: one explanation (``activations (N,)``) or a list (``activations (N, D)``, column j ↔ item j).
        activations: true neuron summaries on the scoring data.
        concepts: a concept matrix ``(N, M)`` for the same rows: the explainer's own (columns as fitted), or, with
            ``concept_names``, any matrix whose columns are looked up by the explanation's concept names.
        simulator: a simulator (:class:`~negspace.explain.le.ClipSimulator`, ``MatrixSimulator`` or a callable
            ``(images, names) -> (N, len(names))``) evaluated on ``images (N, ...)`` for the concepts the
            explanations use (paper 003 §4: a model different from the explainer). Replaces ``concepts``.
        rows: ``None`` = all rows; ``"test"``/``"val"``/``"train"`` = that part of the explanation's seeded split
            (the data must be the probing data it was fitted on); or an index tensor.

    An explanation without concepts simulates a constant: score 0 (``nan`` if the neuron is constant too).
    """
    if simulator is not None:
        if images is None or concepts is not None:
            raise ValueError("with simulator=, pass images=(N, ...) and no concepts")
        exps_all = [explanation] if isinstance(explanation, Explanation) else list(explanation)
        concept_names = sorted({c for e in exps_all for c in e.concepts})
        concepts = torch.as_tensor(simulator(images, concept_names)).float()
    if not isinstance(activations, Tensor) or not isinstance(concepts, Tensor):
        raise TypeError("activations and concepts must be tensors")
    if concepts.ndim != 2 or concepts.shape[0] != activations.shape[0]:
        raise ValueError(
            f"concepts must be (N, M) with N = activations rows ({activations.shape[0]}), got {tuple(concepts.shape)}"
        )
    if isinstance(explanation, Explanation):
        if activations.ndim != 1:
            raise ValueError(f"one explanation needs activations of shape (N,), got {tuple(activations.shape)}")
        r = _rows_of(rows, explanation, activations.shape[0])
        sim = explanation.simulate(concepts, concept_names)
        return _score(sim, activations) if r is None else _score(sim[r], activations[r])
    exps = list(explanation)
    if activations.ndim != 2 or activations.shape[1] != len(exps):
        raise ValueError(f"{len(exps)} explanations need activations (N, {len(exps)}), got {tuple(activations.shape)}")
    return [correlation_score(e, activations[:, j], concepts, concept_names=concept_names, rows=rows)
            for j, e in enumerate(exps)]
