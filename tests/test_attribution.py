"""Attribution core against Captum and hand-derived oracles (float64 on tiny random networks)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerGradientXActivation,
    LayerIntegratedGradients,
)
from torch import nn

from helpers import hook_count
from negspace import objectives as obj
from negspace.attribution import input_x_gradient, integrated_gradients, layer_contributions


def small_cnn(bias: bool = True, act: type[nn.Module] = nn.ReLU, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=bias),
        act(),
        nn.Conv2d(4, 5, 3, padding=1, bias=bias),
        act(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(20, classes, bias=bias),
    ).double()


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])


def test_input_x_gradient_matches_captum(data):
    x, t = data
    m = small_cnn()
    ours = input_x_gradient(m, x, t)
    ref = InputXGradient(m).attribute(x, target=t)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle", "riemann_trapezoid"])
def test_integrated_gradients_matches_captum(data, method):
    x, t = data
    m = small_cnn()
    base = torch.full_like(x, 0.3)
    ours = integrated_gradients(m, x, t, baseline=base, n_steps=24, method=method)
    ref = IntegratedGradients(m).attribute(x, baselines=base, target=t, n_steps=24, method=method)
    if method == "riemann_trapezoid":
        # Captum's trapezoid weights are 1/n (halved at the ends) and sum to (n-1)/n, which breaks
        # completeness; ours are 1/(n-1) and sum to 1. Same nodes, so the results differ by that factor.
        ref = ref * 24 / 23
    # Captum builds its quadrature nodes in float32, hence the 1e-7 relative agreement
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)


def test_integrated_gradients_chunked_equals_one_pass(data):
    x, t = data
    m = small_cnn()
    full = integrated_gradients(m, x, t, n_steps=10)
    chunked = integrated_gradients(m, x, t, n_steps=10, internal_batch_size=x.shape[0] * 3)
    torch.testing.assert_close(full, chunked, rtol=1e-12, atol=1e-13)


def test_completeness(data):
    x, t = data
    m = small_cnn(act=nn.Softplus)
    attr = integrated_gradients(m, x, t, n_steps=64)
    fx = m(x).gather(1, t[:, None])[:, 0]
    f0 = m(torch.zeros_like(x)).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(attr.flatten(1).sum(1), (fx - f0).detach(), rtol=1e-6, atol=1e-8)


def test_x_model_ig_equals_input_x_gradient(data):
    """Bias-free, positively homogeneous nets: IG with zero baseline == input×gradient exactly."""
    x, t = data
    m = small_cnn(bias=False)
    ig = integrated_gradients(m, x, t, n_steps=7)
    ixg = input_x_gradient(m, x, t)
    torch.testing.assert_close(ig, ixg, rtol=1e-10, atol=1e-12)
    # and the model is positively homogeneous: f(a x) = a f(x)
    torch.testing.assert_close(m(2.5 * x), 2.5 * m(x))


@pytest.mark.parametrize("fn", ["ixg", "ig"])
def test_k_targets_equal_separate_calls(data, fn):
    x, t = data
    m = small_cnn()
    tk = torch.stack([t, (t + 1) % 3, (t + 2) % 3], dim=1)
    call = (lambda tt: input_x_gradient(m, x, tt)) if fn == "ixg" else (lambda tt: integrated_gradients(m, x, tt, n_steps=9))
    multi = call(tk)
    assert multi.shape == (6, 3, *x.shape[1:])
    for k in range(3):
        torch.testing.assert_close(multi[:, k], call(tk[:, k]), rtol=1e-10, atol=1e-12)


def test_objectives_as_targets(data):
    x, _ = data
    m = small_cnn()
    pred = m(x).argmax(1)
    torch.testing.assert_close(input_x_gradient(m, x, obj.top_logit()), input_x_gradient(m, x, pred))
    # top logit is fixed at the actual input along the IG path
    torch.testing.assert_close(
        integrated_gradients(m, x, obj.top_logit(), n_steps=5), integrated_gradients(m, x, pred, n_steps=5)
    )
    a = input_x_gradient(m, x, obj.contrastive(0, 2))
    torch.testing.assert_close(a, input_x_gradient(m, x, 0) - input_x_gradient(m, x, 2))
    ent = input_x_gradient(m, x, obj.entropy())
    assert torch.isfinite(ent).all() and ent.abs().sum() > 0


def _functional(m: nn.Module, names: list[str]):
    def f(*params):
        return dict(zip(names, params))

    return f


def test_create_graph_gradients_gradcheck():
    """The attribution is differentiable w.r.t. the parameters (double backward), checked by gradcheck."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())

    def attr_of(fn):
        def f(*ps):
            model = lambda inp: torch.func.functional_call(m, dict(zip(names, ps)), (inp,))  # noqa: E731
            return fn(model, x, t)

        return f

    assert torch.autograd.gradcheck(attr_of(lambda mm, xx, tt: input_x_gradient(mm, xx, tt, create_graph=True)), params)
    assert torch.autograd.gradcheck(
        attr_of(lambda mm, xx, tt: integrated_gradients(mm, xx, tt, n_steps=4, create_graph=True)), params
    )
    assert torch.autograd.gradcheck(
        attr_of(lambda mm, xx, tt: input_x_gradient(mm, xx, torch.stack([tt, (tt + 1) % 3], 1), create_graph=True)),
        params,
    )


