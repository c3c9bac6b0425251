"""Presence / presence+absence attribution priors (paper 000, appendix B.4, eqs. 2 and 3).

For an input ``x`` with spurious-region mask ``P`` (1 inside the region), label ``t`` and model ``f``:

* presence (eq. 2):          ``L = 2·prior(A(x, t))``
* presence+absence (eq. 3):  ``L = prior(A(x, t)) + mean_{t' ∈ non_target} prior(A(x, t'))``

with ``prior(A) = Σ|A·P| / (ΣP + 1e-5)`` (|A| summed over channels and pixels, ``P`` broadcast over
channels) and ``A`` an input attribution (input×gradient, or integrated gradients with a zero baseline as
in the paper). The batch loss is the mean over *all* samples; samples with an empty mask contribute
exactly 0 and are not even sent through the model.

Target and non-target attributions come from one forward pass with K = 1 + #non-targets batched
backward passes (:func:`negspace.attribution.input_x_gradient` / ``integrated_gradients`` with a
``(B, K)`` target and ``create_graph=True``), never one full pass per class.

Pure torch; no Lightning import (the callback :class:`negspace.callbacks.AttributionPrior` is thin glue).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from negspace.attribution import input_x_gradient, integrated_gradients, relative_mass_in_mask
from negspace.attribution.engine import check_input, grads_per_target
from negspace.objectives import Objective, logit

__all__ = [
    "EPS",
    "METHODS",
    "MODES",
    "PriorResult",
    "attribution_prior",
    "check_mask",
    "compute_prior",
    "compute_prior_from_logits",
    "frozen_norm_stats",
    "parse_non_target",
    "prior_loss",
]

EPS = 1e-5  # paper 000, eq. 2/3: "we add 10^-5 to the denominator"
MODES = ("presence", "presence_absence")
METHODS = ("input_x_gradient", "integrated_gradients")
_NON_TARGET_RE = re.compile(r"^(top|sample):([1-9][0-9]*)$")


# --------------------------------------------------------------------------------------------- masks
def check_mask(mask: object, x: Tensor, name: str = "mask") -> Tensor:
    """Validate ``mask`` against the image batch ``x: (B, C, *S)`` and return it as ``(B, 1, *S)``.

    Accepted: any shape that broadcasts to ``(B, 1, *S)`` (e.g. ``(B, 1, H, W)``, ``(1, H, W)``,
    ``(H, W)``), and ``(B, *S)`` (a channel axis is inserted). Values must be finite and in [0, 1];
    bool and integer masks are converted to ``x.dtype``.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor broadcastable to (B, 1, H, W), got {type(mask).__name__}")
    if x.dim() < 3:
        raise ValueError(f"x must be a batch of images (B, C, H, W) for a {name}, got shape {tuple(x.shape)}")
    target = (x.shape[0], 1, *x.shape[2:])
    m = mask
    if m.dim() == x.dim() - 1 and m.shape[0] == x.shape[0] and tuple(m.shape[1:]) == tuple(x.shape[2:]):
        m = m.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    try:
        m = torch.broadcast_to(m, target)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to (B, 1, H, W) = {target} of the image "
            f"batch x {tuple(x.shape)}; use one mask channel, e.g. shape (B, 1, H, W) or (B, H, W)"
        ) from None
    if m.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {m.dtype}")
    m = m.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    if m.numel():
        if not torch.isfinite(m).all():
            raise ValueError(f"{name} contains NaN or inf; it must hold values in [0, 1]")
        lo, hi = float(m.min()), float(m.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} values must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    return m


def attribution_prior(attributions: Tensor, mask: Tensor) -> Tensor:
    """Paper 000's prior term ``Σ|A·P| / (ΣP + 1e-5)`` per sample (and per target).

    Args:
        attributions: ``(B, C, H, W)`` or, for K targets per sample, ``(B, K, C, H, W)``.
        mask: broadcastable to ``(B, 1, H, W)`` (or ``(B, H, W)``), values in [0, 1]; ``ΣP`` sums pixels
            only (the mask is broadcast over channels, the numerator sums |A| over channels and pixels).

    Returns:
        ``(B,)`` or ``(B, K)``. Samples with an empty mask give exactly 0.
    """
    if not isinstance(attributions, Tensor):
        raise TypeError(f"attributions must be a Tensor, got {type(attributions).__name__}")
    if attributions.dim() == 4:
        multi = False
        img = attributions
    elif attributions.dim() == 5:
        multi = True
        img = attributions[:, 0]
    else:
        raise ValueError(
            "attributions must be (B, C, H, W) or (B, K, C, H, W), got shape " f"{tuple(attributions.shape)}"
        )
    m = check_mask(mask, img)  # (B, 1, H, W)
    denom = m.flatten(1).sum(1) + EPS  # (B,)
    a = attributions.abs()
    if multi:
        num = (a * m.unsqueeze(1)).flatten(2).sum(2)  # (B, K)
        return num / denom.unsqueeze(1)
    return (a * m).flatten(1).sum(1) / denom


