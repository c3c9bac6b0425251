"""PURE (paper 004): circuits of hidden neurons, k-means "virtual" neurons, and their CLIP evaluation.

* :mod:`.references` — top-``n_ref`` reference samples per neuron (running top-k, one pass);
* :mod:`.circuit` — circuits (Grad×Act of the circuit layer's channels), autograd path and the exact
  conv/linear fast path (:mod:`negspace.attribution.fastpath`);
* :mod:`.virtual` — :class:`VirtualNeuronSet` (fit, assign, state, safetensors);
* :mod:`.fit` — :func:`fit_virtual_neurons` from a dataset, also under ``torch.distributed``;
* :mod:`.crops` / :mod:`.evaluation` — attribution-cropped references, embeddings, cluster distances,
  the activation-clustering baseline.

The edit that routes virtual neurons inside the forward pass is :class:`negspace.editing.VirtualNeuronRouter`.
Public names are imported lazily.
"""

from __future__ import annotations

from negspace._lazy import attach

_LAZY: dict[str, str] = {
    "References": "references",
    "reference_samples": "references",
    "reference_images": "references",
    "neuron_indices": "_common",
    "FAST": "circuit",
    "circuits": "circuit",
    "check_layers": "circuit",
    "circuit_rows": "circuit",
    "reference_circuits": "circuit",
    "l1_normalize": "circuit",
    "VirtualNeuronSet": "virtual",
    "inter_intra": "virtual",
    "circuit_structure": "virtual",
    "fit_virtual_neurons": "fit",
    "attribution_heatmaps": "crops",
    "gaussian_smooth": "crops",
    "crop_boxes": "crops",
    "crop_references": "crops",
    "embed": "evaluation",
    "cluster_distances": "evaluation",
    "polysemanticity": "evaluation",
    "activation_vectors": "evaluation",
    "activation_clustering": "evaluation",
    "distance_correlation": "evaluation",
    "compare_clusterings": "evaluation",
    "evaluate_virtual_neurons": "evaluation",
    "NeuronReport": "evaluation",
    "MODES": "negspace.editing.router",
}

_DEPRECATED: dict[str, str] = {
    "VirtualNeurons": "negspace.explain.pure:VirtualNeuronSet",
    "eval_mode": "negspace.hooks:eval_mode",
}

__getattr__, __dir__, __all__ = attach(__name__, _LAZY, _DEPRECATED)
