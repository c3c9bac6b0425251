"""Hidden-unit contributions (paper 002, CODEC) for several layers in the same passes.

Methods, for a hidden activation ``a`` at a layer and a scalar target ``T``:

* ``act_grad``: ``a · ∂T/∂a`` (one forward, one backward for all layers);
* ``act_normgrad``: ``a · g / ‖g‖`` with the gradient normalised per sample over all its non-batch
  dims (the reference implementation's "activation × normalised gradient");
* ``integrated``: CODEC's hidden IG (paper 002, eqs. 17–21): the path is straight in *input* space,
  ``x_k = x0 + (k/m)(x - x0)`` for ``k = 0..m``; in hidden space the line integral is taken with the
  trapezoid rule, ``Σ_k ½(g_{k-1} + g_k)(a_k - a_{k-1})``. Summed over all units of a layer that
  separates input from output it gives ``T(x) - T(x0)`` up to the trapezoid error;
* ``input_grad``: ``g · (J_a (x - x0))`` — InputGrad extended to hidden units (eq. 8). The
  Jacobian-vector product comes from one forward-mode pass; for bias-free positively homogeneous
  networks ``J_a x = a`` (Euler), so it equals ``act_grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor, nn

from negspace.attribution.engine import (
    Target,
    as_target,
    check_input,
    fix_objective,
    forward_objective,
    grads_per_target,
    make_baseline,
    steps_per_chunk,
)
from negspace.hooks import capture, normalize_layers

__all__ = ["METHODS", "layer_contributions"]

METHODS = ("act_grad", "act_normgrad", "integrated", "input_grad")


def _k_first_to_second(t: Tensor, multi: bool) -> Tensor:
    return t.movedim(0, 1) if multi else t


def _acts(cap_acts: dict[str, Tensor], names: Sequence[str], objective: object) -> list[Tensor]:
    missing = [n for n in names if n not in cap_acts]
    if missing:
        where = getattr(objective, "layer", None)
        extra = f" before the objective's layer {where!r}" if where else ""
        raise ValueError(f"layers {missing} did not run{extra} in the forward pass, so they cannot contribute")
    acts = [cap_acts[n] for n in names]
    for n, a in zip(names, acts):
        if not a.requires_grad:
            raise ValueError(f"layer {n!r} output does not require grad (is it detached or under no_grad?)")
    return acts


def _graph_input(x: Tensor) -> Tensor:
    """Detached input that requires grad, so hidden activations join the autograd graph also when every
    parameter is frozen (``requires_grad=False``, e.g. hand-set or frozen backbones)."""
    return x.detach().requires_grad_(True)


def _normalize_grad(g: Tensor, multi: bool) -> Tensor:
    dims = tuple(range(2 if multi else 1, g.dim()))
    return g / g.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp_min(1e-12)


def layer_contributions(
    model: nn.Module,
    layers: str | Sequence[str],
    x: Tensor,
    target: Target,
    *,
    method: str = "act_grad",
    n_steps: int = 10,
    baseline: float | Tensor | None = None,
    create_graph: bool = False,
    internal_batch_size: int | None = None,
) -> Tensor | dict[str, Tensor]:
    """Contributions of the units of one or more hidden layers to ``target``.

    Args:
        model: the network (hidden layers are named by dotted path).
        layers: a dotted name (→ Tensor) or a list of names (→ ``{name: Tensor}``, same passes).
        x: ``(B, ...)`` input batch.
        target: int, LongTensor ``(B,)``/``(B, K)``, or an objective (``objectives.neuron(...)`` to
            attribute hidden units to another hidden unit).
        method: one of :data:`METHODS`.
        n_steps: intervals of the ``integrated`` path (``n_steps + 1`` forward points).
        baseline: input-space baseline for ``integrated``/``input_grad`` (default zeros).

    Returns:
        Per layer, shaped like its output (``(B, C, H, W)`` or ``(B, T, D)``), or ``(B, K, ...)`` for K targets.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    names, single = normalize_layers(layers)
    check_input(x)
    objective = fix_objective(model, x, as_target(target))
    if method in ("act_grad", "act_normgrad"):
        result = _act_grad(model, names, x, objective, method == "act_normgrad", create_graph)
    elif method == "input_grad":
        result = _input_grad(model, names, x, objective, baseline, create_graph)
    else:
        result = _integrated(model, names, x, objective, baseline, n_steps, create_graph, internal_batch_size)
    return result[names[0]] if single else result


