"""Edits that leave the library: bake (folds into weights, masks, routed layers), torch.export, ONNX (+ ONNX
Runtime), and save/load of edit specs (safetensors + JSON). Oracle: the hooked model, to 1e-6 in float64."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
from torch import nn

from helpers import hook_count
from negspace.editing.baking import ChannelFill, EditedLayer, bake, bake_plan
from negspace.editing.channels import ChannelEdit
from negspace.editing.io import load_edit, load_edited, save_edit
from negspace.editing.router import VirtualNeuronRouter
from negspace.editing.routing_module import RoutedBlock, RoutedLayer
from negspace.explain.pure import VirtualNeuronSet, fit_virtual_neurons
from negspace.hooks import intervene

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# random centroids and random-init networks: PURE rightly warns that these virtual neurons split arbitrarily
pytestmark = pytest.mark.filterwarnings("ignore:PURE.*split arbitrarily:UserWarning")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (random init has mean 0, var 1, weight 1)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model


def hooked(model: nn.Module, edit: ChannelEdit | VirtualNeuronRouter, x: torch.Tensor) -> torch.Tensor:
    with edit.applied(model), torch.no_grad():
        return model(x)


def check_baked(model, edit, x, example=None, expect=None, export=True, **kw) -> nn.Module:
    """bake == hooked (1e-6, float64), the original is untouched, the bake has no hooks; torch.export agrees."""
    ref = hooked(model, edit, x)
    with torch.no_grad():
        plain = model(x)
    if expect is not None:
        assert {s.layer: s.how for s in bake_plan(model, edit, example, **kw)} == expect
    baked = bake(model, edit, example, **kw)
    assert hook_count(baked) == 0 and hook_count(model) == 0
    with torch.no_grad():
        out = baked(x)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), plain, atol=0, rtol=0)  # not baked in place
    assert (out - plain).abs().max() > 1e-3  # the edit does something
    if export:
        ep = torch.export.export(baked, (x,))
        torch.testing.assert_close(ep.module()(x), ref, atol=1e-6, rtol=0)
    return baked


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_torchvision_resnet18_folds_own_params_and_masks_the_rest():
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).double().eval()
    edits = {"layer1.0.bn1": [1, 5], "layer2.0.conv1": [0, 3], "layer3.1.relu": [2], "layer4": [7], "fc": [1]}
    expect = {"layer1.0.bn1": "own", "layer2.0.conv1": "own", "layer3.1.relu": "mask", "layer4": "mask", "fc": "own"}
    baked = check_baked(model, ChannelEdit(edits, value=0.5), images(seed=1), images(), expect)
    # own folds: zero weight rows, the value in the bias (a bias is added to the bias-free conv)
    assert torch.all(baked.layer2[0].conv1.weight[[0, 3]] == 0) and torch.all(baked.layer2[0].conv1.bias[[0, 3]] == 0.5)
    assert torch.all(baked.layer1[0].bn1.weight[[1, 5]] == 0) and baked.layer1[0].bn1.bias[5] == 0.5
    # the relu runs twice per block (after bn1 and after the residual add): a mask, applied to both calls
    assert isinstance(baked.layer3[1].relu, EditedLayer) and isinstance(baked.layer3[1].relu.fill, ChannelFill)
    steps = {s.layer: s for s in bake_plan(model, ChannelEdit(edits, value=0.5), images())}
    assert "runs 2 times" in steps["layer3.1.relu"].reason and "AdaptiveAvgPool2d" in steps["layer4"].reason
    # without an example the Linear's output rank is unknown: masked, still equal
    no_ex = {"layer1.0.bn1": "own", "layer2.0.conv1": "own", "layer3.1.relu": "mask", "layer4": "mask", "fc": "mask"}
    check_baked(model, ChannelEdit(edits, value=0.5), images(seed=1), None, no_ex, export=False)


@pytest.mark.parametrize(
    ("mode", "value", "layer", "how"),
    [
        # act1 (inplace ReLU) feeds only conv2 (through the Identity "aa"): a zero folds into conv2's input weights
        ("ablate", "zero", "layer1.0.act1", "next"),
        ("preserve", -0.25, "layer1.0.act1", "mask"),  # a non-zero value would meet conv2's zero padding
        ("ablate", "mean", "layer1.0.act1", "mask"),  # the batch mean depends on the batch
        ("ablate", {"layer2.0.bn2": torch.arange(128.0)}, "layer2.0.bn2", "own"),
    ],
)
def test_timm_resnet_values_modes_and_next_layer_fold(mode, value, layer, how):
    model = randomize_bn(timm.create_model("resnet18", pretrained=False, num_classes=10)).double().eval()
    edit = ChannelEdit({layer: [1, 5, 9]}, mode=mode, value=value)
    baked = check_baked(model, edit, images(seed=1), images(), {layer: how})
    if how == "next":
        assert torch.all(baked.layer1[0].conv2.weight[:, [1, 5, 9]] == 0) and baked.layer1[0].conv2.bias is None


def test_convnext_block_depthwise_layernorm2d_and_mlp():
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10).double().eval()
    b = "stages.1.blocks.0"
    edits = {f"{b}.conv_dw": [1], f"{b}.norm": [2, 4], f"{b}.mlp.act": [5, 9], "stages.1.blocks.1": [0]}
    # GELU output -> Dropout(0) -> Identity -> 1x1 conv fc2 (no padding): a non-zero value folds into fc2's bias
    expect = {f"{b}.conv_dw": "own", f"{b}.norm": "own", f"{b}.mlp.act": "next", "stages.1.blocks.1": "mask"}
    baked = check_baked(model, ChannelEdit(edits, value=0.2), images(seed=1), images(), expect)
    assert torch.all(baked.stages[1].blocks[0].mlp.fc2.weight[:, [5, 9]] == 0)


def test_vit_mlp_linear_layernorm_and_gelu():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).double().eval()
    edits = {"blocks.0.mlp.fc1": [1], "blocks.0.mlp.act": [3, 4], "blocks.1.norm2": [2]}
    expect = {"blocks.0.mlp.fc1": "own", "blocks.0.mlp.act": "next", "blocks.1.norm2": "own"}
    check_baked(model, ChannelEdit(edits, value=0.1), images(seed=1), images(), expect)
    none = dict.fromkeys(edits, "mask")
    check_baked(model, ChannelEdit(edits, value=0.1), images(seed=1), images(), none, export=False, fold="none")


class HiddenUser(nn.Module):
    """``act``'s output feeds ``fc2`` and, outside the autograd graph, a detached mean."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(h) + h.detach().mean(-1, keepdim=True)


