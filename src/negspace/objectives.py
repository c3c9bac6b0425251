"""Scalar-per-sample objectives: what an attribution explains.

An objective maps the model output ``logits: (B, num_classes)`` (or, for :func:`neuron` and
:func:`direction`, the activation of a named layer) to ``(B,)`` — or ``(B, K)`` for K targets
per sample, which attribution functions turn into K attributions in one batched pass.

Data-dependent objectives (``top_logit``, ``topk_sum``, ``contrastive()`` without classes) choose
their classes on the *actual* input; :meth:`Objective.fix` freezes that choice so that along an
integration path (IG) the same classes are explained at every step.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from negspace.reduce import channels_last, reduce_positions

__all__ = [
    "TARGET_NAMES",
    "Objective",
    "Target",
    "as_target",
    "contrastive",
    "direction",
    "entropy",
    "logit",
    "named_target",
    "neuron",
    "top_logit",
    "top_prob",
    "topk_sum",
]


class Objective(abc.ABC):
    """Base class. Subclasses implement :meth:`__call__`; ``layer`` names the module whose output is
    passed instead of the logits (``None``: the model output)."""

    layer: str | None = None

    @abc.abstractmethod
    def __call__(self, out: Tensor) -> Tensor:
        """``out`` (logits, or the layer's activation) → ``(B,)`` or ``(B, K)``."""

    def fix(self, out: Tensor) -> Objective:
        """Return an objective whose data-dependent choices are frozen at ``out`` (default: self)."""
        return self

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _check_logits(out: Tensor, who: str) -> None:
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{who} expects model outputs of shape (B, num_classes), got {shape}")


def _check_class(idx: Tensor, num_classes: int, who: str) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_classes):
        raise ValueError(
            f"{who}: class index out of range [0, {num_classes}): got values in "
            f"[{int(idx.min())}, {int(idx.max())}]"
        )


class logit(Objective):
    """Logit of class ``t``: an int, a list of K ints (→ ``(B, K)``), or a LongTensor ``(B,)``/``(B, K)``."""

    def __init__(self, t: int | Sequence[int] | Tensor) -> None:
        self.t = t

    def __call__(self, out: Tensor) -> Tensor:
        _check_logits(out, "logit")
        t = self.t
        if isinstance(t, int):
            _check_class(torch.tensor([t]), out.shape[1], "logit")
            return out[:, t]
        idx = torch.as_tensor(t, device=out.device, dtype=torch.long)
        _check_class(idx, out.shape[1], "logit")
        if idx.dim() == 1 and not isinstance(t, Tensor):  # list of K classes, same for all samples
            return out[:, idx]
        if idx.dim() == 1:
            if idx.shape[0] != out.shape[0]:
                raise ValueError(f"logit: target of shape (B,) needs B={out.shape[0]}, got {idx.shape[0]}")
            return out.gather(1, idx[:, None])[:, 0]
        if idx.dim() == 2 and idx.shape[0] == out.shape[0]:
            return out.gather(1, idx)
        raise ValueError(f"logit: target must be int, (B,) or (B, K); got shape {tuple(idx.shape)}")


class top_logit(Objective):
    """Logit of the predicted class (chosen at the actual input, see :meth:`fix`)."""

    def __call__(self, out: Tensor) -> Tensor:
        _check_logits(out, "top_logit")
        return out.max(dim=1).values

    def fix(self, out: Tensor) -> Objective:
        return logit(out.detach().argmax(dim=1))


class top_prob(Objective):
    """Softmax probability of the predicted class (chosen at the actual input, see :meth:`fix`); CODEC's
    target (paper 002, supplement 10.5/10.8)."""

    def __call__(self, out: Tensor) -> Tensor:
        _check_logits(out, "top_prob")
        return out.softmax(dim=1).max(dim=1).values

    def fix(self, out: Tensor) -> Objective:
        return topk_sum(1, softmax=True, _idx=out.detach().argmax(dim=1, keepdim=True))


