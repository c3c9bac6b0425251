"""CODEC: contribution datasets, ContributionSAE, mode-guided ablation/preservation, ChannelEdit and CodecModes
callbacks."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from helpers import hook_count
from negspace.attribution import input_x_gradient, layer_contributions
from negspace.editing import ablate_channels, preserve_channels
from negspace.explain.codec import (
    ContributionSAE,
    ContributionSet,
    ContributionStore,
    class_masks,
    compute_contributions,
    contribution_map,
    contributions_batch,
    default_kind,
    fit_modes,
    mode_class_correlation,
    perturbation_sweep,
    save_contribution_maps,
    select_channels,
    selection_sign,
    target_sign,
    train_sae,
)
from negspace.objectives import entropy, logit
from negspace.reduce import spatial_sum

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny nets: one intra-op thread


def tiny_cnn(c1: int = 16, c2: int = 32) -> nn.Sequential:
    m = nn.Sequential()
    m.add_module("conv1", nn.Conv2d(1, c1, 3, padding=1))
    m.add_module("relu1", nn.ReLU())
    m.add_module("mp", nn.MaxPool2d(2))
    m.add_module("conv2", nn.Conv2d(c1, c2, 3, padding=1))
    m.add_module("relu2", nn.ReLU())
    m.add_module("pool", nn.AdaptiveAvgPool2d(1))
    m.add_module("flat", nn.Flatten())
    m.add_module("fc", nn.Linear(c2, 10))
    return m


@pytest.fixture(scope="module")
def digits():
    """A tiny CNN trained for a few seconds on sklearn's bundled 8×8 digits (≈ 95 % train accuracy)."""
    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    model = tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=12 * 29)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85, acc
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=600)
    return model, x, y, loader


@pytest.fixture(scope="module")
def digit_data(digits):
    model, _, _, loader = digits
    return compute_contributions(model, loader, ["relu2"], method="integrated", n_steps=5, progress=False)


