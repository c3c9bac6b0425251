"""Mask sources: objects that compute the spurious-region mask ``(B, 1, H, W)`` of a batch on the fly, and
:func:`mask_iou`, the one mask-overlap metric.

A :class:`MaskSource` is called on images and returns detached float32 masks in ``[0, 1]`` on the images'
device. The base class does the checks and the context (no grad, autocast off); subclasses only implement
:meth:`MaskSource.compute`. :class:`Detector` wraps any callable (a segmentation net, a colour rule);
:class:`negspace.masks.ConceptMask` reads a concept direction from a hidden layer.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IOU_REDUCTIONS", "Detector", "MaskSource", "as_mask_source", "check_mask_output", "default_dilation", "dilate_mask", "mask_iou"]

#: reductions of :func:`mask_iou`
IOU_REDUCTIONS = ("mean", "none")


def default_dilation(height: int) -> int:
    """Paper 000 (B.4) dilates by 10 px at 224 px; scaled: ``round(10 · H / 224)``."""
    return round(10 * height / 224)


def dilate_mask(mask: Tensor, pixels: int) -> Tensor:
    """Binary dilation with a ``(2p+1)×(2p+1)`` square by max-pooling. ``mask: (..., H, W)`` in {0, 1}."""
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
        raise ValueError(f"dilation must be a non-negative int (pixels), got {pixels!r}")
    if pixels == 0:
        return mask
    shape = mask.shape
    m = mask.reshape(-1, 1, *shape[-2:]).float()
    out = F.max_pool2d(m, kernel_size=2 * pixels + 1, stride=1, padding=pixels)
    return out.reshape(shape).to(mask.dtype)



def _check_images(images: object, who: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{who}: images must be a Tensor (B, C, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"{who}: images must be a non-empty float batch (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{who}: images must be a floating-point tensor (B, C, H, W), got dtype {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{who}: images contain NaN or inf")
    return images


def check_mask_output(out: object, images: Tensor, who: str, *, check_range: bool = True) -> Tensor:
    """``out`` of a mask source for ``images (B, C, H, W)`` → float32 ``(B, 1, H, W)``.

    Accepts ``(B, 1, H, W)`` or ``(B, H, W)``; raises ``ValueError`` naming ``who`` for another shape, NaN/inf,
    or (``check_range``) values outside ``[0, 1]``.
    """
    b, _, h, w = images.shape
    if not isinstance(out, Tensor):
        raise TypeError(f"{who} must return a Tensor (B, 1, H, W) or (B, H, W), got {type(out).__name__}")
    if out.dim() == 3:
        out = out.unsqueeze(1)
    if out.shape != (b, 1, h, w):
        raise ValueError(f"{who} must return masks of shape (B, 1, H, W) = {(b, 1, h, w)} or (B, H, W) for images "
                         f"{tuple(images.shape)}, got {tuple(out.shape)}")
    out = out.detach().float()
    if not torch.isfinite(out).all():
        raise ValueError(f"{who} returned NaN or inf mask values")
    if check_range and out.numel() and (float(out.min()) < 0.0 or float(out.max()) > 1.0):
        raise ValueError(f"{who} must return mask values in [0, 1], got the range "
                         f"[{float(out.min()):.4g}, {float(out.max()):.4g}] (pass threshold= to binarise scores)")
    return out


class MaskSource(abc.ABC):
    """Base class of every mask source: ``source(images (B, C, H, W)) -> masks (B, 1, H, W)`` float32 in [0, 1].

    ``__call__`` checks the images (4-D, float, finite), runs :meth:`compute` under ``torch.no_grad()`` with
    autocast disabled, and checks the output (``(B, H, W)`` is unsqueezed; values must be finite and in [0, 1]).
    State (:meth:`state_dict`) is tensors and primitives only, so checkpoints load with ``weights_only=True``.
    """

    #: True while the source still needs :meth:`bind` (a model) before it can compute masks
    needs_model: bool = False

    @property
    def name(self) -> str:
        """Name used in error messages."""
        return type(self).__name__

    def __call__(self, images: Tensor) -> Tensor:
        images = _check_images(images, self.name)
        with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
            out = self.compute(images)
        return check_mask_output(out, images, self.name).to(images.device)

    @abc.abstractmethod
    def compute(self, images: Tensor) -> Tensor:
        """Masks of ``images (B, C, H, W)``: ``(B, 1, H, W)`` or ``(B, H, W)`` in [0, 1] (called by ``__call__``)."""

    def bind(self, model: nn.Module) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Give the source the model being trained (no-op unless the source reads a model)."""

    def to(self, device: torch.device | str) -> MaskSource:
        """Move the source's tensors to ``device``; returns ``self``."""
        return self

    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only (``weights_only``-loadable)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (stateless by default)
        """Restore what :meth:`state_dict` returned."""

    def synchronize(self) -> None:  # noqa: B027 (stateless by default)
        """Make rank 0's state every rank's (DDP); identity outside a process group."""


