"""``ArtifactInsertion``: does the model still react to a (discovered) artifact? Logged during validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from negspace.batch import collect_images
from negspace.callbacks.base import AnalysisCallback
from negspace.distributed import all_gather_object
from negspace.masks.verify import insertion_effect, load_patch

__all__ = ["ArtifactInsertion"]


def _pos_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ArtifactInsertion: {name} must be a positive int, got {value!r}")
    return value


class ArtifactInsertion(AnalysisCallback):
    """Paste ``patch`` into ``n_images`` validation images at ``n_positions`` random border positions each
    (:func:`negspace.masks.verify.insertion_effect`) and log the mean logit changes:
    ``<name>/excitation`` (class ``target``, the class the artifact "means": > 0 on a biased model),
    ``<name>/inhibition`` (mean over the other classes: < 0 on a biased model, the encoded absence of paper 000)
    and their absolute values ``<name>/abs_excitation``, ``<name>/abs_inhibition``. Debiasing should shrink both.

    Args:
        patch: the artifact ``(C, ph, pw)`` (in the images' value space), or a ``.safetensors`` / ``.pt`` file
            holding it (``negspace.masks.verify.save_patch``; read with ``weights_only=True``).
        target: class index the artifact stands for.
        dataloader_idx: validation loader (default 2: ``no_bias`` of the biased-split data modules, images
            without the artifact; use 0 for a data module with a single validation loader).
        every_n_epochs, batch_keys, forward, save_dir: as every analysis callback (``docs/callbacks.md``).

    ``callback.result`` holds the last result (without the positions). Under DDP each rank measures its own share
    of the loader and the logged values are the means over all ranks' images (``per_class`` stays the rank's).
    """

    def __init__(
        self,
        patch: Tensor | str,
        target: int,
        *,
        every_n_epochs: int | None = None,
        batch_keys: Any = None,
        forward: str | None = None,
        save_dir: str | None = None,
        n_images: int = 200,
        n_positions: int = 4,
        dataloader_idx: int = 2,
        seed: int = 0,
        name: str = "artifact",
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_keys=batch_keys, forward=forward,
                         dataloader_idx=dataloader_idx, save_dir=save_dir)
        if isinstance(patch, str | Path):
            patch = load_patch(patch)
        if not isinstance(patch, Tensor) or patch.dim() != 3:
            raise ValueError(f"ArtifactInsertion: patch must be a Tensor (C, ph, pw) or a file holding one, got "
                             f"{getattr(patch, 'shape', type(patch).__name__)}")
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise ValueError(f"ArtifactInsertion: target must be a class index >= 0, got {target!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"ArtifactInsertion: name must be a non-empty string, got {name!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"ArtifactInsertion: seed must be an int, got {seed!r}")
        self.patch = patch.detach().float().cpu()
        self.target = target
        self.n_images = _pos_int(n_images, "n_images")
        self.n_positions = _pos_int(n_positions, "n_positions")
        self.seed = seed
        self.name = name
        self.result: dict[str, Any] | None = None

    def run(self, trainer: Trainer, pl_module: LightningModule, loader: Any) -> None:
        x = collect_images(loader, self.batch_keys, max_images=self.n_images, who="ArtifactInsertion")
        res = insertion_effect(self.network(pl_module), x, self.patch, target=self.target,
                               n_positions=self.n_positions, seed=self.seed)
        # DDP: every rank measured its share of the loader; the logged values are the image-weighted means
        parts = all_gather_object((res["n_images"], res["excitation"], res["inhibition"]))
        n = sum(p[0] for p in parts)
        exc, inh = (sum(p[0] * p[i] for p in parts) / n for i in (1, 2))
        res.update(excitation=exc, inhibition=inh, abs_excitation=abs(exc), abs_inhibition=abs(inh), n_images=n)
        self.result = {k: v for k, v in res.items() if k != "positions"}
        keys = ("excitation", "inhibition", "abs_excitation", "abs_inhibition")
        self.log_metrics(trainer, pl_module, {f"{self.name}/{k}": res[k] for k in keys})
