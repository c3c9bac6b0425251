"""PURE (paper 004): references, circuits (fast path vs autograd), virtual neurons, router, DDP, callback."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from helpers import free_port, hook_count
from negspace.editing import VirtualNeuronRouter
from negspace.explain.pure import (
    VirtualNeuronSet,
    activation_vectors,
    attribution_heatmaps,
    circuits,
    cluster_distances,
    compare_clusterings,
    crop_boxes,
    crop_references,
    distance_correlation,
    embed,
    fit_virtual_neurons,
    gaussian_smooth,
    polysemanticity,
    reference_samples,
)
from negspace.hooks import capture

N_A, N_B, N_NOISE = 30, 30, 20


class TwoCircuitNet(nn.Module):
    """Input ``(B, 2, 8, 8)``: channel 0 carries feature A, channel 1 feature B.

    ``lower`` (1×1 conv + ReLU): channels 0, 1 read A, channels 2, 3 read B (disjoint circuits).
    ``upper`` (3×3 conv): neuron 0 sums all four lower channels (polysemantic: A *or* B),
    neuron 1 reads A only, neuron 2 B only. ``block`` = the same upper conv followed by ReLU and a 1×1
    identity conv (a non-fast-path layer for the autograd path).
    """

    def __init__(self) -> None:
        super().__init__()
        self.lower = nn.Conv2d(2, 4, 1)
        self.act = nn.ReLU()
        self.upper = nn.Conv2d(4, 3, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 1))
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.lower.weight.zero_()
            self.lower.bias.zero_()
            self.lower.weight[0, 0] = 1.0
            self.lower.weight[1, 0] = 0.5
            self.lower.weight[2, 1] = 0.5
            self.lower.weight[3, 1] = 1.0
            w = torch.zeros(3, 4, 3, 3)
            w[0, :, 1, 1] = 1.0
            w[0, :, 0, 1] = 0.2
            w[1, :2, 1, 1] = 1.0
            w[2, 2:, 1, 1] = 1.0
            self.upper.weight.copy_(w)
            self.upper.bias.fill_(0.1)
            self.block[0].weight.copy_(w)
            self.block[0].bias.fill_(0.1)
            self.block[2].weight.copy_(torch.eye(3)[:, :, None, None])
            self.block[2].bias.zero_()
            self.head.weight.copy_(torch.tensor([[1.0, 0.5, -0.5], [0.0, -1.0, 1.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.lower(x))
        u = self.upper(h) + self.block(h)
        return self.head(u.amax(dim=(2, 3)))


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A samples (blob in channel 0), B samples (blob in channel 1), weak noise; shuffled. Returns (x, kind)."""
    g = torch.Generator().manual_seed(seed)
    n = N_A + N_B + N_NOISE
    x = torch.rand(n, 2, 8, 8, generator=g) * 0.05
    kind = torch.tensor([0] * N_A + [1] * N_B + [2] * N_NOISE)
    for i in range(N_A + N_B):
        r, c = torch.randint(1, 6, (2,), generator=g).tolist()
        x[i, int(kind[i]), r : r + 2, c : c + 2] += 0.8 + 0.4 * torch.rand(2, 2, generator=g)
    perm = torch.randperm(n, generator=g)
    return x[perm], kind[perm]


