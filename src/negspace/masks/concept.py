"""``ConceptMask``: the spurious region as where a concept direction of a hidden layer fires.

A direction ``d (C,)`` of layer ``a`` is fitted from example images with and without the artifact
(:meth:`ConceptMask.from_examples`), taken from channels or a CODEC mode. The mask of an image is
``dilate(up(<a(x)_{:, i, j}, d>) >= threshold)``: the projection map at the layer's resolution, bilinearly
upsampled to the image, thresholded and dilated. By default the maps come from a *frozen* copy of the model
taken at :meth:`ConceptMask.bind` time, so the masks do not drift while an attribution prior changes the model.
The frozen copy's 4-D weights are stored channels-last (≈ 1.5× faster convolutions on CPU, the same maps up to
float rounding); a model whose forward cannot run channels-last falls back to the default layout on first use.

Defaults, measured by ``benchmarks/masks.py --iou`` (lesions at 32 px with a 6 px sticker, true masks dilated by
1 px; fully biased ``XSmallCNN``, 3 seeds; 200 sticker images vs 200 class-1 images, i.e. confounded with the
class; validation splits). Layer ``features.8`` (16×16): IoU 0.70 (min 0.70; the same with clean class-0 images
instead), 82 % of the true masks covered, no false-positive area on images without a sticker; ``features.11``
(8×8): IoU 0.49. Alternatives on ``features.8``: ``pool="max"`` 0.70 (but 0.66, min 0.60, with other seeds),
``method="mean_diff"`` 0.71, rules ``half_peak`` 0.61, ``midpoint`` 0.60, ``clean_max`` 0.45, ``dilate=1`` 0.65,
``localize="contribution"`` 0.69 (``target="top_prob"``: 0.01, the saturated softmax has no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.batch import Data, collect_images
from negspace.distributed import all_gather_object, broadcast, is_distributed
from negspace.hooks import get_layer, model_device
from negspace.masks.cav import (
    _check_direction,
    channel_direction,
    choose_threshold,
    codec_direction,
    default_dilate,
    fit_direction,
    layer_channels,
    layer_features,
    localization_map,
    project,
)
from negspace.masks.files import META, POOLS, check_meta, read_concept, write_concept
from negspace.masks.reference import broadcast_module, frozen_copy
from negspace.masks.source import MaskSource, dilate_mask
from negspace.reduce import summarize

__all__ = ["ConceptMask"]


class ConceptMask(MaskSource):
    """Mask of the region where a concept direction of ``layer`` fires (see the module docstring).

    Args:
        layer, direction: dotted layer name and direction ``(C,)``; or ``file=`` written by :meth:`save`
            (then ``threshold=``/``dilate=``, when given, override the file's).
        model: bind now (otherwise :meth:`bind` later; ``AttributionPrior`` binds at fit start).
        localize: ``"projection"`` (``<a, d>`` per position; the forward stops at the layer) or
            ``"contribution"`` (direction-weighted activation×gradient contributions to ``target``).
        threshold: map value at which a pixel is in the mask (``>=``); set by the ``from_*`` constructors.
        dilate: pixels; ``None`` = ``default_dilate``: ``round(10·H/224) − (H // h) // 2``, at least 0.
        reference: ``"frozen"`` (a deep copy of the model at bind time, eval mode, no grad) or ``"live"``
            (the model itself, in eval mode during the mask forward).
        target: ``localize="contribution"`` target: a target name or an int class index.
        method, pool: how the direction was fitted (metadata, saved).
    """

    def __init__(self, layer: str | None = None, direction: Tensor | None = None, *, file: str | None = None,
                 model: nn.Module | None = None, localize: str = "projection", threshold: float | None = None,
                 dilate: int | None = None, reference: str = "frozen", target: object = "top_logit",
                 method: str | None = None, pool: str | None = None) -> None:
        self._model: nn.Module | None = None
        self._channels_last = False  # the frozen copy's conv weights are channels-last (≈ 1.5× faster on CPU)
        self._saved_reference: dict[str, Tensor] | None = None
        if file is not None:
            if layer is not None or direction is not None:
                raise ValueError("ConceptMask: pass either (layer, direction) or file=, not both")
            self._load_file(file, threshold=threshold, dilate=dilate)
        else:
            if not isinstance(layer, str) or direction is None:
                raise TypeError(f"ConceptMask needs a layer name and a direction (C,), or file=; got layer={layer!r} "
                                f"and direction of type {type(direction).__name__}")
            meta = {"layer": layer, "threshold": threshold, "localize": localize, "dilate": dilate,
                    "reference": reference, "target": target, "method": method, "pool": pool}
            self._set(meta, direction)
        if model is not None:
            self.bind(model)

    # ----------------------------------------------------------------------------------------- state
    def _set(self, meta: dict[str, Any], direction: Tensor) -> None:
        meta = check_meta(meta)
        self.layer: str = meta["layer"]
        self.direction: Tensor = _check_direction(direction, who="ConceptMask: direction").detach().float()
        self.threshold: float | None = meta["threshold"]
        self.localize: str = meta["localize"]
        self.dilate: int | None = meta["dilate"]
        self.reference: str = meta["reference"]
        self.target: object = meta["target"]
        self.method: str | None = meta["method"]
        self.pool: str | None = meta["pool"]

    def _meta(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in META}

    def state_dict(self) -> dict[str, Any]:
        """Metadata, ``direction`` and, for a bound frozen reference, its weights (``reference_state``)."""
        state: dict[str, Any] = {**self._meta(), "direction": self.direction.detach().cpu().clone()}
        ref = self._reference_state()
        if ref is not None:
            state["reference_state"] = ref
        return state

    def _reference_state(self) -> dict[str, Tensor] | None:
        if self.reference == "frozen" and self._model is not None:
            return {k: v.detach().cpu().clone() for k, v in self._model.state_dict().items()}
        return self._saved_reference

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Saved reference weights replace the bound reference's, or, if unbound,
        are loaded into the copy that :meth:`bind` makes (a resumed run keeps the original reference)."""
        if not isinstance(state, dict) or "direction" not in state or "layer" not in state:
            raise ValueError("ConceptMask.load_state_dict: expected the dict of ConceptMask.state_dict() "
                             f"(with 'layer' and 'direction'), got {type(state).__name__}")
        self._set(state, state["direction"])
        ref = state.get("reference_state")
        if ref is not None and self.reference == "frozen" and self._model is not None:
            self._model.load_state_dict(ref)
        else:
            self._saved_reference = dict(ref) if ref is not None else None

    def save(self, path: str, *, weights: bool = False) -> None:
        """Write ``<path>.json`` (metadata) and ``<path>.safetensors`` (direction; with ``weights=True`` also the
        frozen reference's weights, so that ``ConceptMask(file=...)`` + :meth:`bind` reproduces the reference)."""
        ref = self._reference_state() if weights else None
        if weights and ref is None:
            raise ValueError("ConceptMask.save(weights=True) needs a bound frozen reference (reference='frozen')")
        write_concept(path, self._meta(), self.direction, ref)

    def _load_file(self, file: str, *, threshold: float | None, dilate: int | None) -> None:
        spec, direction, self._saved_reference = read_concept(file)
        self._set(spec | {k: v for k, v in (("threshold", threshold), ("dilate", dilate)) if v is not None}, direction)

    # ------------------------------------------------------------------------------------------ model
    @property
    def needs_model(self) -> bool:  # type: ignore[override]
        return self._model is None

    def bind(self, model: nn.Module, *, refresh: bool = False) -> None:
        """Attach the model. ``"frozen"``: deep copy (eval mode, ``requires_grad=False``), loaded with saved
        reference weights if :meth:`load_state_dict`/``file=`` provided them; a frozen reference already held is
        kept (masks never drift) unless ``refresh=True``. ``"live"``: the model object itself."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"ConceptMask.bind: model must be an nn.Module, got {type(model).__name__}")
        get_layer(model, self.layer)
        if self.reference == "live":
            self._model = model
            return
        if self._model is not None and not refresh:
            return
        self._model = frozen_copy(model, self._saved_reference)
        self._saved_reference = None
        self._channels_last = any(p.dim() == 4 for p in self._model.parameters())  # the fast path, see localize_map

    @property
    def model(self) -> nn.Module | None:
        """The model the maps are read from (the frozen copy, or the live model), ``None`` while unbound."""
        return self._model

    def to(self, device: torch.device | str) -> ConceptMask:
        self.direction = self.direction.to(device)
        if self.reference == "frozen" and self._model is not None:
            self._model.to(device)
        return self

    def synchronize(self) -> None:
        """Rank 0's direction, metadata and frozen reference weights on every rank (identity without DDP)."""
        if not is_distributed():
            return
        info = all_gather_object((self.direction.numel(), self._model is not None))
        if len(set(info)) != 1:
            raise ValueError(f"ConceptMask.synchronize: ranks disagree on (channels, bound): {info}")
        meta = all_gather_object(self._meta())[0]
        self._set(meta, broadcast(self.direction))
        if self.reference == "frozen" and self._model is not None:
            broadcast_module(self._model)

    # ------------------------------------------------------------------------------------------ masks
    def _ready_model(self, images: Tensor) -> nn.Module:
        if self._model is None:
            raise ValueError(f"{self!r} is not bound to a model: pass model= or call bind(model) first")
        if self.reference == "frozen" and model_device(self._model) != images.device:
            self._model.to(images.device)
        return self._model

    def localize_map(self, images: Tensor) -> Tensor:
        """Raw localisation map ``(B, 1, h, w)`` at the layer's resolution for ``images (B, C, H, W)``."""
        model = self._ready_model(images)
        p = next(model.parameters(), None)
        x = images.to(p.dtype) if p is not None and p.is_floating_point() else images
        try:
            return localization_map(model, self.layer, x, self.direction, localize=self.localize, target=self.target)
        except RuntimeError:
            if not self._channels_last:
                raise
            # a model that .view()s its conv maps fails in channels-last layout: back to the default layout
            model.to(memory_format=torch.contiguous_format)
            self._channels_last = False
            return localization_map(model, self.layer, x, self.direction, localize=self.localize, target=self.target)

    def _binarize(self, maps: Tensor, size: tuple[int, int]) -> Tensor:
        if self.threshold is None:
            raise ValueError(f"{self!r} has no threshold: pass threshold= or fit it (from_examples, examples=)")
        up = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
        dil = default_dilate(size[0], maps.shape[-2]) if self.dilate is None else self.dilate
        return dilate_mask((up >= self.threshold).float(), dil)

    def compute(self, images: Tensor) -> Tensor:
        """``{0, 1}`` masks ``(B, 1, H, W)``: the map upsampled (bilinear), ``>= threshold``, dilated."""
        return self._binarize(self.localize_map(images), (images.shape[-2], images.shape[-1]))

    def __repr__(self) -> str:
        thr = "None" if self.threshold is None else f"{self.threshold:.4g}"
        dil = "auto" if self.dilate is None else self.dilate
        return (f"ConceptMask(layer={self.layer!r}, channels={self.direction.numel()}, threshold={thr}, "
                f"localize={self.localize!r}, dilate={dil}, reference={self.reference!r}, "
                f"bound={self._model is not None})")

    # ------------------------------------------------------------------------------------ constructors
    def _examples_maps(self, images: Tensor, features: Tensor | None, batch_size: int = 64) -> Tensor:
        if features is not None and self.localize == "projection":
            maps = project(features, self.direction)
        else:
            maps = torch.cat([self.localize_map(x) for x in images.split(batch_size)])
        return F.interpolate(maps.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def fit_threshold(self, artifact: Tensor, clean: Tensor, *, rule: str = "otsu",
                      features: tuple[Tensor, Tensor] | None = None) -> float:
        """Set (and return) :attr:`threshold` by ``choose_threshold(rule=)`` on the maps of example images
        ``artifact (N1, C, H, W)`` (with the concept) and ``clean (N2, C, H, W)`` (without)."""
        fa, fc = features if features is not None else (None, None)
        self.threshold = choose_threshold(self._examples_maps(artifact, fa), self._examples_maps(clean, fc), rule=rule)
        return self.threshold

    @staticmethod
    def _images(model: nn.Module, data: Data, batch_keys: object, max_images: int | None, who: str) -> Tensor:
        return collect_images(data, batch_keys, max_images=max_images, who=who).to(model_device(model))

    @classmethod
    def from_examples(cls, model: nn.Module, layer: str, artifact: Data, clean: Data, *, method: str = "logistic",
                      pool: str = "mean", batch_keys: object = None, localize: str = "projection",
                      dilate: int | None = None, reference: str = "frozen", max_images: int | None = None,
                      rule: str = "otsu", C: float = 1.0, seed: int = 0, **kw: Any) -> ConceptMask:
        """Fit the direction on example images (``artifact``: with the artifact, ``clean``: without; tensors
        ``(N, C, H, W)`` or loaders) and the threshold on the same images (``rule``, see ``choose_threshold``).

        Features: ``layer``'s activations pooled per channel (``pool``: ``"max"`` or ``"mean"``); ``method``:
        ``"logistic"`` or ``"mean_diff"`` (``fit_direction``, with ``C`` and ``seed``). ``kw``: ``threshold``
        (skips the threshold fit), ``target``.
        """
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        xa = cls._images(model, artifact, batch_keys, max_images, "ConceptMask.from_examples (artifact)")
        xc = cls._images(model, clean, batch_keys, max_images, "ConceptMask.from_examples (clean)")
        fa, fc = layer_features(model, layer, xa), layer_features(model, layer, xc)
        d = fit_direction(summarize(fa, pool), summarize(fc, pool), method, C=C, seed=seed)
        cm = cls(layer, d, model=model, localize=localize, dilate=dilate, reference=reference, method=method,
                 pool=pool, **kw)
        if cm.threshold is None:
            cm.fit_threshold(xa, xc, rule=rule, features=(fa, fc))
        return cm

    @classmethod
    def _with_examples(cls, model: nn.Module, layer: str, direction: Tensor, examples: tuple[Data, Data] | None,
                       rule: str, batch_keys: object, max_images: int | None, kw: dict[str, Any]) -> ConceptMask:
        cm = cls(layer, direction, model=model, **kw)
        if examples is not None and cm.threshold is None:
            if not isinstance(examples, tuple | list) or len(examples) != 2:
                raise TypeError(f"examples must be a pair (artifact, clean) of image data, got {type(examples).__name__}")
            xa = cls._images(model, examples[0], batch_keys, max_images, "ConceptMask (artifact examples)")
            xc = cls._images(model, examples[1], batch_keys, max_images, "ConceptMask (clean examples)")
            cm.fit_threshold(xa, xc, rule=rule)
        return cm

    @classmethod
    def from_channels(cls, model: nn.Module, layer: str, channels: Sequence[int], weights: Sequence[float] | None = None,
                      *, examples: tuple[Data, Data] | None = None, rule: str = "otsu", batch_keys: object = None,
                      max_images: int | None = None, **kw: Any) -> ConceptMask:
        """Direction = ``weights`` (default 1) on ``channels`` of ``layer``, normalised. The threshold is fitted
        on ``examples=(artifact, clean)`` if given, else pass ``threshold=``."""
        d = channel_direction(layer_channels(model, layer), channels, weights)
        kw.setdefault("method", "channels")
        return cls._with_examples(model, layer, d, examples, rule, batch_keys, max_images, kw)

    @classmethod
    def from_codec_mode(cls, model: nn.Module, modes: Any, mode: int, *, examples: tuple[Data, Data] | None = None,
                        rule: str = "otsu", batch_keys: object = None, max_images: int | None = None,
                        **kw: Any) -> ConceptMask:
        """Direction = the atom of CODEC ``mode`` of ``modes`` (a ``LayerModes``; ``[E, I]`` atoms give ``E − I``)
        on ``modes.layer``, normalised; threshold as in :meth:`from_channels`."""
        kw.setdefault("method", "codec")
        return cls._with_examples(model, modes.layer, codec_direction(modes, mode), examples, rule, batch_keys,
                                  max_images, kw)
