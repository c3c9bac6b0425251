"""Make an edit permanent: :func:`bake` returns a plain module, without negspace hooks, whose outputs equal the
hooked model's.

A :class:`~negspace.editing.channels.ChannelEdit` replaces channels of a layer's output by constants. Where the
maths allows, the constants are folded into weights (exact, no extra work at inference):

* ``"own"``: the edited layer's own per-channel parameters (``Conv*d``, ``Linear``, affine ``BatchNorm*d``,
  ``GroupNorm``, ``LayerNorm``/timm ``LayerNorm2d``): weight row ``c`` → 0 and bias ``c`` → the value, when the
  parameters' channel axis is the edit's channel axis (see :func:`negspace.reduce.channel_dim`);
* ``"next"``: the input weights of the one layer that consumes the output (a ``Linear``, or a ``Conv*d`` — for a
  non-zero value only without padding): column ``c`` → 0, its contribution ``W[:, c]·value`` moves into the bias.
  This needs an ``example`` input to see the graph, and is accepted only if that layer is the output's only
  consumer in the autograd graph and both layers run once;
* otherwise ``"mask"``: the layer is wrapped in :class:`EditedLayer`, which applies a :class:`ChannelFill`
  (registered constant mask and values, or the batch mean for ``value="mean"``) to its output.

A :class:`~negspace.editing.router.VirtualNeuronRouter` is input-dependent and becomes a module instead (see
:mod:`negspace.editing.routing_module`).

With an ``example`` the result is checked against the hooked model on it; if a ``"next"`` fold does not match
(a consumer the graph cannot show, such as a non-differentiable use), those layers fall back to ``"mask"``.
Folds target inference: in training mode, dropout after a ``"next"``-folded non-zero value acts differently.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from negspace.editing.channels import ChannelEdit
from negspace.editing.probe import Example, GraphProbe, as_args, tensors_of
from negspace.hooks import PersistentEdit, eval_mode, get_layer
from negspace.reduce import channel_dim

__all__ = ["FOLDS", "BakeStep", "ChannelFill", "EditedLayer", "bake", "bake_plan", "edit_channels"]

FOLDS = ("auto", "own", "none")


class ChannelFill(nn.Module):
    """Replace ``channels`` (buffer, ``(K,)``) of a tensor — or, with ``preserve=True``, all other channels — by
    ``value`` (buffer: a scalar or ``(C,)``) or, with ``batch_mean=True``, by each channel's mean over the batch and
    positions. The channel axis is :func:`negspace.reduce.channel_dim`, as for the hooked edit."""

    def __init__(
        self, channels: Tensor, value: float | Tensor = 0.0, *, preserve: bool = False, batch_mean: bool = False
    ) -> None:
        super().__init__()
        idx = torch.as_tensor(channels, dtype=torch.long).flatten()
        values = torch.as_tensor(value, dtype=torch.float64).detach().clone()
        if values.dim() > 1:
            raise ValueError(f"value must be a scalar or a (C,) tensor, got shape {tuple(values.shape)}")
        self.register_buffer("channels", idx)
        self.register_buffer("values", values)
        self.preserve, self.batch_mean = bool(preserve), bool(batch_mean)
        self.limit = int(idx.max()) + 1 if idx.numel() else 0  # a Python int: no data-dependent guard in export

    @classmethod
    def of(cls, edit: ChannelEdit, name: str) -> ChannelFill:
        """The fill that layer ``name`` of ``edit`` applies."""
        v = edit.value
        value = torch.as_tensor(v[name]) if isinstance(v, Mapping) else 0.0 if v in ("zero", "mean") else float(v)
        return cls(edit.channels[name], value, preserve=edit.mode == "preserve", batch_mean=v == "mean")

    def forward(self, x: Tensor) -> Tensor:
        dim = channel_dim(x) % x.dim()
        c = x.shape[dim]
        if self.limit > c:
            raise ValueError(f"channel {self.limit - 1} out of range for an output with {c} channels on axis {dim}")
        shape = [1] * x.dim()
        shape[dim] = c
        mask = torch.zeros(c, dtype=torch.bool, device=x.device).index_fill(0, self.channels, True)
        if self.preserve:
            mask = ~mask
        if self.batch_mean:
            fill = x.mean(dim=[d for d in range(x.dim()) if d != dim], keepdim=True)
        elif self.values.dim() == 1:
            if self.values.numel() != c:
                raise ValueError(f"value must have shape ({c},), got {tuple(self.values.shape)}")
            fill = self.values.to(x.dtype).view(shape)
        else:
            fill = self.values.to(x.dtype)
        return torch.where(mask.view(shape), fill, x)

    def extra_repr(self) -> str:
        what = "batch mean" if self.batch_mean else "per-channel values" if self.values.dim() else f"{float(self.values):g}"
        return f"{'all but ' if self.preserve else ''}{self.channels.numel()} channels -> {what}"


class EditedLayer(nn.Module):
    """``layer`` followed by ``fill``: the explicit stand-in for an output hook (state-dict keys gain ``.layer``)."""

    def __init__(self, layer: nn.Module, fill: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.fill = fill

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        return self.fill(self.layer(*args, **kwargs))


@dataclass(frozen=True)
class BakeStep:
    """How one edited layer is baked: ``how`` is ``"own"``, ``"next"`` (into ``target``'s input weights) or
    ``"mask"``; ``reason`` says why a fold was not possible."""

    layer: str
    how: str
    target: str = ""
    reason: str = ""


# ----------------------------------------------------------------------------------------------- folds
_STATIC_RANK = {nn.Conv2d: 4, nn.Conv3d: 5, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}


def _edit_axis(rank: int) -> int:
    """Channel axis a hooked edit uses on an output of ``rank`` dimensions (non-negative)."""
    return channel_dim(torch.empty((0,) * rank)) % rank


def _param_axis(module: nn.Module, rank: int) -> int | None:
    """Output axis indexed by ``module``'s per-channel weight/bias for an output of ``rank``, or None."""
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return 1
    if isinstance(module, nn.Linear):
        return rank - 1
    if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm) and module.affine:
        return 1
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and len(module.normalized_shape) == 1:
        name = type(module).__name__
        return 1 if name == "LayerNorm2d" else rank - 1 if name == "LayerNorm" else None
    return None


