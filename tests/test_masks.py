"""negspace.masks: mask sources, concept directions, thresholds, frozen references, state and an end-to-end IoU."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import hook_count
from negspace.masks import (
    ConceptMask,
    Detector,
    MaskSource,
    as_mask_source,
    choose_threshold,
    fit_direction,
    localization_map,
    mask_iou,
)
from negspace.masks.cav import as_grid, default_dilate


class Boom(nn.Module):
    """Fails if the forward gets this far (the mask forward must stop at its layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the forward ran past the concept layer")


def conv_net(boom: bool = False) -> nn.Sequential:
    """1×1 conv (2 → 3 channels, set weights) → ReLU → head."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]).view(3, 2, 1, 1))
    head = Boom() if boom else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2, bias=False))
    return nn.Sequential(conv, nn.ReLU(), head)


def images(b: int = 4, h: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 2, h, h, generator=torch.Generator().manual_seed(seed))


class Identity(nn.Module):
    """Layer ``"id"`` outputs the image itself: maps equal images, so thresholds and dilation are checked by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.id = nn.Identity()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id(x) * self.w


# ------------------------------------------------------------------------------------------ Detector
def test_detector_wraps_a_callable_and_checks_its_output():
    x = torch.zeros(2, 3, 5, 5)
    x[0, 0, 1, 1] = 1.0
    det = as_mask_source(lambda im: (im[:, 0] > 0.5).float())  # (B, H, W) → unsqueezed
    assert isinstance(det, Detector)
    m = det(x)
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.float32 and not m.requires_grad
    assert m.sum() == 1 and m[0, 0, 1, 1] == 1
    assert as_mask_source(det) is det
    dil = Detector(lambda im: im[:, :1] * 10, threshold=5.0, dilate=1)(x)
    assert dil.sum() == 9 and dil[0, 0, :3, :3].sum() == 9  # one pixel → a 3×3 square
    with pytest.raises(ValueError, match=r"Detector\('bad'\).*\(B, 1, H, W\)"):
        Detector(lambda im: im, name="bad")(x)  # 3 channels
    with pytest.raises(ValueError, match=r"\[0, 1\].*threshold="):
        Detector(lambda im: im[:, :1] * 10)(x)
    with pytest.raises(ValueError, match="NaN"):
        Detector(lambda im: im[:, :1] * float("nan"), threshold=0.5)(x)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        det(x[0])
    with pytest.raises(ValueError, match="floating-point"):
        det(x.long())
    with pytest.raises(ValueError, match="NaN or inf"):
        det(torch.full((1, 3, 5, 5), float("inf")))
    with pytest.raises(TypeError, match="callable"):
        Detector(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dilate"):
        Detector(lambda im: im, dilate=-1)
    with pytest.raises(TypeError, match=r"MaskSource.*callable"):
        as_mask_source("mask")


def test_base_class_state_is_empty_and_synchronize_is_identity():
    class Ones(MaskSource):
        def compute(self, images):
            return torch.ones(images.shape[0], 1, *images.shape[-2:])

    src = Ones()
    assert not src.needs_model and src.state_dict() == {} and src.to("cpu") is src
    src.bind(nn.Linear(1, 1))
    src.synchronize()
    assert src(torch.rand(2, 3, 4, 4)).sum() == 32


# --------------------------------------------------------------------------------------------- IoU
def test_mask_iou_hand_values():
    pred = torch.zeros(4, 1, 2, 2)
    true = torch.zeros(4, 1, 2, 2)
    pred[0, 0, 0] = 1  # two pixels
    true[0, 0, :, 0] = 1  # two pixels, one shared → 1/3
    true[1, 0, 0, 0] = 1  # pred empty → 0
    pred[2] = 1
    true[2] = 1  # identical → 1; image 3 both empty → 1
    iou = mask_iou(pred, true, reduction="none")
    torch.testing.assert_close(iou, torch.tensor([1 / 3, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(mask_iou(pred[:, 0].bool(), true[:, 0]), iou.mean())
    with pytest.raises(ValueError, match="binary"):
        mask_iou(pred * 0.5, true)
    with pytest.raises(ValueError, match="same shape"):
        mask_iou(pred, true[:2])
    with pytest.raises(ValueError, match="reduction must be one of"):
        mask_iou(pred, true, reduction="sum")


# ---------------------------------------------------------------------------------------- directions
def test_fit_direction_mean_difference_by_hand():
    pos = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    d = fit_direction(pos, neg, "mean_diff")
    torch.testing.assert_close(d, torch.tensor([2.0, -1.0]) / 5**0.5)


def test_fit_direction_logistic_matches_sklearn_in_raw_feature_space():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 10.0, 0.1, 3.0])
    pos = (torch.randn(40, 4, generator=g) + torch.tensor([1.0, 0.0, -1.0, 0.5])) * scale
    neg = (torch.randn(50, 4, generator=g) - torch.tensor([1.0, 0.0, -1.0, 0.5])) * scale
    d = fit_direction(pos, neg, "logistic", C=0.5)
    x = torch.cat([pos, neg]).double().numpy()
    y = [1] * 40 + [0] * 50
    sc = StandardScaler().fit(x)
    w = LogisticRegression(C=0.5, max_iter=2000).fit(sc.transform(x), y).coef_[0] / sc.scale_
    ref = torch.as_tensor(w / (w**2).sum() ** 0.5, dtype=torch.float32)
    torch.testing.assert_close(d, ref, atol=1e-4, rtol=1e-4)
    assert float(d.norm()) == pytest.approx(1.0)
    assert (pos @ d).mean() > (neg @ d).mean()  # positive = concept present


@pytest.mark.parametrize(
    ("pos", "neg", "match"),
    [
        (torch.zeros(0, 3), torch.ones(2, 3), "non-empty"),
        (torch.ones(2, 3), torch.zeros(0, 3), "non-empty"),
        (torch.full((2, 3), float("nan")), torch.ones(2, 3), "NaN"),
        (torch.ones(2, 3), torch.ones(2, 4), "same number of channels"),
        (torch.ones(2, 3), torch.ones(2, 3), "not separable"),
    ],
)
def test_fit_direction_rejects_bad_examples(pos, neg, match):
    with pytest.raises(ValueError, match=match):
        fit_direction(pos, neg, "mean_diff")
    with pytest.raises(ValueError, match="method must be one of"):
        fit_direction(torch.ones(2, 3), torch.zeros(2, 3), "svm")


# ------------------------------------------------------------------------------------------- maps
def test_projection_map_is_the_hand_einsum_and_stops_at_the_layer():
    net, x = conv_net(boom=True), images()  # Boom after the layer: the forward must stop at "1"
    d = torch.tensor([0.5, -1.0, 2.0])
    a = F.relu(torch.einsum("oc,bchw->bohw", net[0].weight[:, :, 0, 0], x))
    ref = torch.einsum("bchw,c->bhw", a, d)[:, None]
    torch.testing.assert_close(localization_map(net, "1", x, d), ref)
    assert hook_count(net) == 0 and net.training
    with pytest.raises(ValueError, match="3 channels"):
        localization_map(net, "1", x, torch.ones(4))


def test_contribution_map_is_direction_weighted_activation_times_gradient():
    net, x = conv_net(), images()
    d = torch.tensor([1.0, 0.0, -2.0])
    a = F.relu(torch.einsum("oc,bchw->bohw", net[0].weight[:, :, 0, 0], x))
    g = net[2][2].weight[0] / (x.shape[-1] * x.shape[-2])  # ∂ logit_0 / ∂a: constant per channel (avg pool)
    ref = torch.einsum("bchw,c->bhw", a * g.view(1, 3, 1, 1), d)[:, None]
    out = localization_map(net, "1", x, d, localize="contribution", target=0)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="localize must be one of"):
        localization_map(net, "1", x, d, localize="gradcam")


def test_token_layers_become_grids():
    t = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # class token + 2×2 grid, 3 dims
    grid = as_grid(t)
    assert grid.shape == (2, 3, 2, 2)
    torch.testing.assert_close(grid[:, :, 0, 1], t[:, 2])
    assert as_grid(t[:, 1:]).shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="square grid"):
        as_grid(torch.zeros(2, 7, 3))


def test_threshold_and_dilation_by_hand():
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 2, 2], x[0, 0, 6, 0] = 0.9, 0.4
    cm = ConceptMask("id", torch.tensor([1.0]), model=Identity(), threshold=0.5, dilate=0)
    m = cm(x)
    assert m.sum() == 1 and m[0, 0, 2, 2] == 1
    cm.dilate = 1
    assert cm(x)[0, 0, 1:4, 1:4].sum() == 9 and cm(x).sum() == 9
    cm.threshold = 0.3
    assert cm(x).sum() == 9 + 4 and cm(x)[0, 0, 5:, :2].sum() == 4  # the 0.4 corner, dilated: a 2×2 square
    # default: paper 000's round(10·H/224) minus half the stride
    assert default_dilate(32, 16) == 0 and default_dilate(64, 32) == 2 and default_dilate(64, 16) == 1
    assert default_dilate(224, 14) == 2 and default_dilate(32, 8) == 0
    cm.dilate = None
    assert cm(x).sum() == 2  # 7 px, stride 1: round(70/224) − 0 = 0


