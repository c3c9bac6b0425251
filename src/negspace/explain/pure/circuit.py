"""PURE circuits (paper 004, eq. 3): the Grad×Act attribution of the channels of a lower layer ``L−1`` (the
*circuit layer*) to neuron ``k`` of layer ``L``, summed over space and L1-normalised::

    R_i(x) = Σ_space  A_i^{L−1}(x) · ∂ reduce(A_k^L(x)) / ∂ A_i^{L−1}(x),     c(x) = R(x) / ‖R(x)‖₁

The seed (``reduce``) defaults to ``"relu"``, as the paper's reference code: the backward starts from
``ReLU(A_k^L)`` at every position of the map (``reduce(A) = ½ Σ_p ReLU(A_p)²``); ``"max"`` (one-hot at the
argmax) and the other spatial reductions are options.

Speed. Circuits of many (sample, neuron) pairs share one forward pass per sample, stopped at ``L``: the
sample's activation is replicated once per row at the circuit layer and one plain backward gives every
row's gradient. When ``L`` is a single ``nn.Conv2d``/``nn.Linear`` applied to the circuit layer's output, no
backward is needed at all (exact fast path, :mod:`negspace.attribution.fastpath`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.attribution import layer_contributions
from negspace.attribution.fastpath import fast_forward, fast_rows, is_fast_module
from negspace.batch import Data, iter_images
from negspace.explain.pure._common import (
    DEFAULT_REDUCE,
    FAST,
    check_fast,
    check_neurons,
    check_pure_reduce,
    data_keys,
    neuron_indices,
)
from negspace.explain.pure.references import References
from negspace.hooks import capture, eval_mode, get_layer, model_device, run_until
from negspace.objectives import Objective
from negspace.reduce import channels_last, num_channels, reduce_positions, spatial_sum

__all__ = ["FAST", "check_layers", "circuit_rows", "circuits", "l1_normalize", "reference_circuits"]


def l1_normalize(c: Tensor, eps: float = 1e-12) -> Tensor:
    """``c / ‖c‖₁`` along the last axis (zero vectors stay zero)."""
    return c / c.abs().sum(dim=-1, keepdim=True).clamp_min(eps)


def reduce_map(vals: Tensor, reduce: str, act: Tensor) -> Tensor:
    """A neuron's seed over positions: ``vals (B, S, K) → (B, K)``; ``"relu"`` = ``½ Σ_p ReLU(vals_p)²`` (its
    gradient is ``ReLU(A)``, the paper's seed), otherwise :func:`negspace.reduce.reduce_positions`."""
    if reduce == "relu":
        return 0.5 * vals.clamp_min(0).pow(2).sum(dim=1)
    return reduce_positions(vals, reduce, act)


class _seeded_neuron(Objective):
    """One neuron per sample (``index (B,)``) of ``layer`` seeded by :func:`reduce_map` → ``(B,)``."""

    def __init__(self, layer: str, index: Tensor, reduce: str) -> None:
        self.layer, self.index, self.reduce = layer, index, reduce

    def __call__(self, act: Tensor) -> Tensor:
        flat = channels_last(act)  # (B, S, C)
        idx = self.index.to(act.device)
        check_neurons(idx, flat.shape[-1], self.layer)
        sel = flat.gather(2, idx[:, None, None].expand(-1, flat.shape[1], 1))  # (B, S, 1)
        return reduce_map(sel, self.reduce, act)[:, 0]


class _paired_neurons(Objective):
    """``M`` neurons per sample: ``index: LongTensor (B, M)`` → ``(B, M)`` reduced activations."""

    def __init__(self, layer: str, index: Tensor, reduce: str) -> None:
        self.layer = layer
        self.index = index
        self.reduce = reduce

    def __call__(self, act: Tensor) -> Tensor:
        flat = channels_last(act)  # (B, S, C)
        idx = self.index.to(act.device)
        check_neurons(idx, flat.shape[-1], self.layer)
        sel = flat.gather(2, idx[:, None, :].expand(-1, flat.shape[1], -1))  # (B, S, M)
        return reduce_map(sel, self.reduce, act)


def _check_x(x: object) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point Tensor, got {type(x).__name__}")


