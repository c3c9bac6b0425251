"""AttributionPrior on BatchNorm networks: each ``norm_mode`` equals a hand-written loop (32-true and bf16-mixed,
BatchNorm1d and BatchNorm2d), one masked sample never crashes; ``attribution_batch`` is unbiased; forwards that
are not a pure function of the image tensor and NaN images get errors naming the prior and the fix."""

from __future__ import annotations

import contextlib
import itertools
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from helpers import is_wrapped
from negspace.callbacks import AttributionPrior
from negspace.hooks import eval_mode, frozen_norm_stats
from negspace.priors import compute_prior, compute_prior_from_logits

B, HW = 4, 6


class Net2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(F.avg_pool2d(F.softplus(self.bn(self.conv(x))), 2).flatten(1))


class Net1d(nn.Module):
    """BatchNorm1d: one sample in train mode has one value per channel (crashes without care)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * HW * HW, 8)
        self.bn = nn.BatchNorm1d(8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.act(self.bn(self.fc1(x.flatten(1)))))


NETS = {"bn2d": Net2d, "bn1d": Net1d}


class Module(L.LightningModule):
    def __init__(self, net: str = "bn2d") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = NETS[net]()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def make_data():
    """4 batches of 4: all masked; exactly one masked; two masked mixed with unmasked; none masked."""
    g = torch.Generator().manual_seed(0)
    n = 4 * B
    x = torch.rand(n, 3, HW, HW, generator=g)
    y = torch.arange(n) % 2
    mask = torch.zeros(n, 1, HW, HW)
    for i in [0, 1, 2, 3, 5, 8, 10]:
        mask[i, :, :3, :3] = 1.0
        x[i, :, :3, :3] = 0.9
    return x, y, mask


def loader(x=None):
    x0, y, mask = make_data()
    x = x0 if x is None else x
    return DataLoader([{"image": x[i], "label": y[i], "mask": mask[i]} for i in range(len(x))], batch_size=B)


def fit(cb, module, dl=None, **kw):
    L.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, **kw).fit(module, dl or loader())
    return module


def per_class_prior(logits, xr, rows, classes, x, m):
    """Eq. 2/3 terms by hand: one backward per class of Σ_rows logits[rows, class], read off at ``rows``."""
    terms = []
    for k in range(classes.shape[1]):
        (g,) = torch.autograd.grad(logits.gather(1, classes[:, k : k + 1]).sum(), xr, create_graph=True)
        a = (g[rows] * x).abs()
        terms.append((a * m).flatten(1).sum(1) / (m.flatten(1).sum(1) + 1e-5))
    return terms


def hand_penalty(net, xb, yb, mb, norm_mode, mode):
    """The prior of one batch for ``norm_mode``, written out (autocast off, running statistics untouched)."""
    idx = (mb.flatten(1).sum(1) > 0).nonzero().flatten()
    if idx.numel() == 0:
        return None
    yi = yb[idx]
    classes = yi[:, None] if mode == "presence" else torch.stack([yi, 1 - yi], 1)
    if norm_mode == "shared":  # full training batch, train-mode statistics
        xr = xb.clone().requires_grad_(True)
        with frozen_norm_stats(net):
            logits = net(xr)[idx]
        rows = idx
    else:
        xr = xb[idx].clone().requires_grad_(True)
        use_eval = norm_mode == "eval" or idx.numel() == 1  # one sample has no batch statistics of its own
        with frozen_norm_stats(net), (eval_mode(net.bn) if use_eval else contextlib.nullcontext()):
            logits = net(xr)
        rows = torch.arange(idx.numel())
    terms = per_class_prior(logits, xr, rows, classes, xb[idx], mb[idx])
    per = 2 * terms[0] if mode == "presence" else terms[0] + terms[1]
    return per.sum() / len(xb)


def hand_loop(net_name, norm_mode, mode, lam, autocast):
    module = Module(net_name).train()
    opt = module.configure_optimizers()
    x, y, mask = make_data()
    for s in range(0, len(x), B):
        xb, yb, mb = x[s : s + B], y[s : s + B], mask[s : s + B]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(module(xb), yb)
        with torch.autocast("cpu", enabled=False):
            pen = hand_penalty(module.net, xb, yb, mb, norm_mode, mode)
        if pen is not None:
            loss = loss + lam * pen
        loss.backward()
        opt.step()
        opt.zero_grad()
    return module


def assert_same_state(a, b, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("net", ["bn2d", "bn1d"])
@pytest.mark.parametrize("norm_mode", ["shared", "eval", "separate"])
def test_each_norm_mode_equals_hand_written_loop(norm_mode, net, precision):
    mode = "presence" if net == "bn1d" else "presence_absence"
    module = fit(AttributionPrior(lam=2.0, mode=mode, norm_mode=norm_mode), Module(net), precision=precision)
    ref = hand_loop(net, norm_mode, mode, 2.0, autocast=precision == "bf16-mixed")
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "32-true" else {"rtol": 1e-3, "atol": 1e-4}
    assert_same_state(module, ref, **tol)
    assert not is_wrapped(module)


def test_modes_differ_on_batchnorm_and_auto_is_shared():
    modes = {}
    for norm_mode in ("auto", "shared", "eval", "separate"):
        modes[norm_mode] = fit(AttributionPrior(lam=2.0, norm_mode=norm_mode), Module()).net.fc.weight
    assert torch.equal(modes["auto"], modes["shared"])
    assert not torch.allclose(modes["shared"], modes["eval"])
    assert not torch.allclose(modes["eval"], modes["separate"])


@pytest.mark.parametrize("norm_mode", ["auto", "shared", "eval", "separate"])
@pytest.mark.parametrize("method", ["input_x_gradient", "integrated_gradients"])
def test_one_masked_sample_never_crashes(norm_mode, method):
    if norm_mode == "shared" and method == "integrated_gradients":
        with pytest.raises(ValueError, match=r"norm_mode='shared'.*input_x_gradient"):
            AttributionPrior(norm_mode=norm_mode, method=method)
        return
    x, y, mask = make_data()
    keep = torch.zeros(len(x), dtype=torch.bool)
    keep[[0, 4, 8, 12]] = True  # exactly one masked sample per batch
    mask[~keep] = 0
    data = [{"image": x[i], "label": y[i], "mask": mask[i]} for i in range(len(x))]
    cb = AttributionPrior(lam=1.0, mode="presence", norm_mode=norm_mode, method=method, n_steps=2)
    fit(cb, Module("bn1d"), dl=DataLoader(data, batch_size=B))
    assert cb.penalised_batches == 4


def test_norm_mode_errors_and_share_forward_alias():
    with pytest.raises(ValueError, match="norm_mode must be one of"):
        AttributionPrior(norm_mode="train")
    with pytest.raises(ValueError, match="share_forward"):
        AttributionPrior(share_forward="yes")
    with pytest.warns(DeprecationWarning, match="norm_mode"):
        assert AttributionPrior(share_forward=True).norm_mode == "shared"
    with pytest.raises(TypeError, match="not both"):
        AttributionPrior(share_forward=True, norm_mode="eval")
    with pytest.raises(ValueError, match="attribution_batch"):
        AttributionPrior(attribution_batch=0)


# ------------------------------------------------------------------------------- attribution_batch
class Free(nn.Module):
    """No batch coupling: per-sample priors do not depend on which samples are attributed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.softplus(self.conv(x)).mean((2, 3)))


