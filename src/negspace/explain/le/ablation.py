"""Ablation score of linear explanations (paper 003, Sec. 4, eqs. 11–18).

Replace the neuron by ``c·s(x, E) + d`` and compare the change of the loss with the change under mean
replacement (eq. 12): ``α = 1 − Σ|L(f_{k←s}) − L(f)| / Σ|L(f_{k←μ}) − L(f)|``. ``(c, d)`` are fitted on the val
split, by gradient ascent on ``α`` (``"optim"``, eq. 13, initialised at ``"norm"``) or in closed form (``"norm"``,
eqs. 16–18); ``"none"`` uses ``c = 1, d = 0``. Scored on the test split.

How a neuron is replaced, and the exact linear-head fast path (no network re-run; verified numerically on the
data: ``fast=None`` falls back to re-running the network if the check fails, ``fast=True`` raises), are described
in :mod:`negspace.explain.le._scoring`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.hooks import eval_mode, get_layer

from ._scoring import LossFn, Runner, cross_entropy, fast_head, fast_losses, scoring_data
from .explanation import Explanation, split_indices
from .simulator import ConceptSimulator

__all__ = ["SCALINGS", "ablation_score"]

SCALINGS = ("optim", "norm", "none")


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
    concept_names: Sequence[str] | None = None,
    simulator: ConceptSimulator | None = None,
    reduce: str = "mean",
    fast: bool | None = None,
    head: str | None = None,
    loss_fn: LossFn | None = None,
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
        concepts: a concept matrix ``(N, M)`` (if ``data`` does not carry it): the explainer's own (columns as
            fitted) or, with ``concept_names``, any matrix whose columns are looked up by name.
        simulator: a simulator ``(images, names) -> (N, len(names))`` (e.g. :class:`ClipSimulator`, paper 003 §4)
            evaluated on the images of ``data`` for the concepts the explanations use; replaces ``concepts``.
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
    loss_fn = loss_fn or cross_entropy
    x, y, p = scoring_data(data, concepts, batch_keys)
    if simulator is not None:
        concept_names = sorted({c for e in exps for c in e.concepts})
        p = torch.as_tensor(simulator(x, concept_names)).float()
    if p is None and any(e.concept_indices for e in exps):
        raise ValueError("pass concepts=(N, M) (or data=(x, y, concepts)) so the explanations can be simulated")
    n = x.shape[0]
    with eval_mode(model):
        runner = Runner(model, layer, x, y, reduce=reduce, batch_size=batch_size, loss_fn=loss_fn)
        logits, q = runner.base()
        lin = None
        if fast is not False:
            lin = fast_head(model, head, logits, q, runner.act_ndim, reduce)
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
        names = concept_names if p is not None else None
        sims = torch.stack([e.simulate(p if p is not None else zeros, names).double() for e in exps], 1)  # (N, J)
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
                return fast_losses(lg[rows], y[rows], pooled[rows], w_k, values, loss_fn)

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
    with torch.enable_grad():  # also when called under no_grad: (c, d) are optimised by gradient ascent
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
