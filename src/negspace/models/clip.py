"""open_clip models (CLIP / SigLIP) as concept simulators: loading and L2-normalised embeddings.

``load_clip("ViT-B-32")`` builds the open_clip architecture; real pretrained weights are only loaded when
``pretrained=`` names a tag (e.g. ``"openai"``, ``"webli"``) or a local checkpoint, so that tests and offline
machines work with random initialisation. ``load_clip("tiny")`` registers and builds a tiny randomly
initialised CLIP (2 layers, width 32, 32×32 images) for tests.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.batch import images_of
from negspace.hooks import model_device

__all__ = ["TINY_CLIP_NAME", "encode_images", "encode_texts", "load_clip", "tiny_clip_config"]

TINY_CLIP_NAME = "negspace-tiny-clip"


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


def load_clip(
    name: str = "ViT-B-32",
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> tuple[nn.Module, Callable, Callable]:
    """Build an open_clip model and return ``(model, preprocess, tokenizer)``; the model is in eval mode.

    Args:
        name: an open_clip architecture (``open_clip.list_models()``, e.g. ``"ViT-B-32"``,
            ``"ViT-SO400M-14-SigLIP-384"``), ``"hf-hub:org/repo"``, or ``"tiny"`` for a tiny random CLIP.
        pretrained: ``None`` (default) = random initialisation, no download; otherwise an open_clip pretrained
            tag (``open_clip.list_pretrained_tags_by_model(name)``) or a path to a local checkpoint.
        device: where to put the model.
        kwargs: forwarded to ``open_clip.create_model_and_transforms``.
    """
    import open_clip

    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be an open_clip model name or 'tiny', got {name!r}")
    if pretrained is not None and not isinstance(pretrained, str):
        raise TypeError(f"pretrained must be None or a pretrained tag/path string, got {pretrained!r}")
    arch = _register_tiny() if name == "tiny" else name
    if name == "tiny" and pretrained is not None:
        raise ValueError(f"the 'tiny' CLIP has no pretrained weights; use pretrained=None, got {pretrained!r}")
    if not arch.startswith(("hf-hub:", "local-dir:")) and arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        raise ValueError(f"unknown open_clip model name {name!r}; closest: {close} (or 'tiny')")
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=pretrained, device=device, **kwargs
    )
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    return model, preprocess, tokenizer


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
