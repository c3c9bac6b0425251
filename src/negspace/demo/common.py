"""What the demos on the built-in lesions share: class and split names, the base run config, Trainer
settings, the split evaluation and mean ± std."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["CLASS_NAMES", "SPLITS", "LesionRunConfig", "evaluate_splits", "mean_std", "trainer_kwargs"]

CLASS_NAMES = ("benign", "malignant")
SPLITS = ("train_bias", "inverse_bias", "no_bias")


@dataclass
class LesionRunConfig:
    """What every run on the built-in lesions shares (the demo's and the comparison's configs extend it)."""

    seeds: int = 3
    epochs: int = 24
    n_train: int = 800
    n_val: int = 300
    n_test: int = 300
    image_size: int = 32
    width: int = 16
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4


def trainer_kwargs(progress: bool) -> dict[str, Any]:
    return {
        "accelerator": "cpu",
        "devices": 1,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": progress,
    }


def evaluate_splits(trainer: Any, module: Any, dm: Any, report: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate (all batches) and test a fitted module; ``(val, test)`` results of its ``BiasedSplitReport``."""
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=dm, verbose=False)
    val = report.result
    trainer.test(module, datamodule=dm, verbose=False)
    return val, report.result


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


