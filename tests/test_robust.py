"""Group-robust baselines do what their papers say on tiny problems whose answer is known."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from negspace.callbacks import DFR, JTT, GroupDRO, GroupReweighting
from negspace.robust import (
    error_set,
    fit_dfr,
    group_counts,
    groupdro_loss,
    inverse_frequency_weights,
    jtt_weights,
    per_sample_loss,
)

# One trainable logit θ (p(y=1) = σ(θ)); 90 samples of class 1 (group 1), 10 of class 0 (group 0).
# ERM: σ(θ) = 0.9, θ = ln 9. Group/class reweighting and GroupDRO (minimax): equal group losses, θ = 0.
N1, N0 = 90, 10


def _labels() -> torch.Tensor:
    return torch.cat([torch.ones(N1), torch.zeros(N0)]).long()


def _logits(theta: torch.Tensor, b: int) -> torch.Tensor:
    return torch.cat([torch.zeros(b, 1), theta.expand(b, 1)], 1)


def test_groupdro_update_hand_value():
    loss, q = groupdro_loss(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), torch.tensor([0.5, 0.5]), eta=1.0)
    e = math.e
    assert q.tolist() == pytest.approx([e / (1 + e), 1 / (1 + e)])
    assert float(loss) == pytest.approx(e / (1 + e))
    # absent groups keep their (renormalised) weight; the adjustment C/√n_g raises small groups
    _, q = groupdro_loss(torch.tensor([0.0]), torch.tensor([0]), torch.tensor([0.5, 0.5]), eta=1.0,
                         counts=torch.tensor([1.0, 4.0]), adjustment=2.0)
    assert q.tolist() == pytest.approx([e**2 / (e**2 + e), e / (e**2 + e)])


def test_reweighting_weights():
    w = inverse_frequency_weights(group_counts(torch.tensor([0, 1, 1, 1, 3])))
    assert w.tolist() == pytest.approx([5 / 3, 5 / 9, 0.0, 5 / 3])  # N / (G_present · n_g); group 2 absent
    y = torch.tensor([0, 1])
    assert per_sample_loss(torch.zeros(2, 2), y, "bce").tolist() == pytest.approx([math.log(2)] * 2)


@pytest.mark.parametrize("method", ["erm", "reweight", "groupdro"])
def test_functional_known_answer(method):
    y = _labels()
    theta = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=1.0)
    q = torch.full((2,), 0.5)
    w = inverse_frequency_weights(group_counts(y))[y]
    for _ in range(400):
        losses = per_sample_loss(_logits(theta, len(y)), y)
        if method == "erm":
            loss = losses.mean()
        elif method == "reweight":
            loss = (w * losses).mean()
        else:
            loss, q = groupdro_loss(losses, y, q, eta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    expected = math.log(N1 / N0) if method == "erm" else 0.0
    assert float(theta) == pytest.approx(expected, abs=0.05)


# ------------------------------------------------------------------------------------------ callbacks
class Items(Dataset):
    def __init__(self, y: torch.Tensor) -> None:
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"image": torch.zeros(1, 1, 1), "label": self.y[i], "group": self.y[i], "index": i}


class Theta(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return _logits(self.theta, x.shape[0])

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=2.0)


def _fit(cb, epochs: int, tmp_path=None):
    module = Theta()
    trainer = L.Trainer(max_epochs=epochs, callbacks=[cb] if cb else [], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(Items(_labels()), batch_size=N1 + N0, shuffle=True))
    return module, trainer


@pytest.mark.parametrize("make", [lambda: GroupReweighting(by="group"), lambda: GroupReweighting(by="class"),
                                  lambda: GroupDRO(eta=0.1)])
def test_callbacks_reach_the_balanced_answer(make, tmp_path):
    cb = make()
    module, trainer = _fit(cb, 60, tmp_path)
    assert float(module.theta) == pytest.approx(0.0, abs=0.05)
    assert "training_step" not in module.__dict__  # unwrapped after fit
    if isinstance(cb, GroupDRO):
        path = tmp_path / "c.ckpt"
        trainer.save_checkpoint(path)
        state = torch.load(path, weights_only=True)["callbacks"]
        (q,) = [s["q"] for s in state.values() if "q" in s]
        assert q.shape == (2,) and float(q.sum()) == pytest.approx(1.0)
        fresh = GroupDRO()
        fresh.load_state_dict({"q": q})
        assert torch.equal(fresh.q, q) and fresh.num_groups == 2


def test_erm_baseline_of_the_module():
    module, _ = _fit(None, 300)
    assert float(module.theta) > 1.5  # drifting to ln 9 ≈ 2.2: the minority group is misclassified


def test_jtt_two_stages():
    # stage 1 (1 epoch of ERM): θ > 0, the 10 class-0 samples are the errors; stage 2 restarts at θ = 0 with them
    # weighted 4×: 90 vs 40 effective samples, σ(θ) = 90/130, θ = ln(90/40)
    cb = JTT(first_epochs=1, lam_up=4.0)
    module, _ = _fit(cb, 150)
    assert cb.errors.tolist() == list(range(N1, N1 + N0))
    assert cb.normalizer == pytest.approx((100 + 3 * 10) / 100)
    assert float(module.theta) == pytest.approx(math.log(90 / 40), abs=0.05)
    assert jtt_weights(torch.tensor([0, 95]), cb.errors, 4.0).tolist() == [1.0, 4.0]


def test_error_set_needs_ids():
    with pytest.raises(ValueError, match="'index' key"):
        error_set(Theta(), [{"image": torch.zeros(2, 1, 1, 1), "label": torch.zeros(2).long()}])


# ------------------------------------------------------------------------------------------------ DFR
def _features(n_per_group: int, biased: bool, seed: int):
    """Core feature c = ±1 (the label) + noise, spurious s = ±3 (the attribute) + noise; group = 2·y + a."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(4).repeat_interleave(n_per_group) // 2
    a = torch.arange(4).repeat_interleave(n_per_group) % 2
    if biased:  # the attribute equals the label
        a = y.clone()
    c = (2 * y - 1).float() + 0.3 * torch.randn(len(y), generator=g)
    s = 3 * (2 * a - 1).float() + 0.3 * torch.randn(len(y), generator=g)
    return torch.stack([c, s], 1), y, 2 * y + a