def check_layers(model: nn.Module, layer: str, circuit_layer: str, x: Tensor | None = None) -> None:
    """``ValueError`` when ``circuit_layer`` is ``layer`` itself or (on the sample ``x[:1]``) yields the same
    tensor — an alias (a wrapper ``Sequential``, ``nn.Identity``) or an in-place op. Its circuits would be
    one-hot on the neuron itself: k-means on identical points, NaN scores, meaningless virtual neurons."""
    hint = (f"circuits need a circuit_layer *below* layer {layer!r} (e.g. the module whose output feeds it); "
            f"circuit_layer {circuit_layer!r}")
    if layer == circuit_layer:
        raise ValueError(f"{hint} is the same layer")
    get_layer(model, layer)
    get_layer(model, circuit_layer)
    if x is None:
        return
    with torch.no_grad(), eval_mode(model), capture(model, [layer, circuit_layer], detach=True, stop_after=True) as cap:
        run_until(model, x[:1].to(model_device(model)))
    a, b = cap.activations.get(layer), cap.activations.get(circuit_layer)
    if a is None or b is None:
        return
    if a.shape == b.shape and (a.data_ptr() == b.data_ptr() or torch.equal(a, b)):
        raise ValueError(
            f"{hint} gives the same tensor as the layer ({tuple(a.shape)}: an alias, a wrapper or an in-place op); "
            "every circuit would be one-hot on the neuron itself and the virtual neurons meaningless (NaN scores)"
        )


def _fast_possible(model: nn.Module, layer: str, circuit_layer: str, fast: object) -> bool:
    module = get_layer(model, layer)
    get_layer(model, circuit_layer)
    ok = is_fast_module(module)
    if fast is True and not ok:
        raise ValueError(
            f"fast=True needs layer {layer!r} to be an nn.Conv2d (groups=1, zero padding) or nn.Linear, got "
            f"{type(module).__name__}; use fast='auto' or False"
        )
    return bool(fast) and ok


def circuits(
    model: nn.Module,
    layer: str,
    circuit_layer: str,
    x: Tensor,
    neurons: int | Sequence[int] | Tensor,
    *,
    reduce: str = DEFAULT_REDUCE,
    fast: bool | str = "auto",
    normalize: bool = True,
    replicate_at: str | None = None,
) -> Tensor:
    """PURE circuits (paper 004, eq. 3) of ``neurons`` of ``layer`` w.r.t. the channels of ``circuit_layer``.

    Args:
        x: ``(B, ...)`` inputs.
        neurons: an int (→ ``(B, C)``), a list of K ints (→ ``(B, K, C)``, one forward, one backward; see
            :func:`circuit_rows`), a LongTensor ``(B,)`` (one neuron per sample → ``(B, C)``) or ``(B, M)`` (M
            neurons per sample → ``(B, M, C)``). ``C`` = channels of ``circuit_layer``.
        reduce: the seed of the neuron's map: ``"relu"`` (default, the paper's code: ``ReLU(A_k)`` at every
            position) or a spatial reduction (``"max"``: one-hot at the argmax; ``"mean"``, ``"sum"``, ``"center"``).
        fast: ``"auto"`` uses the exact closed form when ``layer`` is an ``nn.Conv2d``/``nn.Linear`` applied to
            ``circuit_layer``'s output (no backward); ``True`` requires it; ``False`` always uses autograd.
        normalize: L1-normalise each circuit (the paper's convention).
        replicate_at: see :func:`circuit_rows` (only needed when a shortcut bypasses the circuit layer).
    """
    check_pure_reduce(reduce)
    check_fast(fast)
    _check_x(x)
    check_layers(model, layer, circuit_layer)  # names only here; fitting also compares the tensors
    if isinstance(neurons, bool):
        raise TypeError("neurons must be an int, a list of ints or a LongTensor, got bool")
    b = x.shape[0]
    if isinstance(neurons, int):
        sample, unit, shape = torch.arange(b), torch.full((b,), neurons, dtype=torch.long), (b,)
    elif isinstance(neurons, Tensor):
        if neurons.is_floating_point():
            raise TypeError(f"neurons must be integer channel indices, got dtype {neurons.dtype}")
        if neurons.dim() not in (1, 2) or neurons.shape[0] != b:
            raise ValueError(f"neurons tensor must be (B,)=({b},) or (B, M), got shape {tuple(neurons.shape)}")
        m = 1 if neurons.dim() == 1 else neurons.shape[1]
        sample, unit = torch.arange(b).repeat_interleave(m), neurons.long().flatten().cpu()
        shape = (b,) if neurons.dim() == 1 else (b, m)
    else:
        lst = neuron_indices(neurons)
        if lst is None:
            raise TypeError("neurons must not be None")
        sample, unit, shape = torch.arange(b).repeat_interleave(len(lst)), lst.repeat(b), (b, len(lst))
    c = circuit_rows(model, layer, circuit_layer, x, sample, unit, reduce=reduce, fast=fast, replicate_at=replicate_at)
    c = l1_normalize(c) if normalize else c
    return c.view(*shape, c.shape[-1])


