"""CODEC defaults against paper 002 (issue 12 items 1–4 and 18, issue 14 item 7), on hand-built networks whose
right answer is known: the target, per-unit E/I maps with a median filter, the sigmoid SAE and its schedule,
the low-R² warning and untrained baseline, and the random off-target protocol of the perturbation sweep."""

from __future__ import annotations

import inspect
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from negspace.attribution import layer_contributions
from negspace.explain.codec import (
    ContributionSAE,
    LowR2Warning,
    auto_lr,
    compute_contributions,
    contribution_map,
    contributions_batch,
    fit_codec,
    perturbation_sweep,
    save_contribution_maps,
    train_sae,
)
from negspace.objectives import top_prob
from negspace.reduce import spatial_sum

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, GROUP = 4, 3  # class k is driven by channels 3k, 3k+1, 3k+2 of layer "relu"


def planted(n_per_class: int = 150, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """600 samples × 12 channels: an identity 1×1 conv + ReLU, then a head where class k reads its own 3
    channels (+2) and the others (−0.5). Class-k images light up channels 3k..3k+2 (random amplitude and
    positions) over weak noise, so the planted mode of class k is exactly those 3 channels."""
    c = CLASSES * GROUP
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(c, c, 1))
    net.add_module("relu", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(c, CLASSES))
    with torch.no_grad():
        net.conv.weight.copy_(torch.eye(c)[:, :, None, None])
        net.conv.bias.zero_()
        w = torch.full((CLASSES, c), -0.5)
        for k in range(CLASSES):
            w[k, k * GROUP : (k + 1) * GROUP] = 2.0
        net.fc.weight.copy_(w)
        net.fc.bias.zero_()
    y = torch.arange(CLASSES).repeat_interleave(n_per_class)
    x = torch.rand(len(y), c, 4, 4, generator=g) * 0.3
    for k in range(CLASSES):
        idx = y == k
        amp = 0.5 + 1.5 * torch.rand(int(idx.sum()), GROUP, 1, 1, generator=g)
        on = (torch.rand(int(idx.sum()), GROUP, 4, 4, generator=g) > 0.5).float()
        x[idx, k * GROUP : (k + 1) * GROUP] += amp * on
    return net.eval(), x, y


def group(k: int) -> list[int]:
    return list(range(k * GROUP, (k + 1) * GROUP))


@pytest.fixture(scope="module")
def planted_fit():
    net, x, y = planted()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=200)
    threads = torch.get_num_threads()  # module fixtures run before the one_thread fixture
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data, modes = fit_codec(net, loader, "relu", progress=False)  # every default
    finally:
        torch.set_num_threads(threads)
    return net, x, y, data, modes["relu"], caught


# ------------------------------------------------------------------------------------- item 1: target
def test_default_target_is_the_softmax_probability_of_the_top_class():
    net, x, _ = planted(n_per_class=5)
    rows = contributions_batch(net, "relu", x, method="act_grad")  # default target
    with torch.no_grad():
        p = net(x).softmax(1).max(1).values
    torch.testing.assert_close(rows["target_value"], p)
    want = contributions_batch(net, "relu", x, "top_prob", method="act_grad")
    assert torch.equal(rows["relu.pos"], want["relu.pos"])
    for fn in (compute_contributions, fit_codec, contribution_map):
        assert inspect.signature(fn).parameters["target"].default == "top_prob", fn
    from negspace.callbacks import CodecModes

    assert CodecModes("relu").target == "top_prob"
    # the logit stays available and gives different contributions
    logit_rows = contributions_batch(net, "relu", x, "top_logit", method="act_grad")
    assert not torch.allclose(logit_rows["relu.pos"], rows["relu.pos"])