def test_next_fold_is_refused_for_a_second_user_and_checked_on_the_example():
    torch.manual_seed(0)
    residual = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6)).double()
    x = torch.rand(5, 4, dtype=torch.float64) + 0.5

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = residual

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.net[1](self.net[0](x))
            return self.net[2](h) + h  # h has two users in the graph

    edit = ChannelEdit({"net.1": [0, 2]})
    step = bake_plan(Residual(), edit, x)[0]
    assert step.how == "mask" and "other users in the graph" in step.reason
    check_baked(Residual(), edit, x, x, export=False)
    # a use the graph cannot show (detached): the check on the example catches it, masks replace the fold
    hidden = HiddenUser().double()
    with torch.no_grad():
        hidden.fc1.bias.fill_(1.0)
    edit = ChannelEdit({"act": [0, 2]})
    assert bake_plan(hidden, edit, x)[0].how == "next"
    with pytest.warns(UserWarning, match="did not reproduce"):
        baked = check_baked(hidden, edit, x, x, export=False)
    assert isinstance(baked.act, EditedLayer)


def test_bake_inplace_removes_the_hooks_and_the_state_dict_loads_into_a_plain_model():
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).double().eval()
    x = images(seed=2)
    edit = ChannelEdit({"layer3.0.bn2": [0, 4], "fc": [3]}).apply(model)
    with torch.no_grad():
        ref = model(x)
    same = bake(model, edit, images(), inplace=True)
    assert same is model and not edit.active and hook_count(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    plain = torchvision.models.resnet18(num_classes=10).double().eval()
    plain.load_state_dict(torch.load(buf, weights_only=True))  # strict: folds keep the original keys
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref, atol=1e-6, rtol=0)
    other = torchvision.models.resnet18(num_classes=10)
    with edit.applied(other), pytest.raises(ValueError, match="applied to another model"):
        bake(model, edit)
    with pytest.raises(ValueError, match="fold must be one of"):
        bake(model, edit, fold="weights")


