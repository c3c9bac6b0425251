"""``AttributionPrior``: paper 000's presence / presence+absence attribution prior as a drop-in callback.

In ``setup("fit")`` the callback replaces the LightningModule *instance's* ``training_step`` by a thin wrapper
that calls the user's ``training_step`` and adds ``λ · prior_loss`` to the loss it returns (a tensor or
``dict["loss"]``). The wrapper runs wherever Lightning runs ``training_step`` (inside the DDP forward, the
precision plugin's autocast and the optimizer closure), so accumulation, GradScaler, DDP and clipping all see
the penalised loss. It is removed in ``teardown`` and ``on_exception``. The computation is
:func:`negspace.priors.penalty_step`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from negspace.batch import BatchKeys
from negspace.callbacks.base import deprecated_kwarg
from negspace.hooks import get_layer
from negspace.priors.calibration import AUTO_FRACTION, LamController, check_lam
from negspace.priors.checks import check_callback_options, check_normalize, check_options
from negspace.priors.feed import MaskFeed
from negspace.priors.loss import PriorResult
from negspace.priors.monitor import PriorMonitor, step_signals
from negspace.priors.rightreasons import check_loss
from negspace.priors.shared import (
    Forward,
    attributed_model,
    capture_training_forward,
    install_step_wrapper,
    parse_schedule,
    penalty_step,
    uninstall_step_wrapper,
)

__all__ = ["AttributionPrior"]

class AttributionPrior(Callback):
    """Add paper 000's attribution prior ``lam · prior_loss`` to an unmodified module's training loss.

    ``Trainer(callbacks=[AttributionPrior(lam=1.0, mode="presence_absence")])``; batches carry a mask of the
    spurious region. See ``docs/priors.md`` for the mechanics and costs.

    Args:
        lam: prior weight λ (eq. 2/3 of paper 000).
        mode, method, non_target, n_steps: as in :func:`negspace.priors.prior_loss`.
        batch_keys: where image, label and mask live in the batch (:mod:`negspace.batch`; tuples
            ``(image, label, mask[, ...])`` and dicts with ``image``/``label``/``mask`` by default).
        mask: where the masks come from: ``None`` (the batch's mask, ``batch_keys``), a batch key, or a
            :class:`negspace.masks.MaskSource` / callable ``images -> (B, 1, H, W)`` that computes them per batch
            (no-grad, autocast off, not part of the prior's gradient; e.g. a :class:`negspace.masks.ConceptMask`,
            whose layer names are relative to the attributed network, ``forward=``). A source that needs the
            model is bound at fit start (a frozen copy by default) and its state is checkpointed; see
            docs/maskfree.md.
        forward: what is attributed: ``None`` (the LightningModule, ``module(x)`` returns logits), a dotted
            attribute path (``"model"``), or a callable ``(module, x) -> output``. Non-tensor outputs are
            reduced with ``output_key`` (default ``out["logits"]`` for mappings, ``out[0]`` for tuples).
        start_step: no penalty (and no extra compute) before this ``trainer.global_step``.
        lam_schedule: ``None``, ``"linear:N"`` (λ·min(1, (s+1)/N), ``s = global_step − start_step``) or a
            callable ``s -> factor``.
        norm_mode: BatchNorm semantics of the attributions: ``"auto"`` (default: ``"shared"`` with
            input×gradient, ``"separate"`` with integrated gradients; on models without batch-coupled layers
            the cheaper pass, same values), ``"shared"`` (differentiate the training forward itself: full-batch
            train-mode statistics, the reference implementation's way), ``"eval"`` (a pass over the masked
            samples with BatchNorm in eval mode: per-sample, batch-size independent) or ``"separate"`` (a
            train-mode pass over the masked samples). See :mod:`negspace.priors.shared` and docs/priors.md.
        attribution_batch: attribute at most K masked samples per step, drawn at random (``seed``) and
            rescaled by #masked / K so that the penalty is an unbiased estimate of the full one.
        normalize: ``"mask"`` (paper: Σ|A·P| / ΣP) or ``"fraction"`` (scale-free: Σ|A·P| / Σ|A| per sample).
        auto_fraction: with ``lam="auto"``, λ is set at the first penalised step so that ``‖∇(λ·penalty)‖ =
            auto_fraction · ‖∇ task loss‖`` (default 0.3), re-measured every 10 steps (geometric moving average,
            at most 3× above its smallest value) and divided by 10 on a collapse
            (:class:`negspace.priors.LamController`; the ranks of a DDP run agree on it after every batch).
        monitor: collapse / no-effect detection (:class:`negspace.priors.PriorMonitor`; a dict sets its
            thresholds, ``False`` turns it off): warns once naming cause and fix and logs ``<name>/collapsed``,
            ``<name>/stalled`` (task loss stuck near its start; no ``lam="auto"`` back-off), ``<name>/no_effect``
            (0/1) and ``<name>/ratio`` (λ·penalty / task loss) for ``EarlyStopping``.
        allow_autocast: compute the penalty inside autocast (default off: double backward in bf16 is noisy).
        keep_norm_stats: the prior's extra passes never change BatchNorm running statistics.
        on_nan: ``"raise"`` (a non-finite penalty raises ``FloatingPointError``) or ``"skip"`` (warn, skip).
        seed: seeds ``non_target="sample:K"`` and ``attribution_batch`` (offset by the global rank); its state is
            checkpointed.
        share_forward: deprecated alias of ``norm_mode`` (``True`` → ``"shared"``, ``False`` → ``"separate"``,
            ``"auto"`` → ``"auto"``).
        loss: ``"negspace"`` (paper 000's prior, ``mode=``), ``"rrr"`` (Ross et al. 2017) or ``"rrr_gradcam"``
            (GradCAM at ``layer``, a dotted name inside ``forward``); see :mod:`negspace.priors.rightreasons`.
        name: log prefix (``<name>/penalty``, ``<name>/mass_in_mask``, ``<name>/lam``) and part of
            ``state_key``; several instances in one Trainer need distinct names (checked at setup).

    Manual optimisation: the callback warns and does not wrap; call ``loss = loss + prior_cb.penalty(self,
    batch)`` before ``self.manual_backward(loss)`` (already multiplied by the effective λ).
    """

    def __init__(
        self,
        lam: float | str = 1.0,
        mode: str = "presence_absence",
        method: str = "input_x_gradient",
        non_target: str = "complement",
        n_steps: int = 16,
        batch_keys: Any = None,
        forward: Forward | None = None,
        start_step: int = 0,
        *,
        lam_schedule: str | Callable[[int], float] | None = None,
        output_key: str | int | None = None,
        baseline: float | None = None,
        internal_batch_size: int | None = None,
        allow_autocast: bool = False,
        keep_norm_stats: bool = True,
        on_nan: str = "raise",
        seed: int = 0,
        share_forward: bool | str | None = None,
        name: str = "attribution_prior",
        norm_mode: str = "auto",
        attribution_batch: int | None = None,
        loss: str = "negspace",
        layer: str | None = None,
        normalize: str = "mask",
        auto_fraction: float = AUTO_FRACTION,
        monitor: bool | dict[str, float] = True,
        mask: Any = None,
    ) -> None:
        super().__init__()
        if share_forward is not None:
            if share_forward not in (True, False, "auto"):
                raise ValueError(f"share_forward (deprecated: use norm_mode=) must be True, False or 'auto', "
                                 f"got {share_forward!r}")
            alias = {True: "shared", False: "separate", "auto": "auto"}[share_forward]
            norm_mode = deprecated_kwarg("AttributionPrior", "share_forward", "norm_mode", alias, norm_mode, "auto")
        check_options(mode, method, non_target, n_steps)
        check_callback_options(lam=lam, start_step=start_step, on_nan=on_nan, name=name, forward=forward,
                               norm_mode=norm_mode, method=method, attribution_batch=attribution_batch)
        self.lam_auto = check_lam(lam)
        # lam='auto': λ comes from the controller (calibrated at the first penalised step, agreed across ranks)
        self.auto = LamController(auto_fraction) if self.lam_auto else None
        self.lam = 1.0 if self.lam_auto else float(lam)
        self.mode, self.method, self.non_target, self.n_steps = mode, method, non_target, n_steps
        self.normalize, self.auto_fraction = check_normalize(normalize), auto_fraction
        if not isinstance(monitor, bool | dict):
            raise TypeError(f"monitor must be True, False or a dict of PriorMonitor thresholds, got {monitor!r}")
        self.monitor = PriorMonitor(**(monitor if isinstance(monitor, dict) else {})) if monitor else None
        self.batch_keys, self._keys, self.mask, self.feed = batch_keys, BatchKeys(batch_keys), mask, MaskFeed(mask)
        if self.feed.key is not None:
            if self._keys.fn is not None:
                raise ValueError("AttributionPrior: mask= names a batch key, but batch_keys is a callable; return "
                                 "the mask from that callable instead")
            self._keys.keys["mask"] = self.feed.key
        self.forward, self.output_key, self.start_step = forward, output_key, start_step
        self.lam_schedule, self._schedule = lam_schedule, parse_schedule(lam_schedule)
        self.baseline, self.internal_batch_size = baseline, internal_batch_size
        self.allow_autocast, self.keep_norm_stats = bool(allow_autocast), bool(keep_norm_stats)
        self.on_nan, self.seed, self.name = on_nan, int(seed), name
        self.norm_mode, self.attribution_batch = norm_mode, attribution_batch
        self.loss, self.layer = check_loss(loss, layer), layer
        self._captured: dict[str, Any] | None = None
        self._warned: set[str] = set()
        self.generator: torch.Generator | None = None
        self._pending_gen_state: Tensor | None = None
        self.penalised_batches = 0  # batches that received a penalty (checkpointed)
        self.last_result: PriorResult | None = None

    # ---------------------------------------------------------------------------- Lightning hooks
    @property
    def calibrated(self) -> bool:
        """``lam="auto"`` only: whether λ has been calibrated (and agreed across ranks)."""
        return self.auto is not None and self.auto.calibrated

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            name=self.name, mode=self.mode, lam="auto" if self.lam_auto else self.lam, method=self.method,
            non_target=self.non_target, **({} if self.loss == "negspace" else {"loss": self.loss}),
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        twins = [c for c in trainer.callbacks if isinstance(c, AttributionPrior) and c is not self and c.name == self.name]
        if twins:
            raise ValueError(f"{len(twins) + 1} AttributionPrior callbacks log under the same name={self.name!r} and "
                             "would overwrite each other's metrics; give each a distinct name=, e.g. name='prior_a'")
        if (self.non_target.startswith("sample:") or self.attribution_batch is not None) and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed + trainer.global_rank)
            if self._pending_gen_state is not None:
                self.generator.set_state(self._pending_gen_state)
                self._pending_gen_state = None
        if not pl_module.automatic_optimization:
            rank_zero_warn(
                f"AttributionPrior({self.name!r}): the module uses manual optimization, so the callback cannot add "
                "the prior to the loss automatically. Call `loss = loss + prior_callback.penalty(self, batch)` "
                "in your training_step before `self.manual_backward(loss)`."
            )
            return
        self.feed.check(self._network(pl_module), f"AttributionPrior({self.name!r})")
        install_step_wrapper(pl_module, self)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the DDP wrap (equal weights on every rank) and the checkpoint restore (saved reference weights)
        self.feed.bind(self._network(pl_module), f"AttributionPrior({self.name!r})")

    def _network(self, pl_module: LightningModule) -> torch.nn.Module | None:
        """The attributed network as a module (``forward=None``: the LightningModule; a dotted path: that
        attribute if it is a module; a callable: ``None``)."""
        if self.forward is None:
            return pl_module
        if callable(self.forward):
            return None
        try:
            return get_layer(pl_module, self.forward)  # the one layer lookup
        except ValueError:  # a dotted path to a method, not a submodule
            return None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        uninstall_step_wrapper(pl_module, self)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        uninstall_step_wrapper(pl_module, self)  # Lightning does not call `teardown` when fit raises

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"penalised_batches": int(self.penalised_batches), **self.feed.state_dict()}
        if self.auto is not None:
            state.update(self.auto.state_dict())
        if self.monitor is not None:
            state["monitor"] = self.monitor.state_dict()
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.penalised_batches = int(state_dict.get("penalised_batches", 0))
        self.feed.load_state_dict(state_dict, f"AttributionPrior({self.name!r})")
        if self.auto is not None and "lam" in state_dict:
            self.auto.load_state_dict(state_dict)
            self.lam = self.auto.lam
        if self.monitor is not None and "monitor" in state_dict:
            self.monitor.load_state_dict(state_dict["monitor"])
        gen_state = state_dict.get("generator_state")
        if gen_state is not None and self.generator is not None:
            self.generator.set_state(gen_state)
        elif gen_state is not None:
            self._pending_gen_state = gen_state

    # --------------------------------------------------------------------------------- the penalty
    def effective_lam(self, step: int) -> float:
        """λ at ``trainer.global_step == step`` (0 before ``start_step``)."""
        if step < self.start_step:
            return 0.0
        return self.lam * (1.0 if self._schedule is None else float(self._schedule(step - self.start_step)))

    def penalty(self, module: LightningModule, batch: Any, task_loss: Tensor | None = None) -> Tensor:
        """``λ_eff · prior_loss`` for ``batch`` (0-dim; exactly 0 when inactive), for manual optimisation.

        Pass the step's ``task_loss`` (with its graph) to get ``lam="auto"`` calibration and collapse / no-effect
        detection as in automatic optimisation; without it neither runs (``lam="auto"`` then stays at 1)."""
        pen = self._weighted_penalty(module, batch)
        if pen is None:
            x = self._extract(batch)[0]
            return torch.zeros((), dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
        return self._watch(module, task_loss, pen)

    def _add_to_output(self, module: LightningModule, batch: Any, out: Any) -> Any:
        if out is None:  # the user skipped this batch
            return out
        if isinstance(out, Mapping) and "loss" not in out:
            raise ValueError("AttributionPrior: training_step returned a dict without a 'loss' key "
                             f"(keys: {sorted(map(str, out))}); return the loss tensor or {{'loss': ...}}")
        if not isinstance(out, Tensor | Mapping):
            raise TypeError("AttributionPrior: training_step must return the loss tensor, a dict with 'loss', or "
                            f"None; got {type(out).__name__}")
        pen = self._weighted_penalty(module, batch)
        if pen is None:
            return out
        pen = self._watch(module, out if isinstance(out, Tensor) else out["loss"], pen)
        return out + pen if isinstance(out, Tensor) else {**out, "loss": out["loss"] + pen}

    def _step(self, module: LightningModule) -> int:
        trainer = getattr(module, "_trainer", None)
        return trainer.global_step if trainer is not None else self.penalised_batches

    @contextlib.contextmanager
    def _capture(self, module: LightningModule, batch: Any) -> Iterator[None]:
        """Plan the step and, for the shared forward, keep the attributed module's call on the batch image."""
        self._captured = None
        if self.effective_lam(self._step(module)) == 0.0 or self.loss != "negspace":  # RRR: its own pass
            yield
            return
        x, _, mask = self._extract(batch)
        model = attributed_model(module, self.forward, self.output_key)
        with capture_training_forward(model, module, x, mask, norm_mode=self.norm_mode, method=self.method,
                                      allow_autocast=self.allow_autocast, warn=self._warn_once) as step:
            yield
        self._captured = step

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"AttributionPrior({self.name!r}): {msg}")

    def _watch(self, module: LightningModule, task: Tensor | None, pen: Tensor) -> Tensor:
        """``lam='auto'`` calibration (first penalised step), collapse / no-effect detection (both need the task
        loss) and the ``<name>/lam`` log (after calibration); returns ``pen`` (rescaled when λ was calibrated)."""
        result, lam = self.last_result, self.effective_lam(self._step(module))
        if result is None or task is None:
            self._log_lam(module, lam, result)
            return pen
        if self.auto is not None:  # the controller decides when to (re)calibrate; this rank's value is used at once
            new = self.auto.propose(task, result.loss, module.parameters(), step=self._step(module))
            if new is not None:
                pen, self.lam = pen * (new / self.lam), new
                lam = self.effective_lam(self._step(module))
        self._log_lam(module, lam, result)
        sig = step_signals(result) if self.monitor is not None else None
        if sig is None or self.monitor is None:
            return pen
        metrics, causes = self.monitor.update(sig, lam, float(task.detach()))
        if getattr(module, "_trainer", None) is not None:
            for key, value in metrics.items():
                module.log(f"{self.name}/{key}", float(value), on_step=True, on_epoch=False, batch_size=task.numel())
        for cause in causes:
            self._warn_once(cause, self.monitor.message(cause))
        if "collapsed" in causes and self.auto is not None:  # back-off: a tenth of λ from the next step on
            self.auto.flag_collapse()
        return pen

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.feed.clear()
        if self.auto is not None:  # every rank, every batch: the ranks agree on λ outside the penalty computation
            self.lam = self.auto.sync()

    def _weighted_penalty(self, module: LightningModule, batch: Any) -> Tensor | None:
        step = self._step(module)
        lam = self.effective_lam(step)
        captured, self._captured = self._captured, None
        if lam == 0.0:
            return None
        x, y, mask = self._extract(batch)
        if isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
            msg = (f"AttributionPrior({self.name!r}): the batch images contain NaN or inf (samples {bad[:10]}) at "
                   f"global step {step}; the input is broken, not the model (lowering lam will not help): clean "
                   "or filter the data")
            if self.on_nan == "raise":
                raise ValueError(msg + "; or pass on_nan='skip' to train such steps without the prior")
            warnings.warn(msg + "; skipping the prior for this step (on_nan='skip')", RuntimeWarning, stacklevel=2)
            return None
        result = penalty_step(
            module, attributed_model(module, self.forward, self.output_key), x, y, mask, step=captured,
            norm_mode=self.norm_mode, mode=self.mode, method=self.method, non_target=self.non_target,
            n_steps=self.n_steps, baseline=self.baseline, internal_batch_size=self.internal_batch_size,
            attribution_batch=self.attribution_batch, generator=self.generator, allow_autocast=self.allow_autocast,
            keep_norm_stats=self.keep_norm_stats, loss=self.loss, layer=self.layer, normalize=self.normalize,
        )
        self.last_result = result
        value = result.loss
        if not bool(torch.isfinite(value.detach())):
            msg = (f"AttributionPrior({self.name!r}): the prior penalty is {float(value.detach())} at global step "
                   f"{step}; the model or its attributions diverged (lower lam or the learning rate)")
            if self.on_nan == "raise":
                raise FloatingPointError(msg + "; pass on_nan='skip' to train such steps without the prior")
            warnings.warn(msg + "; skipping the prior for this step (on_nan='skip')", RuntimeWarning, stacklevel=2)
            return None
        self.penalised_batches += 1
        self._log(module, result, lam, x.shape[0])
        return lam * value

    def _log(self, module: LightningModule, result: PriorResult, lam: float, batch_size: int) -> None:
        if getattr(module, "_trainer", None) is None:
            return
        kw = {"on_step": True, "on_epoch": False}  # epoch-level sync would need every rank to log
        module.log(f"{self.name}/penalty", result.loss.detach().float(), batch_size=batch_size, **kw)
        mass = result.mass_in_mask()
        if mass is not None:
            module.log(f"{self.name}/mass_in_mask", mass.float(), batch_size=int(result.index.numel()), **kw)

    def _log_lam(self, module: LightningModule, lam: float, result: PriorResult | None) -> None:
        if getattr(module, "_trainer", None) is not None:
            size = max(1, int(result.index.numel())) if result is not None else 1
            module.log(f"{self.name}/lam", float(lam), on_step=True, on_epoch=False, batch_size=size)

    def _extract(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        if self.feed.computed:  # masks from the images (a mask source), computed once per batch
            b = self._keys.unpack(batch, require=("image", "label"), who="AttributionPrior")
            return b.image, b.label, self.feed.masks(b.image)  # type: ignore[return-value]
        b = self._keys.unpack(batch, require=("image", "label", "mask"), who="AttributionPrior")
        return b.image, b.label, b.mask  # type: ignore[return-value]  # required roles are not None
