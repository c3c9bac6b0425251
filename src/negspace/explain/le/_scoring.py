"""Shared machinery of the simulation scores (:mod:`.ablation`, :mod:`.impact`): the scoring data, replacing one
neuron inside the network, chunked forward passes, and the exact linear-head fast path.

A neuron is *replaced* by writing a scalar into the layer output: column ``k`` of ``(B, D)``, the whole map of
channel ``k`` of ``(B, C, H, W)`` (a constant map, so its spatial mean is the value), or channel ``k`` of every token
(``reduce="mean"``) / of the CLS token (``reduce="cls"``) of ``(B, T, D)``.

**Fast path** (exact, no network re-run): when the model's output is ``head(mean-pool(layer output))`` with
``head`` an ``nn.Linear`` (ResNet-style penultimate layer), replacing channel k by ``v`` changes the logits by
``(v − pool_k)·W[:, k]``. :func:`fast_head` verifies this numerically on the data before it is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.batch import unpack_batch
from negspace.hooks import capture, get_layer, intervene, model_device
from negspace.reduce import summarize

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy ``(B,)`` (the default loss of the scores)."""
    return F.cross_entropy(logits, y, reduction="none")


def scoring_data(data: Any, concepts: Tensor | None, batch_keys: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """Materialise ``data`` into ``(x (N, ...), y (N,), concepts (N, M) | None)``.

    ``data``: ``(x, y)`` / ``(x, y, concepts)`` tensors, or an iterable of labelled batches (dict batches may carry
    their concept rows under ``"concepts"``).
    """
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(isinstance(t, Tensor) for t in data) \
            and data[0].ndim >= 2 and data[1].ndim == 1 and data[0].shape[0] == data[1].shape[0]:
        x, y = data[0], data[1]
        p = data[2] if len(data) == 3 else concepts
    else:
        if isinstance(data, Tensor):
            raise TypeError("data must hold labels: a tuple (x, y[, concepts]) or an iterable of (x, y) batches")
        xs, ys, ps = [], [], []
        for batch in data:
            b = unpack_batch(batch, batch_keys, require=("image", "label"), who="LE scoring")
            xs.append(b.image)
            ys.append(torch.as_tensor(b.label).flatten())
            if isinstance(batch, Mapping) and batch.get("concepts") is not None:
                ps.append(batch["concepts"])
        if not xs:
            raise ValueError("data is empty")
        x, y = torch.cat(xs), torch.cat(ys)
        p = torch.cat(ps) if ps else concepts
    if p is not None and p.shape[0] != x.shape[0]:
        raise ValueError(f"concepts has {p.shape[0]} rows but data has {x.shape[0]} samples")
    return x, y.long(), p


def replace(out: Tensor, neuron: int, value: Tensor, reduce: str) -> Tensor:
    """Copy of ``out`` with neuron ``neuron`` set to ``value (B,)`` (see the module docstring for the layout)."""
    new = out.clone()
    v = value.to(out.dtype)
    if out.ndim == 2:
        new[:, neuron] = v
    elif out.ndim == 3:
        if reduce == "cls":
            new[:, 0, neuron] = v
        else:
            new[:, :, neuron] = v[:, None]
    else:
        new[:, neuron] = v.reshape(-1, *([1] * (out.ndim - 2)))
    return new


class Runner:
    """Forward passes of ``model`` on fixed data, in chunks, with or without replacing one neuron."""

    def __init__(self, model: nn.Module, layer: str, x: Tensor, y: Tensor, *, reduce: str, batch_size: int,
                 loss_fn: LossFn) -> None:
        self.model, self.layer, self.x, self.y = model, layer, x, y
        self.reduce, self.bs, self.loss_fn = reduce, batch_size, loss_fn
        self.device = model_device(model)
        self.act_ndim = 0

    def base(self) -> tuple[Tensor, Tensor]:
        """``(logits (N, K), summaries (N, D))`` without any edit; sets ``self.act_ndim``."""
        logits, summ = [], []
        with torch.no_grad(), capture(self.model, self.layer, detach=True) as cap:
            for i in range(0, len(self.x), self.bs):
                out = self.model(self.x[i : i + self.bs].to(self.device))
                if not isinstance(out, Tensor) or out.ndim != 2:
                    raise TypeError(f"model must return logits (B, K), got {type(out).__name__} "
                                    f"{tuple(out.shape) if isinstance(out, Tensor) else ''}")
                logits.append(out.float().cpu())
                act = cap.activations[self.layer]
                self.act_ndim = act.ndim
                summ.append(summarize(act, self.reduce).float().cpu())
        return torch.cat(logits), torch.cat(summ)

    def losses(self, neuron: int, values: Tensor, rows: Tensor, *, grad: bool = False) -> Tensor:
        """Per-sample loss ``(len(rows),)`` with the neuron replaced by ``values (len(rows),)``."""
        out = []
        with torch.enable_grad() if grad else torch.no_grad():
            for i in range(0, len(rows), self.bs):
                idx = rows[i : i + self.bs]
                v = values[i : i + self.bs].to(self.device)
                with intervene(self.model, {self.layer: lambda o, v=v: replace(o, neuron, v, self.reduce)}):
                    lg = self.model(self.x[idx].to(self.device))
                out.append(self.loss_fn(lg.float(), self.y[idx].to(self.device)).cpu())
        return torch.cat(out)


def fast_head(model: nn.Module, head: str | None, logits: Tensor, q: Tensor, act_ndim: int,
              reduce: str) -> nn.Linear | None:
    """The linear head when ``logits == head(mean-pool(layer output))`` holds on all the data, else ``None``.

    ``q`` are the mean summaries of the base pass (= the mean-pooled layer output for 2-D/4-D layers), so the
    check needs no extra forward pass.
    """
    if reduce != "mean" or act_ndim not in (2, 4):
        return None  # token layers: what the head sees is not the mean over tokens in general
    d_out = q.shape[1]
    if head is not None:
        mod = get_layer(model, head)
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"head {head!r} must be an nn.Linear, got {type(mod).__name__}")
        cands = [mod]
    else:
        cands = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == d_out][-1:]
    for m in cands:
        if m.in_features != d_out or logits.shape[-1] != m.out_features:
            continue
        with torch.no_grad():
            pred = F.linear(q.to(m.weight), m.weight, m.bias).float().cpu()
        if torch.allclose(pred, logits, rtol=1e-4, atol=1e-5 * float(logits.abs().max().clamp_min(1.0))):
            return m
    return None


def fast_losses(logits: Tensor, y: Tensor, pooled_k: Tensor, w_k: Tensor, values: Tensor, loss_fn: LossFn,
                chunk: int = 2**22) -> Tensor:
    """Loss ``(R, J)`` of logits ``(R, K)`` with neuron columns ``pooled_k (R, J)`` replaced by ``values (R, J)``;
    ``w_k (K, J)`` are the head weights of the J neurons."""
    r, k = logits.shape
    j = pooled_k.shape[1]
    out = torch.empty(r, j, dtype=values.dtype)
    step = max(1, chunk // max(1, r * k))
    for s in range(0, j, step):
        delta = (values[:, s : s + step] - pooled_k[:, s : s + step]).to(logits.dtype)  # (R, j')
        lg = logits[:, None, :] + delta[:, :, None] * w_k[:, s : s + step].T[None]  # (R, j', K)
        jj = lg.shape[1]
        out[:, s : s + step] = loss_fn(lg.reshape(r * jj, k), y.repeat_interleave(jj)).reshape(r, jj).to(values.dtype)
    return out
