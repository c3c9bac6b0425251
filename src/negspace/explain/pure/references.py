"""PURE reference samples (paper 004): the ``n_ref`` samples of a dataset with the largest spatial-max
activation of a neuron, found for all neurons of a layer in one pass with a running top-k."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.batch import Data, iter_images
from negspace.explain.pure._common import check_neurons, data_keys, neuron_indices
from negspace.hooks import capture, eval_mode, get_layer, model_device, run_until
from negspace.reduce import summarize

__all__ = ["References", "reference_images", "reference_samples"]


@dataclass
class References:
    """Top-``n_ref`` reference samples of each neuron (by spatial-max activation).

    ``indices: (K, n_ref)`` positions of the samples in the order ``data`` yields them, best first;
    ``values: (K, n_ref)`` their spatial-max activations; ``neurons: (K,)`` channel indices.
    """

    layer: str
    neurons: Tensor
    indices: Tensor
    values: Tensor

    @property
    def n_ref(self) -> int:
        return int(self.indices.shape[1])


@torch.no_grad()
def reference_samples(
    model: nn.Module,
    layer: str,
    data: Data,
    *,
    n_ref: int = 100,
    neurons: int | Sequence[int] | Tensor | None = None,
    batch_size: int = 64,
    batch_keys: object = None,
    progress: bool = False,
    strict: bool = True,
    image_key: str | None = None,
) -> References:
    """Top-``n_ref`` samples per neuron of ``layer`` by spatial-max activation, in one pass over ``data``.

    All neurons are scored in the same forward pass (stopped at ``layer``) and a running top-k is kept, so
    memory is ``O(K · n_ref)`` whatever the dataset size. ``data``: a tensor ``(N, ...)`` or an iterable of
    batches (iterated once, in order; do not shuffle), read with ``batch_keys`` (:mod:`negspace.batch`).
    ``neurons=None`` means every channel. ``strict=False`` returns fewer than ``n_ref`` references when
    ``data`` is smaller (used per DDP shard). ``image_key=`` is the deprecated name of ``batch_keys={"image": ...}``.
    """
    keys = data_keys(batch_keys, image_key, "reference_samples")
    if not isinstance(n_ref, int) or isinstance(n_ref, bool) or n_ref < 1:
        raise ValueError(f"n_ref must be a positive int, got {n_ref!r}")
    get_layer(model, layer)
    sel = neuron_indices(neurons)
    device = model_device(model)
    vals = idx = None
    seen = 0
    with eval_mode(model), capture(model, layer, detach=True, stop_after=True) as cap:
        images = iter_images(data, keys, batch_size=batch_size, who="PURE")
        for x in tqdm(images, desc="PURE references", disable=not progress):
            run_until(model, x.to(device))
            m = summarize(cap.activations[layer], "max").float().cpu()  # (B, C)
            if sel is None:
                sel = torch.arange(m.shape[1])
            check_neurons(sel, m.shape[1], layer)
            m = m[:, sel].T  # (K, B)
            ids = torch.arange(seen, seen + m.shape[1]).expand_as(m)
            seen += m.shape[1]
            if vals is None:
                vals, idx = m, ids
            else:
                vals, idx = torch.cat([vals, m], 1), torch.cat([idx, ids], 1)
            if vals.shape[1] > n_ref:
                vals, pos = vals.topk(n_ref, dim=1)
                idx = idx.gather(1, pos)
    if vals is None or sel is None or idx is None:
        raise ValueError("data is empty")
    if seen < n_ref and strict:
        raise ValueError(f"n_ref={n_ref} is larger than the number of samples in data ({seen})")
    vals, pos = vals.sort(dim=1, descending=True)
    return References(layer=layer, neurons=sel.clone(), indices=idx.gather(1, pos), values=vals)


def reference_images(
    data: Data,
    indices: Sequence[int] | Tensor,
    *,
    batch_size: int = 64,
    batch_keys: object = None,
    image_key: str | None = None,
) -> Tensor:
    """Collect the samples at ``indices`` (positions in the order ``data`` yields them) → ``(n, ...)``."""
    keys = data_keys(batch_keys, image_key, "reference_images")
    idx = torch.as_tensor(indices, dtype=torch.long).flatten()
    if isinstance(data, Tensor):
        return data[idx]
    want = {int(i): p for p, i in enumerate(idx.tolist())}
    got: dict[int, Tensor] = {}
    seen = 0
    for x in iter_images(data, keys, batch_size=batch_size, who="PURE"):
        for j in range(x.shape[0]):
            if seen + j in want:
                got[seen + j] = x[j]
        seen += x.shape[0]
        if len(got) == len(want):
            break
    missing = sorted(set(want) - set(got))
    if missing:
        raise ValueError(f"data has no samples at positions {missing[:10]} (it yielded {seen})")
    return torch.stack([got[int(i)] for i in idx.tolist()])
