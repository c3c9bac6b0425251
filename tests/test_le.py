"""Linear Explanations (paper 003): concepts, linear_explanation, simulation scores, callback, open_clip."""

from __future__ import annotations

import torch

from negspace.models.clip import encode_images, encode_texts, load_clip


def test_tiny_clip_encodes_to_unit_vectors():
    torch.manual_seed(0)
    model, _preprocess, tokenizer = load_clip("tiny")
    x = torch.rand(5, 3, 32, 32)
    emb = encode_images(model, x, batch_size=2)
    assert emb.shape == (5, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    # batching does not change the result, and a DataLoader-style iterable of (image, label) works
    torch.testing.assert_close(emb, encode_images(model, [(x[:3], 0), (x[3:], 1)]), atol=1e-5, rtol=1e-5)
    txt = encode_texts(model, tokenizer, ["dog", "cat", "lesion"])
    assert txt.shape == (3, 32)
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(3))


# ----------------------------------------------------------------------------------------------------------
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from torch import nn  # noqa: E402

from helpers import hook_count  # noqa: E402
from negspace.explain.le import (  # noqa: E402
    Explanation,
    ablation_score,
    activation_summary,
    area_chart,
    builtin_concepts,
    clip_concept_matrix,
    correlation_score,
    elastic_net_weights,
    fit_sigmoid_calibration,
    label_concepts,
    linear_explanation,
    split_indices,
    top_impact,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_greedy(y, p, ranking, tr, va, v=10, r=10, eps=0.02):
    """Algorithm 1 per neuron as in the reference code, but returning the *selected* set (numpy lstsq fits)."""
    def fit_corr(cols):
        a = np.c_[p[tr][:, cols], np.ones(len(tr))]
        coef = np.linalg.lstsq(a, y[tr], rcond=None)[0]
        pred = np.c_[p[va][:, cols], np.ones(len(va))] @ coef
        return np.corrcoef(pred, y[va])[0, 1], coef

    selected, bad, best = [], [], 0.0
    while len(selected) < v:
        cand = [c for c in ranking if c not in selected and c not in bad][:r]
        cur_best, cur_c = best, None
        for c in cand:
            rho, _ = fit_corr([*selected, c])
            if rho - best < eps and selected:
                bad.append(c)
            elif rho > cur_best:
                cur_best, cur_c = rho, c
        if cur_c is None:
            break
        selected.append(cur_c)
        best = cur_best
    coef = fit_corr(selected)[1] if selected else None
    return selected, coef, best


def _problem(n=1500, m=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, m, generator=g)
    ys = torch.stack([
        2 * p[:, 3] + p[:, 7] + 0.05 * torch.randn(n, generator=g),
        p[:, 1] + 0.5 * p[:, 2] + 0.3 * p[:, 11] + 0.2 * torch.randn(n, generator=g),
        torch.randn(n, generator=g),
        3 * p[:, 20] - p[:, 5] + 0.1 * torch.randn(n, generator=g),
    ], 1)
    return p, ys


def test_neuron_2c3_plus_c7_is_explained_by_c3_c7():
    p, ys = _problem()
    e = linear_explanation(ys[:, 0], p, concept_names=[f"concept {i}" for i in range(p.shape[1])])
    assert isinstance(e, Explanation)
    assert set(e.concept_indices) == {3, 7} and set(e.concepts) == {"concept 3", "concept 7"}
    w = dict(zip(e.concept_indices, e.weights))
    assert w[3] == pytest.approx(2.0, rel=0.05) and w[7] == pytest.approx(1.0, rel=0.05)
    assert e.bias == pytest.approx(0.0, abs=0.05) and e.val_correlation > 0.99
    d = json.loads(json.dumps(e.to_dict()))
    assert Explanation.from_dict(d) == e
    # simulate = weights·P + bias
    torch.testing.assert_close(e.simulate(p), (2 * p[:, 3] + p[:, 7]), atol=0.05, rtol=0)


def test_elastic_net_matches_sklearn():
    from sklearn.linear_model import ElasticNet

    p, ys = _problem(n=400)
    x = ((p - p.mean(0)) / p.std(0)).double()
    y = ((ys - ys.mean(0)) / ys.std(0)).double()
    w = elastic_net_weights(x.T @ x / len(x), x.T @ y / len(x), 0.05, 0.99, tol=1e-12, max_iter=20000)
    for j in range(ys.shape[1]):
        sk = ElasticNet(alpha=0.05, l1_ratio=0.99, fit_intercept=False, tol=1e-12, max_iter=100000)
        sk.fit(x.numpy(), y[:, j].numpy())
        np.testing.assert_allclose(w[:, j].numpy(), sk.coef_, atol=1e-7)


def test_batched_greedy_matches_reference_loop_and_single_neurons():
    p, ys = _problem()
    exps = linear_explanation(ys, p, rank="abs")
    tr, va, _ = split_indices(len(p), (0.7, 0.1, 0.2), 0)
    pn, yn = p.double().numpy(), ys.double().numpy()
    x = ((p[tr] - p[tr].mean(0)) / p[tr].std(0)).double()
    y = ((ys[tr] - ys[tr].mean(0)) / ys[tr].std(0)).double()
    w_en = elastic_net_weights(x.T @ x / len(x), x.T @ y / len(x), 0.05, 0.99, tol=1e-10, max_iter=20000)
    marg = (x.T @ y / len(x)).abs()
    for j, e in enumerate(exps):
        # ranking by |w| (ties by |marginal correlation|), as documented
        ranking = sorted(range(p.shape[1]), key=lambda c, j=j: (-abs(float(w_en[c, j])), -float(marg[c, j])))
        sel, coef, best = _reference_greedy(yn[:, j], pn, ranking, tr.numpy(), va.numpy())
        assert e.concept_indices == sel, j
        np.testing.assert_allclose(e.weights, coef[:-1], rtol=1e-6, atol=1e-8)
        assert e.bias == pytest.approx(coef[-1], abs=1e-6)
        assert e.val_correlation == pytest.approx(best, abs=1e-9)
        single = linear_explanation(ys[:, j], p, rank="abs", units=[j])
        assert single.concept_indices == e.concept_indices
        np.testing.assert_allclose(single.weights, e.weights, rtol=1e-9)
        assert single.val_correlation == pytest.approx(e.val_correlation, abs=1e-12)
    assert set(exps[3].concept_indices) == {20, 5}  # the inhibitory concept is found with rank="abs"
    assert exps[0].test_correlation > 0.99
    # the signed (paper) ranking never tries the negatively weighted concept 5 first
    assert linear_explanation(ys[:, 3], p, rank="signed").concept_indices[0] == 20


def test_errors_and_dead_neurons():
    p, ys = _problem(n=300)
    with pytest.raises(ValueError, match="rows"):
        linear_explanation(ys[:-1], p)
    bad = ys.clone()
    bad[5, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        linear_explanation(bad, p)
    with pytest.raises(ValueError, match="concept_names"):
        linear_explanation(ys[:, 0], p, concept_names=["a"])
    with pytest.raises(ValueError, match="split"):
        linear_explanation(ys[:, 0], p, split=(0.5, 0.1, 0.1))
    with pytest.raises(TypeError, match="activations"):
        linear_explanation([1.0, 2.0], p)
    acts = ys.clone()
    acts[:, 2] = 0.7  # dead neuron
    with pytest.warns(UserWarning, match=r"1 dead neuron.*units \[2\]"):
        exps = linear_explanation(acts, p)
    assert exps[2].dead and exps[2].concepts == [] and math.isnan(exps[2].val_correlation)
    assert exps[2].bias == pytest.approx(0.7)
    assert set(exps[0].concept_indices) == {3, 7}
    assert math.isnan(correlation_score(exps[2], acts[:, 2], p))


def test_correlation_score_matches_numpy():
    p, ys = _problem()
    exps = linear_explanation(ys, p)
    got = correlation_score(exps, ys, p)
    for j, e in enumerate(exps):
        sim = e.simulate(p).double().numpy()
        assert got[j] == pytest.approx(np.corrcoef(sim, ys[:, j].double().numpy())[0, 1], abs=1e-9)
    assert correlation_score(exps[0], ys[:, 0], p, rows="test") == pytest.approx(exps[0].test_correlation, abs=1e-9)


class _PoolNet(nn.Module):
    """conv → ReLU (the explained layer "act") → global average pool → linear head."""

    def __init__(self, c=6, k=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, k)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(8, 8)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.out(self.fc2(self.act(self.fc1(x))))


def _pool_data(n=240):
    torch.manual_seed(0)
    net = _PoolNet()
    x = torch.randn(n, 3, 6, 6)
    y = torch.randint(0, 4, (n,))
    q = activation_summary(net, "act", x)
    return net, x, y, q


def test_activation_summary_matches_manual():
    net, x, _, q = _pool_data(50)
    with torch.no_grad():
        a = net.act(net.conv(x))
    torch.testing.assert_close(q, a.mean((2, 3)))
    torch.testing.assert_close(activation_summary(net, "act", x, reduce="max", batch_size=7), a.amax((2, 3)))
    assert hook_count(net) == 0


@pytest.mark.parametrize("fast", [None, False])
def test_ablation_score_one_for_true_activation_zero_for_mean(fast):
    net, x, y, q = _pool_data()
    n = len(x)
    for k in (0, 4):
        true = Explanation(["q"], [1.0], 0.0, 1.0, [k], k, n_samples=n)
        mean = Explanation([], [], float(q[:, k].mean()), 0.0, [], k, n_samples=n)
        for scaling in ("none", "norm"):
            assert ablation_score(net, "act", k, true, (x, y), concepts=q, scaling=scaling, fast=fast) == \
                pytest.approx(1.0, abs=1e-4)
        assert ablation_score(net, "act", k, true, (x, y, q), scaling="optim", steps=5, fast=fast) == \
            pytest.approx(1.0, abs=1e-4)
        assert ablation_score(net, "act", k, mean, (x, y), scaling="none", fast=fast) == pytest.approx(0.0, abs=1e-5)
    assert hook_count(net) == 0


def test_ablation_fast_path_equals_rerun_and_batched_equals_single():
    net, x, y, q = _pool_data()
    g = torch.Generator().manual_seed(1)
    p = torch.cat([q + 0.3 * torch.randn(q.shape, generator=g), torch.rand(len(q), 3, generator=g)], 1)
    exps = linear_explanation(q, p)
    ks = list(range(q.shape[1]))
    for scaling in ("none", "norm"):
        fast = ablation_score(net, "act", ks, exps, (x, y), concepts=p, scaling=scaling, fast=True)
        slow = ablation_score(net, "act", ks, exps, (x, y), concepts=p, scaling=scaling, fast=False)
        np.testing.assert_allclose(fast, slow, atol=1e-5)
        one = [ablation_score(net, "act", k, exps[k], (x, y), concepts=p, scaling=scaling) for k in ks]
        np.testing.assert_allclose(fast, one, atol=1e-12)
    opt_fast = ablation_score(net, "act", ks, exps, (x, y), concepts=p, scaling="optim", steps=30, fast=True)
    opt_slow = ablation_score(net, "act", ks, exps, (x, y), concepts=p, scaling="optim", steps=30, fast=False)
    np.testing.assert_allclose(opt_fast, opt_slow, atol=2e-3)
    norm = ablation_score(net, "act", ks, exps, (x, y), concepts=p, scaling="norm")
    assert not np.allclose(opt_fast, norm)  # the optimiser moved (c, d) away from the norm start
    # a DataLoader of (x, y) batches and a non-linear-head layer (general path) also work
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    assert ablation_score(net, "act", 1, exps[1], loader, concepts=p, scaling="norm") == pytest.approx(
        ablation_score(net, "act", 1, exps[1], (x, y), concepts=p, scaling="norm"), abs=1e-9)
    with pytest.raises(ValueError, match="fast=True"):
        ablation_score(net, "conv", 0, exps[0], (x, y), concepts=p, fast=True)
    with pytest.raises(ValueError, match="concepts"):
        ablation_score(net, "act", 0, exps[0], (x, y))
    assert hook_count(net) == 0


def test_ablation_mlp_general_path():
    torch.manual_seed(0)
    net = _MLP()
    x = torch.randn(200, 5)
    y = torch.randint(0, 3, (200,))
    q = activation_summary(net, "fc2", x)
    e = Explanation(["q"], [1.0], 0.0, 1.0, [2], 2, n_samples=200)
    assert ablation_score(net, "fc2", 2, e, (x, y), concepts=q, scaling="none") == pytest.approx(1.0, abs=1e-9)
    half = Explanation(["q"], [0.5], float(q[:, 2].mean()) / 2, 1.0, [2], 2, n_samples=200)
    s = ablation_score(net, "fc2", 2, half, (x, y), concepts=q, scaling="none")
    assert 0.0 < s < 1.0
    assert ablation_score(net, "fc2", 2, half, (x, y), concepts=q, scaling="norm") == pytest.approx(1.0, abs=1e-6)


class _TokenNet(nn.Module):
    """(B, T, 4) tokens -> MLP (the explained layer "mlp", (B, T, 6)) -> head on the CLS token."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(4, 6)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(6, 3))

    def forward(self, x):
        return self.head(self.mlp(x)[:, 0])


def test_token_layers_cls_summary_and_ablation():
    torch.manual_seed(0)
    net = _TokenNet()
    x = torch.randn(150, 5, 4)
    y = torch.randint(0, 3, (150,))
    q = activation_summary(net, "mlp", x, reduce="cls")
    with torch.no_grad():
        torch.testing.assert_close(q, net.mlp(x)[:, 0])
    torch.testing.assert_close(activation_summary(net, "mlp", x, reduce="mean"), net.mlp(x).mean(1).detach())
    e = Explanation(["q"], [1.0], 0.0, 1.0, [1], 1, n_samples=150)
    assert ablation_score(net, "mlp", 1, e, (x, y), concepts=q, scaling="none", reduce="cls") == pytest.approx(1.0)
    m = Explanation([], [], float(q[:, 1].mean()), 0.0, [], 1, n_samples=150)
    assert ablation_score(net, "mlp", 1, m, (x, y), concepts=q, scaling="none", reduce="cls") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="fast=True"):
        ablation_score(net, "mlp", 1, e, (x, y), concepts=q, reduce="cls", fast=True)


def test_top_impact_fast_equals_rerun_and_hand_computation():
    net, x, y, q = _pool_data(120)
    betas = (0.1, 0.5, 1.0)
    fast = top_impact(net, "act", (x, y), betas=betas, fast=True)
    slow = top_impact(net, "act", (x, y), betas=betas, fast=False)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    assert torch.allclose(fast[:, -1], torch.ones(len(fast), dtype=fast.dtype))
    # hand computation for neuron 2
    k = 2
    with torch.no_grad():
        a = net.act(net.conv(x))
        base = net.fc(a.mean((2, 3)))
        a0 = a.clone()
        a0[:, k] = 0
        abl = net.fc(a0.mean((2, 3)))
    ce = nn.functional.cross_entropy
    lb, la = ce(base, y, reduction="none"), ce(abl, y, reduction="none")
    cb, ca = (base.argmax(1) == y).double(), (abl.argmax(1) == y).double()
    imp = (((cb - ca) / cb.sum()) - ((lb - la) / lb.sum()).double()).abs() / 2
    order = torch.argsort(q[:, k], descending=True)
    want = imp[order][: int(0.5 * len(x))].sum() / imp.sum()
    assert float(fast[k, 1]) == pytest.approx(float(want), abs=1e-6)


def test_label_concepts_builtin_and_area_chart(tmp_path):
    p, names = label_concepts(torch.tensor([0, 2, 1, 2]), ["a", "b", "c"], {"ab": ["a", "b"], "c-only": [2]})
    assert names == ["a", "b", "c", "ab", "c-only"]
    torch.testing.assert_close(p, torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 1], [0, 1, 0, 1, 0],
                                                [0, 0, 1, 0, 1]], dtype=torch.float32))
    with pytest.raises(ValueError, match="unknown class name"):
        label_concepts(torch.tensor([0]), ["a"], {"x": ["z"]})
    batches = [{"image": torch.zeros(2, 1, 4, 4), "label": torch.tensor([0, 1]),
                "mask": torch.tensor([[[[0.0]]], [[[1.0]]]]).expand(2, 1, 4, 4)}]
    pl, nl = builtin_concepts("lesions", batches)
    assert nl == ["benign", "malignant", "patch present"]
    torch.testing.assert_close(pl, torch.tensor([[1.0, 0, 0], [0, 1, 1]]))
    pd_, nd = builtin_concepts("digits", [(torch.zeros(3, 1, 8, 8), torch.tensor([0, 7, 4]))])
    assert nd[:10] == [f"digit {i}" for i in range(10)] and "even" in nd and pd_.shape == (3, len(nd))
    assert pd_[1, nd.index("odd")] == 1 and pd_[2, nd.index("even")] == 1
    act = torch.rand(50)
    fig_path = tmp_path / "area.png"
    area_chart(act, torch.rand(50, 4), ["w", "x", "y", "z"], path=fig_path)
    assert fig_path.stat().st_size > 1000


def test_sigmoid_calibration_and_clip_concepts(tmp_path):
    g = torch.Generator().manual_seed(0)
    cos = 0.3 * torch.rand(4000, 3, generator=g)
    a_true, b_true = 40.0, -0.15
    labels = (torch.rand(cos.shape, generator=g) < torch.sigmoid(a_true * (cos + b_true))).float()
    a, b = fit_sigmoid_calibration(cos, labels)
    assert a == pytest.approx(a_true, rel=0.15) and b == pytest.approx(b_true, abs=0.01)
    images = torch.rand(6, 3, 32, 32, generator=g)
    p, (a1, b1) = clip_concept_matrix(images, ["dog", "cat"], model="tiny", calibration=(10.0, -0.1),
                                      cache_dir=tmp_path, min_top5=None)
    assert p.shape == (6, 2) and ((p > 0) & (p < 1)).all() and (a1, b1) == (10.0, -0.1)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    p2, _ = clip_concept_matrix(images, ["dog", "cat"], model="tiny", calibration=(10.0, -0.1), cache_dir=tmp_path,
                                min_top5=None)
    torch.testing.assert_close(p, p2)  # from the cache
    with pytest.raises(ValueError, match="calibration"):
        clip_concept_matrix(images, ["dog"], model="tiny")


# ---------------------------------------------------------------------------------------------- callback
def test_callback_in_tiny_fit_writes_csv(tmp_path):
    import csv

    import lightning as L
    from sklearn.datasets import load_digits

    from negspace.callbacks import LinearExplanations
    from negspace.modules import ClassifierModule

    digits = load_digits()
    x = torch.tensor(digits.images[:600], dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target[:600])
    train = torch.utils.data.TensorDataset(x[:400], y[:400])
    val = torch.utils.data.TensorDataset(x[400:], y[400:])
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 8, 3, padding=1))
    net.add_module("act", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(8, 10))
    module = ClassifierModule(model=net, num_classes=10, lr=1e-2)
    cb = LinearExplanations("model.act", concepts="digits", neurons=[0, 1, 2, 3], every_n_epochs=1, scaling="norm",
                            n_figures=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, default_root_dir=str(tmp_path), callbacks=[cb],
                        logger=L.pytorch.loggers.CSVLogger(str(tmp_path)), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=64, shuffle=True),
                    torch.utils.data.DataLoader(val, batch_size=64))
    assert cb.result is not None and [e.unit for e in cb.result] == [0, 1, 2, 3]
    assert cb.csv_path is not None and cb.csv_path.startswith(str(tmp_path)) and "epoch1" in cb.csv_path
    with open(cb.csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["unit"]) for r in rows] == [0, 1, 2, 3]
    assert {"concepts", "weights", "bias", "val_correlation", "test_correlation", "ablation"} <= set(rows[0])
    assert set(cb.scores) >= {"le/val_correlation", "le/test_correlation", "le/ablation", "le/length"}
    assert os.path.getsize(cb.figure_paths[0]) > 1000
    # the callback's explanations equal calling the functional core on the same data
    q = activation_summary(module, "model.act", x[400:])
    p, names = builtin_concepts("digits", [(x[400:], y[400:])])
    want = linear_explanation(q[:, :4], p, concept_names=names)
    assert [e.concepts for e in cb.result] == [e.concepts for e in want]
    # checkpoint state is primitives only and round-trips
    state = cb.state_dict()
    assert all(isinstance(v, (str, dict)) for v in state.values())
    other = LinearExplanations("model.act")
    other.load_state_dict(state)
    assert [e.to_dict() for e in other.result] == [e.to_dict() for e in cb.result] or all(
        math.isnan(a.val_correlation) for a in other.result)
    assert hook_count(module) == 0


def test_fit_at_is_a_deprecated_alias_of_every_n_epochs():
    from negspace.callbacks import LinearExplanations

    for old, new in (("train_end", None), ("validation_end", 1), (3, 3)):
        with pytest.warns(DeprecationWarning, match="every_n_epochs"):
            assert LinearExplanations("act", fit_at=old).every_n_epochs == new
    with pytest.raises(ValueError, match="fit_at"):
        LinearExplanations("act", fit_at="sometimes")
    with pytest.raises(TypeError, match="every_n_epochs"):
        LinearExplanations("act", fit_at=2, every_n_epochs=2)
    with pytest.raises(ValueError, match="concepts"):
        LinearExplanations("act", concepts="colours")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def _digits_module():
    import lightning as L
    from sklearn.datasets import load_digits

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = _Net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    d = load_digits()
    x = torch.tensor(d.images[:300], dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target[:300])
    return Module(), x, y


def test_callback_logs_to_callback_metrics_forward_and_no_files_without_logger(tmp_path):
    import lightning as L

    from negspace.callbacks import LinearExplanations
    from negspace.explain.le import explain_layer

    module, x, y = _digits_module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    cb = LinearExplanations("act", concepts="digits", neurons=[0, 1, 2], forward="net", scaling="norm", n_figures=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader, loader)
    assert {"le/val_correlation", "le/ablation"} <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics["le/val_correlation"]) == pytest.approx(cb.scores["le/val_correlation"])
    assert cb.csv_path is None and cb.figure_paths == [] and not list(tmp_path.rglob("*.csv"))
    # the callback is one core call
    res = explain_layer(module.net, "act", loader, concepts="digits", neurons=[0, 1, 2], scaling="norm")
    assert [e.to_dict() for e in res.explanations] == [e.to_dict() for e in cb.result]
    assert res.ablation == pytest.approx(cb.ablation_scores, nan_ok=True)
    assert hook_count(module) == 0


def test_callback_fails_on_the_first_unlabelled_batch():
    import lightning as L

    from negspace.callbacks import LinearExplanations

    module, x, y = _digits_module()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=50)  # images only
    cb = LinearExplanations("net.act", concepts="digits")
    trainer = L.Trainer(accelerator="cpu", max_epochs=5, callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="label"):
            trainer.fit(module, train, val)
    assert trainer.global_step == 0  # failed in the sanity check, before any training
    with pytest.raises(ValueError, match="nope"):
        L.Trainer(accelerator="cpu", max_epochs=1, callbacks=[LinearExplanations("nope")], logger=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(module, train, val)


# ---------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = '''
import json
import sys

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from negspace.callbacks import LinearExplanations


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))

    def validation_step(self, batch, batch_idx):
        return None


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    d = load_digits()
    x = torch.tensor(d.images[:400], dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target[:400])
    cb = LinearExplanations("act", concepts="digits", neurons=[0, 1, 2], every_n_epochs=1, scaling="norm")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out, callbacks=[cb])
    trainer.validate(Module(), DataLoader(TensorDataset(x, y), batch_size=50), verbose=False)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"exps": [e.to_dict() for e in cb.result], "ablation": cb.ablation_scores}, f)
    # tear gloo down before interpreter exit: otherwise its threads can abort the process at exit
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
'''


@pytest.mark.ddp
def test_callback_ddp_every_rank_holds_the_same_result(tmp_path):
    import socket
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "le_ddp_script.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1 or json.dumps(r0) == json.dumps(r1)
    # equal to one process on the gathered data (DistributedSampler: rank r holds samples r, r+2, ...)
    ns: dict = {"__name__": "le_ddp_reference"}
    exec(compile(DDP_SCRIPT, "le_ddp_script", "exec"), ns)
    module = ns["Module"]().eval()
    d = load_digits()
    x = torch.tensor(d.images[:400], dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target[:400])
    order = torch.cat([torch.arange(0, 400, 2), torch.arange(1, 400, 2)])
    q = activation_summary(module, "act", x[order])
    p, names = builtin_concepts("digits", [(x[order], y[order])])
    want = linear_explanation(q[:, :3], p, concept_names=names)
    assert [e["concepts"] for e in r0["exps"]] == [e.concepts for e in want]
    np.testing.assert_allclose([e["val_correlation"] for e in r0["exps"]], [e.val_correlation for e in want],
                               atol=1e-5)
