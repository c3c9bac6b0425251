"""open_clip models (CLIP / SigLIP) as concept explainers and simulators: loading, preprocessing and
L2-normalised embeddings.

``load_clip()`` loads the paper-003 explainer, SigLIP ``ViT-L-16-SigLIP-384`` with its ``webli`` weights, from the
local cache (no download unless ``download=True``) and raises a ``ValueError`` that names the fix when the weights
are not there. Random weights need an explicit ``pretrained=None``. ``load_clip("tiny")`` builds a tiny randomly
initialised CLIP (2 layers, width 32, 32×32 images) for tests. :data:`PAPER_EXPLAINER`, :data:`PAPER_SIMULATOR`
and :data:`PAPER_CALIBRATION` hold paper 003's models and their sigmoid calibrations ``(a, b)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.batch import images_of
from negspace.hooks import model_device

__all__ = [
    "DEFAULT_TAG",
    "PAPER_CALIBRATION",
    "PAPER_EXPLAINER",
    "PAPER_SIMULATOR",
    "TINY_CLIP_NAME",
    "clip_preprocess",
    "default_tag",
    "encode_images",
    "encode_texts",
    "load_clip",
    "local_weights",
    "tiny_clip_config",
]

TINY_CLIP_NAME = "negspace-tiny-clip"
#: ``pretrained`` value meaning "the paper's / the model's usual published weights" (see :func:`default_tag`)
DEFAULT_TAG = "default"
#: paper 003 §3.1: the explainer of LE(SigLIP)
PAPER_EXPLAINER = ("ViT-L-16-SigLIP-384", "webli")
#: paper 003 §4: the simulator, a different SigLIP model than the explainer
PAPER_SIMULATOR = ("ViT-SO400M-14-SigLIP-384", "webli")
#: ``(a, b)`` of ``P = σ(a·cos + a·b)`` fitted on ImageNet val + WordNet superclasses (eq. 5 / eq. 8), as
#: published with the paper's reference code; model specific, independent of the probing data and concepts
PAPER_CALIBRATION: dict[str, tuple[float, float]] = {
    "ViT-L-16-SigLIP-384": (60.0, -0.09),
    "ViT-SO400M-14-SigLIP-384": (58.0, -0.13),
    "ViT-L-14-336": (58.0, -0.25),
}
_PAPER_TAGS = {PAPER_EXPLAINER[0]: PAPER_EXPLAINER[1], PAPER_SIMULATOR[0]: PAPER_SIMULATOR[1], "ViT-L-14-336": "openai"}


def tiny_clip_config(image_size: int = 32, width: int = 32, layers: int = 2, embed_dim: int = 32) -> dict[str, Any]:
    """open_clip model config of a tiny ViT CLIP (random init; tests and examples only)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": 2, "layers": layers},
    }


def _register_tiny() -> str:
    """Register :func:`tiny_clip_config` with open_clip under :data:`TINY_CLIP_NAME` (idempotent)."""
    import open_clip

    if TINY_CLIP_NAME in open_clip.list_models():
        return TINY_CLIP_NAME
    # open_clip's public registry only takes config files, so write the config to a private temp dir.
    folder = Path(tempfile.mkdtemp(prefix="negspace_clip_"))
    path = folder / f"{TINY_CLIP_NAME}.json"
    path.write_text(json.dumps(tiny_clip_config()))
    open_clip.add_model_config(path)
    return TINY_CLIP_NAME


def default_tag(name: str) -> str:
    """The pretrained tag ``pretrained="default"`` stands for: the paper's tag for paper 003's models
    (``"webli"`` for the SigLIPs), else the first tag open_clip lists for ``name``."""
    import open_clip

    if name in _PAPER_TAGS:
        return _PAPER_TAGS[name]
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tags:
        raise ValueError(
            f"open_clip knows no pretrained weights for {name!r}; pass pretrained='<local checkpoint path>', or "
            "pretrained=None for random weights (tests only)"
        )
    return tags[0]


