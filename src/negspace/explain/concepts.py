"""Neuron activation summaries and concept activation matrices ``P (N, M)`` for Linear Explanations (paper 003).

* :func:`activation_summary` — ``g(A_k(x))`` for every neuron of a layer over a dataset: ``"mean"`` (paper
  default for CNN channels), ``"max"``, ``"cls"`` (token 0 of a transformer layer), batched, without gradients.
* :func:`label_concepts` — LE(Label): one-hot class labels plus superclasses from a user mapping;
  :data:`BUILTIN_CONCEPT_SETS` and :func:`builtin_concepts` for the bundled datasets.
* :func:`clip_cosines`, :func:`fit_sigmoid_calibration`, :func:`clip_concept_matrix` — LE(SigLIP):
  ``P = sigmoid(a·(cos + b))`` with ``(a, b)`` fitted by binary cross-entropy on labelled concepts (eq. 5);
  cosines are cached as safetensors keyed by model name, concept names and a fingerprint of the data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.batch import unpack_batch
from negspace.hooks import capture, run_until

__all__ = [
    "BUILTIN_CONCEPT_SETS",
    "activation_summary",
    "builtin_concepts",
    "clip_concept_matrix",
    "clip_cosines",
    "fit_sigmoid_calibration",
    "label_concepts",
    "split_batch",
    "summarize",
]

REDUCES = ("mean", "max", "cls")


def summarize(out: Tensor, reduce: str = "mean") -> Tensor:
    """Per-neuron summary ``(B, D)`` of a layer output.

    ``(B, D)`` → itself; ``(B, C, H, W)`` / ``(B, C, L)``-like conv maps → mean or max over space
    (``"cls"`` not allowed); ``(B, T, D)`` token layers are treated as transformers (neurons on the last axis):
    mean or max over tokens, or the CLS token (``"cls"``, token 0). Note: 3-D outputs are always read as
    ``(B, T, D)``; for 1-D convolutions pass a 4-D-producing layer or summarise yourself.
    """
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    if out.ndim == 2:
        return out
    if out.ndim == 3:
        if reduce == "cls":
            return out[:, 0]
        return out.mean(1) if reduce == "mean" else out.amax(1)
    if out.ndim >= 4:
        if reduce == "cls":
            raise ValueError(f"reduce='cls' needs a token layer (B, T, D), got an output of shape {tuple(out.shape)}")
        flat = out.flatten(2)
        return flat.mean(2) if reduce == "mean" else flat.amax(2)
    raise ValueError(f"cannot summarise a layer output of shape {tuple(out.shape)}")


def split_batch(batch: Any, batch_keys: Any = None) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """``(x, y, extras)`` of a batch by the layout rules of :mod:`negspace.batch`; ``extras`` holds the
    batch's ``mask``/``group`` and, for dict batches, every other key (e.g. ``"concepts"``)."""
    b = unpack_batch(batch, batch_keys, who="LE")
    extras: dict[str, Any] = {k: v for k, v in (("mask", b.mask), ("group", b.group)) if v is not None}
    if isinstance(batch, Mapping):
        used = {id(b.image), id(b.label)}
        extras.update({k: v for k, v in batch.items() if id(v) not in used and k not in extras})
    return b.image, b.label, extras


@torch.no_grad()
def activation_summary(
    model: nn.Module,
    layer: str,
    data: Tensor | Iterable[Any],
    *,
    reduce: str = "mean",
    batch_size: int = 128,
    device: str | torch.device | None = None,
    batch_keys: Sequence[str] | None = None,
    progress: bool = False,
) -> Tensor:
    """Neuron summaries ``q (N, D)`` of ``layer`` over ``data`` (a tensor ``(N, ...)`` or an iterable of batches).

    Runs the model in eval mode (restored afterwards) and stops the forward pass at ``layer``.
    """
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    batches = data.split(batch_size) if isinstance(data, Tensor) else data
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    try:
        with capture(model, layer, detach=True, stop_after=True) as cap:
            for batch in tqdm(batches, desc=f"activations {layer}", disable=not progress, leave=False):
                x, _, _ = split_batch(batch, batch_keys)
                run_until(model, x.to(device))
                out.append(summarize(cap.activations[layer], reduce).float().cpu())
    finally:
        model.train(was_training)
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


