"""Neuron summaries and concept matrices ``P (N, M)`` from labels for Linear Explanations (paper 003).

* :func:`activation_summary` — ``g(A_k(x))`` for every neuron of a layer over a dataset (``"mean"``, the paper's
  default for CNN channels, ``"max"``, ``"cls"`` for token 0 of a transformer layer; any
  :data:`negspace.reduce.REDUCES`), batched, without gradients.
* :func:`label_concepts` — LE(Label): one-hot class labels plus superclasses from a user mapping;
  :data:`BUILTIN_CONCEPT_SETS` and :func:`builtin_concepts` for the bundled datasets.
* :func:`batch_concepts` / :func:`concept_matrix` — the concept source of :func:`negspace.explain.le.explain_layer`
  (``"labels"``, a built-in set name, a tensor or a callable ``batch -> (B, M)``), per batch and for all rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.batch import Batch, unpack_batch
from negspace.hooks import capture, eval_mode, model_device, run_until
from negspace.reduce import check_reduce, summarize

__all__ = [
    "BUILTIN_CONCEPT_SETS",
    "ConceptSource",
    "activation_summary",
    "batch_concepts",
    "builtin_concepts",
    "check_concepts",
    "concept_matrix",
    "iter_summaries",
    "label_concepts",
    "required_roles",
    "split_batch",
]

#: where the concept matrix comes from: ``"labels"``, a built-in set name, a tensor ``(N, M)`` or ``batch -> (B, M)``
ConceptSource = str | Tensor | Callable[[Any], Tensor]


def split_batch(batch: Any, batch_keys: Any = None) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Deprecated: use :func:`negspace.batch.unpack_batch`. ``(x, y, extras)`` of a batch; ``extras`` holds the
    batch's ``mask``/``group`` and, for dict batches, every other key."""
    warnings.warn("split_batch is deprecated; use negspace.batch.unpack_batch", DeprecationWarning, stacklevel=2)
    b = unpack_batch(batch, batch_keys, who="LE")
    extras: dict[str, Any] = {k: v for k, v in (("mask", b.mask), ("group", b.group)) if v is not None}
    if isinstance(batch, Mapping):
        used = {id(b.image), id(b.label)}
        extras.update({k: v for k, v in batch.items() if id(v) not in used and k not in extras})
    return b.image, b.label, extras


def iter_summaries(
    model: nn.Module,
    layer: str,
    data: Tensor | Iterable[Any],
    *,
    reduce: str = "mean",
    batch_size: int = 128,
    batch_keys: Any = None,
    require: Sequence[str] = ("image",),
    progress: bool = False,
    device: str | torch.device | None = None,
) -> Iterator[tuple[Any, Batch, Tensor]]:
    """Yield ``(raw batch, Batch, summaries (B, D) float32 on CPU)`` for every batch of ``data``.

    Runs ``model`` in eval mode (restored afterwards), without gradients, and stops each forward at ``layer``.
    ``data`` is a tensor ``(N, ...)`` (split into ``batch_size`` chunks) or an iterable of batches; inputs go to
    ``device`` (default: the model's).
    """
    check_reduce(reduce)
    device = model_device(model) if device is None else device
    batches = data.split(batch_size) if isinstance(data, Tensor) else data
    with torch.no_grad(), eval_mode(model), capture(model, layer, detach=True, stop_after=True) as cap:
        for raw in tqdm(batches, desc=f"activations {layer}", disable=not progress, leave=False):
            b = unpack_batch(raw, batch_keys, require=require, who="LE")
            run_until(model, b.image.to(device))
            yield raw, b, summarize(cap.activations[layer], reduce).float().cpu()


