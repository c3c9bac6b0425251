"""Simulation scores of linear explanations (paper 003, Sec. 4) and Top Impact (Sec. 2).

* :func:`correlation_score` — Pearson correlation between the simulated activation ``s(x, E)`` and the neuron
  (eq. 10).
* :func:`ablation_score` — replace the neuron by ``c·s(x, E) + d`` and compare the change of the loss with the
  change under mean replacement (eq. 12): ``α = 1 − Σ|L(f_{k←s}) − L(f)| / Σ|L(f_{k←μ}) − L(f)|``. ``(c, d)`` are
  fitted on the val split, by gradient ascent on ``α`` (``"optim"``, eq. 13, initialised at ``"norm"``) or in
  closed form (``"norm"``, eqs. 16–18); ``"none"`` uses ``c = 1, d = 0``. Scored on the test split.
* :func:`top_impact` — ``TI_k(β)`` (eq. 4) from single-neuron zero-ablations.

A neuron is *replaced* by writing the scalar into the layer output: column ``k`` of ``(B, D)``, the whole map of
channel ``k`` of ``(B, C, H, W)`` (a constant map, so its spatial mean is the value), or channel ``k`` of every token
(``reduce="mean"``) / of the CLS token (``reduce="cls"``) of ``(B, T, D)``.

**Fast path** (exact, no network re-run): when the model's output is ``head(mean-pool(layer output))`` with
``head`` an ``nn.Linear`` (ResNet-style penultimate layer), replacing channel k by ``v`` changes the logits by
``(v − pool_k)·W[:, k]``. This is verified numerically on the data before use (``fast=None`` falls back to re-running
the network if the check fails; ``fast=True`` raises).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.explain.concepts import split_batch, summarize
from negspace.explain.linear import Explanation, split_indices
from negspace.hooks import capture, get_layer, intervene

__all__ = ["ablation_score", "area_chart", "correlation_score", "top_impact"]

SCALINGS = ("optim", "norm", "none")


# ------------------------------------------------------------------------------------------ correlation
def _pearson(a: Tensor, b: Tensor) -> float:
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    den = float((a.square().sum() * b.square().sum()).sqrt())
    if den <= 1e-300:
        return float("nan") if float(b.abs().max()) == 0.0 else 0.0
    return float((a * b).sum() / den)


def _rows_of(rows: str | Tensor | None, explanation: Explanation, n: int) -> Tensor | None:
    if rows is None:
        return None
    if isinstance(rows, Tensor):
        return rows.long()
    if rows not in ("train", "val", "test"):
        raise ValueError(f"rows must be None, 'train', 'val', 'test' or an index tensor, got {rows!r}")
    if explanation.n_samples != n:
        raise ValueError(
            f"rows={rows!r} refers to the split the explanation was fitted on ({explanation.n_samples} rows), "
            f"but {n} rows were given"
        )
    tr, va, te = split_indices(n, explanation.split, explanation.seed)
    return {"train": tr, "val": va, "test": te}[rows]


def correlation_score(
    explanation: Explanation | Sequence[Explanation],
    activations: Tensor,
    concepts: Tensor,
    *,
    rows: str | Tensor | None = None,
) -> float | list[float]:
    """Pearson correlation between ``explanation.simulate(concepts)`` and ``activations`` (eq. 10).

    Args:
        explanation: one explanation (``activations (N,)``) or a list (``activations (N, D)``, column j ↔ item j).
        activations: true neuron summaries on the scoring data.
        concepts: the simulator's concept matrix ``(N, M)`` for the same rows.
        rows: ``None`` = all rows; ``"test"``/``"val"``/``"train"`` = that part of the explanation's seeded split
            (the data must be the probing data it was fitted on); or an index tensor.

    An explanation without concepts simulates a constant: score 0 (``nan`` if the neuron is constant too).
    """
    if not isinstance(activations, Tensor) or not isinstance(concepts, Tensor):
        raise TypeError("activations and concepts must be tensors")
    if concepts.ndim != 2 or concepts.shape[0] != activations.shape[0]:
        raise ValueError(
            f"concepts must be (N, M) with N = activations rows ({activations.shape[0]}), got {tuple(concepts.shape)}"
        )
    if isinstance(explanation, Explanation):
        if activations.ndim != 1:
            raise ValueError(f"one explanation needs activations of shape (N,), got {tuple(activations.shape)}")
        r = _rows_of(rows, explanation, activations.shape[0])
        sim = explanation.simulate(concepts)
        if r is not None:
            return _pearson(sim[r], activations[r])
        return _pearson(sim, activations)
    exps = list(explanation)
    if activations.ndim != 2 or activations.shape[1] != len(exps):
        raise ValueError(f"{len(exps)} explanations need activations (N, {len(exps)}), got {tuple(activations.shape)}")
    return [correlation_score(e, activations[:, j], concepts, rows=rows) for j, e in enumerate(exps)]


# ------------------------------------------------------------------------------------------ data helpers
def _gather(data: Any, concepts: Tensor | None, batch_keys: Sequence[str] | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Materialise ``data`` into ``(x (N, ...), y (N,), concepts (N, M) | None)``."""
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(isinstance(t, Tensor) for t in data) \
            and data[0].ndim >= 2 and data[1].ndim == 1 and data[0].shape[0] == data[1].shape[0]:
        x, y = data[0], data[1]
        p = data[2] if len(data) == 3 else concepts
    else:
        if isinstance(data, Tensor):
            raise TypeError("data must hold labels: a tuple (x, y[, concepts]) or an iterable of (x, y) batches")
        xs, ys, ps = [], [], []
        for batch in data:
            bx, by, extras = split_batch(batch, batch_keys)
            if by is None:
                raise ValueError("ablation scoring needs labels; a batch of data has none")
            xs.append(bx)
            ys.append(torch.as_tensor(by).flatten())
            if "concepts" in extras:
                ps.append(extras["concepts"])
        if not xs:
            raise ValueError("data is empty")
        x, y = torch.cat(xs), torch.cat(ys)
        p = torch.cat(ps) if ps else concepts
    if p is not None and p.shape[0] != x.shape[0]:
        raise ValueError(f"concepts has {p.shape[0]} rows but data has {x.shape[0]} samples")
    return x, y.long(), p