# ---------------------------------------------------------------------------------- non-target choice
def parse_non_target(non_target: object) -> tuple[str, int]:
    """``"complement" | "all" | "top:K" | "sample:K"`` → ``(kind, K)`` (K = 0 when not applicable)."""
    if isinstance(non_target, str):
        if non_target in ("complement", "all"):
            return non_target, 0
        match = _NON_TARGET_RE.match(non_target)
        if match:
            return match.group(1), int(match.group(2))
    raise ValueError(
        "non_target must be 'complement' (binary: 1 - y), 'all', 'top:K' or 'sample:K' with K a positive int; "
        f"got {non_target!r}"
    )


def _others(y: Tensor, num_classes: int) -> Tensor:
    """``(B, num_classes - 1)``: every class except ``y``, in increasing order."""
    cls = torch.arange(num_classes, device=y.device).expand(y.shape[0], num_classes)
    return cls[cls != y[:, None]].view(y.shape[0], num_classes - 1)


def _resolve_targets(
    y: Tensor, logits: Tensor, mode: str, kind: str, k: int, generator: torch.Generator | None
) -> Tensor:
    """``(B, 1 + #non-targets)`` class indices: column 0 the label, then the non-target classes."""
    b, n = logits.shape[0], logits.shape[1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n):
        raise ValueError(f"y holds class indices outside [0, {n}) of the model output (got {y.min()}..{y.max()})")
    y = y.to(logits.device)
    if mode == "presence":
        return y[:, None]
    if kind == "complement":
        if n != 2:
            raise ValueError(
                f"non_target='complement' needs a binary classifier (2 logits), the model returns {n}; "
                "use 'all', 'top:K' or 'sample:K'"
            )
        nt = (1 - y)[:, None]
    elif kind == "all":
        if n < 2:
            raise ValueError(f"non_target='all' needs at least 2 classes, the model returns {n}")
        nt = _others(y, n)
    else:
        if k > n - 1:
            raise ValueError(f"non_target='{kind}:{k}' needs K <= num_classes - 1 = {n - 1}")
        if kind == "top":
            masked = logits.detach().float().scatter(1, y[:, None], float("-inf"))
            nt = masked.topk(k, dim=1).indices
        else:  # sample: K distinct random other classes
            gen_device = generator.device if generator is not None else torch.device("cpu")
            scores = torch.rand(b, n - 1, generator=generator, device=gen_device).to(logits.device)
            nt = _others(y, n).gather(1, scores.argsort(dim=1)[:, :k])
    return torch.cat([y[:, None], nt], dim=1)


class _PriorTargets(Objective):
    """Objective ``logits -> (B, K)``: label plus non-target logits, classes resolved on first use.

    The classes are resolved from the first logits it sees and then cached, so that the IG path (one
    call per group of path points) explains the same classes everywhere. ``top:K`` needs the logits at
    the actual input, which :meth:`fix` provides (``integrated_gradients`` calls it).
    """

    def __init__(self, y: Tensor, mode: str, kind: str, k: int, generator: torch.Generator | None) -> None:
        self.y, self.mode, self.kind, self.k, self._gen = y, mode, kind, k, generator
        self._targets: Tensor | None = None

    def _targets_for(self, out: Tensor) -> Tensor:
        if out.dim() != 2:
            raise ValueError(f"the model must return logits (B, num_classes), got shape {tuple(out.shape)}")
        if self._targets is None:
            self._targets = _resolve_targets(self.y, out, self.mode, self.kind, self.k, self._gen)
        return self._targets

    def __call__(self, out: Tensor) -> Tensor:
        return out.gather(1, self._targets_for(out))


class _TopTargets(_PriorTargets):
    """``top:K`` depends on the logit values: resolve at the actual input, not at an IG path point."""

    def fix(self, out: Tensor) -> Objective:
        return logit(self._targets_for(out))