# ------------------------------------------------------------------------------------------------ router
def router_model() -> tuple[nn.Module, VirtualNeuronRouter]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False).eval()
    g = torch.Generator().manual_seed(0)
    fits = {k: torch.rand(12, 512, generator=g) / 512 for k in (3, 7)}
    vn = VirtualNeuronSet("layer4.1.conv2", "layer4.1.act1", k=2).fit(fits)
    return model, VirtualNeuronRouter(vn, {3: {0: 0.0, 1: 0.5}, 7: {0: 3.0, 1: 2.0}})


@pytest.mark.parametrize("mode", ["sample", "position"])
def test_router_becomes_a_module_and_exports(mode):
    model, router = router_model()
    router = VirtualNeuronRouter(router.vn, {3: {0: 0.0, 1: 0.5}, 7: {0: 3.0, 1: 2.0}}, mode=mode)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ref = hooked(model, router, x)
    with torch.no_grad():
        assert (model(x) - ref).abs().max() > 1e-3
    router.apply(model)
    baked = bake(model, router)  # from the hooked model: a copy without the hook
    assert router.active and hook_count(baked) == 0
    router.remove()
    routed = baked.layer4[1].conv2
    assert isinstance(routed, RoutedLayer) and routed.neurons == (3, 7) and "centroids_1" in dict(routed.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(baked(x), ref, atol=0, rtol=0)  # the same operations as the hook
    ep = torch.export.export(baked, (x,))
    torch.testing.assert_close(ep.module()(x), ref, atol=1e-6, rtol=0)
    with router.applied(model):  # the hooked model exports too
        ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), ref, atol=1e-6, rtol=0)


def test_router_on_a_block_output_uses_the_autograd_path():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False).eval()
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    vn = fit_virtual_neurons(model, "layer4", "layer4.0", x, neurons=[3, 7], n_ref=16, k=2)
    router = VirtualNeuronRouter(vn, {3: {0: 0.0}, 7: {1: 2.0}})
    with pytest.raises(ValueError, match=r"nn\.Conv2d"):  # the hook needs the exact fast path
        router.apply(model)
    baked = bake(model, router)  # layer4 = (layer4.0, layer4.1): layer4.1 becomes a RoutedBlock
    assert isinstance(baked.layer4[1], RoutedBlock) and hook_count(baked) == 0
    # oracle: the virtual neurons PURE assigns (autograd circuits on the whole model), scaled at layer4
    lab = vn.assign(model, x, [3, 7])
    assert 0 < lab.sum() < lab.numel()  # both virtual neurons occur

    def scaled(z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        z[:, 3] *= router.scales[3][lab[:, 0]][:, None, None]
        z[:, 7] *= router.scales[7][lab[:, 1]][:, None, None]
        return z

    with torch.no_grad(), intervene(model, {"layer4": scaled}):
        ref = model(x)
    with torch.inference_mode():  # Lightning's validation mode: the circuits still get their backward
        torch.testing.assert_close(baked(x), ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"routes only an nn\.Conv2d/nn\.Linear"):
        bake(model, VirtualNeuronRouter(vn, {3: {0: 0.0}}, mode="position"))
    vn_far = VirtualNeuronSet("layer4", "layer3.0", k=2).fit({3: torch.rand(6, 256)})
    with pytest.raises(ValueError, match=r"cannot route layer 'layer4' with circuits on 'layer3\.0'"):
        bake(model, VirtualNeuronRouter(vn_far, {3: {0: 0.0}}))


# ------------------------------------------------------------------------------------------------ ONNX
def onnx_check(model: nn.Module, x: torch.Tensor, ref: torch.Tensor, tmp_path) -> None:
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install 'negspace[export]')")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX Runtime check needs onnxruntime")
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=2e-5, rtol=1e-4)


