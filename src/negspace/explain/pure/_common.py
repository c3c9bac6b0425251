"""Argument checks shared by the PURE modules (neuron selections, reductions, fast-path option, batch keys)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from negspace.reduce import check_reduce

#: how a neuron's map seeds its circuit: ``"relu"`` (the paper's reference code: the backward starts from
#: ``ReLU(A_k)`` at every position, the gradient of ``½ Σ_p ReLU(A_k(p))²``) or a spatial reduction of
#: :class:`negspace.objectives.neuron` (``"max"``: one-hot at the argmax, negspace ≤ 0.2's default)
REDUCES: tuple[str, ...] = ("relu", "max", "mean", "sum", "center")
#: the default seed (paper 004 reference code)
DEFAULT_REDUCE = "relu"
#: values of ``fast=``: ``"auto"`` (closed form when it applies), ``True`` (require it), ``False`` (autograd)
FAST = ("auto", True, False)


def check_pure_reduce(reduce: object) -> str:
    return check_reduce(reduce, REDUCES)


def check_fast(fast: object) -> None:
    if fast not in FAST or (isinstance(fast, int) and not isinstance(fast, bool)):
        raise ValueError(f"fast must be one of {FAST}, got {fast!r}")


def check_neurons(neurons: Tensor, c: int, layer: str) -> None:
    """Raise ``ValueError`` naming the channel indices of ``neurons`` that ``layer`` (``c`` channels) lacks."""
    if neurons.numel() and (int(neurons.min()) < 0 or int(neurons.max()) >= c):
        bad = neurons[(neurons < 0) | (neurons >= c)].unique().tolist()
        raise ValueError(f"neurons {bad} do not exist in layer {layer!r} with {c} channels (valid: 0..{c - 1})")


def neuron_indices(neurons: int | Sequence[int] | Tensor | None, name: str = "neurons") -> Tensor | None:
    """A neuron selection (an int, a list of ints or a LongTensor; ``None`` = all) as a flat CPU LongTensor
    of distinct channel indices, or ``None``."""
    if neurons is None:
        return None
    if isinstance(neurons, bool):
        raise TypeError(f"{name} must be an int, a list of ints or a LongTensor, got bool")
    if isinstance(neurons, int):
        return torch.tensor([neurons])
    if isinstance(neurons, Tensor) and neurons.is_floating_point():
        raise TypeError(f"{name} must hold integer channel indices, got dtype {neurons.dtype}")
    try:
        t = torch.as_tensor(neurons, dtype=torch.long).flatten().cpu()
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an int, a list of ints or a LongTensor, got {neurons!r}") from e
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if t.unique().numel() != t.numel():
        raise ValueError(f"{name} contains duplicates: {t.tolist()}")
    return t


def data_keys(batch_keys: object, image_key: str | None, who: str) -> object:
    """``batch_keys``, or the deprecated ``image_key=`` mapped to ``{"image": image_key}`` with a warning."""
    if image_key is None:
        return batch_keys
    if batch_keys is not None:
        raise TypeError(f"{who}: pass batch_keys= only (image_key= is its deprecated name), not both")
    warnings.warn(f"{who}(image_key=...) is deprecated; use batch_keys={{'image': ...}}", DeprecationWarning,
                  stacklevel=3)
    return {"image": image_key}
