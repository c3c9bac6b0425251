"""Deep Feature Reweighting (Kirichenko et al. 2023): keep the feature extractor, refit the last linear layer on
group-balanced held-out data — features standardised, L1-regularised logistic regression (sklearn's ``C``
convention), coefficients averaged over several random group-balanced subsets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from negspace.batch import BatchKeys, Data, iter_batches
from negspace.hooks import eval_mode, get_layer, model_device

__all__ = ["DFRResult", "balanced_subset", "fit_dfr", "head_features", "set_head"]


@dataclass
class DFRResult:
    """The refitted head in the *original* feature space: ``weight (K, D)``, ``bias (K,)`` or ``None``."""

    weight: Tensor
    bias: Tensor | None


@torch.no_grad()
def head_features(model: nn.Module, head: str, data: Data, batch_keys: object = None) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs of the linear ``head`` (``(N, D)``), labels ``(N,)`` and groups ``(N,)`` over ``data`` (eval mode)."""
    layer = get_layer(model, head)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"head={head!r} must name an nn.Linear (the last layer), got {type(layer).__name__}")
    feats: list[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, args: feats.append(args[0].detach().flatten(1).cpu()))
    ys: list[Tensor] = []
    gs: list[Tensor] = []
    device = model_device(model)
    try:
        with eval_mode(model):
            for b in iter_batches(data, BatchKeys(batch_keys), require=("image", "label", "group"), who="DFR"):
                model(b.image.to(device))
                ys.append(b.label.cpu().long())  # type: ignore[union-attr]  # required above
                gs.append(b.group.cpu().long())  # type: ignore[union-attr]
    finally:
        handle.remove()
    if not feats:
        raise ValueError("DFR: the held-out data is empty")
    return torch.cat(feats), torch.cat(ys), torch.cat(gs)


def balanced_subset(groups: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Indices of a group-balanced subset: ``min_g n_g`` samples of every present group, without replacement."""
    ids = [(groups == g).nonzero().flatten() for g in groups.unique()]
    n = min(len(i) for i in ids)
    return torch.cat([i[torch.randperm(len(i), generator=generator)[:n]] for i in ids]).sort().values


def _l1_logreg(z: Tensor, y: Tensor, k: int, c: float, bias: bool, seed: int) -> tuple[Tensor, Tensor]:
    """scikit-learn's L1 logistic regression (``liblinear``, as DFR's reference code) → logits ``(k, D)``, ``(k,)``.

    Two classes: sklearn's one score ``s`` becomes the logits ``(−s/2, s/2)`` (the same softmax); more classes:
    its one-vs-rest scores are the logits."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    # scikit-learn 1.8 deprecated ``penalty`` in favour of ``l1_ratio``; older releases need ``penalty="l1"``
    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    l1 = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    clf = LogisticRegression(**l1, C=c, solver="liblinear", fit_intercept=bias, random_state=seed, max_iter=1000)
    clf.fit(z.numpy(), y.numpy())
    coef = torch.as_tensor(clf.coef_, dtype=z.dtype)
    icpt = torch.as_tensor(clf.intercept_, dtype=z.dtype) if bias else z.new_zeros(coef.shape[0])
    classes = torch.as_tensor(clf.classes_).long()
    w, b = z.new_zeros(k, z.shape[1]), z.new_zeros(k)
    if len(classes) == 2:
        w[classes[0]], w[classes[1]] = -coef[0] / 2, coef[0] / 2
        b[classes[0]], b[classes[1]] = -icpt[0] / 2, icpt[0] / 2
    else:
        w[classes], b[classes] = coef, icpt
    return w, b


def fit_dfr(
    features: Tensor, labels: Tensor, groups: Tensor, *, num_classes: int | None = None, c: float = 1.0,
    n_subsets: int = 10, bias: bool = True, seed: int = 0,
) -> DFRResult:
    """Refit a linear head on group-balanced subsets of held-out ``features (N, D)``; average the coefficients.

    ``c``: inverse L1 strength (sklearn ``C``); ``bias=False`` for bias-free heads (X-models). Features are
    standardised with the held-out mean/std; the returned head already folds that scaling in.
    """
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c!r}")
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int) or n_subsets < 1:
        raise ValueError(f"n_subsets must be a positive int, got {n_subsets!r}")
    x = features.double()
    k = int(num_classes or int(labels.max()) + 1)
    mu = x.mean(0) if bias else torch.zeros_like(x[0])  # without a bias the centring cannot be folded in
    sd = x.std(0).clamp_min(1e-8) if x.shape[0] > 1 else torch.ones_like(x[0])
    z = (x - mu) / sd
    gen = torch.Generator().manual_seed(seed)
    ws, bs = [], []
    for _ in range(n_subsets):
        idx = balanced_subset(groups, gen)
        w, b = _l1_logreg(z[idx], labels[idx].long(), k, c, bias, seed)
        ws.append(w)
        bs.append(b)
    w = torch.stack(ws).mean(0) / sd  # back to the original feature space
    b = torch.stack(bs).mean(0) - w @ mu
    return DFRResult(w.float(), b.float() if bias else None)


@torch.no_grad()
def set_head(model: nn.Module, head: str, result: DFRResult) -> None:
    """Write ``result`` into the linear ``head`` of ``model`` (in place)."""
    layer = get_layer(model, head)
    if not isinstance(layer, nn.Linear) or layer.weight.shape != result.weight.shape:
        raise ValueError(f"head={head!r} must be an nn.Linear of shape {tuple(result.weight.shape)}")
    if (layer.bias is None) != (result.bias is None):
        raise ValueError(f"head={head!r} bias={layer.bias is not None} but the DFR fit bias={result.bias is not None}")
    layer.weight.copy_(result.weight.to(layer.weight))
    if layer.bias is not None and result.bias is not None:
        layer.bias.copy_(result.bias.to(layer.bias))
