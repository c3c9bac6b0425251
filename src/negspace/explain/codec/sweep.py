"""The ablation / preservation experiment of paper 002 (Fig. 6): per-class accuracy while the top channels of a
mode's atom are ablated (or only they are preserved), over a sweep of percentages, and its AUCs.

Two protocols for the off-target side: ``off_target="random"`` (the default, supplement 10.5.3: in each of 6
trials a random other class, 10 random samples of each class, ratios averaged over the trials) and
``off_target="all"`` (every other class on every sample: deterministic and less noisy, negspace 0.1)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from negspace.batch import iter_batches
from negspace.editing.channels import ChannelEdit
from negspace.explain.codec.modes import select_channels
from negspace.hooks import eval_mode, get_layer, model_device

__all__ = ["DEFAULT_PERCENTS", "OFF_TARGETS", "SweepResult", "per_class_accuracy", "perturbation_sweep"]

#: percentages of channels of the reference ablation script
DEFAULT_PERCENTS = (1, 2, 5, 10, 18, 25, 50, 80, 99)
#: named off-target protocols of :func:`perturbation_sweep`
OFF_TARGETS = ("random", "all")


def _batches(data: object, batch_size: int, batch_keys: object) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(f"data must be a tuple (x, y) of tensors or an iterable of batches, got {type(data).__name__}")
    for b in iter_batches(data, batch_keys, require=("image", "label"), who="per_class_accuracy"):
        yield b.image, b.label  # type: ignore[misc]


@torch.no_grad()
def per_class_accuracy(
    model: nn.Module,
    data: tuple[Tensor, Tensor] | Iterable,
    num_classes: int,
    *,
    batch_size: int = 256,
    batch_keys: object = None,
) -> tuple[Tensor, Tensor]:
    """``(accuracy (num_classes,), counts (num_classes,))``; accuracy is NaN for classes without samples."""
    device = model_device(model)
    correct = torch.zeros(num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    with eval_mode(model):
        for x, y in _batches(data, batch_size, batch_keys):
            pred = model(x.to(device)).argmax(1).cpu()
            y = y.long().cpu()
            counts += torch.bincount(y, minlength=num_classes)[:num_classes].double()
            correct += torch.bincount(y[pred == y], minlength=num_classes)[:num_classes].double()
    acc = torch.where(counts > 0, correct / counts.clamp_min(1), torch.full_like(counts, float("nan")))
    return acc.float(), counts.long()


@dataclass
class SweepResult:
    """Perturbed/unperturbed per-class accuracy ratios over a sweep of percentages."""

    mode: str
    percents: list[float]
    target_classes: list[int]
    off_target_classes: list[int]
    base_accuracy: Tensor  # (num_classes,)
    ratio: Tensor  # (P, num_classes)
    ratio_target: Tensor  # (P,)
    ratio_off: Tensor  # (P,)
    auc_target: float
    auc_off: float
    channels: list[list[int]]
    protocol: str = "all"  # "random" (paper 10.5.3), "all" or "classes" (an explicit off-target list)
    trial_auc_target: list[float] = field(default_factory=list)  # per trial ("random" protocol)
    trial_auc_off: list[float] = field(default_factory=list)

    @property
    def specificity(self) -> float:
        """``auc_off − auc_target`` for ablation, ``auc_target − auc_off`` for preservation (higher = more specific)."""
        d = self.auc_off - self.auc_target
        return d if self.mode == "ablate" else -d


def _auc(p: Sequence[float], r: Tensor) -> float:
    """Area under ratio vs fraction, normalised by the fraction range (a flat ratio of 1 gives 1)."""
    x = np.asarray(p, dtype=np.float64) / 100
    y = r.double().numpy()
    if len(x) == 1:
        return float(y[0])
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def _correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    device = model_device(model)
    with torch.no_grad(), eval_mode(model):
        pred = torch.cat([model(c.to(device)).argmax(1).cpu() for c in x.split(batch_size)])
    return pred == y


def _reservoir(
    data: object, classes: set[int], cap: int, gen: torch.Generator, batch_size: int, batch_keys: object
) -> dict[int, list[Tensor]]:
    """Up to ``cap`` uniformly drawn samples of each class in ``classes`` (one pass, reservoir sampling)."""
    pool: dict[int, list[Tensor]] = {c: [] for c in classes}
    seen = dict.fromkeys(classes, 0)
    for x, y in _batches(data, batch_size, batch_keys):
        for xi, yi in zip(x, y.long().tolist()):
            if yi not in pool:
                continue
            seen[yi] += 1
            if len(pool[yi]) < cap:
                pool[yi].append(xi)
            else:
                j = int(torch.randint(seen[yi], (1,), generator=gen))
                if j < cap:
                    pool[yi][j] = xi
    return pool


def _random_protocol(
    model: nn.Module, layer: str, data: object, atom: Tensor, targets: list[int], offs: list[int], *,
    num_classes: int, percents: Sequence[float], mode: str, sign: int, value: str | float,
    num_channels: int | None, trials: int, samples_per_class: int, seed: int, batch_size: int, batch_keys: object,
) -> SweepResult:
    """Supplement 10.5.3: per trial a random off-target class and ``samples_per_class`` random samples per class;
    ratios (perturbed / unperturbed accuracy on those samples) averaged over the target classes, then trials."""
    gen = torch.Generator().manual_seed(seed)
    trial_offs = [offs[int(torch.randint(len(offs), (1,), generator=gen))] for _ in range(trials)]
    pool = _reservoir(data, set(targets) | set(trial_offs), samples_per_class * trials, gen, batch_size, batch_keys)
    for t in targets:
        if not pool[t]:
            raise ValueError(f"the data holds no sample of target class {t}")
    xs, ys, start = [], [], {}
    for c, items in pool.items():
        start[c] = sum(len(v) for v in xs)
        if items:
            xs.append(torch.stack(items))
            ys.append(torch.full((len(items),), c, dtype=torch.long))
    x, y = torch.cat(xs), torch.cat(ys)
    picks = [  # per trial: {class: indices into x}
        {c: start[c] + torch.randperm(len(pool[c]), generator=gen)[:samples_per_class]
         for c in [*targets, trial_offs[t]] if pool[c]}
        for t in range(trials)
    ]
    base = _correct(model, x, y, batch_size).double()
    pert, chans = [], []
    for p in percents:
        ch = select_channels(atom, p, sign=sign, num_channels=num_channels)
        chans.append(ch.tolist())
        with ChannelEdit({layer: ch}, mode=mode, value=value).applied(model):
            pert.append(_correct(model, x, y, batch_size).double())

    def ratio_of(idx: Tensor) -> Tensor:  # (P,)
        b = base[idx].mean()
        return torch.stack([r[idx].mean() for r in pert]) / b if b > 0 else torch.full((len(pert),), float("nan"))

    per_trial_t, per_trial_o = [], []
    ratio = torch.full((trials, len(percents), num_classes), float("nan"), dtype=torch.float64)
    for t, pick in enumerate(picks):
        for c, idx in pick.items():
            ratio[t, :, c] = ratio_of(idx)
        per_trial_t.append(torch.nanmean(ratio[t][:, targets], dim=1))
        per_trial_o.append(ratio[t, :, trial_offs[t]])
    rt, ro = torch.nanmean(torch.stack(per_trial_t), 0), torch.nanmean(torch.stack(per_trial_o), 0)
    base_acc = torch.full((num_classes,), float("nan"))
    for c in pool:
        if pool[c]:
            base_acc[c] = float(base[start[c] : start[c] + len(pool[c])].mean())
    return SweepResult(
        mode, list(map(float, percents)), targets, trial_offs, base_acc, torch.nanmean(ratio, 0).float(),
        rt.float(), ro.float(), _auc(percents, rt.float()), _auc(percents, ro.float()), chans, "random",
        [_auc(percents, r.float()) for r in per_trial_t], [_auc(percents, r.float()) for r in per_trial_o],
    )


def perturbation_sweep(
    model: nn.Module,
    layer: str,
    data: tuple[Tensor, Tensor] | Iterable,
    atom: Tensor,
    target_class: int | Sequence[int],
    *,
    num_classes: int,
    percents: Sequence[float] = DEFAULT_PERCENTS,
    mode: str = "ablate",
    sign: int = 1,
    value: str | float = "zero",
    off_target: Sequence[int] | str | None = "random",
    trials: int = 6,
    samples_per_class: int = 10,
    seed: int = 0,
    num_channels: int | None = None,
    batch_size: int = 256,
    batch_keys: object = None,
) -> SweepResult:
    """Paper 002 Fig. 6 experiment: for each percentage, ablate (or preserve only) the top channels of
    ``atom`` at ``layer`` and record per-class accuracy / unperturbed accuracy.

    ``target_class``: a class or a list (a superclass). ``off_target``:

    * ``"random"`` (default, supplement 10.5.3): ``trials`` trials; in each, a random class that is not a
      target, and ``samples_per_class`` random samples of each class (drawn with ``seed``); the ratios are
      computed on those samples and averaged over target classes, then over trials (``trial_auc_*`` keep the
      per-trial AUCs). The data are read once (reservoir sampling of the classes involved).
    * ``"all"`` (or ``None``): every other class, on every sample (deterministic; negspace 0.1's protocol).
    * a list of classes: those, on every sample.

    ``ratio_target`` / ``ratio_off`` average the ratios over those classes (classes with 0 base accuracy
    are skipped); AUCs are normalised areas under ratio vs fraction of channels.
    """
    if mode not in ("ablate", "preserve"):
        raise ValueError(f"mode must be 'ablate' or 'preserve', got {mode!r}")
    get_layer(model, layer)  # unknown layers: ValueError listing close names
    targets = [target_class] if isinstance(target_class, int) else list(target_class)
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_classes:
            raise ValueError(f"target_class must be in [0, {num_classes}), got {target_class!r}")
    others = [c for c in range(num_classes) if c not in targets]
    if isinstance(off_target, str) and off_target not in OFF_TARGETS:
        raise ValueError(f"off_target must be one of {OFF_TARGETS}, None or a list of classes, got {off_target!r}")
    offs = others if off_target is None or isinstance(off_target, str) else list(off_target)
    for p in percents:
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 100:
            raise ValueError(f"percents must lie in (0, 100], got {p!r}")
    atom = torch.as_tensor(atom).float()
    if off_target == "random":
        for name, v in (("trials", trials), ("samples_per_class", samples_per_class)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not others:
            raise ValueError("off_target='random' needs at least one class that is not a target")
        return _random_protocol(
            model, layer, data, atom, targets, others, num_classes=num_classes, percents=percents, mode=mode,
            sign=sign, value=value, num_channels=num_channels, trials=trials, samples_per_class=samples_per_class,
            seed=seed, batch_size=batch_size, batch_keys=batch_keys,
        )
    base, _ = per_class_accuracy(model, data, num_classes, batch_size=batch_size, batch_keys=batch_keys)
    ratios, chans = [], []
    for p in percents:
        ch = select_channels(atom, p, sign=sign, num_channels=num_channels)
        chans.append(ch.tolist())
        with ChannelEdit({layer: ch}, mode=mode, value=value).applied(model):
            acc, _ = per_class_accuracy(model, data, num_classes, batch_size=batch_size, batch_keys=batch_keys)
        ratios.append(torch.where(base > 0, acc / base.clamp_min(1e-12), torch.full_like(acc, float("nan"))))
    ratio = torch.stack(ratios)

    def avg(cls: list[int]) -> Tensor:
        r = ratio[:, cls]
        return torch.nanmean(r, dim=1) if cls else torch.full((len(percents),), float("nan"))

    rt, ro = avg(targets), avg(offs)
    return SweepResult(mode, list(map(float, percents)), targets, offs, base, ratio, rt, ro,
                       _auc(percents, rt), _auc(percents, ro), chans, "all" if off_target in (None, "all") else "classes")