def _rank(module: nn.Module, probe: GraphProbe | None) -> int | None:
    if probe is not None and probe.of(module):
        ranks = probe.ranks(module)
        return ranks.pop() if len(ranks) == 1 else None
    if isinstance(module, nn.LayerNorm) and type(module).__name__ == "LayerNorm2d":
        return 4
    return _STATIC_RANK.get(type(module))


def _own_ok(module: nn.Module, probe: GraphProbe | None) -> str:
    rank = _rank(module, probe)
    if rank is None:
        return "output rank unknown (pass example=) or varying"
    axis = _param_axis(module, rank)
    if axis is None:
        return f"{type(module).__name__} has no per-channel weight and bias"
    if axis != _edit_axis(rank):
        return f"its parameters index axis {axis}, the edit's channel axis is {_edit_axis(rank)}"
    return ""


def _add_bias(module: nn.Module, n: int) -> Tensor:
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(n, dtype=module.weight.dtype, device=module.weight.device))
    return module.bias


@torch.no_grad()
def _fold_own(module: nn.Module, replace: Tensor, values: Tensor) -> None:
    idx = replace.nonzero().flatten().to(module.weight.device)
    module.weight[idx] = 0
    v = values.to(module.weight)
    if getattr(module, "bias", None) is not None or bool(v[idx].any()):
        _add_bias(module, replace.numel())[idx] = v[idx]


def _next_ok(consumer: nn.Module, rank: int, values: Tensor) -> str:
    if isinstance(consumer, nn.Linear):
        return "" if _edit_axis(rank) == rank - 1 else "the Linear reads another axis"
    if isinstance(consumer, nn.modules.conv._ConvNd) and not consumer.transposed:
        if _edit_axis(rank) != 1:
            return "the convolution reads another axis"
        padded = consumer.padding == "same" or any(p != 0 for p in consumer.padding)
        if padded and bool(values.any()):
            return "a non-zero value meets zero padding in the next convolution"
        return ""
    return f"its consumer is {type(consumer).__name__}"


