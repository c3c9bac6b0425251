"""Virtual-neuron routing as a module: :class:`RoutedLayer` replaces the hook of a
:class:`~negspace.editing.router.VirtualNeuronRouter` (centroids and scales are buffers, no Python-side state), so
the edited model is a plain module that ``torch.export.export`` and ``torch.onnx.export`` accept.

The routing maths lives here once (:func:`virtual_labels`, :func:`route_output`); the router's hook calls it too,
so the module and the hooked model compute the same labels with the same operations.

Two modules:

* :class:`RoutedLayer` — the routed layer is an ``nn.Conv2d`` (groups=1, zero padding) or ``nn.Linear`` whose input
  is the circuit layer; circuits are exact without a backward pass; exports (``torch.export``, ONNX).
* :class:`RoutedBlock` — any other routed layer, e.g. a block output such as ``layer4`` with circuits on
  ``layer4.0``: the circuits are Grad×Act *through the block* (the autograd path, as at fitting time), so each
  forward runs the block once more with a backward. Works in eager PyTorch, also under ``no_grad`` and
  ``inference_mode`` (it re-runs the block on a fresh copy of its input). It does not export, and cannot with
  torch 2.14: ``torch.export`` (strict) rejects ``torch.autograd.grad`` ("trace_autograd_ops=False"), non-strict
  export leaves fake tensors among the program's constants, and ``torch.func.vjp`` exports (non-strict) to a
  program whose outputs are fake tensors. Only ``mode="sample"``: a position of a block output has no circuit of
  its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from negspace.attribution.fastpath import fast_rows, is_fast_module, position_contributions
from negspace.explain.pure.circuit import l1_normalize
from negspace.reduce import channels_last

__all__ = ["RoutedBlock", "RoutedLayer", "nearest_centroid", "route_output", "scale_channels", "virtual_labels"]

Route = tuple[int, Tensor, Tensor]  # (neuron, centroids (k, C), scales (k,))


def virtual_labels(layer: nn.Module, a: Tensor, out: Tensor, k: int, centroids: Tensor, mode: str, reduce: str) -> Tensor:
    """Nearest virtual neuron of neuron ``k`` of ``layer`` (input ``a``, output ``out``): ``(N,)`` for
    ``mode="sample"`` (the sample's circuit, weighted by the gradient of ``reduce``), ``(N, P)`` for
    ``"position"`` (each position's own contributions). Circuits are L1-normalised, distances in float32
    (as :meth:`VirtualNeuronSet.assign_circuits`, up to rounding at exact ties)."""
    cent = centroids.to(device=a.device, dtype=torch.float32)
    kk = torch.full((a.shape[0],), k, dtype=torch.long, device=a.device)
    if mode == "sample":
        c = fast_rows(layer, a, out, torch.arange(a.shape[0], device=a.device), kk, reduce).float()
    else:
        c = position_contributions(layer, a, kk).float()  # (N, P, C)
    return nearest_centroid(l1_normalize(c), cent)


def nearest_centroid(c: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest of ``centroids (k, C)`` for each row of ``c (..., C)``: argmin of
    ``|c − m|² − |c|² = |m|² − 2 c·m`` (torch.cdist's matrix form; ONNX has no cdist)."""
    return ((centroids * centroids).sum(1) - 2 * c @ centroids.T).argmin(dim=-1)


def scale_channels(output: Tensor, factors: Sequence[tuple[int, Tensor]], *, name: str = "") -> Tensor:
    """Multiply channel ``k`` of ``output`` by ``f`` for each ``(k, f)``: ``f (N,)`` per sample or ``(N, P)`` per
    position (positions as in :func:`negspace.reduce.channels_last`)."""
    with torch.no_grad():
        mult = torch.ones_like(channels_last(output))  # (N, P, C_out)
        for k, f in factors:
            if k >= mult.shape[-1]:
                raise ValueError(f"neuron {k} does not exist in layer {name!r} ({mult.shape[-1]} channels)")
            mult[..., k] = f[:, None].to(mult) if f.dim() == 1 else f.to(mult)
    if output.dim() == 4:
        mult = mult.transpose(1, 2).reshape(output.shape)
    elif output.dim() == 2:
        mult = mult[:, 0]
    return output * mult


def route_output(
    layer: nn.Module, a: Tensor, output: Tensor, routes: Sequence[Route], mode: str, reduce: str, *, name: str = ""
) -> Tensor:
    """``output`` of ``layer`` (called ``name``) with channel ``k`` multiplied by ``scales[label]`` for each route
    ``(k, centroids (k_k, C), scales (k_k,))``; labels from :func:`virtual_labels` (no gradient through them)."""
    factors = []
    for k, cent, s in routes:
        if k >= channels_last(output).shape[-1]:
            raise ValueError(f"neuron {k} does not exist in layer {name!r} ({channels_last(output).shape[-1]} channels)")
        with torch.no_grad():
            lab = virtual_labels(layer, a.detach(), output.detach(), k, cent, mode, reduce)
        factors.append((k, s.to(output.device)[lab]))
    return scale_channels(output, factors, name=name)


class RoutedLayer(nn.Module):
    """``layer`` (``Conv2d``/``Linear``) whose routed neurons are split into virtual neurons and scaled.

    Args:
        layer: the routed layer (kept as ``self.layer``: its weights keep their keys under ``.layer``).
        neurons: routed channels (structure, fixed at construction).
        centroids: per neuron ``(k_n, C)``; buffers ``centroids_i``.
        scales: per neuron ``(k_n,)``; buffers ``scales_i``.
        mode: ``"sample"`` or ``"position"``; reduce: the circuit seed of the fitted set (``vn.reduce``; default the paper's ``"relu"``).
    """

    def __init__(
        self,
        layer: nn.Module,
        neurons: Sequence[int],
        centroids: Sequence[Tensor],
        scales: Sequence[Tensor],
        mode: str = "sample",
        reduce: str = "relu",
    ) -> None:
        super().__init__()
        if not is_fast_module(layer):
            raise ValueError(f"layer must be an nn.Conv2d (groups=1, zero padding) or nn.Linear, got {type(layer).__name__}")
        if not len(neurons) == len(centroids) == len(scales):
            raise ValueError(f"neurons, centroids and scales differ in length: {len(neurons)}, {len(centroids)}, {len(scales)}")
        self.layer = layer
        self.neurons = tuple(int(k) for k in neurons)
        self.mode, self.reduce = mode, reduce
        for i, (c, s) in enumerate(zip(centroids, scales, strict=True)):
            self.register_buffer(f"centroids_{i}", torch.as_tensor(c).detach().float().clone())
            self.register_buffer(f"scales_{i}", torch.as_tensor(s).detach().float().clone())

    def routes(self) -> list[Route]:
        return [(k, getattr(self, f"centroids_{i}"), getattr(self, f"scales_{i}")) for i, k in enumerate(self.neurons)]

    def forward(self, a: Tensor) -> Tensor:
        return route_output(self.layer, a, self.layer(a), self.routes(), self.mode, self.reduce)

    def extra_repr(self) -> str:
        return f"neurons={list(self.neurons)}, mode={self.mode!r}, reduce={self.reduce!r}"


class RoutedBlock(nn.Module):
    """A block whose output neurons are routed by their Grad×Act circuits through the block (``mode="sample"``).

    ``segment`` is the part of the network between the circuit layer's output (its input) and the routed
    layer's output (its output), e.g. ``layer4.1`` for ``layer="layer4"``, ``circuit_layer="layer4.0"``. Each
    forward runs ``segment`` once more, in eval mode and with gradients enabled (also under ``no_grad`` and
    ``inference_mode``), to compute the circuits exactly as :func:`negspace.explain.pure.circuits` does at
    fitting time (same labels as :meth:`VirtualNeuronSet.assign`). Eager PyTorch only: a backward inside the
    forward does not export (see the module docstring).
    """

    def __init__(
        self, segment: nn.Module, neurons: Sequence[int], centroids: Sequence[Tensor], scales: Sequence[Tensor],
        reduce: str = "relu",
    ) -> None:
        super().__init__()
        if not len(neurons) == len(centroids) == len(scales):
            raise ValueError(f"neurons, centroids and scales differ in length: {len(neurons)}, {len(centroids)}, {len(scales)}")
        self.segment = segment
        self.neurons = tuple(int(k) for k in neurons)
        self.reduce = reduce
        for i, (c, s) in enumerate(zip(centroids, scales, strict=True)):
            self.register_buffer(f"centroids_{i}", torch.as_tensor(c).detach().float().clone())
            self.register_buffer(f"scales_{i}", torch.as_tensor(s).detach().float().clone())

    def labels(self, a: Tensor) -> Tensor:
        """Virtual neuron of each routed neuron: ``(N, K)``."""
        from negspace.explain.pure.circuit import circuits

        with torch.inference_mode(False), torch.enable_grad():
            x = a.detach().clone()  # a normal tensor also when ``a`` was made under inference_mode
            c = circuits(nn.Sequential(nn.Identity(), self.segment), "1", "0", x, list(self.neurons),
                         reduce=self.reduce, fast=False).detach()
        cols = [nearest_centroid(c[:, i].float(), getattr(self, f"centroids_{i}").to(c.device)) for i in range(len(self.neurons))]
        return torch.stack(cols, dim=1)

    def forward(self, a: Tensor) -> Tensor:
        out = self.segment(a)
        lab = self.labels(a).to(out.device)
        factors = [(k, getattr(self, f"scales_{i}").to(out.device)[lab[:, i]]) for i, k in enumerate(self.neurons)]
        return scale_channels(out, factors)

    def extra_repr(self) -> str:
        return f"neurons={list(self.neurons)}, mode='sample', reduce={self.reduce!r}"
