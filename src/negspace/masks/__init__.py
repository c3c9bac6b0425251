"""Mask sources: the spurious-region mask ``(B, 1, H, W)`` of a batch computed on the fly, for attribution
priors when the data carry no masks. Pure torch (no Lightning).

* :mod:`.source` — :class:`MaskSource` (the base class: checks, no grad, autocast off), :class:`Detector` (any
  callable), :func:`as_mask_source`, :func:`mask_iou`;
* :mod:`.cav` — concept directions (:func:`fit_direction`), localisation maps (:func:`localization_map`) and
  thresholds chosen on examples (:func:`choose_threshold`);
* :mod:`.concept` — :class:`ConceptMask`: where a concept direction of a hidden layer fires, read from a frozen
  copy of the model (:mod:`.reference`), fitted from examples, channels or a CODEC mode; saved by :mod:`.files`;
* :mod:`.discover` (:mod:`.discovery`) — :func:`discover_artifacts`: candidate artifacts of a trained model
  (channels, CODEC modes, SpRAy clusters), one figure each (:func:`save_candidates`);
* :mod:`.verify` — :func:`artifact_patch` and :func:`insertion_effect`: the model's response to pasting the
  artifact (excitation of the class it stands for, inhibition of the others).

The loop (discover, localise, penalise, verify) is described in docs/maskfree.md.
"""

from __future__ import annotations

from negspace._lazy import attach

# public name -> submodule of this package that defines it
_LAZY: dict[str, str] = {
    "MaskSource": "source",
    "Detector": "source",
    "as_mask_source": "source",
    "check_mask_output": "source",
    "mask_iou": "source",
    "dilate_mask": "source",
    "IOU_REDUCTIONS": "source",
    "ConceptMask": "concept",
    "REFERENCES": "files",
    "POOLS": "files",
    "fit_direction": "cav",
    "choose_threshold": "cav",
    "localization_map": "cav",
    "layer_features": "cav",
    "default_dilate": "cav",
    "as_grid": "cav",
    "DIRECTION_METHODS": "cav",
    "LOCALIZE": "cav",
    "THRESHOLD_RULES": "cav",
    "otsu_threshold": "cav",
    "discover_artifacts": "discover",
    "Candidate": "discover",
    "save_candidates": "discover",
    "METHODS": "discover",
    "artifact_patch": "verify",
    "insertion_effect": "verify",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