def test_act_grad_matches_captum_layer_gradient_x_activation(data):
    x, t = data
    m = small_cnn()
    ours = layer_contributions(m, ["1", "3"], x, t, method="act_grad")
    for name, idx in (("1", 1), ("3", 3)):
        ref = LayerGradientXActivation(m, m[idx]).attribute(x, target=t)
        torch.testing.assert_close(ours[name], ref, rtol=1e-10, atol=1e-12)


def test_act_normgrad_is_act_times_unit_gradient(data):
    x, t = data
    m = small_cnn()
    ag = layer_contributions(m, "3", x, t, method="act_grad")
    ang = layer_contributions(m, "3", x, t, method="act_normgrad")
    ratio = ag.flatten(1).abs().sum(1) / ang.flatten(1).abs().sum(1)  # = ||grad|| per sample
    torch.testing.assert_close(ag, ang * ratio.view(-1, 1, 1, 1))


def test_integrated_contributions_completeness(data):
    """Summed over a layer that separates input from output: T(x) - T(0) (trapezoid error shrinks with n_steps)."""
    x, t = data
    m = small_cnn(act=nn.Softplus)
    fx = m(x).gather(1, t[:, None])[:, 0].detach()
    f0 = m(torch.zeros_like(x)).gather(1, t[:, None])[:, 0].detach()
    errs = []
    for n in (4, 64):
        c = layer_contributions(m, ["1", "3"], x, t, method="integrated", n_steps=n)
        errs.append(max((c[k].flatten(1).sum(1) - (fx - f0)).abs().max().item() for k in c))
    assert errs[1] < 1e-3 and errs[1] < errs[0] / 10


def test_integrated_equals_captum_layer_ig_when_layer_is_linear_in_input(data):
    """For a bias-free first conv the hidden path is straight too, so CODEC's hidden IG == Captum's LayerIG."""
    x, t = data
    m = small_cnn(bias=False, act=nn.Softplus)
    ours = layer_contributions(m, "0", x, t, method="integrated", n_steps=400)
    ref = LayerIntegratedGradients(m, m[0]).attribute(x, target=t, n_steps=64)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_input_grad_equals_act_grad_for_homogeneous_layers(data):
    x, t = data
    m = small_cnn(bias=False)
    ig = layer_contributions(m, ["1", "3"], x, t, method="input_grad")
    ag = layer_contributions(m, ["1", "3"], x, t, method="act_grad")
    for k in ig:
        torch.testing.assert_close(ig[k], ag[k], rtol=1e-10, atol=1e-12)
    # with biases the decomposition differs (J x != a)
    mb = small_cnn(bias=True)
    assert not torch.allclose(
        layer_contributions(mb, "3", x, t, method="input_grad"), layer_contributions(mb, "3", x, t, method="act_grad")
    )