@pytest.fixture(scope="module")
def toy() -> tuple[TwoCircuitNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, kind = make_data()
    return TwoCircuitNet().eval(), x, kind


def test_reference_samples_equal_naive_sort(toy):
    model, x, _ = toy
    refs = reference_samples(model, "upper", x, n_ref=7, batch_size=9)  # batches smaller than n_ref and ragged
    with torch.no_grad(), capture(model, "upper", detach=True) as cap:
        model(x)
    full = cap["upper"].amax(dim=(2, 3)).T  # (C, N)
    vals, idx = full.sort(dim=1, descending=True)
    torch.testing.assert_close(refs.values, vals[:, :7])
    assert torch.equal(refs.indices, idx[:, :7])
    assert refs.neurons.tolist() == [0, 1, 2]


@pytest.mark.parametrize("reduce", ["relu", "max", "mean", "sum", "center"])
def test_fast_path_equals_autograd_conv(reduce):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 3, stride=2, padding=2, dilation=2))
    x = torch.randn(4, 3, 9, 9)
    for neurons in (2, [0, 3, 5], torch.tensor([1, 4, 0, 5]), torch.tensor([[0, 1], [2, 3], [4, 5], [5, 5]])):
        fast = circuits(model, "2", "1", x, neurons, reduce=reduce, fast=True)
        slow = circuits(model, "2", "1", x, neurons, reduce=reduce, fast=False)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
        raw = circuits(model, "2", "1", x, neurons, reduce=reduce, fast=True, normalize=False)
        torch.testing.assert_close(raw.abs().sum(-1) > 0, fast.abs().sum(-1).round() == 1)


def test_fast_auto_falls_back_when_layer_is_not_applied_to_circuit_layer():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 2, 3))
    x = torch.randn(2, 3, 8, 8)
    auto = circuits(model, "2", "0", x, [0, 1], fast="auto")  # conv "2" reads relu("0"), not "0"
    torch.testing.assert_close(auto, circuits(model, "2", "0", x, [0, 1], fast=False))
    with pytest.raises(ValueError, match="applied directly"):
        circuits(model, "2", "0", x, 0, fast=True)


@pytest.mark.parametrize("tokens", [False, True])
def test_fast_path_equals_autograd_linear(tokens):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.randn(3, 5, 6) if tokens else torch.randn(3, 6)
    for reduce in ("relu", "max", "mean"):
        fast = circuits(model, "2", "1", x, [0, 2, 3], reduce=reduce, fast=True, normalize=False)
        slow = circuits(model, "2", "1", x, [0, 2, 3], reduce=reduce, fast=False, normalize=False)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
    if not tokens:  # hand-derived: contribution of input i to unit k is a_i W[k, i]
        with torch.no_grad():
            a = model[1](model[0](x))
        raw = circuits(model, "2", "1", x, 3, reduce="max", fast=True, normalize=False)
        torch.testing.assert_close(raw, a * model[2].weight[3])


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x))) + x


