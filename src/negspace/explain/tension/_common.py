"""Small helpers shared by the tension wing (argument checks, chunking, reading images from data)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

from torch import Tensor

from negspace.attribution.engine import check_input
from negspace.batch import collect_images

#: data accepted by dataset-level functions: a tensor of images ``(N, ...)`` or an iterable of batches
Data = Tensor | Iterable


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` elements."""
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def check_pos_int(value: object, name: str) -> int:
    """``value`` if it is a positive int, else a ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def images(
    data: Data, batch_keys: object, batch_key: str | int | None, *, who: str, max_images: int | None = None
) -> Tensor:
    """Images ``(N, ...)`` of ``data`` (:func:`negspace.batch.collect_images`), validated.

    ``batch_key`` is the deprecated 0.1 keyword (the image's dict key or tuple index; ``0`` = default layout).
    """
    if batch_key is not None:
        if batch_keys is not None:
            raise TypeError(f"{who}: pass batch_keys= only (batch_key= is its deprecated name), not both")
        warnings.warn(
            f"{who}(batch_key=...) is deprecated; use batch_keys={{'image': key}}", DeprecationWarning, stacklevel=3
        )
        batch_keys = None if batch_key == 0 else {"image": batch_key}
    x = collect_images(data, batch_keys, max_images=max_images, who=who)
    check_input(x, "data")
    return x
