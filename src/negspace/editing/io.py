"""Save an edit next to the model weights and re-apply it: a JSON spec (kind, layers, mode, values, ...) plus a
safetensors file with every tensor (channels, per-channel values, centroids, scales). Nothing is pickled.

``save_edit(edit, "run/edit")`` writes ``run/edit.json`` and ``run/edit.safetensors``; ``load_edit`` rebuilds the
edit object and ``load_edited(model, path)`` checks that it fits ``model`` and applies it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from negspace.editing.baking import edit_channels
from negspace.editing.probe import Example
from negspace.hooks import PersistentEdit, get_layer

__all__ = ["FORMAT", "check_edit", "load_edit", "load_edited", "save_edit"]

FORMAT = "negspace-edit"
VERSION = 1
_KINDS = {
    "ChannelEdit": "negspace.editing.channels",
    "VirtualNeuronRouter": "negspace.editing.router",
}


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.parent / f"{p.name}.json", p.parent / f"{p.name}.safetensors"


def _flatten(obj: object, key: str, tensors: dict[str, Tensor]) -> object:
    if isinstance(obj, Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        return {str(k): _flatten(v, f"{key}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TypeError(f"edit state holds a {type(obj).__name__} at {key!r}; only tensors and primitives can be saved")


def _unflatten(obj: object, tensors: Mapping[str, Tensor]) -> object:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            if obj["__tensor__"] not in tensors:
                raise ValueError(f"edit spec refers to tensor {obj['__tensor__']!r}, missing from the safetensors file")
            return tensors[obj["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_edit(edit: PersistentEdit, path: str | Path) -> Path:
    """Write ``edit`` as ``<path>.json`` + ``<path>.safetensors`` (a ``.json``/``.safetensors`` suffix is dropped).

    Returns the JSON path. The JSON holds the kind, the layers and the non-tensor state; tensors go to safetensors.
    """
    from safetensors.torch import save_file

    kind = type(edit).__name__
    if kind not in _KINDS:
        raise TypeError(f"edit must be one of {sorted(_KINDS)}, got {kind}")
    tensors: dict[str, Tensor] = {}
    state = _flatten(edit.state_dict(), "state", tensors)
    spec = {"format": FORMAT, "version": VERSION, "kind": kind, "layers": list(edit.layers), "state": state}
    js, st = _paths(path)
    js.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(st), metadata={"format": "pt", "negspace": FORMAT})
    js.write_text(json.dumps(spec, indent=1) + "\n")
    return js


def load_edit(path: str | Path) -> PersistentEdit:
    """Rebuild the edit written by :func:`save_edit` (not applied to any model)."""
    from safetensors.torch import load_file

    js, st = _paths(path)
    spec = json.loads(js.read_text())
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{js} is not a negspace edit spec (format {FORMAT!r})")
    if spec.get("version") != VERSION:
        raise ValueError(f"{js} has edit spec version {spec.get('version')!r}; this negspace reads version {VERSION}")
    kind = spec.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{js}: kind must be one of {sorted(_KINDS)}, got {kind!r}")
    state: Any = _unflatten(spec["state"], load_file(str(st)))
    cls = getattr(importlib.import_module(_KINDS[kind]), kind)
    return cls.from_state_dict(state)


def _in_channels(module: nn.Module) -> int | None:
    for attr in ("in_channels", "in_features"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    return None


def check_edit(model: nn.Module, edit: PersistentEdit, example: Example | None = None) -> None:
    """Raise ``ValueError`` if ``edit`` does not fit ``model``: a missing layer, a channel out of range, or a
    tensor whose shape does not match the layer (per-channel values, router centroids). Channel counts that only a
    forward shows (block outputs) are checked when ``example`` is given."""
    for name in edit.layers:
        get_layer(model, name)
    kind = type(edit).__name__
    if kind == "ChannelEdit":
        edit_channels(model, edit, example)  # range and value-shape checks
    elif kind == "VirtualNeuronRouter":
        vn = edit.vn  # type: ignore[attr-defined]
        get_layer(model, vn.circuit_layer)
        module = get_layer(model, vn.layer)
        c_in, c_out = _in_channels(module), getattr(module, "out_channels", getattr(module, "out_features", None))
        for k in edit.scales:  # type: ignore[attr-defined]
            cent = vn.centroids_of(k)
            if c_out is not None and not 0 <= k < c_out:
                raise ValueError(f"neuron {k} out of range for layer {vn.layer!r} with {c_out} channels")
            if c_in is not None and cent.shape[-1] != c_in:
                raise ValueError(
                    f"centroids of neuron {k} have shape {tuple(cent.shape)}; layer {vn.layer!r} reads {c_in} channels"
                )


def load_edited(model: nn.Module, path: str | Path, *, example: Example | None = None) -> PersistentEdit:
    """Load the edit saved at ``path``, check it fits ``model`` (see :func:`check_edit`) and apply it.

    Returns the applied edit (``.remove()`` undoes it; :func:`negspace.editing.baking.bake` makes it permanent). A
    router on a block output has no hook form: use ``bake(model, load_edit(path))``.
    """
    edit = load_edit(path)
    try:
        check_edit(model, edit, example)
    except ValueError as e:
        raise ValueError(f"edit {_paths(path)[0]} does not fit {type(model).__name__}: {e}") from e
    return edit.apply(model)

