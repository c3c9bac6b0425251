"""The demos: ``negspace demo`` (paper 000 Table 2 on synthetic lesions), ``--finetune`` (a pretrained backbone
fine-tuned with the prior) and ``--compare`` (:mod:`negspace.compare`). Names are imported lazily."""

from __future__ import annotations

from negspace._lazy import attach

_LAZY: dict[str, str] = {
    **{n: "common" for n in ("CLASS_NAMES", "SPLITS", "LesionRunConfig", "evaluate_splits", "mean_std", "trainer_kwargs")},
    **{n: "table2" for n in ("SETTINGS", "DemoConfig", "check_pattern", "pretrain", "run_demo", "summarise")},
    **{n: "finetune" for n in ("FinetuneConfig", "run_finetune_demo")},
}  # fmt: skip

__getattr__, __dir__, __all__ = attach(__name__, _LAZY)
