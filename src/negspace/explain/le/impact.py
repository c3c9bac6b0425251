"""Top Impact (paper 003, Sec. 2, eqs. 1–4): how much of a neuron's impact on the loss and accuracy is carried
by the inputs on which it activates most. Uses the exact linear-head fast path of :mod:`._scoring` when it applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.hooks import eval_mode, intervene

from ._scoring import LossFn, Runner, cross_entropy, fast_head, fast_losses, replace, scoring_data

__all__ = ["top_impact"]


def top_impact(
    model: nn.Module,
    layer: str,
    data: Any,
    *,
    neurons: Sequence[int] | None = None,
    betas: Sequence[float] = (0.0003, 0.002, 0.02, 0.1, 0.5),
    value: float = 0.0,
    reduce: str = "mean",
    fast: bool | None = None,
    head: str | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int = 256,
    batch_keys: Sequence[str] | None = None,
    progress: bool = False,
) -> Tensor:
    """Top Impact ``TI_k(β)`` (eq. 4) of each neuron: share of its total absolute impact carried by the ``β·N``
    inputs on which it activates most. Returns ``(J, len(betas))``.

    Impact per input (eq. 1–3): ``I_k(x) = (ΔAcc_k(x) − ΔL_k(x)) / 2`` with the neuron ablated to ``value``
    (default 0), ``ΔAcc`` normalised by the number of correct predictions and ``ΔL`` by the total loss (no
    temperature calibration). Inputs are ordered by the neuron's ``reduce`` summary.
    """
    loss_fn = loss_fn or cross_entropy
    x, y, _ = scoring_data(data, None, batch_keys)
    n = x.shape[0]
    with eval_mode(model):
        runner = Runner(model, layer, x, y, reduce=reduce, batch_size=batch_size, loss_fn=loss_fn)
        logits, q = runner.base()
        lin = None if fast is False else fast_head(model, head, logits, q, runner.act_ndim, reduce)
        if lin is None and fast:
            raise ValueError(f"fast=True but {layer!r} does not feed a linear head through average pooling")
        ks = list(range(q.shape[1])) if neurons is None else [int(k) for k in neurons]
        l_base = loss_fn(logits, y).double()
        correct = (logits.argmax(1) == y).double()
        n_correct = correct.sum().clamp_min(1.0)
        l_total = l_base.sum().clamp_min(1e-300)
        all_rows = torch.arange(n)
        out = torch.zeros(len(ks), len(betas), dtype=torch.float64)
        for j0 in tqdm(range(0, len(ks), 64), desc="top impact", disable=not progress, leave=False):
            chunk = ks[j0 : j0 + 64]
            vals = torch.full((n, len(chunk)), float(value), dtype=torch.float64)
            if lin is not None:
                w_k = lin.weight.detach().double().cpu()[:, chunk]
                l_abl = fast_losses(logits.double(), y, q[:, chunk].double(), w_k, vals, loss_fn)
                pred = []
                lgd = logits.double()
                for jj, k in enumerate(chunk):  # accuracy needs the argmax of the edited logits
                    lg = lgd + (vals[:, jj] - q[:, k].double())[:, None] * w_k[:, jj][None]
                    pred.append(lg.argmax(1))
                acc_abl = (torch.stack(pred, 1) == y[:, None]).double()
            else:
                l_cols, a_cols = [], []
                for k in chunk:
                    with torch.no_grad(), intervene(model, {layer: lambda o, k=k: replace(
                            o, k, torch.full((o.shape[0],), float(value), dtype=o.dtype, device=o.device), reduce)}):
                        lg = torch.cat([model(x[i : i + batch_size].to(runner.device)).float().cpu()
                                        for i in range(0, n, batch_size)])
                    l_cols.append(loss_fn(lg, y).double())
                    a_cols.append((lg.argmax(1) == y).double())
                l_abl, acc_abl = torch.stack(l_cols, 1), torch.stack(a_cols, 1)
            d_acc = (correct[:, None] - acc_abl) / n_correct
            d_loss = (l_base[:, None] - l_abl) / l_total
            impact = ((d_acc - d_loss) / 2).abs()  # (N, J')
            for jj, k in enumerate(chunk):
                order = torch.sort(q[all_rows, k], descending=True, stable=True).indices
                cum = torch.cumsum(impact[order, jj], 0)
                total = float(cum[-1])
                for bi, beta in enumerate(betas):
                    m = math.floor(beta * n + 1e-9)
                    out[j0 + jj, bi] = (float(cum[m - 1]) / total if m > 0 else 0.0) if total > 0 else float("nan")
        return out
