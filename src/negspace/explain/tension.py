"""Tension and absence analysis (papers 001 and 000).

Paper 001 (maximally tense images), for a feature ``f_v`` (a channel via :func:`negspace.objectives.neuron`
or a direction via :func:`negspace.objectives.direction`) and an earlier layer ``l`` with activation ``h_l``:

* layer-to-feature attribution (eq. 1): ``S_l(x) = ∇_{h_l} f_v(x) ⊙ h_l`` (``method="act_grad"``; any
  :data:`negspace.attribution.METHODS` works), ``E_l = Σ S_l``;
* ``E_l^± = Σ ReLU(±S_l)`` (eq. 2) and the maps ``φ^± = Σ_c ReLU(±S_{l,c})`` (eq. 3), so that
  ``Σφ⁺ − Σφ⁻ = E_l``;
* MTIs: the images with the largest ``‖S_l‖`` under the balance constraint ``−balance·σ(f_v) < f_v(x) < 0``;
* uniqueness (eq. 6): ``U = |∪ X_i| / (n m)`` with ``1/n ≤ U ≤ 1``.

Paper 000 (encoded absences, §5.3, B.3): most/least activating patches per channel (sliding window with a
stride; every window is fed to the network on its own, all channels are ranked at once), the
patch-insertion test (none / random / least / most activating patch pasted into a random corner of each
channel's top-n images; Student's t-test ``scipy.stats.ttest_ind`` least vs random), and non-target attribution.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.attribution import input_x_gradient, integrated_gradients, layer_contributions
from negspace.attribution.engine import check_input, forward_objective
from negspace.batch import unpack_batch
from negspace.hooks import capture, get_layer, run_until
from negspace.objectives import Objective, direction, neuron
from negspace.reduce import channel_dim
from negspace.reduce import channels_last as _channels_last
from negspace.reduce import reduce_positions as _reduce_space

__all__ = [
    "InsertionResult",
    "PatchResult",
    "TensionResult",
    "activating_patches",
    "as_feature",
    "completeness_correlation",
    "e_split",
    "insertion_test",
    "layer_to_feature_attribution",
    "non_target_attribution",
    "phi_maps",
    "select_images",
    "select_mti",
    "tension_stats",
    "uniqueness",
]

Feature = Objective | tuple[str, int]
Data = Tensor | Iterable


# ----------------------------------------------------------------------------------------------- helpers
def as_feature(model: nn.Module, feature: Feature) -> Objective:
    """Validate a feature: ``objectives.neuron``/``direction`` (or ``(layer, channel)``) on a layer of ``model``.

    Raises ``ValueError`` for unknown layers (listing close names) and, once the layer's width is known,
    for out-of-range channels (:func:`_check_feature_width`).
    """
    if isinstance(feature, tuple) and len(feature) == 2 and isinstance(feature[0], str):
        if not isinstance(feature[1], int) or isinstance(feature[1], bool):
            raise TypeError(f"feature=(layer, channel) needs an int channel, got {feature[1]!r}")
        feature = neuron(feature[0], feature[1])
    if not isinstance(feature, Objective):
        raise TypeError(
            "feature must be objectives.neuron(layer, index), objectives.direction(layer, vector), another "
            f"negspace objective, or a (layer, channel) tuple; got {type(feature).__name__}"
        )
    if feature.layer is not None:
        get_layer(model, feature.layer)
    return feature


def _check_feature_width(feature: Objective, act: Tensor) -> None:
    c = act.shape[channel_dim(act)]
    if isinstance(feature, neuron):
        idx = torch.as_tensor(feature.index).flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= c):
            raise ValueError(
                f"feature: channel {feature.index!r} does not exist in layer {feature.layer!r}, which has {c} "
                f"channels (valid: 0..{c - 1})"
            )
    if isinstance(feature, direction) and feature.vector.numel() != c:
        raise ValueError(
            f"feature: direction has {feature.vector.numel()} entries but layer {feature.layer!r} has {c} channels"
        )


def _images_from_batch(batch: object, key: str | int = 0) -> Tensor:
    """Images of a batch; ``key``: dict key or tuple index of the image (0 = the default layout)."""
    return unpack_batch(batch, None if key == 0 else {"image": key}, who="tension").image


def collect_images(data: Data, *, max_images: int | None = None, batch_key: str | int = 0) -> Tensor:
    """``data`` (a tensor ``(N, ...)`` or an iterable of batches) → one tensor ``(N, ...)`` (at most ``max_images``)."""
    if isinstance(data, Tensor):
        x = data
    else:
        parts, n = [], 0
        for batch in data:
            img = _images_from_batch(batch, batch_key).detach()
            parts.append(img)
            n += img.shape[0]
            if max_images is not None and n >= max_images:
                break
        if not parts:
            raise ValueError("data is empty")
        x = torch.cat(parts)
    if max_images is not None:
        x = x[:max_images]
    check_input(x, "data")
    return x


def _chunks(n: int, size: int) -> Iterable[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _check_pos_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ------------------------------------------------------------------------------- S_l, E±, φ± (paper 001)
def layer_to_feature_attribution(
    model: nn.Module,
    layer: str | None,
    x: Tensor,
    feature: Feature,
    *,
    method: str = "act_grad",
    n_steps: int = 10,
) -> Tensor:
    """``S_l(x, f_v) = ∇_{h_l} f_v(x) ⊙ h_l`` (paper 001, eq. 1), via :func:`negspace.attribution.layer_contributions`.

    Args:
        layer: the attribution layer ``l`` (must run before the feature's layer); ``None`` → pixels
            (input × gradient).
        x: ``(B, ...)``. feature: ``objectives.neuron(layer, c)``, ``objectives.direction(layer, v)`` or ``(layer, c)``.
        method: ``"act_grad"`` (eq. 1) or another hidden-contribution method.

    Returns:
        ``(B, C, H, W)`` shaped like ``h_l`` (or like ``x`` for ``layer=None``).
    """
    feat = _validated_feature(model, feature, x)
    if layer is not None:
        get_layer(model, layer)
    return _attribute(model, layer, x, feat, method, n_steps)


def _validated_feature(model: nn.Module, feature: Feature, x: Tensor) -> Objective:
    """:func:`as_feature` plus a channel-range check on one sample of ``x``."""
    feat = as_feature(model, feature)
    check_input(x)
    if feat.layer is not None:
        with torch.no_grad(), capture(model, feat.layer, stop_after=True) as cap:
            run_until(model, x[:1])
        if feat.layer not in cap.activations:
            raise ValueError(f"feature layer {feat.layer!r} did not run in the forward pass")
        _check_feature_width(feat, cap.activations[feat.layer])
    return feat


def _attribute(model: nn.Module, layer: str | None, x: Tensor, feat: Objective, method: str, n_steps: int) -> Tensor:
    if layer is None:
        return input_x_gradient(model, x, feat)
    return layer_contributions(model, layer, x, feat, method=method, n_steps=n_steps)


def e_split(s: Tensor) -> tuple[Tensor, Tensor]:
    """``(E⁺, E⁻)`` of eq. 2: sums of ``ReLU(±S)`` over every non-batch dim. ``s: (B, ...)`` → two ``(B,)``."""
    flat = s.flatten(1)
    return flat.clamp(min=0).sum(1), (-flat).clamp(min=0).sum(1)


def phi_maps(s: Tensor) -> tuple[Tensor, Tensor]:
    """``(φ⁺, φ⁻)`` of eq. 3: ``Σ_c ReLU(±S_c)``. ``(B, C, H, W)`` → two ``(B, H, W)``; tokens ``(B, T, D)`` → ``(B, T)``."""
    if s.dim() not in (3, 4):
        raise ValueError(f"phi_maps needs S of shape (B, C, H, W) or (B, T, D), got {tuple(s.shape)}")
    d = channel_dim(s)
    return s.clamp(min=0).sum(d), (-s).clamp(min=0).sum(d)


@dataclass
class TensionResult:
    """Per-image statistics of a feature over a dataset (all ``(N,)`` unless noted).

    ``f``: feature value ``f_v(x)``; ``e``: ``E_l = Σ S_l``; ``e_plus``/``e_minus``: eq. 2; ``l1``/``l2``: ``‖S_l‖``;
    ``phi_plus``/``phi_minus``: eq. 3 maps ``(N, H, W)`` (``None`` for flat layers); ``s``: ``S_l`` itself when
    ``keep_attributions=True``.
    """

    f: Tensor
    e: Tensor
    e_plus: Tensor
    e_minus: Tensor
    l1: Tensor
    l2: Tensor
    phi_plus: Tensor | None = None
    phi_minus: Tensor | None = None
    s: Tensor | None = None

    def stats(self) -> dict[str, float]:
        """Summary numbers (floats) for logging."""
        corr = _pearson(self.f, self.e)
        return {
            "e_plus_mean": float(self.e_plus.mean()),
            "e_minus_mean": float(self.e_minus.mean()),
            "e_mean": float(self.e.mean()),
            "f_mean": float(self.f.mean()),
            "f_std": float(self.f.std()) if self.f.numel() > 1 else 0.0,
            "completeness_corr": corr,
            "tension_mean": float(torch.minimum(self.e_plus, self.e_minus).mean()),
        }


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def tension_stats(
    model: nn.Module,
    layer: str | None,
    data: Data,
    feature: Feature,
    *,
    method: str = "act_grad",
    n_steps: int = 10,
    batch_size: int = 64,
    keep_attributions: bool = False,
    batch_key: str | int = 0,
    progress: bool = False,
) -> TensionResult:
    """Feature values, ``E_l``, ``E_l^±``, norms and φ± maps of ``feature`` over ``data`` (tensor or loader)."""
    _check_pos_int(batch_size, "batch_size")
    x_all = collect_images(data, batch_key=batch_key)
    feat = _validated_feature(model, feature, x_all)
    if layer is not None:
        get_layer(model, layer)
    cols: dict[str, list[Tensor]] = {k: [] for k in ("f", "e", "ep", "em", "l1", "l2", "pp", "pm", "s")}
    for sl in tqdm(list(_chunks(x_all.shape[0], batch_size)), desc="tension", disable=not progress):
        x = x_all[sl]
        s = _attribute(model, layer, x, feat, method, n_steps)
        with torch.no_grad():
            f = forward_objective(model, x, feat)
        ep, em = e_split(s)
        cols["f"].append(f.detach())
        cols["e"].append(s.flatten(1).sum(1))
        cols["ep"].append(ep)
        cols["em"].append(em)
        cols["l1"].append(s.flatten(1).abs().sum(1))
        cols["l2"].append(s.flatten(1).norm(dim=1))
        if s.dim() in (3, 4):
            pp, pm = phi_maps(s)
            cols["pp"].append(pp)
            cols["pm"].append(pm)
        if keep_attributions:
            cols["s"].append(s)
    cat = {k: (torch.cat(v) if v else None) for k, v in cols.items()}
    return TensionResult(
        f=cat["f"], e=cat["e"], e_plus=cat["ep"], e_minus=cat["em"], l1=cat["l1"], l2=cat["l2"],
        phi_plus=cat["pp"], phi_minus=cat["pm"], s=cat["s"],
    )  # fmt: skip


def completeness_correlation(
    model: nn.Module,
    layers: Sequence[str],
    data: Data,
    feature: Feature,
    *,
    method: str = "act_grad",
    batch_size: int = 64,
    batch_key: str | int = 0,
) -> dict[str, float]:
    """Pearson correlation between ``f_v(x)`` and ``E_l(x) = Σ S_l`` across ``data``, per layer (paper 001, Fig. 3).

    All layers are attributed in the same passes; the key ``"pixels"`` holds input × gradient when
    ``"pixels"`` is listed.
    """
    if isinstance(layers, str) or not layers:
        raise TypeError(f"layers must be a non-empty list of dotted names, got {layers!r}")
    hidden = [n for n in layers if n != "pixels"]
    x_all = collect_images(data, batch_key=batch_key)
    feat = _validated_feature(model, feature, x_all)
    fs: list[Tensor] = []
    es: dict[str, list[Tensor]] = {n: [] for n in layers}
    for sl in _chunks(x_all.shape[0], _check_pos_int(batch_size, "batch_size")):
        x = x_all[sl]
        with torch.no_grad():
            fs.append(forward_objective(model, x, feat))
        if hidden:
            contrib = layer_contributions(model, hidden, x, feat, method=method)
            for n in hidden:
                es[n].append(contrib[n].flatten(1).sum(1))
        if "pixels" in layers:
            es["pixels"].append(input_x_gradient(model, x, feat).flatten(1).sum(1))
    f = torch.cat(fs)
    return {n: _pearson(f, torch.cat(v)) for n, v in es.items()}


def select_images(values: Tensor, k: int, *, largest: bool = True, mask: Tensor | None = None) -> Tensor:
    """Indices of the ``k`` largest (smallest) ``values: (N,)`` among ``mask`` (MEIs: ``f``, MIIs: ``largest=False``)."""
    _check_pos_int(k, "k")
    v = values.detach().double().clone()
    fill = -math.inf if largest else math.inf
    if mask is not None:
        v[~mask] = fill
    n_ok = int(torch.isfinite(v).sum())
    order = v.argsort(descending=largest)
    return order[: min(k, n_ok)]


def select_mti(result: TensionResult, k: int = 10, *, balance: float = 0.5, norm: str = "l1") -> Tensor:
    """MTIs: the ``k`` images with the largest ``‖S_l‖`` (``norm="l1"|"l2"``) subject to
    ``−balance·σ(f_v(X)) < f_v(x) < 0`` (paper 001 §4), so that excitation and inhibition cancel.

    Returns a LongTensor of at most ``k`` indices (empty when no image satisfies the constraint, e.g. for a
    post-ReLU feature: pick a pre-activation layer).
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if not isinstance(balance, int | float) or balance <= 0:
        raise ValueError(f"balance must be a positive number, got {balance!r}")
    sigma = float(result.f.std()) if result.f.numel() > 1 else 0.0
    mask = (result.f > -balance * sigma) & (result.f < 0)
    return select_images(result.l1 if norm == "l1" else result.l2, k, mask=mask)


def uniqueness(selections: Sequence[Sequence[int] | Tensor]) -> float:
    """``U = |∪_i X_i| / (n m)`` (paper 001, eq. 6) for ``n`` selections of ``m`` distinct images each; ``1/n ≤ U ≤ 1``."""
    if isinstance(selections, Tensor):
        selections = list(selections)
    if not isinstance(selections, Sequence) or len(selections) == 0:
        raise ValueError("selections must be a non-empty list of index sets (one per feature)")
    sets = [torch.as_tensor(s).flatten().tolist() for s in selections]
    m = len(sets[0])
    if m == 0 or any(len(s) != m for s in sets):
        raise ValueError(f"every selection must hold the same number m >= 1 of images, got sizes {[len(s) for s in sets]}")
    for i, s in enumerate(sets):
        if len(set(s)) != m:
            raise ValueError(f"selection {i} contains repeated images: {s}")
    union = set().union(*map(set, sets))
    return len(union) / (len(sets) * m)


# -------------------------------------------------------------------- patches and insertion (paper 000)
def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not (isinstance(v, Sequence) and len(v) == 2 and all(isinstance(i, int) and i >= 1 for i in v)):
        raise ValueError(f"{name} must be a positive int or a pair (h, w) of positive ints, got {v!r}")
    return int(v[0]), int(v[1])


def channel_values(model: nn.Module, layer: str, x: Tensor, *, reduce: str = "mean") -> Tensor:
    """Every channel of ``layer`` reduced over space (``"mean"`` = GAP), no grad. ``x: (B, ...)`` → ``(B, C)``."""
    with torch.no_grad(), capture(model, layer, stop_after=True, detach=True) as cap:
        run_until(model, x)
    act = cap.activations[layer]
    flat = _channels_last(act)  # (B, S, C)
    return _reduce_space(flat, reduce, act)


def _values_chunked(model: nn.Module, layer: str, x: Tensor, reduce: str, chunk: int) -> Tensor:
    return torch.cat([channel_values(model, layer, x[sl], reduce=reduce) for sl in _chunks(x.shape[0], chunk)])


def unfold_windows(x: Tensor, patch: tuple[int, int], stride: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Sliding windows of ``x: (B, C, H, W)`` as a strided view ``(B, C, nH, nW, ph, pw)`` (no copy) and their
    ``(image, top, left)`` coordinates ``(B·nH·nW, 3)``; :func:`gather_windows` copies out a batch of them."""
    win = x.unfold(2, patch[0], stride[0]).unfold(3, patch[1], stride[1])
    b, _, nh, nw = win.shape[:4]
    bi, ii, jj = torch.meshgrid(torch.arange(b), torch.arange(nh) * stride[0], torch.arange(nw) * stride[1], indexing="ij")
    return win, torch.stack([bi.flatten(), ii.flatten(), jj.flatten()], 1)


def gather_windows(win: Tensor, ids: Tensor) -> Tensor:
    """Windows number ``ids`` (any shape, row-major over ``(B, nH, nW)``) of an :func:`unfold_windows` view →
    ``(*ids.shape, C, ph, pw)``; only these windows are copied."""
    _, _, nh, nw = win.shape[:4]
    flat = ids.flatten()
    out = win[flat // (nh * nw), :, (flat // nw) % nh, flat % nw]  # (n, C, ph, pw)
    return out.reshape(*ids.shape, *out.shape[1:])


@dataclass
class PatchResult:
    """Most/least activating patches per channel of ``layer``.

    ``most_values``/``least_values``: ``(C, k)``; ``most_where``/``least_where``: ``(C, k, 3)`` rows
    ``(image, top, left)``; ``most``/``least``: the crops ``(C, k, C_in, ph, pw)``; ``patch_size``, ``stride``.
    """

    layer: str
    patch_size: tuple[int, int]
    stride: tuple[int, int]
    most_values: Tensor
    most_where: Tensor
    least_values: Tensor
    least_where: Tensor
    most: Tensor = field(repr=False)
    least: Tensor = field(repr=False)


def _check_patch_fits(x: Tensor, patch: tuple[int, int]) -> None:
    if x.dim() != 4:
        raise ValueError(f"patch search needs images (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if patch[0] > h or patch[1] > w:
        raise ValueError(f"patch_size {patch} is larger than the images ({h}, {w}); use patch_size <= image size")


def activating_patches(
    model: nn.Module,
    layer: str,
    data: Data,
    *,
    patch_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    k: int = 8,
    reduce: str = "mean",
    chunk_size: int = 1024,
    max_images: int | None = None,
    batch_key: str | int = 0,
    progress: bool = True,
) -> PatchResult:
    """Most and least activating ``patch_size`` windows for every channel of ``layer`` at once (paper 000, B.3).

    Windows (stride ``stride``, default ``patch_size // 2``) are cut from every image by ``unfold``, stacked into a
    batch and fed to the network on their own — one batched forward per ``chunk_size`` windows, stopped at
    ``layer``; each channel is reduced over space (``reduce``, default GAP) and a running top-/bottom-``k`` per
    channel is kept. ``data``: ``(N, C, H, W)`` tensor or loader.
    """
    get_layer(model, layer)
    patch = _pair(patch_size, "patch_size")
    st = _pair(stride if stride is not None else (max(1, patch[0] // 2), max(1, patch[1] // 2)), "stride")
    _check_pos_int(k, "k")
    _check_pos_int(chunk_size, "chunk_size")
    x_all = collect_images(data, max_images=max_images, batch_key=batch_key)
    _check_patch_fits(x_all, patch)
    windows, where = unfold_windows(x_all, patch, st)  # a view: windows are copied chunk by chunk
    n = where.shape[0]
    if k > n:
        raise ValueError(f"k={k} exceeds the number of windows ({n}); lower k or the stride")
    top_v = bot_v = top_i = bot_i = None
    for sl in tqdm(list(_chunks(n, chunk_size)), desc="patch search", disable=not progress):
        vals = channel_values(model, layer, gather_windows(windows, torch.arange(sl.start, sl.stop)), reduce=reduce).T  # (C, n_chunk)
        ids = torch.arange(sl.start, sl.stop).expand_as(vals)
        if top_v is None:
            top_v, top_i, bot_v, bot_i = vals[:, :0], ids[:, :0], vals[:, :0], ids[:, :0]
        cv, ci = torch.cat([top_v, vals], 1), torch.cat([top_i, ids], 1)
        t = cv.topk(min(k, cv.shape[1]), dim=1)
        top_v, top_i = t.values, ci.gather(1, t.indices)
        cv, ci = torch.cat([bot_v, vals], 1), torch.cat([bot_i, ids], 1)
        b = cv.topk(min(k, cv.shape[1]), dim=1, largest=False)
        bot_v, bot_i = b.values, ci.gather(1, b.indices)
    return PatchResult(
        layer=layer, patch_size=patch, stride=st,
        most_values=top_v, most_where=where[top_i], least_values=bot_v, least_where=where[bot_i],
        most=gather_windows(windows, top_i), least=gather_windows(windows, bot_i),
    )  # fmt: skip


_METHODS = ("none", "random", "least", "most")


@dataclass
class InsertionResult:
    """Patch-insertion test (paper 000 §5.3, Table 1/3).

    ``table``: one dict per method (``none``, ``random``, ``least``, ``most``) with ``method``, ``mean``, ``std``
    (activation over all channels × images) and ``p_value`` (``ttest_ind`` against ``random``, pooled);
    ``per_channel``: one dict per channel with the four means, ``p_least`` (least vs random) and ``inhibited``;
    ``fraction_inhibited``: share of channels with ``p_least < alpha`` and a lower mean than random;
    ``activations``: ``{method: (C, n)}``.
    """

    table: list[dict]
    per_channel: list[dict]
    fraction_inhibited: float
    activations: dict[str, Tensor] = field(repr=False)


def _paste(images: Tensor, patches: Tensor, corners: Tensor) -> Tensor:
    """Paste ``patches (n, C, ph, pw)`` into ``images (n, C, H, W)`` at corners 0..3 (TL, TR, BL, BR)."""
    out = images.clone()
    h, w = images.shape[-2:]
    ph, pw = patches.shape[-2:]
    for c in range(4):
        sel = corners == c
        if sel.any():
            top = 0 if c in (0, 1) else h - ph
            left = 0 if c in (0, 2) else w - pw
            out[sel, :, top : top + ph, left : left + pw] = patches[sel]
    return out


def insertion_test(
    model: nn.Module,
    layer: str,
    data: Data,
    patches: PatchResult,
    *,
    channels: Sequence[int] | None = None,
    n_images: int = 100,
    alpha: float = 0.01,
    reduce: str = "mean",
    seed: int = 0,
    chunk_size: int = 1024,
    max_images: int | None = None,
    batch_key: str | int = 0,
    progress: bool = True,
) -> InsertionResult:
    """Insert no / a random / a least-activating / a most-activating patch into a random corner of each channel's
    ``n_images`` most activating images and measure the channel's activation (paper 000 §5.3, B.3).

    The random patch is a crop of the same size at a random place of a random image of ``data``; the least
    (most) activating patch is one of the ``k`` found by :func:`activating_patches`, drawn at random. Per channel,
    ``scipy.stats.ttest_ind(least, random)`` decides whether the channel is significantly inhibited
    (``p < alpha`` and a lower mean).
    """
    from scipy.stats import ttest_ind  # scipy is only needed here

    get_layer(model, layer)
    if layer != patches.layer:
        raise ValueError(f"patches were searched on layer {patches.layer!r}, not {layer!r}")
    _check_pos_int(n_images, "n_images")
    x_all = collect_images(data, max_images=max_images, batch_key=batch_key)
    _check_patch_fits(x_all, patches.patch_size)
    n_ch = patches.least.shape[0]
    chans = list(range(n_ch)) if channels is None else [int(c) for c in channels]
    bad = [c for c in chans if not 0 <= c < n_ch]
    if bad:
        raise ValueError(f"channels {bad} do not exist in layer {layer!r}, which has {n_ch} channels")
    n_img = min(n_images, x_all.shape[0])
    g = torch.Generator().manual_seed(seed)
    full = _values_chunked(model, layer, x_all, reduce, chunk_size)  # (N, C)
    ph, pw = patches.patch_size
    h, w = x_all.shape[-2:]
    k = patches.least.shape[1]
    acts: dict[str, list[Tensor]] = {m: [] for m in _METHODS}
    for c in tqdm(chans, desc="insertion test", disable=not progress):
        top = full[:, c].topk(n_img).indices
        imgs = x_all[top]
        corners = torch.randint(0, 4, (n_img,), generator=g)
        src = torch.randint(0, x_all.shape[0], (n_img,), generator=g)
        ys = torch.randint(0, h - ph + 1, (n_img,), generator=g)
        xs = torch.randint(0, w - pw + 1, (n_img,), generator=g)
        rand = torch.stack([x_all[s, :, y : y + ph, q : q + pw] for s, y, q in zip(src, ys, xs)])
        least = patches.least[c][torch.randint(0, k, (n_img,), generator=g)]
        most = patches.most[c][torch.randint(0, k, (n_img,), generator=g)]
        variants = torch.cat([imgs, _paste(imgs, rand, corners), _paste(imgs, least, corners), _paste(imgs, most, corners)])
        vals = _values_chunked(model, layer, variants, reduce, chunk_size)[:, c].view(4, n_img)
        for m, v in zip(_METHODS, vals):
            acts[m].append(v)
    stacked = {m: torch.stack(v) for m, v in acts.items()}  # (C_sel, n)
    with warnings.catch_warnings():  # near-constant samples (e.g. an all-zero channel): p is reported as is
        warnings.filterwarnings("ignore", message="Precision loss", category=RuntimeWarning)
        return _insertion_tables(stacked, chans, alpha, ttest_ind)


def _insertion_tables(stacked: dict[str, Tensor], chans: list[int], alpha: float, ttest_ind: Callable) -> InsertionResult:
    table = []
    for m in _METHODS:
        v = stacked[m].flatten().double()
        p = float("nan") if m == "random" else float(ttest_ind(v.numpy(), stacked["random"].flatten().double().numpy()).pvalue)
        table.append({"method": m, "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0, "p_value": p})
    per_channel = []
    for i, c in enumerate(chans):
        row: dict = {"channel": c}
        for m in _METHODS:
            row[m] = float(stacked[m][i].double().mean())
        p = float(ttest_ind(stacked["least"][i].double().numpy(), stacked["random"][i].double().numpy()).pvalue)
        p = 1.0 if math.isnan(p) else p  # identical constant samples: no evidence
        row["p_least"] = p
        row["inhibited"] = bool(p < alpha and row["least"] < row["random"])
        per_channel.append(row)
    frac = sum(r["inhibited"] for r in per_channel) / len(per_channel)
    return InsertionResult(table=table, per_channel=per_channel, fraction_inhibited=frac, activations=stacked)


def non_target_attribution(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    target: int | str = "complement",
    *,
    method: str = "integrated_gradients",
    n_steps: int = 32,
) -> tuple[Tensor, Tensor]:
    """Attributions of a class on samples of *other* classes (paper 000 §4).

    ``target``: an int class ``t`` → attributions of ``t`` for every sample with ``label != t``;
    ``"complement"`` (binary tasks) → for every sample, the attribution of ``1 - label``.
    ``method``: ``"integrated_gradients"`` (zero baseline, as in the paper) or ``"input_x_gradient"``.

    Returns ``(attributions (M, ...), indices (M,))`` into ``x``.
    """
    check_input(x)
    labels = torch.as_tensor(labels).long().flatten()
    if labels.numel() != x.shape[0]:
        raise ValueError(f"labels must have one entry per sample ({x.shape[0]}), got {labels.numel()}")
    if target == "complement":
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 1):
            raise ValueError("target='complement' needs binary labels in {0, 1}")
        idx = torch.arange(x.shape[0])
        tgt: int | Tensor = 1 - labels
    elif isinstance(target, int) and not isinstance(target, bool):
        idx = (labels != target).nonzero().flatten()
        tgt = target
    else:
        raise ValueError(f"target must be a class index or 'complement', got {target!r}")
    if idx.numel() == 0:
        return x.new_zeros((0, *x.shape[1:])), idx
    xs = x[idx]
    if method == "integrated_gradients":
        attr = integrated_gradients(model, xs, tgt, n_steps=n_steps)
    elif method == "input_x_gradient":
        attr = input_x_gradient(model, xs, tgt)
    else:
        raise ValueError(f"method must be 'integrated_gradients' or 'input_x_gradient', got {method!r}")
    return attr, idx
