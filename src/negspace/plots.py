"""Every matplotlib figure negspace draws. Functions take tensors and return ``matplotlib.figure.Figure``
objects; callbacks hand them to the Trainer's loggers (``negspace.callbacks.base.log_figure``), scripts save
them. The Agg backend is used, so no display is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["image_array", "phi_rgb"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def image_array(img: Tensor) -> Any:
    """``(C, H, W)`` → an array matplotlib shows: RGB for 3 channels, grey for 1, channels side by side otherwise."""
    a = img.detach().float().cpu()
    if a.dim() == 2:
        a = a[None]
    if a.shape[0] == 3:
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:  # normalised inputs: show them min-max scaled
            a = (a - lo) / max(hi - lo, 1e-12)
        return a.clamp(0, 1).permute(1, 2, 0).numpy()
    if a.shape[0] == 1:
        return a[0].numpy()
    return torch.cat(list(a), dim=1).numpy()


def phi_rgb(phi_plus: Tensor, phi_minus: Tensor) -> Any:
    """φ⁺ in red and φ⁻ in blue, ``(H, W)`` each in [0, 1] → ``(H, W, 3)``."""
    p, m = phi_plus.detach().float().cpu(), phi_minus.detach().float().cpu()
    return torch.stack([p, torch.zeros_like(p), m], dim=-1).clamp(0, 1).numpy()


# === priors and biased splits ===
def prior_gradient_norms(rows: list[dict[str, float]], lams: tuple[float, ...] = (1.0, 10.0, 100.0)) -> Any:
    """Gradient norms over training: ``‖∇CE‖`` against ``λ·‖∇penalty‖`` of the paper's form for each λ in ``lams``
    and ``‖∇penalty‖`` of the scale-free form. ``rows``: dicts with ``epoch``, ``grad_ce``, ``grad_mask``,
    ``grad_fraction`` (one per evaluation, e.g. from ``benchmarks/priors_lambda.py --diagnose``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ep = [r["epoch"] for r in rows]
    ax.semilogy(ep, [r["grad_ce"] for r in rows], "k-o", label="‖∇ task loss‖")
    for lam in lams:
        ax.semilogy(ep, [lam * r["grad_mask"] for r in rows], "--", label=f"λ={lam:g} · ‖∇ penalty‖ (paper)")
    ax.semilogy(ep, [r["grad_fraction"] for r in rows], "b-s", label="‖∇ penalty‖ (fraction), λ=1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("gradient norm")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def biased_split_attributions(rows: list[dict[str, Any]], class_names: list[str] | None = None) -> Any:
    """One row per sample: image with the mask contour, target ``A(x, y)`` and non-target ``A(x, t')`` maps.

    ``rows``: dicts with ``split`` (str), ``image (C, H, W)``, ``mask`` (``(1, H, W)`` or ``(H, W)``), ``label``
    and ``pred`` (int), ``attr (2, H, W)`` (attributions summed over channels; blue +, red −).
    """
    fig = _plt().figure(figsize=(7.5, 2.3 * max(len(rows), 1)))
    axes = fig.subplots(max(len(rows), 1), 3, squeeze=False)
    for r, row in enumerate(rows):
        img, m, a = row["image"], row["mask"].detach().float().cpu(), row["attr"].detach().float().cpu()
        shown = image_array(img)
        axes[r, 0].imshow(shown, cmap="gray" if shown.ndim == 2 else None)
        if m.numel() and float(m.max()) > 0:
            axes[r, 0].contour(m.reshape(m.shape[-2:]).numpy(), levels=[0.5], colors="yellow", linewidths=0.8)
        lab, prd = ((class_names[row["label"]], class_names[row["pred"]]) if class_names
                    else (str(row["label"]), str(row["pred"])))
        axes[r, 0].set_title(f"{row['split']}\nlabel {lab}, pred {prd}", fontsize=7)
        for j, title in ((0, "target A(x, y)"), (1, "non-target A(x, t')")):
            v = float(a[j].abs().max()) or 1.0
            axes[r, j + 1].imshow(a[j].numpy(), cmap="RdBu", vmin=-v, vmax=v)
            axes[r, j + 1].set_title(f"{title}\n(blue +, red −)", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


# === CODEC ===
def codec_mode_class_correlation(layer: str, correlation: Tensor, act_correlation: Tensor | None = None) -> Any:
    """Heatmaps of mode–class correlations ``(M, Q)`` (contribution modes, and activation modes if given)."""
    plt = _plt()
    mats = [("contributions", correlation)]
    if act_correlation is not None:
        mats.append(("activations", act_correlation))
    fig, axes = plt.subplots(1, len(mats), figsize=(5 * len(mats), 4), squeeze=False)
    for ax, (title, c) in zip(axes[0], mats):
        im = ax.imshow(c.detach().float().cpu().T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set(title=f"{layer}: {title}", xlabel="mode", ylabel="class")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def codec_contribution_maps(
    images: Tensor, maps: Tensor, *, titles: Any = None, filter_size: int = 4, contrast: float = 7.0
) -> Any:
    """Images ``(B, C, H, W)`` above their positive contribution maps and the masked images (paper 002 10.8:
    channel mean, median filter of size ``filter_size`` (4; 0 or 1: none), normalised to [0, 1], × ``contrast``,
    clipped, used as a mask)."""
    import numpy as np

    plt = _plt()
    b = images.shape[0]
    fig, axes = plt.subplots(3, b, figsize=(1.8 * b, 5.4), squeeze=False)
    for i in range(b):
        img = images[i].detach().float().cpu()
        m = maps[i].detach().float().cpu().clamp_min(0).mean(0).numpy()
        if filter_size > 1:
            from scipy.ndimage import median_filter

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
    fig.tight_layout()
    return fig


# === PURE ===
def pure_virtual_neurons(crops: Tensor, labels: Tensor, n_virtual: int, *, n_show: int = 8, title: str = "") -> Any:
    """Cropped references of one neuron, one row per virtual neuron: ``crops (n, C, H, W)``, ``labels (n,)``.

    Each crop is min-max scaled; the first three channels are shown as RGB (fewer are padded with zeros).
    """
    plt = _plt()
    fig, axes = plt.subplots(n_virtual, n_show, figsize=(1.2 * n_show, 1.3 * n_virtual), squeeze=False)
    for j in range(n_virtual):
        members = crops[labels == j][:n_show]
        for c in range(n_show):
            ax = axes[j][c]
            ax.axis("off")
            if c < len(members):
                img = members[c].detach().float().cpu()
                img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray")
                else:
                    rgb = torch.cat([img[:3], torch.zeros(max(0, 3 - img.shape[0]), *img.shape[1:])])
                    ax.imshow(rgb.permute(1, 2, 0).numpy())
        axes[j][0].set_title(f"virtual {j} ({int((labels == j).sum())})", fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# === LE ===
def area_chart(
    activations: Tensor,
    concepts: Tensor,
    concept_names: Any,
    *,
    columns: Any = None,
    top: int = 6,
    n_buckets: int = 8,
    title: str | None = None,
) -> Any:
    """Area chart of one neuron (paper 003, Fig. 3): ``n_buckets`` evenly spaced buckets of ``activations (N,)``
    between 0 (or the minimum, if negative) and the maximum, and per bucket the mean of each concept of
    ``concepts (N, M)`` (= share of inputs with that label for 0/1 concepts), stacked; inputs per bucket on a log
    axis. Shows the concept ``columns`` (e.g. an explanation's ``concept_indices``), else the ``top`` concepts most
    correlated with the neuron.
    """
    from negspace.stats import pearson_columns

    plt = _plt()
    a = activations.detach().double().flatten()
    p = concepts.detach().double()
    if p.ndim != 2 or p.shape[0] != a.shape[0]:
        raise ValueError(f"concepts must be (N, M) with N = {a.shape[0]}, got {tuple(p.shape)}")
    if columns:
        cols = [int(c) for c in columns]
    else:
        corr = torch.nan_to_num(pearson_columns(p, a[:, None])[:, 0], nan=0.0)  # constant concepts rank as 0
        cols = torch.topk(corr, min(top, p.shape[1])).indices.tolist()
    lo, hi = min(0.0, float(a.min())), float(a.max())
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
    shown = torch.where(counts > 0, counts.double(), torch.full_like(counts, float("nan"), dtype=torch.float64))
    ax2.plot(mids, shown.numpy(), "k--", lw=1, marker=".", label="inputs per bucket")
    ax2.set_yscale("log")
    ax2.set_ylabel("inputs (log)")
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    ax.set_title(title or "activation buckets by concept", fontsize=8)
    fig.tight_layout()
    return fig


# === tension ===
def tension_channel_figure(
    images: Tensor, result: Any, selections: Any, patches: Any, channel: int, *, n_show: int = 4,
    title: str | None = None, phi_norm: str = "images",
) -> Any:
    """One channel's tension report (papers 001, 000): rows of MEIs / MIIs / MTIs (and the MTI subtypes
    ``mti_separated`` / ``mti_colocated`` when present) of ``images (N, C, H, W)`` (indices
    ``selections[name]``, titled with ``result.f``), each above its φ maps (φ⁺ red, φ⁻ blue, overlap green,
    paper 001 Fig. 4 g), then the least and most activating patches of ``channel``.

    ``phi_norm="images"``: one scale for all images (paper 001), ``"image"``: each image by its own maximum
    (:func:`negspace.explain.tension.phi_normalize`). ``result``: the channel's ``TensionResult``;
    ``patches``: a ``PatchResult`` of the layer.
    """
    from negspace.explain.tension import phi_normalize

    plt = _plt()
    names = ("mei", "mii", "mti", "mti_separated", "mti_colocated")
    rows = [(name, list(selections[name])) for name in names if len(selections.get(name, ()))]
    norm_p = norm_m = None
    if result.phi_plus is not None:
        norm_p, norm_m = phi_normalize(result.phi_plus, result.phi_minus, across=phi_norm)
    k = patches.least.shape[1]
    n_col = max(n_show, k)
    fig, axes = plt.subplots(len(rows) * 2 + 2, n_col, figsize=(1.3 * n_col, 1.3 * (len(rows) * 2 + 2)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (name, idx) in enumerate(rows):
        for j, i in enumerate(idx[:n_col]):
            axes[2 * r, j].imshow(image_array(images[i]), cmap="gray")
            axes[2 * r, j].set_title(f"{name} f={float(result.f[i]):.2g}", fontsize=6)
            if norm_p is not None and norm_m is not None:
                p, m = norm_p[i].cpu(), norm_m[i].cpu()
                both = torch.minimum(p, m)
                rgb = phi_rgb(p - both, m - both)
                rgb[..., 1] = both.clamp(0, 1).numpy()
                axes[2 * r + 1, j].imshow(rgb)
                axes[2 * r + 1, j].set_title("φ+ red / φ- blue", fontsize=6)
    base = len(rows) * 2
    for j in range(min(k, n_col)):
        axes[base, j].imshow(image_array(patches.least[channel, j]), cmap="gray")
        axes[base, j].set_title(f"least {float(patches.least_values[channel, j]):.2g}", fontsize=6)
        axes[base + 1, j].imshow(image_array(patches.most[channel, j]), cmap="gray")
        axes[base + 1, j].set_title(f"most {float(patches.most_values[channel, j]):.2g}", fontsize=6)
    fig.suptitle(title or f"{patches.layer}:{channel}", fontsize=8)
    fig.tight_layout()
    return fig


def tension_atlas_figure(atlas: Any, values: Tensor, grid: int) -> Any:
    """Attribution atlas (paper 001 §5): the 2-D layout ``atlas.coords`` coloured by ``values`` (``f_v`` of the
    selected samples, ``(N,)``) next to the ``grid × grid`` icons ``atlas.icons``, each bordered by the colour of
    its own ``f_v`` (``atlas.icon_values``)."""
    import numpy as np

    plt = _plt()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 4.5))
    v = values.detach().cpu().numpy()
    lim = float(np.abs(v).max()) or 1.0
    sc = ax0.scatter(atlas.coords[:, 0], atlas.coords[:, 1], c=v, cmap="coolwarm_r", vmin=-lim, vmax=lim, s=6)
    fig.colorbar(sc, ax=ax0, label="f_v")
    ax0.set_title(f"attributions ({atlas.method})")
    ax1.set_xlim(0, grid)
    ax1.set_ylim(0, grid)
    ax1.set_title("atlas icons (border: f_v of icon)")
    cmap = plt.get_cmap("coolwarm_r")
    ilim = max((abs(x) for x in atlas.icon_values.values()), default=1.0) or 1.0
    for (r, c), img in atlas.icons.items():
        arr = image_array(img)
        ax1.imshow(arr, extent=(c + 0.05, c + 0.95, r + 0.05, r + 0.95), cmap=None if arr.ndim == 3 else "gray")
        col = cmap(0.5 + 0.5 * atlas.icon_values[(r, c)] / ilim)
        ax1.add_patch(plt.Rectangle((c + 0.05, r + 0.05), 0.9, 0.9, fill=False, edgecolor=col, lw=2))
    ax1.set_xticks([])
    ax1.set_yticks([])
    fig.tight_layout()
    return fig


# === masks: discovery ===
def discovery_candidate(images: Tensor, preview: Tensor, patches: Tensor | None = None, *, title: str = "") -> Any:
    """One discovered artifact candidate: its reference ``images (k, C, H, W)``, below them the localisation
    ``preview (k, 1, H, W)`` (in [0, 1]) overlaid in red, and its ``patches (k, C, p, p)`` (if any) in a third row."""
    plt = _plt()
    k = min(images.shape[0], preview.shape[0])
    rows = 2 if patches is None else 3
    fig, axes = plt.subplots(rows, k, figsize=(1.25 * k, 1.3 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j in range(k):
        img = image_array(images[j])
        axes[0, j].imshow(img, cmap=None if img.ndim == 3 else "gray")
        axes[1, j].imshow(img, cmap=None if img.ndim == 3 else "gray")
        heat = torch.zeros(*preview.shape[-2:], 4)
        heat[..., 0] = 1.0
        heat[..., 3] = 0.75 * preview[j, 0].detach().float().cpu().clamp(0, 1)
        axes[1, j].imshow(heat.numpy())
        if patches is not None and j < patches.shape[0]:
            p = image_array(patches[j])
            axes[2, j].imshow(p, cmap=None if p.ndim == 3 else "gray")
    axes[0, 0].set_title("reference", fontsize=7, loc="left")
    axes[1, 0].set_title("localisation", fontsize=7, loc="left")
    if patches is not None:
        axes[2, 0].set_title("patches", fontsize=7, loc="left")
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    return fig
