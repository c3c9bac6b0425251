"""What the prior callback decides and computes without Lightning: the attributed model, λ schedules, the
per-step plan (which pass, which BatchNorm semantics), the shared-forward capture and one penalised step.

BatchNorm semantics (``norm_mode``, see ``docs/priors.md``):

* ``"shared"``: the attributions of the *training forward itself* (the reference implementation's way):
  train-mode norm layers normalise with the statistics of the whole training batch. Computed by
  differentiating the logits of the forward the user's ``training_step`` runs (a forward pre-hook swaps the
  batch image for a ``requires_grad`` copy; the user's tensors are never modified). When that forward
  cannot be captured (autocast, a callable ``forward=``, the module not called on the batch image, manual
  optimisation), the same quantity comes from one separate full-precision forward over the whole batch.
* ``"eval"``: a separate pass over the masked samples with every BatchNorm in eval mode (running
  statistics): per-sample, independent of batch size and composition.
* ``"separate"``: a separate train-mode pass over the masked samples (their own batch statistics). A single
  masked sample has no batch statistics of its own; it is attributed as in ``"eval"`` (one warning).
* ``"auto"`` (default): ``"shared"`` with input×gradient; ``"separate"`` with integrated gradients (which
  cannot reuse the training forward). On models whose samples are independent (no train-mode BatchNorm, no
  active dropout) all modes give the same values and ``"auto"`` picks the cheaper pass.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from negspace.hooks import eval_mode, frozen_norm_stats, frozen_relu_masks
from negspace.priors.checks import NORM_MODES
from negspace.priors.loss import PriorResult, compute_prior, compute_prior_from_logits
from negspace.priors.rightreasons import right_reason_prior

__all__ = [
    "NORM_MODES",
    "LogitsOf",
    "attributed_model",
    "capture_training_forward",
    "eval_norms",
    "forward_error",
    "install_step_wrapper",
    "parse_schedule",
    "penalty_step",
    "plan_step",
    "samples_independent",
    "shared_input",
    "twice_differentiable_attention",
    "uninstall_step_wrapper",
]

Forward = str | Callable[[nn.Module, Tensor], Any]
PLANS = ("capture", "full", "masked", "masked_eval")
_REGISTRY = "_negspace_attribution_priors"  # instance attribute holding the installed wrapper's state
_COPY_OF = "_negspace_shared_copy_of"  # marks the requires_grad copy, so that several priors share one
_LINEAR_RE = re.compile(r"^linear:([1-9][0-9]*)$")
_INPLACE_MARKERS = ("in-place operation", "inplace operation")
_FIX = ("the prior needs a pure function of a float image tensor (B, C, H, W) -> logits: pass forward= (a "
        "dotted path to the submodule that maps images to logits, or a callable (module, x) -> logits)")


def forward_error(err: BaseException, what: str) -> Exception | None:
    """A clear replacement for ``err`` raised while the prior called ``what`` on the image tensor, or ``None``
    when ``err`` is not of the kinds a non-pure forward causes (in-place input edits, a batch-taking forward)."""
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, RuntimeError) and any(s in str(err) for s in _INPLACE_MARKERS):
        return RuntimeError(
            f"AttributionPrior: {what} modifies its input tensor in place ({text}). The prior differentiates "
            "with respect to that tensor, so write the input step out of place (x = (x - mean) / std, not "
            "x.sub_(mean) or x /= std), or pass forward= naming the part of the model after that step"
        )
    if isinstance(err, TypeError | IndexError | KeyError | AttributeError):
        return TypeError(f"AttributionPrior: calling {what} on the image tensor failed ({text}); {_FIX}")
    return None


class LogitsOf:
    """Callable ``x -> logits``: calls ``fn`` and picks the logits from dict/tuple outputs (``key``, default
    ``out["logits"]`` for mappings and ``out[0]`` for tuples). A forward that edits ``x`` in place or does
    not take an image tensor raises an error naming the prior and the fix."""

    def __init__(self, fn: Callable[..., Any], key: str | int | None, what: str = "the attributed model") -> None:
        self.fn, self.key, self.what = fn, key, what

    def __call__(self, x: Tensor) -> Tensor:
        version = x._version
        try:
            out = self.fn(x)
        except Exception as e:
            clear = forward_error(e, self.what)
            if clear is None:
                raise
            raise clear from e
        if x._version != version:
            raise RuntimeError(f"AttributionPrior: {self.what} modified its input tensor in place; write the "
                               "input step out of place (x = (x - mean) / std) or pass forward= naming the part "
                               "of the model after that step")
        return self.pick(out)

    def pick(self, out: Any) -> Tensor:
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
            raise TypeError(f"the attributed model must produce a logits Tensor, got {type(out).__name__}; {_FIX}")
        return out


def attributed_model(module: nn.Module, forward: Forward | None, output_key: str | int | None) -> LogitsOf:
    """What the prior attributes: ``module`` (``forward=None``), the attribute at a dotted path, or
    ``functools.partial(forward, module)`` for a callable."""
    if forward is None:
        target: Callable[..., Any] = module
        what = f"the model (forward=None: {type(module).__name__}.forward)"
    elif isinstance(forward, str):
        target = module
        for part in forward.split("."):
            if not hasattr(target, part):
                raise ValueError(
                    f"forward={forward!r}: {type(target).__name__} has no attribute {part!r}; give a dotted "
                    "path to a submodule or method that returns logits, or a callable (module, x) -> logits"
                )
            target = getattr(target, part)
        if not callable(target):
            raise TypeError(f"forward={forward!r} resolves to a non-callable {type(target).__name__}")
        what = f"the model (forward={forward!r})"
    else:
        target = functools.partial(forward, module)
        what = f"the model (forward={getattr(forward, '__name__', forward)!r})"
    return LogitsOf(target, output_key, what)


def parse_schedule(schedule: object) -> Callable[[int], float] | None:
    """λ schedule: ``None``/``"constant"`` → ``None``; ``"linear:N"`` → ``s -> min(1, (s + 1) / N)``; a callable."""
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


def samples_independent(model: nn.Module) -> bool:
    """True if, as currently set up, ``model``'s forward treats samples independently and deterministically:
    no BatchNorm using batch statistics (train mode, or no running stats) and no active dropout/drop-path.
    Then every ``norm_mode`` computes the same attributions."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or not mod.track_running_stats):
            return False
        if mod.training and "drop" in type(mod).__name__.lower():
            rate = getattr(mod, "p", getattr(mod, "drop_prob", None))
            if rate is None or rate > 0:
                return False
    return True