def _subset_mean(fn, n_masked, k):
    """Mean of ``fn(generator)`` over all K-subsets of the masked samples (seeds enumerate every subset)."""
    seen: dict[tuple[int, ...], torch.Tensor] = {}
    for seed in range(500):
        result = fn(torch.Generator().manual_seed(seed))
        seen.setdefault(tuple(result.index.tolist()), result.loss)
        if len(seen) == len(list(itertools.combinations(range(n_masked), k))):
            break
    assert len(seen) == len(list(itertools.combinations(range(n_masked), k)))
    return torch.stack(list(seen.values())).mean()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_attribution_batch_mean_over_all_subsets_is_the_full_penalty(k):
    net = Free()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 3, HW, HW, generator=g), torch.tensor([0, 1, 2, 0, 1])
    mask = torch.zeros(5, 1, HW, HW)
    mask[[0, 1, 3, 4], :, :3, :3] = 1.0  # 4 of 5 masked
    full = compute_prior(net, x, y, mask, non_target="all").loss
    mean = _subset_mean(lambda gen: compute_prior(net, x, y, mask, non_target="all", attribution_batch=k,
                                                  generator=gen), 4, k)
    torch.testing.assert_close(mean, full, rtol=1e-6, atol=1e-7)
    # the shared-forward variant, and eval-mode BatchNorm (per-sample): the same identity
    xr = x.clone().requires_grad_(True)
    logits = net(xr)
    mean = _subset_mean(lambda gen: compute_prior_from_logits(logits, xr, y, mask, non_target="all",
                                                              attribution_batch=k, generator=gen), 4, k)
    torch.testing.assert_close(mean, full, rtol=1e-6, atol=1e-7)
    bn = Net2d().eval()
    y2 = y % 2
    full = compute_prior(bn, x, y2, mask).loss
    mean = _subset_mean(lambda gen: compute_prior(bn, x, y2, mask, attribution_batch=k, generator=gen), 4, k)
    torch.testing.assert_close(mean, full, rtol=1e-6, atol=1e-7)


