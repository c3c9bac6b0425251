"""X-models (exact homogeneity, IG == I×G), paper 000's toy nets, the model zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from negspace.attribution import input_x_gradient, integrated_gradients
from negspace.hooks import get_layer
from negspace.models import (
    NEGSPACE_MODELS,
    GreenPixelNet,
    MotionDetector,
    XResNet,
    XSmallCNN,
    create_model,
    xresnet18,
    xresnet50,
)


def _randomise_residuals(model: nn.Module) -> None:
    """Fixup starts residual branches at zero; give them weights so the test covers the branches."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if p.dim() == 4 and ("conv2" in name or "conv3" in name):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


def _x_models() -> list[tuple[str, nn.Module]]:
    torch.manual_seed(0)
    r18 = xresnet18(num_classes=3, width=8)
    r50 = xresnet50(num_classes=3, width=4)
    _randomise_residuals(r18)
    _randomise_residuals(r50)
    return [("xsmallcnn", XSmallCNN(num_classes=3, width=8)), ("xresnet18", r18), ("xresnet50", r50)]


@pytest.mark.parametrize("idx", [0, 1, 2])
def test_x_models_are_bias_free_homogeneous_and_ig_equals_ixg(idx: int) -> None:
    name, model = _x_models()[idx]
    model = model.double().eval()
    for mod in model.modules():
        assert not isinstance(mod, nn.BatchNorm2d | nn.Softmax)
        assert getattr(mod, "bias", None) is None, f"{name}: {type(mod).__name__} has a bias"
    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    y = model(x)
    assert y.shape == (2, 3)
    assert y.abs().max() > 0
    for alpha in (0.3, 2.5):
        torch.testing.assert_close(model(alpha * x), alpha * y, rtol=1e-10, atol=1e-12)
    target = torch.tensor([0, 2])
    ig = integrated_gradients(model, x, target, n_steps=8)
    ixg = input_x_gradient(model, x, target)
    torch.testing.assert_close(ig, ixg, rtol=1e-8, atol=1e-12)
    # completeness on top: sum of I×G = f(x)[t] for homogeneous f with f(0) = 0
    torch.testing.assert_close(ixg.flatten(1).sum(1), y[torch.arange(2), target], rtol=1e-8, atol=1e-12)


def test_x_model_names_and_fixup_init() -> None:
    m = xresnet18(num_classes=2, width=8)
    for layer in ("conv1", "layer1", "layer2.0.downsample", "layer4.1.conv2", "fc"):
        get_layer(m, layer)
    # Fixup: residual branch starts at zero -> every block is its shortcut at init
    assert all(float(b.conv2.weight.detach().abs().sum()) == 0.0 for b in m.layer1)
    m50 = xresnet50(num_classes=2, width=4)
    get_layer(m50, "layer3.5.conv3")
    assert m50.fc.in_features == 4 * 8 * 4
    s = XSmallCNN(num_classes=2, width=4)
    assert isinstance(get_layer(s, "features.0"), nn.Conv2d)
    assert isinstance(get_layer(s, "classifier"), nn.Linear)
    scaled = XResNet((1, 1, 1, 1), num_classes=2, width=8, zero_init_residual=False)
    assert float(scaled.layer1[0].conv2.weight.detach().abs().sum()) > 0
    # a Fixup-initialised deep net trains: forward/backward are finite
    x = torch.rand(2, 3, 64, 64)
    m50(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m50.parameters() if p.grad is not None)


def test_zero_mean_stem_cancels_constant_inputs_at_init() -> None:
    torch.manual_seed(0)
    for model, stem in ((XSmallCNN(width=4), "features.0"), (xresnet18(width=8), "conv1")):
        conv = get_layer(model, stem)
        w = conv.weight.detach()
        torch.testing.assert_close(w.sum((1, 2, 3)), torch.zeros(w.shape[0]), atol=1e-6, rtol=0)
        # a constant image excites the stem only at the zero-padded border
        out = conv(torch.full((1, 3, 16, 16), 0.7))
        assert out[..., 3:-3, 3:-3].abs().max() < 1e-5
    w = XSmallCNN(width=4, zero_mean_stem=False).features[0].weight.detach()
    assert w.sum((1, 2, 3)).abs().max() > 1e-3


def test_x_model_bad_args() -> None:
    with pytest.raises(ValueError, match="block_layers"):
        XResNet((2, 2, 2))
    with pytest.raises(ValueError, match="num_classes"):
        XSmallCNN(num_classes=0)


def _frames(width: int, moves: list[tuple[int, int, int]]) -> torch.Tensor:
    """(1, 2, 1, width) two frames; each move = (start, bar width, dx)."""
    x = torch.zeros(1, 2, 1, width)
    for start, w, dx in moves:
        x[0, 0, 0, start : start + w] = 1.0
        x[0, 1, 0, start + dx : start + dx + w] = 1.0
    return x