@torch.no_grad()
def _fold_next(consumer: nn.Module, replace: Tensor, values: Tensor) -> None:
    w = consumer.weight  # Linear (out, in); conv (out, in/groups, *k)
    groups = getattr(consumer, "groups", 1)
    c_in, c_out = w.shape[1], w.shape[0] // groups
    if replace.numel() != c_in * groups:
        raise ValueError(f"the consumer has {c_in * groups} input channels, the edit {replace.numel()}")
    for c in replace.nonzero().flatten().tolist():
        g, j = divmod(c, c_in)
        rows = slice(g * c_out, (g + 1) * c_out)
        if float(values[c]) != 0.0:
            shift = w[rows, j].reshape(c_out, -1).sum(1).double() * float(values[c])
            bias = _add_bias(consumer, w.shape[0])
            bias[rows] = (bias[rows].double() + shift).to(bias.dtype)
        w[rows, j] = 0


# ----------------------------------------------------------------------------------------------- bake
def _spec(edit: ChannelEdit, name: str, channels: int) -> tuple[Tensor, Tensor | None]:
    """``(replace (C,) bool, values (C,) float64 or None for the batch mean)`` of layer ``name``."""
    replace = torch.tensor(edit.replaced(name, channels), dtype=torch.bool)
    v = edit.value
    if v == "mean":
        return replace, None
    if isinstance(v, Mapping):
        t = torch.as_tensor(v[name]).detach().cpu().to(torch.float64).flatten()
        if t.numel() != channels:
            raise ValueError(f"value for layer {name!r} must have shape ({channels},), got {tuple(t.shape)}")
        return replace, t
    return replace, torch.full((channels,), 0.0 if v == "zero" else float(v), dtype=torch.float64)


def _channels(module: nn.Module, probe: GraphProbe | None) -> int | None:
    """Channels of ``module``'s output on the edit's channel axis: seen on the example, else from the type."""
    if probe is not None:
        shapes = {c.out.shape[channel_dim(c.out)] for c in probe.of(module) if c.out is not None}
        if len(shapes) == 1:
            return shapes.pop()
    if isinstance(module, nn.Linear):  # assumed (B, D) or (B, T, D)
        return module.out_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return int(module.normalized_shape[0])
    if _rank(module, None) is not None:  # Conv2d/3d, BatchNorm2d/3d
        return int(getattr(module, "out_channels", getattr(module, "num_features", 0))) or None
    return None


def edit_channels(model: nn.Module, edit: ChannelEdit, example: Example | None = None) -> dict[str, int | None]:
    """Channel count of each edited layer (``None`` if only a forward on ``example`` would tell), after checking
    that ``edit`` fits: ``ValueError`` for a missing layer, a channel out of range or a per-channel value of the
    wrong shape."""
    modules = {n: get_layer(model, n) for n in edit.layers}
    probe = GraphProbe(model, example) if example is not None else None
    counts = {n: _channels(m, probe) for n, m in modules.items()}
    for n, c in counts.items():
        if c is not None:
            _spec(edit, n, c)
    return counts


def _check_fold(fold: str) -> None:
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {fold!r}")


def bake_plan(model: nn.Module, edit: ChannelEdit, example: Example | None = None, *, fold: str = "auto") -> list[BakeStep]:
    """How :func:`bake` would bake ``edit`` into ``model`` (one :class:`BakeStep` per edited layer)."""
    _check_fold(fold)
    return [step for step, *_ in _plan(model, edit, example, fold)]


