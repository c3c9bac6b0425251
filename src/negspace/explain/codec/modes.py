"""Contribution modes of one layer (paper 002 §4, 10.2): fit the SAE on a contribution dataset, correlate the
modes with class (and superclass) masks, and select a mode's top channels.

The reference ablation script took the *second*-ranked mode by mistake; here :meth:`LayerModes.mode_for_class`
returns exactly the rank the caller asks for (``rank=0``: the most correlated mode).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.explain.codec.contributions import compute_contributions
from negspace.explain.codec.sae import SAE_KEYS, ContributionSAE, encode_dataset, init_sae, train_sae
from negspace.explain.codec.statistics import contribution_statistics
from negspace.explain.codec.store import ContributionSet, ContributionStore
from negspace.objectives import Objective, entropy, named_target
from negspace.stats import pearson_columns

__all__ = ["LayerModes", "class_masks", "default_kind", "fit_codec", "fit_modes", "mode_class_correlation",
           "select_channels", "selection_sign", "target_sign"]


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
    (paper 002 10.2, eq. 3). Modes that never fire (and empty masks) correlate 0, so that modes can be ranked."""
    if loadings.dim() != 2 or masks.dim() != 2 or loadings.shape[0] != masks.shape[0]:
        raise ValueError(f"need loadings (N, M) and masks (N, Q), got {tuple(loadings.shape)}, {tuple(masks.shape)}")
    return torch.nan_to_num(pearson_columns(loadings, masks), nan=0.0)


def target_sign(target: str | Objective) -> int:
    """+1 if positive contributions drive the target, −1 for ``entropy`` (a class is driven by units that
    *decrease* the output entropy), as in the reference ablation code."""
    t = named_target(target) if isinstance(target, str) else target
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
    untrained_correlation: Tensor | None = None  # (M, Q): the same SAE before training (the chance level)

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
    mode–class correlation matrices. ``train_kwargs`` go to :func:`train_sae` (steps, epochs, lr, threshold, ...).

    ``stats`` get ``mode_class_corr`` (mean over concepts of the best mode's correlation) next to
    ``untrained_mode_class_corr``: the same for the seeded SAE *before* training (a correlation no higher than
    it means the modes carry no class structure; that warns, as does an R² below ``min_r2``)."""
    if layer not in data.layers:
        raise ValueError(f"layer {layer!r} not in the contribution set; layers: {data.layers}")
    labels = data.labels
    if labels is None or (labels < 0).any():
        raise ValueError("fit_modes needs labelled samples (the dataloader must yield labels)")
    masks, names = class_masks(labels, num_classes, superclasses)
    feats = data.features(layer, kind)
    fit = train_sae(feats, **{"name": f"{layer}: contribution SAE", **train_kwargs})  # type: ignore[arg-type]
    loadings, _ = encode_dataset(fit.sae, feats)
    sae_kwargs = {k: v for k, v in train_kwargs.items() if k in SAE_KEYS}
    untrained, _ = encode_dataset(init_sae(feats, seed=train_kwargs.get("seed", 0), **sae_kwargs), feats)
    out = LayerModes(
        layer, kind, fit.sae, loadings, mode_class_correlation(loadings, masks), names, fit.r2,
        data.features(layer, "positive").shape[1], sign=sign,
        untrained_correlation=mode_class_correlation(untrained, masks),
    )
    if statistics:
        out.stats = contribution_statistics(data, layer)
    corr, chance = _best_mean(out.correlation), _best_mean(out.untrained_correlation)
    out.stats.update({"r2": fit.r2, "alive_modes": float(fit.alive), "mode_class_corr": corr,
                      "untrained_mode_class_corr": chance})
    if corr < chance + 0.05:
        warnings.warn(
            f"{layer}: mode–class correlation {corr:.3f} is no better than that of the untrained SAE ({chance:.3f}); "
            f"the modes carry no class structure beyond chance. Fix: check the SAE's R² ({fit.r2:.3f}), train "
            f"longer (steps=...), or use more samples per class.", UserWarning, stacklevel=2,
        )
    if baseline and f"{layer}.act" in data.tensors:
        act = data.features(layer, "activation")
        afit = train_sae(act, **{"name": f"{layer}: activation SAE", **train_kwargs})  # type: ignore[arg-type]
        out.act_sae = afit.sae
        out.act_loadings, _ = encode_dataset(afit.sae, act)
        out.act_correlation = mode_class_correlation(out.act_loadings, masks)
        out.act_r2 = afit.r2
        out.stats["act_r2"] = afit.r2
        out.stats["act_mode_class_corr"] = _best_mean(out.act_correlation)
    return out


def _best_mean(correlation: Tensor) -> float:
    """Mean over concepts of the best mode's correlation, ``(M, Q) → float``."""
    return float(correlation.max(0).values.mean())


def fit_codec(
    model: nn.Module,
    dataloader: Iterable,
    layers: str | Sequence[str],
    *,
    target: str | Objective = "top_prob",
    method: str = "integrated",
    n_steps: int = 10,
    k: int = 5,
    kind: str | None = None,
    num_classes: int | None = None,
    superclasses: Mapping[str, Sequence[int]] | None = None,
    baseline: bool = True,
    store: str | None = None,
    batch_keys: object = None,
    max_batches: int | None = None,
    progress: bool = True,
    **train_kwargs: object,
) -> tuple[ContributionSet, dict[str, LayerModes]]:
    """The whole CODEC fit: contribution dataset of ``layers`` over ``dataloader`` (labelled batches; under DDP
    gathered from every rank), then :func:`fit_modes` per layer (same seeded SAE on every rank).

    ``kind`` defaults to :func:`default_kind` of the target; channel selection signs follow
    :func:`selection_sign`. ``progress`` also shows the SAE fits unless ``train_kwargs`` say otherwise.
    Returns ``(data, {layer: LayerModes})``.
    """
    train_kwargs.setdefault("progress", progress)
    names = [layers] if isinstance(layers, str) else list(layers)
    kind = default_kind(target) if kind is None else kind
    out = compute_contributions(
        model, dataloader, names, target=target, method=method, n_steps=n_steps, k=k, store=store,
        batch_keys=batch_keys, max_batches=max_batches, progress=progress, require_labels=True,
    )
    data = out.to_set() if isinstance(out, ContributionStore) else out
    modes = {
        n: fit_modes(data, n, kind=kind, num_classes=num_classes, superclasses=superclasses, baseline=baseline,
                     sign=selection_sign(target, kind), **train_kwargs)
        for n in names
    }
    return data, modes
