"""Batch layouts: the one place that knows where image, label, mask and group live in a batch.

negspace's own data modules yield dicts ``{"image", "label", "mask", "group"}`` (albumentations naming);
many projects yield tuples ``(image, label[, mask[, group]])``. Everything else is described by
``batch_keys``, which every callback and dataset-level function accepts:

* ``None`` — the defaults above;
* a mapping ``{role: key_or_index}``, e.g. ``{"image": "x", "mask": "seg"}`` or ``{"mask": 3}``;
* a sequence of keys/indices in role order ``(image, label, mask, group)``, e.g. ``("x", "y")``;
* a callable ``batch -> (image, label, mask, group)`` (shorter tuples allowed) or ``-> dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ROLES", "Batch", "BatchKeys", "collect_images", "images_of", "iter_batches", "iter_images", "unpack_batch"]

#: data accepted by dataset-level functions: a tensor of images ``(N, ...)`` or an iterable of batches
Data = Tensor | Iterable[Any]

ROLES = ("image", "label", "mask", "group")
_POSITIONS = {role: i for i, role in enumerate(ROLES)}


@dataclass
class Batch:
    """The parts of a batch; roles the batch does not carry are ``None``."""

    image: Tensor
    label: Tensor | None = None
    mask: Tensor | None = None
    group: Tensor | None = None


class BatchKeys:
    """Parsed ``batch_keys`` (see the module docstring). ``unpack(batch)`` returns a :class:`Batch`."""

    def __init__(self, batch_keys: object = None) -> None:
        self.spec = batch_keys
        self.fn: Callable[[Any], Any] | None = None
        self.keys: dict[str, str | int] = {}
        if batch_keys is None:
            return
        if isinstance(batch_keys, BatchKeys):
            self.fn, self.keys = batch_keys.fn, dict(batch_keys.keys)
        elif isinstance(batch_keys, Mapping):
            bad = sorted(set(map(str, batch_keys)) - set(ROLES))
            if bad:
                raise ValueError(f"batch_keys may only name the roles {ROLES}, got unknown roles {bad}")
            self.keys = dict(batch_keys)
        elif isinstance(batch_keys, Sequence) and not isinstance(batch_keys, str) and 1 <= len(batch_keys) <= 4:
            self.keys = dict(zip(ROLES, batch_keys))
        elif callable(batch_keys):
            self.fn = batch_keys
        else:
            raise TypeError(
                "batch_keys must be None, a mapping {role: key}, a sequence of keys in the order "
                f"{ROLES}, or a callable batch -> (image, label, mask, group); got {batch_keys!r}"
            )

    def __repr__(self) -> str:
        return f"BatchKeys({self.spec!r})"

    def unpack(self, batch: Any, *, require: Sequence[str] = ("image",), who: str = "negspace") -> Batch:
        """Split ``batch`` into its roles; raise a clear error if a role in ``require`` is missing."""
        parts = self._parts(self.fn(batch) if self.fn is not None else batch, who)
        for role in require:
            if parts.get(role) is None:
                raise ValueError(self._missing(role, batch, who))
        image = parts.get("image")
        if not isinstance(image, Tensor):
            raise TypeError(f"{who}: the batch image must be a Tensor, got {type(image).__name__}")
        return Batch(image, parts.get("label"), parts.get("mask"), parts.get("group"))

    def _parts(self, batch: Any, who: str) -> dict[str, Any]:
        if isinstance(batch, Batch):
            return {r: getattr(batch, r) for r in ROLES}
        if isinstance(batch, Tensor):
            return {"image": batch}
        if isinstance(batch, Mapping):
            return {r: batch.get(self.keys.get(r, r)) for r in ROLES}
        if isinstance(batch, Sequence) and not isinstance(batch, str):
            out = {}
            for r in ROLES:
                k = self.keys.get(r, _POSITIONS[r])
                if isinstance(k, int) and -len(batch) <= k < len(batch):
                    out[r] = batch[k]
                elif not isinstance(k, int):
                    raise ValueError(f"{who}: batch_keys gives {r} as key {k!r}, but the batch is a {type(batch).__name__}")
            return out
        raise TypeError(
            f"{who}: a batch must be a Tensor, a dict, or a tuple (image, label[, mask[, group]]) "
            f"(or pass a callable batch_keys); got {type(batch).__name__}"
        )

    def _missing(self, role: str, batch: Any, who: str) -> str:
        if isinstance(batch, Mapping):
            key = self.keys.get(role, role)
            where = f"no {role} under key {key!r} (batch keys: {sorted(map(str, batch))})"
        elif isinstance(batch, Sequence) and not isinstance(batch, str | Tensor):
            where = f"no {role} at position {self.keys.get(role, _POSITIONS[role])!r} of a {len(batch)}-element batch"
        else:
            where = f"no {role} (got a {type(batch).__name__})"
        return f"{who}: the batch has {where}; pass batch_keys={{{role!r}: <key or index>}}"


def unpack_batch(
    batch: Any, batch_keys: object = None, *, require: Sequence[str] = ("image",), who: str = "negspace"
) -> Batch:
    """One-off form of :meth:`BatchKeys.unpack`."""
    keys = batch_keys if isinstance(batch_keys, BatchKeys) else BatchKeys(batch_keys)
    return keys.unpack(batch, require=require, who=who)


def images_of(batch: Any, batch_keys: object = None, *, who: str = "negspace") -> Tensor:
    """The image tensor of one batch, by the layout rules above."""
    return unpack_batch(batch, batch_keys, who=who).image


def iter_batches(
    data: Data, batch_keys: object = None, *, batch_size: int = 64, require: Sequence[str] = ("image",),
    who: str = "negspace",
) -> Iterator[Batch]:
    """Yield :class:`Batch` objects from a tensor of images ``(N, ...)`` (split into ``batch_size`` chunks)
    or from an iterable of batches (a ``DataLoader``, a list of dicts/tuples)."""
    keys = batch_keys if isinstance(batch_keys, BatchKeys) else BatchKeys(batch_keys)
    if isinstance(data, Tensor):
        if data.dim() < 2 or data.shape[0] == 0:
            raise ValueError(f"{who}: data must be a non-empty batch (N, ...), got shape {tuple(data.shape)}")
        if [r for r in require if r != "image"]:
            raise ValueError(f"{who}: a bare image tensor carries no {[r for r in require if r != 'image']}; pass batches")
        for chunk in data.split(batch_size):
            yield Batch(chunk)
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"{who}: data must be a tensor (N, ...) or an iterable of batches, got {type(data).__name__}")
    for batch in data:
        yield keys.unpack(batch, require=require, who=who)


def iter_images(data: Data, batch_keys: object = None, *, batch_size: int = 64, who: str = "negspace") -> Iterator[Tensor]:
    """Yield image tensors ``(B, ...)`` from a tensor or an iterable of batches (see :func:`iter_batches`)."""
    for b in iter_batches(data, batch_keys, batch_size=batch_size, who=who):
        yield b.image


def collect_images(
    data: Data, batch_keys: object = None, *, max_images: int | None = None, who: str = "negspace"
) -> Tensor:
    """All images of ``data`` in one tensor ``(N, ...)`` (the first ``max_images`` if given), detached."""
    if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"{who}: max_images must be a positive int or None, got {max_images!r}")
    parts, n = [], 0
    for img in iter_images(data, batch_keys, batch_size=max_images or 1024, who=who):
        parts.append(img.detach())
        n += img.shape[0]
        if max_images is not None and n >= max_images:
            break
    if not parts:
        raise ValueError(f"{who}: data is empty")
    x = torch.cat(parts)
    return x if max_images is None else x[:max_images]
