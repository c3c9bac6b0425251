"""Discovery method ``"codec"``: CODEC modes of a class whose reference images share a localised region.

CODEC (paper 002) is fitted on the discovery images (:func:`negspace.explain.codec.fit_codec`: integrated
contributions of the layer to the top softmax output, a contribution SAE, mode–class correlations). For every
class, its most correlated modes (distinct channel sets, ``modes_per_class``) are candidates; a mode's reference
images are the images of the class where it loads most. Their contribution maps through the mode's top channels
(:func:`negspace.explain.codec.contribution_map` for the class logit, ``split="sum"``; summed over colour, positive
part, box-blurred) are the preview. Clean images are those least like the references at the layer
(:func:`.common.presence`): a mode splits a class, so a low loading does not mean the artifact is absent.

``score = L · S``: ``L`` the mean localisation of the maps, ``S`` the consistency of the crops at their peaks
(:mod:`.common`).
"""

from __future__ import annotations

import warnings

from torch import nn

from negspace.explain.codec import contribution_map, fit_codec
from negspace.hooks import model_device
from negspace.masks.discovery.candidate import Candidate
from negspace.masks.discovery.common import (
    Inputs,
    concentration,
    consistency,
    normalize_maps,
    peak_crops,
    presence,
    split_examples,
)

__all__ = ["codec_candidates"]


def codec_candidates(model: nn.Module, inp: Inputs, *, per_method: int, num_classes: int, modes_per_class: int = 3,
                     percent: float = 10.0, steps: int = 1000) -> list[Candidate]:
    """The ``per_method`` best CODEC modes as candidates (see the module doc). ``percent``: share of the layer's
    channels that make a mode's map; ``steps``: SAE training steps."""
    x, y, k = inp.x, inp.labels, inp.k
    if y is None:  # checked by discover_artifacts
        raise ValueError("the 'codec' method needs labelled data")
    batches = list(zip(x.split(inp.chunk), y.split(inp.chunk)))
    with warnings.catch_warnings():  # modes are ranked within a class; class structure beyond chance is not needed
        warnings.filterwarnings("ignore", message=".*no better than that of the untrained SAE", category=UserWarning)
        _, fitted = fit_codec(model, batches, inp.layer, num_classes=num_classes, baseline=False,
                              progress=inp.progress, steps=steps, seed=inp.seed, statistics=False)
    lm = fitted[inp.layer]
    dev = model_device(model)
    out = []
    for c in sorted(set(y.tolist())):
        in_class = (y == c).nonzero()[:, 0]
        seen: set[tuple[int, ...]] = set()
        for m in lm.correlation[:, c].argsort(descending=True, stable=True).tolist():
            if len(seen) >= modes_per_class or float(lm.correlation[m, c]) <= 0:
                break
            ch = lm.channels(c, percent, mode=m).tolist()
            loads = lm.loadings[:, m]
            if tuple(ch) in seen or int((loads[in_class] > 0).sum()) < k:
                continue
            seen.add(tuple(ch))
            ref, _ = split_examples(loads, y, c, inp, pool=in_class)
            xr = x[ref[:k]]
            net = contribution_map(model, inp.layer, xr.to(dev), c, ch, part="net", split="sum", softmax=False)
            maps = net.detach().sum(1, keepdim=True).clamp_min(0).cpu()
            preview = normalize_maps(maps, blur=inp.patch // 2)
            loc = float(concentration(maps).mean())
            cons = float(consistency(model, inp, peak_crops(xr, preview, inp.patch))[0])
            _, clean = split_examples(presence(inp.acts(model), preview, ref), y, c, inp, reference=ref)
            out.append(Candidate(
                kind="codec", score=loc * cons, layer=inp.layer, class_index=c, channels=ch, mode=m,
                reference_indices=ref, clean_indices=clean, preview=preview,
                patches=peak_crops(xr, preview, inp.patch),
                description=f"CODEC mode {m} of class {c} (correlation {float(lm.correlation[m, c]):.2f}, channels "
                            f"{ch}); {len(ref)} reference images",
                details={"localisation": loc, "consistency": cons, "correlation": float(lm.correlation[m, c]),
                         "n_reference": float(len(ref))},
                modes=lm,
            ))  # fmt: skip
    return sorted(out, key=lambda cand: -cand.score)[:per_method]