def activation_summary(
    model: nn.Module,
    layer: str,
    data: Tensor | Iterable[Any],
    *,
    reduce: str = "mean",
    batch_size: int = 128,
    device: str | torch.device | None = None,
    batch_keys: Any = None,
    progress: bool = False,
) -> Tensor:
    """Neuron summaries ``q (N, D)`` of ``layer`` over ``data`` (a tensor ``(N, ...)`` or an iterable of batches).

    Runs the model in eval mode (restored afterwards) and stops the forward pass at ``layer``; inputs go to
    ``device`` (default: the model's).
    """
    out = [q for _, _, q in iter_summaries(model, layer, data, reduce=reduce, batch_size=batch_size,
                                           batch_keys=batch_keys, progress=progress, device=device)]
    if not out:
        raise ValueError("data is empty")
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ labels
def label_concepts(
    labels: Tensor | Sequence[int],
    class_names: Sequence[str],
    superclasses: Mapping[str, Sequence[int | str]] | None = None,
) -> tuple[Tensor, list[str]]:
    """LE(Label) concept matrix: one-hot classes ``(N, C)`` followed by superclass indicators.

    Args:
        labels: integer class labels ``(N,)``.
        class_names: C names.
        superclasses: ``{name: [member classes]}`` (indices or class names); a sample belongs to a superclass when
            its class is a member (value 1, else 0).

    Returns:
        ``(P (N, C + S) float32, names)``.
    """
    y = torch.as_tensor(labels).long().flatten()
    c = len(class_names)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(f"labels must be in [0, {c}) for {c} class_names, got range [{int(y.min())}, {int(y.max())}]")
    onehot = torch.nn.functional.one_hot(y, c).float()
    names = [str(n) for n in class_names]
    cols = [onehot]
    for sname, members in (superclasses or {}).items():
        idx = []
        for mbr in members:
            if isinstance(mbr, str):
                if mbr not in names:
                    raise ValueError(f"superclass {sname!r}: unknown class name {mbr!r}; class_names are {names}")
                idx.append(names.index(mbr))
            else:
                if not 0 <= int(mbr) < c:
                    raise ValueError(f"superclass {sname!r}: class index {mbr} out of range [0, {c})")
                idx.append(int(mbr))
        cols.append(onehot[:, idx].amax(1, keepdim=True) if idx else torch.zeros(len(y), 1))
        names.append(str(sname))
    return torch.cat(cols, 1), names


# Concept sets of the datasets that ship with negspace (no download).
BUILTIN_CONCEPT_SETS: dict[str, dict[str, Any]] = {
    # sklearn.datasets.load_digits: classes 0..9 plus shape superclasses
    "digits": {
        "class_names": [f"digit {i}" for i in range(10)],
        "superclasses": {
            "even": [0, 2, 4, 6, 8],
            "odd": [1, 3, 5, 7, 9],
            "closed loop": [0, 4, 6, 8, 9],
            "straight strokes only": [1, 4, 7],
            "round strokes": [0, 2, 3, 5, 6, 8, 9],
        },
    },
    # SyntheticLesionDataModule / SpuriousPatchDataModule on lesions: diagnosis + spurious patch present
    "lesions": {
        "class_names": ["benign", "malignant"],
        "superclasses": {},
        "mask_concept": "patch present",
    },
}


