"""Tension and absences (papers 001 and 000): what *inhibits* a feature.

* :mod:`.stats` — layer-to-feature attribution ``S_l`` (001 eq. 1), ``E±`` (eq. 2), ``φ±`` (eq. 3), per-dataset
  statistics and the completeness correlation;
* :mod:`.selection` — MEIs / MIIs, maximally tense images, uniqueness ``U`` (eq. 6);
* :mod:`.patches` — most / least activating patches per channel (000 B.3, sliding window, all channels at once);
* :mod:`.insertion` — the patch-insertion test (000 §5.3, ``scipy.stats.ttest_ind`` least vs random);
* :mod:`.important` — class-important channels (000 B.3, relative IG ``>= 0.05``);
* :mod:`.nontarget` — non-target attribution (000 §4);
* :mod:`.featureviz` — visualisation by maximisation / minimisation, ± attribution inversion with dot·cos;
* :mod:`.atlas` — the feature attribution atlas (001 §5);
* :mod:`.report` — all of it for chosen channels in one call (what ``callbacks.TensionReport`` runs).

Names are imported lazily; the 0.1 modules ``negspace.explain.featureviz`` and ``negspace.explain.atlas`` are
deprecated aliases of this package.
"""

from __future__ import annotations

from negspace._lazy import attach

_NAMES: dict[str, tuple[str, ...]] = {
    "stats": (
        "Feature", "TensionResult", "as_feature", "completeness_correlation", "e_split",
        "layer_to_feature_attribution", "phi_maps", "phi_normalize", "tension_stats",
    ),
    "selection": ("MTI_SUBTYPES", "mti_subtypes", "select_images", "select_mti", "uniqueness"),
    "important": ("ImportantChannels", "class_important_channels"),
    "patches": ("PatchResult", "activating_patches", "channel_values", "gather_windows", "unfold_windows"),
    "insertion": ("InsertionResult", "insertion_test"),
    "nontarget": ("non_target_attribution",),
    "featureviz": (
        "TRANSFORMS", "FourierImage", "attribution_inversion", "crop_and_noise", "dot_cos", "random_transform",
        "visualize",
    ),
    "atlas": ("Atlas", "attribution_atlas", "embed_2d", "grid_average", "select_top_norm"),
    "report": ("check_channels", "tension_report"),
    "negspace.batch": ("collect_images",),
}  # fmt: skip

__getattr__, __dir__, __all__ = attach(__name__, {n: mod for mod, names in _NAMES.items() for n in names})
