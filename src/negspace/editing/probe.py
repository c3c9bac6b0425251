"""One recorded forward pass for :func:`negspace.editing.baking.bake`: which module calls read which tensor, and the
autograd graph, so that a layer's output can be shown to have exactly one user (a ``"next"``-layer fold)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from negspace.hooks import eval_mode

__all__ = ["Example", "GraphProbe", "as_args", "tensors_of"]

#: example inputs: one tensor or the positional tensors of ``model(*example)``
Example = Tensor | Sequence[Tensor]


@dataclass
class _Call:
    module: nn.Module
    arg: Tensor | None
    arg_version: int
    out: Tensor | None
    out_version: int
    leaf: bool
    node: object = None  # the output's grad_fn when the call returned (later in-place ops replace it)


def tensors_of(obj: object) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in tensors_of(v)]
    return []


def as_args(example: Example) -> tuple:
    if isinstance(example, Tensor):
        return (example,)
    if isinstance(example, Sequence) and example and all(isinstance(t, Tensor) for t in example):
        return tuple(example)
    raise TypeError(f"example must be a Tensor or a sequence of Tensors (positional inputs), got {type(example).__name__}")


class GraphProbe:
    """One forward of ``model`` on ``example`` recording every module call and the autograd graph."""

    def __init__(self, model: nn.Module, example: Example) -> None:
        self.calls: list[_Call] = []
        handles = []

        def pre(mod: nn.Module, args: tuple) -> None:
            a = args[0] if args and isinstance(args[0], Tensor) else None
            self.calls.append(_Call(mod, a, a._version if a is not None else -1, None, -1, not any(mod.children())))

        def post(mod: nn.Module, _args: tuple, out: object) -> None:
            call = next(c for c in reversed(self.calls) if c.module is mod and c.out_version == -1)
            call.out = out if isinstance(out, Tensor) else None
            call.out_version = out._version if isinstance(out, Tensor) else -2
            call.node = out.grad_fn if isinstance(out, Tensor) else None

        args = tuple(t.detach().requires_grad_(True) if t.is_floating_point() else t for t in as_args(example))
        try:
            for m in model.modules():
                handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
            with eval_mode(model), torch.enable_grad():
                out = model(*args)
        finally:
            for h in handles:
                h.remove()
        self.roots = [t.grad_fn for t in tensors_of(out) if t.grad_fn is not None]

    def of(self, module: nn.Module) -> list[_Call]:
        return [c for c in self.calls if c.module is module]

    def ranks(self, module: nn.Module) -> set[int]:
        return {c.out.dim() for c in self.of(module) if c.out is not None}

    def consumer(self, module: nn.Module) -> tuple[nn.Module | None, str]:
        """The one leaf module that reads ``module``'s output and is its only user in the graph, or a reason."""
        calls = self.of(module)
        if len(calls) != 1 or calls[0].out is None:
            return None, f"runs {len(calls)} times (or returns no tensor) on the example"
        out, version = calls[0].out, calls[0].out_version
        readers = [c for c in self.calls if c.leaf and c.arg is out and c.arg_version == version and c.module is not module]
        users = [c for c in readers if not (c.out is out and c.out_version == version)]  # Identity/eval Dropout pass it on
        if len(users) != 1:
            return None, f"its output is read by {len(users)} layers"
        user = users[0]
        if len(self.of(user.module)) != 1:
            return None, "the consumer runs more than once"
        node = calls[0].node
        if node is None or user.node is None:
            return None, "no autograd graph on the example"
        total = _edges_to(self.roots, node, out.output_nr)
        inside = _edges_to([user.node], node, out.output_nr)
        if total == 0 or total != inside:
            return None, "its output has other users in the graph"
        return user.module, ""


def _edges_to(roots: list, target: object, nr: int) -> int:
    """Number of autograd edges from the graph above ``roots`` into output ``nr`` of node ``target``."""
    seen, stack, count = set(), list(roots), 0
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, k in node.next_functions:
            if nxt is None:
                continue
            if nxt is target:
                count += k == nr
            else:
                stack.append(nxt)
    return count