# ------------------------------------------------------------------------------------------ concept sources
def check_concepts(concepts: object) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``concepts`` is a valid :data:`ConceptSource`."""
    if isinstance(concepts, str):
        if concepts != "labels" and concepts not in BUILTIN_CONCEPT_SETS:
            raise ValueError(
                f"concepts must be 'labels', one of {sorted(BUILTIN_CONCEPT_SETS)}, a Tensor (N, M) or a callable; "
                f"got {concepts!r}"
            )
    elif not (isinstance(concepts, Tensor) or callable(concepts)):
        raise TypeError(f"concepts must be a string, a Tensor or a callable, got {type(concepts).__name__}")


def required_roles(concepts: ConceptSource) -> tuple[str, ...]:
    """Batch roles a concept source reads (labels always; masks for a built-in set with a mask concept)."""
    if isinstance(concepts, str) and BUILTIN_CONCEPT_SETS.get(concepts, {}).get("mask_concept"):
        return ("image", "label", "mask")
    return ("image", "label")


def batch_concepts(concepts: ConceptSource, raw: Any, batch: Batch) -> Tensor | None:
    """Concept columns ``(B, M')`` a source takes from the batch itself: ``concepts(raw)`` for a callable, the
    mask concept (1 where the mask is non-empty) for a built-in set that has one; ``None`` otherwise."""
    if callable(concepts) and not isinstance(concepts, Tensor | str):
        return torch.as_tensor(concepts(raw)).float().cpu()
    if isinstance(concepts, str) and BUILTIN_CONCEPT_SETS.get(concepts, {}).get("mask_concept"):
        if batch.mask is None:
            raise ValueError(f"concepts={concepts!r} needs a 'mask' in every batch")
        return (batch.mask.flatten(1) > 0).any(1).float().cpu()[:, None]
    return None


def concept_matrix(
    concepts: ConceptSource,
    labels: Tensor,
    extra: Tensor | None = None,
    *,
    concept_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    superclasses: Mapping[str, Sequence[int | str]] | None = None,
) -> tuple[Tensor, list[str]]:
    """Concept matrix ``P (N, M)`` and its names for ``labels (N,)`` from a concept source.

    ``extra (N, M')`` are the per-batch columns of :func:`batch_concepts`, concatenated. ``"labels"`` uses
    ``class_names`` (default ``"class i"`` for ``max(label) + 1`` classes) and ``superclasses``; a tensor source
    gives its first N rows (names ``concept_names`` or ``"c0", "c1", …``), as does a callable.
    """
    check_concepts(concepts)
    n = len(labels)
    if isinstance(concepts, Tensor):
        p = concepts.float()
        if p.ndim != 2 or p.shape[0] < n:
            raise ValueError(f"concepts tensor must be (N, M) with N >= {n} samples, got {tuple(p.shape)}")
        return p[:n], list(concept_names or [f"c{i}" for i in range(p.shape[1])])
    if callable(concepts) and not isinstance(concepts, str):
        p = extra if extra is not None else torch.zeros(n, 0)
        return p, list(concept_names or [f"c{i}" for i in range(p.shape[1])])
    if concepts == "labels":
        n_classes = len(class_names) if class_names else (int(labels.max()) + 1 if n else 1)
        return label_concepts(labels, list(class_names or [f"class {i}" for i in range(n_classes)]), superclasses)
    spec = BUILTIN_CONCEPT_SETS[concepts]
    p, names = label_concepts(labels, spec["class_names"], spec["superclasses"])
    if spec.get("mask_concept"):
        p = torch.cat([p, extra if extra is not None else torch.zeros(n, 1)], 1)
        names.append(spec["mask_concept"])
    return p, names


def builtin_concepts(name: str, data: Iterable[Any], *, batch_keys: Any = None) -> tuple[Tensor, list[str]]:
    """Concept matrix of a built-in concept set (:data:`BUILTIN_CONCEPT_SETS`) from batches of ``data``.

    Labels come from the batches (``"label"`` / second tuple item); for ``"lesions"`` a ``"patch present"``
    concept is 1 where the batch's ``"mask"`` is non-empty. Iterate ``data`` in the same order as the activations.
    """
    if name not in BUILTIN_CONCEPT_SETS:
        raise ValueError(f"unknown concept set {name!r}; built-in sets: {sorted(BUILTIN_CONCEPT_SETS)}")
    labels, extras = [], []
    for raw in data:
        b = unpack_batch(raw, batch_keys, require=required_roles(name), who=f"concept set {name!r}")
        labels.append(torch.as_tensor(b.label).long().flatten().cpu())
        extra = batch_concepts(name, raw, b)
        if extra is not None:
            extras.append(extra)
    if not labels:
        raise ValueError("data is empty")
    return concept_matrix(name, torch.cat(labels), torch.cat(extras) if extras else None)