def _plan(model: nn.Module, edit: ChannelEdit, example: Example | None, fold: str) -> list[tuple]:
    if not isinstance(edit, ChannelEdit):
        raise TypeError(f"edit must be a ChannelEdit, got {type(edit).__name__}")
    modules = {n: get_layer(model, n) for n in edit.layers}
    probe = GraphProbe(model, example) if example is not None else None
    names = {id(m): n for n, m in model.named_modules()}
    owners: dict[int, int] = {}  # parameter -> number of modules holding it (tied weights are not folded)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1

    def tied(m: nn.Module | None) -> bool:
        return m is not None and any(owners.get(id(p), 0) > 1 for p in m.parameters(recurse=False))

    plan = []
    for name, module in modules.items():
        channels = _channels(module, probe)
        if channels is None:
            reason = f"{type(module).__name__}: channel count unknown (pass example=)"
            plan.append((BakeStep(name, "mask", reason=reason), module, None, None, None))
            continue
        replace, values = _spec(edit, name, channels)
        if not bool(replace.any()):
            plan.append((BakeStep(name, "none", reason="the edit changes no channel"), module, None, replace, values))
            continue
        why = "fold='none'" if fold == "none" else "value='mean' depends on the batch" if values is None else ""
        if not why:
            why = "its weights are tied to another layer" if tied(module) else _own_ok(module, probe)
            if not why:
                plan.append((BakeStep(name, "own"), module, None, replace, values))
                continue
        if fold == "auto" and values is not None and probe is not None:
            user, reason = probe.consumer(module)
            reason = reason or ("its weights are tied to another layer" if tied(user) else "")
            reason = reason or _next_ok(user, probe.ranks(module).pop(), values)
            if not reason:
                plan.append((BakeStep(name, "next", names.get(id(user), "?")), module, user, replace, values))
                continue
            why = f"{why}; next layer: {reason}"
        plan.append((BakeStep(name, "mask", reason=why), module, None, replace, values))
    return plan


def _strip(model: nn.Module, edit: PersistentEdit) -> None:
    """Remove ``edit``'s hooks from a deep copy (the copy's hook dicts kept the original handle ids)."""
    ids = {h.id for h in edit._handles}
    for m in model.modules():
        for d in (m._forward_hooks, getattr(m, "_forward_hooks_with_kwargs", {}), getattr(m, "_forward_hooks_always_called", {})):
            for i in ids:
                d.pop(i, None)


def _replace(model: nn.Module, module: nn.Module, new: nn.Module) -> None:
    """Put ``new`` in every slot of ``model`` that holds ``module`` (a shared module is replaced everywhere)."""
    slots = [(parent, key) for _, parent in model.named_modules() for key, child in parent._modules.items() if child is module]
    for parent, key in slots:
        parent._modules[key] = new


def _apply(model: nn.Module, edit: ChannelEdit, plan: list[tuple]) -> None:
    for step, module, user, replace, values in plan:
        if step.how == "own":
            _fold_own(module, replace, values)
        elif step.how == "next":
            _fold_next(user, replace, values)
        elif step.how == "mask":
            _replace(model, module, EditedLayer(module, ChannelFill.of(edit, step.layer)))


def _segment(model: nn.Module, layer: str, circuit_layer: str) -> str:
    """Name of the module whose input is ``circuit_layer``'s output and whose output is ``layer``'s output."""
    parent_name, _, leaf = layer.rpartition(".")
    parent = get_layer(model, parent_name) if parent_name else model
    prefix = f"{parent_name}." if parent_name else ""
    if isinstance(parent, nn.Sequential):  # the circuit layer is the previous step of the same Sequential
        keys = list(parent._modules)
        i = keys.index(leaf)
        if i > 0 and prefix + keys[i - 1] == circuit_layer:
            return layer
    block = get_layer(model, layer)
    if isinstance(block, nn.Sequential) and len(block) >= 2 and f"{layer}.{list(block._modules)[-2]}" == circuit_layer:
        return f"{layer}.{list(block._modules)[-1]}"  # layer4 = (..., layer4.0, layer4.1): route layer4.1
    raise ValueError(
        f"cannot route layer {layer!r} with circuits on {circuit_layer!r}: a block is routed when the circuit layer "
        "is the step before it in an nn.Sequential, or the second-to-last step of the nn.Sequential it is"
    )


def _bake_router(model: nn.Module, router: PersistentEdit, inplace: bool) -> nn.Module:
    from negspace.attribution.fastpath import is_fast_module
    from negspace.editing.routing_module import RoutedBlock, RoutedLayer

    work = model if inplace else copy.deepcopy(model)
    if inplace and router.active:
        router.remove()
    elif not inplace:
        _strip(work, router)
    vn, scales, mode = router.vn, router.scales, router.mode  # type: ignore[attr-defined]
    neurons, cents = list(scales), [vn.centroids_of(k) for k in scales]
    module = get_layer(work, vn.layer)
    if is_fast_module(module):
        _replace(work, module, RoutedLayer(module, neurons, cents, list(scales.values()), mode=mode, reduce=vn.reduce))
        return work
    if mode != "sample":
        raise ValueError(f"mode={mode!r} routes only an nn.Conv2d/nn.Linear layer; layer {vn.layer!r} is a "
                         f"{type(module).__name__}: use mode='sample'")
    segment = get_layer(work, _segment(work, vn.layer, vn.circuit_layer))
    _replace(work, segment, RoutedBlock(segment, neurons, cents, list(scales.values()), reduce=vn.reduce))
    return work