def test_attribution_batch_in_the_callback_attributes_k_samples():
    cb = AttributionPrior(lam=1.0, norm_mode="eval", attribution_batch=1, seed=3)
    fit(cb, Module(), limit_train_batches=3)  # the third batch has two masked samples
    assert cb.last_result is not None and cb.last_result.index.numel() == 1
    assert "generator_state" in cb.state_dict()


# ---------------------------------------------------------------- forwards that are not pure functions
class InPlaceModule(Module):
    def forward(self, x):
        x.sub_(0.5)  # normalises its input in place
        return self.net(x)


class BatchModule(Module):
    def forward(self, batch):
        return self.net(batch["image"])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch), batch["label"])


@pytest.mark.parametrize("norm_mode", ["shared", "eval", "separate"])
def test_in_place_forward_names_prior_and_fix(norm_mode):
    module = InPlaceModule()
    with pytest.raises(RuntimeError, match=r"AttributionPrior: the model \(forward=None: InPlaceModule.forward\) "
                                           r"modifies its input tensor in place.*forward="):
        fit(AttributionPrior(norm_mode=norm_mode), module)
    assert not is_wrapped(module)


def test_in_place_forward_with_integrated_gradients():
    with pytest.raises(RuntimeError, match=r"AttributionPrior: .* modifie.* input tensor in place"):
        fit(AttributionPrior(method="integrated_gradients", n_steps=2), InPlaceModule())


@pytest.mark.parametrize("norm_mode", ["shared", "separate"])
def test_forward_taking_the_whole_batch_names_prior_and_fix(norm_mode):
    module = BatchModule()
    with pytest.raises(TypeError, match=r"AttributionPrior: calling the model .*BatchModule.* on the image tensor "
                                        r"failed.*pass forward="), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shared: "did not see the model called on the batch image"
        fit(AttributionPrior(norm_mode=norm_mode), module)
    assert not is_wrapped(module)
    fit(AttributionPrior(forward="net", norm_mode=norm_mode), BatchModule())  # the fix works


@pytest.mark.parametrize("norm_mode", ["shared", "separate"])
def test_nan_images_are_reported_as_nan_input(norm_mode):
    x, _, _ = make_data()
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"AttributionPrior\('attribution_prior'\): the batch images contain NaN "
                                         r"or inf \(samples \[1\]\).*not the model"):
        fit(AttributionPrior(norm_mode=norm_mode), Module(), dl=loader(x))
    with pytest.warns(RuntimeWarning, match="contain NaN or inf"):
        fit(AttributionPrior(norm_mode=norm_mode, on_nan="skip"), Module(), dl=loader(x))