def twice_differentiable_attention() -> contextlib.AbstractContextManager[None]:
    """Scaled-dot-product attention on its math backend inside the block: the fused (flash / memory-efficient)
    kernels have no double backward, which the prior (``create_graph=True``) needs through every forward it
    differentiates (ViTs and other attention models)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def eval_norms(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm of ``model`` in eval mode (running statistics) inside the block, via
    :func:`negspace.hooks.eval_mode`; everything else (dropout, ...) keeps its mode."""
    with contextlib.ExitStack() as stack:
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
                stack.enter_context(eval_mode(mod))
        yield


def _n_masked(x: object, mask: object) -> int | None:
    if isinstance(x, Tensor) and isinstance(mask, Tensor) and mask.dim() >= 1 and x.dim() >= 1 \
            and mask.shape[0] == x.shape[0]:
        return int(mask.detach().flatten(1).any(1).sum()) if mask.dim() > 1 else int((mask != 0).sum())
    return None


def plan_step(
    norm_mode: str, method: str, x: object, mask: object, target: object, module: nn.Module, *,
    allow_autocast: bool, capture: bool = True,
) -> tuple[str, tuple[str, str] | None]:
    """How to compute this batch's prior: ``(plan, warning)``.

    ``plan``: ``"capture"`` (differentiate the training forward), ``"full"`` (the same from a separate
    forward over the whole batch), ``"masked"`` (a train-mode pass over the masked samples) or
    ``"masked_eval"`` (the same with BatchNorm in eval mode). ``warning`` is a ``(key, message)`` worth one
    warning. ``target`` is the attributed callable, ``module`` the whole model; ``capture=False`` when the
    training forward cannot be captured (manual optimisation).
    """
    if norm_mode not in NORM_MODES:
        raise ValueError(f"norm_mode must be one of {NORM_MODES}, got {norm_mode!r}")
    n = _n_masked(x, mask)
    if n is None or n == 0 or not isinstance(x, Tensor) or not x.is_floating_point():
        return "masked", None  # nothing to attribute, or the checks in compute_prior raise
    net = target if isinstance(target, nn.Module) else module
    coupled = not samples_independent(net)
    explicit = norm_mode == "shared"
    if norm_mode == "auto":
        if method != "input_x_gradient":
            norm_mode = "separate"
        elif coupled:
            norm_mode = "shared"
        elif n * 2 <= x.shape[0]:  # independent samples: attributing only the masked half is as cheap
            return "masked", None
    if norm_mode == "eval":
        return "masked_eval", None
    if norm_mode == "separate":
        if n == 1 and coupled:
            return "masked_eval", ("single", "norm_mode='separate': a single masked sample has no batch statistics "
                                   "of its own; BatchNorm uses running statistics for it (as norm_mode='eval')")
        return "masked", None
    # shared: differentiate the training forward, or recompute it (same statistics) when it cannot be captured
    if capture and isinstance(target, nn.Module) and (allow_autocast or not torch.is_autocast_enabled(x.device.type)):
        return "capture", None
    why = None
    if capture and explicit and isinstance(target, nn.Module):  # only autocast stops a requested capture
        why = ("autocast", "the shared forward falls back to a separate full-precision pass under autocast (with "
               "the training forward's BatchNorm statistics); pass allow_autocast=True to differentiate the "
               "training forward itself")
    return ("full" if coupled else "masked"), why


