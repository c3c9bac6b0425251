"""Channel ablation and preservation on layer *outputs* (activations, not weights).

Editing activations keeps bias and BatchNorm semantics right: zeroing a conv's weights would still
leave its bias (and the following BN's shift) in place, while zeroing the output removes the channel.

* :func:`ablate_channels` — the chosen channels are replaced by ``value``;
* :func:`preserve_channels` — every *other* channel is replaced by ``value``;
* :class:`ChannelEdit` — the persistent equivalent (``apply``/``remove``, ``state_dict``, readable repr).

``value``: ``"zero"``; ``"mean"`` (per-channel mean of the current output over batch and space — use a
tensor of dataset means for a fixed reference); a float; or ``{layer: Tensor (C,)}`` per-channel values.
The channel axis is 1 for ``(B, C, H, W)`` / ``(B, C)`` and last for tokens ``(B, T, D)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from negspace.hooks import PersistentEdit
from negspace.reduce import channel_dim

__all__ = ["MODES", "ChannelEdit", "ablate_channels", "preserve_channels"]

MODES = ("ablate", "preserve")
Channels = Sequence[int] | Tensor
Value = str | float | Mapping[str, Tensor]


def _as_index(layer: str, channels: Channels) -> Tensor:
    if isinstance(channels, Tensor) and channels.dtype == torch.bool:
        channels = channels.nonzero().flatten()
    try:
        idx = torch.as_tensor(channels, dtype=torch.long).flatten().cpu()
    except (TypeError, ValueError) as e:
        raise TypeError(f"channels for layer {layer!r} must be a list of ints or a tensor, got {channels!r}") from e
    if isinstance(channels, Tensor) and channels.is_floating_point():
        raise TypeError(f"channels for layer {layer!r} must be integer indices or a bool mask, got {channels.dtype}")
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError(f"channels for layer {layer!r} must be non-negative, got {idx.tolist()}")
    return torch.unique(idx)


class ChannelEdit(PersistentEdit):
    """Persistent activation-level ablation (or preservation) of channels.

    Args:
        edits: ``{layer: channels}``, channels as a list of ints, a LongTensor or a bool mask.
        mode: ``"ablate"`` (replace the listed channels) or ``"preserve"`` (replace all others).
        value: ``"zero"``, ``"mean"``, a float, or ``{layer: Tensor (C,)}``.

    Example::

        edit = ChannelEdit({"layer4.1": [3, 17]}, mode="ablate").apply(model)
        logits = model(x)
        edit.remove()
    """

    def __init__(self, edits: Mapping[str, Channels], mode: str = "ablate", value: Value = "zero") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(edits, Mapping) or not edits:
            raise TypeError(f"edits must be a non-empty mapping {{layer: channels}}, got {edits!r}")
        self._check_value(value, edits)
        self.mode = mode
        self.value = value
        self.channels = {str(k): _as_index(str(k), v) for k, v in edits.items()}
        self._index = {k: v.tolist() for k, v in self.channels.items()}  # sorted Python ints, read in forward
        self.layers = list(self.channels)

    @staticmethod
    def _check_value(value: Value, edits: Mapping[str, Channels]) -> None:
        if isinstance(value, str):
            if value not in ("zero", "mean"):
                raise ValueError(f"value must be 'zero', 'mean', a float or {{layer: Tensor}}, got {value!r}")
        elif isinstance(value, Mapping):
            missing = [k for k in edits if k not in value]
            if missing:
                raise ValueError(f"value mapping lacks per-channel values for layers {missing}")
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"value must be 'zero', 'mean', a float or {{layer: Tensor}}, got {type(value).__name__}")

    def _fill(self, name: str, out: Tensor, dim: int) -> Tensor | float:
        v = self.value
        if v == "zero":
            return 0.0
        if v == "mean":
            dims = [d for d in range(out.dim()) if d != dim % out.dim()]
            return out.mean(dim=dims, keepdim=True)
        if isinstance(v, Mapping):
            t = torch.as_tensor(v[name]).to(out)
            if t.dim() != 1 or t.numel() != out.shape[dim]:
                raise ValueError(f"value for layer {name!r} must have shape ({out.shape[dim]},), got {tuple(t.shape)}")
            shape = [1] * out.dim()
            shape[dim] = -1
            return t.view(shape)
        return float(v)

    def replaced(self, name: str, c: int) -> list[bool]:
        """Which of the ``c`` channels of layer ``name`` this edit replaces (plain Python: no tensor data is read,
        so ``torch.export`` sees no data-dependent guard). Raises ``ValueError`` for a channel ``>= c``."""
        idx = self._index[name]
        if idx and idx[-1] >= c:
            raise ValueError(f"channel {idx[-1]} out of range for layer {name!r} with {c} channels")
        chosen = set(idx)
        return [(i in chosen) != (self.mode == "preserve") for i in range(c)]

    def edit(self, name: str, output: Tensor, inputs: tuple = ()) -> Tensor:
        dim = channel_dim(output)
        replace = self.replaced(name, output.shape[dim])
        if not any(replace):  # nothing to change: return the output untouched (bit-identical)
            return output
        shape = [1] * output.dim()
        shape[dim] = len(replace)
        mask = torch.tensor(replace, dtype=torch.bool, device=output.device).view(shape)
        fill = self._fill(name, output, dim)
        fill_t = torch.as_tensor(fill, dtype=output.dtype, device=output.device) if isinstance(fill, float) else fill
        return torch.where(mask, fill_t, output)

    def state_dict(self) -> dict:
        """Tensors and primitives only (loads with ``torch.load(weights_only=True)``)."""
        value: object = self.value
        if isinstance(value, Mapping):
            value = {k: torch.as_tensor(t).detach().cpu() for k, t in value.items()}
        return {"edits": {k: v.clone() for k, v in self.channels.items()}, "mode": self.mode, "value": value}

    def load_state_dict(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or not {"edits", "mode", "value"} <= set(state):
            raise ValueError(f"not a ChannelEdit state: expected keys edits, mode, value; got {sorted(state)}")
        if self.active:
            raise RuntimeError("remove() the edit before loading another state into it")
        fresh = ChannelEdit(state["edits"], mode=state["mode"], value=state["value"])
        self.mode, self.value, self.layers = fresh.mode, fresh.value, fresh.layers
        self.channels, self._index = fresh.channels, fresh._index

    @classmethod
    def from_state_dict(cls, state: Mapping) -> ChannelEdit:
        return cls(state["edits"], mode=state["mode"], value=state["value"])

    def same_as(self, other: ChannelEdit) -> bool:
        """Same layers, channels, mode and value (``"zero"`` and ``0.0`` are the same value)."""
        return (self.mode == other.mode and list(self.channels) == list(other.channels)
                and _same_value(self.value, other.value)
                and all(torch.equal(self.channels[k], other.channels[k]) for k in self.channels))

    def describe(self) -> str:
        """The edit in one line (channels and per-channel values shortened), for error messages."""

        def short(vals: list) -> str:
            body = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in vals[:8])
            return f"[{body}{f', ... ({len(vals)} in all)' if len(vals) > 8 else ''}]"

        def per_layer(items: Mapping[str, Tensor]) -> str:
            return "{" + ", ".join(f"{k!r}: {short(torch.as_tensor(t).flatten().tolist())}" for k, t in items.items()) + "}"

        v = self.value
        value = per_layer(v) if isinstance(v, Mapping) else repr(v)
        return f"ChannelEdit({per_layer(self.channels)}, mode={self.mode!r}, value={value})"

    def __repr__(self) -> str:
        def short(idx: Tensor) -> str:
            vals = idx.tolist()
            body = ", ".join(map(str, vals[:8])) + (", ..." if len(vals) > 8 else "")
            return f"{len(vals)} ch [{body}]"

        edits = ", ".join(f"{k!r}: {short(v)}" for k, v in self.channels.items())
        value = "per-channel tensor" if isinstance(self.value, Mapping) else repr(self.value)
        state = f"active on {self._model_name}" if self.active else "inactive"
        return f"ChannelEdit(mode={self.mode!r}, value={value}, edits={{{edits}}}, {state})"


@contextmanager
def ablate_channels(model: nn.Module, edits: Mapping[str, Channels], *, value: Value = "zero") -> Iterator[ChannelEdit]:
    """Replace the listed channels' outputs by ``value`` inside the ``with`` block.

    ``edits``: ``{layer: channels}``. On exit (also after an exception) the model is exactly as before.
    """
    with ChannelEdit(edits, mode="ablate", value=value).applied(model) as edit:
        yield edit


@contextmanager
def preserve_channels(
    model: nn.Module, edits: Mapping[str, Channels], *, value: Value = "zero"
) -> Iterator[ChannelEdit]:
    """Keep only the listed channels of each layer; all other channels are replaced by ``value``."""
    with ChannelEdit(edits, mode="preserve", value=value).applied(model) as edit:
        yield edit


def _same_value(a: object, b: object) -> bool:
    a, b = (0.0 if v == "zero" else v for v in (a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        t = {k: torch.as_tensor(v).detach().cpu().double() for k, v in a.items()}
        return set(t) == set(b) and all(torch.equal(t[k], torch.as_tensor(b[k]).detach().cpu().double()) for k in t)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return isinstance(a, str) and a == b