# ------------------------------------------------------------------------------- BatchNorm protection
@contextlib.contextmanager
def frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    """Keep the running statistics of every BatchNorm/InstanceNorm in ``module`` unchanged.

    Inside the context each norm layer works on *clones* of its ``running_mean``/``running_var``/
    ``num_batches_tracked`` buffers; on exit (also after an exception) the original tensor objects are put
    back untouched. Swapping instead of copying back keeps autograd happy (the extra graph holds the
    clones, the originals are never modified in place) and is exact for any momentum, including
    ``momentum=None`` (cumulative average). The forward itself is unchanged: train-mode layers still
    normalise with batch statistics.
    """
    saved: list[tuple[nn.Module, str, Tensor]] = []
    try:
        for mod in module.modules():
            if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    buf = mod._buffers.get(name)
                    if buf is not None:
                        saved.append((mod, name, buf))
                        mod._buffers[name] = buf.clone()
        yield
    finally:
        for mod, name, buf in saved:
            mod._buffers[name] = buf


# ---------------------------------------------------------------------------------------- the loss
@dataclass
class PriorResult:
    """Everything one prior evaluation produced.

    ``loss``: scalar (differentiable). ``per_sample``: ``(B,)`` per-sample prior (0 for empty masks).
    ``index``: ``(M,)`` indices of the masked samples that were attributed. ``attributions``:
    ``(M, K, C, H, W)`` (graph-connected; column 0 is the target attribution). ``targets``: ``(M, K)``.
    """

    loss: Tensor
    per_sample: Tensor
    index: Tensor
    attributions: Tensor | None
    targets: Tensor | None
    mask: Tensor

    def mass_in_mask(self) -> Tensor | None:
        """Mean share of |target attribution| inside the mask over masked samples (``None`` if none)."""
        if self.attributions is None or self.index.numel() == 0:
            return None
        a = self.attributions[:, 0].detach()
        return relative_mass_in_mask(a, self.mask[self.index]).mean()


def _check_options(mode: object, method: object, non_target: object, n_steps: object) -> tuple[str, int]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    return parse_non_target(non_target)


def _check_labels(y: object, batch: int) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a LongTensor of class indices (B,), got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"y must have shape (B,) = ({batch},), got {tuple(y.shape)}")
    return y.long()


def compute_prior(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    *,
    mode: str = "presence_absence",
    method: str = "input_x_gradient",
    non_target: str = "complement",
    n_steps: int = 16,
    baseline: float | Tensor | None = None,
    internal_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    keep_norm_stats: bool = True,
) -> PriorResult:
    """:func:`prior_loss` with its intermediate results (used by the callback for logging)."""
    kind, k = _check_options(mode, method, non_target, n_steps)
    check_input(x)
    b = x.shape[0]
    yl = _check_labels(y, b)
    m = check_mask(mask, x)
    has_mask = m.flatten(1).sum(1) > 0  # (B,)
    index = has_mask.nonzero().flatten()
    if index.numel() == 0:
        # Nothing to attribute: exactly zero, no model call. A grad-requiring leaf keeps
        # `prior_loss(...).backward()` valid; it adds nothing to any parameter's gradient.
        zero = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=torch.is_grad_enabled())
        return PriorResult(zero, x.new_zeros(b), index, None, None, m)
    all_masked = index.numel() == b
    xs = x if all_masked else x.index_select(0, index)
    ms = m if all_masked else m.index_select(0, index)
    ys = yl if all_masked else yl.index_select(0, index.to(yl.device))
    cls = _TopTargets if (mode == "presence_absence" and kind == "top") else _PriorTargets
    objective = cls(ys, mode, kind, k, generator)
    ctx = frozen_norm_stats(model) if keep_norm_stats and isinstance(model, nn.Module) else contextlib.nullcontext()
    with ctx:
        if method == "input_x_gradient":
            attr = input_x_gradient(model, xs, objective, create_graph=True)
        else:
            attr = integrated_gradients(
                model,
                xs,
                objective,
                baseline=baseline,
                n_steps=n_steps,
                create_graph=True,
                internal_batch_size=internal_batch_size,
            )
    if attr.dim() == x.dim():  # single target came back without the K axis
        attr = attr.unsqueeze(1)
    return _combine(attr, ms, m, index, objective._targets, mode, b)


def _combine(
    attr: Tensor, ms: Tensor, m: Tensor, index: Tensor, targets: Tensor | None, mode: str, b: int
) -> PriorResult:
    """Eq. 2/3 from the ``(M, K, C, H, W)`` attributions of the M masked samples of a batch of B."""
    terms = attribution_prior(attr, ms)  # (M, K)
    if mode == "presence":
        per = 2.0 * terms[:, 0]
    else:
        per = terms[:, 0] + terms[:, 1:].mean(1)
    all_masked = index.numel() == b
    per_sample = per if all_masked else per.new_zeros(b).index_copy(0, index, per)
    loss = per.sum() / b  # mean over the whole batch; unmasked samples contribute exactly 0
    return PriorResult(loss, per_sample, index, attr, targets, m)