@contextlib.contextmanager
def shared_input(target: nn.Module, x: Tensor) -> Iterator[dict[str, Any]]:
    """While the block runs, the first call of ``target`` on ``x`` itself gets a ``requires_grad`` copy of
    ``x``; the yielded dict then holds ``"x"`` (the copy) and ``"out"`` (what ``target`` returned). Nested
    captures of the same call (several priors) share one copy."""
    slot: dict[str, Any] = {}

    def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if "x" in slot or not args:
            return None
        if getattr(args[0], _COPY_OF, None) is x:  # another prior already swapped in its copy: share it
            slot["x"] = args[0]
            return None
        if args[0] is x:
            slot["x"] = x.detach().requires_grad_(True)
            setattr(slot["x"], _COPY_OF, x)
            return (slot["x"], *args[1:])
        return None

    def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if "out" not in slot and "x" in slot and args and args[0] is slot["x"]:
            slot["out"] = out

    handles = [target.register_forward_pre_hook(pre_hook), target.register_forward_hook(hook)]
    try:
        yield slot
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_training_forward(
    model: LogitsOf,
    module: nn.Module,
    x: Tensor,
    mask: Tensor,
    *,
    norm_mode: str = "auto",
    method: str = "input_x_gradient",
    allow_autocast: bool = False,
    warn: Callable[[str, str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Around the user's ``training_step``: plan the step (:func:`plan_step`) and, for ``"capture"``, keep the
    attributed module's call on ``x``. After the block the yielded dict holds ``"plan"`` (and ``"x"``,
    ``"out"`` when captured), ready for :func:`penalty_step`'s ``step``. ``warn(key, message)`` is told about
    fallbacks."""
    plan, why = plan_step(norm_mode, method, x, mask, model.fn, module, allow_autocast=allow_autocast)
    state: dict[str, Any] = {"plan": plan}
    if why is not None and warn is not None:
        warn(*why)
    if plan != "capture":
        yield state
        return
    with shared_input(model.fn, x) as slot, twice_differentiable_attention():
        try:
            yield state
        except RuntimeError as e:  # an in-place edit of the requires_grad copy we fed the module
            clear = forward_error(e, model.what) if "x" in slot else None
            if clear is None:
                raise
            raise clear from e
    if "out" in slot:
        state.update(slot)
        return
    state["plan"] = "full" if not samples_independent(model.fn) else "masked"
    if warn is not None:
        warn("miss", f"the shared forward did not see {model.what} called on the batch image tensor in "
             "training_step (does your forward take the whole batch, or a copy of the image?); computing the "
             "prior with a separate forward pass instead")


def penalty_step(
    module: nn.Module,
    model: LogitsOf,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    *,
    step: Mapping[str, Any] | None = None,
    norm_mode: str = "auto",
    mode: str = "presence_absence",
    method: str = "input_x_gradient",
    non_target: str = "complement",
    n_steps: int = 16,
    baseline: float | None = None,
    internal_batch_size: int | None = None,
    attribution_batch: int | None = None,
    generator: torch.Generator | None = None,
    allow_autocast: bool = False,
    keep_norm_stats: bool = True,
    normalize: str = "mask",
    loss: str = "negspace",
    layer: str | None = None,
) -> PriorResult:
    """The unweighted prior of one training batch, as the callback adds it.

    ``loss``: ``"negspace"`` (paper 000, ``mode=``) or a right-reason loss of the literature (``"rrr"``,
    ``"rrr_gradcam"`` at ``layer``; :mod:`negspace.priors.rightreasons`), computed in the same planned pass
    (a captured training forward becomes a separate full-batch pass with the same BatchNorm statistics).

    ``step`` (from :func:`capture_training_forward`) holds the plan and, for ``"capture"``, the training
    forward's input copy and output; without it the step is planned here (no capture). Separate passes run
    with BatchNorm running statistics of the whole ``module`` frozen (``keep_norm_stats``) and constant ReLU
    masks (exact; spares the double backward a pass of zeros). Autocast is off unless ``allow_autocast``.
    """
    if step is None:
        step = {"plan": plan_step(norm_mode, method, x, mask, model.fn, module, allow_autocast=allow_autocast,
                                  capture=False)[0]}
    plan = step["plan"]
    if plan not in PLANS:
        raise ValueError(f"step['plan'] must be one of {PLANS}, got {plan!r}")
    autocast = (
        contextlib.nullcontext() if allow_autocast else torch.autocast(device_type=x.device.type, enabled=False)
    )
    kw: dict[str, Any] = {"mode": mode, "non_target": non_target, "generator": generator,
                          "attribution_batch": attribution_batch, "normalize": normalize}
    if plan == "capture" and loss == "negspace":
        with autocast:
            return compute_prior_from_logits(model.pick(step["out"]), step["x"], y, mask, **kw)
    norm = frozen_norm_stats(module) if keep_norm_stats else contextlib.nullcontext()
    evals = eval_norms(module) if plan == "masked_eval" else contextlib.nullcontext()
    with autocast, norm, evals, frozen_relu_masks(module), twice_differentiable_attention():
        if loss != "negspace":
            net = model.fn if isinstance(model.fn, nn.Module) else module
            return right_reason_prior(model, x, y, mask, loss=loss, layer=layer, network=net, generator=generator,
                                      attribution_batch=attribution_batch, all_rows=plan in ("capture", "full"))
        if plan == "full":
            xr = x.detach().requires_grad_(True)
            return compute_prior_from_logits(model(xr), xr, y, mask, **kw)
        return compute_prior(
            model, x, y, mask, method=method, n_steps=n_steps, baseline=baseline,
            internal_batch_size=internal_batch_size, keep_norm_stats=False, **kw,  # frozen above, on the whole module
        )


def install_step_wrapper(module: nn.Module, cb: Any) -> None:
    """Register ``cb``; the first registration replaces the instance's ``training_step`` by one shared wrapper
    that serves every AttributionPrior on the module (in registration order, removable in any order)."""
    reg = module.__dict__.get(_REGISTRY)
    if reg is None:
        user_step = module.training_step  # bound method (or a user-set instance attribute)
        priors: list[Any] = []

        @functools.wraps(user_step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            batch = args[0] if args else kwargs.get("batch")
            active = list(priors)
            with contextlib.ExitStack() as stack:
                for prior in active:  # plan the step; the shared forward captures the user's own forward
                    stack.enter_context(prior._capture(module, batch))
                out = user_step(*args, **kwargs)
            for prior in active:
                out = prior._add_to_output(module, batch, out)
            return out

        had, original = "training_step" in module.__dict__, module.__dict__.get("training_step")
        reg = {"priors": priors, "had": had, "original": original}
        module.__dict__[_REGISTRY] = reg
        module.__dict__["training_step"] = training_step
    if cb not in reg["priors"]:
        reg["priors"].append(cb)


def uninstall_step_wrapper(module: nn.Module, cb: Any) -> None:
    """Unregister ``cb``; the last one out restores the module's own ``training_step`` exactly."""
    reg = module.__dict__.get(_REGISTRY)
    if reg is None:
        return
    if cb in reg["priors"]:
        reg["priors"].remove(cb)
    if not reg["priors"]:
        if reg["had"]:
            module.__dict__["training_step"] = reg["original"]
        else:
            module.__dict__.pop("training_step", None)
        module.__dict__.pop(_REGISTRY, None)
