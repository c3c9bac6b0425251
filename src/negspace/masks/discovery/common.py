"""What the discovery methods share: reading the data once, the layer's feature baseline, the two score factors
that make their scores comparable (localisation and consistency), and the choice of example images.

Score factors (each in [0, 1]):

* **localisation** ``L`` — :func:`concentration`: the Gini coefficient of a non-negative map (area-pooled to at
  most 16×16 so that image size does not matter): 0 for a uniform map, → 1 when the mass sits on a few pixels;
* **consistency** ``S`` — :func:`consistency`: the mean pairwise cosine similarity of ``k`` image patches in the
  layer's feature space (each patch fed on its own, its channels averaged over space, then standardised by the
  mean and standard deviation of random patches of the data), clipped at 0. Standardising makes "typical"
  patches (plain background) point nowhere in particular: only patches that share *unusual* content agree.
  Feature space, not pixels: a sticker of random colours at shifted positions is one concept for the network.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from negspace.attribution.engine import check_input
from negspace.batch import iter_batches
from negspace.explain.tension.patches import channel_values
from negspace.hooks import model_device
from negspace.masks.cav import layer_features, otsu_threshold

__all__ = ["Inputs", "concentration", "consistency", "normalize_maps", "peak_crops", "presence", "read_data", "split_examples"]

#: maps are area-pooled to at most this side before their Gini coefficient is taken
CONCENTRATION_SIZE = 16


@dataclass
class Inputs:
    """The data of one discovery run: images ``x (N, C, H, W)`` (CPU), ``labels (N,)`` or ``None``, the layer,
    the patch side, the feature baseline ``mu``/``sd`` ``(C_layer,)`` of random patches, and the run's settings."""

    x: Tensor
    labels: Tensor | None
    layer: str
    patch: int
    mu: Tensor
    sd: Tensor
    k: int
    n_examples: int
    chunk: int
    seed: int
    progress: bool
    _acts: Tensor | None = field(default=None, init=False, repr=False)

    def acts(self, model: nn.Module) -> Tensor:
        """Grid activations of the layer for every image, ``(N, C_layer, h, w)`` (computed once)."""
        if self._acts is None:
            self._acts = layer_features(model, self.layer, self.x.to(model_device(model)), batch_size=self.chunk).cpu()
        return self._acts


