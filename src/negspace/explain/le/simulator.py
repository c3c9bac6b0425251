"""Simulators of paper 003 §4: a *different* model predicts ``P_sim(c | x)`` for the concepts an explanation
names, and the explanation is scored by how well ``s(x, E) = Σ w·P_sim(c | x)`` follows the neuron.

A simulator is any callable ``(images (N, ...), concept_names) -> (N, len(concept_names))``:

* :class:`ClipSimulator` — the paper's: SigLIP ``ViT-SO400M-14-SigLIP-384`` (``webli``) with its calibration
  ``(a, b) = (58, −0.13)`` (eq. 8); any open_clip model with known or given ``(a, b)``;
* :class:`MatrixSimulator` — a fixed concept matrix ``(N, M)`` from another source (e.g. labels from a second
  annotator), looked up by concept name;
* ``"explainer"`` (:data:`SAME`) — the explainer's own concept matrix (held-out self-consistency, not §4's
  protocol; with label concepts this scores against the ground truth).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SAME", "ClipSimulator", "ConceptSimulator", "MatrixSimulator", "check_simulator", "simulator_name"]

#: ``simulator=`` value meaning "reuse the explainer's concept matrix"
SAME = "explainer"
#: a simulator: ``(images (N, ...), concept names) -> P_sim (N, len(names))``
ConceptSimulator = Callable[[Tensor, Sequence[str]], Tensor]


class ClipSimulator:
    """Concept probabilities ``P_sim = σ(a·cos + a·b)`` from an open_clip model (paper 003, eq. 8).

    Args:
        model: open_clip name (default the paper's simulator ``"ViT-SO400M-14-SigLIP-384"``; ``"tiny"`` for tests)
            or a loaded ``(model, preprocess, tokenizer)`` triple. Loaded now, so missing weights fail at once.
        pretrained: for :func:`negspace.models.clip.load_clip` (``"default"`` = the paper's ``webli`` weights from
            the local cache; ``None`` = random weights, tests only).
        calibration: ``(a, b)``; default the paper's values for its models
            (:data:`negspace.models.clip.PAPER_CALIBRATION`), required for other models.
        preprocess: ``"auto"`` (images ``(N, 3, H, W)`` in ``[0, 1]`` are resized and normalised for the model,
            :func:`negspace.models.clip.clip_preprocess`), ``None`` (images are already CLIP inputs) or a callable
            mapping the target model's inputs to CLIP inputs (e.g. undo its normalisation).
        template: prompt template. batch_size, device: for encoding.

    Image embeddings of the last image tensor are kept, so scoring many explanations on the same data encodes
    the images once.
    """

    def __init__(
        self,
        model: str | tuple[nn.Module, Callable, Callable] = "ViT-SO400M-14-SigLIP-384",
        pretrained: str | None = "default",
        *,
        calibration: tuple[float, float] | None = None,
        preprocess: str | Callable[[Tensor], Tensor] | None = "auto",
        template: str = "{}",
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        from negspace.models.clip import PAPER_CALIBRATION, clip_preprocess, load_clip

        self.name = model if isinstance(model, str) else type(model[0]).__name__
        if calibration is None:
            if self.name not in PAPER_CALIBRATION:
                raise ValueError(
                    f"calibration=(a, b) is required for simulator model {self.name!r}; the paper's values are known "
                    f"for {sorted(PAPER_CALIBRATION)} (fit your own with fit_sigmoid_calibration)"
                )
            calibration = PAPER_CALIBRATION[self.name]
        self.calibration = (float(calibration[0]), float(calibration[1]))
        if not (preprocess in ("auto", None) or callable(preprocess)):
            raise TypeError(f"preprocess must be 'auto', None or a callable, got {preprocess!r}")
        triple = load_clip(model, pretrained=pretrained, device=device) if isinstance(model, str) else model
        self.model, _, self.tokenizer = triple
        self.preprocess = clip_preprocess(self.model) if preprocess == "auto" else preprocess
        self.template, self.batch_size = template, batch_size
        self._cache: tuple[str, Tensor] | None = None

    def __repr__(self) -> str:
        return f"ClipSimulator({self.name!r}, calibration={self.calibration})"

    def embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``(N, E)`` (cached for the last image tensor)."""
        from negspace.models.clip import encode_images

        from .clip_concepts import data_fingerprint

        key = data_fingerprint(images)
        if self._cache is None or self._cache[0] != key:
            x = images.detach().float().cpu()
            x = self.preprocess(x) if self.preprocess is not None else x
            self._cache = (key, encode_images(self.model, x, self.batch_size))
        return self._cache[1]

    def __call__(self, images: Tensor, concept_names: Sequence[str]) -> Tensor:
        from negspace.models.clip import encode_texts

        names = [str(c) for c in concept_names]
        if not names:
            return torch.zeros(images.shape[0], 0)
        cos = self.embeddings(images) @ encode_texts(self.model, self.tokenizer, names, template=self.template).T
        a, b = self.calibration
        return torch.sigmoid(a * (cos + b))


class MatrixSimulator:
    """A fixed simulator concept matrix ``(N, M)`` with ``concept_names``, rows aligned with the scoring data;
    columns are looked up by the names an explanation uses."""

    def __init__(self, matrix: Tensor, concept_names: Sequence[str], name: str = "matrix") -> None:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2:
            raise TypeError(f"matrix must be a Tensor (N, M), got {type(matrix).__name__}")
        self.matrix = matrix.detach().float().cpu()
        self.names = [str(c) for c in concept_names]
        if len(self.names) != self.matrix.shape[1]:
            raise ValueError(f"concept_names has {len(self.names)} names but matrix has {self.matrix.shape[1]} columns")
        self.name = name

    def __repr__(self) -> str:
        return f"MatrixSimulator({self.name!r}, {tuple(self.matrix.shape)})"

    def __call__(self, images: Tensor, concept_names: Sequence[str]) -> Tensor:
        if images.shape[0] != self.matrix.shape[0]:
            raise ValueError(f"the simulator matrix has {self.matrix.shape[0]} rows but there are {images.shape[0]} "
                             "images; rows must be aligned")
        missing = [c for c in concept_names if str(c) not in self.names]
        if missing:
            raise ValueError(f"the simulator has no concept(s) {missing[:10]}; it knows {self.names[:20]}")
        return self.matrix[:, [self.names.index(str(c)) for c in concept_names]]


def check_simulator(simulator: object) -> None:
    """Raise unless ``simulator`` is ``"explainer"`` or a callable ``(images, names) -> (N, len(names))``."""
    if isinstance(simulator, str):
        if simulator != SAME:
            raise ValueError(f"simulator must be {SAME!r}, a ClipSimulator, a MatrixSimulator or a callable "
                             f"(images, names) -> (N, len(names)); got {simulator!r}")
    elif not callable(simulator):
        raise TypeError(f"simulator must be {SAME!r} or a callable (images, names) -> P, got {type(simulator).__name__}")


def simulator_name(simulator: Any) -> str:
    """A short name for logs: ``"explainer"``, the model name of a :class:`ClipSimulator`, or the type name."""
    if isinstance(simulator, str):
        return simulator
    return str(getattr(simulator, "name", type(simulator).__name__))