def test_onnx_runtime_matches_baked_channel_edit_and_router(tmp_path):
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    edit = ChannelEdit({"layer1.0.bn1": [1, 5], "layer3.1.relu": [2], "layer4": [7]}, value=0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ref = hooked(model, edit, x)
    onnx_check(bake(model, edit), x, ref, tmp_path)
    model, router = router_model()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    onnx_check(bake(model, router), x, hooked(model, router, x), tmp_path)


# ------------------------------------------------------------------------------------------------ save/load
def test_save_load_round_trip_and_fit_errors(tmp_path):
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).double().eval()
    x = images(seed=6)
    values = {"layer2.1.conv2": torch.arange(128.0), "fc": torch.linspace(-1, 1, 10)}
    edit = ChannelEdit({"layer2.1.conv2": [0, 9], "fc": [2, 3]}, value=values)
    ref = hooked(model, edit, x)
    js = save_edit(edit, tmp_path / "run" / "edit")
    assert js.name == "edit.json" and (tmp_path / "run" / "edit.safetensors").exists()
    spec = json.loads(js.read_text())
    assert spec["kind"] == "ChannelEdit" and spec["layers"] == ["layer2.1.conv2", "fc"] and spec["state"]["mode"] == "ablate"
    loaded = load_edited(model, tmp_path / "run" / "edit.json")
    try:
        assert loaded.active and loaded.layers == edit.layers
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
    finally:
        loaded.remove()
    assert hook_count(model) == 0
    # the router: centroids, scales, mode and reduce come back; the loaded router routes identically
    rmodel, router = router_model()
    xr = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    save_edit(router, tmp_path / "router")
    loaded = load_edited(rmodel, tmp_path / "router")
    with torch.no_grad():
        out = rmodel(xr)
    loaded.remove()
    torch.testing.assert_close(out, hooked(rmodel, router, xr), atol=0, rtol=0)
    assert torch.equal(loaded.vn.centroids[7], router.vn.centroids[7]) and loaded.mode == router.mode
    # a spec that does not fit the model
    save_edit(ChannelEdit({"layer9.0.conv1": [0]}), tmp_path / "missing")
    with pytest.raises(ValueError, match=r"does not fit ResNet: layer 'layer9.0.conv1' does not exist"):
        load_edited(model, tmp_path / "missing")
    save_edit(ChannelEdit({"layer1.0.conv1": [3, 70]}), tmp_path / "range")
    with pytest.raises(ValueError, match=r"channel 70 out of range for layer 'layer1\.0\.conv1' with 64 channels"):
        load_edited(model, tmp_path / "range")
    save_edit(ChannelEdit({"fc": [1]}, value={"fc": torch.zeros(7)}), tmp_path / "shape")
    with pytest.raises(ValueError, match=r"value for layer 'fc' must have shape \(10,\), got \(7,\)"):
        load_edited(model, tmp_path / "shape")
    vn_small = VirtualNeuronSet("layer4.1.conv2", "layer4.1.act1", k=2).fit({3: torch.rand(6, 256)})
    save_edit(VirtualNeuronRouter(vn_small, {3: {0: 0.0}}), tmp_path / "centroids")
    with pytest.raises(ValueError, match=r"centroids of neuron 3 have shape \(2, 256\); layer 'layer4.1.conv2' reads 512"):
        load_edited(rmodel, tmp_path / "centroids")
    assert hook_count(model) == 0 and hook_count(rmodel) == 0
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="is not a negspace edit spec"):
        load_edit(tmp_path / "bad")


def test_tied_weights_are_not_folded():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).double()
    net[2].weight = net[0].weight  # tied
    x = torch.randn(3, 4, dtype=torch.float64)
    edit = ChannelEdit({"0": [1], "1": [2]})
    steps = {s.layer: s for s in bake_plan(net, edit, x)}
    assert steps["0"].how == "mask" and "tied" in steps["0"].reason and "tied" in steps["1"].reason
    check_baked(net, edit, x, x, export=False)
