"""A discovered artifact candidate, what it turns into (a :class:`negspace.masks.ConceptMask`), and the files a
user picks one from (one figure per candidate and ``candidates.json``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from negspace.batch import iter_images

if TYPE_CHECKING:
    from negspace.masks.concept import ConceptMask

__all__ = ["Candidate", "save_candidates", "select_images"]


@dataclass
class Candidate:
    """One candidate artifact found by :func:`negspace.masks.discover.discover_artifacts`.

    ``kind``: ``"channels"``, ``"codec"`` or ``"spray"``; ``score`` in [0, 1] (``details`` holds its factors);
    ``class_index``: the class it is tied to (or ``None``); ``channels``: the layer's channels that carry it (or
    ``None``); ``mode``: the CODEC mode (or ``None``); ``reference_indices`` / ``clean_indices``: LongTensors of
    images of the data that carry it / do not (the artifact and clean examples); ``preview``: ``(k, 1, H, W)``
    localisation maps in [0, 1] of the first ``k`` reference images; ``patches``: ``(k, C, p, p)`` crops of it.
    """

    kind: str
    score: float
    layer: str
    class_index: int | None
    channels: list[int] | None
    mode: int | None
    reference_indices: Tensor
    clean_indices: Tensor
    preview: Tensor = field(repr=False)
    patches: Tensor | None = field(repr=False)
    description: str = ""
    details: dict[str, float] = field(default_factory=dict)
    modes: Any = field(default=None, repr=False, compare=False)  # the CODEC LayerModes a "codec" candidate came from

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (indices as lists, no tensors)."""
        return {
            "kind": self.kind, "score": float(self.score), "layer": self.layer, "class_index": self.class_index,
            "channels": self.channels, "mode": self.mode, "description": self.description,
            "details": {k: float(v) for k, v in self.details.items()},
            "reference_indices": [int(i) for i in self.reference_indices.tolist()],
            "clean_indices": [int(i) for i in self.clean_indices.tolist()],
        }  # fmt: skip

    def examples(self, data: Tensor | Iterable, *, batch_keys: object = None) -> tuple[Tensor, Tensor]:
        """The artifact and clean example images ``(n, C, H, W)`` of ``data`` (the data discovery ran on, in the
        same order)."""
        return (select_images(data, self.reference_indices, batch_keys=batch_keys),
                select_images(data, self.clean_indices, batch_keys=batch_keys))

    def to_concept_mask(self, model: nn.Module, data: Tensor | Iterable, *, batch_keys: object = None,
                        **kw: Any) -> ConceptMask:
        """A :class:`negspace.masks.ConceptMask` of this candidate, its threshold fitted on the reference vs clean
        images of ``data``: ``"channels"`` → ``from_channels``, ``"codec"`` → ``from_codec_mode`` (or
        ``from_examples`` when the modes are not at hand, e.g. after a JSON round trip), ``"spray"`` →
        ``from_examples``. ``kw`` go to the constructor (``dilate``, ``reference``, ``rule``, ...)."""
        from negspace.masks import ConceptMask

        art, clean = self.examples(data, batch_keys=batch_keys)
        if self.kind == "channels" and self.channels:
            return ConceptMask.from_channels(model, self.layer, [int(c) for c in self.channels],
                                             examples=(art, clean), **kw)
        if self.kind == "codec" and self.modes is not None and self.mode is not None:
            return ConceptMask.from_codec_mode(model, self.modes, int(self.mode), examples=(art, clean), **kw)
        return ConceptMask.from_examples(model, self.layer, art, clean, **kw)


def select_images(data: Tensor | Iterable, indices: Tensor | Sequence[int], *, batch_keys: object = None) -> Tensor:
    """Images number ``indices`` of ``data`` (a tensor or an iterable of batches, read in order) → ``(n, C, H, W)``,
    in the order of ``indices``."""
    idx = torch.as_tensor(indices, dtype=torch.long).flatten()
    if idx.numel() == 0:
        raise ValueError("select_images: indices is empty")
    if int(idx.min()) < 0:
        raise ValueError(f"select_images: indices must be >= 0, got {int(idx.min())}")
    if isinstance(data, Tensor):
        if int(idx.max()) >= data.shape[0]:
            raise ValueError(f"select_images: index {int(idx.max())} but data has {data.shape[0]} images")
        return data[idx].detach()
    need, found, start = int(idx.max()), {}, 0
    wanted = set(idx.tolist())
    for img in iter_images(data, batch_keys, who="select_images"):
        for j in range(img.shape[0]):
            if start + j in wanted:
                found[start + j] = img[j].detach()
        start += img.shape[0]
        if start > need:
            break
    if start <= need:
        raise ValueError(f"select_images: index {need} but data has {start} images")
    return torch.stack([found[i] for i in idx.tolist()])


def save_candidates(candidates: Sequence[Candidate], images: Tensor, out_dir: str | Path, *,
                    top: int | None = None) -> list[str]:
    """Write ``candidate_<i>.png`` (:func:`negspace.plots.discovery_candidate`: reference images, localisation
    preview overlaid, patches) for the first ``top`` candidates (all by default) and ``candidates.json`` (every
    candidate's summary, :meth:`Candidate.to_dict`, with its rank and figure). ``images``: ``(N, C, H, W)``, the
    images discovery ran on. Returns the paths written."""
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top must be a positive int or None, got {top!r}")
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor (N, C, H, W), got {getattr(images, 'shape', type(images).__name__)}")
    from negspace.plots import discovery_candidate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    for i, cand in enumerate(candidates):
        row = {"rank": i, **cand.to_dict(), "figure": None}
        if top is None or i < top:
            ref = cand.reference_indices[: cand.preview.shape[0]]
            if int(ref.max()) >= images.shape[0]:
                raise ValueError(f"candidate {i} refers to image {int(ref.max())} but images has {images.shape[0]}")
            title = f"#{i} {cand.kind} (score {cand.score:.2f}): {cand.description}"
            fig = discovery_candidate(images[ref], cand.preview, cand.patches, title=title)
            import matplotlib.pyplot as plt  # after plots chose the Agg backend

            path = out / f"candidate_{i}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(str(path))
            row["figure"] = path.name
        rows.append(row)
    path = out / "candidates.json"
    path.write_text(json.dumps(rows, indent=1))
    return [*written, str(path)]
