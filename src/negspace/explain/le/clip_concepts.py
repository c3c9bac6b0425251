"""LE(SigLIP) concept matrices (paper 003, eq. 5): ``P = sigmoid(a·(cos + b))`` from CLIP/SigLIP image–text
cosines. ``(a, b)`` are the paper's published values for its models (:data:`negspace.models.clip.PAPER_CALIBRATION`)
or fitted by binary cross-entropy on labelled concepts; concepts whose top-5 mean ``P`` on the probing data is
below 0.5 are dropped (§5, :func:`filter_concepts`); cosines are cached as safetensors keyed by model name,
concept names and a fingerprint of the data. Models come from :mod:`negspace.models.clip` (default: the paper's
explainer, SigLIP ``ViT-L-16-SigLIP-384`` ``webli``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ConceptMatrix", "clip_concept_matrix", "clip_cosines", "data_fingerprint", "filter_concepts",
           "fit_sigmoid_calibration"]


def fit_sigmoid_calibration(cosines: Tensor, labels: Tensor) -> tuple[float, float]:
    """Fit ``(a, b)`` of ``P = sigmoid(a·(cos + b))`` by binary cross-entropy (paper 003, eq. 5).

    Args:
        cosines: image–text cosine similarities ``(N, M)`` (or any shape).
        labels: binary labels of the same shape (1 = concept present).

    A 1-D logistic regression (scikit-learn, effectively unpenalised: ``C=1e12``) on the flattened cosines gives
    slope ``a`` and intercept ``a·b``.
    """
    from sklearn.linear_model import LogisticRegression

    if not isinstance(cosines, Tensor) or not isinstance(labels, Tensor) or cosines.shape != labels.shape:
        raise ValueError(
            f"cosines and labels must be tensors of the same shape, got {_shape(cosines)} and {_shape(labels)}"
        )
    x = cosines.detach().double().flatten().cpu().numpy()[:, None]
    y = labels.detach().flatten().cpu().numpy() > 0.5
    if y.all() or not y.any():
        raise ValueError("labels must contain both positives and negatives to fit the calibration")
    clf = LogisticRegression(C=1e12, tol=1e-10, max_iter=1000).fit(x, y)
    a = float(clf.coef_[0, 0])
    b = float(clf.intercept_[0]) / a if a != 0 else 0.0
    return a, b


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def data_fingerprint(images: Tensor) -> str:
    """Short SHA-1 of a tensor's shape and bytes (identifies the probing data in cache keys)."""
    h = hashlib.sha1(str(tuple(images.shape)).encode())
    h.update(images.detach().contiguous().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def clip_cosines(
    model: nn.Module,
    tokenizer: Callable,
    images: Tensor | Iterable[Any],
    concept_names: Sequence[str],
    *,
    template: str = "{}",
    batch_size: int = 64,
    image_embeddings: Tensor | None = None,
) -> Tensor:
    """Cosine similarities ``(N, M)`` between (preprocessed) images and the prompts ``template.format(name)``."""
    from negspace.models.clip import encode_images, encode_texts

    img = image_embeddings if image_embeddings is not None else encode_images(model, images, batch_size)
    txt = encode_texts(model, tokenizer, list(concept_names), template=template)
    return img @ txt.T


class ConceptMatrix(tuple):
    """Result of :func:`clip_concept_matrix`; unpacks as ``P, (a, b)``.

    Attributes: ``matrix`` (``P (N, M_kept)``), ``calibration`` (``(a, b)``), ``names`` (the kept concept names, the
    columns of ``matrix``), ``kept`` (their indices in the ``concept_names`` given), ``top5`` (top-5 mean ``P`` of
    every given concept, ``(M,)``).
    """

    matrix: Tensor
    calibration: tuple[float, float]
    names: list[str]
    kept: list[int]
    top5: Tensor

    def __new__(cls, matrix: Tensor, calibration: tuple[float, float], names: list[str], kept: list[int],
                top5: Tensor) -> ConceptMatrix:
        obj = super().__new__(cls, (matrix, calibration))
        obj.matrix, obj.calibration, obj.names, obj.kept, obj.top5 = matrix, calibration, names, kept, top5
        return obj


def filter_concepts(
    concepts: Tensor,
    concept_names: Sequence[str] | None = None,
    *,
    min_top5: float = 0.5,
    top_k: int = 5,
    min_std: float = 1e-5,
) -> tuple[Tensor, list[str], list[int]]:
    """Paper 003 §5: keep the concepts whose mean over their ``top_k`` highest values in ``concepts (N, M)`` is at
    least ``min_top5`` (the concept is present in the probing data) and whose std is at least ``min_std``.

    Returns ``(concepts[:, kept], kept names, kept column indices)``.
    """
    if not isinstance(concepts, Tensor) or concepts.ndim != 2:
        raise TypeError(f"concepts must be a Tensor (N, M), got {_shape(concepts)}")
    n, m = concepts.shape
    names = [str(c) for c in concept_names] if concept_names is not None else [f"c{i}" for i in range(m)]
    if len(names) != m:
        raise ValueError(f"concept_names has {len(names)} names but concepts has {m} columns")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    p = concepts.detach().float()
    top = p.topk(min(top_k, n), dim=0).values.mean(0) if n else torch.zeros(m)
    std = p.std(0) if n > 1 else torch.zeros(m)
    keep = ((top >= min_top5) & (std >= min_std)).nonzero().flatten().tolist()
    return concepts[:, keep], [names[i] for i in keep], keep


def _top5(p: Tensor, k: int = 5) -> Tensor:
    return p.float().topk(min(k, p.shape[0]), dim=0).values.mean(0)


def clip_concept_matrix(
    images: Tensor,
    concept_names: Sequence[str],
    *,
    model: str | tuple[nn.Module, Callable, Callable] = "ViT-L-16-SigLIP-384",
    pretrained: str | None = "default",
    calibration: tuple[float, float] | None = None,
    calibration_labels: Tensor | None = None,
    min_top5: float | None = 0.5,
    template: str = "{}",
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> ConceptMatrix:
    """LE(SigLIP) concept matrix ``P = sigmoid(a·(cos + b))`` of the concepts present in the data, and ``(a, b)``.

    Args:
        images: preprocessed images ``(N, C, H, W)`` for the CLIP/SigLIP model.
        concept_names: M concept names (prompted with ``template``).
        model: an open_clip name for :func:`negspace.models.clip.load_clip` (default the paper's explainer
            ``"ViT-L-16-SigLIP-384"``; ``"tiny"`` for tests), or a loaded ``(model, preprocess, tokenizer)``
            triple; ``pretrained`` is passed to ``load_clip`` (``"default"``: the paper's ``webli`` weights from the
            local cache; ``None``: random weights).
        calibration: known ``(a, b)``. Default: the paper's values for its models
            (:data:`negspace.models.clip.PAPER_CALIBRATION`), else fitted here on ``calibration_labels (N, M)``
            (binary labels of the same images and concepts, e.g. classes + superclasses); one of them is required
            for other models.
        min_top5: keep only concepts whose mean over their 5 highest ``P`` is at least this (paper 003 §5, 0.5);
            ``None`` keeps all. Dropped concepts are named in one ``UserWarning``.
        cache_dir: if given, cosines are stored as ``<key>.safetensors`` (+ ``<key>.json`` metadata) keyed by
            model name, pretrained tag, template, concept names and a fingerprint of ``images``, and reused.

    Returns:
        a :class:`ConceptMatrix`: unpacks as ``P (N, M_kept), (a, b)``; ``.names`` are the kept concepts' names
        (the columns of ``P``), ``.kept`` their indices in ``concept_names``.
    """
    from safetensors.torch import load_file, save_file

    from negspace.models.clip import PAPER_CALIBRATION, load_clip

    names = [str(c) for c in concept_names]
    model_name = model if isinstance(model, str) else type(model[0]).__name__
    if calibration is None and calibration_labels is None and model_name not in PAPER_CALIBRATION:
        raise ValueError(
            f"pass calibration=(a, b) or calibration_labels (N, M) to fit it: the paper's calibration is known only "
            f"for {sorted(PAPER_CALIBRATION)}, got model={model_name!r}"
        )
    cos = None
    path = None
    if cache_dir is not None:
        key_src = json.dumps(
            {"model": model_name, "pretrained": pretrained, "template": template, "concepts": names,
             "data": data_fingerprint(images)},
            sort_keys=True,
        )
        key = hashlib.sha1(key_src.encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"clip_cosines_{key}.safetensors"
        if path.exists():
            cos = load_file(str(path))["cosines"]
    if cos is None:
        triple = load_clip(model, pretrained=pretrained, device=device) if isinstance(model, str) else model
        clip_model, _, tokenizer = triple
        cos = clip_cosines(clip_model, tokenizer, images, names, template=template, batch_size=batch_size)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"cosines": cos.contiguous()}, str(path))
            path.with_suffix(".json").write_text(key_src)
    if calibration is None and calibration_labels is not None:
        if calibration_labels.shape != cos.shape:
            raise ValueError(f"calibration_labels must have shape {tuple(cos.shape)}, got {_shape(calibration_labels)}")
        calibration = fit_sigmoid_calibration(cos, calibration_labels)
    elif calibration is None:
        calibration = PAPER_CALIBRATION[model_name]
    a, b = (float(calibration[0]), float(calibration[1]))
    p = torch.sigmoid(a * (cos + b))
    top5 = _top5(p)
    if min_top5 is None:
        return ConceptMatrix(p, (a, b), names, list(range(len(names))), top5)
    p_kept, kept_names, kept = filter_concepts(p, names, min_top5=float(min_top5))
    if not kept:
        raise ValueError(
            f"no concept has a top-5 mean P >= min_top5={min_top5} on these {len(p)} images (max "
            f"{float(top5.max()):.3f}): the concepts are absent from the data, or the model/calibration is wrong "
            "(random weights?); pass min_top5=None to keep them anyway"
        )
    if len(kept) < len(names):
        dropped = [n for i, n in enumerate(names) if i not in set(kept)]
        warnings.warn(
            f"clip_concept_matrix dropped {len(dropped)} of {len(names)} concepts whose top-5 mean P < {min_top5} "
            f"(absent from the data, paper 003 §5): {dropped[:10]}{' ...' if len(dropped) > 10 else ''}; P has "
            "the columns of .names (min_top5=None keeps all)",
            UserWarning,
            stacklevel=2,
        )
    return ConceptMatrix(p_kept, (a, b), kept_names, kept, top5)