def _worst_group_acc(w, b, f, y, grp):
    pred = (f @ w.T + (0 if b is None else b)).argmax(1)
    return min(float((pred[grp == k] == y[grp == k]).float().mean()) for k in grp.unique())


def test_dfr_refits_on_the_core_feature():
    f_test, y_test, g_test = _features(200, False, 2)
    shortcut = torch.tensor([[0.0, -1.0], [0.0, 1.0]])  # what ERM on biased data may learn: the spurious feature
    assert _worst_group_acc(shortcut, None, f_test, y_test, g_test) == 0.0
    f, y, grp = _features(50, False, 1)  # group-balanced held-out data
    res = fit_dfr(f, y, grp, c=1.0, n_subsets=5)
    assert _worst_group_acc(res.weight, res.bias, f_test, y_test, g_test) > 0.97
    assert (res.weight[1, 0] - res.weight[0, 0]).abs() > 5 * (res.weight[1, 1] - res.weight[0, 1]).abs()
    strong = fit_dfr(f, y, grp, c=1e-4, n_subsets=2)  # very strong L1: every coefficient is zero
    assert torch.count_nonzero(strong.weight) == 0


class Head(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loader(f, y, grp):
    items = [{"image": f[i].view(2, 1, 1), "label": y[i], "group": grp[i]} for i in range(len(y))]
    return DataLoader(items, batch_size=32)


def test_dfr_callback_fixes_worst_group():
    torch.manual_seed(0)
    module = Head()
    f_test, y_test, g_test = _features(200, False, 2)
    dfr = DFR(head="fc", holdout=_loader(*_features(50, False, 1)), n_subsets=3)
    trainer = L.Trainer(max_epochs=5, callbacks=[], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, _loader(*_features(100, True, 0)))
    erm = _worst_group_acc(module.fc.weight.detach(), module.fc.bias.detach(), f_test, y_test, g_test)
    trainer = L.Trainer(max_epochs=5, callbacks=[dfr], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    module = Head()
    torch.manual_seed(0)
    trainer.fit(module, _loader(*_features(100, True, 0)))
    assert dfr.fitted
    after = _worst_group_acc(module.fc.weight.detach(), module.fc.bias.detach(), f_test, y_test, g_test)
    assert erm < 0.6 and after > 0.97
    with pytest.raises(ValueError, match="fc2"):
        L.Trainer(max_epochs=1, callbacks=[DFR(head="fc2", holdout=[])], logger=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu").fit(Head(), _loader(*_features(4, True, 0)))


# ------------------------------------------------------------------------- recipes and the comparison
@pytest.mark.parametrize("name", ["rrr", "rrr_gradcam", "reweight", "groupdro", "jtt", "dfr"])
def test_compare_recipes_fast_dev_run(name, tmp_path):
    from pathlib import Path

    from negspace.cli import run_cli

    recipe = Path(__file__).resolve().parents[1] / "recipes" / f"compare_{name}.yaml"
    torch.manual_seed(0)
    cli = run_cli(["fit", "--config", str(recipe), "--trainer.default_root_dir", str(tmp_path),
                   "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false",
                   "--data.init_args.n_train", "64", "--data.init_args.n_val", "32", "--data.init_args.n_test", "16",
                   "--data.init_args.batch_size", "16"])
    assert cli.trainer.state.finished
    assert "training_step" not in cli.model.__dict__
    if name == "dfr":
        assert next(cb for cb in cli.trainer.callbacks if isinstance(cb, DFR)).fitted


def test_run_compare_tiny(tmp_path):
    from negspace.compare import run_compare

    out = run_compare(out=str(tmp_path), progress=False, seeds=1, epochs=1, n_train=32, n_val=24, n_test=24,
                      budget=1, methods=["erm", "groupdro", "dfr"])
    assert len(out["rows"]) == 3 and (tmp_path / "table.md").exists()
    assert out["picked"]["dfr"]["value"] == 1.0
    with pytest.raises(ValueError, match="methods must be among"):
        run_compare(out=str(tmp_path), methods=["mixup"])
