"""negspace.priors: paper 000's eq. 2/3 prior against hand-computed numbers on tiny set-weight nets."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients
from torch import nn

from negspace.hooks import frozen_norm_stats
from negspace.priors import (
    EPS,
    attribution_prior,
    compute_prior,
    compute_prior_from_logits,
    prior_loss,
)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Linear(nn.Module):
    """Bias-free linear classifier on flattened (C, H, W) images: logit_k = <W_k, x>."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())  # (K, C, H, W)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return x.flatten(1) @ self.weight.flatten(1).T


def _linear_prior_by_hand(w, x, y, mask, classes):
    """Σ_{c,h,w} |x·W_t·P| / (Σ_{h,w} P + 1e-5) for each sample and class list (linear net: A = x·W_t)."""
    out = []
    for b in range(x.shape[0]):
        row = []
        for t in classes[b]:
            num = (x[b] * w[t] * mask[b]).abs().sum()
            row.append(num / (mask[b].sum() + EPS))
        out.append(torch.stack(row))
    return torch.stack(out)


# ----------------------------------------------------------------------------------- attribution_prior
def test_attribution_prior_hand_numbers():
    a = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]], [[-0.5, 0.0], [1.0, -1.0]]]])  # (1, 2, 2, 2)
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # (1, 2, 2): top row
    # inside: |1| + |-2| + |-0.5| + |0| = 3.5 ; ΣP = 2
    expected = torch.tensor([3.5 / (2 + 1e-5)])
    torch.testing.assert_close(attribution_prior(a, mask), expected)
    torch.testing.assert_close(attribution_prior(a, mask[:, None]), expected)
    # soft mask: 0.5 on one pixel → (0.5·|1| + 0.5·|-0.5|) / (0.5 + 1e-5)
    soft = torch.tensor([[[0.5, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(attribution_prior(a, soft), torch.tensor([0.75 / (0.5 + 1e-5)]))
    # K axis: (B, K, C, H, W) → (B, K)
    ak = torch.stack([a, 2 * a], dim=1)
    torch.testing.assert_close(attribution_prior(ak, mask), torch.tensor([[3.5, 7.0]]) / (2 + 1e-5))


def test_attribution_prior_empty_mask_is_exactly_zero():
    a = torch.randn(3, 2, 4, 4)
    mask = torch.zeros(3, 1, 4, 4)
    mask[1, :, 0, 0] = 1
    out = attribution_prior(a, mask)
    assert out[0].item() == 0.0 and out[2].item() == 0.0 and out[1].item() > 0
    outk = attribution_prior(torch.randn(3, 2, 2, 4, 4), mask)
    assert (outk[[0, 2]] == 0).all()


# -------------------------------------------------------------------------------------------- prior_loss
def _setup(num_classes=2, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_classes, 2, 3, 3, generator=g)
    x = torch.randn(b, 2, 3, 3, generator=g)
    y = torch.arange(b) % num_classes
    mask = torch.zeros(b, 1, 3, 3)
    mask[0, 0, :2, :2] = 1
    mask[1, 0, 1:, :] = 1
    mask[3, 0, 2, 2] = 0.5  # sample 2 has an empty mask
    return w, x, y, mask


def test_presence_loss_is_twice_mean_target_prior():
    w, x, y, mask = _setup()
    model = Linear(w)
    by_hand = _linear_prior_by_hand(w, x, y, mask, y[:, None].tolist())[:, 0]
    expected = 2 * by_hand.sum() / x.shape[0]
    torch.testing.assert_close(prior_loss(model, x, y, mask, mode="presence"), expected)


def test_presence_absence_complement_binary():
    w, x, y, mask = _setup()
    model = Linear(w)
    classes = torch.stack([y, 1 - y], 1).tolist()
    by_hand = _linear_prior_by_hand(w, x, y, mask, classes)
    expected = by_hand.sum() / x.shape[0]
    torch.testing.assert_close(prior_loss(model, x, y, mask), expected)
    # one forward over the masked samples only (3 of 4), not one per class
    model.calls.clear()
    prior_loss(model, x, y, mask, mode="presence_absence")
    assert model.calls == [3]


def test_literal_numbers_tiny_net():
    # 1 channel 1x2 image, logits = [x0 + 2 x1, -x0 + x1]; x = [1, 3], mask on pixel 1 only.
    w = torch.tensor([[[[1.0, 2.0]]], [[[-1.0, 1.0]]]])
    x = torch.tensor([[[[1.0, 3.0]]]])
    mask = torch.tensor([[[[0.0, 1.0]]]])
    y = torch.tensor([0])
    # A(x, 0) = [1, 6], A(x, 1) = [-1, 3]; inside the mask: 6 and 3; ΣP = 1
    assert prior_loss(Linear(w), x, y, mask, mode="presence").item() == pytest.approx(2 * 6 / (1 + 1e-5))
    assert prior_loss(Linear(w), x, y, mask).item() == pytest.approx((6 + 3) / (1 + 1e-5))


def test_non_target_all_top_sample():
    w, x, y, mask = _setup(num_classes=4, b=4)
    model = Linear(w)
    others = [[c for c in range(4) if c != t] for t in y.tolist()]
    full = _linear_prior_by_hand(w, x, y, mask, [[t, *o] for t, o in zip(y.tolist(), others)])
    expected_all = (full[:, 0] + full[:, 1:].mean(1)).sum() / 4
    torch.testing.assert_close(prior_loss(model, x, y, mask, non_target="all"), expected_all)

    logits = model(x).detach()
    top = [max(o, key=lambda c, b=b: logits[b, c]) for b, o in enumerate(others)]
    by_hand = _linear_prior_by_hand(w, x, y, mask, [[t, c] for t, c in zip(y.tolist(), top)])
    torch.testing.assert_close(prior_loss(model, x, y, mask, non_target="top:1"), by_hand.sum() / 4)

    res = compute_prior(model, x, y, mask, non_target="sample:2", generator=torch.Generator().manual_seed(3))
    tg = res.targets
    assert tg.shape == (3, 3)
    for row, t in zip(tg.tolist(), y[res.index].tolist()):
        assert row[0] == t and t not in row[1:] and len(set(row[1:])) == 2
    by_hand = _linear_prior_by_hand(w, x[res.index], y[res.index], mask[res.index], tg.tolist())
    torch.testing.assert_close(res.loss, (by_hand[:, 0] + by_hand[:, 1:].mean(1)).sum() / 4)
    again = compute_prior(model, x, y, mask, non_target="sample:2", generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.targets, tg)
    # sampling every other class is "all"
    torch.testing.assert_close(
        prior_loss(model, x, y, mask, non_target="sample:3", generator=torch.Generator().manual_seed(1)),
        expected_all,
    )


def test_gradient_wrt_weights_matches_closed_form():
    w, x, y, mask = _setup()
    model = Linear(w)
    prior_loss(model, x, y, mask).backward()
    wr = w.clone().requires_grad_(True)
    classes = torch.stack([y, 1 - y], 1).tolist()
    _linear_prior_by_hand(wr, x, y, mask, classes).sum().div(x.shape[0]).backward()
    torch.testing.assert_close(model.weight.grad, wr.grad)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 16, 3)

    def forward(self, x):
        return self.fc(torch.nn.functional.softplus(self.conv(x)).flatten(1))


def test_integrated_gradients_against_captum():
    torch.manual_seed(0)
    model = SmallNet()
    x = torch.rand(3, 2, 4, 4)
    y = torch.tensor([0, 2, 1])
    mask = torch.zeros(3, 1, 4, 4)
    mask[:, :, :2, :2] = 1
    ours = prior_loss(model, x, y, mask, method="integrated_gradients", non_target="all", n_steps=16)
    ig = IntegratedGradients(model)
    terms = []
    for t in range(3):
        a = ig.attribute(x, target=torch.full((3,), t), n_steps=16, method="gausslegendre")
        terms.append(attribution_prior(a, mask))
    terms = torch.stack(terms, 1)  # (B, classes)
    per = [terms[b, y[b]] + terms[b, [c for c in range(3) if c != y[b]]].mean() for b in range(3)]
    torch.testing.assert_close(ours, torch.stack(per).mean())
    ours.backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


def test_ig_equals_ixg_for_homogeneous_net():
    w, x, y, mask = _setup()
    model = Linear(w)
    torch.testing.assert_close(
        prior_loss(model, x, y, mask, method="integrated_gradients", n_steps=4), prior_loss(model, x, y, mask)
    )
    # top:K is chosen at the actual input, not at an integration-path point
    w3, x3, y3, m3 = _setup(num_classes=4)
    model3 = Linear(w3)
    torch.testing.assert_close(
        prior_loss(model3, x3, y3, m3, method="integrated_gradients", n_steps=3, non_target="top:2"),
        prior_loss(model3, x3, y3, m3, non_target="top:2"),
    )


def test_empty_masks_contribute_zero_and_cost_nothing():
    w, x, y, mask = _setup()
    model = Linear(w)
    model.calls.clear()
    loss = prior_loss(model, x, y, torch.zeros_like(mask))
    assert loss.item() == 0.0 and model.calls == []
    assert loss.requires_grad
    loss.backward()  # a valid (trivial) graph
    # masked samples alone give the same sum: loss(all) * B == loss(masked subset) * M
    keep = mask.flatten(1).sum(1) > 0
    full = prior_loss(model, x, y, mask)
    sub = prior_loss(model, x[keep], y[keep], mask[keep])
    torch.testing.assert_close(full * 4, sub * int(keep.sum()))
    res = compute_prior(model, x, y, mask)
    assert res.per_sample[2].item() == 0.0 and res.index.tolist() == [0, 1, 3]


def test_norm_stats_untouched_and_forward_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2))
    model.train()
    x = torch.rand(4, 2, 3, 3)
    y = torch.tensor([0, 1, 0, 1])
    mask = torch.ones(4, 1, 3, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = prior_loss(model, x, y, mask)
    loss.backward()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # without protection the stats do move (the test can fail)
    prior_loss(model, x, y, mask, keep_norm_stats=False)
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    # exception inside the context restores the originals
    bn = model[1]
    orig = bn.running_mean
    with pytest.raises(RuntimeError), frozen_norm_stats(model):
        assert bn.running_mean is not orig
        raise RuntimeError("boom")
    assert bn.running_mean is orig


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "absence"}, "mode must be one of"),
        ({"method": "saliency"}, "method must be one of"),
        ({"non_target": "top:0"}, "non_target must be"),
        ({"non_target": "random"}, "non_target must be"),
        ({"n_steps": 0}, "n_steps"),
    ],
)
def test_bad_options(kwargs, match):
    w, x, y, mask = _setup()
    with pytest.raises(ValueError, match=match):
        prior_loss(Linear(w), x, y, mask, **kwargs)