# --------------------------------------------------------------------------------- item 2: maps (10.8)
def linear_pair() -> nn.Module:
    """x (1 channel, 1×2 pixels) → a = [x, x] (2 channels) → logit 0 = Σ a₀ − 0.5 Σ a₁. Per unit the InputGrad
    maps x ⊙ ∂T/∂a_u · ∂a_u/∂x are m₀ = x and m₁ = −0.5 x, so E per unit is x, I is 0.5 x, net 0.5 x."""
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 2, 1, bias=False))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net.conv.weight.fill_(1.0)
        net.fc.weight.copy_(torch.tensor([[1.0, 1.0, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]))
    return net.eval()


def test_contribution_map_splits_each_unit_before_summing():
    net = linear_pair()
    x = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 0.5]]]])
    x2 = x  # the known per-unit answer (x > 0)
    pos = contribution_map(net, "conv", x, 0, softmax=False)  # default: part="positive", split="unit"
    torch.testing.assert_close(pos, x2)
    torch.testing.assert_close(contribution_map(net, "conv", x, 0, part="negative", softmax=False), 0.5 * x2)
    torch.testing.assert_close(contribution_map(net, "conv", x, 0, part="net", softmax=False), 0.5 * x2)
    # the old order (sum over units, then the positive part) loses the cancelling half
    torch.testing.assert_close(contribution_map(net, "conv", x, 0, split="sum", softmax=False), 0.5 * x2)
    torch.testing.assert_close(contribution_map(net, "conv", x, 0, [1], part="negative", softmax=False), 0.5 * x2)
    with pytest.raises(ValueError, match="part must be one of"):
        contribution_map(net, "conv", x, 0, part="both")
    with pytest.raises(ValueError, match="split must be one of"):
        contribution_map(net, "conv", x, 0, split="channel")


def test_contribution_map_defaults_to_the_softmax_target_and_is_complete():
    net, x, _ = planted(n_per_class=2)
    ch = group(1)
    pos = contribution_map(net, "relu", x, channels=ch)  # top_prob, per-unit E
    neg = contribution_map(net, "relu", x, channels=ch, part="negative")
    net_map = contribution_map(net, "relu", x, channels=ch, part="net")
    torch.testing.assert_close(pos - neg, net_map, atol=1e-6, rtol=1e-5)
    hidden = layer_contributions(net, "relu", x, top_prob(), method="input_grad")
    torch.testing.assert_close(net_map.flatten(1).sum(1), spatial_sum(hidden)[:, ch].sum(1), atol=1e-6, rtol=1e-4)
    # an int class means its softmax probability unless softmax=False
    cls = contribution_map(net, "relu", x, 1, ch, part="net")
    p1 = layer_contributions(net, "relu", x, lambda out: out.softmax(1)[:, 1], method="input_grad")
    torch.testing.assert_close(cls.flatten(1).sum(1), spatial_sum(p1)[:, ch].sum(1), atol=1e-6, rtol=1e-4)


def test_maps_figure_median_filter_of_size_four_by_default(tmp_path):
    from negspace.plots import codec_contribution_maps

    assert inspect.signature(codec_contribution_maps).parameters["filter_size"].default == 4
    assert inspect.signature(save_contribution_maps).parameters["filter_size"].default == 4
    p = save_contribution_maps(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), tmp_path / "m.png")
    assert p.stat().st_size > 0


# ------------------------------------------------------------------------------------ item 3: the SAE
def test_sae_sigmoid_codes_thresholded_in_unit_interval():
    sae = ContributionSAE(6)
    assert sae.activation == "sigmoid" and sae.threshold == 0.9
    out = sae(torch.randn(200, 6))
    assert ((out.pre > 0) & (out.pre < 1)).all()
    kept = out.codes[out.codes > 0]
    assert (kept > 0.9).all() and (kept < 1).all()
    assert torch.equal(out.codes > 0, out.pre > 0.9)
    assert 0.2 < (out.codes > 0).float().mean() < 0.8  # output bias at logit(0.9): about half alive at start
    ours = ContributionSAE(6, activation="identity")
    assert (ours(torch.randn(50, 6)).codes > 1).any()  # unbounded loadings
    with pytest.raises(ValueError, match=r"threshold must lie in \(0, 1\)"):
        ContributionSAE(6, threshold=1.5)
    with pytest.raises(ValueError, match="activation must be one of"):
        ContributionSAE(6, activation="relu")


def test_schedule_step_budget_and_scaled_lr():
    assert auto_lr(300 * 391) == pytest.approx(5e-5) and auto_lr(3000) == pytest.approx(1.955e-3)
    f = torch.rand(64, 4)
    fit = train_sae(f, steps=7, progress=False, min_r2=None)
    assert fit.steps == 7 and fit.lr == pytest.approx(2e-3)
    fit = train_sae(f, epochs=3, lr=1e-3, batch_size=32, early_stopping=False, progress=False, min_r2=None)
    assert fit.steps == 6 and len(fit.losses) == 3 and fit.lr == 1e-3
    with pytest.raises(ValueError, match="not both"):
        train_sae(f, steps=5, epochs=2)
    with pytest.raises(ValueError, match="lr must be 'auto'"):
        train_sae(f, lr="fast")


