"""CODEC (paper 002): contribution statistics, contribution modes (sparse autoencoder), mode–class
correlation, mode-guided channel selection, the ablation/preservation experiment and contribution maps.

Pipeline (functional, no Lightning)::

    data  = compute_contributions(model, loader, ["layer3"], method="integrated", n_steps=10)   # contributions.py
    stats = contribution_statistics(data, "layer3")          # Hoyer, E/I correlation, PCA dimensionality
    modes = fit_modes(data, "layer3", num_classes=10)        # ContributionSAE on E (+ activation baseline)
    m     = modes.mode_for_class(3)                          # most class-correlated mode (rank=0)
    ch    = modes.channels(3, percent=10)                    # top 10 % of that mode's atom
    with ablate_channels(model, {"layer3": ch}): ...         # negspace.editing.channels
    sweep = perturbation_sweep(model, "layer3", (x, y), modes.atom(m), target_class=3)

Paper defaults (§4): dictionary 3× the channel count, hard threshold 0.9, Adam lr 5e-5, batch 128,
300 epochs, L1 5e-5 on the dictionary, non-negative dictionary, ReduceLROnPlateau on the epoch loss.
The reference ablation script took the *second*-ranked mode by mistake; here :meth:`LayerModes.mode_for_class`
returns exactly the rank the caller asks for (``rank=0``: the most correlated mode).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.attribution import hoyer, input_x_gradient
from negspace.editing.channels import ChannelEdit
from negspace.editing.contributions import ContributionSet, make_target, unpack_batch
from negspace.hooks import get_layer, intervene
from negspace.objectives import Objective, entropy

__all__ = [
    "DEFAULT_PERCENTS",
    "ContributionSAE",
    "LayerModes",
    "SAEFit",
    "SAEOutput",
    "SweepResult",
    "class_masks",
    "class_mean_atom",
    "contribution_map",
    "contribution_statistics",
    "default_kind",
    "ei_correlation",
    "encode_dataset",
    "fit_modes",
    "mode_class_correlation",
    "pca_dimensionality",
    "per_class_accuracy",
    "perturbation_sweep",
    "r2_score",
    "sae_loss",
    "sae_optimizers",
    "save_contribution_maps",
    "select_channels",
    "selection_sign",
    "target_sign",
    "train_sae",
]

DEFAULT_PERCENTS = (1, 2, 5, 10, 18, 25, 50, 80, 99)


# -------------------------------------------------------------------------------------------- statistics
def pca_dimensionality(x: Tensor, variance: float = 0.95) -> int:
    """Number of principal components needed to explain ``variance`` of ``x: (N, D)`` (scikit-learn PCA)."""
    from sklearn.decomposition import PCA

    if not 0 < variance <= 1:
        raise ValueError(f"variance must be in (0, 1], got {variance!r}")
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be (N, D) with N >= 2, got {tuple(x.shape)}")
    ratios = PCA().fit(x.numpy()).explained_variance_ratio_
    if not np.isfinite(ratios).all() or ratios.sum() == 0:
        return 0
    return int(np.searchsorted(np.cumsum(ratios), variance - 1e-12) + 1)


def _pearson_columns(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of every column of ``a: (N, P)`` with every column of ``b: (N, Q)`` → ``(P, Q)``;
    constant columns give 0 (not NaN)."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    num = a.T @ b
    den = a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :]
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).float()


def ei_correlation(pos: Tensor, neg: Tensor) -> Tensor:
    """Per-channel Pearson correlation across samples between E and I magnitudes, ``(N, C), (N, C) → (C,)``
    (paper 002 §3, Fig. 3C–D: high in early layers, decorrelating with depth)."""
    if pos.shape != neg.shape or pos.dim() != 2:
        raise ValueError(f"pos and neg must both be (N, C), got {tuple(pos.shape)} and {tuple(neg.shape)}")
    a = pos.double() - pos.double().mean(0)
    b = neg.double() - neg.double().mean(0)
    den = a.norm(dim=0) * b.norm(dim=0)
    return torch.where(den > 0, (a * b).sum(0) / den.clamp_min(1e-300), torch.zeros_like(den)).float()


def _class_average(x: Tensor, labels: Tensor | None) -> Tensor:
    if labels is None or (labels < 0).all():
        return x
    classes = labels.unique()
    classes = classes[classes >= 0]
    return torch.stack([x[labels == c].mean(0) for c in classes])


def contribution_statistics(
    data: ContributionSet, layer: str, *, class_average: bool = True, variance: float = 0.95
) -> dict[str, float]:
    """Paper 002 §3 statistics of one layer, contributions vs activations.

    * ``hoyer_contrib`` / ``hoyer_act``: Hoyer sparsity across channels per sample (net contributions
      ``E − I`` / spatially summed activations), averaged over samples;
    * ``ei_corr``: mean over channels of the E/I correlation across samples;
    * ``dim_contrib`` / ``dim_act``: PCA components for ``variance`` of the (class-averaged) matrices.
    """
    net = data.features(layer, "net")
    out = {"hoyer_contrib": float(hoyer(net, dim=1).mean())}
    out["ei_corr"] = float(ei_correlation(data.features(layer, "positive"), data.features(layer, "negative")).mean())
    labels = data.labels if class_average else None
    out["dim_contrib"] = float(pca_dimensionality(_class_average(net, labels), variance))
    if f"{layer}.act" in data.tensors:
        act = data.features(layer, "activation")
        out["hoyer_act"] = float(hoyer(act, dim=1).mean())
        out["dim_act"] = float(pca_dimensionality(_class_average(act, labels), variance))
    return out


# ---------------------------------------------------------------------------------------------------- SAE
class SAEOutput(NamedTuple):
    pre: Tensor  # (N, M) pre-activation loadings (in normalised units)
    codes: Tensor  # (N, M) thresholded loadings
    recon: Tensor  # (N, F) reconstruction (input units)


class ContributionSAE(nn.Module):
    """CODEC's sparse autoencoder (paper 002 §4): MLP encoder, hard threshold, (non-negative) dictionary.

    ``pre = MLP(x / s)`` (output bias initialised at the threshold, so that about half of the codes are alive
    at the start); ``codes = pre · 1[pre > threshold]`` (hard threshold: codes below it are exactly
    zero; the mask is a constant for autograd, so gradients flow only through the kept entries and never
    through the mask); ``recon = s · codes @ D`` with ``D: (M, F)``, ``M = expansion · F`` modes (atoms are
    rows of ``D``) and ``s`` a data scale (global std, set by :meth:`fit_scale_`). With ``nonneg=True`` the
    dictionary is ``|W|`` (non-negative atoms, as in the paper).

    Args:
        num_features: F (channels, or 2C for ``[E, I]`` features).
        expansion: M = expansion · F when ``num_atoms`` is None (paper: 3).
        hidden: encoder hidden width (default F, as in the reference code; the paper recommends it be
            considerably greater than the number of classes).
        threshold: hard threshold (paper: 0.9).
    """

    def __init__(
        self,
        num_features: int,
        *,
        expansion: int = 3,
        num_atoms: int | None = None,
        hidden: int | None = None,
        threshold: float = 0.9,
        nonneg: bool = True,
    ) -> None:
        super().__init__()
        for name, v in (("num_features", num_features), ("expansion", expansion)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        m = num_atoms if num_atoms is not None else expansion * num_features
        h = hidden if hidden is not None else num_features
        if not isinstance(m, int) or m < 1 or not isinstance(h, int) or h < 1:
            raise ValueError(f"num_atoms and hidden must be positive ints, got {num_atoms!r}, {hidden!r}")
        if not isinstance(threshold, int | float) or threshold < 0:
            raise ValueError(f"threshold must be a non-negative float, got {threshold!r}")
        self.num_features, self.num_atoms, self.hidden = num_features, m, h
        self.threshold = float(threshold)
        self.nonneg = bool(nonneg)
        self.encoder = nn.Sequential(nn.Linear(num_features, h), nn.ReLU(), nn.Linear(h, m))
        # Start the pre-activations around the threshold: with the default init they are all below it, every
        # code is exactly zero and, since no gradient passes the mask, training would never start.
        nn.init.constant_(self.encoder[-1].bias, self.threshold)
        self.weight = nn.Parameter(torch.rand(m, num_features) / math.sqrt(num_features))
        self.register_buffer("scale", torch.tensor(1.0))

    @property
    def dictionary(self) -> Tensor:
        """``(M, F)``; row ``j`` is mode ``j``'s atom."""
        return self.weight.abs() if self.nonneg else self.weight

    @staticmethod
    def hard_threshold(pre: Tensor, threshold: float) -> Tensor:
        """``pre · 1[pre > threshold]``; the mask carries no gradient (it is a boolean comparison)."""
        return torch.where(pre.detach() > threshold, pre, torch.zeros_like(pre))  # +0.0, never -0.0

    @torch.no_grad()
    def fit_scale_(self, x: Tensor) -> ContributionSAE:
        """Set the data scale to the global standard deviation of ``x: (N, F)``."""
        self.scale.fill_(float(x.float().std().clamp_min(1e-12)))
        return self

    def encode(self, x: Tensor) -> Tensor:
        """Loadings (thresholded codes) ``(N, M)`` of ``x: (N, F)``."""
        return self.hard_threshold(self.encoder(x / self.scale), self.threshold)

    def decode(self, codes: Tensor) -> Tensor:
        return (codes @ self.dictionary) * self.scale

    def forward(self, x: Tensor) -> SAEOutput:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected x of shape (N, {self.num_features}), got {tuple(x.shape)}")
        pre = self.encoder(x / self.scale)
        codes = self.hard_threshold(pre, self.threshold)
        return SAEOutput(pre, codes, self.decode(codes))

    def extra_repr(self) -> str:
        return (
            f"features={self.num_features}, atoms={self.num_atoms}, hidden={self.hidden}, "
            f"threshold={self.threshold}, nonneg={self.nonneg}"
        )


