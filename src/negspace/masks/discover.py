"""Artifact discovery (issue 16, Reveal2Revise step 1): rank candidate artifacts of a trained model so that a
user picks one from figures, then turns it into a :class:`negspace.masks.ConceptMask` for the attribution prior.

    cands = discover_artifacts(model, loader, "features.8", num_classes=2)   # best first
    save_candidates(cands, images, "discover/")                               # one figure each + candidates.json
    mask = cands[0].to_concept_mask(model, loader)                            # reference vs clean images

Methods (one module each in :mod:`negspace.masks.discovery`): ``"channels"`` (channels whose most activating
patches are nearly identical), ``"codec"`` (CODEC modes of a class with a localised, consistent contribution
region), ``"spray"`` (SpRAy clusters of attribution maps).

**Scores** are comparable across methods, all in [0, 1] and built from the same two factors
(:mod:`negspace.masks.discovery.common`): ``L`` how localised the candidate's maps are (Gini coefficient) times
``S`` how alike the patches that carry it are in the layer's feature space (mean pairwise cosine of standardised
features); ``"channels"`` also multiplies by the channel's relevance for the prediction and ``"spray"`` by a
cluster-size factor. The list is sorted by score (best first), at most ``per_method`` candidates per method.

``data`` must yield the same images in the same order every time it is read (a tensor, a list of batches or an
unshuffled loader): candidates refer to images by their position in it.

Measured on ``SyntheticLesionDataModule`` (32 px, every benign training image carries the sticker) with an
``XSmallCNN(width=16)`` trained 24 epochs, layer ``features.8``, the first 512 training images, 3 training seeds:
each method's best candidate is the sticker (all its reference images carry it, none of its clean images do), the
overall first is a CODEC or channels candidate, the concept masks fitted from the methods' best candidates reach
IoU 0.59–0.72 with the true masks on validation images and mask nothing on sticker-free ones; 5–9 s on one CPU
thread for all three methods (``benchmarks/discover.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from negspace.hooks import eval_mode, get_layer, model_device
from negspace.masks.discovery.candidate import Candidate, save_candidates, select_images
from negspace.masks.discovery.channels import channel_candidates
from negspace.masks.discovery.codec import codec_candidates
from negspace.masks.discovery.common import Inputs, feature_baseline, read_data
from negspace.masks.discovery.spray import spray_candidates

__all__ = ["METHODS", "Candidate", "discover_artifacts", "save_candidates", "select_images"]

METHODS = ("channels", "codec", "spray")
_NEEDS_LABELS = ("codec", "spray")


def _pos_int(value: object, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def discover_artifacts(
    model: nn.Module,
    data: Tensor | Iterable,
    layer: str,
    *,
    methods: Sequence[str] = METHODS,
    num_classes: int | None = None,
    batch_keys: object = None,
    k: int = 8,
    max_images: int | None = 512,
    seed: int = 0,
    progress: bool = True,
    per_method: int = 5,
    n_examples: int = 64,
    patch_size: int | None = None,
    chunk_size: int = 128,
) -> list[Candidate]:
    """Candidate artifacts of ``model`` at ``layer`` on the first ``max_images`` images of ``data``, best first.

    Args:
        data: images ``(N, C, H, W)`` or an iterable of batches (layout ``batch_keys``), read in order; ``"codec"``
            and ``"spray"`` need labels.
        layer: dotted name of a convolutional layer (or a square token grid).
        methods: any of ``"channels"``, ``"codec"``, ``"spray"`` (see the module doc).
        num_classes: default: the model's number of logits.
        k: images (and patches) shown and scored per candidate, 2 ≤ ``k`` ≤ N.
        per_method: candidates kept per method; n_examples: at most this many reference and clean images each.
        patch_size: side of the patches searched and compared (default ``max(3, min(H, W) // 4)``).
        chunk_size: images per forward/backward pass.

    Returns:
        :class:`Candidate` s sorted by ``score`` (descending).
    """
    names = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods!r}")
    get_layer(model, layer)
    _pos_int(k, "k", 2)
    _pos_int(per_method, "per_method")
    _pos_int(chunk_size, "chunk_size")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    x, labels = read_data(data, batch_keys, max_images, "discover_artifacts")
    n, (h, w) = x.shape[0], x.shape[-2:]
    if k > n:
        raise ValueError(f"k={k} exceeds the number of images ({n}); lower k or pass more images")
    _pos_int(n_examples, "n_examples", k)
    needs = [m for m in names if m in _NEEDS_LABELS]
    if needs and labels is None:
        raise ValueError(f"methods {needs} need labelled data (batches (image, label) or dicts with 'label'; "
                         f"batch_keys={{'label': ...}}); pass methods=('channels',) for unlabelled images")
    patch = max(3, min(h, w) // 4) if patch_size is None else _pos_int(patch_size, "patch_size")
    if patch > min(h, w):
        raise ValueError(f"patch_size={patch} is larger than the images ({h}, {w})")
    with eval_mode(model):
        with torch.no_grad():
            out = model(x[:1].to(model_device(model)))
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise TypeError(f"the model must return logits (B, num_classes), got {getattr(out, 'shape', type(out))}")
        n_logits = out.shape[1]
        num_classes = n_logits if num_classes is None else _pos_int(num_classes, "num_classes", 2)
        if num_classes > n_logits:
            raise ValueError(f"num_classes={num_classes} but the model returns {n_logits} logits")
        if labels is not None and int(labels.max()) >= num_classes:
            raise ValueError(f"labels contain class {int(labels.max())} but num_classes={num_classes}")
        mu, sd = feature_baseline(model, layer, x, patch, chunk_size, seed)
        inp = Inputs(x=x, labels=labels, layer=layer, patch=patch, mu=mu, sd=sd, k=k, n_examples=n_examples,
                     chunk=chunk_size, seed=seed, progress=progress)
        found: list[Candidate] = []
        for m in names:
            if m == "channels":
                found += channel_candidates(model, inp, per_method=per_method)
            elif m == "codec":
                found += codec_candidates(model, inp, per_method=per_method, num_classes=num_classes)
            else:
                found += spray_candidates(model, inp, per_method=per_method)
    return sorted(found, key=lambda c: -c.score)