@pytest.fixture(scope="module")
def digit_modes(digit_data):
    # default schedule (step budget, lr scaled to it, early stopping): 40 epochs at 3e-3 no longer needed
    threads = torch.get_num_threads()  # module fixtures run before the one_thread fixture
    torch.set_num_threads(1)
    try:
        return fit_modes(digit_data, "relu2", num_classes=10, hidden=64, progress=False,
                         superclasses={"round": [0, 6, 8, 9]})
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------- contributions
def test_integrated_completeness_refines_with_steps(digits):
    model = copy.deepcopy(digits[0]).double()
    x = digits[1][:6].double()
    with torch.no_grad():
        t = model(x).argmax(1)
        delta = (model(x) - model(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    errs = []
    for n in (2, 16, 256):
        rows = contributions_batch(model, "relu1", x, logit(t), method="integrated", n_steps=n, activations=False)
        total = (rows["relu1.pos"] - rows["relu1.neg"]).sum(1).double()  # Σ_channels (E − I) = Σ contributions
        errs.append((total - delta).abs().max().item())
    scale = delta.abs().max().item()
    assert errs[2] < 5e-3 * scale, (errs, scale)  # T(x) − T(0) within trapezoid error
    assert errs[2] < errs[1] < errs[0], errs  # refining n_steps shrinks the error


def test_ei_split_before_spatial_sum(digits):
    model, x, _, _ = digits
    xb = x[:16]
    rows = contributions_batch(model, ["relu1", "relu2"], xb, "top_logit", method="act_grad")
    c = layer_contributions(model, "relu1", xb, logit(model(xb).argmax(1)), method="act_grad")
    torch.testing.assert_close(rows["relu1.pos"], spatial_sum(c.clamp(min=0)))
    torch.testing.assert_close(rows["relu1.neg"], spatial_sum((-c).clamp(min=0)))
    torch.testing.assert_close(rows["relu1.act"], spatial_sum(model[:2](xb)))
    # splitting before the sum keeps cancelling parts: E ≥ (ΣC)+ with strict inequality somewhere
    net = spatial_sum(c)
    assert (rows["relu1.pos"] >= net.clamp(min=0) - 1e-6).all()
    assert (rows["relu1.pos"] > net.clamp(min=0) + 1e-4).any()


@pytest.mark.parametrize("target", ["topk", "entropy", "contrastive", "label"])
def test_targets(digits, target):
    model, x, y, _ = digits
    rows = contributions_batch(model, "relu2", x[:8], target, labels=y[:8], method="act_grad")
    assert rows["relu2.pos"].shape == (8, 32) and torch.isfinite(rows["relu2.pos"]).all()
    assert target_sign(target) == (-1 if target == "entropy" else 1)
    assert default_kind(target) == ("negative" if target == "entropy" else "positive")
    assert selection_sign(target, "net") == target_sign(target) and selection_sign(target, "negative") == 1


def test_store_round_trip(tmp_path, digits):
    store = ContributionStore(tmp_path / "s", rows_per_shard=7)
    rows = {"a.pos": torch.randn(20, 5), "label": torch.arange(20)}
    for i in range(0, 20, 3):
        store.append({k: v[i : i + 3] for k, v in rows.items()})
    store.close()
    assert len(store.shards) == 3 and len(store) == 20
    again = ContributionStore.open(tmp_path / "s")
    assert [p["a.pos"].shape[0] for p in again.iter_shards(["a.pos"])] == [7, 7, 6]
    for k, v in rows.items():
        assert torch.equal(again.load(k), v)
    # a full dataset streamed to disk equals the in-memory one; two "ranks" writing into one directory
    model, _, _, _ = digits
    x, y = digits[1][:40], digits[2][:40]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    mem = compute_contributions(model, loader, "relu2", method="act_grad", progress=False)
    for r in range(2):
        compute_contributions(model, loader, "relu2", method="act_grad", progress=False,
                              store=tmp_path / "ddp", rows_per_shard=8, rank=r, world_size=2)
    disk = ContributionStore.open(tmp_path / "ddp").to_set()
    assert len(disk) == 40 and sorted(disk.tensors["rank"].tolist()) == [0] * 20 + [1] * 20
    # rank r took batches r, r + 2, ...; the store lists rank 0's shards, then rank 1's
    for key in ("relu2.pos", "relu2.neg", "relu2.act"):
        got = torch.cat([disk.tensors[key][disk.tensors["rank"] == r] for r in range(2)])
        want = torch.cat([mem.tensors[key][i : i + 10] for r in range(2) for i in range(r * 10, 40, 20)])
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------- SAE
def test_sae_hard_threshold_semantics():
    sae = ContributionSAE(4, threshold=0.5)
    assert sae.num_atoms == 12 and (sae.dictionary >= 0).all()
    pre = torch.tensor([[0.2, 0.5, 0.75, -3.0, 2.0]], requires_grad=True)
    codes = ContributionSAE.hard_threshold(pre, 0.5)
    assert codes.tolist() == [[0.0, 0.0, 0.75, 0.0, 2.0]]
    assert (codes[0, :2] == 0).all() and codes[0, 3].item() == 0.0  # exact zeros
    (g,) = torch.autograd.grad((codes * torch.arange(1.0, 6.0)).sum(), pre)
    assert g.tolist() == [[0.0, 0.0, 3.0, 0.0, 5.0]]  # gradient only through kept entries, none via the mask
    out = sae(torch.rand(6, 4))
    assert ((out.codes == 0) | (out.pre > 0.5)).all() and torch.equal(out.codes == 0, out.pre <= 0.5)
    torch.testing.assert_close(out.recon, out.codes @ sae.dictionary)


def test_sae_reconstructs_sparse_modes():
    torch.manual_seed(0)
    atoms = torch.rand(3, 12) * (torch.rand(3, 12) > 0.6)
    load = torch.rand(400, 3) * (torch.rand(400, 3) > 0.5) * 3
    x = load @ atoms
    fit = train_sae(x, epochs=60, lr=3e-3, batch_size=64, threshold=0.1, hidden=32, progress=False)
    assert fit.r2 > 0.8 and fit.samples_per_second > 0


# ----------------------------------------------------------------------- modes, selection, ablation
def test_mode_class_correlation_against_numpy():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    masks, names = class_masks(labels, 3, {"sup": [1, 2]})
    assert names == ["0", "1", "2", "sup"] and masks[:, 3].tolist() == [0, 1, 1, 0, 1, 1, 0, 0]
    load = torch.rand(8, 5)
    load[:, 4] = 0  # dead mode → correlation 0, not NaN
    corr = mode_class_correlation(load, masks)
    import numpy as np

    ref = np.corrcoef(load[:, :4].T.numpy(), masks.T.numpy())[:4, 4:]
    np.testing.assert_allclose(corr[:4].numpy(), ref, atol=1e-5)
    assert (corr[4] == 0).all()


def test_select_channels():
    atom = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.0, 0.5, 0.2, 0.8, 0.4, 0.6])
    assert select_channels(atom, 20).tolist() == [1, 7]
    assert select_channels(atom, 20, sign=-1).tolist() == [0, 4]
    assert select_channels(atom, 100).tolist() == list(range(10))
    assert select_channels(atom, 1).tolist() == [1]  # at least one channel
    concat = torch.cat([atom, torch.tensor([0.0, 1.0] + [0.0] * 8)])  # [E, I]: channel 1's net is −0.1
    assert select_channels(concat, 10, num_channels=10).tolist() == [7]