def test_contributions_k_targets_and_neuron_objective(data):
    x, t = data
    m = small_cnn()
    tk = torch.stack([t, (t + 1) % 3], 1)
    for method in ("act_grad", "integrated", "input_grad"):
        multi = layer_contributions(m, "1", x, tk, method=method, n_steps=5)
        assert multi.shape == (6, 2, 4, 8, 8)
        torch.testing.assert_close(multi[:, 1], layer_contributions(m, "1", x, tk[:, 1], method=method, n_steps=5))
    # hidden unit -> hidden unit (PURE circuits): the neuron objective stops the forward at its layer
    c = layer_contributions(m, "1", x, obj.neuron("3", [0, 4], reduce="max"), method="act_grad")
    assert c.shape == (6, 2, 4, 8, 8)
    with pytest.raises(ValueError, match="did not run"):
        layer_contributions(m, "5", x, obj.neuron("3", 0), method="act_grad")


def test_timm_and_torchvision_models():
    timm = pytest.importorskip("timm")
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 3, 32, 32)
    r = tv.models.resnet18(num_classes=4).eval()
    out = layer_contributions(r, ["layer1", "layer2", "layer3", "layer4"], x, obj.top_logit())
    assert out["layer4"].shape == (2, 512, 1, 1)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    c = layer_contributions(vit, "blocks.1", x, 1, method="integrated", n_steps=32)
    assert c.shape == (2, 17, 192)  # tokens treated as space
    fx, f0 = vit(x)[:, 1], vit(torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(c.flatten(1).sum(1), (fx - f0).detach(), rtol=2e-2, atol=2e-2)


def test_no_hooks_left_after_exception(data):
    x, t = data
    m = small_cnn()

    class Boom(Exception):
        pass

    def exploding(out):
        raise Boom

    with pytest.raises(Boom):
        layer_contributions(m, ["1", "3"], x, exploding)
    assert hook_count(m) == 0
    layer_contributions(m, ["1", "3"], x, t, method="integrated", n_steps=3)
    assert hook_count(m) == 0


@pytest.mark.parametrize(
    ("target", "exc", "msg"),
    [
        (3, ValueError, "out of range"),
        (torch.tensor([0, 1]), ValueError, "B=6"),
        (torch.zeros(6, 2, 2, dtype=torch.long), ValueError, r"\(B,\) or \(B, K\)"),
        (torch.zeros(6), TypeError, "integer class indices"),
        (lambda out: out.sum(), ValueError, r"must return shape"),
        (lambda out: out[:5], ValueError, r"must return shape"),
        ("cat", TypeError, "target must be"),
    ],
)
def test_bad_targets(data, target, exc, msg):
    x, _ = data
    with pytest.raises(exc, match=msg):
        input_x_gradient(small_cnn(), x, target)


def test_bad_inputs(data):
    x, t = data
    m = small_cnn()
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[2, 0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"NaN or inf \(samples \[2\]\)"):
            integrated_gradients(m, xb, t)
    with pytest.raises(ValueError, match=r"does not exist.*Closest matches: \['1'"):
        layer_contributions(m, "1x", x, t)
    with pytest.raises(ValueError, match="method must be one of"):
        layer_contributions(m, "1", x, t, method="smooth")
    with pytest.raises(ValueError, match="n_steps"):
        integrated_gradients(m, x, t, n_steps=0)


def test_layer_output_not_a_tensor(data):
    x, t = data

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Conv2d(3, 3, 1).double()

        def forward(self, z):
            return z, self.inner(z)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = TupleOut()
            self.head = small_cnn()

        def forward(self, z):
            return self.head(self.pair(z)[1])

    net = Net()
    with pytest.raises(TypeError, match="returns tuple, not a Tensor"):
        layer_contributions(net, "pair", x, t)
    assert hook_count(net) == 0