def test_bad_masks_and_labels():
    w, x, y, mask = _setup()
    model = Linear(w)
    with pytest.raises(ValueError, match="does not broadcast"):
        prior_loss(model, x, y, torch.ones(4, 1, 2, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        prior_loss(model, x, y, torch.ones(4, 2, 3, 3))  # one mask channel only
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prior_loss(model, x, y, mask * 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prior_loss(model, x, y, -mask)
    bad = mask.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prior_loss(model, x, y, bad)
    with pytest.raises(TypeError, match=r"mask must be a torch\.Tensor"):
        prior_loss(model, x, y, mask.numpy())
    with pytest.raises(TypeError, match="integer class indices"):
        prior_loss(model, x, y.double(), mask)
    with pytest.raises(ValueError, match=r"y must have shape"):
        prior_loss(model, x, y[:2], mask)
    with pytest.raises(ValueError, match="outside"):
        prior_loss(model, x, y + 5, mask)
    # boolean masks and (B, H, W) masks are accepted
    torch.testing.assert_close(prior_loss(model, x, y, mask[:, 0] > 0), prior_loss(model, x, y, (mask > 0).double()))


def test_complement_needs_binary_and_topk_range():
    w, x, y, mask = _setup(num_classes=3)
    with pytest.raises(ValueError, match="binary"):
        prior_loss(Linear(w), x, y, mask, non_target="complement")
    with pytest.raises(ValueError, match="K <= num_classes - 1"):
        prior_loss(Linear(w), x, y, mask, non_target="top:3")
    # presence mode needs no non-target classes
    assert prior_loss(Linear(w), x, y, mask, mode="presence", non_target="complement") > 0


def test_shared_forward_variant_equals_prior_loss():
    w, x, y, mask = _setup(num_classes=3)
    model = Linear(w)
    expected = prior_loss(model, x, y, mask, non_target="all")
    (g_expected,) = torch.autograd.grad(expected, model.weight)
    xr = x.clone().requires_grad_(True)
    res = compute_prior_from_logits(model(xr), xr, y, mask, non_target="all")
    torch.testing.assert_close(res.loss, expected)
    (g,) = torch.autograd.grad(res.loss, model.weight)
    torch.testing.assert_close(g, g_expected)
    assert res.per_sample[2].item() == 0.0
    with pytest.raises(ValueError, match="requires_grad"):
        compute_prior_from_logits(model(x), x, y, mask)


# ------------------------------------------------------------------------------ paper 000's defaults
def test_paper_000_defaults():
    """The defaults the fidelity table (docs/fidelity.md, 000-priors) calls faithful."""
    import inspect

    from negspace.callbacks import AttributionPrior
    from negspace.data_modules.patches import default_dilation

    assert EPS == 1e-5  # B.4: "we add 10^-5 to the denominator"
    assert default_dilation(224) == 10  # B.4: masks dilated by 10 pixels (at 224 px)
    for fn in (prior_loss, AttributionPrior.__init__):
        params = inspect.signature(fn).parameters
        assert params["mode"].default == "presence_absence"  # eq. 3
        assert params["non_target"].default == "complement"  # t' = complementary class (binary)
        assert params["method"].default == "input_x_gradient"  # = IG on X-models (test_ig_equals_ixg_...)
    params = inspect.signature(AttributionPrior.__init__).parameters
    assert params["norm_mode"].default == "auto"  # = "shared" (the reference's training forward) with IxG
    assert params["attribution_batch"].default is None  # every masked sample, as in the paper


def test_mass_in_mask_is_relative_target_attribution_in_the_patch():
    """Table 2 "Attr.": Σ|A(x, t)·P| / Σ|A(x, t)| of the label's attribution, averaged over masked samples."""
    w = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 1])
    mask = torch.zeros(3, 1, 2, 2)
    mask[0, :, 0, 0] = 1
    mask[2, :, :, 1] = 1  # sample 1 unmasked: not part of the mean
    result = compute_prior(Linear(w), x, y, mask)
    by_hand = [(x[b] * w[y[b]] * mask[b]).abs().sum() / (x[b] * w[y[b]]).abs().sum() for b in (0, 2)]
    torch.testing.assert_close(result.mass_in_mask(), torch.stack(by_hand).mean())