def test_digits_ablating_class_mode_is_specific(digits, digit_modes):
    model, x, y, _ = digits
    modes = digit_modes
    assert modes.r2 > 0.8 and modes.correlation.shape == (96, 11)
    assert {"hoyer_contrib", "hoyer_act", "ei_corr", "dim_contrib", "dim_act", "r2"} <= set(modes.stats)
    gaps = []
    for c in (0, 3, 6):
        m = modes.mode_for_class(c)
        assert modes.correlation[m, c] == modes.correlation[:, c].max()
        sweep = perturbation_sweep(model, "relu2", (x, y), modes.atom(m), c, num_classes=10, percents=(10, 20),
                                   off_target="all")
        assert hook_count(model) == 0
        gaps.append(sweep.ratio_off[0].item() - sweep.ratio_target[0].item())
        assert sweep.ratio_target[0] < 0.5 * sweep.ratio_off[0], (c, sweep.ratio_target, sweep.ratio_off)
    assert sum(gaps) / len(gaps) > 0.4
    # superclass mode (by name) and the activation baseline run through the same code
    ch = modes.channels("round", 25)
    assert len(ch) == 8
    assert len(modes.channels(0, 25, baseline=True)) == 8


def test_preserve_all_or_ablate_none_is_bit_identical(digits, digit_modes):
    model, x, y, _ = digits
    with torch.no_grad():
        ref = model(x[:64])
        all_ch = digit_modes.channels(2, 100)
        with preserve_channels(model, {"relu2": all_ch}):
            assert torch.equal(model(x[:64]), ref)
        with ablate_channels(model, {"relu2": []}):
            assert torch.equal(model(x[:64]), ref)
    sweep = perturbation_sweep(model, "relu2", (x, y), digit_modes.atom(0), 2, num_classes=10,
                               percents=(100,), mode="preserve", off_target="all")
    assert torch.equal(sweep.ratio[0], torch.ones(10))


