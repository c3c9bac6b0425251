"""``TensionReport``: the inhibitory side of chosen channels, measured on validation data (papers 001, 000)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from negspace.batch import collect_images, images_of, iter_batches
from negspace.callbacks.base import AnalysisCallback, log_scalars, progress_enabled
from negspace.explain.tension import check_channels, tension_report
from negspace.hooks import get_layer, model_device
from negspace.reduce import check_reduce

__all__ = ["TensionReport"]


def _image_key_form(batch_keys: Any) -> Any:
    """The 0.1 form ``batch_keys="x"`` / ``batch_keys=1`` (the image's key or index) → ``{"image": key}``."""
    if isinstance(batch_keys, str | int) and not isinstance(batch_keys, bool):
        warnings.warn(
            f"TensionReport(batch_keys={batch_keys!r}) as an image key is deprecated; use "
            f"batch_keys={{'image': {batch_keys!r}}}",
            DeprecationWarning,
            stacklevel=3,
        )
        return None if batch_keys == 0 else {"image": batch_keys}
    return batch_keys


class TensionReport(AnalysisCallback):
    """At the end of validation (every ``every_n_epochs`` epochs; ``None``: once, at the end of fit), for
    ``channels`` of ``layer`` — :func:`negspace.explain.tension.tension_report` on at most ``max_images``
    validation images of loader ``dataloader_idx``:

    * E± statistics of each channel as a feature ``f_v = neuron(layer, c, feature_reduce or reduce)`` attributed
      to ``attribution_layer`` (``None``: pixels) — logged as ``tension/<layer>/<c>/<stat>``. Default: the
      spatial mean (for a GAP classifier's last conv map, the logit); ``feature_reduce="center"`` is paper 001's
      central activation (measured on the green-pixel net in docs/tension.md);
    * most/least activating patches of every channel of ``layer`` (sliding window) and the patch-insertion test
      on the chosen channels — logged as ``tension/<layer>/<c>/{none,random,least,most,p_least,inhibited}`` and
      ``tension/<layer>/fraction_inhibited``; the table is also written as ``insertion_epoch<E>.json``;
    * one figure per channel (MEIs, MIIs, MTIs with their φ⁺/φ⁻ maps, least/most activating patches), sent to
      the loggers and saved as PNG (``figures=False`` to skip; φ maps normalised across images, paper 001).

    ``channels="important"``: the class-important channels of paper 000 B.3 (relative IG ``>= threshold``,
    computed with the validation labels).

    Files go to ``<save_dir or log_dir>/tension/`` (nothing is written without either). ``forward``: dotted name
    of the submodule that is the network (layers are named relative to it); ``batch_keys``: the batch layout
    (:mod:`negspace.batch`). ``callback.result`` holds ``{"stats", "tension", "insertion", "patches",
    "selections", "figures"}`` (figure paths). Runs on every rank with that rank's data; metrics are logged
    from rank 0.
    """

    def __init__(
        self,
        layer: str,
        channels: Sequence[int] | str,
        *,
        attribution_layer: str | None = None,
        reduce: str = "mean",
        feature_reduce: str | None = None,
        threshold: float = 0.05,
        every_n_epochs: int | None = 1,
        patch_size: int | Sequence[int] = 8,
        stride: int | Sequence[int] | None = None,
        k: int = 8,
        n_images: int = 50,
        max_images: int = 512,
        n_show: int = 4,
        alpha: float = 0.01,
        forward: str | None = None,
        batch_keys: Any = None,
        dataloader_idx: int = 0,
        save_dir: str | None = None,
        figures: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, batch_keys=_image_key_form(batch_keys), forward=forward,
                         dataloader_idx=dataloader_idx, save_dir=save_dir)  # fmt: skip
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a dotted name, got {layer!r}")
        important = channels == "important"
        self.layer, self.attribution_layer = layer, attribution_layer
        self.channels: list[int] | str = "important" if important else check_channels(channels)  # type: ignore[arg-type]
        check_reduce(reduce, who="TensionReport: reduce")
        if feature_reduce is not None:
            check_reduce(feature_reduce, who="TensionReport: feature_reduce")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"TensionReport: threshold (relative IG of a class-important channel) must be in [0, 1], "
                             f"got {threshold!r}")
        self.feature_reduce, self.threshold = feature_reduce, threshold
        self.reduce, self.patch_size, self.stride, self.k, self.n_images = reduce, patch_size, stride, k, n_images
        self.max_images, self.n_show, self.alpha = max_images, n_show, alpha
        self.figures, self.seed = figures, seed
        self.result: dict[str, Any] | None = None
        self.epochs_run = 0
        self._summary: dict[str, float] = {}
        self._batch_checked = False

    # ------------------------------------------------------------------------------------ fail early
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        net = self.network(pl_module)
        for name in (self.layer, self.attribution_layer):
            if name is not None:
                get_layer(net, name)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._batch_checked and dataloader_idx == self.dataloader_idx:
            images_of(batch, self.batch_keys, who="TensionReport")
            if self.channels == "important":  # the labels are needed: fail now, not after the fit
                next(iter_batches([batch], self.batch_keys, require=("image", "label"), who="TensionReport"))
            self._batch_checked = True

    # ---------------------------------------------------------------------------------------- run
    def run(self, trainer: Trainer, pl_module: LightningModule, loader: Any) -> None:
        net = self.network(pl_module)
        labels = None
        if self.channels == "important":
            xs, ys, n = [], [], 0
            for b in iter_batches(loader, self.batch_keys, require=("image", "label"), who="TensionReport"):
                xs.append(b.image.detach())
                ys.append(b.label.detach())
                n += b.image.shape[0]
                if n >= self.max_images:
                    break
            x, labels = torch.cat(xs)[: self.max_images], torch.cat(ys)[: self.max_images].to(model_device(net))
        else:
            x = collect_images(loader, self.batch_keys, max_images=self.max_images, who="TensionReport")
        x = x.clone().to(model_device(net))
        result = tension_report(
            net, self.layer, self.channels, x, attribution_layer=self.attribution_layer, reduce=self.reduce,
            feature_reduce=self.feature_reduce, labels=labels, threshold=self.threshold,
            patch_size=self.patch_size, stride=self.stride, k=self.k, n_images=self.n_images, n_show=self.n_show,
            alpha=self.alpha, seed=self.seed, progress=progress_enabled(trainer),
        )  # fmt: skip
        epoch = trainer.current_epoch
        self.result, result["figures"] = result, []
        self.epochs_run += 1
        self._summary = {
            f"tension/{self.layer}/{c}/{name}": float(v) for c, stats in result["stats"].items() for name, v in stats.items()
        }
        self._summary[f"tension/{self.layer}/fraction_inhibited"] = float(result["insertion"].fraction_inhibited)
        # AnalysisCallback.log is shadowed: Lightning assigns callback.log = pl_module.log on every callback
        log_scalars(trainer, pl_module, self._summary)
        if not trainer.is_global_zero:
            return
        out = self.files_dir(trainer, "tension")
        if out is not None:
            ins = result["insertion"]
            out.mkdir(parents=True, exist_ok=True)
            table = {"table": ins.table, "per_channel": ins.per_channel, "fraction_inhibited": ins.fraction_inhibited}
            (out / f"insertion_epoch{epoch}.json").write_text(json.dumps(table, indent=1))
        if self.figures:
            from negspace.plots import tension_channel_figure

            for c in result["tension"]:
                fig = tension_channel_figure(x, result["tension"][c], result["selections"][c], result["patches"], c,
                                             n_show=self.n_show, title=f"{self.layer}:{c} epoch {epoch}")  # fmt: skip
                path = self.figure(trainer, f"tension/{self.layer}_{c}_epoch{epoch}", fig, "tension")
                if path is not None:
                    result["figures"].append(str(path))

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"epochs_run": self.epochs_run, "summary": dict(self._summary)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs_run = int(state_dict.get("epochs_run", 0))
        self._summary = {str(k): float(v) for k, v in state_dict.get("summary", {}).items()}
