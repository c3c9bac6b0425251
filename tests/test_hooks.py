"""Layer lookup, capture and intervene: correct values, clear errors, nothing left behind."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from helpers import hook_count
from negspace.hooks import StopForward, capture, get_layer, intervene, layer_names, run_until


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, 6), nn.ReLU()),
        nn.Sequential(nn.Linear(6, 5), nn.ReLU()),
        nn.Linear(5, 3),
    )


def test_get_layer_and_names():
    m = net()
    assert get_layer(m, "1.0") is m[1][0]
    assert "0.1" in layer_names(m) and "" not in layer_names(m)
    with pytest.raises(ValueError, match=r"layer '1.00' does not exist.*Closest matches: \['1.0'"):
        get_layer(m, "1.00")
    with pytest.raises(ValueError, match="Valid layer names"):
        get_layer(m, "")
    with pytest.raises(TypeError, match="dotted strings"):
        get_layer(m, m[0])


def test_capture_values_and_gradients():
    m = net()
    x = torch.randn(3, 4)
    with capture(m, ["0", "1.0"], grads=True) as cap:
        out = m(x)
        out[:, 1].sum().backward()
    torch.testing.assert_close(cap["0"], m[0](x))
    torch.testing.assert_close(cap["1.0"], m[1][0](m[0](x)))
    # dL/d(layer 1.0 output) by hand: relu' * W2[1]
    h = m[1][0](m[0](x)).detach()
    expected = (h > 0).float() * m[2].weight[1]
    torch.testing.assert_close(cap.gradients["1.0"], expected)
    assert hook_count(m) == 0


def test_capture_stop_after_skips_rest():
    m = net()
    calls = []
    m[2].register_forward_hook(lambda *a: calls.append(1))
    with capture(m, "1", stop_after=True) as cap:
        assert run_until(m, torch.randn(2, 4)) is None
    assert "1" in cap.activations and calls == []


def test_intervene_replaces_and_restores():
    m = net()
    x = torch.randn(3, 4)
    ref = m(x)
    with intervene(m, {"1": lambda o: torch.zeros_like(o)}):
        torch.testing.assert_close(m(x), m[2].bias.expand(3, 3))
    with intervene(m, {"1": torch.ones(5)}):
        torch.testing.assert_close(m(x), (m[2].weight.sum(1) + m[2].bias).expand(3, 3))
    torch.testing.assert_close(m(x), ref)
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(3, 5\)"), intervene(m, {"1": lambda o: o[:, :2]}):
        m(x)
    assert hook_count(m) == 0


@pytest.mark.parametrize("kind", ["capture", "intervene"])
def test_no_hooks_left_after_exception(kind):
    m = net()
    ctx = capture(m, ["0", "1"]) if kind == "capture" else intervene(m, {"0": lambda o: o, "1": lambda o: o})
    with pytest.raises(RuntimeError, match="user error"), ctx:
        assert hook_count(m) == 2
        raise RuntimeError("user error")
    assert hook_count(m) == 0


def test_unknown_layer_registers_nothing():
    m = net()
    with pytest.raises(ValueError), capture(m, ["0", "nope"]):
        pass
    assert hook_count(m) == 0
    assert issubclass(StopForward, Exception)


def test_frozen_relu_masks_is_exact_for_double_backward():
    tv = pytest.importorskip("torchvision")
    from negspace.hooks import frozen_relu_masks

    torch.manual_seed(0)
    m = tv.models.resnet18(num_classes=3).eval().double()  # in-place ReLU, one ReLU module used twice per block
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)

    def second_order(ctx):
        m.zero_grad()
        with ctx:
            out = m(x)
            (g,) = torch.autograd.grad(out[:, 1].sum(), x, create_graph=True)
        (g * x).abs().sum().backward()
        return out.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]

    out0, g0 = second_order(contextlib.nullcontext())
    out1, g1 = second_order(frozen_relu_masks(m))
    assert torch.equal(out0, out1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert hook_count(m) == 0 and not hasattr(m, "_negspace_frozen_relu_masks")
    with frozen_relu_masks(m), frozen_relu_masks(m):  # re-entrant
        torch.testing.assert_close(m(x), out0)
    assert hook_count(m) == 0
