"""``TensionReport``: the inhibitory side of chosen channels, measured on validation data (papers 001, 000)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from negspace.callbacks.base import output_dir
from negspace.explain.tension import (
    InsertionResult,
    PatchResult,
    TensionResult,
    activating_patches,
    collect_images,
    insertion_test,
    select_images,
    select_mti,
    tension_stats,
)
from negspace.hooks import get_layer
from negspace.objectives import neuron

__all__ = ["TensionReport"]


class TensionReport(L.Callback):
    """At the end of validation (every ``every_n_epochs`` epochs), for ``channels`` of ``layer``:

    * E± statistics of each channel as a feature ``f_v = neuron(layer, c, reduce)`` attributed to
      ``attribution_layer`` (``None``: pixels) — logged as ``tension/<layer>/<c>/<stat>``;
    * most/least activating patches of every channel of ``layer`` (sliding window) and the patch-insertion test
      on the chosen channels — logged as ``tension/<layer>/<c>/{none,random,least,most,p_least}`` and
      ``tension/<layer>/fraction_inhibited``; the table is also written as JSON;
    * one PNG per channel (MEIs, MIIs, MTIs with their φ⁺/φ⁻ maps, least/most activating patches) in the
      logger's ``log_dir`` (``figures=False`` to skip).

    Uses at most ``max_images`` validation images of loader ``dataloader_idx``. ``forward``: dotted name of the
    submodule of the LightningModule that is the network (layers are named relative to it; default: the module
    itself). ``batch_keys``: key/index of the image in a batch (default ``"image"`` for dicts, 0 for tuples).
    ``callback.result`` holds ``{"stats", "tension", "insertion", "patches", "selections", "figures"}``.
    Runs on every rank with that rank's data; metrics are logged with ``rank_zero_only``.
    """

    def __init__(
        self,
        layer: str,
        channels: Sequence[int],
        *,
        attribution_layer: str | None = None,
        reduce: str = "mean",
        every_n_epochs: int = 1,
        patch_size: int | Sequence[int] = 8,
        stride: int | Sequence[int] | None = None,
        k: int = 8,
        n_images: int = 50,
        max_images: int = 512,
        n_show: int = 4,
        alpha: float = 0.01,
        forward: str | None = None,
        batch_keys: str | int | None = None,
        dataloader_idx: int = 0,
        figures: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a dotted name, got {layer!r}")
        chans = [channels] if isinstance(channels, int) else list(channels)
        if not chans or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chans):
            raise ValueError(f"channels must be a non-empty list of non-negative ints, got {channels!r}")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        self.layer, self.channels, self.attribution_layer = layer, chans, attribution_layer
        self.reduce, self.every_n_epochs = reduce, every_n_epochs
        self.patch_size, self.stride, self.k, self.n_images = patch_size, stride, k, n_images
        self.max_images, self.n_show, self.alpha = max_images, n_show, alpha
        self.forward, self.batch_keys, self.dataloader_idx = forward, batch_keys, dataloader_idx
        self.figures, self.seed = figures, seed
        self.result: dict[str, Any] | None = None
        self.epochs_run = 0
        self._summary: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ lightning
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        loaders = trainer.val_dataloaders
        loader = loaders[self.dataloader_idx] if isinstance(loaders, list | tuple) else loaders
        if loader is None:
            return
        net = pl_module if self.forward is None else get_layer(pl_module, self.forward)
        key = 0 if self.batch_keys is None else self.batch_keys
        # validation hooks run under inference_mode; attributions need autograd and normal tensors
        with torch.inference_mode(False), torch.enable_grad():
            x = collect_images(loader, max_images=self.max_images, batch_key=key).clone().to(pl_module.device)
            result = self.analyse(net, x)
        self.result = result
        self.epochs_run += 1
        self._summary = {}
        for c, stats in result["stats"].items():
            for name, v in stats.items():
                self._summary[f"tension/{self.layer}/{c}/{name}"] = float(v)
        self._summary[f"tension/{self.layer}/fraction_inhibited"] = float(result["insertion"].fraction_inhibited)
        for name, v in self._summary.items():
            pl_module.log(name, v, rank_zero_only=True)
        if self.figures and trainer.is_global_zero:
            out = output_dir(trainer, "tension")
            result["figures"] = self._save(out, x, result, trainer.current_epoch)

    # --------------------------------------------------------------------------------------- functional
    def analyse(self, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
        """Run the whole analysis on ``x: (N, C, H, W)`` (no Lightning needed)."""
        stats: dict[int, dict[str, float]] = {}
        tens: dict[int, TensionResult] = {}
        selections: dict[int, dict[str, list[int]]] = {}
        for c in self.channels:
            t = tension_stats(model, self.attribution_layer, x, neuron(self.layer, c, self.reduce))
            tens[c] = t
            stats[c] = t.stats()
            selections[c] = {
                "mei": select_images(t.f, self.n_show).tolist(),
                "mii": select_images(t.f, self.n_show, largest=False).tolist(),
                "mti": select_mti(t, self.n_show).tolist(),
            }
        patches: PatchResult = activating_patches(
            model, self.layer, x, patch_size=self.patch_size, stride=self.stride, k=self.k, reduce=self.reduce,
            progress=False,
        )  # fmt: skip
        ins: InsertionResult = insertion_test(
            model, self.layer, x, patches, channels=self.channels, n_images=self.n_images, alpha=self.alpha,
            reduce=self.reduce, seed=self.seed, progress=False,
        )  # fmt: skip
        for row in ins.per_channel:
            c = row["channel"]
            stats[c].update({m: row[m] for m in ("none", "random", "least", "most", "p_least")})
            stats[c]["inhibited"] = float(row["inhibited"])
        return {"stats": stats, "tension": tens, "insertion": ins, "patches": patches,
                "selections": selections, "figures": []}  # fmt: skip

    def _save(self, out: Path, x: torch.Tensor, result: dict[str, Any], epoch: int) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out.mkdir(parents=True, exist_ok=True)
        ins: InsertionResult = result["insertion"]
        table = {"table": ins.table, "per_channel": ins.per_channel, "fraction_inhibited": ins.fraction_inhibited}
        (out / f"insertion_epoch{epoch}.json").write_text(json.dumps(table, indent=1))
        paths = []
        patches: PatchResult = result["patches"]
        for c in self.channels:
            t: TensionResult = result["tension"][c]
            sel = result["selections"][c]
            rows = [(name, sel[name]) for name in ("mei", "mii", "mti") if sel[name]]
            n_col = max(self.n_show, self.k)
            fig, axes = plt.subplots(len(rows) * 2 + 2, n_col, figsize=(1.3 * n_col, 1.3 * (len(rows) * 2 + 2)), squeeze=False)
            for ax in axes.flat:
                ax.axis("off")
            for r, (name, idx) in enumerate(rows):
                for j, i in enumerate(idx[:n_col]):
                    axes[2 * r, j].imshow(_to_rgb(x[i]))
                    axes[2 * r, j].set_title(f"{name} f={float(t.f[i]):.2g}", fontsize=6)
                    if t.phi_plus is not None:
                        axes[2 * r + 1, j].imshow(_phi_rgb(t.phi_plus[i], t.phi_minus[i]))
                        axes[2 * r + 1, j].set_title("φ+ red / φ- blue", fontsize=6)
            base = len(rows) * 2
            for j in range(min(self.k, n_col)):
                axes[base, j].imshow(_to_rgb(patches.least[c, j]))
                axes[base, j].set_title(f"least {float(patches.least_values[c, j]):.2g}", fontsize=6)
                axes[base + 1, j].imshow(_to_rgb(patches.most[c, j]))
                axes[base + 1, j].set_title(f"most {float(patches.most_values[c, j]):.2g}", fontsize=6)
            fig.suptitle(f"{self.layer}:{c} epoch {epoch}", fontsize=8)
            fig.tight_layout()
            p = out / f"{self.layer}_{c}_epoch{epoch}.png"
            fig.savefig(p, dpi=80)
            plt.close(fig)
            paths.append(str(p))
        return paths

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"epochs_run": self.epochs_run, "summary": dict(self._summary)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs_run = int(state_dict.get("epochs_run", 0))
        self._summary = {str(k): float(v) for k, v in state_dict.get("summary", {}).items()}


def _to_rgb(img: torch.Tensor) -> Any:
    """``(C, H, W)`` → an array matplotlib shows: RGB for 3 channels, side-by-side channels otherwise."""
    a = img.detach().float().cpu()
    if a.shape[0] == 3:
        return a.clamp(0, 1).permute(1, 2, 0).numpy()
    return torch.cat(list(a), dim=0).numpy()  # stack channels vertically (e.g. two motion frames)


def _phi_rgb(pp: torch.Tensor, pm: torch.Tensor) -> Any:
    """φ⁺ in red, φ⁻ in blue, both → green-ish overlap (paper 001, Fig. 4 g), normalised jointly."""
    scale = float(torch.maximum(pp.max(), pm.max())) or 1.0
    p, m = (pp / scale).cpu(), (pm / scale).cpu()
    both = torch.minimum(p, m)
    return torch.stack([p - both, both, m - both], -1).clamp(0, 1).numpy()