def test_clear_errors(digits, digit_modes, digit_data):
    model, x, y, loader = digits
    with pytest.raises(ValueError, match="relu3"):
        compute_contributions(model, loader, ["relu3"], progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        perturbation_sweep(model, "rleu2", (x, y), torch.rand(32), 0, num_classes=10)
    with pytest.raises(ValueError, match="not in the contribution set"):
        fit_modes(digit_data, "relu1")
    for bad in (0, -5, 100.5, 250):
        with pytest.raises(ValueError, match=r"\(0, 100\]"):
            select_channels(torch.rand(32), bad)
        with pytest.raises(ValueError, match=r"\(0, 100\]"):
            perturbation_sweep(model, "relu2", (x, y), torch.rand(32), 0, num_classes=10, percents=(bad,))
    with pytest.raises(ValueError, match="mode must be in"):
        digit_modes.atom(96)
    with pytest.raises(ValueError, match="class index must be in"):
        digit_modes.mode_for_class(11)
    with pytest.raises(ValueError, match="rank must be in"):
        digit_modes.mode_for_class(0, rank=96)
    with pytest.raises(ValueError, match="target_class"):
        perturbation_sweep(model, "relu2", (x, y), torch.rand(32), 10, num_classes=10)
    with pytest.raises(ValueError, match="target must be one of"):
        compute_contributions(model, loader, "relu2", target="top1", progress=False)
    with pytest.raises(ValueError, match="one scalar target per sample"):
        contributions_batch(model, "relu2", x[:4], logit([0, 1]), method="act_grad")


def test_contribution_map_is_complete_inputgrad_decomposition(tmp_path, digits):
    model, x, _, _ = digits
    xb = x[:4]
    t = model(xb).argmax(1)
    ch = torch.tensor([1, 5, 9])
    cmap = contribution_map(model, "relu2", xb, t, ch, part="net", softmax=False)  # logit of t, signed
    hidden = layer_contributions(model, "relu2", xb, t, method="input_grad")
    torch.testing.assert_close(cmap.flatten(1).sum(1), spatial_sum(hidden)[:, ch].sum(1), rtol=1e-4, atol=1e-5)
    full = contribution_map(model, "relu2", xb, t, torch.arange(32), part="net", softmax=False)
    torch.testing.assert_close(full, input_x_gradient(model, xb, t), rtol=1e-4, atol=1e-6)
    assert hook_count(model) == 0
    p = save_contribution_maps(xb, cmap, tmp_path / "maps.png", titles=t.tolist())
    assert p.exists() and p.stat().st_size > 0
    assert contribution_map(model, "relu2", xb, entropy(), ch).shape == xb.shape


# ------------------------------------------------------------------------------------------ callbacks
class LitDigits(L.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.val_logits: dict[int, list[torch.Tensor]] = {}

    def forward(self, x):
        return self.model(x)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        logits = self(x)
        self.val_logits.setdefault(dataloader_idx, []).append(logits)
        self.log("acc", (logits.argmax(1) == y).float().mean(), add_dataloader_idx=True)


def test_channel_edit_callback_validate_and_checkpoint(tmp_path, digits):
    from negspace.callbacks import ChannelEdit

    model, x, y, _ = digits
    ds = torch.utils.data.TensorDataset(x[:96], y[:96])
    loaders = [torch.utils.data.DataLoader(ds, batch_size=48) for _ in range(3)]  # e.g. three biased splits
    cb = ChannelEdit({"relu2": [0, 3, 5]}, mode="ablate", forward="model")
    assert "ablate" in repr(cb) and "inactive" in repr(cb)
    lit = LitDigits(model)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path)
    trainer.validate(lit, dataloaders=loaders, verbose=False)
    assert hook_count(model) == 0 and not cb.active
    with torch.no_grad(), ablate_channels(model, {"relu2": [0, 3, 5]}):
        want = model(x[:96])
    for i in range(3):
        assert torch.equal(torch.cat(lit.val_logits[i]), want)
    ckpt = tmp_path / "edit.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    fresh = ChannelEdit({"relu2": [1]}, mode="ablate", forward="model", adopt_checkpoint=True)  # else an error
    (saved,) = [v for k, v in state["callbacks"].items() if k == fresh.state_key]
    fresh.load_state_dict(saved)
    assert fresh.edit.channels["relu2"].tolist() == [0, 3, 5] and fresh.stages == ("validate", "test")
    cb.remove()
    assert not cb.enabled
    lit.val_logits.clear()
    trainer.validate(lit, dataloaders=loaders[:1], verbose=False)
    with torch.no_grad():
        assert torch.equal(torch.cat(lit.val_logits[0]), model(x[:96]))


class LitTrain(LitDigits):
    def training_step(self, batch, batch_idx):
        self.hooks_seen = hook_count(self.model)
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_channel_edit_callback_during_training(digits):
    from negspace.callbacks import ChannelEdit

    model, x, y, _ = digits
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:64], y[:64]), batch_size=32)
    lit = LitTrain(model)
    cb = ChannelEdit({"relu2": [1, 2]}, mode="preserve", stages="fit", forward="model")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, max_steps=1,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[cb])
    trainer.fit(lit, loader)
    assert lit.hooks_seen == 1 and hook_count(model) == 0 and not cb.active


