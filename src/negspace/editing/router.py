"""Virtual-neuron routing (PURE, paper 004, beyond the paper's code): a persistent edit that splits channel
``k`` into its virtual neurons *inside the forward pass* and scales (or ablates, scale 0) one of them while
the others keep working. The virtual neurons are fitted by :func:`negspace.explain.pure.fit_virtual_neurons`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from negspace.attribution.fastpath import is_fast_module
from negspace.editing.routing_module import route_output, virtual_labels
from negspace.explain.pure.virtual import VirtualNeuronSet
from negspace.hooks import PersistentEdit, get_layer

__all__ = ["MODES", "VirtualNeuronRouter"]

#: routing modes: one virtual neuron per sample, or one per position
MODES = ("sample", "position")


class VirtualNeuronRouter(PersistentEdit):
    """Split channel ``k`` of ``virtual_neurons.layer`` into its virtual neurons at inference and scale some.

    Semantics (exact, no backward pass). ``layer`` must be an ``nn.Conv2d`` (groups=1) or ``nn.Linear``
    whose input is the circuit layer (the fast-path structure; the hook reads the layer's input directly).
    For routed neuron ``k`` with filter ``W_k`` the per-position contribution of lower channel ``i`` is
    ``c_i(p) = Σ_j W_k[i, j] · U[i, j, p]`` (so ``z_k(p) = Σ_i c_i(p) + b_k``):

    * ``mode="sample"`` (default, the paper's test-time rule): the sample's circuit
      ``Σ_p r(p) c(p)`` (``r`` = the circuit seed ``vn.reduce``: ``ReLU(z_k)`` for the default ``"relu"``,
      one-hot at the argmax of ``z_k`` for ``"max"``)
      is exactly the circuit used for fitting; the sample goes to the nearest centroid ``j`` and the whole
      output map of channel ``k`` (bias included) is multiplied by ``scales[k][j]``;
    * ``mode="position"``: each position ``p`` is assigned by its own normalised ``c(p)`` and ``z_k(p)`` is
      multiplied by ``scales[k][label(p)]`` (samples mixing two meanings at different places are split).
      For ``reduce="max"`` the label at the argmax position equals the sample label.

    Args:
        virtual_neurons: a fitted :class:`~negspace.explain.pure.VirtualNeuronSet`.
        edits: ``{neuron: {virtual: scale}}`` (unlisted virtual neurons keep scale 1; scale 0 ablates).
        mode: ``"sample"`` or ``"position"``.

    Checkpointable (``state_dict`` holds tensors and strings), removable (``remove()``).
    """

    def __init__(
        self,
        virtual_neurons: VirtualNeuronSet,
        edits: Mapping[int, Mapping[int, float]],
        mode: str = "sample",
    ) -> None:
        super().__init__()
        if not isinstance(virtual_neurons, VirtualNeuronSet):
            raise TypeError(f"virtual_neurons must be a fitted VirtualNeuronSet, got {type(virtual_neurons).__name__}")
        virtual_neurons.check_fitted()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(edits, Mapping) or not edits:
            raise TypeError(f"edits must be a non-empty mapping {{neuron: {{virtual: scale}}}}, got {edits!r}")
        self.vn = virtual_neurons
        self.mode = mode
        self.scales: dict[int, Tensor] = {}
        for k, per in edits.items():
            n = virtual_neurons.n_virtual(int(k))
            s = torch.ones(n)
            if not isinstance(per, Mapping):
                raise TypeError(f"edits[{k}] must be a mapping {{virtual: scale}}, got {per!r}")
            for j, v in per.items():
                if not isinstance(j, int) or not 0 <= j < n:
                    raise ValueError(f"neuron {k} has virtual neurons 0..{n - 1}, got {j!r}")
                if not isinstance(v, int | float) or isinstance(v, bool):
                    raise TypeError(f"scale of neuron {k} virtual {j} must be a float, got {v!r}")
                s[j] = float(v)
            self.scales[int(k)] = s
        self.layers = [virtual_neurons.layer]

    def apply(self, model: nn.Module) -> VirtualNeuronRouter:
        module = get_layer(model, self.vn.layer)
        if not is_fast_module(module):
            raise ValueError(
                f"VirtualNeuronRouter needs layer {self.vn.layer!r} to be an nn.Conv2d (groups=1, zero padding) or "
                f"nn.Linear applied to circuit_layer {self.vn.circuit_layer!r}; got {type(module).__name__}"
            )
        super().apply(model)
        return self

    def edit(self, name: str, output: Tensor, inputs: tuple = ()) -> Tensor:
        """Route the layer's output using its input (the circuit layer's activation)."""
        return self.route(self._modules[name], inputs[0], output)

    def labels(self, module: nn.Module, a: Tensor, out: Tensor, k: int) -> Tensor:
        """Virtual neuron of neuron ``k``: ``(N,)`` (sample mode) or ``(N, P)`` (position mode)."""
        return virtual_labels(module, a, out, k, self.vn.centroids_of(k), self.mode, self.vn.reduce)

    def route(self, module: nn.Module, a: Tensor, output: Tensor) -> Tensor:
        """Edited output of the routed layer given its input ``a`` and output (the maths of
        :func:`negspace.editing.routing_module.route_output`, shared with the baked :class:`RoutedLayer`)."""
        routes = [(k, self.vn.centroids_of(k), s) for k, s in self.scales.items()]
        return route_output(module, a, output, routes, self.mode, self.vn.reduce, name=self.vn.layer)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and strings only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "virtual_neurons": self.vn.state_dict(),
            "mode": self.mode,
            "scales": {str(k): v.clone() for k, v in self.scales.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or not {"virtual_neurons", "mode", "scales"} <= set(state):
            raise ValueError("not a VirtualNeuronRouter state: expected keys virtual_neurons, mode, scales")
        if self.active:
            raise RuntimeError("remove() the router before loading another state into it")
        fresh = type(self).from_state_dict(state)
        self.vn, self.mode, self.scales, self.layers = fresh.vn, fresh.mode, fresh.scales, fresh.layers

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> VirtualNeuronRouter:
        vn = VirtualNeuronSet.from_state_dict(state["virtual_neurons"])
        edits = {int(k): {j: float(v) for j, v in enumerate(torch.as_tensor(t).tolist())} for k, t in state["scales"].items()}
        return cls(vn, edits, mode=str(state["mode"]))

    def __repr__(self) -> str:
        parts = []
        for k, s in self.scales.items():
            changed = [f"v{j}×{float(v):g}" for j, v in enumerate(s.tolist()) if v != 1.0]
            parts.append(f"{k}: [{', '.join(changed) or 'no change'}] of {len(s)}")
        state = f"active on {self._model_name}" if self.active else "inactive"
        return (
            f"VirtualNeuronRouter(layer={self.vn.layer!r}, circuit_layer={self.vn.circuit_layer!r}, mode={self.mode!r}, "
            f"edits={{{', '.join(parts)}}}, {state})"
        )