class Detector(MaskSource):
    """Any callable ``images (B, C, H, W) -> (B, 1, H, W) | (B, H, W)`` as a mask source.

    Args:
        fn: the detector (a function, a segmentation ``nn.Module``, ...). Without ``threshold`` its output must
            lie in [0, 1]; with it, any finite scores.
        threshold: binarise ``fn``'s output to ``1[score >= threshold]``.
        dilate: grow the mask by this many pixels (square max-pool dilation, ``dilate_mask``).
        name: shown in errors and ``repr`` (default: the callable's name).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], *, threshold: float | None = None, dilate: int = 0,
                 name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"Detector: fn must be a callable images -> masks, got {type(fn).__name__}")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                      or threshold != threshold):
            raise ValueError(f"Detector: threshold must be a number or None, got {threshold!r}")
        if isinstance(dilate, bool) or not isinstance(dilate, int) or dilate < 0:
            raise ValueError(f"Detector: dilate must be a non-negative int (pixels), got {dilate!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Detector: name must be a string or None, got {type(name).__name__}")
        self.fn, self.threshold, self.dilate = fn, None if threshold is None else float(threshold), dilate
        self._name = name or getattr(fn, "__name__", None) or type(fn).__name__

    @property
    def name(self) -> str:
        return f"Detector({self._name!r})"

    def compute(self, images: Tensor) -> Tensor:
        out = check_mask_output(self.fn(images), images, self.name, check_range=self.threshold is None)
        if self.threshold is not None:
            out = (out >= self.threshold).float()
        return dilate_mask(out, self.dilate)

    def to(self, device: torch.device | str) -> Detector:
        if isinstance(self.fn, nn.Module):
            self.fn.to(device)
        return self

    def __repr__(self) -> str:
        return f"Detector({self._name!r}, threshold={self.threshold}, dilate={self.dilate})"


def as_mask_source(obj: object) -> MaskSource:
    """A :class:`MaskSource` as is; any other callable ``images -> masks`` wrapped in a :class:`Detector`."""
    if isinstance(obj, MaskSource):
        return obj
    if callable(obj) and not isinstance(obj, type):
        return Detector(obj)  # type: ignore[arg-type]
    raise TypeError(
        "mask source must be a negspace.masks.MaskSource (e.g. ConceptMask, Detector) or a callable "
        f"images (B, C, H, W) -> masks (B, 1, H, W) | (B, H, W) in [0, 1]; got {type(obj).__name__}"
    )


def mask_iou(pred: Tensor, true: Tensor, *, reduction: str = "mean") -> Tensor:
    """Per-image intersection over union of binary masks ``pred, true: (B, 1, H, W)`` (or ``(B, H, W)``).

    An image where both masks are empty counts as IoU 1 (nothing to find, nothing found); an image where only
    one is empty has IoU 0. ``reduction="mean"`` → scalar, ``"none"`` → ``(B,)``. Values must be in {0, 1}.
    """
    if reduction not in IOU_REDUCTIONS:
        raise ValueError(f"mask_iou: reduction must be one of {IOU_REDUCTIONS}, got {reduction!r}")
    for name, m in (("pred", pred), ("true", true)):
        if not isinstance(m, Tensor):
            raise TypeError(f"mask_iou: {name} must be a Tensor, got {type(m).__name__}")
        if m.dim() not in (3, 4) or m.shape[0] == 0 or (m.dim() == 4 and m.shape[1] != 1):
            raise ValueError(f"mask_iou: {name} must be (B, 1, H, W) or (B, H, W), got shape {tuple(m.shape)}")
        if not ((m == 0) | (m == 1)).all():
            raise ValueError(f"mask_iou: {name} must be binary (values in {{0, 1}}); threshold it first")
    p, t = pred.reshape(pred.shape[0], -1).bool(), true.reshape(true.shape[0], -1).bool()
    if p.shape != t.shape:
        raise ValueError(f"mask_iou: pred and true must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(true.shape)}")
    inter = (p & t).sum(1).float()
    union = (p | t).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return iou.mean() if reduction == "mean" else iou