def test_planted_modes_with_defaults_find_the_planted_channels(planted_fit):
    """Item 18: hundreds of samples, tens of channels, every default: each class's mode is its 3 channels."""
    _, _, _, data, modes, caught = planted_fit
    assert len(data) == 600 and modes.num_channels == 12
    assert not [w for w in caught if issubclass(w.category, LowR2Warning)]
    assert modes.r2 > 0.8, modes.r2
    for k in range(CLASSES):
        assert modes.channels(k, 25).tolist() == group(k), (k, modes.atom(modes.mode_for_class(k)))
    corr, chance = modes.stats["mode_class_corr"], modes.stats["untrained_mode_class_corr"]
    assert corr > 0.95 and corr > chance + 0.05, (corr, chance)
    assert modes.untrained_correlation is not None and modes.untrained_correlation.shape == modes.correlation.shape


def test_paper_schedule_on_small_data_warns_with_the_fix(planted_fit):
    """The paper's 300 epochs at lr 5e-5 barely move on 600 samples: R² near 0, and the warning says so."""
    feats = planted_fit[3].features("relu")
    with pytest.warns(LowR2Warning, match=r"R² = -?\d\.\d+ on 600 × 12 .* Fix: train longer") as rec:
        fit = train_sae(feats, epochs=300, lr=5e-5, early_stopping=False, progress=False)
    assert fit.r2 < 0.5 and len(rec) == 1


def test_callback_warns_on_low_r2_and_logs_the_untrained_baseline(tmp_path):
    """Issue 14 item 7: CodecModes logged R² −48 without a word."""
    from negspace.callbacks import CodecModes

    net, x, y = planted(n_per_class=40)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=80)

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = net

        def forward(self, x):
            return self.model(x)

        def validation_step(self, batch, batch_idx):
            return None

    cb = CodecModes("relu", forward="model", every_n_epochs=1, method="act_grad", progress=False, baseline=False,
                    sae={"steps": 2})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path)
    with pytest.warns(LowR2Warning, match=r"relu: contribution SAE: reconstruction R² = .* Fix:"):
        trainer.validate(Lit(), dataloaders=loader, verbose=False)
    m = trainer.callback_metrics
    assert {"codec/relu/r2", "codec/relu/mode_class_corr", "codec/relu/untrained_mode_class_corr"} <= set(m)
    assert float(m["codec/relu/r2"]) < 0.5


# ---------------------------------------------------------------------------- item 4: off-target protocol
def test_random_off_target_protocol(planted_fit):
    net, x, y, _, modes, _ = planted_fit
    atom = modes.atom(modes.mode_for_class(2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=False)
    s = perturbation_sweep(net, "relu", loader, atom, 2, num_classes=CLASSES, percents=(25, 50))  # default
    assert s.protocol == "random" and len(s.off_target_classes) == 6 and 2 not in s.off_target_classes
    assert s.channels[0] == group(2)
    assert s.ratio_target.tolist() == [0.0, 0.0]  # its 3 channels gone: class 2 is never predicted
    assert s.ratio_off[0].item() == 1.0  # the other classes keep their own channels
    assert len(s.trial_auc_target) == 6 and s.specificity > 0.9  # 50 % also removes other classes' channels
    again = perturbation_sweep(net, "relu", (x, y), atom, 2, num_classes=CLASSES, percents=(25, 50))
    assert again.off_target_classes == s.off_target_classes  # seeded
    other = perturbation_sweep(net, "relu", (x, y), atom, 2, num_classes=CLASSES, percents=(25, 50), seed=3)
    assert other.protocol == "random"
    ours = perturbation_sweep(net, "relu", (x, y), atom, 2, num_classes=CLASSES, percents=(25,), off_target="all")
    assert ours.protocol == "all" and ours.off_target_classes == [0, 1, 3] and ours.ratio_off[0].item() == 1.0
    with pytest.raises(ValueError, match="off_target must be one of"):
        perturbation_sweep(net, "relu", (x, y), atom, 2, num_classes=CLASSES, off_target="some")
    with pytest.raises(ValueError, match="trials must be a positive int"):
        perturbation_sweep(net, "relu", (x, y), atom, 2, num_classes=CLASSES, trials=0)
