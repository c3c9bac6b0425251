"""``AttributionPrior``: paper 000's presence / presence+absence attribution prior as a drop-in callback.

Mechanism (see shared DESIGN.md, verified by the tests in ``tests/test_prior_callback.py``): in
``setup("fit")`` the callback replaces the LightningModule *instance's* ``training_step`` by a thin
wrapper that calls the user's ``training_step`` and adds ``λ · prior_loss`` to the loss it returns (a
tensor or ``dict["loss"]``). The wrapper runs wherever Lightning runs ``training_step`` — inside the DDP
forward, the precision plugin's autocast and the optimizer closure — so gradient accumulation, GradScaler,
DDP gradient reduction and gradient clipping all see the penalised loss, exactly like a hand-written
``loss = ce + lam * prior_loss(...)``. The wrapper is removed in ``teardown`` and in ``on_exception``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from negspace.batch import BatchKeys
from negspace.hooks import frozen_relu_masks
from negspace.priors import (
    METHODS,
    MODES,
    PriorResult,
    compute_prior,
    compute_prior_from_logits,
    frozen_norm_stats,
    parse_non_target,
)

__all__ = ["AttributionPrior"]

_REGISTRY = "_negspace_attribution_priors"  # instance attribute holding the installed wrapper's state
_LINEAR_RE = re.compile(r"^linear:([1-9][0-9]*)$")

Forward = str | Callable[[nn.Module, Tensor], Any]


# ---------------------------------------------------------------------------- wrapper installation
def _install(module: LightningModule, cb: AttributionPrior) -> None:
    """Register ``cb`` on ``module``; the first registration replaces the instance's ``training_step``.

    One shared wrapper serves every AttributionPrior on the module (applied in registration order), so
    several instances can be installed and removed in any order without unwrapping each other.
    """
    reg = module.__dict__.get(_REGISTRY)
    if reg is None:
        user_step = module.training_step  # bound method (or a user-set instance attribute)
        priors: list[AttributionPrior] = []

        @functools.wraps(user_step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            batch = args[0] if args else kwargs.get("batch")
            active = list(priors)
            with contextlib.ExitStack() as stack:
                for prior in active:  # share_forward: capture the logits of the user's own forward
                    stack.enter_context(prior._capture(module, batch))
                out = user_step(*args, **kwargs)
            for prior in active:
                out = prior._add_to_output(module, batch, out)
            return out

        reg = {
            "priors": priors,
            "had_instance_attr": "training_step" in module.__dict__,
            "original": module.__dict__.get("training_step"),
        }
        module.__dict__[_REGISTRY] = reg
        module.__dict__["training_step"] = training_step
    if cb not in reg["priors"]:
        reg["priors"].append(cb)


def _uninstall(module: LightningModule, cb: AttributionPrior) -> None:
    """Unregister ``cb``; the last one out restores the module's own ``training_step`` exactly."""
    reg = module.__dict__.get(_REGISTRY)
    if reg is None:
        return
    if cb in reg["priors"]:
        reg["priors"].remove(cb)
    if not reg["priors"]:
        if reg["had_instance_attr"]:
            module.__dict__["training_step"] = reg["original"]
        else:
            module.__dict__.pop("training_step", None)
        module.__dict__.pop(_REGISTRY, None)