def test_codec_modes_callback_on_demand_and_in_a_trainer(tmp_path, digits):
    from negspace.callbacks import CodecModes

    model, x, y, _ = digits
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:300], y[:300]), batch_size=150)
    cb = CodecModes(["relu1", "relu2"], num_classes=10, method="act_grad", progress=False,
                    sae={"epochs": 3, "lr": 3e-3})
    result = cb.fit(model, loader)
    assert set(result) == {"relu1", "relu2"} and result["relu2"].loadings.shape == (300, 96)
    assert "codec/relu2/hoyer_contrib" in cb.metrics() and "not fitted" not in repr(cb)
    data = cb.data
    assert isinstance(data, ContributionSet) and len(data) == 300
    # inside a Trainer: gradients work during validation (inference_mode is lifted), stats logged, figure saved
    from lightning.pytorch.loggers import CSVLogger

    cb2 = CodecModes("relu2", num_classes=10, every_n_epochs=1, forward="model", method="integrated",
                     n_steps=2, progress=False, sae={"epochs": 2, "lr": 3e-3})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb2])
    trainer.validate(LitDigits(model), dataloaders=[loader, loader], verbose=False)
    assert cb2.result is not None and "codec/relu2/ei_corr" in trainer.callback_metrics
    assert {"codec/relu2/r2", "codec/relu2/mode_class_corr"} <= set(trainer.callback_metrics)
    assert list(tmp_path.rglob("mode_class_correlation_relu2.png")) and hook_count(model) == 0
    # the one SAE trainer (the Lightning fit_sae is gone)
    fit = train_sae(data.features("relu2"), epochs=2, lr=3e-3, batch_size=100, progress=False)
    assert fit.sae.num_atoms == 96 and fit.samples_per_second > 0 and fit.r2 == fit.r2


def test_codec_callbacks_old_keywords_warn(digits):
    from negspace.callbacks import ChannelEdit, CodecModes

    with pytest.warns(DeprecationWarning, match="fit_on"):
        cb = CodecModes("relu2", fit_on="validation_end")
    assert cb.every_n_epochs == 1 and not cb.manual
    with pytest.warns(DeprecationWarning, match="fit_on"):
        assert CodecModes("relu2", fit_on="manual").manual
    with pytest.warns(DeprecationWarning, match="root"):
        cb = CodecModes("relu2", root="model")
    assert cb.forward == "model"
    with pytest.warns(DeprecationWarning, match="root"):
        edit = ChannelEdit({"relu2": [1]}, root="model")
    assert edit.forward == "model" and edit.state_key == ChannelEdit({"relu2": [1]}, forward="model").state_key
    with pytest.raises(ValueError, match="fit_on"), pytest.warns(DeprecationWarning):
        CodecModes("relu2", fit_on="sometimes")
    with pytest.raises(TypeError, match="not both"):
        CodecModes("relu2", root="model", forward="model")


def test_old_module_paths_alias_the_codec_wing():
    import importlib
    import warnings

    import negspace.explain.codec as codec
    from negspace.objectives import named_target

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old_codec = importlib.import_module("negspace.editing.codec")
        old_contrib = importlib.import_module("negspace.editing.contributions")
    assert old_codec.fit_modes is codec.fit_modes and old_contrib.ContributionStore is codec.ContributionStore
    with pytest.warns(DeprecationWarning, match="named_target"):
        assert old_contrib.make_target is named_target
    for name in ("DEFAULT_PERCENTS", "LayerModes", "SweepResult", "pca_dimensionality", "FEATURES", "SAEFit"):
        assert getattr(codec, name) is not None


def test_contribution_map_per_unit_of_channels_without_gradient_is_zero():
    """A channel the target does not use (zero weight downstream) has no units to split: zero maps, no error."""
    from torch import nn

    from negspace.explain.codec import contribution_map

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        net[4].weight[:, 1] = 0.0  # channel 1 never reaches the logits
    x = torch.rand(3, 3, 6, 6)
    for part in ("positive", "negative"):
        m = contribution_map(net, "0", x, target=0, channels=[1], part=part, split="unit")
        assert m.shape == x.shape and torch.count_nonzero(m) == 0
    assert contribution_map(net, "0", x, target=0, channels=[0], split="unit").abs().sum() > 0