def test_batched_circuits_equal_per_neuron_loop_also_with_shortcut():
    """Many neurons per sample (replicated segment, or batched backwards when a shortcut bypasses the
    circuit layer) equal one autograd call per neuron."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Residual(), nn.ReLU())
    x = torch.randn(3, 3, 8, 8)
    for layer, circuit_layer in (("3", "1"), ("2", "2.relu")):
        many = circuits(model, layer, circuit_layer, x, [0, 1, 3], fast=False)
        loop = torch.stack([circuits(model, layer, circuit_layer, x, k, fast=False) for k in (0, 1, 3)], dim=1)
        torch.testing.assert_close(many, loop, atol=1e-6, rtol=1e-5)
        pairs = torch.tensor([[3, 0], [1, 1], [3, 3]])
        got = circuits(model, layer, circuit_layer, x, pairs, fast=False)
        torch.testing.assert_close(got, loop[torch.arange(3)[:, None], torch.tensor([[2, 0], [1, 1], [2, 2]])])
    # replicating the block input instead keeps one plain backward despite the shortcut
    loop = torch.stack([circuits(model, "2", "2.relu", x, k, fast=False) for k in (0, 1, 3)], dim=1)
    torch.testing.assert_close(circuits(model, "2", "2.relu", x, [0, 1, 3], fast=False, replicate_at="1"), loop)
    with pytest.raises(ValueError, match="replicate_at"):
        circuits(model, "2", "2.relu", x, [0, 1, 3], fast=False, replicate_at="2.conv1")


@pytest.mark.parametrize("fast", [True, False])
def test_clustering_separates_the_two_circuits(toy, fast):
    model, x, kind = toy
    layer = "upper" if fast else "block"
    vn = fit_virtual_neurons(model, layer, "act", x, neurons=[0], n_ref=N_A + N_B, k=2, fast=fast, batch_size=16,
                             reduce="max")  # the one-hot seed: pure circuits (the paper's ReLU seed: test_pure_fidelity)
    refs = vn.references.indices[0]
    assert set(kind[refs].tolist()) == {0, 1}  # all A and B samples, no noise sample
    labels = vn.labels[0]
    lab_a, lab_b = labels[kind[refs] == 0], labels[kind[refs] == 1]
    assert lab_a.unique().numel() == 1 and lab_b.unique().numel() == 1 and lab_a[0] != lab_b[0]
    # the centroids are the two circuits: A on lower channels 0, 1 and B on 2, 3
    cent_a = vn.centroids[0][lab_a[0]]
    assert float(cent_a[:2].sum()) > 0.95 and float(vn.centroids[0][lab_b[0]][2:].sum()) > 0.95
    # new samples are assigned to the nearest centroid (beyond the paper's code)
    x_new, kind_new = make_data(seed=5)
    keep = kind_new < 2
    assigned = vn.assign(model, x_new[keep], 0)
    expected = torch.where(kind_new[keep] == 0, lab_a[0], lab_b[0])
    assert torch.equal(assigned, expected)


def test_auto_k_by_silhouette(toy):
    model, x, _ = toy
    vn = fit_virtual_neurons(model, "upper", "act", x, neurons=[0, 1], n_ref=N_A + N_B, k="auto", k_range=(2, 4))
    assert 2 <= vn.n_virtual(0) <= 4 and vn.centroids[1].shape[1] == 4


@pytest.mark.parametrize("mode", ["sample", "position"])
def test_router_ablates_one_meaning_and_keeps_the_other(toy, mode):
    model, x, kind = toy
    vn = fit_virtual_neurons(model, "upper", "act", x, neurons=[0], n_ref=N_A + N_B, k=2)
    refs = vn.references.indices[0]
    j_a = int(vn.labels[0][kind[refs] == 0][0])
    with torch.no_grad(), capture(model, "upper", detach=True) as cap:
        model(x)
    before = cap["upper"].clone()
    router = VirtualNeuronRouter(vn, {0: {j_a: 0.0}}, mode=mode).apply(model)
    try:
        assert "active" in repr(router) and f"v{j_a}×0" in repr(router)
        with torch.no_grad(), capture(model, "upper", detach=True) as cap:
            model(x)
        after = cap["upper"]
    finally:
        router.remove()
    assert hook_count(model) == 0
    is_a, is_b = kind == 0, kind == 1
    peak_before, peak_after = before[:, 0].amax(dim=(1, 2)), after[:, 0].amax(dim=(1, 2))
    # A's response is gone (only noise-level activity remains), B's peak is untouched
    assert bool((peak_after[is_a] < 0.15 * peak_before[is_a]).all())
    torch.testing.assert_close(peak_after[is_b], peak_before[is_b])
    torch.testing.assert_close(after[:, 1:], before[:, 1:])  # other channels untouched
    if mode == "sample":
        torch.testing.assert_close(after[is_b], before[is_b])
        assert bool((after[is_a, 0] == 0).all())


def test_router_scale_and_state_round_trip(toy, tmp_path):
    model, x, _ = toy
    vn = fit_virtual_neurons(model, "upper", "act", x, neurons=[0, 2], n_ref=N_A + N_B, k=2)
    router = VirtualNeuronRouter(vn, {0: {1: 0.5}, 2: {0: 2.0}})
    with router.applied(model), torch.no_grad():
        y1 = model(x)
    assert hook_count(model) == 0
    path = tmp_path / "router.pt"
    torch.save(router.state_dict(), path)
    loaded = VirtualNeuronRouter.from_state_dict(torch.load(path, weights_only=True))
    with loaded.applied(model), torch.no_grad():
        y2 = model(x)
    torch.testing.assert_close(y1, y2)
    assert hook_count(model) == 0
    with torch.no_grad():
        assert not torch.allclose(model(x), y1)
    # VirtualNeuronSet artefact: safetensors round trip
    vn.save(tmp_path / "vn.safetensors")
    vn2 = VirtualNeuronSet.load(tmp_path / "vn.safetensors")
    assert vn2.neurons == vn.neurons and repr(vn2) == repr(vn)
    for n in vn.neurons:
        torch.testing.assert_close(vn2.centroids[n], vn.centroids[n])
    assert torch.equal(vn2.assign(model, x), vn.assign(model, x))


def test_errors(toy):
    model, x, _ = toy
    with pytest.raises(ValueError, match="larger than n_ref"):
        fit_virtual_neurons(model, "upper", "act", x, neurons=[0], n_ref=3, k=4)
    with pytest.raises(ValueError, match="larger than n_ref"):
        VirtualNeuronSet("upper", "act", k=5).fit(torch.rand(1, 3, 4), [0])
    with pytest.raises(ValueError, match="do not exist"):
        reference_samples(model, "upper", x, n_ref=5, neurons=[0, 7])
    with pytest.raises(ValueError, match="do not exist"):
        circuits(model, "upper", "act", x, 9)
    with pytest.raises(ValueError, match="does not exist"):
        reference_samples(model, "upperr", x, n_ref=5)
    with pytest.raises(ValueError, match="does not exist"):
        circuits(model, "upper", "nope", x, 0)
    with pytest.raises(ValueError, match="n_ref=500 is larger"):
        reference_samples(model, "upper", x, n_ref=500)
    with pytest.raises(ValueError, match="fast=True"):
        circuits(model, "block", "act", x, 0, fast=True)
    with pytest.raises(ValueError, match="reduce"):
        circuits(model, "upper", "act", x, 0, reduce="median")
    vn = fit_virtual_neurons(model, "block", "act", x, neurons=[0], n_ref=10, k=2)
    with pytest.raises(ValueError, match=r"nn\.Conv2d"):
        VirtualNeuronRouter(vn, {0: {0: 0.0}}).apply(model)
    assert hook_count(model) == 0
    vn = fit_virtual_neurons(model, "upper", "act", x, neurons=[0], n_ref=10, k=2)
    with pytest.raises(ValueError, match=r"virtual neurons 0\.\.1"):
        VirtualNeuronRouter(vn, {0: {3: 0.0}})
    with pytest.raises(ValueError, match="not fitted"):
        VirtualNeuronRouter(vn, {1: {0: 0.0}})


def test_tuple_batches_and_deprecated_names(toy):
    import warnings

    model, x, kind = toy
    loader = [(x[i : i + 16], kind[i : i + 16]) for i in range(0, len(x), 16)]
    vn = fit_virtual_neurons(model, "upper", "act", loader, neurons=[0], n_ref=N_A + N_B, k=2)
    ref = fit_virtual_neurons(model, "upper", "act", x, neurons=[0], n_ref=N_A + N_B, k=2)
    assert torch.equal(vn.labels[0], ref.labels[0]) and torch.equal(vn.references.indices, ref.references.indices)
    dicts = [{"x": b} for b, _ in loader]
    with pytest.warns(DeprecationWarning, match="image_key"):
        refs = reference_samples(model, "upper", dicts, n_ref=5, image_key="x")
    assert torch.equal(refs.indices, reference_samples(model, "upper", x, n_ref=5).indices)
    with pytest.raises(ValueError, match="batch_keys"):
        reference_samples(model, "upper", dicts, n_ref=5)
    import negspace.explain.pure as pure

    with pytest.warns(DeprecationWarning, match="VirtualNeuronSet"):
        assert pure.VirtualNeurons is VirtualNeuronSet
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        from negspace.editing.embeddings import embed as old_embed
        from negspace.editing.pure import MODES
        from negspace.editing.pure import VirtualNeuronRouter as OldRouter
        from negspace.editing.pure import circuits as old_circuits
    assert any(issubclass(m.category, DeprecationWarning) for m in w)
    assert OldRouter is VirtualNeuronRouter and old_circuits is circuits and old_embed is embed
    assert MODES == ("sample", "position")


# ------------------------------------------------------------------------------------------ evaluation
def test_cluster_distances_and_scores_hand_computed():
    e = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    inter, intra = cluster_distances(e, torch.tensor([0, 0, 1, 1]))
    assert inter == pytest.approx(10.0) and intra == pytest.approx(1.0)  # (10+11+9+10)/4 and 1
    assert polysemanticity(e) == pytest.approx(9.0)  # k-means on the embeddings finds the same 2 clusters
    a = torch.randn(12, 5, generator=torch.Generator().manual_seed(3))
    assert distance_correlation(a, 3 * a) == pytest.approx(1.0)
    b = torch.randn(12, 2, generator=torch.Generator().manual_seed(4))
    da, db = torch.pdist(a.double()), torch.pdist(b.double())
    expected = torch.corrcoef(torch.stack([da, db]))[0, 1]
    assert distance_correlation(a, b) == pytest.approx(float(expected), abs=1e-9)


def test_crop_boxes_are_squared_and_clamped():
    h = torch.zeros(3, 32, 32)
    h[0, 5, 10] = 1.0  # single pixel
    h[1, 10:13, 4:11] = 1.0  # 3 x 7 rectangle -> 7 x 7 square centred on it
    h[2, 0:2, 28:32] = 1.0  # 2 x 4 at the corner -> square pushed inside the image
    boxes = crop_boxes(h, kernel_size=1, threshold=0.5)
    assert boxes.tolist() == [[5, 10, 1], [8, 4, 7], [0, 28, 4]]
    assert crop_boxes(torch.zeros(1, 8, 6), kernel_size=3).tolist() == [[1, 0, 6]]  # no signal: centred square
    smooth = gaussian_smooth(h[:1], 5)
    assert smooth.shape == (1, 32, 32) and float(smooth.sum()) == pytest.approx(1.0, abs=1e-5)


def test_crop_references_follow_the_feature(toy):
    model, x, kind = toy
    i = int((kind == 0).nonzero()[0])
    crops = crop_references(model, "upper", x[i : i + 1], 1, kernel_size=1, threshold=0.05, size=16)
    assert crops.shape == (1, 2, 16, 16)
    heat = attribution_heatmaps(model, "upper", x[i : i + 1], 1)[0]
    t, left, side = crop_boxes(heat[None], kernel_size=1, threshold=0.05)[0].tolist()
    blob = (x[i, 0] > 0.5).nonzero()
    # the max of a 1x1-tap neuron is explained by one pixel of the A blob: the crop sits on the blob
    inside = (blob[:, 0] >= t) & (blob[:, 0] < t + side) & (blob[:, 1] >= left) & (blob[:, 1] < left + side)
    assert side < 8 and bool(inside.any())


class StubEncoder(nn.Module):
    """Anything with ``encode_image`` works: 4x4 average-pooled pixels as an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        e = F.adaptive_avg_pool2d(x, 4).flatten(1) * self.scale
        return F.normalize(e, dim=-1) if normalize else e


