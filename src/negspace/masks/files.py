"""Concept-mask metadata (what :class:`negspace.masks.ConceptMask` saves besides tensors, and its checks) and
files: ``<path>.json`` (metadata) next to ``<path>.safetensors`` (the direction and, optionally, the frozen
reference's weights under ``reference.<name>``). Nothing is pickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from negspace.masks.cav import DIRECTION_METHODS, LOCALIZE, check_target

__all__ = ["FORMAT", "META", "POOLS", "REFERENCES", "VERSION", "check_meta", "concept_paths", "read_concept",
           "write_concept"]

FORMAT = "negspace-concept-mask"
VERSION = 1
REFERENCES = ("frozen", "live")
POOLS = ("max", "mean")
#: metadata keys (primitives) of a concept mask
META = ("layer", "threshold", "localize", "dilate", "reference", "target", "method", "pool")


def check_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Validated metadata ``{key: value for key in META}`` (``threshold`` as float; a missing target →
    ``"top_logit"``); ``ValueError``/``TypeError`` naming the key, the allowed values and the value received."""
    m = {k: meta.get(k) for k in META}
    thr, dil = m["threshold"], m["dilate"]
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, int | float) or thr != thr):
        raise ValueError(f"ConceptMask: threshold must be a number or None, got {thr!r}")
    if dil is not None and (isinstance(dil, bool) or not isinstance(dil, int) or dil < 0):
        raise ValueError(f"ConceptMask: dilate must be a non-negative int (pixels) or None, got {dil!r}")
    for key, allowed in (("localize", LOCALIZE), ("reference", REFERENCES),
                         ("method", (None, *DIRECTION_METHODS, "channels", "codec")), ("pool", (None, *POOLS))):
        if m[key] not in allowed:
            raise ValueError(f"ConceptMask: {key} must be one of {allowed}, got {m[key]!r}")
    if not isinstance(m["layer"], str):
        raise TypeError(f"ConceptMask: layer must be a dotted name, got {m['layer']!r}")
    m["threshold"] = None if thr is None else float(thr)
    m["target"] = check_target("top_logit" if m["target"] is None else m["target"])
    return m


def concept_paths(path: str | Path) -> tuple[Path, Path]:
    """``(json, safetensors)`` paths of ``path`` (a ``.json``/``.safetensors`` suffix is dropped)."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.parent / f"{p.name}.json", p.parent / f"{p.name}.safetensors"


def write_concept(path: str | Path, meta: dict[str, Any], direction: Tensor,
                  reference: dict[str, Tensor] | None = None) -> Path:
    """Write the metadata (primitives), ``direction (C,)`` and optional reference weights; returns the JSON path."""
    from safetensors.torch import save_file

    tensors = {"direction": direction.detach().cpu().contiguous().clone()}
    tensors.update({f"reference.{k}": v.detach().cpu().contiguous().clone() for k, v in (reference or {}).items()})
    js, st = concept_paths(path)
    js.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(st), metadata={"format": "pt", "negspace": FORMAT})
    spec = {"format": FORMAT, "version": VERSION, **meta, "channels": direction.numel(), "weights": bool(reference)}
    js.write_text(json.dumps(spec, indent=1) + "\n")
    return js


def read_concept(path: str | Path) -> tuple[dict[str, Any], Tensor, dict[str, Tensor] | None]:
    """``(metadata, direction, reference weights or None)`` of a file written by :func:`write_concept`."""
    from safetensors.torch import load_file

    js, st = concept_paths(path)
    if not js.is_file() or not st.is_file():
        raise ValueError(f"ConceptMask: file={str(path)!r} needs {js} and {st} (written by ConceptMask.save)")
    spec = json.loads(js.read_text())
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise ValueError(f"{js} is not a negspace concept mask (format {FORMAT!r}, version {VERSION})")
    tensors = load_file(str(st))
    if "direction" not in tensors:
        raise ValueError(f"{st} holds no 'direction' tensor")
    ref = {k[len("reference."):]: v for k, v in tensors.items() if k.startswith("reference.")}
    return spec, tensors["direction"], ref or None
