"""Small helpers shared by the callbacks."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Trainer


def output_dir(trainer: Trainer, *parts: str) -> Path:
    """Directory for a callback's figures and tables: the first logger's ``log_dir`` (``save_dir`` for
    loggers without one), else ``trainer.default_root_dir``; ``parts`` are appended. Not created here.

    Safe inside rank-0-only branches: unlike ``Trainer.log_dir``, it does not broadcast (a collective
    that every DDP rank must join, so calling it on rank 0 alone would hang).
    """
    root = None
    if trainer.loggers:
        logger = trainer.loggers[0]
        root = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return Path(root or trainer.default_root_dir, *parts)