# --------------------------------------------------------------------------------------- callback
class AttributionPrior(Callback):
    """Add paper 000's attribution prior ``lam · prior_loss`` to an unmodified module's training loss.

    Usage::

        trainer = Trainer(callbacks=[AttributionPrior(lam=1.0, mode="presence_absence")])
        trainer.fit(model, datamodule)   # batches carry a mask of the spurious region

    Args:
        lam: prior weight λ (eq. 2/3 of paper 000).
        mode, method, non_target, n_steps: as in :func:`negspace.priors.prior_loss`.
        batch_keys: where image, label and mask live in the batch. Default: dict batches use
            ``"image"``, ``"label"``, ``"mask"``; tuple/list batches ``(image, label, mask[, ...])``. Give a
            mapping ``{"image": "x", "label": "y", "mask": "m"}`` (keys or tuple indices; missing roles keep
            their default), a sequence ``("x", "y", "m")`` / ``(0, 2, 3)``, or a callable
            ``batch -> (image, label, mask)`` (the shared layout rules of :mod:`negspace.batch`).
        forward: what is attributed. Default ``None``: the LightningModule itself, so ``module(x)`` must
            return logits ``(B, num_classes)``. A dotted attribute path (``"model"``, ``"net.classifier_logits"``)
            resolved on the module, or a callable ``(module, x) -> output``. Non-tensor outputs are reduced
            with ``output_key`` (default: ``out["logits"]`` for mappings, ``out[0]`` for tuples).
        start_step: no penalty (and no extra compute) before this ``trainer.global_step``.
        lam_schedule: ``None`` (constant), ``"linear:N"`` (λ ramps as ``lam·min(1, (s+1)/N)`` with
            ``s = global_step − start_step``) or a callable ``s -> factor``; the effective λ is ``lam·factor``.
        allow_autocast: compute the penalty inside the precision plugin's autocast. Default ``False``:
            autocast is switched off for the prior (double backward in bf16/fp16 is noisy).
        keep_norm_stats: the prior's extra forward passes run on cloned BatchNorm running statistics, so
            they never change them (the normal forward still updates them as usual).
        on_nan: ``"raise"`` (default): a non-finite penalty raises ``FloatingPointError`` — it means the
            model or its attributions have diverged. ``"skip"``: warn and train that step without the prior.
        seed: seeds the generator of ``non_target="sample:K"`` (offset by the global rank); its state is
            checkpointed so resumed runs draw the same classes.
        share_forward: ``"auto"`` (default), ``True`` or ``False``. When sharing, the prior does not run its
            own forward pass: a forward pre-hook on the attributed module swaps the batch image for a
            ``requires_grad`` copy (same values; your tensors are never modified) and the prior
            differentiates the logits of the forward your ``training_step`` runs, so loss and prior share
            one forward and one backward through it (≈ 30 % less time per step, see docs/priors.md).
            Input×gradient only. ``"auto"`` shares only when this is exactly the default computation:
            no train-mode BatchNorm (batch statistics couple the samples) and no active dropout/drop-path
            in the attributed model (e.g. X-models), no autocast (unless ``allow_autocast``), and the
            module is called on the batch's image tensor itself, and more than half of the batch is
            masked (below that, attributing only the masked samples separately is as cheap); otherwise it
            silently uses the separate pass. ``True`` also shares with train-mode BatchNorm (the attributions are then those of the
            training forward, with full-batch statistics) and warns when it has to fall back.
        name: log prefix (``<name>/penalty``, ``<name>/mass_in_mask``, ``<name>/lam``) and part of
            ``state_key``; give distinct names to several instances with the same settings.

    Logged per step: ``<name>/penalty`` (the unweighted prior loss), ``<name>/mass_in_mask`` (mean
    share of |target attribution| inside the mask over masked samples, paper 000 Table 2 "Attr.") and
    ``<name>/lam`` (effective λ).

    Manual optimisation (``automatic_optimization = False``): the callback cannot see your loss; it warns
    and does not wrap. Call ``loss = loss + prior_cb.penalty(self, batch)`` in your ``training_step``
    before ``self.manual_backward(loss)`` (the returned tensor is already multiplied by the effective λ).
    """

    def __init__(
        self,
        lam: float = 1.0,
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
        share_forward: bool | str = "auto",
        name: str = "attribution_prior",
    ) -> None:
        super().__init__()
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite float >= 0, got {lam!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        parse_non_target(non_target)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if on_nan not in ("raise", "skip"):
            raise ValueError(f"on_nan must be 'raise' or 'skip', got {on_nan!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if forward is not None and not isinstance(forward, str) and not callable(forward):
            raise TypeError(
                f"forward must be None, a dotted attribute path or a callable (module, x) -> logits, got {forward!r}"
            )
        self.lam = float(lam)
        self.mode = mode
        self.method = method
        self.non_target = non_target
        self.n_steps = n_steps
        self.batch_keys = batch_keys
        self._keys = BatchKeys(batch_keys)
        self.forward = forward
        self.output_key = output_key
        self.start_step = start_step
        self.lam_schedule = lam_schedule
        self._schedule = _parse_schedule(lam_schedule)
        self.baseline = baseline
        self.internal_batch_size = internal_batch_size
        self.allow_autocast = bool(allow_autocast)
        self.keep_norm_stats = bool(keep_norm_stats)
        self.on_nan = on_nan
        self.seed = int(seed)
        self.name = name
        if share_forward not in (True, False, "auto"):
            raise ValueError(f"share_forward must be True, False or 'auto', got {share_forward!r}")
        if share_forward is True and (method != "input_x_gradient" or callable(forward)):
            raise ValueError(
                "share_forward=True needs method='input_x_gradient' and forward=None or a dotted path to a "
                f"module; got method={method!r}, forward={forward!r}"
            )
        self.share_forward = share_forward
        self._captured: dict[str, Any] | None = None
        self._warned: set[str] = set()
        self.generator: torch.Generator | None = None
        self._pending_gen_state: Tensor | None = None
        self.penalised_batches = 0  # batches that received a penalty (checkpointed)
        self.last_result: PriorResult | None = None

    # ---------------------------------------------------------------------------- Lightning hooks
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            name=self.name, mode=self.mode, lam=self.lam, method=self.method, non_target=self.non_target
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.non_target.startswith("sample:") and self.generator is None:
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
        _install(pl_module, self)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _uninstall(pl_module, self)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning does not call `teardown` on callbacks when fit raises; never leave the wrapper behind.
        _uninstall(pl_module, self)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"penalised_batches": int(self.penalised_batches)}
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.penalised_batches = int(state_dict.get("penalised_batches", 0))
        gen_state = state_dict.get("generator_state")
        if gen_state is not None:
            if self.generator is not None:
                self.generator.set_state(gen_state)
            else:
                self._pending_gen_state = gen_state

    # --------------------------------------------------------------------------------- the penalty
    def effective_lam(self, step: int) -> float:
        """λ at ``trainer.global_step == step`` (0 before ``start_step``)."""
        if step < self.start_step:
            return 0.0
        s = step - self.start_step
        return self.lam * (1.0 if self._schedule is None else float(self._schedule(s)))

    def penalty(self, module: LightningModule, batch: Any) -> Tensor:
        """``λ_eff · prior_loss`` for ``batch`` (a 0-dim tensor; exactly 0 when inactive).

        For manual optimisation: ``loss = loss + prior_callback.penalty(self, batch)``. Logs like the
        automatic path.
        """
        pen = self._weighted_penalty(module, batch)
        if pen is None:
            x, _, _ = self._extract(batch)
            return torch.zeros((), dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
        return pen

    def _add_to_output(self, module: LightningModule, batch: Any, out: Any) -> Any:
        if out is None:  # the user skipped this batch
            return out
        if isinstance(out, Tensor):
            loss = out
        elif isinstance(out, Mapping):
            if "loss" not in out:
                raise ValueError(
                    "AttributionPrior: training_step returned a dict without a 'loss' key "
                    f"(keys: {sorted(map(str, out))}); return the loss tensor or {{'loss': ...}}"
                )
            loss = out["loss"]
        else:
            raise TypeError(
                "AttributionPrior: training_step must return the loss tensor, a dict with 'loss', or None; "
                f"got {type(out).__name__}"
            )
        pen = self._weighted_penalty(module, batch)
        if pen is None:
            return out
        new_loss = loss + pen
        if isinstance(out, Tensor):
            return new_loss
        new_out = dict(out)
        new_out["loss"] = new_loss
        return new_out

    def _step(self, module: LightningModule) -> int:
        trainer = getattr(module, "_trainer", None)
        return trainer.global_step if trainer is not None else self.penalised_batches

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"AttributionPrior({self.name!r}): {msg}")

    @contextlib.contextmanager
    def _capture(self, module: LightningModule, batch: Any) -> Iterator[None]:
        """Shared forward: while the user's ``training_step`` runs, feed the attributed module a
        ``requires_grad`` copy of the batch image and keep the logits it returns."""
        self._captured = None
        share = self.share_forward
        if share is False or self.method != "input_x_gradient" or callable(self.forward):
            yield
            return
        if self.effective_lam(self._step(module)) == 0.0:
            yield
            return
        x, _, mask = self._extract(batch)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            yield
            return
        if isinstance(mask, Tensor) and mask.dim() >= 1 and mask.shape[0] == x.shape[0]:
            masked = float(mask.detach().flatten(1).any(1).float().mean())
            # nothing masked: no prior. "auto" with at most half the batch masked: the separate pass on the
            # masked samples costs about as much as the shared full-batch backward (benchmarks/priors.py)
            if masked == 0.0 or (share == "auto" and masked <= 0.5):
                yield
                return
        if not self.allow_autocast and torch.is_autocast_enabled(x.device.type):
            if share is True:
                self._warn_once("autocast", "share_forward falls back to a separate forward pass under autocast "
                                "(the prior is computed in full precision; pass allow_autocast=True to share)")
            yield
            return
        target = self._attributed(module).fn
        if not isinstance(target, nn.Module):
            if share is True:
                self._warn_once("module", f"share_forward needs forward= to name a module, got {self.forward!r}")
            yield
            return
        if share == "auto" and not samples_independent(target):
            yield
            return
        slot: dict[str, Any] = {}

        def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if "x" not in slot and args and args[0] is x:
                slot["x"] = x.detach().requires_grad_(True)
                return (slot["x"], *args[1:])
            return None

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if "out" not in slot and "x" in slot and args and args[0] is slot["x"]:
                slot["out"] = out

        handles = [target.register_forward_pre_hook(pre_hook), target.register_forward_hook(hook)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if "out" in slot:
            self._captured = slot
        elif share is True:
            self._warn_once("miss", "share_forward: the attributed module was not called on the batch image "
                            "tensor in training_step; using a separate forward pass instead")

    def _weighted_penalty(self, module: LightningModule, batch: Any) -> Tensor | None:
        step = self._step(module)
        lam = self.effective_lam(step)
        captured, self._captured = self._captured, None
        if lam == 0.0:
            return None
        x, y, mask = self._extract(batch)
        model = self._attributed(module)
        autocast = (
            contextlib.nullcontext()
            if self.allow_autocast
            else torch.autocast(device_type=x.device.type, enabled=False)
        )
        norm = frozen_norm_stats(module) if self.keep_norm_stats else contextlib.nullcontext()
        if captured is not None:
            logits = _LogitsOf(lambda _x: captured["out"], self.output_key)(x)
            with autocast:
                result = compute_prior_from_logits(
                    logits, captured["x"], y, mask, mode=self.mode, non_target=self.non_target, generator=self.generator
                )
        else:
            # frozen ReLU masks: exact, spares the double backward a pass of zeros (see hooks.frozen_relu_masks)
            with autocast, norm, frozen_relu_masks(module):
                result = compute_prior(
                    model,
                    x,
                    y,
                    mask,
                    mode=self.mode,
                    method=self.method,
                    non_target=self.non_target,
                    n_steps=self.n_steps,
                    baseline=self.baseline,
                    internal_batch_size=self.internal_batch_size,
                    generator=self.generator,
                    keep_norm_stats=False,  # done above, on the whole LightningModule
                )
        self.last_result = result
        value = result.loss
        if not bool(torch.isfinite(value.detach())):
            msg = (
                f"AttributionPrior({self.name!r}): the prior penalty is {float(value.detach())} at global step {step}; "
                "the model or its attributions diverged (lower lam or the learning rate)"
            )
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
        module.log(f"{self.name}/lam", float(lam), batch_size=batch_size, **kw)
        mass = result.mass_in_mask()
        if mass is not None:
            module.log(f"{self.name}/mass_in_mask", mass.float(), batch_size=int(result.index.numel()), **kw)

    # ------------------------------------------------------------------------------- batch / model
    def _extract(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        b = self._keys.unpack(batch, require=("image", "label", "mask"), who="AttributionPrior")
        return b.image, b.label, b.mask  # type: ignore[return-value]  # required roles are not None

    def _attributed(self, module: LightningModule) -> Callable[[Tensor], Tensor]:
        fwd = self.forward
        if fwd is None:
            target: Callable[..., Any] = module
        elif isinstance(fwd, str):
            target = module
            for part in fwd.split("."):
                if not hasattr(target, part):
                    raise ValueError(
                        f"forward={fwd!r}: {type(target).__name__} has no attribute {part!r}; give a dotted "
                        "path to a submodule or method that returns logits, or a callable (module, x) -> logits"
                    )
                target = getattr(target, part)
            if not callable(target):
                raise TypeError(f"forward={fwd!r} resolves to a non-callable {type(target).__name__}")
        else:
            target = functools.partial(fwd, module)
        return _LogitsOf(target, self.output_key)


class _LogitsOf:
    """Callable ``x -> logits``: calls ``fn`` and picks the logits from dict/tuple outputs."""

    def __init__(self, fn: Callable[..., Any], key: str | int | None) -> None:
        self.fn, self.key = fn, key

    def __call__(self, x: Tensor) -> Tensor:
        out = self.fn(x)
        if isinstance(out, Tensor) and self.key is None:
            return out
        if self.key is not None:
            try:
                out = out[self.key]
            except (KeyError, IndexError, TypeError) as e:
                raise ValueError(f"output_key={self.key!r} not found in the model output ({type(out).__name__})") from e
        elif isinstance(out, Mapping):
            if "logits" not in out:
                raise ValueError(
                    f"the attributed model returned a dict with keys {sorted(map(str, out))}; pass output_key="
                )
            out = out["logits"]
        elif isinstance(out, tuple | list):
            out = out[0]
        if not isinstance(out, Tensor):
            raise TypeError(f"the attributed model must produce a logits Tensor, got {type(out).__name__}")
        return out


def samples_independent(model: nn.Module) -> bool:
    """True if, as currently set up, ``model``'s forward treats samples independently and deterministically:
    no BatchNorm using batch statistics (train mode, or no running stats) and no active dropout/drop-path.
    Then the shared forward computes exactly what a separate attribution pass would."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or not mod.track_running_stats):
            return False
        if mod.training and "drop" in type(mod).__name__.lower():
            rate = getattr(mod, "p", getattr(mod, "drop_prob", None))
            if rate is None or rate > 0:
                return False
    return True


def _parse_schedule(schedule: object) -> Callable[[int], float] | None:
    if schedule is None or schedule == "constant":
        return None
    if isinstance(schedule, str):
        match = _LINEAR_RE.match(schedule)
        if match:
            n = int(match.group(1))
            return lambda s: min(1.0, (s + 1) / n)
        raise ValueError(f"lam_schedule must be None, 'constant', 'linear:<steps>' or a callable; got {schedule!r}")
    if callable(schedule):
        return schedule
    raise TypeError(f"lam_schedule must be None, a string or a callable step -> factor, got {type(schedule).__name__}")
