"""Tension / absence analysis (papers 001, 000) on the green-pixel toy net and the motion detector."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import ttest_ind
from torch.utils.data import DataLoader, TensorDataset

from helpers import hook_count
from negspace.attribution import input_x_gradient, layer_contributions
from negspace.callbacks import TensionReport
from negspace.data_modules.toy import green_pixel_images, motion_sequences
from negspace.explain.tension import (
    FourierImage,
    TensionResult,
    activating_patches,
    attribution_atlas,
    attribution_inversion,
    channel_values,
    completeness_correlation,
    dot_cos,
    e_split,
    embed_2d,
    grid_average,
    insertion_test,
    layer_to_feature_attribution,
    non_target_attribution,
    phi_maps,
    select_mti,
    tension_report,
    tension_stats,
    uniqueness,
    visualize,
)
from negspace.models.toy import GreenPixelNet, MotionDetector
from negspace.objectives import direction, neuron

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only add contention


@pytest.fixture(scope="module")
def green():
    """GreenPixelNet trained as in paper 000 B.2 (BCE, Adam lr 0.01, wd 1e-4), 300 seeded steps."""
    x, y, _ = green_pixel_images(2000, SIZE, seed=0)
    torch.manual_seed(1)
    net = GreenPixelNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = F.binary_cross_entropy_with_logits(net(x[idx]), F.one_hot(y[idx], 2).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xv, yv, mv = green_pixel_images(400, SIZE, seed=1)
    with torch.no_grad():
        acc = (net(xv).argmax(1) == yv).float().mean().item()
    assert acc > 0.95, f"toy net did not train (acc {acc})"
    return net, xv, yv, mv


@pytest.fixture(scope="module")
def motion():
    x, y, m = motion_sequences(400, seed=3)
    return MotionDetector().eval(), x, y, m


def naive_patch_values(model, layer, x, patch, stride):
    """Reference: one forward per window."""
    vals, where = [], []
    for i in range(x.shape[0]):
        for top in range(0, x.shape[2] - patch[0] + 1, stride[0]):
            for left in range(0, x.shape[3] - patch[1] + 1, stride[1]):
                crop = x[i : i + 1, :, top : top + patch[0], left : left + patch[1]]
                vals.append(channel_values(model, layer, crop)[0])
                where.append((i, top, left))
    return torch.stack(vals), torch.tensor(where)


# ------------------------------------------------------------------------------------------ encoded absences
def test_green_pixel_least_patch_and_insertion(green):
    net, x, _, _ = green
    pr = activating_patches(net, "conv2", x, patch_size=4, stride=2, k=8, progress=False)
    absent = 1  # output 1 = "no green pixel": encodes the absence of green
    least = pr.least[absent]  # (k, 3, 4, 4)
    pure_green = (least[:, 1] > 0.5) & (least[:, 0] == 0) & (least[:, 2] == 0)
    assert pure_green.flatten(1).any(1).all(), "every least-activating patch must contain a green pixel"
    assert (pr.least_values[absent] < 0).all()
    ins = insertion_test(net, "conv2", x, pr, n_images=50, seed=0, progress=False)
    row = ins.per_channel[absent]
    assert row["least"] < row["random"] and row["p_least"] < 0.01 and row["inhibited"]
    acts = ins.activations
    assert ttest_ind(acts["random"][absent], acts["none"][absent]).pvalue > 0.01  # random patches: no effect
    assert row["most"] >= row["none"]
    assert [r["method"] for r in ins.table] == ["none", "random", "least", "most"]
    assert 0.5 <= ins.fraction_inhibited <= 1.0


def test_motion_least_patch_is_right_to_left(motion):
    net, x, _, masks = motion
    pr = activating_patches(net, "conv2", x, patch_size=(1, 8), stride=(1, 2), k=8, progress=False)
    for j in range(8):  # output 0 (HR detector) is inhibited by right-to-left motion: the masked bars
        i, top, left = pr.least_where[0, j].tolist()
        assert masks[i, 0, top, left : left + 8].sum() > 0
        assert torch.equal(pr.least[0, j], x[i, :, top : top + 1, left : left + 8])
    ins = insertion_test(net, "conv2", x, pr, channels=[0], n_images=50, seed=0, progress=False)
    (row,) = ins.per_channel
    assert row["p_least"] < 0.01 and row["least"] < row["random"]
    assert ttest_ind(ins.activations["random"][0], ins.activations["none"][0]).pvalue > 0.01


def test_patch_search_matches_naive_loop(green):
    net, x, _, _ = green
    x = x[:6]
    pr = activating_patches(net, "conv2", x, patch_size=(5, 4), stride=(3, 4), k=3, chunk_size=7, progress=False)
    vals, where = naive_patch_values(net, "conv2", x, (5, 4), (3, 4))
    for c in range(2):
        ref_most = vals[:, c].sort(descending=True).values[:3]
        ref_least = vals[:, c].sort().values[:3]
        torch.testing.assert_close(pr.most_values[c], ref_most)
        torch.testing.assert_close(pr.least_values[c], ref_least)
        for j in range(3):  # the recorded window reproduces its value
            i, top, left = pr.least_where[c, j].tolist()
            assert any((where == torch.tensor([i, top, left])).all(1))
            crop = x[i : i + 1, :, top : top + 5, left : left + 4]
            torch.testing.assert_close(channel_values(net, "conv2", crop)[0, c], pr.least_values[c, j])
    assert hook_count(net) == 0


# ---------------------------------------------------------------------------------------------- S_l, E±, φ±
def test_s_matches_captum_and_phi_sums_to_attribution(green):
    from captum.attr import LayerGradientXActivation

    net, x, _, _ = green
    x = x[:16]
    s = layer_to_feature_attribution(net, "relu", x, neuron("conv2", 1))
    ref = LayerGradientXActivation(net, net.relu).attribute(x, target=1)  # GAP(conv2[1]) = logit 1
    torch.testing.assert_close(s, ref)
    pp, pm = phi_maps(s)
    ep, em = e_split(s)
    total = s.flatten(1).sum(1)
    torch.testing.assert_close(pp.flatten(1).sum(1) - pm.flatten(1).sum(1), total)
    torch.testing.assert_close(ep - em, total)
    # conv2 is linear in relu's output: completeness is exact, E_l = f_v
    with torch.no_grad():
        torch.testing.assert_close(total, net(x)[:, 1])
    # hand check of eq. 2 on a tiny tensor
    t = torch.tensor([[[[1.0, -2.0]], [[-3.0, 4.0]]]])
    assert e_split(t)[0].item() == 5.0 and e_split(t)[1].item() == 5.0
    torch.testing.assert_close(phi_maps(t)[0], torch.tensor([[[1.0, 4.0]]]))


def test_tension_stats_mti_and_completeness(green):
    net, x, _, _ = green
    res = tension_stats(net, "relu", x[:64], neuron("conv2", 1), batch_size=20, keep_attributions=True)
    assert res.s.shape == (64, 2, SIZE, SIZE) and res.phi_plus.shape == (64, SIZE, SIZE)
    torch.testing.assert_close(res.e, res.f)
    st = res.stats()
    assert st["completeness_corr"] == pytest.approx(1.0, abs=1e-6)
    corr = completeness_correlation(net, ["relu", "conv1", "pixels"], x[:64], neuron("conv2", 1), batch_size=32)
    assert set(corr) == {"relu", "conv1", "pixels"} and corr["relu"] == pytest.approx(1.0, abs=1e-6)
    # pixels: bias-free ReLU net → input×gradient is complete too (Euler)
    assert corr["pixels"] == pytest.approx(1.0, abs=1e-6)
    # a direction feature equals the weighted neuron features
    v = torch.tensor([1.0, -1.0])
    sd = layer_to_feature_attribution(net, "relu", x[:4], direction("conv2", v))
    s0 = layer_to_feature_attribution(net, "relu", x[:4], neuron("conv2", 0))
    s1 = layer_to_feature_attribution(net, "relu", x[:4], neuron("conv2", 1))
    torch.testing.assert_close(sd, (s0 - s1) / 2**0.5)


def test_select_mti_hand_made():
    f = torch.tensor([2.0, -0.1, -0.2, -5.0, -0.05, 0.0])  # σ ≈ 2.34 → window (-1.17, 0)
    l1 = torch.tensor([9.0, 1.0, 3.0, 10.0, 2.0, 8.0])
    res = TensionResult(f=f, e=f, e_plus=l1, e_minus=l1, l1=l1, l2=l1)
    assert select_mti(res, 2).tolist() == [2, 4]
    assert select_mti(res, 10).tolist() == [2, 4, 1]
    assert select_mti(res, 2, balance=1e-3).numel() == 0
    with pytest.raises(ValueError, match="norm"):
        select_mti(res, 2, norm="l3")


def test_uniqueness_bounds_property():
    g = torch.Generator().manual_seed(0)
    for n, m, pool in itertools.product([1, 2, 5], [1, 3, 7], [7, 20]):
        sets = [torch.randperm(pool, generator=g)[:m] for _ in range(n)]
        u = uniqueness(sets)
        assert 1 / n - 1e-12 <= u <= 1 + 1e-12
        assert u == len(set(torch.cat(sets).tolist())) / (n * m)
    assert uniqueness([[1, 2], [1, 2], [1, 2]]) == pytest.approx(1 / 3)
    assert uniqueness([[1, 2], [3, 4]]) == 1.0
    with pytest.raises(ValueError, match="same number"):
        uniqueness([[1, 2], [3]])
    with pytest.raises(ValueError, match="repeated"):
        uniqueness([[1, 1], [3, 4]])


# --------------------------------------------------------------------------------------------------- errors
def test_clear_errors(green):
    net, x, _, _ = green
    with pytest.raises(ValueError, match="larger than the images"):
        activating_patches(net, "conv2", x[:4], patch_size=SIZE + 1, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        layer_to_feature_attribution(net, "relu", x[:2], neuron("conv3", 0))
    with pytest.raises(ValueError, match=r"channel 5 does not exist in layer 'conv2', which has 2"):
        layer_to_feature_attribution(net, "relu", x[:2], neuron("conv2", 5))
    with pytest.raises(ValueError, match="does not exist"):
        activating_patches(net, "conv9", x[:4], patch_size=4, progress=False)
    with pytest.raises(ValueError, match="patch_size"):
        activating_patches(net, "conv2", x[:4], patch_size=0, progress=False)
    pr = activating_patches(net, "conv2", x[:8], patch_size=4, k=2, progress=False)
    with pytest.raises(ValueError, match=r"channels \[7\] do not exist"):
        insertion_test(net, "conv2", x[:8], pr, channels=[7], progress=False)
    with pytest.raises(TypeError, match="feature"):
        layer_to_feature_attribution(net, "relu", x[:2], "conv2")
    assert hook_count(net) == 0


# ------------------------------------------------------------------------------ non-target attribution, core
def test_non_target_attribution_motion(motion):
    net, x, y, masks = motion
    # frozen hand-set weights: hidden contributions work (parameters do not require grad)
    s = layer_contributions(net, "relu", x[:8], 0)
    with torch.no_grad():
        torch.testing.assert_close(s.flatten(1).sum(1), net(x[:8])[:, 0])
    attr, idx = non_target_attribution(net, x, y, 0, n_steps=16)
    assert (y[idx] != 0).all() and attr.shape == (idx.numel(), *x.shape[1:])
    # on bi-directional samples, output 0's attribution is negative where the right-to-left bars are
    inside = (attr.sum(1, keepdim=True) * masks[idx]).flatten(1).sum(1)
    assert (inside < 0).float().mean() > 0.9
    attr_c, idx_c = non_target_attribution(net, x[:10], y[:10], "complement", method="input_x_gradient")
    assert idx_c.tolist() == list(range(10))
    torch.testing.assert_close(attr_c, input_x_gradient(net, x[:10], 1 - y[:10]))


# ---------------------------------------------------------------------------------------- feature visualisation
def _set_green_net():
    net = GreenPixelNet().eval()
    with torch.no_grad():  # hidden 0 = red+blue, hidden 1 = green; output 1 = absence of green
        net.conv1.weight.copy_(torch.tensor([[1.0, 0, 1], [0, 1, 0]]).view(2, 3, 1, 1))
        net.conv2.weight.copy_(torch.tensor([[-1.0, 2], [1, -2]]).view(2, 2, 1, 1))
    return net


def test_minimisation_reveals_the_absent_concept():
    net = _set_green_net()
    lo = visualize(net, neuron("conv2", 1), size=16, steps=48, minimize=True, seed=0)
    hi = visualize(net, neuron("conv2", 1), size=16, steps=48, seed=0)
    assert lo.shape == (1, 3, 16, 16) and 0 <= lo.min() and lo.max() <= 1
    lo_c, hi_c = lo.mean((0, 2, 3)), hi.mean((0, 2, 3))
    assert lo_c[1] > 0.7 > max(lo_c[0], lo_c[2])  # minimising the absence neuron paints green
    assert hi_c[1] < 0.3 < min(hi_c[0], hi_c[2])
    with torch.no_grad():
        assert net(lo)[0, 1] < 0 < net(hi)[0, 1]
    assert all(p.requires_grad for p in net.parameters()) and hook_count(net) == 0


def test_attribution_inversion_and_dot_cos():
    h = torch.tensor([[3.0, 4.0], [-3.0, -4.0]])
    s = torch.tensor([1.0, 0.0])
    # eq. 5 with p = 1: (h·s)^2 / (‖h‖‖s‖) = 9/5 for the aligned vector; anti-aligned stays negative
    torch.testing.assert_close(dot_cos(h, s, p=1)[0], torch.tensor(9 / 5))
    assert dot_cos(h, s, p=1)[1] < 0
    net = _set_green_net()
    x, y, _ = green_pixel_images(4, 16, seed=5)
    i = int((y == 0).nonzero()[0])
    with_green = x[i : i + 1]  # class 0: has a green pixel, so S has both signs (a tense image)
    st = layer_to_feature_attribution(net, "relu", with_green, neuron("conv2", 1))[0]
    plus = attribution_inversion(net, "relu", st, sign="+", steps=40)
    minus = attribution_inversion(net, "relu", st, sign="-", steps=40)
    with torch.no_grad():
        assert net(plus)[0, 1] > 0 > net(minus)[0, 1]  # S⁺ excites, S⁻ inhibits (paper 001, App. F)
    acc = attribution_inversion(net, "relu", st, sign="-", init=with_green, steps=10)
    assert acc.shape == with_green.shape
    p = FourierImage(init=with_green.clamp(0.01, 0.99))
    torch.testing.assert_close(p(), with_green.clamp(0.01, 0.99), atol=1e-5, rtol=0)


def test_atlas_pca_saves_png(green, tmp_path):
    net, x, _, _ = green
    res = tension_stats(net, "relu", x[:60], neuron("conv2", 1), keep_attributions=True)
    atlas = attribution_atlas(net, "relu", res.s, res.f, neuron("conv2", 1), n_select=40, grid=2, method="pca",
                              min_count=1, icon_size=8, steps=4, path=tmp_path / "atlas.png")  # fmt: skip
    assert atlas.method == "pca" and atlas.coords.shape == (40, 2) and len(atlas.icons) >= 1
    assert sum(c for _, c in atlas.cells.values()) == 40
    assert (tmp_path / "atlas.png").stat().st_size > 0
    assert np.isfinite(list(atlas.icon_values.values())).all()
    # fallback layouts: t-SNE on request, PCA keeps the variance order
    coords, used = embed_2d(res.s[:30].flatten(2).sum(2), method="tsne")
    assert used == "tsne" and coords.shape == (30, 2)
    v = torch.randn(50, 4) * torch.tensor([10.0, 3.0, 0.1, 0.1])
    coords, _ = embed_2d(v, method="pca")
    assert coords[:, 0].std() > coords[:, 1].std() > 0
    cells = grid_average(np.array([[0.0, 0.0], [1.0, 1.0], [0.1, 0.0]]), torch.tensor([[1.0], [5.0], [3.0]]), 2)
    assert cells[(0, 0)][1] == 2 and cells[(0, 0)][0].item() == 2.0 and cells[(1, 1)][0].item() == 5.0


# ------------------------------------------------------------------------------------------------- callback
class _Module(L.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_callback_in_trainer(green, tmp_path):
    net, x, y, _ = green
    module = _Module(net)
    loader = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32)
    cb = TensionReport("net.conv2", [0, 1], attribution_layer="net.relu", patch_size=4, stride=2, n_images=20,
                       max_images=96)  # fmt: skip
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, callbacks=[cb], default_root_dir=tmp_path,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, loader, loader)
    res = cb.result
    assert res is not None and set(res["stats"]) == {0, 1}
    assert res["stats"][1]["inhibited"] == 1.0 and res["stats"][1]["completeness_corr"] > 0.999
    assert "tension/net.conv2/1/e_minus_mean" in trainer.callback_metrics
    assert len(res["figures"]) == 2 and all(p.endswith(".png") for p in res["figures"])
    state = cb.state_dict()
    assert state["epochs_run"] == 1
    cb2 = TensionReport("net.conv2", [0, 1])
    cb2.load_state_dict(state)
    assert cb2.state_dict() == state
    assert all(Path(p).stat().st_size > 0 for p in res["figures"])
    assert (Path(res["figures"][0]).parent / "insertion_epoch0.json").exists()
    assert hook_count(net) == 0


class _DictModule(_Module):
    def training_step(self, batch, _):
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch, _):
        self.log("val_loss", F.cross_entropy(self(batch["x"]), batch["y"]))


def test_callback_dict_batches_old_key_form_no_logger(green, tmp_path):
    net, x, y, _ = green
    batches = DataLoader([{"x": x[i], "y": y[i]} for i in range(96)], batch_size=32)
    with pytest.warns(DeprecationWarning, match="batch_keys"):
        cb = TensionReport("net.conv2", 1, attribution_layer="net.relu", patch_size=4, stride=2, n_images=20,
                           batch_keys="x", every_n_epochs=None)  # fmt: skip
    assert cb.batch_keys.keys == {"image": "x"}
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, callbacks=[cb], default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(_DictModule(net), batches, batches)
    assert cb.result["figures"] == [] and cb.epochs_run == 1  # once, at the end of fit; no directory: no files
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.json"))
    assert trainer.callback_metrics["tension/net.conv2/fraction_inhibited"] == 1.0
    assert hook_count(net) == 0


def test_callback_fails_at_setup_on_unknown_layer(green, tmp_path):
    net, x, y, _ = green
    cb = TensionReport("net.conv9", [0])
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    loader = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8)
    with pytest.raises(ValueError, match="conv9"):
        trainer.fit(_Module(net), loader, loader)
    with pytest.raises(ValueError, match="channels"):
        TensionReport("net.conv2", [])


def test_tension_report_core_and_deprecated_batch_key(green):
    net, x, y, _ = green
    rep = tension_report(net, "conv2", [1], x[:96], attribution_layer="relu", patch_size=4, stride=2, n_images=20)
    assert set(rep) == {"stats", "tension", "insertion", "patches", "selections"}
    assert rep["stats"][1]["inhibited"] == 1.0 and len(rep["selections"][1]["mei"]) == 4
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    ref = tension_stats(net, "relu", x[:64], neuron("conv2", 1))
    dicts = [{"img": b[0]} for b in batches]
    torch.testing.assert_close(tension_stats(net, "relu", dicts, neuron("conv2", 1), batch_keys={"image": "img"}).e, ref.e)
    with pytest.warns(DeprecationWarning, match="batch_key"):
        old = tension_stats(net, "relu", dicts, neuron("conv2", 1), batch_key="img")
    torch.testing.assert_close(old.e, ref.e)
    with pytest.raises(ValueError, match="n_show"):
        tension_report(net, "conv2", [1], x[:8], n_show=0)


def test_old_module_paths_alias_the_wing():
    import importlib
    import warnings

    import negspace.explain.tension as wing

    for old in ("negspace.explain.featureviz", "negspace.explain.atlas"):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            mod = importlib.import_module(old)
        assert any(issubclass(x.category, DeprecationWarning) for x in w)
    assert mod.attribution_atlas is wing.attribution_atlas
    assert importlib.import_module("negspace.explain.featureviz").visualize is wing.visualize
    for name in wing.__all__:
        assert getattr(wing, name) is not None