def test_embeddings_with_tiny_clip_and_stub(toy):
    torch.manual_seed(0)
    from negspace.models.clip import load_clip

    clip = load_clip("tiny")[0]
    emb = embed(torch.rand(4, 3, 20, 20), clip)  # resized to 32 and CLIP-normalised
    assert emb.shape == (4, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    model, x, _ = toy
    vn = fit_virtual_neurons(model, "upper", "act", x, neurons=[0], n_ref=N_A + N_B, k=2)
    idx = vn.references.indices[0]
    xs = x[idx]
    crops = crop_references(model, "upper", xs, 0)
    e = embed(crops, StubEncoder())
    res = compare_clusterings(
        e, circuits(model, "upper", "act", xs, 0), activation_vectors(model, "upper", xs), pure_labels=vn.labels[0]
    )
    assert set(res) == {"pure", "activation", "embedding", "corr_pure", "corr_activation"}
    # PURE clusters = A vs B; the stub embedding (which channel is bright) separates them the same way
    assert res["pure"]["score"] == pytest.approx(res["embedding"]["score"])
    assert res["pure"]["score"] > 0 and -1 <= res["corr_pure"] <= 1


# ------------------------------------------------------------------------------------------- callback
class ToyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TwoCircuitNet()
        self.val_peaks: list[torch.Tensor] = []
        self.image_key = "image"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _idx):
        x, y = (batch[self.image_key], batch["label"]) if isinstance(batch, dict) else batch
        self.trained_steps = getattr(self, "trained_steps", 0) + 1
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, _idx):
        with capture(self.net, "upper", detach=True) as cap:
            self(batch[self.image_key] if isinstance(batch, dict) else batch[0])
        self.val_peaks.append(cap["upper"][:, 0].amax(dim=(1, 2)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class DictData(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, kind: torch.Tensor) -> None:
        self.x, self.kind = x, kind

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": int(self.kind[i] % 2)}


class TupleData(DictData):
    def __getitem__(self, i: int) -> tuple:
        return self.x[i], int(self.kind[i] % 2)


class OtherKeyData(DictData):
    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": int(self.kind[i] % 2)}


def _trainer(tmp_path, cb, **kw) -> L.Trainer:
    opts = dict(max_epochs=1, limit_train_batches=1, accelerator="cpu", devices=1, callbacks=[cb],
                default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, logger=False, enable_checkpointing=False)
    return L.Trainer(**{**opts, **kw})


def test_callback_fits_logs_saves_figures_and_edits(toy, tmp_path):
    from torch.utils.data import DataLoader

    from negspace.callbacks import VirtualNeurons as VirtualNeuronsCallback

    _, x, kind = toy
    torch.manual_seed(0)
    module = ToyModule()
    val = DataLoader(DictData(x, kind), batch_size=16)
    probe = fit_virtual_neurons(module.net, "upper", "act", x, neurons=[0], n_ref=N_A + N_B, k=2)
    j_a = int(probe.labels[0][kind[probe.references.indices[0]] == 0][0])
    cb = VirtualNeuronsCallback(
        "net.upper", "net.act", [0], k=2, n_ref=N_A + N_B, edit={"neuron": 0, "virtual": j_a, "scale": 0.0},
        encoder=StubEncoder(), n_show=4, save_dir=str(tmp_path),
    )
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, accelerator="cpu", devices=1, callbacks=[cb], default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(DictData(x, kind), batch_size=16), val_dataloaders=val)
    assert isinstance(cb.result, VirtualNeuronSet) and cb.result.neurons == [0]
    assert cb.scores["pure/neuron_0/circuit_separation"] > 0 and "pure/neuron_0/clip_pure" in cb.scores
    assert len(cb.figure_paths) == 1 and os.path.getsize(cb.figure_paths[0]) > 1000
    assert hook_count(module) == 0
    module.val_peaks.clear()
    trainer.validate(module, dataloaders=val, verbose=False)  # the router is active during validation only
    assert hook_count(module) == 0
    peaks = torch.cat(module.val_peaks)
    assert bool((peaks[kind == 0] == 0).all()) and bool((peaks[kind == 1] > 0.5).all())
    state = cb.state_dict()
    path = tmp_path / "cb.pt"
    torch.save(state, path)
    edit = {"neuron": 0, "virtual": j_a, "scale": 0.0}
    cb2 = VirtualNeuronsCallback("net.upper", "net.act", [0], k=2, n_ref=N_A + N_B, edit=edit)
    cb2.load_state_dict(torch.load(path, weights_only=True))
    assert cb2.router is not None and repr(cb2.router) == repr(cb.router)
    torch.testing.assert_close(cb2.result.centroids[0], cb.result.centroids[0])
    # a checkpoint holding another edit is never adopted silently (issue 14): an error, or an explicit adoption
    other = VirtualNeuronsCallback("net.upper", "net.act", [0], k=2, n_ref=N_A + N_B,
                                   edit={"neuron": 0, "virtual": 1 - j_a, "scale": 0.0})
    with pytest.raises(ValueError, match=r"checkpoint holds the edit VirtualNeuronRouter.*adopt_checkpoint=True"):
        other.load_state_dict(torch.load(path, weights_only=True))
    unedited = VirtualNeuronsCallback("net.upper", "net.act", [0], k=2, n_ref=N_A + N_B)
    with pytest.raises(ValueError, match=r"configured with edit=None"):
        unedited.load_state_dict(torch.load(path, weights_only=True))
    adopt = VirtualNeuronsCallback("net.upper", "net.act", [0], k=2, n_ref=N_A + N_B, adopt_checkpoint=True)
    adopt.load_state_dict(torch.load(path, weights_only=True))
    assert repr(adopt.router) == repr(cb.router)


def test_callback_every_n_epochs_routes_later_validation(toy, tmp_path):
    from torch.utils.data import DataLoader

    from negspace.callbacks import VirtualNeurons as VirtualNeuronsCallback

    _, x, kind = toy
    module = ToyModule()
    cb = VirtualNeuronsCallback("net.upper", "net.act", 0, k=2, n_ref=N_A + N_B, every_n_epochs=1, figures=False,
                                edit={"neuron": 0, "virtual": 1, "scale": 0.5})
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=1, accelerator="cpu", devices=1, callbacks=[cb], default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False,
    )
    loader = DataLoader(DictData(x, kind), batch_size=32)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert cb.result is not None and cb.figure_paths == [] and hook_count(module) == 0
    first, second = torch.cat(module.val_peaks[:3]), torch.cat(module.val_peaks[3:])
    refs = cb.result.references.indices[0]
    kind_v1 = int(kind[refs][cb.result.labels[0] == 1][0])  # the meaning of virtual neuron 1
    # epoch 0: no edit yet; epoch 1: virtual neuron 1's samples at half strength, the others untouched
    torch.testing.assert_close(second[kind == kind_v1], 0.5 * first[kind == kind_v1])
    torch.testing.assert_close(second[kind == 1 - kind_v1], first[kind == 1 - kind_v1])