def _outputs(model: nn.Module, example: Example) -> list[Tensor]:
    with eval_mode(model), torch.no_grad():
        return tensors_of(model(*as_args(example)))


def _close(a: list[Tensor], b: list[Tensor]) -> bool:
    def scale(y: Tensor) -> float:
        return max(1.0, float(y.abs().max())) if y.numel() and y.is_floating_point() else 1.0

    return len(a) == len(b) and all(
        x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-5 * scale(y)) for x, y in zip(a, b, strict=True)
    )


def bake(
    model: nn.Module,
    edit: PersistentEdit,
    example: Example | None = None,
    *,
    fold: str = "auto",
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` with ``edit`` made permanent: a plain module with no negspace hooks, equal outputs.

    Args:
        model: the network, with ``edit`` applied to it or not.
        edit: a :class:`~negspace.editing.channels.ChannelEdit`, or a
            :class:`~negspace.editing.router.VirtualNeuronRouter`: a routed ``Conv2d``/``Linear`` becomes a
            :class:`~negspace.editing.routing_module.RoutedLayer` (exportable); a routed block output becomes a
            :class:`~negspace.editing.routing_module.RoutedBlock` around the step after the circuit layer (eager
            only); ``example`` and ``fold`` are not used.
        example: inputs ``(B, ...)`` (a tensor or a tuple of positional tensors) — enables ``"next"`` folds and
            folds into layers whose output rank only a forward shows (``Linear``, ``LayerNorm``), and checks the
            result against the hooked model.
        fold: ``"auto"`` (own parameters, else the next layer, else a mask), ``"own"`` (no ``"next"``) or ``"none"``
            (always the :class:`EditedLayer` mask).
        inplace: edit ``model`` itself (the edit's hooks are removed from it) instead of a deep copy.

    See :func:`bake_plan` for what each layer becomes.
    """
    _check_fold(fold)
    if not isinstance(edit, PersistentEdit):
        raise TypeError(f"edit must be a ChannelEdit or a VirtualNeuronRouter, got {type(edit).__name__}")
    if edit.active and any(edit._modules.get(n) is not get_layer(model, n) for n in edit.layers):
        raise ValueError("edit is applied to another model; remove() it or bake that model")
    if type(edit).__name__ == "VirtualNeuronRouter":
        return _bake_router(model, edit, inplace)
    ref = None
    if example is not None:
        with nullcontext() if edit.active else edit.applied(model):
            ref = _outputs(model, example)
    if inplace:
        work = model
        if edit.active:
            edit.remove()
    else:
        work = copy.deepcopy(model)
        _strip(work, edit)
    plan = _plan(work, edit, example, fold)
    saved = [(u, u.weight.detach().clone(), None if u.bias is None else u.bias.detach().clone()) for s, _, u, *_ in plan if s.how == "next"]
    _apply(work, edit, plan)
    if ref is not None and not _close(_outputs(work, example), ref):
        if saved:  # a user of the output the graph did not show: undo the "next" folds, mask those layers
            warnings.warn("a 'next'-layer fold did not reproduce the hooked outputs; using masks there", stacklevel=2)
            _undo(saved)
            for step, module, *_ in plan:
                if step.how == "next":
                    _replace(work, module, EditedLayer(module, ChannelFill.of(edit, step.layer)))
        if not _close(_outputs(work, example), ref):
            raise RuntimeError("baked model does not reproduce the hooked model's outputs on the example")
    return work


@torch.no_grad()
def _undo(saved: list[tuple[nn.Module, Tensor, Tensor | None]]) -> None:
    for module, weight, bias in reversed(saved):
        module.weight.copy_(weight)
        if bias is None:
            module.bias = None
        else:
            module.bias.copy_(bias)