def _replace(out: Tensor, neuron: int, value: Tensor, reduce: str) -> Tensor:
    """Copy of ``out`` with neuron ``neuron`` set to ``value (B,)`` (see module docstring for the layout)."""
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


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Runner:
    """Forward passes of ``model`` on fixed data, in chunks, with or without replacing one neuron."""

    def __init__(self, model: nn.Module, layer: str, x: Tensor, y: Tensor, *, reduce: str, batch_size: int,
                 loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.model, self.layer, self.x, self.y = model, layer, x, y
        self.reduce, self.bs, self.loss_fn = reduce, batch_size, loss_fn
        self.device = _device_of(model)

    def base(self) -> tuple[Tensor, Tensor]:
        """``(logits (N, K), summaries (N, D))`` without any edit; sets ``self.act_ndim``."""
        logits, summ = [], []
        self.act_ndim = 0
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
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for i in range(0, len(rows), self.bs):
                idx = rows[i : i + self.bs]
                v = values[i : i + self.bs].to(self.device)
                with intervene(self.model, {self.layer: lambda o, v=v: _replace(o, neuron, v, self.reduce)}):
                    logits = self.model(self.x[idx].to(self.device))
                out.append(self.loss_fn(logits.float(), self.y[idx].to(self.device)).cpu())
        return torch.cat(out)


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _fast_head(model: nn.Module, head: str | None, logits: Tensor, q: Tensor, act_ndim: int,
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


def _fast_losses(logits: Tensor, y: Tensor, pooled_k: Tensor, w_k: Tensor, values: Tensor, loss_fn: Callable,
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


# ------------------------------------------------------------------------------------------ ablation score
def _norm_scaling(s_val: Tensor, q_val: Tensor) -> tuple[Tensor, Tensor]:
    """Eqs. 16–18 per column: ``c = ρ σ_q/σ_s``, ``d = μ_q − c μ_s`` (population std); c = 0 if s is constant."""
    ms, mq = s_val.mean(0), q_val.mean(0)
    ss = s_val.std(0, unbiased=False)
    cov = ((s_val - ms) * (q_val - mq)).mean(0)
    c = torch.where(ss > 1e-12, cov / ss.clamp_min(1e-300) ** 2, torch.zeros_like(ss))  # = ρ σ_q / σ_s
    return c, mq - c * ms


def _alpha(l_sim: Tensor, l_base: Tensor, l_mean: Tensor) -> Tensor:
    """Eq. 12 per column: ``1 − Σ|L_sim − L| / Σ|L_μ − L|`` (``nan`` where mean replacement changes nothing)."""
    num = (l_sim - l_base[:, None] if l_sim.ndim == 2 else l_sim - l_base).abs().sum(0)
    den = (l_mean - l_base[:, None] if l_mean.ndim == 2 else l_mean - l_base).abs().sum(0)
    return torch.where(den > 0, 1.0 - num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


def ablation_score(
    model: nn.Module,
    layer: str,
    neuron: int | Sequence[int],
    explanation: Explanation | Sequence[Explanation],
    data: Any,
    *,
    scaling: str = "optim",
    concepts: Tensor | None = None,
    reduce: str = "mean",
    fast: bool | None = None,
    head: str | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    steps: int = 100,
    lr: float = 0.05,
    batch_size: int = 256,
    batch_keys: Sequence[str] | None = None,
    progress: bool = False,
) -> float | list[float]:
    """Ablation score ``α(k, E)`` (eqs. 11–14): 1 = the simulation replaces the neuron perfectly, 0 = as good as
    its mean, < 0 worse than the mean.

    Args:
        model: classifier returning logits ``(B, K)``; layer: dotted name; neuron: channel index, or a list
            (then ``explanation`` is a list of the same length and a list of scores is returned).
        data: ``(x, y)`` or ``(x, y, concepts)`` tensors, or an iterable of batches (dicts with
            ``"image"``/``"label"``[/``"concepts"``] or tuples ``(x, y)``) in the same order as ``concepts``.
        concepts: the simulator's concept matrix ``(N, M)`` (if ``data`` does not carry it).
        scaling: ``"optim"`` (Adam on (c, d), ``steps``/``lr``, best val α kept), ``"norm"``, or ``"none"``.
        reduce: how the neuron's scalar is read/written for token layers (``"mean"`` or ``"cls"``).
        fast: ``None`` = use the exact linear-head shortcut when it applies; ``True`` = require it; ``False`` = always
            re-run the network. head: dotted name of the linear head (default: last ``nn.Linear`` that fits).
        loss_fn: per-sample loss ``(logits, y) -> (B,)`` (default cross-entropy).

    Rows: if ``data`` has as many rows as the explanation was fitted on, the explanation's own val split fits
    ``(c, d)`` and its test split is scored (the paper's protocol). Otherwise ``data`` is treated as held-out
    data and split, seeded, into val and test in the explanation's val:test ratio.
    The mean ``μ`` is the neuron's mean summary over all rows of ``data``.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if reduce not in ("mean", "cls"):
        raise ValueError(f"reduce must be 'mean' or 'cls' for ablation, got {reduce!r}")
    many = not isinstance(neuron, int)
    neurons = [int(n) for n in neuron] if many else [int(neuron)]
    exps = list(explanation) if many else [explanation]
    if many and isinstance(explanation, Explanation):
        raise TypeError("a list of neurons needs a list of explanations of the same length")
    if len(exps) != len(neurons) or not all(isinstance(e, Explanation) for e in exps):
        raise ValueError(f"got {len(neurons)} neurons but {len(exps)} explanations")
    get_layer(model, layer)
    loss_fn = loss_fn or _ce
    x, y, p = _gather(data, concepts, batch_keys)
    if p is None and any(e.concept_indices for e in exps):
        raise ValueError("pass concepts=(N, M) (or data=(x, y, concepts)) so the explanations can be simulated")
    n = x.shape[0]
    was_training = model.training
    model.eval()
    try:
        runner = _Runner(model, layer, x, y, reduce=reduce, batch_size=batch_size, loss_fn=loss_fn)
        logits, q = runner.base()
        lin = None
        if fast is not False:
            lin = _fast_head(model, head, logits, q, runner.act_ndim, reduce)
            if lin is None and fast:
                raise ValueError(
                    f"fast=True but the model output is not a linear head applied to the mean-pooled output of "
                    f"{layer!r} (head={head!r}); use fast=None/False"
                )
        if max(neurons) >= q.shape[1]:
            raise ValueError(f"neuron index {max(neurons)} out of range for layer {layer!r} with {q.shape[1]} neurons")
        l_base = loss_fn(logits, y)
        e0 = exps[0]
        if all(e.n_samples == n for e in exps):
            _, va, te = split_indices(n, e0.split, e0.seed)
        else:
            frac = e0.split[1] / (e0.split[1] + e0.split[2]) if e0.split[2] > 0 else 0.5
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(e0.seed))
            nv = max(1, round(frac * n))
            va, te = perm[:nv], perm[nv:]
        zeros = torch.zeros(n, 0 if p is None else p.shape[1])
        sims = torch.stack([e.simulate(p if p is not None else zeros).double() for e in exps], 1)  # (N, J)
        qj = q[:, neurons].double()
        mu = qj.mean(0)  # (J,)
        c, d = _norm_scaling(sims[va], qj[va]) if scaling != "none" else (torch.ones(len(neurons)),
                                                                          torch.zeros(len(neurons)))
        c, d = c.double(), d.double()
        if lin is not None:
            pooled = qj  # head input == mean-pooled summaries (verified)
            w_k = lin.weight.detach().double().cpu()[:, neurons]
            lg = logits.double()

            def loss_at(values: Tensor, rows: Tensor) -> Tensor:  # (R, J)
                return _fast_losses(lg[rows], y[rows], pooled[rows], w_k, values, loss_fn)

            if scaling == "optim":
                c, d = _optimise_cd(lambda cc, dd, rows: loss_at(cc * sims[rows] + dd, rows), c, d,
                                    l_base[va].double(), loss_at(mu.expand(len(va), -1), va), va, qj[va], steps, lr)
            l_sim = loss_at(c * sims[te] + d, te)
            l_mu = loss_at(mu.expand(len(te), -1), te)
            scores = _alpha(l_sim, l_base[te].double(), l_mu)
            return [float(s) for s in scores] if many else float(scores[0])

        scores = []
        for j, k in enumerate(tqdm(neurons, desc="ablation scores", disable=not progress, leave=False)):
            cj, dj = c[j : j + 1], d[j : j + 1]
            if scaling == "optim":
                l_mu_va = runner.losses(k, mu[j].expand(len(va)).float(), va).double()[:, None]

                def loss_va(cc: Tensor, dd: Tensor, rows: Tensor, k: int = k, j: int = j) -> Tensor:
                    vals = cc * sims[rows, j : j + 1] + dd
                    return runner.losses(k, vals[:, 0].float(), rows, grad=True).double()[:, None]

                cj, dj = _optimise_cd(loss_va, cj, dj, l_base[va].double(), l_mu_va, va, qj[va, j : j + 1], steps, lr)
            l_sim = runner.losses(k, (cj * sims[te, j] + dj).float(), te).double()
            l_mu = runner.losses(k, mu[j].expand(len(te)).float(), te).double()
            scores.append(float(_alpha(l_sim, l_base[te].double(), l_mu)))
        return scores if many else scores[0]
    finally:
        model.train(was_training)


def _optimise_cd(
    loss_of: Callable[[Tensor, Tensor, Tensor], Tensor],
    c0: Tensor, d0: Tensor, l_base: Tensor, l_mean: Tensor, rows: Tensor, q_val: Tensor, steps: int, lr: float,
) -> tuple[Tensor, Tensor]:
    """Maximise the val ablation score over (c, d) per neuron with Adam (eq. 13), starting from ``(c0, d0)``.

    Parametrised as ``c = c0 + σ·u``-style offsets scaled by the neuron's val std so one learning rate fits all
    neurons; the best (c, d) seen (including the start) is returned.
    """
    scale = q_val.std(0, unbiased=False).clamp_min(1e-8)  # (J,)
    c_scale = torch.where(c0.abs() > 1e-8, c0.abs(), scale)
    u = torch.zeros_like(c0, requires_grad=True)
    v = torch.zeros_like(d0, requires_grad=True)
    opt = torch.optim.Adam([u, v], lr=lr)
    best_c, best_d = c0.clone(), d0.clone()
    best = torch.full_like(c0, -math.inf)
    den = (l_mean - l_base[:, None]).abs().sum(0).clamp_min(1e-300)
    for _ in range(max(0, steps) + 1):
        c = c0 + c_scale * u
        d = d0 + scale * v
        l_sim = loss_of(c, d, rows)
        alpha = 1.0 - (l_sim - l_base[:, None]).abs().sum(0) / den
        with torch.no_grad():
            better = alpha > best
            best = torch.where(better, alpha, best)
            best_c = torch.where(better, c, best_c)
            best_d = torch.where(better, d, best_d)
        if not alpha.requires_grad:
            break
        opt.zero_grad()
        (-alpha.sum()).backward()
        opt.step()
    return best_c.detach(), best_d.detach()


# ------------------------------------------------------------------------------------------ top impact
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
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
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
    loss_fn = loss_fn or _ce
    x, y, _ = _gather(data, None, batch_keys)
    n = x.shape[0]
    was_training = model.training
    model.eval()
    try:
        runner = _Runner(model, layer, x, y, reduce=reduce, batch_size=batch_size, loss_fn=loss_fn)
        logits, q = runner.base()
        lin = None if fast is False else _fast_head(model, head, logits, q, runner.act_ndim, reduce)
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
                l_abl = _fast_losses(logits.double(), y, q[:, chunk].double(), w_k, vals, loss_fn)
                pred = []
                lgd = logits.double()
                for jj, k in enumerate(chunk):  # accuracy needs the argmax of the edited logits
                    lg = lgd + (vals[:, jj] - q[:, k].double())[:, None] * w_k[:, jj][None]
                    pred.append(lg.argmax(1))
                acc_abl = (torch.stack(pred, 1) == y[:, None]).double()
            else:
                l_cols, a_cols = [], []
                for k in chunk:
                    with torch.no_grad(), intervene(model, {layer: lambda o, k=k: _replace(
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
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ figure
def area_chart(
    activations: Tensor,
    concepts: Tensor,
    concept_names: Sequence[str],
    *,
    explanation: Explanation | None = None,
    top: int = 6,
    n_buckets: int = 8,
    path: str | Path | None = None,
    title: str | None = None,
) -> Any:
    """Area chart (paper 003, Fig. 3): ``n_buckets`` evenly spaced activation buckets between 0 (or the minimum,
    if negative) and the maximum, and per bucket the mean of each concept (= share of inputs with that label for
    0/1 concepts). Shows the explanation's concepts, or the ``top`` concepts most correlated with the neuron.
    Returns the matplotlib Figure (saved as PNG when ``path`` is given).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    a = activations.detach().double().flatten()
    p = concepts.detach().double()
    if p.ndim != 2 or p.shape[0] != a.shape[0]:
        raise ValueError(f"concepts must be (N, M) with N = {a.shape[0]}, got {tuple(p.shape)}")
    if explanation is not None and explanation.concept_indices:
        cols = list(explanation.concept_indices)
    else:
        pc = p - p.mean(0)
        ac = a - a.mean()
        corr = (pc * ac[:, None]).sum(0) / ((pc.square().sum(0) * ac.square().sum()).sqrt().clamp_min(1e-300))
        cols = torch.topk(corr, min(top, p.shape[1])).indices.tolist()
    lo = min(0.0, float(a.min()))
    hi = float(a.max())
    edges = torch.linspace(lo, hi if hi > lo else lo + 1.0, n_buckets + 1, dtype=torch.float64)
    bucket = torch.bucketize(a, edges[1:-1], right=False)
    mids = ((edges[:-1] + edges[1:]) / 2).numpy()
    shares = torch.zeros(len(cols), n_buckets, dtype=torch.float64)
    counts = torch.bincount(bucket, minlength=n_buckets)
    for bi in range(n_buckets):
        sel = bucket == bi
        if sel.any():
            shares[:, bi] = p[sel][:, cols].mean(0)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.stackplot(mids, shares.numpy(), labels=[str(concept_names[c]) for c in cols], alpha=0.85)
    ax.set_xlabel("activation")
    ax.set_ylabel("mean concept value per bucket")
    ax2 = ax.twinx()
    shown_counts = torch.where(counts > 0, counts.double(), torch.full_like(counts, float("nan"), dtype=torch.float64))
    ax2.plot(mids, shown_counts.numpy(), "k--", lw=1, marker=".", label="inputs per bucket")
    ax2.set_yscale("log")
    ax2.set_ylabel("inputs (log)")
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    ax.set_title(title or (str(explanation) if explanation is not None else "activation buckets by concept"), fontsize=8)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