def test_callback_reads_tuple_batches_and_logs_to_callback_metrics(toy, tmp_path):
    from torch.utils.data import DataLoader

    from negspace.callbacks import VirtualNeurons as VirtualNeuronsCallback

    _, x, kind = toy
    cb = VirtualNeuronsCallback("net.upper", "net.act", 0, k=2, n_ref=N_A + N_B, encoder=StubEncoder(), n_show=2)
    loader = DataLoader(TupleData(x, kind), batch_size=32)
    trainer = _trainer(tmp_path, cb)
    trainer.fit(ToyModule(), train_dataloaders=loader, val_dataloaders=loader)
    assert cb.result is not None and cb.result.neurons == [0]
    assert cb.figure_paths == []  # logger=False and no save_dir: nothing is written
    for name in ("circuit_separation", "clip_pure", "corr_pure"):
        key = f"pure/neuron_0/{name}"
        assert float(trainer.callback_metrics[key]) == pytest.approx(cb.scores[key], nan_ok=True)


def test_callback_bad_batch_layout_fails_on_the_first_batch(toy, tmp_path):
    from torch.utils.data import DataLoader

    from negspace.callbacks import VirtualNeurons as VirtualNeuronsCallback

    _, x, kind = toy
    loader = DataLoader(OtherKeyData(x, kind), batch_size=32)
    module = ToyModule()
    cb = VirtualNeuronsCallback("net.upper", "net.act", 0, k=2, n_ref=N_A + N_B, figures=False)
    with pytest.raises(ValueError, match="batch_keys"):  # in the sanity check, before any training step
        _trainer(tmp_path, cb, num_sanity_val_steps=1).fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert cb.result is None and getattr(module, "trained_steps", 0) == 0
    with pytest.raises(ValueError, match="does not exist"):  # a layer typo fails at setup
        bad = VirtualNeuronsCallback("net.uper", "net.act", 0, k=2, n_ref=N_A + N_B, figures=False)
        _trainer(tmp_path, bad).fit(module, train_dataloaders=loader, val_dataloaders=loader)
    cb = VirtualNeuronsCallback("net.upper", "net.act", 0, k=2, n_ref=N_A + N_B, figures=False,
                                batch_keys={"image": "x"}, every_n_epochs=1)
    module.image_key = "x"
    _trainer(tmp_path, cb).validate(module, dataloaders=loader, verbose=False)
    assert cb.result is not None and cb.result.neurons == [0]


