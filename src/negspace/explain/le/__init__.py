"""Linear Explanations (paper 003, Oikarinen & Weng): neurons as sparse linear combinations of concepts, scored by
simulation.

``explanation`` (:class:`Explanation`, the seeded split), ``linear`` (fitting), ``concepts`` (neuron summaries,
concept matrices from labels and built-in sets), ``clip_concepts`` (CLIP/SigLIP concept matrices, sigmoid
calibration, the paper's top-5 concept filter, cache), ``simulator`` (§4 simulators: :class:`ClipSimulator`,
:class:`MatrixSimulator`), ``correlation`` / ``ablation`` / ``impact`` (scores; exact linear-head fast path in
``_scoring``), ``layer`` (:func:`explain_layer`: a whole layer in one call, DDP-aware), ``figures``
(:func:`area_chart`; the figure lives in :mod:`negspace.plots`). Names are imported lazily.
"""

from __future__ import annotations

from negspace._lazy import attach

_LAZY: dict[str, str] = {
    "Explanation": "explanation",
    "split_indices": "explanation",
    "linear_explanation": "linear",
    "elastic_net_weights": "linear",
    "MIN_VAL_ROWS": "linear",
    "activation_summary": "concepts",
    "label_concepts": "concepts",
    "builtin_concepts": "concepts",
    "BUILTIN_CONCEPT_SETS": "concepts",
    "ConceptSource": "concepts",
    "batch_concepts": "concepts",
    "check_concepts": "concepts",
    "concept_matrix": "concepts",
    "iter_summaries": "concepts",
    "required_roles": "concepts",
    "split_batch": "concepts",  # deprecated (warns when called): use negspace.batch.unpack_batch
    "clip_concept_matrix": "clip_concepts",
    "ConceptMatrix": "clip_concepts",
    "filter_concepts": "clip_concepts",
    "ClipSimulator": "simulator",
    "MatrixSimulator": "simulator",
    "ConceptSimulator": "simulator",
    "check_simulator": "simulator",
    "clip_cosines": "clip_concepts",
    "fit_sigmoid_calibration": "clip_concepts",
    "data_fingerprint": "clip_concepts",
    "correlation_score": "correlation",
    "ablation_score": "ablation",
    "SCALINGS": "ablation",
    "top_impact": "impact",
    "area_chart": "figures",
    "Collected": "layer",
    "LayerExplanations": "layer",
    "collect_activations": "layer",
    "explain_layer": "layer",
    "write_explanations_csv": "layer",
    # the one per-channel summary (formerly a copy in negspace.explain.concepts)
    "summarize": "negspace.reduce",
    "REDUCES": "negspace.reduce",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
