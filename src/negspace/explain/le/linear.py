"""Linear Explanations (paper 003, Oikarinen & Weng): a neuron as a sparse linear combination of concepts.

For every neuron ``k`` with activation summaries ``q_k (N,)`` and a concept matrix ``P (N, M)``:

1. Split the rows once, seeded, into train/val/test (70/10/20 by default; :func:`split_indices`).
2. **Sparse ranking.** On z-scored training data (means and standard deviations of the *training split only*)
   solve the elastic net ``min_w 1/(2n)‖P_z w − q_z‖² + λ(η‖w‖₁ + (1−η)/2‖w‖²)`` with ``λ = 0.05`` and
   ``η = 0.99`` (the GLM-SAGA objective of the reference code, = scikit-learn's ``ElasticNet(alpha=λ,
   l1_ratio=η)``) and rank concepts by ``|w|``, descending (ties broken by the marginal correlation). The paper and
   reference rank by *signed* weight (``rank="signed"``), which never tries inhibitory concepts: a planted
   ``−1.5·c`` term is dropped (test ρ 0.61–0.71 vs 0.98–0.99 with ``"abs"``, M = 200, N = 1500); on purely excitatory
   neurons both rankings choose the same concepts.
3. **Greedy search** (Algorithm 1, ``v = max_concepts = 10``, ``r = width = 10``, ``ε = tolerance = 0.02``): at each
   step try the ``r`` best-ranked concepts that are neither selected nor marked bad; for each, fit least squares
   with intercept on ``selected ∪ {j}`` (train split) and measure the Pearson correlation on the val split. A
   candidate that does not improve the best correlation by ``ε`` is marked bad for good (from the second step
   on, as in the reference code, so that every explanation of a live neuron has at least one concept when
   some concept correlates positively); the best remaining one is added; stop when none is added.
   The returned explanation is the *selected* set with its least-squares weights (the reference code can
   return the last *tried* set instead; that bug is not reproduced).

Batched over neurons (why not scikit-learn / per-candidate SGD): every least-squares fit is closed form,
``w = G[S,S]⁻¹ c[S]`` with ``G = P_cᵀP_c/n`` and ``c = P_cᵀq_c/n`` precomputed once for all neurons, and the
validation correlation comes from the val Gram matrix, so one greedy step for *all* neurons and candidates is one
batched ``(D·r, k, k)`` solve, independent of N. The elastic net is solved for all neurons at once by FISTA on the
same Gram matrix (the reference solves it with GLM-SAGA; the minimiser is the same).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .explanation import Explanation, _describe, split_indices

__all__ = ["MIN_VAL_ROWS", "elastic_net_weights", "linear_explanation"]

#: fewer val rows than this warn (see :func:`linear_explanation`; measured in ``tests/test_le_fidelity.py``)
MIN_VAL_ROWS = 30


def elastic_net_weights(
    gram: Tensor,
    cross: Tensor,
    lam: float = 0.05,
    eta: float = 0.99,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> Tensor:
    """Elastic-net weights ``(M, D)`` for all D targets at once from ``gram = XᵀX/n (M, M)``, ``cross = Xᵀy/n (M, D)``.

    Minimises ``1/(2n)‖Xw − y‖² + λ(η‖w‖₁ + (1−η)/2‖w‖²)`` per column (X, y centred) by FISTA with step
    ``1/‖G‖₂``; equals scikit-learn's ``ElasticNet(alpha=λ, l1_ratio=η, fit_intercept=False)`` on centred data.
    """
    step = 1.0 / max(_largest_eigenvalue(gram) * 1.05, 1e-12)
    w = torch.zeros_like(cross)
    z = w.clone()
    t = 1.0
    thr = step * lam * eta
    shrink = 1.0 + step * lam * (1.0 - eta)
    scale = cross.abs().max().clamp_min(1e-12)
    for _ in range(max_iter):
        g = gram @ z - cross
        u = z - step * g
        w_new = torch.sign(u) * (u.abs() - thr).clamp_min(0.0) / shrink
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = w_new + ((t - 1.0) / t_new) * (w_new - w)
        delta = (w_new - w).abs().max()
        w, t = w_new, t_new
        if delta <= tol * scale:
            break
    return w


def _largest_eigenvalue(gram: Tensor, n_iter: int = 100) -> float:
    """Largest eigenvalue of a PSD matrix by power iteration (much cheaper than ``eigvalsh`` for large M)."""
    v = torch.ones(gram.shape[0], dtype=gram.dtype) / math.sqrt(gram.shape[0])
    lam = 0.0
    for _ in range(n_iter):
        u = gram @ v
        new = float(u.norm())
        if new <= 1e-300:
            return 0.0
        v = u / new
        if abs(new - lam) <= 1e-6 * new:
            return new
        lam = new
    return lam


def _check_inputs(activations: Tensor, concepts: Tensor) -> tuple[Tensor, Tensor, bool]:
    if not isinstance(activations, Tensor):
        raise TypeError(f"activations must be a Tensor (N,) or (N, D), got {_describe(activations)}")
    if not isinstance(concepts, Tensor):
        raise TypeError(f"concepts must be a Tensor (N, M), got {_describe(concepts)}")
    single = activations.ndim == 1
    if activations.ndim not in (1, 2):
        raise ValueError(f"activations must have shape (N,) or (N, D), got {tuple(activations.shape)}")
    if concepts.ndim != 2:
        raise ValueError(f"concepts must have shape (N, M), got {tuple(concepts.shape)}")
    if concepts.shape[0] != activations.shape[0]:
        raise ValueError(
            f"concepts has {concepts.shape[0]} rows but activations has {activations.shape[0]}; "
            "row i of both must describe the same input"
        )
    acts = activations.detach().double().reshape(activations.shape[0], -1)
    conc = concepts.detach().double()
    if not torch.isfinite(acts).all():
        bad = (~torch.isfinite(acts)).any(0).nonzero().flatten().tolist()
        raise ValueError(f"activations contain NaN/inf values (neurons {bad[:10]}); remove or impute them first")
    if not torch.isfinite(conc).all():
        bad = (~torch.isfinite(conc)).any(0).nonzero().flatten().tolist()
        raise ValueError(f"concepts contain NaN/inf values (columns {bad[:10]})")
    return acts, conc, single


def linear_explanation(
    activations: Tensor,
    concepts: Tensor,
    *,
    concept_names: Sequence[str] | None = None,
    max_concepts: int = 10,
    width: int = 10,
    tolerance: float = 0.02,
    split: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    l1_lambda: float = 0.05,
    eta: float = 0.99,
    units: Sequence[int] | None = None,
    rank: str = "abs",
) -> Explanation | list[Explanation]:
    """Explain neurons as sparse linear combinations of concepts (paper 003, Sec. 3.2 and Algorithm 1).

    Args:
        activations: neuron summaries ``(N,)`` (one neuron → one :class:`Explanation`) or ``(N, D)``
            (→ a list of D explanations, computed together).
        concepts: concept activation matrix ``P (N, M)`` (labels, or calibrated CLIP/SigLIP probabilities).
        concept_names: M names (default ``"c0", "c1", …``).
        max_concepts: ``v``, the longest explanation. width: ``r``, candidates tried per greedy step.
        tolerance: ``ε``, minimum gain in val correlation to add a concept.
        split: train/val/test fractions of the seeded random split (``seed``).
        l1_lambda, eta: elastic-net strength ``λ`` and mixing ``η`` of the ranking step.
        units: neuron ids written to ``Explanation.unit`` (default ``0..D-1``).
        rank: ``"abs"`` (default: largest ``|w|`` first, so inhibitory concepts are tried too) or ``"signed"``
            (paper/reference: highest elastic-net weight first; concepts with negative weights are practically
            never tried).

    Dead neurons (constant on the training split) produce a ``UserWarning`` and an explanation with
    ``dead=True``, no concepts, ``bias`` = the constant and ``val_correlation = nan``. A val split of fewer than
    :data:`MIN_VAL_ROWS` rows warns once: the greedy search's gains of ``ε`` are then below the noise of the val
    correlation and spurious concepts get added.
    """
    acts, conc, single = _check_inputs(activations, concepts)
    n, m = conc.shape
    d = acts.shape[1]
    if concept_names is None:
        names = [f"c{i}" for i in range(m)]
    else:
        names = [str(c) for c in concept_names]
        if len(names) != m:
            raise ValueError(f"concept_names has {len(names)} names but concepts has {m} columns")
    for arg, val in (("max_concepts", max_concepts), ("width", width)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{arg} must be a positive int, got {val!r}")
    if not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"tolerance must be a float >= 0, got {tolerance!r}")
    if rank not in ("signed", "abs"):
        raise ValueError(f"rank must be 'signed' or 'abs', got {rank!r}")
    unit_ids = list(range(d)) if units is None else [int(u) for u in units]
    if len(unit_ids) != d:
        raise ValueError(f"units has {len(unit_ids)} entries for {d} neurons")
    split_t = tuple(float(f) for f in split)
    tr, va, te = split_indices(n, split_t, seed)
    if len(va) < MIN_VAL_ROWS:
        warnings.warn(
            f"linear_explanation: the val split has only {len(va)} of {n} rows (split={split_t}); the greedy search "
            f"then adds concepts on noise (a val correlation of {len(va)} rows varies by ~{1 / math.sqrt(len(va)):.2f} "
            f">> tolerance={tolerance}). Use at least {math.ceil(MIN_VAL_ROWS / split_t[1])} samples, a larger val "
            "fraction in split=, or a larger tolerance",
            UserWarning,
            stacklevel=2,
        )

    x_tr, y_tr = conc[tr], acts[tr]
    mu_x, sd_x = x_tr.mean(0), x_tr.std(0)
    mu_y, sd_y = y_tr.mean(0), y_tr.std(0)
    dead = sd_y <= 1e-12 * mu_y.abs().clamp_min(1.0)
    usable = sd_x > 1e-12  # constant concepts on the training split cannot explain anything
    live = (~dead).nonzero().flatten()

    results: list[Explanation | None] = [None] * d
    meta = {"n_samples": n, "split": split_t, "seed": int(seed)}
    dead_ids = dead.nonzero().flatten().tolist()
    if dead_ids:
        shown = [unit_ids[j] for j in dead_ids[:20]]
        warnings.warn(
            f"{len(dead_ids)} dead neuron(s) (constant activation on the training split): units {shown}"
            f"{' ...' if len(dead_ids) > 20 else ''}; they get empty explanations with dead=True and "
            "val_correlation=nan",
            UserWarning,
            stacklevel=2,
        )
    for j in dead_ids:
        results[j] = Explanation([], [], float(mu_y[j]), float("nan"), [], unit_ids[j], float("nan"), True, **meta)

    if live.numel() > 0:
        sel, w, b, vcorr, tcorr = _fit_live(
            x_tr, y_tr[:, live], conc[va], acts[va][:, live], conc[te], acts[te][:, live],
            mu_x, sd_x, sd_y[live], usable, max_concepts, width, float(tolerance), l1_lambda, eta, rank == "abs",
        )
        for i, j in enumerate(live.tolist()):
            idx = sel[i]
            results[j] = Explanation(
                concepts=[names[c] for c in idx],
                weights=w[i],
                bias=b[i],
                val_correlation=vcorr[i],
                concept_indices=idx,
                unit=unit_ids[j],
                test_correlation=tcorr[i],
                **meta,
            )
    out = [r for r in results if r is not None]
    return out[0] if single else out


def _pearson_from_moments(w: Tensor, gv: Tensor, cv: Tensor, vy: Tensor) -> Tensor:
    """Correlation of ``X_S w`` with y from centred moments: ``w·c / sqrt(wᵀGw · var y)``; 0 if degenerate."""
    num = (w * cv).sum(-1)
    var = torch.einsum("...i,...ij,...j->...", w, gv, w)
    den = (var.clamp_min(0) * vy).sqrt()
    return torch.where(den > 1e-12 * vy.clamp_min(1e-300).sqrt(), num / den.clamp_min(1e-300), torch.zeros_like(num))


def _fit_live(
    x_tr: Tensor, y_tr: Tensor, x_va: Tensor, y_va: Tensor, x_te: Tensor, y_te: Tensor,
    mu_x: Tensor, sd_x: Tensor, sd_y: Tensor, usable: Tensor,
    v: int, r: int, eps: float, lam: float, eta: float, by_abs: bool = False,
) -> tuple[list[list[int]], list[list[float]], list[float], list[float], list[float]]:
    n_tr = x_tr.shape[0]
    d = y_tr.shape[1]
    # ---- training moments (z-scores with training statistics only)
    xc = x_tr - mu_x
    yc = y_tr - y_tr.mean(0)
    gram = xc.T @ xc / n_tr  # (M, M) covariance (1/n)
    cross = xc.T @ yc / n_tr  # (M, D)
    sdx = torch.where(usable, sd_x, torch.ones_like(sd_x))
    # standardised (unbiased std, like torch.std in the reference) Gram/cross for the elastic net
    zg = gram / sdx[:, None] / sdx[None, :]
    zc = cross / sdx[:, None] / sd_y[None, :]
    zg = torch.where(usable[:, None] & usable[None, :], zg, torch.zeros_like(zg))
    zc = torch.where(usable[:, None], zc, torch.zeros_like(zc))
    # float32 is plenty for a ranking and halves the cost of the M×M×D products
    wen = elastic_net_weights(zg.float(), zc.float(), lam, eta, tol=1e-5).double()  # (M, D)

    # ---- ranking: signed EN weight descending, ties by marginal correlation; unusable concepts last
    n_rank = min(int(usable.sum()), (v + 1) * (r + 1))
    if by_abs:
        zc, wen = zc.abs(), wen.abs()
    marg = torch.where(usable[:, None], zc, torch.full_like(zc, -math.inf)).T  # (D, M)
    key1 = torch.where(usable[:, None], wen, torch.full_like(wen, -math.inf)).T
    order = torch.sort(marg, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(key1.gather(1, order), dim=1, descending=True, stable=True).indices)
    ranking = order[:, :n_rank]  # (D, R) concept ids

    # ---- val moments (centred on the val mean: correlation is intercept-invariant)
    xvc = x_va - x_va.mean(0)
    yvc = y_va - y_va.mean(0)
    gv = xvc.T @ xvc
    cv = xvc.T @ yvc  # (M, D)
    vy = (yvc * yvc).sum(0)  # (D,)
    ridge = 1e-10 * gram.diagonal().mean().clamp_min(1e-30)

    selected = torch.zeros(d, 0, dtype=torch.long)  # ranking positions -> concept ids chosen
    sel_ids: list[list[int]] = [[] for _ in range(d)]
    bad = torch.zeros(d, n_rank, dtype=torch.bool)
    taken = torch.zeros(d, n_rank, dtype=torch.bool)
    best = torch.zeros(d, dtype=torch.float64)
    active = torch.ones(d, dtype=torch.bool)
    pos = torch.arange(n_rank)
    for step in range(v):
        act = active.nonzero().flatten()
        if act.numel() == 0 or n_rank == 0:
            break
        avail = ~(bad[act] | taken[act])
        keyp = torch.where(avail, pos, pos + n_rank)  # available positions first, in rank order
        kk = min(r, n_rank)
        cand_pos = torch.topk(keyp, kk, dim=1, largest=False).indices  # (A, kk) in rank order
        cand_ok = avail.gather(1, cand_pos)
        cand = ranking[act].gather(1, cand_pos)  # (A, kk) concept ids
        sets = torch.cat([selected[act][:, None, :].expand(-1, kk, -1), cand[:, :, None]], dim=2)  # (A,kk,s)
        s = sets.shape[2]
        g_ss = gram[sets[..., :, None], sets[..., None, :]] + ridge * torch.eye(s, dtype=gram.dtype)
        dcol = act[:, None].expand(-1, kk)
        c_s = cross[sets, dcol[..., None]]  # (A, kk, s)
        w = torch.linalg.solve(g_ss, c_s.unsqueeze(-1)).squeeze(-1)
        corr = _pearson_from_moments(w, gv[sets[..., :, None], sets[..., None, :]], cv[sets, dcol[..., None]],
                                     vy[act][:, None])
        corr = torch.where(cand_ok, corr, torch.full_like(corr, -math.inf))
        b_act = best[act]
        if step > 0:  # the reference never marks a concept bad before the first one is chosen
            newly_bad = cand_ok & (corr - b_act[:, None] < eps)
            bad[act[:, None].expand(-1, kk)[newly_bad], cand_pos[newly_bad]] = True
            corr = torch.where(newly_bad, torch.full_like(corr, -math.inf), corr)
        top_corr, top_j = corr.max(dim=1)
        accept = top_corr > b_act
        new_col = torch.zeros(d, dtype=torch.long)
        acc_rows = act[accept]
        chosen_pos = cand_pos[accept, top_j[accept]]
        chosen = ranking[acc_rows, chosen_pos]
        new_col[acc_rows] = chosen
        taken[acc_rows, chosen_pos] = True
        best[acc_rows] = top_corr[accept]
        active[act[~accept]] = False
        selected = torch.cat([selected, new_col[:, None]], dim=1)
        for i, c in zip(acc_rows.tolist(), chosen.tolist()):
            sel_ids[i].append(c)
        # inactive rows keep a dummy column in `selected`; they are never used again

    # ---- final least squares on the selected set (train), val/test correlations
    weights: list[list[float]] = []
    biases: list[float] = []
    vcorrs: list[float] = []
    tcorrs: list[float] = []
    mean_y = y_tr.mean(0)
    xtc = x_te - x_te.mean(0) if x_te.shape[0] > 1 else None
    ytc = y_te - y_te.mean(0) if x_te.shape[0] > 1 else None
    for i in range(d):
        idx = sel_ids[i]
        if not idx:
            weights.append([])
            biases.append(float(mean_y[i]))
            vcorrs.append(0.0)
            tcorrs.append(0.0 if xtc is not None else float("nan"))
            continue
        it = torch.tensor(idx)
        g_ss = gram[it[:, None], it[None, :]] + ridge * torch.eye(len(idx), dtype=gram.dtype)
        wi = torch.linalg.solve(g_ss, cross[it, i])
        weights.append(wi.tolist())
        biases.append(float(mean_y[i] - mu_x[it] @ wi))
        vcorrs.append(float(best[i]))
        if xtc is None:
            tcorrs.append(float("nan"))
        else:
            tc = _pearson_from_moments(wi, xtc[:, it].T @ xtc[:, it], xtc[:, it].T @ ytc[:, i], (ytc[:, i] ** 2).sum())
            tcorrs.append(float(tc))
    return sel_ids, weights, biases, vcorrs, tcorrs