def test_callback_deprecated_keywords():
    from negspace.callbacks import VirtualNeurons as VirtualNeuronsCallback

    with pytest.warns(DeprecationWarning, match="fit_at"):
        cb = VirtualNeuronsCallback("upper", "act", 0, fit_at=2)
    assert cb.every_n_epochs == 3
    with pytest.warns(DeprecationWarning, match="fit_at"):
        assert VirtualNeuronsCallback("upper", "act", 0, fit_at="train_end").every_n_epochs is None
    with pytest.warns(DeprecationWarning, match="image_key"):
        cb = VirtualNeuronsCallback("upper", "act", 0, image_key="x")
    assert cb.batch_keys.keys == {"image": "x"}
    with pytest.raises(TypeError, match="not both"):
        VirtualNeuronsCallback("upper", "act", 0, fit_at=1, every_n_epochs=2)
    with pytest.raises(ValueError, match="fit_at"), pytest.warns(DeprecationWarning):
        VirtualNeuronsCallback("upper", "act", 0, fit_at="later")


# ------------------------------------------------------------------------------------------------- DDP

def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TwoCircuitNet().eval()
        x, _ = make_data()
        shard = x[rank::world]  # a DistributedSampler-like split: each rank sees different samples
        vn = fit_virtual_neurons(model, "upper", "act", shard, neurons=[0, 2], n_ref=N_A + N_B, k=2, batch_size=16)
        torch.save(
            {"centroids": {str(k): v for k, v in vn.centroids.items()}, "values": vn.references.values},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_every_rank_holds_the_same_centroids(toy, tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in ("0", "2"):
        assert torch.equal(r0["centroids"][k], r1["centroids"][k])
    # the merged references are the global top-n_ref (same as on the full data in one process)
    model, x, _ = toy
    single = reference_samples(model, "upper", x, n_ref=N_A + N_B, neurons=[0, 2])
    torch.testing.assert_close(r0["values"], single.values)


class _SaveCentroids(L.Callback):
    """Writes each rank's fitted centroids (after the VirtualNeurons callback fitted them)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir  # the callbacks are copies inside the spawned processes: look them up by type

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cb = next(c for c in trainer.callbacks if type(c).__name__ == "VirtualNeurons")
        torch.save({str(k): v for k, v in cb.result.centroids.items()},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


@pytest.mark.ddp
def test_callback_under_lightning_ddp_spawn(toy, tmp_path):
    from torch.utils.data import DataLoader

    from negspace.callbacks import VirtualNeurons as VirtualNeuronsCallback

    _, x, kind = toy
    cb = VirtualNeuronsCallback("net.upper", "net.act", [0, 2], k=2, n_ref=N_A + N_B, figures=False)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=1, accelerator="cpu", devices=2, strategy="ddp_spawn",
        callbacks=[cb, _SaveCentroids(str(tmp_path))], default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
    )
    loader = DataLoader(DictData(x, kind), batch_size=16)
    trainer.fit(ToyModule(), train_dataloaders=loader, val_dataloaders=loader)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(r0) == {"0", "2"} and all(torch.equal(r0[k], r1[k]) for k in r0)