def sae_loss(
    sae: ContributionSAE, x: Tensor, *, atom_l1: float = 5e-5, code_l1: float = 0.0
) -> tuple[Tensor, SAEOutput]:
    """Training-step maths: MSE in normalised units + ``atom_l1 · mean|D|`` (+ ``code_l1 · mean|codes|``)."""
    out = sae(x)
    loss = F.mse_loss(out.recon / sae.scale, x / sae.scale)
    if atom_l1:
        loss = loss + atom_l1 * sae.dictionary.abs().mean()
    if code_l1:
        loss = loss + code_l1 * out.codes.abs().mean()
    return loss, out


def sae_optimizers(
    sae: nn.Module, *, lr: float = 5e-5, factor: float = 0.5, patience: int = 10
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau]:
    """Adam + ReduceLROnPlateau (stepped on the epoch's mean training loss), as in the reference code."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=factor, patience=patience)


def r2_score(x: Tensor, recon: Tensor) -> float:
    """Variance-weighted R² of a reconstruction (scikit-learn ``r2_score(multioutput="variance_weighted")``)."""
    from sklearn.metrics import r2_score as _r2

    return float(_r2(x.detach().double().numpy(), recon.detach().double().numpy(), multioutput="variance_weighted"))


@torch.no_grad()
def encode_dataset(sae: ContributionSAE, features: Tensor, *, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """``(loadings (N, M), reconstruction (N, F))`` of ``features`` in eval mode."""
    was = sae.training
    sae.eval()
    codes, recon = [], []
    dev = sae.scale.device
    for chunk in features.split(batch_size):
        out = sae(chunk.to(dev).float())
        codes.append(out.codes.cpu())
        recon.append(out.recon.cpu())
    sae.train(was)
    return torch.cat(codes), torch.cat(recon)


@dataclass
class SAEFit:
    sae: ContributionSAE
    losses: list[float]
    r2: float
    samples_per_second: float
    alive: int  # atoms with a non-zero loading on at least one sample


def train_sae(
    features: Tensor,
    sae: ContributionSAE | None = None,
    *,
    epochs: int = 300,
    lr: float = 5e-5,
    batch_size: int = 128,
    atom_l1: float = 5e-5,
    code_l1: float = 0.0,
    patience: int = 10,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    **sae_kwargs: object,
) -> SAEFit:
    """Fit a :class:`ContributionSAE` on ``features: (N, F)`` with a plain loop (Adam + ReduceLROnPlateau).

    Used inside callbacks (a nested ``Trainer.fit`` inside a running Trainer would fight over its
    loops/loggers/DDP); :func:`negspace.callbacks.codec.fit_sae` is the same maths as a Lightning fit.
    """
    import time

    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be a (N, F) tensor with N >= 2, got {getattr(features, 'shape', features)}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    gen = torch.Generator().manual_seed(seed)
    if sae is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            sae = ContributionSAE(features.shape[1], **sae_kwargs)  # type: ignore[arg-type]
        sae.fit_scale_(features)
    sae.to(device).train()
    x = features.float().to(device)
    opt, sched = sae_optimizers(sae, lr=lr, patience=patience)
    losses: list[float] = []
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(range(epochs), desc="ContributionSAE", disable=not progress, leave=False)
    for _ in bar:
        perm = torch.randperm(len(x), generator=gen).to(device)
        total, n = 0.0, 0
        for idx in perm.split(batch_size):
            loss, _ = sae_loss(sae, x[idx], atom_l1=atom_l1, code_l1=code_l1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        seen += n
        losses.append(total / n)
        sched.step(losses[-1])
        bar.set_postfix(loss=f"{losses[-1]:.4g}", lr=f"{opt.param_groups[0]['lr']:.2g}")
    rate = seen / max(time.perf_counter() - t0, 1e-9)
    codes, recon = encode_dataset(sae, features)
    sae.eval()
    return SAEFit(sae, losses, r2_score(features, recon), rate, int((codes > 0).any(0).sum()))


# ------------------------------------------------------------------------------------- modes and classes
def class_masks(
    labels: Tensor, num_classes: int | None = None, superclasses: Mapping[str, Sequence[int]] | None = None
) -> tuple[Tensor, list[str]]:
    """Binary concept masks ``(N, Q)``: one column per class, then one per superclass (a user mapping
    ``{"name": [class, ...]}``, paper 002 10.2 / Fig. S10). Returns ``(masks, names)``."""
    labels = torch.as_tensor(labels).long().flatten()
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise ValueError("labels must be a non-empty tensor of non-negative class indices")
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    if int(labels.max()) >= k:
        raise ValueError(f"labels contain class {int(labels.max())} but num_classes={k}")
    masks = [F.one_hot(labels, k).float()]
    names = [str(c) for c in range(k)]
    for name, members in (superclasses or {}).items():
        idx = torch.as_tensor(list(members), dtype=torch.long)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= k:
            raise ValueError(f"superclass {name!r} must list class indices in [0, {k}), got {list(members)}")
        masks.append(torch.isin(labels, idx).float()[:, None])
        names.append(str(name))
    return torch.cat(masks, dim=1), names


def mode_class_correlation(loadings: Tensor, masks: Tensor) -> Tensor:
    """Pearson correlation between each mode's loadings ``(N, M)`` and each concept mask ``(N, Q)`` → ``(M, Q)``
    (paper 002 10.2, eq. 3). Modes that never fire correlate 0."""
    if loadings.dim() != 2 or masks.dim() != 2 or loadings.shape[0] != masks.shape[0]:
        raise ValueError(f"need loadings (N, M) and masks (N, Q), got {tuple(loadings.shape)}, {tuple(masks.shape)}")
    return _pearson_columns(loadings, masks)


def target_sign(target: str | Objective) -> int:
    """+1 if positive contributions drive the target, −1 for ``entropy`` (a class is driven by units that
    *decrease* the output entropy), as in the reference ablation code."""
    t = make_target(target) if isinstance(target, str) else target
    return -1 if isinstance(t, entropy) else 1


def default_kind(target: str | Objective) -> str:
    """SAE features for a target: ``"positive"`` (E, paper 10.1), or ``"negative"`` (I) for ``entropy``, whose
    class-driving units are those that *lower* the output entropy."""
    return "negative" if target_sign(target) < 0 else "positive"


def selection_sign(target: str | Objective, kind: str) -> int:
    """Sign for :func:`select_channels`: E or I atoms are non-negative and ranked as they are (+1); ``net`` and
    ``concat`` atoms of an entropy target are ranked most-negative first (−1)."""
    return target_sign(target) if kind in ("net", "concat") else 1


def select_channels(
    atom: Tensor, percent: float, *, sign: int = 1, num_channels: int | None = None
) -> Tensor:
    """Indices of the top ``percent`` % channels of a mode's atom (``max(1, ⌊C·percent/100⌋)`` channels).

    ``atom: (C,)``, or ``(2C,)`` for ``[E, I]`` features (then the channel's net weight ``E − I`` is ranked);
    ``sign=-1`` ranks the most negative entries first (e.g. for ``net`` features of an entropy target).
    Returns a sorted LongTensor.
    """
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent!r}")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    atom = torch.as_tensor(atom).detach().float().flatten().cpu()
    if num_channels is not None and atom.numel() == 2 * num_channels:
        atom = atom[:num_channels] - atom[num_channels:]
    elif num_channels is not None and atom.numel() != num_channels:
        raise ValueError(f"atom has {atom.numel()} entries, expected {num_channels} or {2 * num_channels}")
    c = atom.numel()
    n = max(1, min(c, int(c * percent / 100 + 1e-9)))
    order = torch.sort(sign * atom, descending=True, stable=True).indices
    return order[:n].sort().values


def class_mean_atom(features: Tensor, labels: Tensor, klass: int | Sequence[int]) -> Tensor:
    """Mean feature vector of the samples of ``klass`` (a simple baseline atom without an SAE)."""
    idx = torch.as_tensor([klass] if isinstance(klass, int) else list(klass))
    sel = torch.isin(labels.long(), idx)
    if not bool(sel.any()):
        raise ValueError(f"no samples of class {klass!r}")
    return features[sel].float().mean(0)


@dataclass
class LayerModes:
    """Fitted modes of one layer: the contribution SAE and (optionally) the activation-SAE baseline."""

    layer: str
    kind: str
    sae: ContributionSAE
    loadings: Tensor  # (N, M)
    correlation: Tensor  # (M, Q)
    class_names: list[str]
    r2: float
    num_channels: int
    stats: dict[str, float] = field(default_factory=dict)
    act_sae: ContributionSAE | None = None
    act_loadings: Tensor | None = None
    act_correlation: Tensor | None = None
    act_r2: float | None = None
    sign: int = 1

    def _corr(self, baseline: bool) -> Tensor:
        if baseline and self.act_correlation is None:
            raise ValueError("no activation baseline was fitted (fit_modes(..., baseline=True))")
        return self.act_correlation if baseline else self.correlation  # type: ignore[return-value]

    def _concept(self, klass: int | str) -> int:
        if isinstance(klass, str):
            if klass not in self.class_names:
                raise ValueError(f"unknown class/superclass {klass!r}; known: {self.class_names}")
            return self.class_names.index(klass)
        q = len(self.class_names)
        if isinstance(klass, bool) or not isinstance(klass, int) or not 0 <= klass < q:
            raise ValueError(f"class index must be in [0, {q}) (classes then superclasses), got {klass!r}")
        return klass

    def mode_for_class(self, klass: int | str, rank: int = 0, *, baseline: bool = False) -> int:
        """Index of the mode with the ``rank``-th highest correlation with ``klass`` (0 = most correlated)."""
        corr = self._corr(baseline)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < corr.shape[0]:
            raise ValueError(f"rank must be in [0, {corr.shape[0]}), got {rank!r}")
        col = corr[:, self._concept(klass)]
        return int(torch.sort(col, descending=True, stable=True).indices[rank])

    def atom(self, mode: int, *, baseline: bool = False) -> Tensor:
        """Atom (dictionary row) of ``mode``: ``(F,)``."""
        sae = self.act_sae if baseline else self.sae
        if sae is None:
            raise ValueError("no activation baseline was fitted")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode < sae.num_atoms:
            raise ValueError(f"mode must be in [0, {sae.num_atoms}), got {mode!r}")
        return sae.dictionary[mode].detach().cpu()

    def channels(
        self, klass: int | str, percent: float, *, rank: int = 0, mode: int | None = None, baseline: bool = False
    ) -> Tensor:
        """Top ``percent`` % channels of the class's ``rank``-th mode (or of an explicit ``mode``)."""
        m = self.mode_for_class(klass, rank, baseline=baseline) if mode is None else mode
        sign = 1 if baseline else self.sign
        return select_channels(self.atom(m, baseline=baseline), percent, sign=sign, num_channels=self.num_channels)


def fit_modes(
    data: ContributionSet,
    layer: str,
    *,
    kind: str = "positive",
    num_classes: int | None = None,
    superclasses: Mapping[str, Sequence[int]] | None = None,
    baseline: bool = True,
    sign: int = 1,
    statistics: bool = True,
    **train_kwargs: object,
) -> LayerModes:
    """Fit the contribution SAE of ``layer`` (and the activation-SAE baseline), their R², and the
    mode–class correlation matrices. ``train_kwargs`` go to :func:`train_sae` (epochs, lr, threshold, ...)."""
    if layer not in data.layers:
        raise ValueError(f"layer {layer!r} not in the contribution set; layers: {data.layers}")
    labels = data.labels
    if labels is None or (labels < 0).any():
        raise ValueError("fit_modes needs labelled samples (the dataloader must yield labels)")
    masks, names = class_masks(labels, num_classes, superclasses)
    feats = data.features(layer, kind)
    fit = train_sae(feats, **train_kwargs)  # type: ignore[arg-type]
    loadings, _ = encode_dataset(fit.sae, feats)
    out = LayerModes(
        layer, kind, fit.sae, loadings, mode_class_correlation(loadings, masks), names, fit.r2,
        data.features(layer, "positive").shape[1], sign=sign,
    )
    if statistics:
        out.stats = contribution_statistics(data, layer)
    out.stats.update({"r2": fit.r2, "alive_modes": float(fit.alive)})
    if baseline and f"{layer}.act" in data.tensors:
        act = data.features(layer, "activation")
        afit = train_sae(act, **train_kwargs)  # type: ignore[arg-type]
        out.act_sae = afit.sae
        out.act_loadings, _ = encode_dataset(afit.sae, act)
        out.act_correlation = mode_class_correlation(out.act_loadings, masks)
        out.act_r2 = afit.r2
        out.stats["act_r2"] = afit.r2
    return out


# ----------------------------------------------------------------------------- ablation / preservation
def _batches(data: object, batch_size: int, batch_keys: Sequence[str] | None) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a tuple (x, y) of tensors or an iterable of batches, got {type(data).__name__}")
    for batch in data:
        x, y = unpack_batch(batch, batch_keys)
        if y is None:
            raise ValueError("per-class accuracy needs labelled batches")
        yield x, y


@torch.no_grad()
def per_class_accuracy(
    model: nn.Module,
    data: tuple[Tensor, Tensor] | Iterable,
    num_classes: int,
    *,
    batch_size: int = 256,
    batch_keys: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(accuracy (num_classes,), counts (num_classes,))``; accuracy is NaN for classes without samples."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = torch.zeros(num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    was = model.training
    model.eval()
    try:
        for x, y in _batches(data, batch_size, batch_keys):
            pred = model(x.to(device)).argmax(1).cpu()
            y = y.long().cpu()
            counts += torch.bincount(y, minlength=num_classes)[:num_classes].double()
            correct += torch.bincount(y[pred == y], minlength=num_classes)[:num_classes].double()
    finally:
        model.train(was)
    acc = torch.where(counts > 0, correct / counts.clamp_min(1), torch.full_like(counts, float("nan")))
    return acc.float(), counts.long()


@dataclass
class SweepResult:
    """Perturbed/unperturbed per-class accuracy ratios over a sweep of percentages."""

    mode: str
    percents: list[float]
    target_classes: list[int]
    off_target_classes: list[int]
    base_accuracy: Tensor  # (num_classes,)
    ratio: Tensor  # (P, num_classes)
    ratio_target: Tensor  # (P,)
    ratio_off: Tensor  # (P,)
    auc_target: float
    auc_off: float
    channels: list[list[int]]

    @property
    def specificity(self) -> float:
        """``auc_off − auc_target`` for ablation, ``auc_target − auc_off`` for preservation (higher = more specific)."""
        d = self.auc_off - self.auc_target
        return d if self.mode == "ablate" else -d


def _auc(p: Sequence[float], r: Tensor) -> float:
    """Area under ratio vs fraction, normalised by the fraction range (a flat ratio of 1 gives 1)."""
    x = np.asarray(p, dtype=np.float64) / 100
    y = r.double().numpy()
    if len(x) == 1:
        return float(y[0])
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def perturbation_sweep(
    model: nn.Module,
    layer: str,
    data: tuple[Tensor, Tensor] | Iterable,
    atom: Tensor,
    target_class: int | Sequence[int],
    *,
    num_classes: int,
    percents: Sequence[float] = DEFAULT_PERCENTS,
    mode: str = "ablate",
    sign: int = 1,
    value: str | float = "zero",
    off_target: Sequence[int] | None = None,
    num_channels: int | None = None,
    batch_size: int = 256,
    batch_keys: Sequence[str] | None = None,
) -> SweepResult:
    """Paper 002 Fig. 6 experiment: for each percentage, ablate (or preserve only) the top channels of
    ``atom`` at ``layer`` and record per-class accuracy / unperturbed accuracy.

    ``target_class``: a class or a list (a superclass). ``off_target``: default every other class.
    ``ratio_target`` / ``ratio_off`` average the ratios over those classes (classes with 0 base accuracy
    are skipped); AUCs are normalised areas under ratio vs fraction of channels.
    """
    if mode not in ("ablate", "preserve"):
        raise ValueError(f"mode must be 'ablate' or 'preserve', got {mode!r}")
    get_layer(model, layer)  # unknown layers: ValueError listing close names
    targets = [target_class] if isinstance(target_class, int) else list(target_class)
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_classes:
            raise ValueError(f"target_class must be in [0, {num_classes}), got {target_class!r}")
    offs = [c for c in range(num_classes) if c not in targets] if off_target is None else list(off_target)
    for p in percents:
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 100:
            raise ValueError(f"percents must lie in (0, 100], got {p!r}")
    atom = torch.as_tensor(atom).float()
    base, _ = per_class_accuracy(model, data, num_classes, batch_size=batch_size, batch_keys=batch_keys)
    ratios, chans = [], []
    for p in percents:
        ch = select_channels(atom, p, sign=sign, num_channels=num_channels)
        chans.append(ch.tolist())
        with ChannelEdit({layer: ch}, mode=mode, value=value).applied(model):
            acc, _ = per_class_accuracy(model, data, num_classes, batch_size=batch_size, batch_keys=batch_keys)
        ratios.append(torch.where(base > 0, acc / base.clamp_min(1e-12), torch.full_like(acc, float("nan"))))
    ratio = torch.stack(ratios)

    def avg(cls: list[int]) -> Tensor:
        r = ratio[:, cls]
        return torch.nanmean(r, dim=1) if cls else torch.full((len(percents),), float("nan"))

    rt, ro = avg(targets), avg(offs)
    return SweepResult(mode, list(map(float, percents)), targets, offs, base, ratio, rt, ro,
                       _auc(percents, rt), _auc(percents, ro), chans)


# -------------------------------------------------------------------------------------- contribution maps
def contribution_map(
    model: nn.Module,
    layer: str,
    x: Tensor,
    target: int | Tensor | Objective | str,
    channels: Sequence[int] | Tensor,
) -> Tensor:
    """InputGrad decomposition through the selected channels (paper 002 §5 / 10.7–10.8): ``x ⊙ ∂T/∂x``
    where the gradient flows back *only* through ``channels`` of ``layer`` (the forward pass is unchanged).

    ``x: (B, C_in, H, W)`` → ``(B, C_in, H, W)``. Its sum over the input equals the sum of the
    ``layer_contributions(..., method="input_grad")`` of the selected channels (complete decomposition).
    """
    if isinstance(target, str):
        target = make_target(target)
        if target == "label":
            raise ValueError("contribution_map: pass the labels tensor as target instead of 'label'")
    ch = torch.as_tensor(channels, dtype=torch.long).flatten()

    def gate(a: Tensor) -> Tensor:
        dim = -1 if a.dim() == 3 else 1
        c = a.shape[dim]
        if ch.numel() and (int(ch.min()) < 0 or int(ch.max()) >= c):
            raise ValueError(f"channels must lie in [0, {c}) for layer {layer!r}, got {ch.tolist()}")
        keep = torch.zeros(c, dtype=torch.bool, device=a.device)
        keep[ch.to(a.device)] = True
        shape = [1] * a.dim()
        shape[dim] = c
        return torch.where(keep.view(shape), a, a.detach())

    if isinstance(target, Objective):
        with torch.no_grad():
            target = target.fix(model(x))
    with intervene(model, {layer: gate}):
        return input_x_gradient(model, x, target)


def save_contribution_maps(
    images: Tensor,
    maps: Tensor,
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    filter_size: int = 0,
    contrast: float = 7.0,
) -> Path:
    """Figure of images next to their (positive) contribution maps and the masked images (paper 10.8:
    channel-averaged, optional median filter, normalised to [0, 1], × contrast, clipped, used as a mask)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from scipy.ndimage import median_filter

    b = images.shape[0]
    fig, axes = plt.subplots(3, b, figsize=(1.8 * b, 5.4), squeeze=False)
    for i in range(b):
        img = images[i].detach().float().cpu()
        m = maps[i].detach().float().cpu().clamp_min(0).mean(0).numpy()
        if filter_size > 1:
            m = median_filter(m, size=filter_size)
        m = m / m.max() if m.max() > 0 else m
        m = np.clip(m * contrast, 0, 1)
        shown = (img - img.mean()) / (img.std() + 1e-8)
        shown = ((shown - shown.min()) / (shown.max() - shown.min() + 1e-8)).permute(1, 2, 0).numpy()
        shown = shown[..., 0] if shown.shape[-1] == 1 else shown
        cmap = "gray" if shown.ndim == 2 else None
        axes[0, i].imshow(shown, cmap=cmap)
        axes[1, i].imshow(m, cmap="inferno", vmin=0, vmax=1)
        axes[2, i].imshow(shown * (m if shown.ndim == 2 else m[..., None]), cmap=cmap)
        if titles is not None:
            axes[0, i].set_title(str(titles[i]), fontsize=8)
        for r in range(3):
            axes[r, i].axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
