"""Group-robust baselines that need no masks (pure torch, no Lightning).

* :mod:`.losses` — per-sample criteria, group counts and inverse-frequency class/group weights;
* :mod:`.groupdro` — GroupDRO (Sagawa et al. 2020): exponentiated-gradient group weights;
* :mod:`.jtt` — Just Train Twice (Liu et al. 2021): the error set of the first model, upweighted;
* :mod:`.dfr` — Deep Feature Reweighting (Kirichenko et al. 2023): last layer refit on group-balanced held-out
  features.

The Lightning glue is :mod:`negspace.callbacks.robust`; see ``docs/baselines.md``.
"""

from __future__ import annotations

from negspace._lazy import attach

# public name -> submodule of this package that defines it
_LAZY: dict[str, str] = {
    "CRITERIA": "losses",
    "check_criterion": "losses",
    "group_counts": "losses",
    "inverse_frequency_weights": "losses",
    "per_sample_loss": "losses",
    "weighted_mean": "losses",
    "group_mean_losses": "groupdro",
    "groupdro_loss": "groupdro",
    "groupdro_update": "groupdro",
    "error_set": "jtt",
    "jtt_weights": "jtt",
    "DFRResult": "dfr",
    "balanced_subset": "dfr",
    "fit_dfr": "dfr",
    "head_features": "dfr",
    "set_head": "dfr",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
