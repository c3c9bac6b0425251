"""What every negspace callback shares, so that each callback only picks its data, calls one core function,
logs and checkpoints.

The vocabulary (one meaning each, documented in ``docs/callbacks.md``):

* ``batch_keys=`` — where image/label/mask/group live in a batch (:mod:`negspace.batch`);
* ``forward=`` — dotted name of the submodule of the LightningModule that is the network (layers are named
  relative to it), or ``None`` for the LightningModule itself;
* ``every_n_epochs=`` — ``None``: run once, at the end of ``fit``, on the validation data; ``N``: at the end of
  every N-th validation epoch (as in Lightning's own ``ModelCheckpoint(every_n_epochs=...)``);
* ``save_dir=`` — where files go; default: the first logger's directory; with ``logger=False`` and no
  ``save_dir`` nothing is written to disk.

Scalars reach ``trainer.callback_metrics`` (so ``ModelCheckpoint``/``EarlyStopping`` can monitor them) and every
logger; figures reach every logger that takes images (TensorBoard ``add_figure``, ``log_image`` loggers such as
W&B, MLflow's ``log_figure``) and are saved as PNG when there is a directory.
"""

from __future__ import annotations

import abc
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from negspace.batch import BatchKeys
from negspace.hooks import get_layer

__all__ = ["AnalysisCallback", "deprecated_kwarg", "log_figure", "log_scalars", "output_dir", "progress_enabled"]