def _act_grad(
    model: nn.Module, names: list[str], x: Tensor, objective: Callable, normalize: bool, create_graph: bool
) -> dict[str, Tensor]:
    with torch.enable_grad(), capture(model, names) as cap:
        vals = forward_objective(model, _graph_input(x), objective)
        acts = _acts(cap.activations, names, objective)
        grads = grads_per_target(vals, acts, create_graph=create_graph)
    multi = vals.dim() == 2
    out = {}
    for n, a, g in zip(names, acts, grads):
        if normalize:
            g = _normalize_grad(g, multi)
        a = a if create_graph else a.detach()
        out[n] = _k_first_to_second(a.unsqueeze(0) * g if multi else a * g, multi)
    return out


def _input_grad(
    model: nn.Module,
    names: list[str],
    x: Tensor,
    objective: Callable,
    baseline: float | Tensor | None,
    create_graph: bool,
) -> dict[str, Tensor]:
    tangent = (x - make_baseline(baseline, x)).detach()
    # forward-mode pass: J_a · (x - x0) for every captured layer at once
    with torch.no_grad(), fwad.dual_level(), capture(model, names) as cap:
        model(fwad.make_dual(x.detach(), tangent))
        jvps = {}
        for n in names:
            if n not in cap.activations:
                raise ValueError(f"layer {n!r} did not run in the forward pass")
            t = fwad.unpack_dual(cap.activations[n]).tangent
            jvps[n] = torch.zeros_like(fwad.unpack_dual(cap.activations[n]).primal) if t is None else t.clone()
    with torch.enable_grad(), capture(model, names) as cap:
        vals = forward_objective(model, _graph_input(x), objective)
        acts = _acts(cap.activations, names, objective)
        grads = grads_per_target(vals, acts, create_graph=create_graph)
    multi = vals.dim() == 2
    return {n: _k_first_to_second((jvps[n].unsqueeze(0) if multi else jvps[n]) * g, multi) for n, g in zip(names, grads)}


def _integrated(
    model: nn.Module,
    names: list[str],
    x: Tensor,
    objective: Callable,
    baseline: float | Tensor | None,
    n_steps: int,
    create_graph: bool,
    internal_batch_size: int | None,
) -> dict[str, Tensor]:
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    base = make_baseline(baseline, x).detach()
    delta = (x.detach() - base)
    b = x.shape[0]
    points = n_steps + 1
    per_chunk = steps_per_chunk(points, b, internal_batch_size)
    alphas = torch.linspace(0, 1, points, dtype=x.dtype, device=x.device)
    total: dict[str, Tensor] = {}
    prev: dict[str, tuple[Tensor, Tensor]] = {}  # last (activation, gradient) of the previous chunk
    multi = False
    with torch.enable_grad():
        for start in range(0, points, per_chunk):
            a = alphas[start : start + per_chunk]
            s = len(a)
            shape = (-1,) + (1,) * x.dim()
            path = (base.unsqueeze(0) + a.view(shape) * delta.unsqueeze(0)).flatten(0, 1)
            with capture(model, names) as cap:
                vals = forward_objective(model, _graph_input(path), objective, groups=s)
                acts = _acts(cap.activations, names, objective)
                grads = grads_per_target(vals, acts, create_graph=create_graph)
            multi = vals.dim() == 2
            for n, act, g in zip(names, acts, grads):
                act = act if create_graph else act.detach()
                act = act.unflatten(0, (s, b))  # (S, B, ...)
                g = g.unflatten(1, (s, b)) if multi else g.unflatten(0, (s, b))  # (K, S, B, ...) or (S, B, ...)
                if n in prev:
                    act = torch.cat([prev[n][0].unsqueeze(0), act])
                    g = torch.cat([prev[n][1].unsqueeze(1 if multi else 0), g], dim=1 if multi else 0)
                if act.shape[0] >= 2:
                    da = act[1:] - act[:-1]
                    if multi:
                        part = (0.5 * (g[:, 1:] + g[:, :-1]) * da.unsqueeze(0)).sum(1)
                    else:
                        part = (0.5 * (g[1:] + g[:-1]) * da).sum(0)
                    total[n] = part if n not in total else total[n] + part
                prev[n] = (act[-1], g[:, -1] if multi else g[-1])
    return {n: _k_first_to_second(t, multi) for n, t in total.items()}