@contextmanager
def _replicate(model: nn.Module, layer: str, index: Tensor) -> Iterator[None]:
    """Replace ``layer``'s output ``(N, ...)`` by its rows ``index`` (``(R, ...)``) inside the block."""
    module = get_layer(model, layer)

    def hook(_m: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        return output.index_select(0, index.to(output.device))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


_WARNED: set[str] = set()


def circuit_rows(
    model: nn.Module,
    layer: str,
    circuit_layer: str,
    x: Tensor,
    sample: Tensor,
    unit: Tensor,
    *,
    reduce: str = DEFAULT_REDUCE,
    fast: bool | str = "auto",
    max_rows: int = 512,
    replicate_at: str | None = None,
) -> Tensor:
    """Unnormalised circuits of arbitrary (sample, neuron) pairs: rows ``sample (R,)`` (indices into ``x``)
    and ``unit (R,)`` (channels of ``layer``) → ``(R, C)``.

    Autograd path: every needed sample is forwarded once; at ``circuit_layer`` its activation is replicated
    once per row (a forward hook), so the short segment ``circuit_layer → layer`` runs on R rows and ONE plain
    backward of ``Σ_rows reduce(A_unit)`` gives all R gradients (rows do not interact). This is ~3-6× faster
    than vmapped (``is_grads_batched``) backwards on CPU. If the segment mixes in un-replicated tensors from
    below the circuit layer (a shortcut around it), it falls back to batched backwards, unless
    ``replicate_at`` names a layer below both where the rows can be replicated instead.
    """
    check_pure_reduce(reduce)
    check_fast(fast)
    _check_x(x)
    sample, unit = sample.long().cpu(), unit.long().cpu()
    if sample.shape != unit.shape or sample.dim() != 1:
        raise ValueError(f"sample and unit must be (R,) tensors of equal length, got {tuple(sample.shape)}, {tuple(unit.shape)}")
    device = model_device(model)
    with eval_mode(model):
        if _fast_possible(model, layer, circuit_layer, fast):
            with torch.no_grad():
                uniq, inv = sample.unique(return_inverse=True)
                got = fast_forward(model, layer, circuit_layer, x[uniq].to(device), strict=fast is True)
            if got is not None:  # "auto" falls back to autograd when layer is not applied to circuit_layer
                module, a, out = got
                check_neurons(unit, num_channels(out), layer)
                return fast_rows(module, a, out, inv.to(out.device), unit.to(out.device), reduce)
        parts = []
        order = sample.argsort(stable=True)
        for lo in range(0, len(order), max_rows):
            rows = order[lo : lo + max_rows]
            c = _autograd_rows(model, layer, circuit_layer, x, sample[rows], unit[rows], reduce, replicate_at)
            parts.append((rows, c))
    out_rows = torch.empty(len(sample), parts[0][1].shape[-1], dtype=parts[0][1].dtype, device=parts[0][1].device)
    for rows, c in parts:
        out_rows[rows.to(c.device)] = c
    return out_rows


def _autograd_rows(
    model: nn.Module,
    layer: str,
    circuit_layer: str,
    x: Tensor,
    sample: Tensor,
    unit: Tensor,
    reduce: str,
    replicate_at: str | None = None,
) -> Tensor:
    uniq, inv = sample.unique(return_inverse=True)
    xs = x[uniq].to(model_device(model))
    if len(uniq) == len(sample) and bool((inv == torch.arange(len(inv))).all()):  # one row per sample
        obj = _seeded_neuron(layer, unit.to(xs.device), reduce)
        return spatial_sum(layer_contributions(model, circuit_layer, xs, obj, method="act_grad"))
    at = circuit_layer if replicate_at is None else replicate_at
    try:
        with _replicate(model, at, inv):
            obj = _seeded_neuron(layer, unit.to(xs.device), reduce)
            c = spatial_sum(layer_contributions(model, circuit_layer, xs, obj, method="act_grad"))
    except RuntimeError as e:
        if "size" not in str(e) and "shape" not in str(e):
            raise
        if replicate_at is not None:
            raise ValueError(
                f"replicate_at={replicate_at!r} does not cover every path from below {circuit_layer!r} to {layer!r}: "
                f"{str(e).splitlines()[0]}"
            ) from e
        if circuit_layer not in _WARNED:
            _WARNED.add(circuit_layer)
            warnings.warn(
                f"circuits: replicating {circuit_layer!r} failed ({str(e).splitlines()[0]}); a tensor from below it "
                f"reaches {layer!r} (a shortcut). Using batched backwards instead (slower); pass replicate_at= a "
                "layer below both (e.g. the block input) to keep the fast replicated backward.",
                stacklevel=3,
            )
    else:
        if c.shape[0] != len(sample):
            raise ValueError(f"replicate_at={at!r} must be a layer that runs before circuit_layer {circuit_layer!r}")
        return c
    # fallback: (U, M) neurons per unique sample, M batched backwards (vmap over grad outputs)
    counts = inv.bincount(minlength=len(uniq))
    m = int(counts.max())
    pos = torch.zeros_like(inv)
    seen = torch.zeros(len(uniq), dtype=torch.long)
    for r, u in enumerate(inv.tolist()):
        pos[r] = seen[u]
        seen[u] += 1
    k2 = unit[inv.new_zeros(len(uniq)).scatter_(0, inv, torch.arange(len(inv)))][:, None].repeat(1, m)
    k2[inv, pos] = unit
    contrib = layer_contributions(model, circuit_layer, xs, _paired_neurons(layer, k2.to(xs.device), reduce))
    c = spatial_sum(contrib.flatten(0, 1)).unflatten(0, contrib.shape[:2])  # (U, M, C)
    return c[inv.to(c.device), pos.to(c.device)]


def reference_circuits(
    model: nn.Module,
    circuit_layer: str,
    data: Data,
    refs: References,
    *,
    reduce: str = DEFAULT_REDUCE,
    fast: bool | str = "auto",
    batch_size: int = 64,
    max_rows: int = 512,
    replicate_at: str | None = None,
    batch_keys: object = None,
    progress: bool = False,
    image_key: str | None = None,
) -> Tensor:
    """Circuits of every (neuron, reference sample) pair of ``refs`` in one more pass over ``data``.

    Each sample needed by any neuron is forwarded once (stopping at ``refs.layer``) and the circuits of all
    neurons it is a reference of come from one backward (see :func:`circuit_rows`; at most ``max_rows``
    (sample, neuron) rows per pass). Returns ``(K, n_ref, C)`` L1-normalised circuits.
    """
    keys = data_keys(batch_keys, image_key, "reference_circuits")
    k_count, n = refs.indices.shape
    flat_ids = refs.indices.flatten()
    order = flat_ids.argsort()
    sorted_ids = flat_ids[order]
    out: Tensor | None = None
    seen = 0
    for x in tqdm(iter_images(data, keys, batch_size=batch_size, who="PURE"), desc="PURE circuits", disable=not progress):
        lo, hi = seen, seen + x.shape[0]
        seen = hi
        a, b = torch.searchsorted(sorted_ids, lo), torch.searchsorted(sorted_ids, hi)
        if a == b:
            continue
        if out is None:
            check_layers(model, refs.layer, circuit_layer, x)
        slots = order[a:b]  # flat (k, j) slots whose sample lies in this batch
        c = circuit_rows(model, refs.layer, circuit_layer, x, flat_ids[slots] - lo, refs.neurons[slots // n],
                         reduce=reduce, fast=fast, max_rows=max_rows, replicate_at=replicate_at)
        if out is None:
            out = torch.zeros(k_count * n, c.shape[-1])
        out[slots] = l1_normalize(c.detach().float().cpu())
    if out is None:
        raise ValueError("data yielded none of the reference samples (is it the same data, in the same order?)")
    return out.view(k_count, n, -1)
