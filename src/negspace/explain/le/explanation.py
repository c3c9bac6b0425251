"""A linear explanation of one neuron (paper 003) and the seeded train/val/test split it is fitted and scored on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Explanation", "split_indices"]


@dataclass
class Explanation:
    """A linear explanation ``s(x) = Σ_i weights[i] · P(concepts[i] | x) + bias`` of one neuron.

    Attributes:
        concepts: concept names, in the order the greedy search selected them (empty for a dead neuron).
        weights: least-squares weights in the units of the inputs (activation per unit concept).
        bias: intercept (activation units).
        val_correlation: Pearson correlation of the simulation with the neuron on the val split (the greedy
            criterion); ``nan`` for a dead neuron, ``0.0`` if no concept correlates positively.
        concept_indices: column indices of ``concepts`` in the concept matrix.
        unit: the neuron's index in the activation matrix (``0`` for a single neuron).
        test_correlation: the same correlation on the held-out test split (``nan`` if it is empty).
        dead: the neuron's activation is constant on the training split (not explained).
        n_samples, split, seed: what the explanation was fitted on (to reproduce the split).
    """

    concepts: list[str]
    weights: list[float]
    bias: float
    val_correlation: float
    concept_indices: list[int] = field(default_factory=list)
    unit: int = 0
    test_correlation: float = float("nan")
    dead: bool = False
    n_samples: int = 0
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0

    def simulate(self, concepts: Tensor, names: Sequence[str] | None = None) -> Tensor:
        """Simulated activations ``(N,)`` from a concept matrix ``concepts (N, M)``.

        Without ``names`` the columns are those the explanation was fitted on (``concept_indices``); with
        ``names`` (M names, e.g. a simulator's concepts) each concept is looked up by name.
        """
        if not isinstance(concepts, Tensor) or concepts.ndim != 2:
            raise TypeError(f"concepts must be a Tensor (N, M), got {_describe(concepts)}")
        if names is not None:
            names = [str(c) for c in names]
            if len(names) != concepts.shape[1]:
                raise ValueError(f"names has {len(names)} entries but concepts has {concepts.shape[1]} columns")
            missing = [c for c in self.concepts if c not in names]
            if missing:
                raise ValueError(f"the simulator's concepts lack {missing} used by the explanation of unit {self.unit}")
            cols = [names.index(c) for c in self.concepts]
        else:
            cols = list(self.concept_indices)
            if cols and max(cols) >= concepts.shape[1]:
                raise ValueError(
                    f"concepts has {concepts.shape[1]} columns but the explanation uses column {max(cols)}"
                )
        out = torch.full((concepts.shape[0],), float(self.bias), dtype=torch.float64)
        if cols:
            w = torch.tensor(self.weights, dtype=torch.float64)
            out = out + concepts[:, cols].double() @ w
        return out.to(concepts.dtype if concepts.is_floating_point() else torch.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (NaN is kept as a float; ``json.dumps`` writes it as ``NaN``)."""
        d = asdict(self)
        d["split"] = list(self.split)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Explanation:
        d = dict(d)
        d["split"] = tuple(d.get("split", (0.7, 0.1, 0.2)))
        return cls(**d)

    def __str__(self) -> str:
        if self.dead:
            return f"unit {self.unit}: dead (constant activation {self.bias:.4g})"
        terms = " + ".join(f"{w:.3g}·{c}" for w, c in zip(self.weights, self.concepts)) or "0"
        return f"unit {self.unit}: {terms} + {self.bias:.3g}  (val ρ = {self.val_correlation:.3f})"


def _describe(x: object) -> str:
    return f"Tensor{tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def split_indices(n: int, split: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded random train/val/test row indices for ``n`` rows (fractions ``split``, rounded; test = the rest)."""
    if not isinstance(split, Sequence) or len(split) != 3 or any(not isinstance(f, (int, float)) for f in split):
        raise TypeError(f"split must be three fractions (train, val, test), got {split!r}")
    if any(f < 0 for f in split) or split[0] <= 0 or split[1] <= 0 or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 (train, val > 0) and sum to 1, got {tuple(split)}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    n_train = round(split[0] * n)
    n_val = round(split[1] * n)
    if n_train < 3 or n_val < 3:
        raise ValueError(
            f"split {tuple(split)} of {n} rows leaves {n_train} train and {n_val} val rows; need at least 3 each"
        )
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
