"""``VirtualNeurons`` callback (PURE, paper 004): fit virtual neurons on validation data, log scores, save
figures of the reference samples per virtual neuron, and optionally route/ablate one meaning.

Thin glue around :mod:`negspace.editing.pure` (fitting, router) and :mod:`negspace.editing.embeddings`
(crops, CLIP distances). Under DDP each rank passes its validation shard; references and circuits are
all-gathered, k-means runs on rank 0 and the centroids are broadcast (every rank holds the same edit).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from negspace.callbacks.base import output_dir
from negspace.editing import pure as P

__all__ = ["VirtualNeurons"]

WHEN = ("train_end", "validation_end")


def _as_edits(edit: Mapping | Sequence[Mapping] | None) -> dict[int, dict[int, float]]:
    if edit is None:
        return {}
    items = [edit] if isinstance(edit, Mapping) else list(edit)
    out: dict[int, dict[int, float]] = {}
    for e in items:
        if not isinstance(e, Mapping) or not {"neuron", "virtual"} <= set(e):
            raise ValueError(f"edit must be {{'neuron': k, 'virtual': j, 'scale': 0.0}} (or a list of them), got {e!r}")
        out.setdefault(int(e["neuron"]), {})[int(e["virtual"])] = float(e.get("scale", 0.0))
    return out


class VirtualNeurons(L.Callback):
    """Split neurons of ``layer`` into PURE virtual neurons fitted on validation data.

    Args:
        layer: dotted name of the layer whose channels are split (``L``).
        circuit_layer: dotted name of the layer below (``L−1``) on which circuits live.
        neurons: channel indices to split (``None`` = all).
        k: virtual neurons per channel (``int >= 2`` or ``"auto"`` = best silhouette in ``k_range``).
        n_ref: reference samples per neuron (top spatial-max activation).
        fit_at: ``"train_end"`` (default), ``"validation_end"`` (end of ``trainer.validate``) or an int epoch
            ``N`` (end of the validation epoch N during fit).
        edit: ``{"neuron": k, "virtual": j, "scale": 0.0}`` or a list of them: a
            :class:`~negspace.editing.pure.VirtualNeuronRouter` active during validation/test/predict after
            fitting (``edit_mode``: ``"sample"`` or ``"position"``).
        encoder: ``None`` (no embedding scores), an open_clip name (``"ViT-B-32"``, ``"tiny"``) loaded with
            ``pretrained``, or a module with ``encode_image``. Embeds attribution-cropped references and logs
            the CLIP inter/intra scores of PURE vs activation clustering and the distance correlations.
        figures: save ``<log_dir>/pure/neuron_<k>.png`` (rows: virtual neurons, columns: cropped references).
        max_report: neurons (the first ones) that get CLIP scores and figures.
        replicate_at: see :func:`negspace.editing.pure.circuit_rows` (a shortcut bypassing the circuit layer).

    Logged: ``pure/neuron_<k>/circuit_separation`` (inter − intra distance of circuits), and with an encoder
    ``pure/neuron_<k>/{clip_pure, clip_activation, polysemanticity, corr_pure, corr_activation}``.
    ``callback.result`` is the fitted :class:`negspace.editing.VirtualNeurons`; ``callback.scores`` the dict.
    """

    def __init__(
        self,
        layer: str,
        circuit_layer: str,
        neurons: int | Sequence[int] | None = None,
        k: int | str = 2,
        *,
        n_ref: int = 100,
        k_range: tuple[int, int] = (2, 5),
        reduce: str = "max",
        fast: bool | str = "auto",
        fit_at: str | int = "train_end",
        edit: Mapping | Sequence[Mapping] | None = None,
        edit_mode: str = "sample",
        encoder: Any = None,
        pretrained: str | None = None,
        crop_kernel: int = 5,
        crop_threshold: float = 0.01,
        figures: bool = True,
        n_show: int = 8,
        max_report: int = 8,
        batch_size: int = 64,
        image_key: str = "image",
        dataloader_idx: int = 0,
        seed: int = 0,
        replicate_at: str | None = None,
    ) -> None:
        super().__init__()
        if not (fit_at in WHEN or (isinstance(fit_at, int) and not isinstance(fit_at, bool) and fit_at >= 0)):
            raise ValueError(f"fit_at must be one of {WHEN} or a non-negative epoch int, got {fit_at!r}")
        if edit_mode not in P.MODES:
            raise ValueError(f"edit_mode must be one of {P.MODES}, got {edit_mode!r}")
        P.VirtualNeurons(layer, circuit_layer, k=k, k_range=k_range, reduce=reduce, fast=fast)  # validates options
        self.layer, self.circuit_layer = layer, circuit_layer
        self.neurons = None if neurons is None else P._as_neuron_list(neurons).tolist()
        self.k, self.n_ref, self.k_range, self.reduce, self.fast = k, n_ref, k_range, reduce, fast
        if isinstance(k, int) and k > n_ref:
            raise ValueError(f"k={k} is larger than n_ref={n_ref}")
        self.fit_at, self.edits, self.edit_mode = fit_at, _as_edits(edit), edit_mode
        self.encoder, self.pretrained = encoder, pretrained
        self.crop_kernel, self.crop_threshold = crop_kernel, crop_threshold
        self.figures, self.n_show, self.max_report = figures, n_show, max_report
        self.batch_size, self.image_key, self.dataloader_idx, self.seed = batch_size, image_key, dataloader_idx, seed
        self.replicate_at = replicate_at
        self.result: P.VirtualNeurons | None = None
        self.router: P.VirtualNeuronRouter | None = None
        self.scores: dict[str, float] = {}
        self.figure_paths: list[str] = []

    # ----------------------------------------------------------------------------------------- fitting
    def _val_loader(self, trainer: L.Trainer) -> Any:
        loaders = trainer.val_dataloaders
        if loaders is None:
            raise RuntimeError("VirtualNeurons fits on validation data, but the trainer has no val dataloader")
        if isinstance(loaders, Sequence):
            return loaders[self.dataloader_idx]
        if isinstance(loaders, Mapping):
            return list(loaders.values())[self.dataloader_idx]
        return loaders

    def fit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> P.VirtualNeurons:
        """Fit on the validation dataloader now (also callable by hand)."""
        self._remove_router()
        data = self._val_loader(trainer)
        with torch.inference_mode(False), torch.enable_grad():
            vn = P.fit_virtual_neurons(
                pl_module, self.layer, self.circuit_layer, data, neurons=self.neurons, n_ref=self.n_ref, k=self.k,
                k_range=self.k_range, reduce=self.reduce, fast=self.fast, batch_size=self.batch_size, seed=self.seed,
                image_key=self.image_key, replicate_at=self.replicate_at,
            )
            self.result = vn
            self.scores = self._circuit_scores(vn)
            if trainer.is_global_zero and (self.encoder is not None or self.figures):
                self._report(trainer, pl_module, vn, data)
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(self.scores, step=trainer.global_step)
        if self.edits:
            self.router = P.VirtualNeuronRouter(vn, self.edits, mode=self.edit_mode)
        return vn

    def _circuit_scores(self, vn: P.VirtualNeurons) -> dict[str, float]:
        """PURE-space polysemanticity: inter/intra Euclidean distances of the clustered reference circuits."""
        scores = {}
        for n, (inter, intra) in vn.separation.items():
            pre = f"pure/neuron_{n}/"
            scores.update({pre + "circuit_inter": float(inter), pre + "circuit_intra": float(intra),
                           pre + "circuit_separation": float(inter - intra)})
        return scores

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, vn: P.VirtualNeurons, data: Any) -> None:
        from negspace.editing import embeddings as E

        refs, ranks = vn.references, vn.reference_ranks
        if refs is None or ranks is None:
            return
        encoder = self.encoder
        if isinstance(encoder, str):
            from negspace.models.clip import load_clip

            encoder = load_clip(encoder, pretrained=self.pretrained)[0]
        device = P._model_device(pl_module)
        for row, n in enumerate(vn.neurons[: self.max_report]):
            mine = ranks[row] == 0  # under DDP only rank 0's own references can be shown
            if not bool(mine.any()):
                continue
            idx, lab = refs.indices[row][mine], vn.labels[n][mine]
            x = E.reference_images(data, idx, batch_size=self.batch_size, image_key=self.image_key).to(device)
            crops = E.crop_references(pl_module, self.layer, x, n, kernel_size=self.crop_kernel,
                                      threshold=self.crop_threshold, reduce=self.reduce)
            if encoder is not None and len(idx) >= 3:
                emb = E.embed(crops.cpu(), encoder)
                c = P.circuits(pl_module, self.layer, self.circuit_layer, x, n, reduce=self.reduce, fast=self.fast)
                act = E.activation_vectors(pl_module, self.layer, x, reduce=self.reduce)
                k = vn.n_virtual(n)
                if len(idx) > k:
                    res = E.compare_clusterings(emb, c.detach().cpu(), act.cpu(), pure_labels=lab, k=k, seed=self.seed)
                    pre = f"pure/neuron_{n}/"
                    self.scores.update({
                        pre + "clip_pure": res["pure"]["score"],
                        pre + "clip_activation": res["activation"]["score"],
                        pre + "polysemanticity": res["embedding"]["score"],
                        pre + "corr_pure": res["corr_pure"],
                        pre + "corr_activation": res["corr_activation"],
                    })
            if self.figures:
                self.figure_paths.append(self._figure(trainer, n, crops.detach().cpu(), lab, vn.n_virtual(n)))

    def _figure(self, trainer: L.Trainer, n: int, crops: torch.Tensor, labels: torch.Tensor, n_virtual: int) -> str:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        cols = self.n_show
        fig, axes = plt.subplots(n_virtual, cols, figsize=(1.2 * cols, 1.3 * n_virtual), squeeze=False)
        for j in range(n_virtual):
            members = crops[labels == j][:cols]
            for c in range(cols):
                ax = axes[j][c]
                ax.axis("off")
                if c < len(members):
                    img = members[c].float()
                    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
                    if img.shape[0] == 1:
                        ax.imshow(img[0].numpy(), cmap="gray")
                    else:  # first three channels as RGB (two-channel inputs get an empty blue channel)
                        rgb = torch.cat([img[:3], torch.zeros(max(0, 3 - img.shape[0]), *img.shape[1:])])
                        ax.imshow(rgb.permute(1, 2, 0).numpy())
            axes[j][0].set_title(f"virtual {j} ({int((labels == j).sum())})", fontsize=7, loc="left")
        fig.suptitle(f"{self.layer} neuron {n}", fontsize=9)
        fig.tight_layout()
        folder = str(output_dir(trainer, "pure"))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"neuron_{n}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    # ------------------------------------------------------------------------------------------- hooks
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not isinstance(self.fit_at, int) or self.result is not None:
            return
        if trainer.state.fn == "fit" and trainer.current_epoch == self.fit_at:
            self.fit(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fit_at == "train_end":
            self.fit(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fit_at == "validation_end" and trainer.state.fn == "validate":
            self._remove_router()
            self.fit(trainer, pl_module)
        else:
            self._remove_router()

    def _apply_router(self, pl_module: L.LightningModule) -> None:
        if self.router is not None and not self.router.active:
            self.router.apply(pl_module)

    def _remove_router(self, *_: Any) -> None:
        if self.router is not None:
            self.router.remove()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply_router(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply_router(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_router()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply_router(pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_router()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_router()

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Tensors, floats and strings only (checkpoints load with ``weights_only=True``)."""
        if self.result is None:
            return {}
        state: dict[str, Any] = {"virtual_neurons": self.result.state_dict(), "scores": dict(self.scores)}
        if self.router is not None:
            state["router"] = self.router.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.result = P.VirtualNeurons.from_state_dict(state_dict["virtual_neurons"])
        self.scores = dict(state_dict.get("scores", {}))
        if "router" in state_dict:
            self._remove_router()
            self.router = P.VirtualNeuronRouter.from_state_dict(state_dict["router"])
        if self.fit_at == "validation_end":
            rank_zero_warn("VirtualNeurons: loaded a fitted state; fit_at='validation_end' will refit on validate")
