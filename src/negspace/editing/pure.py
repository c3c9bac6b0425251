"""PURE (paper 004): circuits of hidden neurons, k-means "virtual" neurons, and an edit that routes them.

For neuron ``k`` of layer ``L`` and a sample ``x`` the **circuit** is the Grad×Act attribution of the
``n`` channels of the lower layer ``L−1`` (the *circuit layer*) to the neuron (paper 004, eq. 3),
summed over space and L1-normalised::

    R_i(x) = Σ_space  A_i^{L−1}(x) · ∂ reduce(A_k^L(x)) / ∂ A_i^{L−1}(x),     c(x) = R(x) / ‖R(x)‖₁

``reduce`` (default ``"max"``) is the spatial reduction of the neuron's feature map, the same one used to
pick the **reference samples**: the ``n_ref`` (default 100) samples of a dataset with the largest
spatial-max activation of neuron ``k``. The circuits of the reference samples are clustered with
k-means (``k = 2`` by default, or chosen in ``2..5`` by silhouette score); each centroid is a *virtual
neuron*.

Going beyond the paper's code (which stops at analysing the reference samples):

* :meth:`VirtualNeurons.assign` gives any new sample the virtual neuron whose centroid is nearest
  (Euclidean) to its circuit — the test-time rule of the paper's Fig. 2;
* :class:`VirtualNeuronRouter` is a persistent edit that splits channel ``k`` into its virtual neurons
  *inside the forward pass* and scales (or ablates, scale 0) one of them while the others keep working.

Speed. Circuits of many (sample, neuron) pairs share one forward pass per sample: the backward passes
for all neurons a sample is a reference of are batched (``is_grads_batched``), and the forward stops at
layer ``L``. When ``L`` is a single ``nn.Conv2d``/``nn.Linear`` whose input is the circuit layer's
output, no backward is needed at all (**fast path**, exact): the gradient of ``reduce(z_k)`` w.r.t. the
conv input is the transposed convolution of the reduce weights ``r(p)`` (one-hot at the argmax for
``"max"``, ``1/P`` for ``"mean"``...) with the filter ``W_k``, so

    R_i = Σ_p r(p) Σ_j W_k[i, j] · U[i, j, p]        (U = unfolded input patches, j = kernel offset)

i.e. the bias-free contribution of input channel ``i`` to ``z_k``, weighted by ``r``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.attribution import layer_contributions, spatial_sum
from negspace.batch import unpack_batch
from negspace.hooks import PersistentEdit, StopForward, capture, get_layer, run_until
from negspace.objectives import _REDUCE, Objective, neuron
from negspace.reduce import channels_last as _channels_last
from negspace.reduce import reduce_positions as _reduce_space

__all__ = [
    "References",
    "VirtualNeuronRouter",
    "VirtualNeurons",
    "circuit_rows",
    "circuits",
    "fit_virtual_neurons",
    "inter_intra",
    "reference_circuits",
    "reference_samples",
]

FAST = ("auto", True, False)
MODES = ("sample", "position")


# --------------------------------------------------------------------------------------------- helpers
def batch_images(batch: Any, image_key: str = "image") -> Tensor:
    """The image tensor of a batch (a tensor, a dict with ``image_key``, or a tuple ``(image, ...)``)."""
    return unpack_batch(batch, {"image": image_key}, who="PURE").image


def iter_images(data: Tensor | Iterable[Any], batch_size: int = 64, image_key: str = "image") -> Iterator[Tensor]:
    """Yield image batches from a tensor ``(N, ...)`` (split into ``batch_size`` chunks) or a loader."""
    if isinstance(data, Tensor):
        if data.dim() < 2 or data.shape[0] == 0:
            raise ValueError(f"data must be a non-empty batch (N, ...), got shape {tuple(data.shape)}")
        yield from data.split(batch_size)
        return
    for batch in data:
        yield batch_images(batch, image_key)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (BatchNorm running stats, no dropout); restore the flags on exit."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags.items():
            m.train(f)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _check_reduce(reduce: str) -> None:
    if reduce not in _REDUCE:
        raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")


def _check_fast(fast: object) -> None:
    if fast not in FAST or (isinstance(fast, int) and not isinstance(fast, bool)):
        raise ValueError(f"fast must be one of {FAST}, got {fast!r}")


def _channel_max(act: Tensor) -> Tensor:
    """Spatial max per channel: ``(B, C, H, W) | (B, T, D) | (B, D) → (B, C)``."""
    return _channels_last(act).max(dim=1).values


def _num_channels(act: Tensor) -> int:
    return _channels_last(act).shape[-1]


def _check_neurons(neurons: Tensor, c: int, layer: str) -> None:
    if neurons.numel() and (int(neurons.min()) < 0 or int(neurons.max()) >= c):
        bad = neurons[(neurons < 0) | (neurons >= c)].unique().tolist()
        raise ValueError(f"neurons {bad} do not exist in layer {layer!r} with {c} channels (valid: 0..{c - 1})")


def _as_neuron_list(neurons: int | Sequence[int] | Tensor | None, name: str = "neurons") -> Tensor | None:
    if neurons is None:
        return None
    if isinstance(neurons, bool):
        raise TypeError(f"{name} must be an int, a list of ints or a LongTensor, got bool")
    if isinstance(neurons, int):
        return torch.tensor([neurons])
    if isinstance(neurons, Tensor) and neurons.is_floating_point():
        raise TypeError(f"{name} must hold integer channel indices, got dtype {neurons.dtype}")
    try:
        t = torch.as_tensor(neurons, dtype=torch.long).flatten().cpu()
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an int, a list of ints or a LongTensor, got {neurons!r}") from e
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if t.unique().numel() != t.numel():
        raise ValueError(f"{name} contains duplicates: {t.tolist()}")
    return t


def l1_normalize(c: Tensor, eps: float = 1e-12) -> Tensor:
    """``c / ‖c‖₁`` along the last axis (zero vectors stay zero)."""
    return c / c.abs().sum(dim=-1, keepdim=True).clamp_min(eps)


class _paired_neurons(Objective):
    """``M`` neurons per sample: ``index: LongTensor (B, M)`` → ``(B, M)`` reduced activations."""

    def __init__(self, layer: str, index: Tensor, reduce: str) -> None:
        self.layer = layer
        self.index = index
        self.reduce = reduce

    def __call__(self, act: Tensor) -> Tensor:
        flat = _channels_last(act)  # (B, S, C)
        idx = self.index.to(act.device)
        _check_neurons(idx, flat.shape[-1], self.layer)
        sel = flat.gather(2, idx[:, None, :].expand(-1, flat.shape[1], -1))  # (B, S, M)
        return _reduce_space(sel, self.reduce, act)


# ------------------------------------------------------------------------------------------ references
@dataclass
class References:
    """Top-``n_ref`` reference samples of each neuron (by spatial-max activation).

    ``indices: (K, n_ref)`` positions of the samples in the order ``data`` yields them, best first;
    ``values: (K, n_ref)`` their spatial-max activations; ``neurons: (K,)`` channel indices.
    """

    layer: str
    neurons: Tensor
    indices: Tensor
    values: Tensor

    @property
    def n_ref(self) -> int:
        return int(self.indices.shape[1])


@torch.no_grad()
def reference_samples(
    model: nn.Module,
    layer: str,
    data: Tensor | Iterable[Any],
    *,
    n_ref: int = 100,
    neurons: int | Sequence[int] | Tensor | None = None,
    batch_size: int = 64,
    image_key: str = "image",
    progress: bool = False,
    strict: bool = True,
) -> References:
    """Top-``n_ref`` samples per neuron of ``layer`` by spatial-max activation, in one pass over ``data``.

    All neurons are scored in the same forward pass (stopped at ``layer``) and a running top-k is kept, so
    memory is ``O(K · n_ref)`` whatever the dataset size. ``data``: a tensor ``(N, ...)`` or an iterable of
    batches (iterated once, in order; do not shuffle). ``neurons=None`` means every channel.
    ``strict=False`` returns fewer than ``n_ref`` references when ``data`` is smaller (used per DDP shard).
    """
    if not isinstance(n_ref, int) or isinstance(n_ref, bool) or n_ref < 1:
        raise ValueError(f"n_ref must be a positive int, got {n_ref!r}")
    get_layer(model, layer)
    sel = _as_neuron_list(neurons)
    device = _model_device(model)
    vals = idx = None
    seen = 0
    with eval_mode(model), capture(model, layer, detach=True, stop_after=True) as cap:
        for x in tqdm(iter_images(data, batch_size, image_key), desc="PURE references", disable=not progress):
            run_until(model, x.to(device))
            act = cap.activations[layer]
            m = _channel_max(act).float().cpu()  # (B, C)
            if sel is None:
                sel = torch.arange(m.shape[1])
            _check_neurons(sel, m.shape[1], layer)
            m = m[:, sel].T  # (K, B)
            ids = torch.arange(seen, seen + m.shape[1]).expand_as(m)
            seen += m.shape[1]
            if vals is None:
                vals, idx = m, ids
            else:
                vals, idx = torch.cat([vals, m], 1), torch.cat([idx, ids], 1)
            if vals.shape[1] > n_ref:
                vals, pos = vals.topk(n_ref, dim=1)
                idx = idx.gather(1, pos)
    if vals is None or sel is None or idx is None:
        raise ValueError("data is empty")
    if seen < n_ref and strict:
        raise ValueError(f"n_ref={n_ref} is larger than the number of samples in data ({seen})")
    vals, pos = vals.sort(dim=1, descending=True)
    return References(layer=layer, neurons=sel.clone(), indices=idx.gather(1, pos), values=vals)


# -------------------------------------------------------------------------------------------- circuits
def _fast_module(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" and (
        not isinstance(module.padding, str)
    )


def _reduce_weights(z: Tensor, reduce: str) -> Tensor:
    """Weights ``r (N, P)`` with ``reduce(z) = Σ_p r_p z_p`` locally (the gradient of the reduction);
    ``z: (N, P)`` positions last."""
    if reduce == "mean":
        return torch.full_like(z, 1.0 / z.shape[1])
    if reduce == "sum":
        return torch.ones_like(z)
    r = torch.zeros_like(z)
    if reduce == "max":
        r.scatter_(1, z.argmax(dim=1, keepdim=True), 1.0)
    return r


def _center_index(out: Tensor) -> int:
    if out.dim() == 4:
        h, w = out.shape[-2:]
        return (h // 2) * w + w // 2
    return (_channels_last(out).shape[1]) // 2


def _row_weights(out: Tensor, reduce: str, sample: Tensor, unit: Tensor) -> Tensor:
    """Reduce weights ``(R, P)`` of rows (sample, unit) of layer output ``out`` (gradient of the reduction)."""
    flat = _channels_last(out)  # (N, P, C)
    z = flat[sample, :, unit]  # (R, P)
    if reduce == "center":
        r = torch.zeros_like(z)
        r[:, _center_index(out)] = 1.0
        return r
    return _reduce_weights(z, reduce)


def _unfold(module: nn.Conv2d, a: Tensor) -> Tensor:
    """Input patches ``(N, C, kk, P)`` of a conv."""
    u = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    c = a.shape[1]
    return u.view(a.shape[0], c, -1, u.shape[-1])


def _positions_last(module: nn.Module, a: Tensor) -> Tensor:
    """Input of a fast-path layer as ``(N, C, kk, P)`` (conv patches) or ``(N, D, 1, T)`` (linear)."""
    if isinstance(module, nn.Conv2d):
        return _unfold(module, a)
    flat = a[:, None, :] if a.dim() == 2 else a  # (N, T, D)
    return flat.transpose(1, 2)[:, :, None, :]


def _filter(module: nn.Module, k: Tensor) -> Tensor:
    """Filters of output units ``k`` as ``(*k.shape, C, kk)``."""
    w = module.weight
    return w[k].flatten(k.dim() + 1) if isinstance(module, nn.Conv2d) else w[k][..., None]


def _fast_rows(
    module: nn.Module, a: Tensor, out: Tensor, sample: Tensor, unit: Tensor, reduce: str, max_rows: int = 1024
) -> Tensor:
    """Exact Grad×Act circuits summed over space, without autograd: rows (sample, unit) → ``(R, C)``.

    ``R_i = Σ_j W_unit[i, j] · Σ_p r(p) U[i, j, p]``: for ``max``/``center`` ``r`` is one-hot (one patch is
    gathered), for ``mean``/``sum`` it is constant (the patch sum is shared by all units of a sample).
    """
    u = _positions_last(module, a)  # (N, C, kk, P)
    parts = []
    shared = None
    if reduce in ("mean", "sum"):
        shared = u.sum(-1) / (u.shape[-1] if reduce == "mean" else 1)  # (N, C, kk)
    for lo in range(0, len(sample), max_rows):
        s, k = sample[lo : lo + max_rows], unit[lo : lo + max_rows]
        if shared is not None:
            v = shared[s]
        else:
            pos = _row_weights(out, reduce, s, k).argmax(dim=1)  # one-hot weights: the chosen position
            v = u[s, :, :, pos]  # (R, C, kk)
        parts.append((v * _filter(module, k).to(v.dtype)).sum(-1))
    return torch.cat(parts)


def _fast_forward(
    model: nn.Module, layer: str, circuit_layer: str, x: Tensor, strict: bool
) -> tuple[nn.Module, Tensor, Tensor] | None:
    """Run until ``layer``; return (module, its input, its output) if the input is the output of
    ``circuit_layer``; otherwise raise (``strict``) or return ``None``."""
    module = get_layer(model, layer)
    seen: dict[str, Tensor] = {}

    def pre(_m: nn.Module, args: tuple) -> None:
        seen["input"] = args[0]

    def post(_m: nn.Module, _args: tuple, output: Tensor) -> None:
        seen["output"] = output
        raise StopForward

    with capture(model, circuit_layer, detach=True) as cap:
        h1 = module.register_forward_pre_hook(pre)
        h2 = module.register_forward_hook(post)
        try:
            run_until(model, x)
        finally:
            h1.remove()
            h2.remove()
    a = cap.activations.get(circuit_layer)
    inp = seen.get("input")
    if a is None or inp is None or a.shape != inp.shape or not torch.equal(a, inp.detach()):
        if not strict:
            return None
        raise ValueError(
            f"fast=True needs layer {layer!r} to be applied directly to the output of circuit_layer "
            f"{circuit_layer!r}; its input differs (use fast='auto' or False for the autograd path)"
        )
    return module, inp.detach(), seen["output"].detach()


def _fast_possible(model: nn.Module, layer: str, circuit_layer: str, fast: object) -> bool:
    module = get_layer(model, layer)
    get_layer(model, circuit_layer)
    ok = _fast_module(module)
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
    reduce: str = "max",
    fast: bool | str = "auto",
    normalize: bool = True,
    replicate_at: str | None = None,
) -> Tensor:
    """PURE circuits (paper 004, eq. 3) of ``neurons`` of ``layer`` w.r.t. the channels of ``circuit_layer``.

    Args:
        x: ``(B, ...)`` inputs.
        neurons: an int (→ ``(B, C)``), a list of K ints (→ ``(B, K, C)``, one forward, one backward; see
            :func:`circuit_rows`), a LongTensor ``(B,)`` (one neuron per sample → ``(B, C)``) or ``(B, M)`` (M neurons per
            sample → ``(B, M, C)``). ``C`` = channels of ``circuit_layer``.
        reduce: spatial reduction of the neuron's map (``"max"``, ``"mean"``, ``"sum"``, ``"center"``).
        fast: ``"auto"`` uses the exact closed form when ``layer`` is an ``nn.Conv2d``/``nn.Linear`` applied to
            ``circuit_layer``'s output (no backward); ``True`` requires it; ``False`` always uses autograd.
        normalize: L1-normalise each circuit (the paper's convention).
        replicate_at: see :func:`circuit_rows` (only needed when a shortcut bypasses the circuit layer).
    """
    _check_reduce(reduce)
    _check_fast(fast)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point Tensor, got {type(x).__name__}")
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
        lst = _as_neuron_list(neurons)
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
    reduce: str = "max",
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
    below the circuit layer (a shortcut around it), it falls back to batched backwards.
    """
    _check_reduce(reduce)
    _check_fast(fast)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point Tensor, got {type(x).__name__}")
    sample, unit = sample.long().cpu(), unit.long().cpu()
    if sample.shape != unit.shape or sample.dim() != 1:
        raise ValueError(f"sample and unit must be (R,) tensors of equal length, got {tuple(sample.shape)}, {tuple(unit.shape)}")
    device = _model_device(model)
    with eval_mode(model):
        if _fast_possible(model, layer, circuit_layer, fast):
            with torch.no_grad():
                uniq, inv = sample.unique(return_inverse=True)
                got = _fast_forward(model, layer, circuit_layer, x[uniq].to(device), strict=fast is True)
            if got is not None:  # "auto" falls back to autograd when layer is not applied to circuit_layer
                module, a, out = got
                _check_neurons(unit, _num_channels(out), layer)
                return _fast_rows(module, a, out, inv.to(out.device), unit.to(out.device), reduce)
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
    xs = x[uniq].to(_model_device(model))
    if len(uniq) == len(sample) and bool((inv == torch.arange(len(inv))).all()):  # one row per sample
        obj = neuron(layer, unit.to(xs.device), reduce=reduce)
        return spatial_sum(layer_contributions(model, circuit_layer, xs, obj, method="act_grad"))
    at = circuit_layer if replicate_at is None else replicate_at
    try:
        with _replicate(model, at, inv):
            obj = neuron(layer, unit.to(xs.device), reduce=reduce)
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
    data: Tensor | Iterable[Any],
    refs: References,
    *,
    reduce: str = "max",
    fast: bool | str = "auto",
    batch_size: int = 64,
    max_rows: int = 512,
    replicate_at: str | None = None,
    image_key: str = "image",
    progress: bool = False,
) -> Tensor:
    """Circuits of every (neuron, reference sample) pair of ``refs`` in one more pass over ``data``.

    Each sample needed by any neuron is forwarded once (stopping at ``refs.layer``) and the circuits of all
    neurons it is a reference of come from one backward (see :func:`circuit_rows`; at most ``max_rows``
    (sample, neuron) rows per pass). Returns ``(K, n_ref, C)`` L1-normalised circuits.
    """
    k_count, n = refs.indices.shape
    flat_ids = refs.indices.flatten()
    order = flat_ids.argsort()
    sorted_ids = flat_ids[order]
    out: Tensor | None = None
    seen = 0
    for x in tqdm(iter_images(data, batch_size, image_key), desc="PURE circuits", disable=not progress):
        lo, hi = seen, seen + x.shape[0]
        seen = hi
        a, b = torch.searchsorted(sorted_ids, lo), torch.searchsorted(sorted_ids, hi)
        if a == b:
            continue
        slots = order[a:b]  # flat (k, j) slots whose sample lies in this batch
        c = circuit_rows(model, refs.layer, circuit_layer, x, flat_ids[slots] - lo, refs.neurons[slots // n],
                         reduce=reduce, fast=fast, max_rows=max_rows, replicate_at=replicate_at)
        if out is None:
            out = torch.zeros(k_count * n, c.shape[-1])
        out[slots] = l1_normalize(c.detach().float().cpu())
    if out is None:
        raise ValueError("data yielded none of the reference samples (is it the same data, in the same order?)")
    return out.view(k_count, n, -1)


# ------------------------------------------------------------------------------------- virtual neurons
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


def _kmeans(c: Tensor, k: int | str, k_range: tuple[int, int], seed: int, n_init: int) -> tuple[Tensor, Tensor]:
    """scikit-learn k-means on circuits ``(n, C)``; ``k="auto"`` picks the best silhouette in ``k_range``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = c.double().numpy()
    candidates = list(range(k_range[0], k_range[1] + 1)) if k == "auto" else [int(k)]
    best = None
    for kk in candidates:
        if kk > len(x):
            continue
        km = KMeans(n_clusters=kk, n_init=n_init, random_state=seed).fit(x)
        labels = km.labels_
        n_distinct = len(set(labels.tolist()))
        score = silhouette_score(x, labels) if 1 < n_distinct < len(x) else -1.0
        if best is None or score > best[0]:
            best = (score, km)
    if best is None:
        raise ValueError(f"k={k} needs at least {candidates[0]} reference samples, got {len(x)}")
    km = best[1]
    return torch.as_tensor(km.cluster_centers_, dtype=torch.float32), torch.as_tensor(km.labels_, dtype=torch.long)


class VirtualNeurons:
    """Fitted PURE virtual neurons: per neuron of ``layer``, k-means centroids of its reference circuits.

    Args:
        layer: dotted name of the layer whose channels are split (``L``).
        circuit_layer: dotted name of the lower layer the circuits live on (``L−1``).
        k: clusters per neuron (``int >= 2``), or ``"auto"``: the best silhouette score in ``k_range``.
        reduce: spatial reduction of the neuron (used for circuits; references use the spatial max).
        fast: circuit fast path (see :func:`circuits`).

    After :meth:`fit`: ``neurons`` (list of ints), ``centroids[k]: (k_k, C)``, ``labels[k]: (n_ref,)`` the
    clusters of the reference samples. :meth:`assign` (nearest centroid for new samples) goes beyond the
    paper's code.
    """

    def __init__(
        self,
        layer: str,
        circuit_layer: str,
        *,
        k: int | str = 2,
        k_range: tuple[int, int] = (2, 5),
        reduce: str = "max",
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
        _check_reduce(reduce)
        _check_fast(fast)
        self.layer, self.circuit_layer = layer, circuit_layer
        self.k, self.k_range, self.reduce, self.fast = k, (int(k_range[0]), int(k_range[1])), reduce, fast
        self.seed, self.n_init = seed, n_init
        self.neurons: list[int] = []
        self.centroids: dict[int, Tensor] = {}
        self.labels: dict[int, Tensor] = {}
        self.separation: dict[int, Tensor] = {}  # neuron -> (inter, intra) circuit distances of the references
        self.references: References | None = None
        self.reference_ranks: Tensor | None = None  # (K, n_ref) rank holding each reference (DDP)

    # fitting ---------------------------------------------------------------------------------------
    def fit(self, circuits: Tensor | Mapping[int, Tensor], neurons: Sequence[int] | Tensor | None = None) -> VirtualNeurons:
        """Cluster reference circuits: ``(K, n_ref, C)`` with ``neurons (K,)``, or ``{neuron: (n_ref, C)}``."""
        if isinstance(circuits, Mapping):
            items = [(int(k), torch.as_tensor(v)) for k, v in circuits.items()]
        else:
            lst = _as_neuron_list(neurons)
            if not isinstance(circuits, Tensor) or circuits.dim() != 3 or lst is None or len(lst) != circuits.shape[0]:
                shape = tuple(circuits.shape) if isinstance(circuits, Tensor) else type(circuits).__name__
                raise ValueError(f"circuits must be (K, n_ref, C) with neurons of length K, got {shape}, {neurons!r}")
            items = list(zip(lst.tolist(), circuits))
        need = self.k_range[0] if self.k == "auto" else int(self.k)
        self.neurons, self.centroids, self.labels, self.separation = [], {}, {}, {}
        for k, c in items:
            if c.dim() != 2:
                raise ValueError(f"circuits of neuron {k} must be (n_ref, C), got {tuple(c.shape)}")
            if need > c.shape[0]:
                raise ValueError(f"k={self.k} is larger than n_ref={c.shape[0]} (reference samples of neuron {k})")
            cent, lab = _kmeans(c.detach().float().cpu(), self.k, self.k_range, self.seed, self.n_init)
            self.neurons.append(k)
            self.centroids[k], self.labels[k] = cent, lab
            self.separation[k] = torch.tensor(inter_intra(c.detach().float().cpu(), lab))
        return self

    def _check_fitted(self) -> None:
        if not self.neurons:
            raise RuntimeError("VirtualNeurons is not fitted; call fit() or fit_virtual_neurons() first")

    def n_virtual(self, neuron: int) -> int:
        """Number of virtual neurons of ``neuron``."""
        return int(self._centroids_of(neuron).shape[0])

    def _centroids_of(self, neuron: int) -> Tensor:
        self._check_fitted()
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
            cent = self._centroids_of(neuron).to(c)
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
        self._check_fitted()
        sel: int | list[int] = self.neurons if neuron is None else neuron if isinstance(neuron, int) else list(neuron)
        for n in [sel] if isinstance(sel, int) else sel:
            self._centroids_of(n)
        c = circuits(model, self.layer, self.circuit_layer, x, sel, reduce=self.reduce, fast=self.fast)
        return self.assign_circuits(c.detach(), sel)

    # state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints and strings only (loads with ``torch.load(weights_only=True)``)."""
        self._check_fitted()
        state: dict[str, Any] = {
            "layer": self.layer,
            "circuit_layer": self.circuit_layer,
            "reduce": self.reduce,
            "k": str(self.k),
            "neurons": torch.tensor(self.neurons, dtype=torch.long),
            "centroids": {str(k): v.clone() for k, v in self.centroids.items()},
            "labels": {str(k): v.clone() for k, v in self.labels.items()},
            "separation": {str(k): v.clone() for k, v in self.separation.items()},
        }
        if self.references is not None:
            state["ref_indices"] = self.references.indices.clone()
            state["ref_values"] = self.references.values.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        need = {"layer", "circuit_layer", "reduce", "neurons", "centroids"}
        if not isinstance(state, Mapping) or not need <= set(state):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a VirtualNeurons state: expected keys {sorted(need)}, got {got}")
        self.layer, self.circuit_layer, self.reduce = str(state["layer"]), str(state["circuit_layer"]), str(state["reduce"])
        k = str(state.get("k", "2"))
        self.k = "auto" if k == "auto" else int(k)
        self.neurons = [int(n) for n in torch.as_tensor(state["neurons"]).tolist()]
        self.centroids = {int(k): torch.as_tensor(v).float() for k, v in state["centroids"].items()}
        self.labels = {int(k): torch.as_tensor(v).long() for k, v in state.get("labels", {}).items()}
        self.separation = {int(k): torch.as_tensor(v).float() for k, v in state.get("separation", {}).items()}
        self.references = None
        if "ref_indices" in state:
            self.references = References(
                self.layer, torch.tensor(self.neurons), torch.as_tensor(state["ref_indices"]), torch.as_tensor(state["ref_values"])
            )

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> VirtualNeurons:
        vn = cls(str(state["layer"]), str(state["circuit_layer"]), reduce=str(state["reduce"]))
        vn.load_state_dict(state)
        return vn

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (tensors; names and options in its string metadata)."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {"neurons": state["neurons"]}
        for key in ("centroids", "labels", "separation"):
            tensors.update({f"{key}.{k}": v.contiguous() for k, v in state[key].items()})
        for key in ("ref_indices", "ref_values"):
            if key in state:
                tensors[key] = state[key].contiguous()
        meta = {k: state[k] for k in ("layer", "circuit_layer", "reduce", "k")}
        save_file(tensors, str(path), metadata={"negspace": json.dumps(meta), "format": "pt"})

    @classmethod
    def load(cls, path: str | Path) -> VirtualNeurons:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("negspace", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not meta:
            raise ValueError(f"{path} is not a VirtualNeurons file (no negspace metadata)")
        state: dict[str, Any] = dict(meta)
        state["neurons"] = tensors["neurons"]
        for key in ("centroids", "labels", "separation"):
            state[key] = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(key + ".")}
        for key in ("ref_indices", "ref_values"):
            if key in tensors:
                state[key] = tensors[key]
        return cls.from_state_dict(state)

    def __repr__(self) -> str:
        if not self.neurons:
            return f"VirtualNeurons(layer={self.layer!r}, circuit_layer={self.circuit_layer!r}, k={self.k!r}, unfitted)"
        parts = ", ".join(f"{n}: {self.n_virtual(n)}" for n in self.neurons[:8])
        more = ", ..." if len(self.neurons) > 8 else ""
        return (
            f"VirtualNeurons(layer={self.layer!r}, circuit_layer={self.circuit_layer!r}, reduce={self.reduce!r}, "
            f"{len(self.neurons)} neurons {{neuron: n_virtual}} = {{{parts}{more}}})"
        )


# ------------------------------------------------------------------------------------ DDP and fitting
def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _dist_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_gather(t: Tensor) -> Tensor:
    """Stack ``t`` (same shape on every rank) from all ranks → ``(world, *t.shape)`` on CPU."""
    import torch.distributed as dist

    dev = _dist_device()
    t = t.to(dev).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.stack(parts).cpu()


def _broadcast(t: Tensor) -> Tensor:
    import torch.distributed as dist

    dev = _dist_device()
    t = t.to(dev).contiguous()
    dist.broadcast(t, src=0)
    return t.cpu()


def _merge_ranks(refs: References, circ: Tensor, n_ref: int) -> tuple[References, Tensor, Tensor]:
    """Global top-``n_ref`` over the ranks' local references; returns merged refs, circuits and the rank of
    each merged reference."""
    pad = n_ref - refs.values.shape[1]
    vals = F.pad(refs.values, (0, pad), value=float("-inf"))
    idx = F.pad(refs.indices, (0, pad), value=-1)
    circ = F.pad(circ, (0, 0, 0, pad))
    g_vals, g_idx, g_circ = _all_gather(vals), _all_gather(idx), _all_gather(circ)  # (W, K, n_ref, ...)
    world = g_vals.shape[0]
    ranks = torch.arange(world)[:, None, None].expand_as(g_vals)
    cat = lambda t: t.permute(1, 0, 2, *range(3, t.dim())).flatten(1, 2)  # noqa: E731 - (K, W*n_ref, ...)
    vals_all, pos = cat(g_vals).topk(n_ref, dim=1)
    idx_all = cat(g_idx).gather(1, pos)
    rank_all = cat(ranks).gather(1, pos)
    circ_all = cat(g_circ).gather(1, pos[..., None].expand(-1, -1, g_circ.shape[-1]))
    if bool(torch.isinf(vals_all).any()):
        raise ValueError(f"n_ref={n_ref} is larger than the number of samples on all ranks")
    return References(refs.layer, refs.neurons, idx_all, vals_all), circ_all, rank_all


def fit_virtual_neurons(
    model: nn.Module,
    layer: str,
    circuit_layer: str,
    data: Tensor | Iterable[Any],
    *,
    neurons: int | Sequence[int] | Tensor | None = None,
    n_ref: int = 100,
    k: int | str = 2,
    k_range: tuple[int, int] = (2, 5),
    reduce: str = "max",
    fast: bool | str = "auto",
    batch_size: int = 64,
    seed: int = 0,
    image_key: str = "image",
    distributed: bool | str = "auto",
    replicate_at: str | None = None,
    progress: bool = False,
) -> VirtualNeurons:
    """Reference samples → circuits → k-means, in two passes over ``data``; returns fitted :class:`VirtualNeurons`.

    Under ``torch.distributed`` (``distributed="auto"`` and an initialised process group) every rank passes
    its own shard: local top-``n_ref`` references and their circuits are all-gathered, the global top-``n_ref``
    kept, k-means runs on rank 0 and the centroids are broadcast, so every rank holds the same edit.
    ``vn.references.indices`` index each rank's own ``data``; ``vn.reference_ranks`` tells which rank.
    """
    vn = VirtualNeurons(layer, circuit_layer, k=k, k_range=k_range, reduce=reduce, fast=fast, seed=seed)
    need = k_range[0] if k == "auto" else k
    if isinstance(need, int) and isinstance(n_ref, int) and need > n_ref:
        raise ValueError(f"k={k} is larger than n_ref={n_ref}")
    rank, world = _dist_info() if distributed in ("auto", True) else (0, 1)
    if distributed is True and world == 1:
        raise ValueError("distributed=True but torch.distributed is not initialised")
    if world == 1:
        refs = reference_samples(model, layer, data, n_ref=n_ref, neurons=neurons, batch_size=batch_size,
                                 image_key=image_key, progress=progress)
        circ = reference_circuits(model, circuit_layer, data, refs, reduce=reduce, fast=fast, batch_size=batch_size,
                                  replicate_at=replicate_at, image_key=image_key, progress=progress)
        vn.fit(circ, refs.neurons)
        vn.references = refs
        vn.reference_ranks = torch.zeros_like(refs.indices)
        return vn
    # each rank may hold fewer than n_ref samples: take what it has, merge globally
    refs = reference_samples(model, layer, data, n_ref=n_ref, neurons=neurons, batch_size=batch_size,
                             image_key=image_key, progress=progress, strict=False)
    circ = reference_circuits(model, circuit_layer, data, refs, reduce=reduce, fast=fast, batch_size=batch_size,
                              replicate_at=replicate_at, image_key=image_key, progress=progress)
    refs, circ, ranks = _merge_ranks(refs, circ, n_ref)
    if rank == 0:
        vn.fit(circ, refs.neurons)
        counts = torch.tensor([vn.n_virtual(n) for n in vn.neurons], dtype=torch.long)
    else:
        counts = torch.zeros(len(refs.neurons), dtype=torch.long)
    counts = _broadcast(counts)
    cents = torch.cat([vn.centroids[n] for n in vn.neurons]) if rank == 0 else torch.zeros(int(counts.sum()), circ.shape[-1])
    labels = torch.stack([vn.labels[n] for n in vn.neurons]) if rank == 0 else torch.zeros(circ.shape[:2], dtype=torch.long)
    sep = torch.stack([vn.separation[n] for n in vn.neurons]).double() if rank == 0 else torch.zeros(len(counts), 2).double()
    cents, labels, sep = _broadcast(cents), _broadcast(labels), _broadcast(sep)
    vn.neurons = refs.neurons.tolist()
    vn.centroids = dict(zip(vn.neurons, cents.split(counts.tolist())))
    vn.labels = dict(zip(vn.neurons, labels))
    vn.separation = dict(zip(vn.neurons, sep.float()))
    vn.references = refs
    vn.reference_ranks = ranks
    return vn


# ------------------------------------------------------------------------------------------------ router
class VirtualNeuronRouter(PersistentEdit):
    """Split channel ``k`` of ``virtual_neurons.layer`` into its virtual neurons at inference and scale some.

    Semantics (exact, no backward pass). ``layer`` must be an ``nn.Conv2d`` (groups=1) or ``nn.Linear``
    whose input is the circuit layer (the fast-path structure; the hook reads the layer's input directly).
    For routed neuron ``k`` with filter ``W_k`` the per-position contribution of lower channel ``i`` is
    ``c_i(p) = Σ_j W_k[i, j] · U[i, j, p]`` (so ``z_k(p) = Σ_i c_i(p) + b_k``):

    * ``mode="sample"`` (default, the paper's test-time rule): the sample's circuit
      ``Σ_p r(p) c(p)`` (``r`` = gradient of ``reduce``, e.g. one-hot at the argmax of ``z_k`` for ``"max"``)
      is exactly the circuit used for fitting; the sample goes to the nearest centroid ``j`` and the whole
      output map of channel ``k`` (bias included) is multiplied by ``scales[k][j]``;
    * ``mode="position"``: each position ``p`` is assigned by its own normalised ``c(p)`` and ``z_k(p)`` is
      multiplied by ``scales[k][label(p)]`` (samples mixing two meanings at different places are split).
      For ``reduce="max"`` the label at the argmax position equals the sample label.

    Args:
        virtual_neurons: fitted :class:`VirtualNeurons`.
        edits: ``{neuron: {virtual: scale}}`` (unlisted virtual neurons keep scale 1; scale 0 ablates).
        mode: ``"sample"`` or ``"position"``.

    Checkpointable (``state_dict`` holds tensors and strings), removable (``remove()``).
    """

    def __init__(
        self,
        virtual_neurons: VirtualNeurons,
        edits: Mapping[int, Mapping[int, float]],
        mode: str = "sample",
    ) -> None:
        super().__init__()
        if not isinstance(virtual_neurons, VirtualNeurons):
            raise TypeError(f"virtual_neurons must be a fitted VirtualNeurons, got {type(virtual_neurons).__name__}")
        virtual_neurons._check_fitted()
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
        if not _fast_module(module):
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
        cent = self.vn._centroids_of(k).to(device=a.device, dtype=torch.float32)
        kk = torch.full((a.shape[0],), k, dtype=torch.long, device=a.device)
        if self.mode == "sample":
            c = _fast_rows(module, a, out, torch.arange(a.shape[0], device=a.device), kk, self.vn.reduce).float()
            return torch.cdist(l1_normalize(c), cent).argmin(dim=1)
        u = _positions_last(module, a)  # (N, C, kk, P)
        c = (u * _filter(module, kk)[..., None].to(u.dtype)).sum(2).transpose(1, 2).float()  # (N, P, C)
        return torch.cdist(l1_normalize(c), cent[None].expand(c.shape[0], -1, -1)).argmin(dim=2)

    def route(self, module: nn.Module, a: Tensor, output: Tensor) -> Tensor:
        """Edited output of the routed layer given its input ``a`` and output."""
        with torch.no_grad():
            mult = torch.ones_like(_channels_last(output))  # (N, P, C_out)
            for k, s in self.scales.items():
                if k >= mult.shape[-1]:
                    raise ValueError(f"neuron {k} does not exist in layer {self.vn.layer!r} ({mult.shape[-1]} channels)")
                lab = self.labels(module, a.detach(), output.detach(), k)
                f = s.to(mult)[lab]
                mult[..., k] = f[:, None] if f.dim() == 1 else f
        if output.dim() == 4:
            mult = mult.transpose(1, 2).reshape(output.shape)
        elif output.dim() == 2:
            mult = mult[:, 0]
        return output * mult

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
        vn = VirtualNeurons.from_state_dict(state["virtual_neurons"])
        edits = {int(k): {j: float(v) for j, v in enumerate(t.tolist())} for k, t in state["scales"].items()}
        fresh = VirtualNeuronRouter(vn, edits, mode=str(state["mode"]))
        self.vn, self.mode, self.scales, self.layers = fresh.vn, fresh.mode, fresh.scales, fresh.layers

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> VirtualNeuronRouter:
        vn = VirtualNeurons.from_state_dict(state["virtual_neurons"])
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
