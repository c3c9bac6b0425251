"""Just Train Twice (Liu et al. 2021): train an identification model for T epochs, collect its training errors,
then train again with the error set upweighted by ``λ_up`` (the paper upsamples it ``λ_up`` times)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from negspace.batch import BatchKeys, Data, iter_batches
from negspace.hooks import eval_mode, model_device

__all__ = ["error_set", "jtt_weights"]


@torch.no_grad()
def error_set(
    model: Callable[[Tensor], Tensor], data: Data, batch_keys: object = None, *, index_key: str = "index",
) -> Tensor:
    """Sorted ids (``batch[index_key]``) of the samples ``model`` misclassifies (argmax ≠ label), in eval mode.

    ``data``: an iterable of dict batches carrying ``index_key`` (e.g. the biased-split data modules' ``index``).
    """
    keys = BatchKeys(batch_keys)
    out: list[Tensor] = []
    net = model if isinstance(model, torch.nn.Module) else None
    device = model_device(net) if net is not None else torch.device("cpu")
    ctx = eval_mode(net) if net is not None else torch.no_grad()
    with ctx:
        for raw in data:
            if not isinstance(raw, dict) or index_key not in raw:
                raise ValueError(f"JTT needs dict batches with an {index_key!r} key (sample ids), got "
                                 f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
            b = next(iter(iter_batches([raw], keys, require=("image", "label"), who="JTT")))
            pred = model(b.image.to(device)).argmax(1).cpu()
            wrong = pred != b.label.cpu().long()  # type: ignore[union-attr]  # label required above
            out.append(torch.as_tensor(raw[index_key]).cpu().long()[wrong])
    return torch.cat(out).unique() if out else torch.zeros(0, dtype=torch.long)


def jtt_weights(ids: Tensor, errors: Tensor, lam_up: float) -> Tensor:
    """``(B,)`` weights of a batch with sample ids ``ids``: ``λ_up`` for ids in ``errors``, 1 otherwise."""
    if not lam_up >= 1:
        raise ValueError(f"lam_up must be >= 1, got {lam_up!r}")
    hit = torch.isin(ids.long().cpu(), errors.long().cpu())
    return torch.where(hit, torch.tensor(float(lam_up)), torch.tensor(1.0))