def compute_prior_from_logits(
    logits: Tensor,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    *,
    mode: str = "presence_absence",
    non_target: str = "complement",
    generator: torch.Generator | None = None,
) -> PriorResult:
    """Input×gradient prior from ``logits = model(x)`` computed *in the training forward* (shared forward).

    ``x: (B, C, H, W)`` must require grad and ``logits: (B, num_classes)`` must come from it in the current
    graph (e.g. ``x.requires_grad_(); logits = model(x); loss = ce(logits, y) + lam * prior.loss``). This
    saves the prior's own forward pass and, because the prior's double backward and the loss backward then
    share one graph, the second backward through the forward activations. The values equal
    :func:`prior_loss` with ``method="input_x_gradient"`` whenever samples do not interact in the forward
    (no train-mode BatchNorm); with train-mode BatchNorm the attributions are those of the training
    forward (full-batch statistics). Gradients are taken for the whole batch (masked rows only contribute),
    so skipping unmasked samples saves nothing here.
    """
    kind, k = _check_options(mode, "input_x_gradient", non_target, 1)
    if not isinstance(x, Tensor) or not x.requires_grad:
        raise ValueError("x must be the tensor the logits were computed from, with requires_grad=True")
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be (B, num_classes) with B = {x.shape[0]}, got {shape}")
    b = x.shape[0]
    yl = _check_labels(y, b)
    m = check_mask(mask, x.detach())
    index = (m.flatten(1).sum(1) > 0).nonzero().flatten()
    if index.numel() == 0:
        zero = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=torch.is_grad_enabled())
        return PriorResult(zero, x.new_zeros(b), index, None, None, m)
    sub = logits.index_select(0, index)
    targets = _resolve_targets(yl.index_select(0, index.to(yl.device)), sub, mode, kind, k, generator)
    vals = sub.gather(1, targets)  # (M, K)
    (grad,) = grads_per_target(vals, [x], create_graph=True)  # (K, B, C, H, W)
    attr = grad.index_select(1, index).movedim(0, 1) * x.detach().index_select(0, index).unsqueeze(1)
    return _combine(attr, m.index_select(0, index), m, index, targets, mode, b)


def prior_loss(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    *,
    mode: str = "presence_absence",
    method: str = "input_x_gradient",
    non_target: str = "complement",
    n_steps: int = 16,
    baseline: float | Tensor | None = None,
    internal_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    keep_norm_stats: bool = True,
) -> Tensor:
    """Attribution-prior loss of paper 000 (eq. 2 ``mode="presence"``, eq. 3 ``"presence_absence"``).

    Args:
        model: callable ``x -> logits (B, num_classes)`` (an ``nn.Module`` or a function).
        x: ``(B, C, H, W)`` images. y: ``(B,)`` integer labels.
        mask: spurious-region mask broadcastable to ``(B, 1, H, W)`` (or ``(B, H, W)``), values in [0, 1].
        mode: ``"presence"`` → ``2·mean_b prior(A(x, y))``; ``"presence_absence"`` →
            ``mean_b [prior(A(x, y)) + mean_{t'} prior(A(x, t'))]``.
        method: ``"input_x_gradient"`` (default; equals IG exactly for bias-free positively homogeneous
            X-models) or ``"integrated_gradients"`` (zero baseline unless ``baseline``; ``n_steps`` points).
        non_target: ``"complement"`` (binary, 1 − y), ``"all"``, ``"top:K"`` (K highest non-target logits,
            chosen at ``x``), ``"sample:K"`` (K distinct random other classes, drawn with ``generator``).
        keep_norm_stats: run the extra passes on cloned BatchNorm running statistics (see
            :func:`frozen_norm_stats`) so that the prior never changes them.

    Returns:
        Scalar loss, differentiable w.r.t. the model parameters. Samples with an empty mask contribute
        exactly 0 and are not run through the model; if no sample has a mask the model is not called.
    """
    return compute_prior(
        model,
        x,
        y,
        mask,
        mode=mode,
        method=method,
        non_target=non_target,
        n_steps=n_steps,
        baseline=baseline,
        internal_batch_size=internal_batch_size,
        generator=generator,
        keep_norm_stats=keep_norm_stats,
    ).loss
