"""Compatibility wrapper of the LE figure; the figure itself is :func:`negspace.plots.area_chart`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from .explanation import Explanation

__all__ = ["area_chart"]


def area_chart(
    activations: Tensor,
    concepts: Tensor,
    concept_names: Sequence[str],
    *,
    explanation: Explanation | None = None,
    top: int = 6,
    n_buckets: int = 8,
    path: str | Path | None = None,
    title: str | None = None,
) -> Any:
    """:func:`negspace.plots.area_chart` of ``activations (N,)`` showing ``explanation``'s concepts (else the
    ``top`` most correlated ones). Returns the Figure; with ``path`` it is also saved as PNG (and closed)."""
    from negspace.plots import area_chart as plot

    cols = explanation.concept_indices if explanation is not None and explanation.concept_indices else None
    fig = plot(activations, concepts, concept_names, columns=cols, top=top, n_buckets=n_buckets,
               title=title or (str(explanation) if explanation is not None else None))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
    return fig