def deprecated_kwarg(owner: str, old: str, new: str, value: Any, current: Any, default: Any = None) -> Any:
    """Map an old keyword to its new name with a ``DeprecationWarning``; both given is an error."""
    if value is None:
        return current
    if current is not default and current != default:
        raise TypeError(f"{owner}: pass {new}= only ({old}= is its deprecated name), not both")
    warnings.warn(f"{owner}({old}=...) is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
    return value


def output_dir(trainer: Trainer, *parts: str, save_dir: str | Path | None = None) -> Path | None:
    """Directory for a callback's files: ``save_dir`` if given, else the first logger's ``log_dir`` (its
    ``save_dir`` for loggers without one); ``None`` when there is neither (``logger=False``): nothing is then
    written. ``parts`` are appended; the directory is not created here.

    Safe inside rank-0-only branches: unlike ``Trainer.log_dir`` it does not broadcast (a collective every
    DDP rank must join, so calling it on rank 0 alone would hang).
    """
    root: str | Path | None = save_dir
    if root is None and trainer.loggers:
        logger = trainer.loggers[0]
        root = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return None if root is None else Path(root, *parts)


def progress_enabled(trainer: Trainer) -> bool:
    """Progress bars for a callback's long work follow ``Trainer(enable_progress_bar=...)``; rank 0 only."""
    return trainer.progress_bar_callback is not None and trainer.is_global_zero


def log_scalars(trainer: Trainer, pl_module: LightningModule, metrics: Mapping[str, float]) -> None:
    """Send scalars to ``trainer.callback_metrics`` and to every logger.

    Inside a validation hook this is ``pl_module.log`` (Lightning's own path: monitored by ``ModelCheckpoint``
    and ``EarlyStopping``); elsewhere (``on_train_end``, where ``self.log`` is not allowed) the values are put
    into ``callback_metrics`` and sent to the loggers directly, on rank 0.
    """
    clean = {k: float(v) for k, v in metrics.items()}
    in_loop = getattr(pl_module, "_current_fx_name", None) in {"on_validation_epoch_end", "on_train_epoch_end"}
    if in_loop:
        for k, v in clean.items():
            pl_module.log(k, v, rank_zero_only=True)
        return
    for k, v in clean.items():
        trainer.callback_metrics[k] = torch.tensor(v)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(clean, step=trainer.global_step)


_SAFE = re.compile(r"[^A-Za-z0-9_.=-]+")


def log_figure(trainer: Trainer, name: str, fig: Any, save_dir: Path | None = None) -> Path | None:
    """Hand a matplotlib figure to every logger that takes images and save it as ``save_dir/<name>.png``.

    Closes the figure. Call on rank 0 only. Returns the file written, if any.
    """
    import matplotlib.pyplot as plt

    step = trainer.global_step
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        try:
            if hasattr(exp, "add_figure"):  # TensorBoard
                exp.add_figure(name, fig, global_step=step, close=False)
            elif hasattr(logger, "log_image"):  # W&B, Neptune, Comet
                logger.log_image(key=name, images=[_figure_array(fig)], step=step)
            elif hasattr(exp, "log_figure") and getattr(logger, "run_id", None):  # MLflow
                exp.log_figure(logger.run_id, fig, f"{_SAFE.sub('_', name)}.png")
        except Exception as e:  # a logger that cannot take this figure must not end the run
            warnings.warn(f"could not send figure {name!r} to {type(logger).__name__}: {e}", stacklevel=2)
    path = None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        path = save_dir / f"{_SAFE.sub('_', name.replace('/', '_'))}.png"
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _figure_array(fig: Any) -> Any:
    fig.canvas.draw()
    return __import__("numpy").asarray(fig.canvas.buffer_rgba())[..., :3]


class AnalysisCallback(Callback, abc.ABC):
    """Base of the analysis callbacks: the shared vocabulary, scheduling, data selection and logging.

    Subclasses implement :meth:`run` (``trainer, pl_module, loader -> None``), which calls one core function
    and then :meth:`log_metrics` / :meth:`figure`.
    """

    def __init__(
        self,
        *,
        every_n_epochs: int | None = None,
        batch_keys: Any = None,
        forward: str | None = None,
        dataloader_idx: int = 0,
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool)
                                           or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be None (once, at the end of fit) or a positive int, got {every_n_epochs!r}")
        if forward is not None and not isinstance(forward, str):
            raise TypeError(f"forward must be a dotted submodule name or None, got {type(forward).__name__}")
        if not isinstance(dataloader_idx, int) or dataloader_idx < 0:
            raise ValueError(f"dataloader_idx must be a non-negative int, got {dataloader_idx!r}")
        self.every_n_epochs = every_n_epochs
        self.batch_keys = BatchKeys(batch_keys)
        self.forward = forward
        self.dataloader_idx = dataloader_idx
        self.save_dir = save_dir

    # ------------------------------------------------------------------------------------------ early checks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail before training when ``forward=`` names no submodule (the error lists close names)."""
        self.network(pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail at the first validation (the sanity check, when enabled) when ``dataloader_idx`` has no loader."""
        if trainer.state.fn == "fit":
            self.val_loader(trainer)

    # ------------------------------------------------------------------------------------------ schedule
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs is None or trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._run(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs is None:
            self._run(trainer, pl_module)

    def _run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = self.val_loader(trainer)
        if loader is None:
            warnings.warn(f"{type(self).__name__}: no validation data; nothing to analyse", stacklevel=2)
            return
        # validation hooks run under inference_mode; analyses need autograd and ordinary tensors
        with torch.inference_mode(False), torch.enable_grad():
            self.run(trainer, pl_module, loader)

    @abc.abstractmethod
    def run(self, trainer: Trainer, pl_module: LightningModule, loader: Any) -> None:
        """Analyse the data of ``loader`` with the network, then :meth:`log_metrics` and :meth:`figure` the result."""

    # ------------------------------------------------------------------------------------------ helpers
    def network(self, pl_module: nn.Module) -> nn.Module:
        """The module whose layers the callback names (``forward=``)."""
        return pl_module if self.forward is None else get_layer(pl_module, self.forward)

    def val_loader(self, trainer: Trainer) -> Any:
        """Validation loader ``dataloader_idx`` (a clear error when it does not exist)."""
        loaders = trainer.val_dataloaders
        if loaders is None:
            return None
        if isinstance(loaders, list | tuple):
            if self.dataloader_idx >= len(loaders):
                raise ValueError(
                    f"{type(self).__name__}: dataloader_idx={self.dataloader_idx} but there are {len(loaders)} "
                    "validation loaders"
                )
            return loaders[self.dataloader_idx]
        if self.dataloader_idx:
            raise ValueError(f"{type(self).__name__}: dataloader_idx={self.dataloader_idx} but there is one validation loader")
        return loaders

    def log_metrics(self, trainer: Trainer, pl_module: LightningModule, metrics: Mapping[str, float]) -> None:
        """Scalars to ``callback_metrics`` and the loggers (:func:`log_scalars`). Not named ``log``: Lightning
        sets ``callback.log = pl_module.log`` on every callback when a run starts."""
        log_scalars(trainer, pl_module, metrics)

    def figure(self, trainer: Trainer, name: str, fig: Any, *parts: str) -> Path | None:
        """Send ``fig`` to the loggers and save it (rank 0 only; other ranks just close it)."""
        if not trainer.is_global_zero:
            import matplotlib.pyplot as plt

            plt.close(fig)
            return None
        return log_figure(trainer, name, fig, output_dir(trainer, *parts, save_dir=self.save_dir))

    def files_dir(self, trainer: Trainer, *parts: str) -> Path | None:
        """Directory for non-figure files (tables, CSV), or ``None`` when nothing is to be written."""
        return output_dir(trainer, *parts, save_dir=self.save_dir)