def test_choose_threshold_rules_by_hand():
    art = torch.zeros(3, 1, 2, 2)
    art[:, 0, 0, 0] = torch.tensor([4.0, 6.0, 8.0])
    clean = torch.zeros(3, 1, 2, 2)
    clean[:, 0, 1, 1] = torch.tensor([1.0, 2.0, 3.0])
    assert choose_threshold(art, clean, rule="midpoint") == pytest.approx((6 + 2) / 2)
    assert choose_threshold(art, clean, rule="half_peak") == pytest.approx(0 + (6 - 0) / 2)  # background 0
    assert choose_threshold(art, clean, rule="clean_max") == pytest.approx(2.9)
    assert 0.0 < choose_threshold(art * 0.1, clean * 0.01) <= 0.4  # Otsu: between the zeros and the peaks
    assert choose_threshold(art * 0.1, clean) == pytest.approx(2.9)  # but never below the clean 95th percentile
    with pytest.raises(ValueError, match="rule must be one of"):
        choose_threshold(art, clean, rule="mean")
    with pytest.raises(ValueError, match="non-empty maps"):
        choose_threshold(art[:0], clean)
    with pytest.raises(ValueError, match="NaN"):
        choose_threshold(art * float("nan"), clean)


# -------------------------------------------------------------------------------- reference model
def test_frozen_reference_ignores_later_updates_and_live_follows_them():
    net, x = conv_net(), images()
    d = torch.tensor([1.0, 1.0, 1.0])
    frozen = ConceptMask("1", d, model=net, threshold=0.5)
    live = ConceptMask("1", d, model=net, threshold=0.5, reference="live")
    before_f, before_l = frozen.localize_map(x), live.localize_map(x)
    assert frozen.model is not net and live.model is net
    assert all(not p.requires_grad for p in frozen.model.parameters())
    assert all(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        net[0].weight.mul_(2.0)  # "training" changes the model
    torch.testing.assert_close(frozen.localize_map(x), before_f)
    torch.testing.assert_close(live.localize_map(x), 2 * before_l)
    frozen.bind(net)  # already holds a reference: kept
    torch.testing.assert_close(frozen.localize_map(x), before_f)
    frozen.bind(net, refresh=True)
    torch.testing.assert_close(frozen.localize_map(x), 2 * before_f)


class Viewer(nn.Module):
    """Conv → ``.view`` of its map (fails on channels-last tensors) → ReLU (the concept layer) → head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        a = self.act(a.view(a.shape[0], -1).view(a.shape))
        return self.head(a.mean((2, 3)))


def test_frozen_fast_path_matches_the_general_path_and_falls_back():
    from negspace.models.xmodels import XSmallCNN

    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    for net, layer in ((XSmallCNN(2, 3, 8), "features.8"), (Viewer(), "act")):
        c = 8 if layer == "act" else 16
        d = torch.randn(c)
        frozen = ConceptMask(layer, d[:4] if layer == "act" else d, model=net, threshold=0.0)
        live = ConceptMask(layer, frozen.direction, model=net, threshold=0.0, reference="live")
        torch.testing.assert_close(frozen.localize_map(x), live.localize_map(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(frozen(x), live(x))
        w = next(p for p in frozen.model.parameters() if p.dim() == 4)
        assert w.is_contiguous(memory_format=torch.channels_last) == (layer != "act")  # Viewer fell back
    frozen = ConceptMask("1", torch.ones(3), model=conv_net(boom=True), threshold=0.0)  # stops at the layer
    assert frozen(images()).shape == (4, 1, 6, 6)


def test_model_is_left_in_its_mode_and_without_hooks_also_on_errors():
    net = conv_net()
    net.train()
    net[0].eval()  # an intentionally frozen submodule stays in eval mode
    live = ConceptMask("1", torch.ones(3), model=net, threshold=0.5, reference="live")
    live(images())
    assert net.training and not net[0].training and net[1].training and hook_count(net) == 0
    with pytest.raises(RuntimeError):
        live(torch.rand(1, 5, 6, 6))  # wrong channel count: fails inside the hooked forward
    assert net.training and not net[0].training and hook_count(net) == 0
    frozen = ConceptMask("1", torch.ones(3), model=net, threshold=0.5)
    assert not frozen.model.training and hook_count(frozen.model) == 0


def test_no_grad_and_float32_inside_autocast():
    net = conv_net()
    cm = ConceptMask("1", torch.tensor([1.0, -1.0, 0.5]), model=net, threshold=0.1, reference="live")
    x = images().requires_grad_(True)
    ref = cm(x)
    assert not ref.requires_grad and ref.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cm(x)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, ref)


def test_unbound_and_bad_layer_errors():
    cm = ConceptMask("1", torch.ones(3), threshold=0.5)
    assert cm.needs_model and "bound=False" in repr(cm)
    with pytest.raises(ValueError, match="not bound"):
        cm(images())
    cm.bind(conv_net())
    assert not cm.needs_model and "bound=True" in repr(cm)
    with pytest.raises(ValueError, match=r"layer 'features.8' does not exist.*Valid layer names"):
        ConceptMask("features.8", torch.ones(3), model=conv_net())
    with pytest.raises(ValueError, match="no threshold"):
        ConceptMask("1", torch.ones(3), model=conv_net())(images())
    with pytest.raises(ValueError, match="reference must be one of"):
        ConceptMask("1", torch.ones(3), reference="copy")
    with pytest.raises(ValueError, match="localize must be one of"):
        ConceptMask("1", torch.ones(3), localize="cam")
    with pytest.raises(ValueError, match="direction contains NaN"):
        ConceptMask("1", torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="target must be one of"):
        ConceptMask("1", torch.ones(3), target="label")
    with pytest.raises(TypeError, match="layer name and a direction"):
        ConceptMask("1")


# -------------------------------------------------------------------------------------------- state
def test_state_dict_round_trip_and_resume_reproduces_the_saved_reference(tmp_path):
    net, x = conv_net(), images()
    cm = ConceptMask("1", torch.tensor([1.0, -0.5, 0.25]), model=net, threshold=0.2, dilate=1, method="mean_diff")
    want_map, want_mask = cm.localize_map(x), cm(x)
    torch.save(cm.state_dict(), tmp_path / "cb.pt")
    with torch.no_grad():
        net[0].weight.mul_(-1.0)  # the resumed model differs from the original reference
    state = torch.load(tmp_path / "cb.pt", weights_only=True)
    fresh = ConceptMask("1", torch.ones(3))
    fresh.load_state_dict(state)
    assert fresh.needs_model and fresh.threshold == pytest.approx(0.2) and fresh.dilate == 1
    fresh.bind(net)
    torch.testing.assert_close(fresh.localize_map(x), want_map)
    torch.testing.assert_close(fresh(x), want_mask)
    bound = ConceptMask("1", torch.ones(3), model=net)  # bound first, then loaded: the reference is replaced
    bound.load_state_dict(state)
    torch.testing.assert_close(bound.localize_map(x), want_map)
    cm.synchronize()  # identity without a process group
    torch.testing.assert_close(cm.localize_map(x), want_map)
    with pytest.raises(ValueError, match="expected the dict"):
        fresh.load_state_dict({"threshold": 1.0})


def test_save_and_load_file(tmp_path):
    net, x = conv_net(), images()
    cm = ConceptMask("1", torch.tensor([1.0, -0.5, 0.25]), model=net, threshold=0.2, method="logistic", pool="mean")
    cm.save(str(tmp_path / "concept"), weights=True)
    cm.save(str(tmp_path / "light.json"))  # suffix dropped; direction only
    spec = json.loads((tmp_path / "concept.json").read_text())
    assert spec["layer"] == "1" and spec["threshold"] == pytest.approx(0.2) and spec["weights"] is True
    assert spec["method"] == "logistic" and spec["pool"] == "mean" and spec["reference"] == "frozen"
    with torch.no_grad():
        net[0].weight.add_(1.0)
    loaded = ConceptMask(file=str(tmp_path / "concept"), model=net)
    torch.testing.assert_close(loaded.direction, cm.direction)
    torch.testing.assert_close(loaded(x), cm(x))  # saved reference weights, not the changed model
    light = ConceptMask(file=str(tmp_path / "light"), threshold=0.7, model=net)
    assert light.threshold == pytest.approx(0.7)  # explicit threshold overrides the file's
    torch.testing.assert_close(light.localize_map(x), localization_map(net, "1", x, cm.direction))
    with pytest.raises(ValueError, match="needs a bound frozen reference"):
        ConceptMask("1", torch.ones(3)).save(str(tmp_path / "x"), weights=True)
    with pytest.raises(ValueError, match="either"):
        ConceptMask("1", torch.ones(3), file=str(tmp_path / "concept"))
    with pytest.raises(ValueError, match=r"written by ConceptMask\.save"):
        ConceptMask(file=str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------ constructors
def test_from_channels_and_from_codec_mode():
    net = conv_net()
    cm = ConceptMask.from_channels(net, "1", [0, 2], [1.0, 3.0], threshold=0.5)
    torch.testing.assert_close(cm.direction, torch.tensor([1.0, 0.0, 3.0]) / 10**0.5)
    assert cm.method == "channels"
    with pytest.raises(ValueError, match=r"channels must lie in \[0, 3\)"):
        ConceptMask.from_channels(net, "1", [3])
    with pytest.raises(ValueError, match="distinct ints"):
        ConceptMask.from_channels(net, "1", [0, 0])
    art, clean = images(6, seed=1), images(6, seed=2) * 0.1
    fitted = ConceptMask.from_channels(net, "1", [0], examples=(art, clean))
    maps = lambda im: F.interpolate(fitted.localize_map(im), size=(6, 6), mode="bilinear")  # noqa: E731
    assert fitted.threshold == pytest.approx(choose_threshold(maps(art), maps(clean)))
    modes = types.SimpleNamespace(layer="1", num_channels=3, atom=lambda m: torch.tensor([2.0, 0.0, 1.0, 0.0, 0.0, 3.0]))
    codec = ConceptMask.from_codec_mode(net, modes, 0, threshold=0.1)  # [E, I] atom → E − I
    torch.testing.assert_close(codec.direction, torch.tensor([2.0, 0.0, -2.0]) / 8**0.5)
    assert codec.method == "codec" and codec.layer == "1"


def test_from_examples_reads_loaders_and_tensors_alike():
    net = conv_net()
    art, clean = images(8, seed=1) + 0.5, images(8, seed=2)
    a = ConceptMask.from_examples(net, "1", art, clean, method="mean_diff")
    batches = lambda x: [{"x": x[i : i + 3], "y": torch.zeros(len(x[i : i + 3]))} for i in range(0, 8, 3)]  # noqa: E731
    b = ConceptMask.from_examples(net, "1", batches(art), batches(clean), method="mean_diff",
                                  batch_keys={"image": "x"}, reference="live")
    torch.testing.assert_close(a.direction, b.direction)
    assert a.threshold == pytest.approx(b.threshold) and a.pool == "mean" and b.model is net
    c = ConceptMask.from_examples(net, "1", art, clean, method="mean_diff", max_images=4, threshold=0.3)
    assert c.threshold == 0.3
    with pytest.raises(ValueError, match="pool must be one of"):
        ConceptMask.from_examples(net, "1", art, clean, pool="median")
    with pytest.raises(ValueError, match="Valid layer names"):
        ConceptMask.from_examples(net, "conv", art, clean)


def _planted(n: int, seed: int, size: int = 32, side: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth random images; class 0 carries a saturated ``side``-pixel square at a random place (its mask)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear") * 0.6 + 0.2
    y = torch.arange(n) % 2
    mask = torch.zeros(n, 1, size, size)
    for i in range(n):
        if y[i] == 0:
            r, c = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
            mask[i, :, r : r + side, c : c + side] = 1
    colour = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    return x * (1 - mask) + colour * mask, y, mask


def test_end_to_end_planted_artifact_iou(one_thread):
    """A small net trained where a square means class 0: the default concept mask finds the square (IoU against
    the true mask dilated by paper 000's margin, as the data modules' masks are; without it the IoU is ≈ 0.5)."""
    from negspace.data_modules.patches import default_dilation, dilate_mask
    from negspace.models.xmodels import XSmallCNN

    torch.manual_seed(0)
    net = XSmallCNN(num_classes=2, in_channels=3, width=8)
    x, y, _ = _planted(256, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(8):
        for i in range(0, 256, 32):
            opt.zero_grad()
            F.cross_entropy(net(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()
    cm = ConceptMask.from_examples(net, "features.8", x[y == 0][:64], x[y == 1][:64])
    xt, yt, mt = _planted(128, seed=1)
    m = cm(xt)
    true = dilate_mask(mt[yt == 0], default_dilation(32))
    iou = float(mask_iou(m[yt == 0], true))
    assert iou > 0.5, (iou, cm)
    assert float((m[yt == 0] * mt[yt == 0]).sum() / mt[yt == 0].sum()) > 0.9  # the square is covered
    assert float(m[yt == 1].mean()) < 0.01  # almost no mask on clean images
    assert hook_count(net) == 0 and net.training