def read_data(data: Tensor | Iterable, batch_keys: object, max_images: int | None, who: str) -> tuple[Tensor, Tensor | None]:
    """Images ``(N, C, H, W)`` and labels ``(N,)`` (``None`` when the batches carry none) of the first
    ``max_images`` images of ``data`` (a tensor or an iterable of batches, read in order)."""
    xs: list[Tensor] = []
    ys: list[Tensor | None] = []
    n = 0
    for b in iter_batches(data, batch_keys, batch_size=max_images or 1024, who=who):
        xs.append(b.image.detach().cpu())
        ys.append(None if b.label is None else torch.as_tensor(b.label).detach().long().flatten().cpu())
        n += b.image.shape[0]
        if max_images is not None and n >= max_images:
            break
    if not xs:
        raise ValueError(f"{who}: data is empty")
    x = torch.cat(xs)[:max_images]
    check_input(x, "data")
    if x.dim() != 4:
        raise ValueError(f"{who}: images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if all(y is None for y in ys):
        return x, None
    if any(y is None for y in ys):
        raise ValueError(f"{who}: some batches carry labels and others do not")
    labels = torch.cat([y for y in ys if y is not None])[:max_images]
    if labels.shape != (x.shape[0],) or int(labels.min()) < 0:
        raise ValueError(f"{who}: labels must be one non-negative class index per image, got shape "
                         f"{tuple(labels.shape)} for {x.shape[0]} images")
    return x, labels


def features(model: nn.Module, layer: str, crops: Tensor, chunk: int) -> Tensor:
    """Layer channels of each crop fed on its own, averaged over space: ``crops (n, C, p, p)`` → ``(n, C_layer)``."""
    dev = model_device(model)
    return torch.cat([channel_values(model, layer, c.to(dev)).cpu() for c in crops.split(chunk)])


def random_crops(x: Tensor, size: int, n: int, generator: torch.Generator) -> Tensor:
    """``n`` random ``size×size`` crops of random images of ``x (N, C, H, W)`` → ``(n, C, size, size)``."""
    h, w = x.shape[-2:]
    img = torch.randint(0, x.shape[0], (n,), generator=generator)
    top = torch.randint(0, h - size + 1, (n,), generator=generator)
    left = torch.randint(0, w - size + 1, (n,), generator=generator)
    return torch.stack([x[i, :, t : t + size, q : q + size] for i, t, q in zip(img.tolist(), top.tolist(), left.tolist())])


def feature_baseline(model: nn.Module, layer: str, x: Tensor, size: int, chunk: int, seed: int) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation ``(C_layer,)`` of the features of 512 random ``size×size`` crops."""
    f = features(model, layer, random_crops(x, size, 512, torch.Generator().manual_seed(seed)), chunk)
    sd = f.std(0)
    return f.mean(0), sd.clamp_min(1e-6 * float(sd.max().clamp_min(1e-12)))


def concentration(maps: Tensor) -> Tensor:
    """Localisation of non-negative maps ``(B, ..., h, w)`` → ``(B,)`` in [0, 1]: the Gini coefficient of each map,
    area-pooled to at most 16×16 first. All-zero maps get 0."""
    m = maps.detach().float().cpu().reshape(maps.shape[0], 1, *maps.shape[-2:]).clamp_min(0)
    size = (min(m.shape[-2], CONCENTRATION_SIZE), min(m.shape[-1], CONCENTRATION_SIZE))
    if size != tuple(m.shape[-2:]):
        m = F.adaptive_avg_pool2d(m, size)
    f = m.flatten(1).sort(1).values
    n = f.shape[1]
    total = f.sum(1)
    i = torch.arange(1, n + 1, dtype=f.dtype)
    g = ((2 * i - n - 1) * f).sum(1) / (n * total).clamp_min(1e-30)
    return torch.where(total > 0, g, torch.zeros_like(g)).clamp(0, 1)


def consistency(model: nn.Module, inp: Inputs, crops: Tensor) -> Tensor:
    """Consistency of groups of patches ``crops (G, k, C, p, p)`` (or one group ``(k, C, p, p)``) → ``(G,)``:
    mean pairwise cosine similarity of their standardised features, clipped to [0, 1] (see the module doc)."""
    if crops.dim() == 4:
        crops = crops.unsqueeze(0)
    g, k = crops.shape[:2]
    if k < 2:
        return torch.zeros(g)
    z = (features(model, inp.layer, crops.flatten(0, 1), inp.chunk) - inp.mu) / inp.sd
    z = F.normalize(z.view(g, k, -1), dim=2)
    sim = z @ z.transpose(1, 2)
    off = (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / (k * (k - 1))
    return off.clamp(0, 1)


def normalize_maps(maps: Tensor, size: tuple[int, int] | None = None, *, blur: int = 1) -> Tensor:
    """Non-negative maps ``(B, 1, h, w)`` upsampled (bilinear) to ``size``, box-blurred (odd side ``blur``, for
    pixel-level attribution maps) and divided by their maximum → [0, 1]."""
    m = maps.detach().float().cpu().clamp_min(0)
    if size is not None and tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False).clamp_min(0)
    if blur > 1:
        b = blur | 1
        m = F.avg_pool2d(m, b, stride=1, padding=b // 2, count_include_pad=False)
    return m / m.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1, 1)


def peak_crops(x: Tensor, maps: Tensor, size: int) -> Tensor:
    """The ``size×size`` crop of each image ``x (k, C, H, W)`` where its map ``(k, 1, H, W)`` has the most mass."""
    mass = F.avg_pool2d(maps.float(), size, stride=1)  # (k, 1, H-size+1, W-size+1)
    w = mass.shape[-1]
    best = mass.flatten(1).argmax(1)
    tops, lefts = (best // w).tolist(), (best % w).tolist()
    return torch.stack([x[i, :, t : t + size, q : q + size] for i, (t, q) in enumerate(zip(tops, lefts))])


def presence(acts: Tensor, peaks: Tensor, ref: Tensor) -> Tensor:
    """How much each image carries what the reference images ``ref`` carry at the peaks of their maps
    ``peaks (k, 1, H, W)``: per image, the best cosine similarity over positions between its activation vector
    (``acts (N, C, h, w)``, standardised per channel) and the mean of the reference vectors at the peaks → ``(N,)``."""
    mu = acts.mean((0, 2, 3), keepdim=True)
    sd = acts.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    z = F.normalize((acts - mu) / sd, dim=1)
    small = F.adaptive_avg_pool2d(peaks, z.shape[-2:]).flatten(1).argmax(1)
    proto = F.normalize(z[ref[: len(small)]].flatten(2)[torch.arange(len(small)), :, small].mean(0), dim=0)
    return torch.einsum("nchw,c->nhw", z, proto).flatten(1).amax(1)


def split_examples(
    score: Tensor, labels: Tensor | None, class_index: int | None, inp: Inputs, *,
    pool: Tensor | None = None, reference: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Artifact and clean example indices from a per-image artifact score ``(N,)``.

    The images are split at Otsu's threshold of ``score``. Artifact examples (unless ``reference`` is given): the
    images of ``pool`` (default all) above it, highest first, at least ``k`` and at most ``n_examples``. Clean
    examples come from below a second, stricter threshold — Otsu's of the scores below the first, so that weak
    instances of the artifact (a second mode of ``score``) are not taken for clean images: the lowest-scoring
    ones of class ``class_index`` when there are at least ``k``, else of any class; then, if still fewer than
    ``k``, the lowest-scoring other images.
    """
    n = score.shape[0]
    score = score.float()
    thr = otsu_threshold(score)
    below = score[score <= thr]
    thr_clean = otsu_threshold(below) if below.numel() >= 2 else thr
    if reference is None:
        cand = torch.arange(n) if pool is None else pool
        cand = cand[score[cand].argsort(descending=True, stable=True)]
        n_ref = max(inp.k, min(int((score[cand] > thr).sum()), inp.n_examples))
        reference = cand[:n_ref]
    taken = torch.zeros(n, dtype=torch.bool)
    taken[reference] = True
    order = score.argsort(stable=True)
    low = order[~taken[order] & (score[order] <= thr_clean)]
    clean = low
    if class_index is not None and labels is not None:
        same = low[labels[low] == class_index]
        clean = same if len(same) >= inp.k else low
    if len(clean) < inp.k:
        rest = order[~taken[order]]
        clean = torch.cat([clean, rest[~torch.isin(rest, clean)]])
    return reference.long(), clean[: inp.n_examples].long()
