"""Fine-tuning helpers (plain torch): classification head vs backbone, local weights, warm-up + cosine.

Used by :class:`~negspace.modules.ClassifierModule`; no Lightning here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from negspace.hooks import get_layer

__all__ = [
    "HEAD_NAMES",
    "backbone_modules",
    "find_head",
    "load_weights",
    "read_weights",
    "split_parameters",
    "warmup_cosine_factor",
]

#: attribute names of classification heads tried in order (torchvision/timm conventions; X-models)
HEAD_NAMES: tuple[str, ...] = ("fc", "classifier", "head", "heads")
_PREFIXES: tuple[str, ...] = ("", "model.", "module.", "_orig_mod.", "model.module.")


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def find_head(model: nn.Module, head: str | Sequence[str] | None = None) -> list[str]:
    """Dotted names of the classification head of ``model`` (``[]`` if none is found).

    ``head`` given: those names (checked). Otherwise timm's ``get_classifier()``, then the first of
    :data:`HEAD_NAMES` (``fc``, ``classifier``, ``head``, ``heads``) that holds parameters.
    """
    if head is not None:
        names = [head] if isinstance(head, str) else list(head)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"head must be a dotted module name or a list of them, got {head!r}")
        for n in names:
            get_layer(model, n)  # raises ValueError listing close names
        return names
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            mod = get_classifier()
        except Exception:  # some timm models need arguments or have no classifier
            mod = None
        if isinstance(mod, nn.Module) and _has_params(mod):
            for name, m in model.named_modules():
                if m is mod and name:
                    return [name]
    for attr in HEAD_NAMES:
        mod = getattr(model, attr, None)
        if isinstance(mod, nn.Module) and _has_params(mod):
            return [attr]
    return []


def split_parameters(model: nn.Module, head: Sequence[str]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(head parameters, backbone parameters)``; the backbone is everything outside ``head``."""
    head_ids = {id(p) for n in head for p in get_layer(model, n).parameters()}
    params = list(model.parameters())
    return [p for p in params if id(p) in head_ids], [p for p in params if id(p) not in head_ids]


class _DirectParameters(nn.Module):
    """Holds the *direct* parameters of a non-leaf module (e.g. a ViT's ``cls_token``), shared, not copied."""

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name, p)


def backbone_modules(model: nn.Module, head: Sequence[str]) -> nn.ModuleList:
    """The backbone as a flat ``ModuleList`` of leaf modules outside ``head`` (plus holders of the direct
    parameters of non-leaf modules), the form Lightning's ``BaseFinetuning.freeze``/``make_trainable`` walk.

    The list is not registered on ``model`` (no duplicate state-dict keys); its parameters are ``model``'s own.
    """
    head_mods = {id(m) for n in head for m in get_layer(model, n).modules()}
    out: list[nn.Module] = []
    for mod in model.modules():
        if id(mod) in head_mods:
            continue
        if not list(mod.children()):
            out.append(mod)
        else:
            direct = {k: p for k, p in mod._parameters.items() if p is not None}
            if direct:
                out.append(_DirectParameters(direct))
    return nn.ModuleList(out)


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """State dict of a ``.safetensors`` file or a torch file (``weights_only=True``; a Lightning checkpoint's
    ``state_dict`` is used)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"weights file not found: {str(p)!r}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(p)))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusals (UnpicklingError), truncated or foreign files
        raise ValueError(
            f"cannot load weights {str(p)!r} with torch.load(weights_only=True): {e}. Save a plain state dict "
            "(torch.save(model.state_dict(), path)) or a .safetensors file"
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"weights {str(p)!r} must hold a state dict {{name: tensor}}, got {type(obj).__name__}")
    return dict(obj)


def _strip_prefix(state: dict[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove the key prefix (``model.``, ``module.``, ...) under which most keys match ``expected``."""
    def hits(prefix: str) -> int:
        return sum(k.startswith(prefix) and k[len(prefix):] in expected for k in state)

    best = max(_PREFIXES, key=hits)
    if not best:
        return state
    return {k[len(best):] if k.startswith(best) else k: v for k, v in state.items()}


def _shown(keys: list[str]) -> str:
    return f"{keys[:12]}{f' (+{len(keys) - 12} more)' if len(keys) > 12 else ''}"


def load_weights(model: nn.Module, path: str | Path, *, skip: Sequence[str] = ()) -> None:
    """Load a local checkpoint/safetensors file into ``model``, strictly except for keys under ``skip``.

    Keys may carry a ``model.``/``module.`` prefix (Lightning/DDP). Raises ``ValueError`` listing the missing,
    unexpected and shape-mismatched keys if the file does not fit.
    """
    expected = model.state_dict()
    state = _strip_prefix(read_weights(path), expected)

    def skipped(k: str) -> bool:
        return any(k == s or k.startswith(s + ".") for s in skip)

    missing = [k for k in expected if k not in state and not skipped(k)]
    unexpected = [k for k in state if k not in expected and not skipped(k)]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items() if k in expected and not skipped(k) and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"{name} keys {_shown(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)) if keys]
        hint = f" (skipped: {list(skip)})" if skip else " (weights_head=False skips the classification head)"
        raise ValueError(f"weights {str(path)!r} do not fit {type(model).__name__}: " + "; ".join(parts) + hint)
    model.load_state_dict({k: v for k, v in state.items() if not skipped(k)}, strict=False)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, cosine: bool, min_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step ``step``: linear warm-up ``(step + 1) / warmup_steps`` for the first
    ``warmup_steps``, then constant 1 or a cosine from 1 to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