class topk_sum(Objective):
    """Sum of the k largest logits (or softmax probabilities with ``softmax=True``)."""

    def __init__(self, k: int, softmax: bool = False, _idx: Tensor | None = None) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"topk_sum: k must be a positive int, got {k!r}")
        self.k = k
        self.softmax = softmax
        self._idx = _idx

    def __call__(self, out: Tensor) -> Tensor:
        _check_logits(out, "topk_sum")
        if self.k > out.shape[1]:
            raise ValueError(f"topk_sum: k={self.k} exceeds the number of classes {out.shape[1]}")
        vals = out.softmax(dim=1) if self.softmax else out
        if self._idx is not None:
            return vals.gather(1, self._idx).sum(dim=1)
        return vals.topk(self.k, dim=1).values.sum(dim=1)

    def fix(self, out: Tensor) -> Objective:
        idx = out.detach().topk(self.k, dim=1).indices
        return topk_sum(self.k, self.softmax, _idx=idx)


class entropy(Objective):
    """Shannon entropy of the softmax output, ``-Σ p log p`` (natural log)."""

    def __call__(self, out: Tensor) -> Tensor:
        _check_logits(out, "entropy")
        logp = out.log_softmax(dim=1)
        return -(logp.exp() * logp).sum(dim=1)


class contrastive(Objective):
    """``logit[a] - logit[b]``. With ``a=b=None``: top-1 minus top-2 logit, chosen at the actual input."""

    def __init__(self, a: int | Tensor | None = None, b: int | Tensor | None = None) -> None:
        if (a is None) != (b is None):
            raise ValueError("contrastive: give both classes a and b, or neither (top-1 minus top-2)")
        self.a = a
        self.b = b

    def __call__(self, out: Tensor) -> Tensor:
        _check_logits(out, "contrastive")
        if self.a is None:
            top2 = out.topk(2, dim=1).values
            return top2[:, 0] - top2[:, 1]
        return logit(self.a)(out) - logit(self.b)(out)

    def fix(self, out: Tensor) -> Objective:
        if self.a is not None:
            return self
        idx = out.detach().topk(2, dim=1).indices
        return contrastive(idx[:, 0], idx[:, 1])


_REDUCE = ("mean", "max", "sum", "center")

class neuron(Objective):
    """Activation of channel/unit ``index`` at ``layer``, reduced over space (or tokens).

    ``index``: an int (→ ``(B,)``), a list of K ints (→ ``(B, K)``: K neurons at once), or a LongTensor
    ``(B,)`` with one unit per sample. The channel axis is 1 for ``(B, C, H, W)`` and last for
    ``(B, T, D)`` and ``(B, D)``.
    """

    def __init__(self, layer: str, index: int | Sequence[int] | Tensor, reduce: str = "mean") -> None:
        if reduce not in _REDUCE:
            raise ValueError(f"neuron: reduce must be one of {_REDUCE}, got {reduce!r}")
        if not isinstance(layer, str):
            raise TypeError(f"neuron: layer must be a dotted name, got {layer!r}")
        self.layer = layer
        self.index = index
        self.reduce = reduce

    def __call__(self, act: Tensor) -> Tensor:
        flat = channels_last(act)  # (B, S, C)
        c = flat.shape[-1]
        idx = torch.as_tensor(self.index, device=act.device, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= c):
            raise ValueError(
                f"neuron: index {self.index!r} out of range for layer {self.layer!r} with {c} channels"
            )
        if idx.dim() == 0:
            return reduce_positions(flat[..., idx.item()][..., None], self.reduce, act)[:, 0]
        if isinstance(self.index, Tensor) and idx.dim() == 1:  # one unit per sample
            if idx.shape[0] != flat.shape[0]:
                raise ValueError(f"neuron: per-sample index needs B={flat.shape[0]} entries, got {idx.shape[0]}")
            sel = flat.gather(2, idx[:, None, None].expand(-1, flat.shape[1], 1))
            return reduce_positions(sel, self.reduce, act)[:, 0]
        if idx.dim() == 1:
            return reduce_positions(flat[..., idx], self.reduce, act)
        raise ValueError(f"neuron: index must be int, list of ints or (B,) tensor, got shape {tuple(idx.shape)}")


