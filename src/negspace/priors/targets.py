"""The one non-target class choice: ``"complement" | "all" | "top:K" | "sample:K"``.

Priors (eq. 3 of paper 000) and the biased-split report both explain the label *and* other classes; which
other classes is decided here only.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from negspace.objectives import Objective, logit

__all__ = ["NON_TARGETS", "non_target_classes", "parse_non_target", "prior_targets", "resolve_targets", "target_and_other"]

NON_TARGETS = ("complement", "all", "top:K", "sample:K")
_NON_TARGET_RE = re.compile(r"^(top|sample):([1-9][0-9]*)$")


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


def resolve_targets(
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


def non_target_classes(
    y: Tensor, logits: Tensor, non_target: str = "complement", generator: torch.Generator | None = None
) -> Tensor:
    """``(B, 1 + #non-targets)``: the label ``y (B,)`` in column 0, then the non-target classes chosen by
    ``non_target`` from ``logits (B, num_classes)`` (``top:K``: highest other logits; ``sample:K``: drawn with
    ``generator``)."""
    kind, k = parse_non_target(non_target)
    return resolve_targets(y, logits, "presence_absence", kind, k, generator)


def target_and_other(logits: Tensor, y: Tensor) -> Tensor:
    """``(B, 2)``: the label and the most competitive other class (``top:1``; ``1 − y`` for two classes)."""
    return resolve_targets(y.long(), logits, "presence_absence", "top", 1, None)


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
            self._targets = resolve_targets(self.y, out, self.mode, self.kind, self.k, self._gen)
        return self._targets

    def __call__(self, out: Tensor) -> Tensor:
        return out.gather(1, self._targets_for(out))


class _TopTargets(_PriorTargets):
    """``top:K`` depends on the logit values: resolve at the actual input, not at an IG path point."""

    def fix(self, out: Tensor) -> Objective:
        return logit(self._targets_for(out))


def prior_targets(
    y: Tensor, mode: str, kind: str, k: int, generator: torch.Generator | None = None
) -> _PriorTargets:
    """The objective ``logits -> (B, K)`` the prior attributes (label first, then the non-targets)."""
    cls = _TopTargets if (mode == "presence_absence" and kind == "top") else _PriorTargets
    return cls(y, mode, kind, k, generator)