def local_weights(name: str, tag: str, cache_dir: str | None = None) -> str | None:
    """Path of the locally cached weights of open_clip model ``name`` with pretrained ``tag`` (Hugging Face hub
    cache or open_clip's URL cache), or ``None`` when they are not on this machine."""
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, get_pretrained_cfg

    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        return None
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for fn in names:
            found = try_to_load_from_cache(repo, fn, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url", "")
    if url:
        path = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Keep the Hugging Face hub from trying the network while open_clip resolves a cached file."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - open_clip requires it
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def load_clip(
    name: str = PAPER_EXPLAINER[0],
    pretrained: str | None = DEFAULT_TAG,
    device: str | torch.device = "cpu",
    *,
    download: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, Callable, Callable]:
    """Build an open_clip model and return ``(model, preprocess, tokenizer)``; the model is in eval mode.

    Args:
        name: an open_clip architecture (``open_clip.list_models()``; default the paper-003 explainer
            ``"ViT-L-16-SigLIP-384"``; the simulator is ``"ViT-SO400M-14-SigLIP-384"``), ``"hf-hub:org/repo"``,
            or ``"tiny"`` for a tiny random CLIP (tests).
        pretrained: ``"default"`` = the paper's tag for paper 003's models, else the first tag open_clip lists
            (:func:`default_tag`); an open_clip tag (``open_clip.list_pretrained_tags_by_model(name)``); a path to
            a local checkpoint; or ``None`` = random weights (never what an analysis wants; tests only).
            ``"tiny"`` has random weights with ``"default"`` and ``None`` alike (or a local checkpoint path).
        device: where to put the model.
        download: allow open_clip to download missing weights. Default ``False``: weights must be in the local
            cache, else a ``ValueError`` says how to get them.
        kwargs: forwarded to ``open_clip.create_model_and_transforms`` (e.g. ``cache_dir``).
    """
    import open_clip

    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be an open_clip model name or 'tiny', got {name!r}")
    if pretrained is not None and not isinstance(pretrained, str):
        raise TypeError(f"pretrained must be 'default', an open_clip tag, a checkpoint path or None, got {pretrained!r}")
    arch = _register_tiny() if name == "tiny" else name
    is_path = pretrained is not None and os.path.isfile(pretrained)
    if name == "tiny":
        if pretrained not in (None, DEFAULT_TAG) and not is_path:
            raise ValueError(
                f"the 'tiny' CLIP has no published weights; use pretrained=None or a checkpoint path, got {pretrained!r}"
            )
        pretrained = pretrained if is_path else None
    elif not arch.startswith(("hf-hub:", "local-dir:")) and arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        raise ValueError(f"unknown open_clip model name {name!r}; closest: {close} (or 'tiny')")
    offline = contextlib.nullcontext()
    if pretrained is not None and not is_path and not arch.startswith(("hf-hub:", "local-dir:")):
        tag = default_tag(arch) if pretrained == DEFAULT_TAG else pretrained
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags:
            raise ValueError(
                f"pretrained must be 'default', one of {tags} for {name!r}, a local checkpoint path or None, "
                f"got {pretrained!r}"
            )
        pretrained = tag
        if not download:
            if local_weights(arch, tag, kwargs.get("cache_dir")) is None:
                raise ValueError(
                    f"the weights of open_clip model {name!r} (pretrained={tag!r}) are not available locally. Download "
                    f"them once (load_clip({name!r}, {tag!r}, download=True) on a machine with network, or "
                    "huggingface-cli download), pass pretrained='<path to checkpoint>', or pass pretrained=None for "
                    "random weights (tests only)"
                )
            offline = _offline()
    with offline:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device,
                                                                     **kwargs)
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    return model, preprocess, tokenizer


def clip_preprocess(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """Tensor preprocessing of an open_clip model: images ``(N, 3, H, W)`` in ``[0, 1]`` are resized (bicubic) to
    the model's image size and normalised with its mean/std (``model.visual.preprocess_cfg``). A model without
    such a config (a custom encoder) gets the images as they are."""
    visual = getattr(model, "visual", None)
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(visual, "image_size", None))
    mean, std = cfg.get("mean"), cfg.get("std")

    def prep(x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) in [0, 1], got {tuple(x.shape)}")
        if mean is not None and x.shape[1] != len(mean):
            raise ValueError(f"images must be RGB (N, {len(mean)}, H, W) in [0, 1] for this CLIP model, got {tuple(x.shape)}")
        if size is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            if tuple(x.shape[-2:]) != hw:
                x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        if mean is not None and std is not None:
            x = (x - torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(
                1, -1, 1, 1)
        return x

    return prep


@torch.no_grad()
def encode_images(
    model: nn.Module,
    images: Tensor | Iterable[Any],
    batch_size: int = 64,
    *,
    progress: bool = False,
) -> Tensor:
    """L2-normalised image embeddings ``(N, E)``.

    Args:
        model: an open_clip model (anything with ``encode_image``).
        images: preprocessed images ``(N, C, H, W)`` (encoded in chunks of ``batch_size``), or an iterable of
            batches (e.g. a DataLoader yielding tensors, ``{"image": ...}`` dicts or ``(image, label)`` tuples).
    """
    if not hasattr(model, "encode_image"):
        raise TypeError(f"model must be an open_clip model with encode_image, got {type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = model_device(model)
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        batches: Iterable[Any] = images.split(batch_size)
    else:
        batches = images
    out = []
    for batch in tqdm(batches, desc="encode images", disable=not progress, leave=False):
        x = images_of(batch, who="encode_images").to(device)
        out.append(model.encode_image(x, normalize=True).float().cpu())
    if not out:
        raise ValueError("images is empty")
    return torch.cat(out)


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    tokenizer: Callable,
    texts: Sequence[str],
    batch_size: int = 256,
    *,
    template: str = "{}",
) -> Tensor:
    """L2-normalised text embeddings ``(T, E)`` of ``template.format(text)`` for every text."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or len(texts) == 0:
        raise TypeError(f"texts must be a non-empty sequence of strings, got {texts!r}")
    device = model_device(model)
    out = []
    prompts = [template.format(t) for t in texts]
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i : i + batch_size]).to(device)
        out.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(out)