class direction(Objective):
    """Projection of ``layer``'s activation onto a unit direction ``vector: (C,)``, reduced over space."""

    def __init__(self, layer: str, vector: Tensor | Sequence[float], reduce: str = "mean") -> None:
        if reduce not in _REDUCE:
            raise ValueError(f"direction: reduce must be one of {_REDUCE}, got {reduce!r}")
        v = torch.as_tensor(vector, dtype=torch.float32)
        if v.dim() != 1 or not torch.isfinite(v).all() or float(v.norm()) == 0:
            raise ValueError("direction: vector must be a finite, non-zero 1-D tensor")
        self.layer = layer
        self.vector = v / v.norm()
        self.reduce = reduce

    def __call__(self, act: Tensor) -> Tensor:
        flat = channels_last(act)
        if flat.shape[-1] != self.vector.numel():
            raise ValueError(
                f"direction: vector has {self.vector.numel()} entries, layer {self.layer!r} has {flat.shape[-1]} channels"
            )
        proj = flat @ self.vector.to(flat)
        return reduce_positions(proj[..., None], self.reduce, act)[:, 0]


# ------------------------------------------------------------------------------------------ coercion
#: a target as every negspace function accepts it
Target = int | Sequence[int] | Tensor | Objective | Callable[[Tensor], Tensor]

#: target names accepted where a YAML-expressible target is needed (callbacks, CODEC)
TARGET_NAMES: tuple[str, ...] = ("top_logit", "top_prob", "topk", "entropy", "contrastive", "label")


def as_target(target: Target) -> Objective | Callable[[Tensor], Tensor]:
    """The one target coercer: ``int`` / ``LongTensor (B,)`` / ``(B, K)`` / list of ints / objective / callable
    → a callable ``logits -> (B,) | (B, K)``."""
    if isinstance(target, bool):
        raise TypeError("target must be an int class index, a LongTensor (B,) or (B, K), or an objective; got bool")
    if isinstance(target, int):
        return logit(target)
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"target tensor must hold integer class indices, got dtype {target.dtype}")
        if target.dim() == 0:
            return logit(int(target))
        if target.dim() not in (1, 2):
            raise ValueError(f"target must be (B,) or (B, K), got shape {tuple(target.shape)}")
        return logit(target.long())
    if isinstance(target, Objective) or callable(target):
        return target
    if isinstance(target, Sequence) and not isinstance(target, str) and all(isinstance(t, int) for t in target):
        return logit(list(target))
    raise TypeError(
        "target must be an int, a LongTensor (B,) or (B, K), or an objective from negspace.objectives; "
        f"got {type(target).__name__}"
    )


def named_target(target: str | Objective | Callable[[Tensor], Tensor], *, k: int = 5) -> Objective | Callable | str:
    """Resolve a target *name* (YAML-friendly) to an objective; objectives and callables pass through.

    ``"label"`` stays the string ``"label"``: it needs the batch labels, which the caller supplies.
    """
    if isinstance(target, Objective) or (callable(target) and not isinstance(target, str)):
        return target
    if target == "top_logit":
        return top_logit()
    if target == "top_prob":
        return top_prob()
    if target == "topk":
        return topk_sum(k)
    if target == "entropy":
        return entropy()
    if target == "contrastive":
        return contrastive()
    if target == "label":
        return "label"
    raise ValueError(f"target must be one of {TARGET_NAMES} or an objective from negspace.objectives, got {target!r}")