def builtin_concepts(name: str, data: Iterable[Any], *, batch_keys: Sequence[str] | None = None) -> tuple[Tensor, list[str]]:
    """Concept matrix of a built-in concept set (:data:`BUILTIN_CONCEPT_SETS`) from batches of ``data``.

    Labels come from the batches (``"label"`` / second tuple item); for ``"lesions"`` a ``"patch present"``
    concept is 1 where the batch's ``"mask"`` is non-empty. Iterate ``data`` in the same order as the activations.
    """
    if name not in BUILTIN_CONCEPT_SETS:
        raise ValueError(f"unknown concept set {name!r}; built-in sets: {sorted(BUILTIN_CONCEPT_SETS)}")
    spec = BUILTIN_CONCEPT_SETS[name]
    labels, masks = [], []
    for batch in data:
        _, y, extras = split_batch(batch, batch_keys)
        if y is None:
            raise ValueError(f"concept set {name!r} needs labels, but a batch has none")
        labels.append(torch.as_tensor(y).long().flatten().cpu())
        if spec.get("mask_concept"):
            m = extras.get("mask")
            if m is None:
                raise ValueError(f"concept set {name!r} needs a 'mask' in every batch (for {spec['mask_concept']!r})")
            masks.append((m.flatten(1) > 0).any(1).float().cpu())
    p, names = label_concepts(torch.cat(labels), spec["class_names"], spec["superclasses"])
    if spec.get("mask_concept"):
        p = torch.cat([p, torch.cat(masks)[:, None]], 1)
        names.append(spec["mask_concept"])
    return p, names


# ------------------------------------------------------------------------------------------ CLIP / SigLIP
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


def clip_concept_matrix(
    images: Tensor,
    concept_names: Sequence[str],
    *,
    model: str | tuple[nn.Module, Callable, Callable] = "ViT-B-32",
    pretrained: str | None = None,
    calibration: tuple[float, float] | None = None,
    calibration_labels: Tensor | None = None,
    template: str = "{}",
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, tuple[float, float]]:
    """LE(SigLIP) concept matrix ``P = sigmoid(a·(cos + b))``, shape ``(N, M)``, and the ``(a, b)`` used.

    Args:
        images: preprocessed images ``(N, C, H, W)`` for the CLIP/SigLIP model.
        concept_names: M concept names (prompted with ``template``).
        model: an open_clip name for :func:`negspace.models.clip.load_clip` (``"tiny"`` for tests), or a loaded
            ``(model, preprocess, tokenizer)`` triple; ``pretrained`` is passed to ``load_clip``.
        calibration: known ``(a, b)``; otherwise fitted here on ``calibration_labels (N, M)`` (binary labels of
            the same images and concepts, e.g. classes + superclasses). One of the two is required.
        cache_dir: if given, cosines are stored as ``<key>.safetensors`` (+ ``<key>.json`` metadata) keyed by
            model name, pretrained tag, template, concept names and a fingerprint of ``images``, and reused.
    """
    from safetensors.torch import load_file, save_file

    from negspace.models.clip import load_clip

    if calibration is None and calibration_labels is None:
        raise ValueError("pass calibration=(a, b) or calibration_labels (N, M) to fit it")
    names = [str(c) for c in concept_names]
    model_name = model if isinstance(model, str) else type(model[0]).__name__
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
    if calibration is None:
        if calibration_labels.shape != cos.shape:
            raise ValueError(f"calibration_labels must have shape {tuple(cos.shape)}, got {_shape(calibration_labels)}")
        calibration = fit_sigmoid_calibration(cos, calibration_labels)
    a, b = (float(calibration[0]), float(calibration[1]))
    return torch.sigmoid(a * (cos + b)), (a, b)
