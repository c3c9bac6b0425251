"""Layer lookup by dotted name and scoped forward hooks.

Everything in negspace that touches a model's internals goes through this module:

* :func:`get_layer` resolves ``"layer4.1.conv2"`` to a module and, on a typo, raises a
  ``ValueError`` listing the closest valid names;
* :func:`capture` records the outputs of several layers in one forward pass (kept in the
  autograd graph so that gradients w.r.t. them can be taken with ``torch.autograd.grad``,
  which is how every attribution method here gets activations *and* gradients in one pass);
* :func:`intervene` replaces or edits layer outputs for the duration of a ``with`` block.

All hooks are registered inside context managers and removed in ``finally`` blocks, so a
model is never left hooked, also when the body raises.
"""

from __future__ import annotations

import abc
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "Captured",
    "PersistentEdit",
    "StopForward",
    "capture",
    "eval_mode",
    "frozen_norm_stats",
    "frozen_relu_masks",
    "get_layer",
    "intervene",
    "layer_names",
    "model_device",
    "normalize_layers",
    "run_until",
]


def layer_names(model: nn.Module) -> list[str]:
    """All dotted names of ``model``'s submodules (the root, ``""``, excluded)."""
    return [name for name, _ in model.named_modules() if name]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule of ``model`` called ``name`` (dotted path, e.g. ``"layer4.1.conv2"``).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: no such submodule; the message lists the closest valid names.
    """
    if not isinstance(name, str):
        raise TypeError(f"layer names must be dotted strings such as 'layer4.1', got {type(name).__name__}")
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    valid = layer_names(model)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f" Closest matches: {close}." if close else ""
    shown = valid if len(valid) <= 40 else [*valid[:20], "...", *valid[-10:]]
    raise ValueError(
        f"layer {name!r} does not exist in {type(model).__name__}.{hint} Valid layer names "
        f"({len(valid)}): {shown}"
    )


def normalize_layers(layers: str | Sequence[str]) -> tuple[list[str], bool]:
    """Return ``(names, single)``: a list of layer names and whether a single name was given."""
    if isinstance(layers, str):
        return [layers], True
    if isinstance(layers, Sequence) and layers and all(isinstance(n, str) for n in layers):
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers contains duplicates: {list(layers)}")
        return list(layers), False
    raise TypeError(f"layers must be a dotted name or a non-empty list of names, got {layers!r}")


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once every needed layer has run."""


@dataclass
class Captured:
    """Outputs recorded by :func:`capture` (``activations[name]``), and gradients (``gradients[name]``)
    filled in when a backward pass runs through them and ``grads=True`` was requested."""

    activations: dict[str, Tensor] = field(default_factory=dict)
    gradients: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        return self.activations[name]


def _check_tensor_output(name: str, module: nn.Module, output: object) -> Tensor:
    if not isinstance(output, Tensor):
        raise TypeError(
            f"layer {name!r} ({type(module).__name__}) returns {type(output).__name__}, not a Tensor; "
            "pick a submodule whose output is a single tensor (e.g. a conv, an activation, or a block)"
        )
    return output


@contextmanager
def capture(
    model: nn.Module,
    layers: str | Sequence[str],
    *,
    grads: bool = False,
    detach: bool = False,
    stop_after: bool = False,
) -> Iterator[Captured]:
    """Record the outputs of ``layers`` during forward passes run inside the ``with`` block.

    Args:
        model: any module.
        layers: dotted name or list of names.
        grads: also record ``d(loss)/d(output)`` when a backward pass runs (via tensor hooks).
        detach: store detached outputs (analysis only; no gradients can be taken through them).
        stop_after: raise :class:`StopForward` as soon as all layers have produced an output; the
            caller catches it (see :func:`run_until`). Saves the rest of the forward pass.

    Yields:
        :class:`Captured`; each forward overwrites the previous entry of a layer.
    """
    names, _ = normalize_layers(layers)
    modules = {n: get_layer(model, n) for n in names}
    result = Captured()
    handles = []

    def make_hook(name: str, module: nn.Module) -> Callable:
        def hook(_mod: nn.Module, _inp: object, output: object) -> None:
            out = _check_tensor_output(name, module, output)
            result.activations[name] = out.detach() if detach else out
            if grads and out.requires_grad:

                def store(g: Tensor, _name: str = name) -> None:
                    result.gradients[_name] = g

                out.register_hook(store)
            if stop_after and all(n in result.activations for n in names):
                raise StopForward

        return hook

    try:
        for n, m in modules.items():
            handles.append(m.register_forward_hook(make_hook(n, m)))
        yield result
    finally:
        for h in handles:
            h.remove()


