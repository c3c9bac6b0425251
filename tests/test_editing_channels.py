"""Channel ablation/preservation on layer outputs: exact values, exact restoration, checkpointable state."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from helpers import hook_count
from negspace.editing import ChannelEdit, ablate_channels, preserve_channels


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_ablate_zero_mean_value_and_preserve():
    m = conv_net()
    x = torch.randn(5, 3, 6, 6)
    h = m[1](m[0](x)).detach()
    seen = {}
    # observe what the next layer receives (the edited output)
    m[2].register_forward_pre_hook(lambda mod, inp: seen.__setitem__("h", inp[0].detach()))
    with ablate_channels(m, {"1": [1, 3]}):
        m(x)
    exp = h.clone()
    exp[:, [1, 3]] = 0
    torch.testing.assert_close(seen["h"], exp)
    with ablate_channels(m, {"1": [2]}, value="mean"):
        m(x)
    exp = h.clone()
    exp[:, 2] = h[:, 2].mean()
    torch.testing.assert_close(seen["h"], exp)
    with ablate_channels(m, {"1": [0]}, value=-1.5):
        m(x)
    assert torch.all(seen["h"][:, 0] == -1.5)
    with ablate_channels(m, {"1": [0, 1]}, value={"1": torch.tensor([9.0, 8.0, 7.0, 6.0])}):
        m(x)
    assert torch.all(seen["h"][:, 0] == 9.0) and torch.all(seen["h"][:, 1] == 8.0)
    with preserve_channels(m, {"1": [0, 2]}):
        m(x)
    exp = h.clone()
    exp[:, [1, 3]] = 0
    torch.testing.assert_close(seen["h"], exp)


def test_identity_edits_are_bit_identical_and_restored():
    m = conv_net()
    x = torch.randn(4, 3, 6, 6)
    ref = m(x)
    with preserve_channels(m, {"1": list(range(4))}):
        assert torch.equal(m(x), ref)
    with ablate_channels(m, {"1": []}):
        assert torch.equal(m(x), ref)
    with pytest.raises(KeyError), ablate_channels(m, {"1": [0, 1]}):
        raise KeyError("boom")
    assert hook_count(m) == 0 and torch.equal(m(x), ref)


def test_token_layout_uses_last_axis():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 3, 4)  # (B, T, D)
    seq = nn.Sequential(lin)
    with ablate_channels(seq, {"0": [1]}):
        out = seq(x)
    assert torch.all(out[..., 1] == 0) and torch.equal(out[..., 0], lin(x)[..., 0])


def test_persistent_edit_state_repr_and_errors():
    m = conv_net()
    x = torch.randn(2, 3, 6, 6)
    ref = m(x)
    e = ChannelEdit({"1": [3, 0]}, mode="ablate").apply(m)
    assert "active on Sequential" in repr(e) and "2 ch [0, 3]" in repr(e)
    edited = m(x)
    assert not torch.equal(edited, ref)
    with pytest.raises(RuntimeError, match="already applied"):
        e.apply(m)
    buf = io.BytesIO()
    torch.save(e.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    e.remove()
    assert "inactive" in repr(e) and hook_count(m) == 0 and torch.equal(m(x), ref)
    e2 = ChannelEdit.from_state_dict(state).apply(m)
    assert torch.equal(m(x), edited)
    e2.remove()
    with pytest.raises(ValueError, match="mode must be one of"):
        ChannelEdit({"1": [0]}, mode="drop")
    with pytest.raises(ValueError, match="does not exist"):
        ChannelEdit({"nope": [0]}).apply(m)
    assert hook_count(m) == 0
    with pytest.raises(ValueError, match="out of range for layer '1' with 4 channels"), ablate_channels(m, {"1": [7]}):
        m(x)
    with pytest.raises(ValueError, match="non-negative"):
        ChannelEdit({"1": [-1]})
    with pytest.raises(ValueError, match="value must be"):
        ChannelEdit({"1": [0]}, value="median")


@pytest.mark.parametrize(
    ("mode", "value"), [("ablate", "zero"), ("ablate", "mean"), ("preserve", 0.5), ("ablate", {"1": torch.arange(4.0)})]
)
def test_hooked_edit_exports_without_data_dependent_guards(mode, value):
    """torch.export used to fail on ``int(idx.max())``; the channel checks now read plain Python ints."""
    m = conv_net().eval()
    x = torch.randn(3, 3, 6, 6)
    with ChannelEdit({"1": [1, 3]}, mode=mode, value=value).applied(m):
        ref = m(x)
        program = torch.export.export(m, (x,))
    assert hook_count(m) == 0
    torch.testing.assert_close(program.module()(x), ref)
    assert not torch.allclose(m(x), ref)
