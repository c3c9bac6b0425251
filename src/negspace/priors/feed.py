"""Where the prior's masks come from: a batch key, or a mask source computing them from the batch images.

:class:`MaskFeed` is what :class:`negspace.callbacks.AttributionPrior` holds for ``mask=``. With a
:class:`negspace.masks.MaskSource` it computes the masks of a batch once (the prior asks for them twice:
before the user's forward, to plan it, and when it adds the penalty), under no-grad with autocast off (the
source's ``__call__`` does that), on the batch's device, outside the prior's gradient. It binds sources that
need a model (a :class:`negspace.masks.ConceptMask` read from a file) and keeps their state for checkpoints.
Pure torch, no Lightning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MaskFeed"]


class MaskFeed:
    """``mask=`` of the prior: ``None`` (the batch's ``"mask"`` role), a batch key (``str``/``int``), a
    :class:`~negspace.masks.MaskSource`, or a callable ``images (B, C, H, W) -> (B, 1, H, W)`` in [0, 1]
    (wrapped in a :class:`~negspace.masks.Detector`)."""

    def __init__(self, mask: object = None) -> None:
        self.key: str | int | None = None
        self.source: Any = None
        if mask is None:
            return
        if isinstance(mask, str | int) and not isinstance(mask, bool):
            self.key = mask
            return
        from negspace.masks import as_mask_source  # masks imports the attribution stack: only when used

        self.source = as_mask_source(mask)
        self._cache: tuple[Tensor, Tensor] | None = None
        self._device: torch.device | None = None

    def __repr__(self) -> str:
        return f"MaskFeed({self.source if self.source is not None else self.key!r})"

    @property
    def computed(self) -> bool:
        """True when masks are computed from the images (a mask source), not read from the batch."""
        return self.source is not None

    def check(self, model: nn.Module | None, who: str) -> None:
        """Early (setup-time) check that a source needing the model can use it: a module, with its layer."""
        if self.source is None or not getattr(self.source, "needs_model", False):
            return
        if model is None:
            raise ValueError(f"{who}: the mask source {self.source!r} needs the model, but forward= is a callable; "
                             "pass forward= as a dotted path, or build the source with model=")
        layer = getattr(self.source, "layer", None)
        if isinstance(layer, str):
            from negspace.hooks import get_layer

            get_layer(model, layer)  # lists the valid names

    def bind(self, model: nn.Module | None, who: str) -> None:
        """Give a source that needs a model (``needs_model``) the attributed network; then make rank 0's state
        every rank's (``synchronize``; identity outside DDP). ``model=None``: the network is not a module."""
        if self.source is None:
            return
        if getattr(self.source, "needs_model", False):
            self.check(model, who)
            self.source.bind(model)
        self.source.synchronize()

    def masks(self, images: Tensor) -> Tensor:
        """``(B, 1, H, W)`` masks of ``images`` from the source, computed once per image tensor."""
        if self._cache is not None and self._cache[0] is images:
            return self._cache[1]
        if self._device != images.device:
            self.source = self.source.to(images.device)
            self._device = images.device
        finite = torch.isfinite(images).flatten(1).all(1)
        if bool(finite.all()):
            masks = self.source(images)
        else:  # broken rows get no mask; the prior reports them (its on_nan=), the source never sees them
            masks = images.new_zeros((images.shape[0], 1, *images.shape[2:]), dtype=torch.float32)
            if bool(finite.any()):
                masks[finite] = self.source(images[finite])
        self._cache = (images, masks)
        return masks

    def clear(self) -> None:
        """Drop the cached masks (after each batch: they hold the batch's memory)."""
        if self.source is not None:
            self._cache = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.source is None else {"mask_source": {"type": type(self.source).__name__,
                                                                "state": self.source.state_dict()}}

    def load_state_dict(self, state: dict[str, Any], who: str) -> None:
        saved = state.get("mask_source")
        if saved is None and self.source is None:
            return
        if saved is None or self.source is None or saved.get("type") != type(self.source).__name__:
            have = "none" if self.source is None else type(self.source).__name__
            got = "none" if saved is None else saved.get("type")
            raise ValueError(f"{who}: the checkpoint was written with mask source {got}, but this callback has "
                             f"{have}; resume with the same mask= configuration")
        self.source.load_state_dict(saved["state"])
