"""``VirtualNeurons`` callback (PURE, paper 004): fit virtual neurons on validation data, log their scores and
figures of the references per virtual neuron, and optionally route/ablate one meaning.

Thin glue around :func:`negspace.explain.pure.fit_virtual_neurons`, :func:`~negspace.explain.pure.
evaluate_virtual_neurons` (crops, CLIP distances) and :class:`negspace.editing.VirtualNeuronRouter`. Under
DDP each rank passes its validation shard; references and circuits are all-gathered, k-means runs on rank 0
and the centroids are broadcast (every rank holds the same edit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from negspace import plots
from negspace.batch import images_of
from negspace.callbacks.base import AnalysisCallback, deprecated_kwarg, log_scalars, progress_enabled
from negspace.callbacks.edit import bake_at_fit_end
from negspace.editing.router import MODES, VirtualNeuronRouter
from negspace.explain.pure import (
    VirtualNeuronSet,
    evaluate_virtual_neurons,
    fit_virtual_neurons,
    neuron_indices,
)
from negspace.hooks import get_layer

__all__ = ["VirtualNeurons"]

_FIT_AT = ("train_end", "validation_end")


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


def _epochs_of_fit_at(fit_at: object) -> int | None:
    """Deprecated ``fit_at`` → ``every_n_epochs``: ``"train_end"`` → None, epoch ``N`` → ``N + 1`` (refits every
    ``N + 1`` epochs), ``"validation_end"`` → 1 (every validation epoch, ``trainer.validate`` included)."""
    if fit_at == "train_end":
        return None
    if fit_at == "validation_end":
        return 1
    if isinstance(fit_at, int) and not isinstance(fit_at, bool) and fit_at >= 0:
        return fit_at + 1
    raise ValueError(f"fit_at must be one of {_FIT_AT} or a non-negative epoch int, got {fit_at!r}")


class VirtualNeurons(AnalysisCallback):
    """Split neurons of ``layer`` into PURE virtual neurons fitted on validation data.

    Args:
        layer: dotted name of the layer whose channels are split (``L``), relative to ``forward``.
        circuit_layer: dotted name of the layer below (``L−1``) on which circuits live.
        neurons: channel indices to split (``None`` = all).
        k: virtual neurons per channel (``int >= 2`` or ``"auto"`` = best silhouette in ``k_range``).
        n_ref: reference samples per neuron (top spatial-max activation).
        reduce: circuit seed, ``"relu"`` (the paper's code) or ``"max"`` (one-hot at the argmax) etc.
        every_n_epochs: ``None`` = fit once at the end of fit; ``N`` = refit every N-th validation epoch.
        edit: ``{"neuron": k, "virtual": j, "scale": 0.0}`` or a list of them: a :class:`VirtualNeuronRouter`
            active during validation/test/predict after fitting (``edit_mode``: ``"sample"`` or ``"position"``).
        make_permanent: at the end of fit, bake the router into the network in place (``negspace.editing.bake``:
            the routed layer becomes a ``RoutedLayer``/``RoutedBlock``, which adds state-dict keys; warns).
        adopt_checkpoint: a checkpoint whose router differs from ``edit``/``edit_mode`` is an error (naming both)
            unless this is ``True``, which takes the checkpoint's router explicitly.
        encoder: ``None`` (no embedding scores), an open_clip name (``"ViT-B-32"``, ``"tiny"``) loaded with
            ``pretrained`` (``"default"``: the model's pretrained tag from the local cache, a clear error when
            missing; ``None``: random weights, tests only), or a module with ``encode_image``: logs the CLIP inter/intra scores of PURE vs
            activation clustering and the distance correlations.
        figures: log a figure per reported neuron (rows: virtual neurons, columns: cropped references).
        max_report: neurons (the first ones) that get CLIP scores and figures.
        replicate_at: see :func:`negspace.explain.pure.circuit_rows` (a shortcut bypassing the circuit layer).
        batch_keys, forward, dataloader_idx, save_dir: the shared callback vocabulary.
        fit_at, image_key: deprecated names of ``every_n_epochs`` and ``batch_keys={"image": ...}``.

    Logged: ``pure/neuron_<k>/circuit_{inter,intra,separation}`` (circuit distances),
    ``circuit_{silhouette,silhouette_null,relative_separation}`` (is the split real; a warning at fit names the
    neurons whose split is arbitrary), and with an encoder
    ``pure/neuron_<k>/{clip_pure, clip_activation, polysemanticity, corr_pure, corr_activation}``.
    ``callback.result`` is the fitted :class:`~negspace.explain.pure.VirtualNeuronSet`; ``callback.scores`` the dict.
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
        reduce: str = "relu",
        fast: bool | str = "auto",
        every_n_epochs: int | None = None,
        edit: Mapping | Sequence[Mapping] | None = None,
        edit_mode: str = "sample",
        make_permanent: bool = False,
        adopt_checkpoint: bool = False,
        encoder: Any = None,
        pretrained: str | None = "default",
        crop_kernel: int = 5,
        crop_threshold: float = 0.01,
        figures: bool = True,
        n_show: int = 8,
        max_report: int = 8,
        batch_size: int = 64,
        batch_keys: Any = None,
        forward: str | None = None,
        dataloader_idx: int = 0,
        save_dir: str | None = None,
        seed: int = 0,
        replicate_at: str | None = None,
        fit_at: str | int | None = None,
        image_key: str | None = None,
    ) -> None:
        if fit_at is not None:
            deprecated_kwarg("VirtualNeurons", "fit_at", "every_n_epochs", fit_at, every_n_epochs)
            every_n_epochs = _epochs_of_fit_at(fit_at)
        batch_keys = deprecated_kwarg("VirtualNeurons", "image_key", "batch_keys",
                                      None if image_key is None else {"image": image_key}, batch_keys)
        super().__init__(every_n_epochs=every_n_epochs, batch_keys=batch_keys, forward=forward,
                         dataloader_idx=dataloader_idx, save_dir=save_dir)
        if edit_mode not in MODES:
            raise ValueError(f"edit_mode must be one of {MODES}, got {edit_mode!r}")
        if make_permanent not in (True, False) or (make_permanent and edit is None):
            raise ValueError(f"make_permanent must be True (needs edit=) or False, got {make_permanent!r} with edit={edit!r}")
        self.make_permanent, self.baked = make_permanent, False
        VirtualNeuronSet(layer, circuit_layer, k=k, k_range=k_range, reduce=reduce, fast=fast)  # validates options
        if isinstance(k, int) and k > n_ref:
            raise ValueError(f"k={k} is larger than n_ref={n_ref}")
        self.layer, self.circuit_layer = layer, circuit_layer
        sel = neuron_indices(neurons)
        self.neurons = None if sel is None else sel.tolist()
        self.k, self.n_ref, self.k_range, self.reduce, self.fast = k, n_ref, k_range, reduce, fast
        self.edits, self.edit_mode = _as_edits(edit), edit_mode
        self.adopt_checkpoint = bool(adopt_checkpoint)
        self.encoder, self.pretrained = encoder, pretrained
        self.crop_kernel, self.crop_threshold = crop_kernel, crop_threshold
        self.figures, self.n_show, self.max_report = figures, n_show, max_report
        self.batch_size, self.seed, self.replicate_at = batch_size, seed, replicate_at
        self.result: VirtualNeuronSet | None = None
        self.router: VirtualNeuronRouter | None = None
        self.scores: dict[str, float] = {}
        self.figure_paths: list[str] = []
        self._layout_checked = False

    # ------------------------------------------------------------------------------------- early checks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        net = self.network(pl_module)
        get_layer(net, self.layer)
        get_layer(net, self.circuit_layer)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._layout_checked and dataloader_idx == self.dataloader_idx:
            images_of(batch, self.batch_keys, who="VirtualNeurons")  # fails now, not after the fit
            self._layout_checked = True

    # ------------------------------------------------------------------------------------------ fitting
    def run(self, trainer: Trainer, pl_module: LightningModule, loader: Any) -> None:
        """Fit on the validation loader, log scores and figures, build the router (if ``edit``)."""
        self._remove_router()
        net = self.network(pl_module)
        vn = fit_virtual_neurons(
            net, self.layer, self.circuit_layer, loader, neurons=self.neurons, n_ref=self.n_ref, k=self.k,
            k_range=self.k_range, reduce=self.reduce, fast=self.fast, batch_size=self.batch_size, seed=self.seed,
            batch_keys=self.batch_keys, replicate_at=self.replicate_at, progress=progress_enabled(trainer),
        )
        self.result = vn
        scores: dict[str, float] = {}
        for n, (inter, intra) in vn.separation.items():
            pre = f"pure/neuron_{n}/"
            scores.update({pre + "circuit_inter": float(inter), pre + "circuit_intra": float(intra),
                           pre + "circuit_separation": float(inter - intra)})
        for n, (sil, null, rel) in vn.structure.items():  # is the split real? (vn.arbitrary(), warned at fit)
            pre = f"pure/neuron_{n}/"
            scores.update({pre + "circuit_silhouette": float(sil), pre + "circuit_silhouette_null": float(null),
                           pre + "circuit_relative_separation": float(rel)})
        if trainer.is_global_zero and (self.encoder is not None or self.figures):
            reports = evaluate_virtual_neurons(
                net, vn, loader, encoder=self.encoder, pretrained=self.pretrained, max_neurons=self.max_report,
                kernel_size=self.crop_kernel, threshold=self.crop_threshold, batch_size=self.batch_size,
                batch_keys=self.batch_keys, seed=self.seed, rank=0,
            )
            for rep in reports:
                scores.update({f"pure/neuron_{rep.neuron}/{name}": v for name, v in rep.scores.items()})
                if self.figures:
                    fig = plots.pure_virtual_neurons(rep.crops, rep.labels, rep.n_virtual, n_show=self.n_show,
                                                     title=f"{self.layer} neuron {rep.neuron}")
                    path = self.figure(trainer, f"pure/neuron_{rep.neuron}", fig, "pure")
                    if path is not None:
                        self.figure_paths.append(str(path))
        self.scores = scores
        log_scalars(trainer, pl_module, scores)  # not self.log: Lightning rebinds it to pl_module.log
        if self.edits:
            self.router = VirtualNeuronRouter(vn, self.edits, mode=self.edit_mode)

    # ------------------------------------------------------------------------------------------- router
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The router (if any) is active during validation, test and predict, and removed after each."""
        if self.router is not None and not self.router.active and not self.baked:
            self.router.apply(self.network(pl_module))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_router()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``make_permanent``: bake the router into the network (a RoutedLayer/RoutedBlock; docs/editing.md)."""
        if self.make_permanent and self.router is not None and not self.baked:
            self._remove_router()
            bake_at_fit_end(trainer, pl_module, self.router, forward=self.forward, who="VirtualNeurons")
            self.baked = True

    on_test_start = on_predict_start = on_validation_start
    on_test_end = on_predict_end = on_validation_end

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_router()

    def _remove_router(self) -> None:
        if self.router is not None:
            self.router.remove()

    # -------------------------------------------------------------------------------------------- state
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
        self.result = VirtualNeuronSet.from_state_dict(state_dict["virtual_neurons"])
        self.scores = dict(state_dict.get("scores", {}))
        if "router" in state_dict:
            saved = VirtualNeuronRouter.from_state_dict(state_dict["router"])
            if not self.adopt_checkpoint:
                _check_same_router(saved, self.edits, self.edit_mode)
            self._remove_router()
            self.router = saved


def _check_same_router(saved: VirtualNeuronRouter, edits: dict[int, dict[int, float]], mode: str) -> None:
    """A checkpoint's router must be the configured one; never adopt another edit silently."""
    configured = VirtualNeuronRouter(saved.vn, edits, mode=mode) if edits else None
    same = configured is not None and configured.mode == saved.mode and set(configured.scales) == set(saved.scales) and all(
        torch.equal(configured.scales[k], saved.scales[k]) for k in saved.scales
    )
    if not same:
        raise ValueError(
            f"VirtualNeurons: the checkpoint holds the edit {saved!r}, but this callback is configured with "
            f"edit={edits or None!r}, edit_mode={mode!r}. Pass the checkpoint's edit, or adopt_checkpoint=True to use "
            "the checkpoint's router explicitly"
        )
