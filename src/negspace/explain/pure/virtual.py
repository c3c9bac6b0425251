"""PURE virtual neurons (paper 004): k-means on the reference circuits of each neuron; each centroid is a
*virtual neuron*. :meth:`VirtualNeuronSet.assign` gives new samples the nearest centroid (the test-time rule
of the paper's Fig. 2, beyond the paper's code); fitted sets are checkpointable and saved as safetensors.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from negspace.explain.pure._common import check_fast, check_pure_reduce, neuron_indices
from negspace.explain.pure.circuit import circuits, l1_normalize
from negspace.explain.pure.references import References
from negspace.stats import kmeans

__all__ = ["VirtualNeuronSet", "circuit_structure", "inter_intra"]

#: a split is reported as meaningless when the silhouette beats the null's by less than this ...
MIN_SILHOUETTE_GAIN = 0.1
#: ... or when the clusters' distance gap is below this fraction of the circuits' mean L2 norm
MIN_RELATIVE_SEPARATION = 0.05


def inter_intra(x: Tensor, labels: Tensor) -> tuple[float, float]:
    """Mean Euclidean distance between points of different clusters and between distinct points of the
    same cluster (paper 004, eq. 5): ``x (N, D)``, ``labels (N,)`` → ``(inter, intra)`` (NaN if undefined)."""
    d = torch.cdist(x.detach().double().flatten(1), x.detach().double().flatten(1))
    lab = torch.as_tensor(labels).flatten().to(d.device)
    same = lab[:, None] == lab[None, :]
    intra = same & ~torch.eye(len(lab), dtype=torch.bool, device=d.device)
    inter = ~same
    nan = float("nan")
    return (float(d[inter].mean()) if inter.any() else nan, float(d[intra].mean()) if intra.any() else nan)


def _silhouette(x: Tensor, lab: Tensor) -> float:
    """Mean silhouette coefficient (as ``sklearn.metrics.silhouette_score``, Euclidean; 0 for singletons)."""
    d = torch.cdist(x, x)
    ks = lab.unique()  # sorted
    idx = torch.searchsorted(ks, lab)  # (n,) cluster position of each point
    onehot = torch.nn.functional.one_hot(idx, len(ks)).to(d.dtype)  # (n, k)
    size = onehot.sum(0)
    sums = d @ onehot  # (n, k): summed distances to each cluster
    rows = torch.arange(len(x))
    own = size[idx]
    a = sums[rows, idx] / (own - 1).clamp_min(1)
    other = sums / size
    other[rows, idx] = float("inf")
    b = other.amin(1)
    sil = (b - a) / torch.maximum(a, b).clamp_min(1e-300)
    return float(torch.where(own > 1, sil, torch.zeros_like(sil)).mean())


def circuit_structure(c: Tensor, labels: Tensor, *, seed: int = 0) -> Tensor:
    """Is the k-means split of circuits ``c (n, C)`` (labels ``(n,)``) real? → ``(silhouette, null silhouette,
    relative separation)``.

    The null: the same circuits with every channel permuted independently across samples (marginals kept,
    joint structure destroyed), clustered with the same ``k``. Relative separation = ``(ρ_inter − ρ_intra) /
    mean ‖c‖₂``. k-means always reports ``ρ_inter > ρ_intra``; these two numbers tell a split of distinct
    circuits (toy two-circuit neuron: silhouette 0.99 vs null 0.07, separation 1.3) from an arbitrary one
    (monosemantic neuron: separation 0.0; with random weights silhouette 0.19 vs null 0.15). NaN entries when
    undefined (fewer than two clusters).
    """
    x = c.detach().double().cpu()
    lab = torch.as_tensor(labels).flatten().long()
    k = int(lab.unique().numel())
    nan = float("nan")
    if k < 2 or k >= len(x):
        return torch.tensor([nan, nan, nan])
    sil = _silhouette(x, lab)
    g = torch.Generator().manual_seed(seed)
    xn = x.gather(0, torch.argsort(torch.rand(x.shape, generator=g), dim=0))
    lab_n, _ = kmeans(xn, k, seed=seed, n_init=1)
    null = _silhouette(xn, lab_n) if 1 < lab_n.unique().numel() < len(x) else 0.0
    inter, intra = inter_intra(x, lab)
    rel = (inter - intra) / float(x.norm(dim=1).mean().clamp_min(1e-30))
    return torch.tensor([sil, null, rel])


def _cluster(c: Tensor, k: int | str, k_range: tuple[int, int], seed: int, n_init: int) -> tuple[Tensor, Tensor]:
    """k-means on circuits ``(n, C)`` → ``(centroids, labels)``; ``k="auto"``: best silhouette in ``k_range``."""
    from sklearn.metrics import silhouette_score

    x = c.double()
    candidates = list(range(k_range[0], k_range[1] + 1)) if k == "auto" else [int(k)]
    best = None
    for kk in candidates:
        if kk > len(x):
            continue
        labels, cent = kmeans(x, kk, seed=seed, n_init=n_init)
        n_distinct = labels.unique().numel()
        score = silhouette_score(x.numpy(), labels.numpy()) if 1 < n_distinct < len(x) else -1.0
        if best is None or score > best[0]:
            best = (score, cent, labels)
    if best is None:
        raise ValueError(f"k={k} needs at least {candidates[0]} reference samples, got {len(x)}")
    return best[1], best[2]


class VirtualNeuronSet:
    """Fitted PURE virtual neurons: per neuron of ``layer``, k-means centroids of its reference circuits.

    Args:
        layer: dotted name of the layer whose channels are split (``L``).
        circuit_layer: dotted name of the lower layer the circuits live on (``L−1``).
        k: clusters per neuron (``int >= 2``), or ``"auto"``: the best silhouette score in ``k_range``.
        reduce: the circuit seed: ``"relu"`` (default, the paper's code: ``ReLU(A_k)`` at every position) or a
            spatial reduction (``"max"``: one-hot at the argmax, negspace ≤ 0.2); references use the spatial max.
        fast: circuit fast path (see :func:`negspace.explain.pure.circuits`).

    After :meth:`fit`: ``neurons`` (list of ints), ``centroids[k]: (k_k, C)``, ``labels[k]: (n_ref,)`` the
    clusters of the reference samples, ``separation[k]``: ``(inter, intra)`` circuit distances.
    """

    def __init__(
        self,
        layer: str,
        circuit_layer: str,
        *,
        k: int | str = 2,
        k_range: tuple[int, int] = (2, 5),
        reduce: str = "relu",
        fast: bool | str = "auto",
        seed: int = 0,
        n_init: int = 10,
    ) -> None:
        if not isinstance(layer, str) or not isinstance(circuit_layer, str):
            raise TypeError(f"layer and circuit_layer must be dotted names, got {layer!r}, {circuit_layer!r}")
        if k != "auto" and (not isinstance(k, int) or isinstance(k, bool) or k < 2):
            raise ValueError(f"k must be an int >= 2 or 'auto', got {k!r}")
        if not (isinstance(k_range, Sequence) and len(k_range) == 2 and 2 <= k_range[0] <= k_range[1]):
            raise ValueError(f"k_range must be (low, high) with 2 <= low <= high, got {k_range!r}")
        if layer == circuit_layer:
            raise ValueError(f"circuit_layer must be a layer below layer {layer!r}, got the same layer {circuit_layer!r}")
        check_pure_reduce(reduce)
        check_fast(fast)
        self.layer, self.circuit_layer = layer, circuit_layer
        self.k, self.k_range, self.reduce, self.fast = k, (int(k_range[0]), int(k_range[1])), reduce, fast
        self.seed, self.n_init = seed, n_init
        self.neurons: list[int] = []
        self.centroids: dict[int, Tensor] = {}
        self.labels: dict[int, Tensor] = {}
        self.separation: dict[int, Tensor] = {}  # neuron -> (inter, intra) circuit distances of the references
        self.structure: dict[int, Tensor] = {}  # neuron -> (silhouette, null silhouette, relative separation)
        self.references: References | None = None
        self.reference_ranks: Tensor | None = None  # (K, n_ref) rank holding each reference (DDP)

    # fitting ---------------------------------------------------------------------------------------
    def fit(self, circuits: Tensor | Mapping[int, Tensor], neurons: Sequence[int] | Tensor | None = None) -> VirtualNeuronSet:
        """Cluster reference circuits: ``(K, n_ref, C)`` with ``neurons (K,)``, or ``{neuron: (n_ref, C)}``."""
        if isinstance(circuits, Mapping):
            items = [(int(k), torch.as_tensor(v)) for k, v in circuits.items()]
        else:
            lst = neuron_indices(neurons)
            if not isinstance(circuits, Tensor) or circuits.dim() != 3 or lst is None or len(lst) != circuits.shape[0]:
                shape = tuple(circuits.shape) if isinstance(circuits, Tensor) else type(circuits).__name__
                raise ValueError(f"circuits must be (K, n_ref, C) with neurons of length K, got {shape}, {neurons!r}")
            items = list(zip(lst.tolist(), circuits))
        need = self.k_range[0] if self.k == "auto" else int(self.k)
        self.neurons, self.centroids, self.labels, self.separation, self.structure = [], {}, {}, {}, {}
        for k, c in items:
            if c.dim() != 2:
                raise ValueError(f"circuits of neuron {k} must be (n_ref, C), got {tuple(c.shape)}")
            if need > c.shape[0]:
                raise ValueError(f"k={self.k} is larger than n_ref={c.shape[0]} (reference samples of neuron {k})")
            cent, lab = _cluster(c.detach().float().cpu(), self.k, self.k_range, self.seed, self.n_init)
            self.neurons.append(k)
            self.centroids[k], self.labels[k] = cent, lab
            self.separation[k] = torch.tensor(inter_intra(c.detach().float().cpu(), lab))
            self.structure[k] = circuit_structure(c, lab, seed=self.seed)
        self._warn_arbitrary()
        return self

    def arbitrary(self) -> list[int]:
        """Fitted neurons whose split shows no distinct circuits (see :func:`circuit_structure`): silhouette
        less than ``MIN_SILHOUETTE_GAIN`` above the null's, or relative separation below ``MIN_RELATIVE_SEPARATION``."""
        out = []
        for k, (sil, null, rel) in ((k, v.tolist()) for k, v in self.structure.items()):
            if not (sil - null >= MIN_SILHOUETTE_GAIN and rel >= MIN_RELATIVE_SEPARATION):  # NaN counts as arbitrary
                out.append(k)
        return out

    def _warn_arbitrary(self) -> None:
        bad = self.arbitrary()
        if bad:
            detail = ", ".join(
                f"{k}: silhouette {self.structure[k][0]:.2f} vs null {self.structure[k][1]:.2f}, "
                f"separation {self.structure[k][2]:.2g}" for k in bad[:5]
            )
            warnings.warn(
                f"PURE: {len(bad)} of {len(self.neurons)} neurons of {self.layer!r} show no distinct circuits on "
                f"{self.circuit_layer!r} ({detail}{', ...' if len(bad) > 5 else ''}); their virtual neurons split "
                "arbitrarily. Fix: use more (and more varied) data or a larger n_ref so that both meanings are among "
                "the references, or another circuit_layer; vn.arbitrary() lists them.",
                UserWarning,
                stacklevel=3,
            )

    def check_fitted(self) -> None:
        """Raise ``RuntimeError`` unless :meth:`fit` (or a state load) has run."""
        if not self.neurons:
            raise RuntimeError("VirtualNeuronSet is not fitted; call fit() or fit_virtual_neurons() first")

    def n_virtual(self, neuron: int) -> int:
        """Number of virtual neurons of ``neuron``."""
        return int(self.centroids_of(neuron).shape[0])

    def centroids_of(self, neuron: int) -> Tensor:
        """Centroids ``(k, C)`` of a fitted neuron (a ``ValueError`` listing the fitted ones otherwise)."""
        self.check_fitted()
        if neuron not in self.centroids:
            raise ValueError(f"neuron {neuron!r} was not fitted; fitted neurons of {self.layer!r}: {self.neurons}")
        return self.centroids[neuron]

    # assignment ------------------------------------------------------------------------------------
    def assign_circuits(self, c: Tensor, neuron: int | Sequence[int]) -> Tensor:
        """Nearest centroid: circuits ``(B, C)`` of one neuron → ``(B,)``; ``(B, K, C)`` of K neurons → ``(B, K)``.

        Circuits are L1-normalised first (as at fitting time).
        """
        if isinstance(neuron, int):
            if c.dim() != 2:
                raise ValueError(f"circuits of one neuron must be (B, C), got {tuple(c.shape)}")
            cent = self.centroids_of(neuron).to(c)
            if cent.shape[1] != c.shape[1]:
                raise ValueError(f"circuits have {c.shape[1]} channels, the centroids {cent.shape[1]}")
            return torch.cdist(l1_normalize(c), cent).argmin(dim=1)
        lst = list(neuron)
        if c.dim() != 3 or c.shape[1] != len(lst):
            raise ValueError(f"circuits of {len(lst)} neurons must be (B, {len(lst)}, C), got {tuple(c.shape)}")
        return torch.stack([self.assign_circuits(c[:, i], n) for i, n in enumerate(lst)], dim=1)

    def assign(self, model: nn.Module, x: Tensor, neuron: int | Sequence[int] | None = None) -> Tensor:
        """Virtual neuron of each sample (nearest centroid to its circuit) — beyond the paper's code.

        ``neuron``: an int (→ ``(B,)``), a list (→ ``(B, K)``), or ``None`` = all fitted neurons (→ ``(B, K)``).
        """
        self.check_fitted()
        sel: int | list[int] = self.neurons if neuron is None else neuron if isinstance(neuron, int) else list(neuron)
        for n in [sel] if isinstance(sel, int) else sel:
            self.centroids_of(n)
        c = circuits(model, self.layer, self.circuit_layer, x, sel, reduce=self.reduce, fast=self.fast)
        return self.assign_circuits(c.detach(), sel)

    # state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints and strings only (loads with ``torch.load(weights_only=True)``)."""
        self.check_fitted()
        state: dict[str, Any] = {
            "layer": self.layer,
            "circuit_layer": self.circuit_layer,
            "reduce": self.reduce,
            "k": str(self.k),
            "neurons": torch.tensor(self.neurons, dtype=torch.long),
            "centroids": {str(k): v.clone() for k, v in self.centroids.items()},
            "labels": {str(k): v.clone() for k, v in self.labels.items()},
            "separation": {str(k): v.clone() for k, v in self.separation.items()},
            "structure": {str(k): v.clone() for k, v in self.structure.items()},
        }
        if self.references is not None:
            state["ref_indices"] = self.references.indices.clone()
            state["ref_values"] = self.references.values.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        need = {"layer", "circuit_layer", "reduce", "neurons", "centroids"}
        if not isinstance(state, Mapping) or not need <= set(state):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a VirtualNeuronSet state: expected keys {sorted(need)}, got {got}")
        self.layer, self.circuit_layer, self.reduce = str(state["layer"]), str(state["circuit_layer"]), str(state["reduce"])
        k = str(state.get("k", "2"))
        self.k = "auto" if k == "auto" else int(k)
        self.neurons = [int(n) for n in torch.as_tensor(state["neurons"]).tolist()]
        self.centroids = {int(k): torch.as_tensor(v).float() for k, v in state["centroids"].items()}
        self.labels = {int(k): torch.as_tensor(v).long() for k, v in state.get("labels", {}).items()}
        self.separation = {int(k): torch.as_tensor(v).float() for k, v in state.get("separation", {}).items()}
        self.structure = {int(k): torch.as_tensor(v).float() for k, v in state.get("structure", {}).items()}
        self.references = None
        if "ref_indices" in state:
            self.references = References(
                self.layer, torch.tensor(self.neurons), torch.as_tensor(state["ref_indices"]), torch.as_tensor(state["ref_values"])
            )

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> VirtualNeuronSet:
        vn = cls(str(state["layer"]), str(state["circuit_layer"]), reduce=str(state["reduce"]))
        vn.load_state_dict(state)
        return vn

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (tensors; names and options in its string metadata)."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {"neurons": state["neurons"]}
        for key in ("centroids", "labels", "separation", "structure"):
            tensors.update({f"{key}.{k}": v.contiguous() for k, v in state[key].items()})
        for key in ("ref_indices", "ref_values"):
            if key in state:
                tensors[key] = state[key].contiguous()
        meta = {k: state[k] for k in ("layer", "circuit_layer", "reduce", "k")}
        save_file(tensors, str(path), metadata={"negspace": json.dumps(meta), "format": "pt"})

    @classmethod
    def load(cls, path: str | Path) -> VirtualNeuronSet:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("negspace", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not meta:
            raise ValueError(f"{path} is not a VirtualNeuronSet file (no negspace metadata)")
        state: dict[str, Any] = dict(meta)
        state["neurons"] = tensors["neurons"]
        for key in ("centroids", "labels", "separation", "structure"):
            state[key] = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(key + ".")}
        for key in ("ref_indices", "ref_values"):
            if key in tensors:
                state[key] = tensors[key]
        return cls.from_state_dict(state)

    def __repr__(self) -> str:
        name = type(self).__name__
        if not self.neurons:
            return f"{name}(layer={self.layer!r}, circuit_layer={self.circuit_layer!r}, k={self.k!r}, unfitted)"
        parts = ", ".join(f"{n}: {self.n_virtual(n)}" for n in self.neurons[:8])
        more = ", ..." if len(self.neurons) > 8 else ""
        return (
            f"{name}(layer={self.layer!r}, circuit_layer={self.circuit_layer!r}, reduce={self.reduce!r}, "
            f"{len(self.neurons)} neurons {{neuron: n_virtual}} = {{{parts}{more}}})"
        )