def run_until(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor | None:
    """Run ``model(x)`` and swallow :class:`StopForward`; returns the output or ``None`` if stopped."""
    try:
        return model(x)
    except StopForward:
        return None


EditFn = Callable[[Tensor], Tensor]


@contextmanager
def intervene(model: nn.Module, edits: Mapping[str, EditFn | Tensor]) -> Iterator[None]:
    """Replace or edit layer outputs inside the ``with`` block.

    Args:
        edits: ``{layer: fn}`` where ``fn(output) -> new_output`` (same shape), or
            ``{layer: tensor}`` to replace the output by a tensor broadcastable to it.

    The hooks are removed on exit, also after an exception.
    """
    if not isinstance(edits, Mapping) or not edits:
        raise TypeError(f"edits must be a non-empty mapping {{layer: fn or tensor}}, got {edits!r}")
    modules = {n: get_layer(model, n) for n in edits}
    handles = []

    def make_hook(name: str, module: nn.Module, edit: EditFn | Tensor) -> Callable:
        def hook(_mod: nn.Module, _inp: object, output: object) -> Tensor:
            out = _check_tensor_output(name, module, output)
            if callable(edit):
                new = edit(out)
            else:
                try:
                    new = torch.broadcast_to(edit.to(out), out.shape)
                except RuntimeError as e:
                    raise ValueError(f"the replacement tensor for layer {name!r} has shape {tuple(edit.shape)}, "
                                     f"which does not broadcast to the layer output {tuple(out.shape)}") from e
            if not isinstance(new, Tensor) or new.shape != out.shape:
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise ValueError(
                    f"edit of layer {name!r} must return a tensor of shape {tuple(out.shape)}, got {got}"
                )
            return new

        return hook

    try:
        for n, m in modules.items():
            edit = edits[n]
            if not (callable(edit) or isinstance(edit, Tensor)):
                raise TypeError(f"edit for layer {n!r} must be a callable or a Tensor, got {type(edit).__name__}")
            handles.append(m.register_forward_hook(make_hook(n, m, edit)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (BatchNorm running stats, no dropout) and restore each submodule's
    own flag on exit, also after an exception.

    The one way negspace switches modes for analysis: unlike saving ``model.training``, calling ``model.eval()``
    and restoring the saved flag on the root, it keeps an intentionally frozen eval-mode submodule (a BatchNorm
    backbone being fine-tuned with frozen statistics) in eval mode afterwards.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    """Device of ``model``'s first parameter (or buffer); CPU for a module without either."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class PersistentEdit(abc.ABC):
    """Base class of persistent, removable, checkpointable output edits (channel ablation, virtual-neuron
    routing, ...).

    Subclasses set ``self.layers`` (dotted names) and implement :meth:`edit` (which sees the layer's output
    and its positional inputs), :meth:`state_dict` and :meth:`load_state_dict`; state must be tensors and
    primitives (``state_dict``) so that checkpoints load with ``weights_only=True``. Usage::

        edit = SomeEdit(...).apply(model)   # hooks registered; visible in repr(edit)
        ...
        edit.remove()                        # model exactly as before

    or ``with SomeEdit(...).applied(model): ...``.
    """

    layers: list[str]

    def __init__(self) -> None:
        self._handles: list = []
        self._model_name: str | None = None
        self._modules: dict[str, nn.Module] = {}  # layer name -> module while applied

    @abc.abstractmethod
    def edit(self, name: str, output: Tensor, inputs: tuple = ()) -> Tensor:
        """Return the edited output of layer ``name`` (same shape); ``inputs`` are the layer's positional inputs."""

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def apply(self, model: nn.Module) -> PersistentEdit:
        """Register the edit on ``model``. Raises if it is already applied (remove it first)."""
        if self.active:
            raise RuntimeError(f"{self!r} is already applied to a {self._model_name}; call remove() first")
        modules = {n: get_layer(model, n) for n in self.layers}  # validate all names before hooking any
        try:
            for n, m in modules.items():
                self._handles.append(m.register_forward_hook(self._make_hook(n, m)))
        except Exception:
            self.remove()
            raise
        self._model_name = type(model).__name__
        self._modules = modules
        return self

    def _make_hook(self, name: str, module: nn.Module) -> Callable:
        def hook(_mod: nn.Module, inputs: tuple, output: object) -> Tensor:
            out = _check_tensor_output(name, module, output)
            new = self.edit(name, out, inputs)
            if new.shape != out.shape:
                raise RuntimeError(f"{type(self).__name__}.edit changed the shape of {name!r} output")
            return new

        return hook

    def remove(self) -> None:
        """Remove every hook this edit registered (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._model_name = None
        self._modules = {}

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[PersistentEdit]:
        """Apply for the duration of a ``with`` block, removed also on exceptions."""
        self.apply(model)
        try:
            yield self
        finally:
            self.remove()

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Tensors and primitives only (checkpoints load with ``weights_only=True``)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


_RELU_FLAG = "_negspace_frozen_relu_masks"


@contextmanager
def frozen_relu_masks(model: nn.Module) -> Iterator[None]:
    """Inside the block every ``nn.ReLU`` of ``model`` computes ``x · 1[x > 0]`` with the mask held constant.

    Forward values and first derivatives are unchanged, and ReLU's second derivative is zero anyway, so
    gradients of gradients (``create_graph=True``, e.g. attribution priors) are exactly the same. What
    changes is the work: autograd's double-backward rule for ReLU returns a tensor of *zeros* for the
    ReLU input, which is then pushed back through the whole forward graph; with a constant mask that
    branch does not exist. On ReLU networks without batch-coupled layers (X-models, eval-mode BN) this
    saves about one backward pass per prior step. Functional ``F.relu`` calls are not affected (still
    exact, just not faster). Re-entrant: nested use on the same model is a no-op.
    """
    if getattr(model, _RELU_FLAG, False):
        yield
        return
    saved: dict[int, list[Tensor]] = {}
    handles = []

    def pre(mod: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        saved.setdefault(id(mod), []).append(x)
        # an in-place ReLU must not overwrite x (we need it below); its own output is discarded
        return (x.detach().clone(), *args[1:]) if getattr(mod, "inplace", False) else None

    def post(mod: nn.Module, _args: tuple, _out: Tensor) -> Tensor:
        x = saved[id(mod)].pop()
        return x * (x > 0).to(x.dtype)

    try:
        setattr(model, _RELU_FLAG, True)
        for m in model.modules():
            if type(m) is nn.ReLU:
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()
        if _RELU_FLAG in vars(model):
            delattr(model, _RELU_FLAG)


@contextmanager
def frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    """Keep the running statistics of every BatchNorm/InstanceNorm in ``module`` unchanged.

    Inside the context each norm layer works on *clones* of its ``running_mean``/``running_var``/
    ``num_batches_tracked`` buffers; on exit (also after an exception) the original tensor objects are put
    back untouched. Swapping instead of copying back keeps autograd happy (the extra graph holds the
    clones, the originals are never modified in place) and is exact for any momentum, including
    ``momentum=None`` (cumulative average). The forward itself is unchanged: train-mode layers still
    normalise with batch statistics. Used by attribution priors for their extra forward passes.
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