def test_motion_detector_hand_computed_outputs() -> None:
    m = MotionDetector()
    assert not any(p.requires_grad for p in m.parameters())
    w = 17  # conv output width 16
    lr = m(_frames(w, [(3, 2, 1)]))
    bi = m(_frames(w, [(3, 2, 1), (11, 2, -1)]))
    # hand-derived (module doc): L->R bar: ΣL = 2, ΣR = 0; R->L bar: ΣL = 0, ΣR = 2; GAP divides by 16
    torch.testing.assert_close(lr, torch.tensor([[2.0, 1.0]]) / 16)
    torch.testing.assert_close(bi, torch.tensor([[0.0, 2.0]]) / 16)
    assert lr[0, 0] > bi[0, 0] and bi[0, 1] > lr[0, 1]
    assert lr.argmax(1).item() == 0 and bi.argmax(1).item() == 1
    # single-pixel dots and R->L only (mirror): output 0 negative
    dot = m(_frames(w, [(5, 1, 1)]))
    torch.testing.assert_close(dot, torch.tensor([[1.0, 0.5]]) / 16)
    rl = m(_frames(w, [(5, 3, -1)]))
    assert rl[0, 0] < 0
    with pytest.raises(ValueError, match="frames"):
        m(torch.zeros(1, 3, 1, 8))


def test_green_pixel_net_structure() -> None:
    m = GreenPixelNet()
    assert [n for n, _ in m.named_parameters()] == ["conv1.weight", "conv2.weight"]
    assert m.conv1.weight.shape == (2, 3, 1, 1) and m.conv2.weight.shape == (2, 2, 1, 1)
    x = torch.rand(4, 3, 32, 32)
    out = m(x)
    assert out.shape == (4, 2)
    # GAP of a pointwise net = mean over pixels of the per-pixel net
    per_pixel = m.conv2(torch.relu(m.conv1(x)))
    torch.testing.assert_close(out, per_pixel.mean((2, 3)))


def test_create_model() -> None:
    assert isinstance(create_model("xsmallcnn", 3), XSmallCNN)
    assert isinstance(create_model("xresnet18", 2, in_chans=1), XResNet)
    assert isinstance(create_model("motion", 2, in_chans=2), MotionDetector)
    assert isinstance(create_model("green_pixel", 2), GreenPixelNet)
    tv = create_model("torchvision:resnet18", 5)
    assert tv.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 5)
    tm = create_model("timm:resnet18", 4, in_chans=1)
    assert tm.eval()(torch.rand(1, 1, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="xresnet50"):
        create_model("resnet1234", 2)
    with pytest.raises(ValueError, match="no published weights"):
        create_model("xresnet50", 2, pretrained=True)
    with pytest.raises(ValueError, match="unknown torchvision"):
        create_model("torchvision:notamodel", 2)
    assert set(NEGSPACE_MODELS) == {"xresnet18", "xresnet50", "xsmallcnn", "green_pixel", "motion"}


def test_create_model_checkpoint_roundtrip(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = create_model("xsmallcnn", 2)
    path = tmp_path / "m.safetensors"
    save_file(m.state_dict(), str(path))
    m2 = create_model("xsmallcnn", 2, checkpoint=str(path))
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(m(x), m2(x))


def test_green_pixel_net_learns_the_absence_encoding() -> None:
    """Paper 000 §5.2: trained in plain torch it reaches > 0.9 and output 1 encodes the green pixel's absence."""
    import torch.nn.functional as F

    from negspace.data_modules.toy import green_pixel_images

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x, y, _ = green_pixel_images(1024, size=16, seed=0)
        xt, yt, _ = green_pixel_images(512, size=16, seed=1)
        m = GreenPixelNet()
        opt = torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=1e-4)
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, len(x), (128,), generator=g)
            loss = F.binary_cross_entropy_with_logits(m(x[idx]), F.one_hot(y[idx], 2).float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = m(xt)
    finally:
        torch.set_num_threads(threads)
    assert (out.argmax(1) == yt).float().mean() > 0.9
    # Fig. 4 (c): output 1 is positive without a green pixel and negative with one
    assert out[yt == 1, 1].mean() > 0 > out[yt == 0, 1].mean()
    # Fig. 4 (b): one hidden channel reacts to green, the other to red/blue; output 1 has a positive weight
    # on the red/blue channel and a negative one on the green channel
    w1, w2 = m.conv1.weight.detach().view(2, 3), m.conv2.weight.detach().view(2, 2)
    green = int(w1[:, 1].argmax())
    rb = 1 - green
    assert w1[green, 1] > 0 and w1[rb, 0] > 0 and w1[rb, 2] > 0
    assert w2[1, rb] > 0 > w2[1, green]
    assert w2[0, green] > 0


def test_green_pixel_net_init_arg() -> None:
    with pytest.raises(ValueError, match="init"):
        GreenPixelNet(init="xavier")
    assert (GreenPixelNet().conv1.weight >= 0.1).all()
