"""Discovery method ``"channels"``: channels of the layer whose most activating patches are nearly identical.

Per channel (paper 000 B.3 patch search, :func:`negspace.explain.tension.activating_patches`, windows of the
discovery patch side, stride half of it): its ``k`` most activating windows from ``k`` different images.

``score = L · S · R``:

* ``S`` — consistency of those ``k`` patches (:func:`.common.consistency`);
* ``L`` — localisation (:func:`.common.concentration`) of the channel's activation maps on the ``k`` images where
  it peaks highest;
* ``R`` — relevance: ``min(1, r / 0.1)`` with ``r`` the channel's activation×gradient contributions to the
  predicted logit (absolute, summed over space and all images) relative to the largest channel's. A channel with
  at least a tenth of the top channel's contribution counts as used (``R = 1``; relevance does not rank used
  channels, localisation and consistency do); below that its score shrinks in proportion, so a channel the model
  does not use scores low however clean its patches are.

Channels whose per-image peaks correlate (Pearson ≥ 0.8) carry one concept: they are grouped under the best one
(the leader, whose score and patches the candidate takes) when they score at least half as well; the group's
summed activation localises it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from negspace.attribution import layer_contributions
from negspace.explain.tension.patches import activating_patches
from negspace.hooks import model_device
from negspace.masks.cav import as_grid
from negspace.masks.discovery.candidate import Candidate
from negspace.masks.discovery.common import Inputs, concentration, consistency, normalize_maps, split_examples
from negspace.stats import pearson_columns

__all__ = ["GROUP_CORRELATION", "RELEVANCE_FLOOR", "channel_candidates", "channel_relevance"]

#: channels whose per-image peak activations correlate at least this much form one candidate
GROUP_CORRELATION = 0.8
#: relative relevance from which a channel counts as used by the model (relevance factor 1)
RELEVANCE_FLOOR = 0.1


def channel_relevance(model: nn.Module, inp: Inputs) -> Tensor:
    """``(C_layer,)`` in [0, 1]: each channel's summed |activation × gradient| for the predicted logit over all
    images, relative to the largest channel's."""
    dev = model_device(model)
    total: Tensor | None = None
    for xs in inp.x.split(inp.chunk):
        xs = xs.to(dev)
        with torch.no_grad():
            pred = model(xs).argmax(1)
        c = as_grid(layer_contributions(model, inp.layer, xs, pred, method="act_grad").detach(), inp.layer)
        part = c.abs().sum((2, 3)).sum(0).cpu()
        total = part if total is None else total + part
    if total is None:  # unreachable: the data are non-empty
        raise ValueError("channel_relevance: no images")
    return total / total.max().clamp_min(1e-30)


def _distinct(images: Tensor, k: int) -> Tensor:
    """Positions of the first ``k`` entries of ``images`` (K,) from distinct images (then repeats, if too few)."""
    seen: set[int] = set()
    sel: list[int] = []
    for j, i in enumerate(images.tolist()):
        if i not in seen:
            seen.add(i)
            sel.append(j)
        if len(sel) == k:
            break
    sel += [j for j in range(len(images)) if j not in sel][: k - len(sel)]
    return torch.tensor(sel)


def _groups(peaks: Tensor, score: Tensor) -> list[list[int]]:
    """Greedy grouping of channels, best ``score`` first: each group is the best channel left (the leader) and the
    channels left whose per-image peaks ``(N, C)`` correlate with its and that score at least half as well."""
    corr = torch.nan_to_num(pearson_columns(peaks, peaks), nan=0.0)
    order = score.argsort(descending=True, stable=True).tolist()
    used: set[int] = set()
    groups = []
    for c in order:
        if c in used:
            continue
        members = [m for m in order if m not in used and (m == c or (
            corr[c, m] >= GROUP_CORRELATION and score[m] >= 0.5 * score[c]))]
        used.update(members)
        groups.append(members)
    return groups


def channel_candidates(model: nn.Module, inp: Inputs, *, per_method: int) -> list[Candidate]:
    """The ``per_method`` best channel groups of ``inp.layer`` as candidates (see the module doc)."""
    x, k, p = inp.x, inp.k, inp.patch
    acts = inp.acts(model)  # (N, C, h, w)
    n_ch = acts.shape[1]
    stride = max(1, p // 2)
    n_win = x.shape[0] * ((x.shape[2] - p) // stride + 1) * ((x.shape[3] - p) // stride + 1)
    res = activating_patches(model, inp.layer, x.to(model_device(model)), patch_size=p, stride=stride,
                             k=min(n_win, 4 * k), chunk_size=max(inp.chunk, 256), progress=inp.progress)
    sel = torch.stack([_distinct(res.most_where[c, :, 0].cpu(), k) for c in range(n_ch)])  # (C, k)
    patches = torch.stack([res.most[c].cpu()[sel[c]] for c in range(n_ch)])  # (C, k, C_in, p, p)
    cons = consistency(model, inp, patches)
    peaks = acts.flatten(2).amax(2)  # (N, C)
    top = peaks.topk(k, dim=0).indices  # (k, C)
    loc = concentration(acts[top, torch.arange(n_ch)[None, :]].flatten(0, 1)).view(k, n_ch).mean(0)
    rel = (channel_relevance(model, inp) / RELEVANCE_FLOOR).clamp(max=1.0)
    score = loc * cons * rel
    out = []
    for group in _groups(peaks, score)[:per_method]:
        lead = group[0]
        per_image = acts[:, group].sum(1).flatten(1).amax(1)
        ref, _ = split_examples(per_image, inp.labels, None, inp)
        klass = None if inp.labels is None else int(inp.labels[ref].mode().values)
        ref, clean = split_examples(per_image, inp.labels, klass, inp, reference=ref)
        preview = normalize_maps(acts[ref[:k]][:, group].sum(1, keepdim=True), tuple(x.shape[-2:]))
        names = ", ".join(map(str, group[:6])) + (", ..." if len(group) > 6 else "")
        share = "" if klass is None else f", {float((inp.labels[ref] == klass).float().mean()):.0%} of them class {klass}"
        out.append(Candidate(
            kind="channels", score=float(score[lead]), layer=inp.layer, class_index=klass, channels=group, mode=None,
            reference_indices=ref, clean_indices=clean, preview=preview, patches=patches[lead],
            description=f"{len(group)} channel(s) [{names}] of {inp.layer} whose top patches agree; "
                        f"{len(ref)} reference images{share}",
            details={"localisation": float(loc[lead]), "consistency": float(cons[lead]),
                     "relevance": float(rel[lead]), "n_channels": float(len(group)), "n_reference": float(len(ref))},
        ))  # fmt: skip
    return out
