"""RRR and RRR-GradCAM: hand-computed values on set weights, and Trainer runs equal to hand-written loops."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from negspace.callbacks import AttributionPrior
from negspace.hooks import frozen_norm_stats
from negspace.priors import LOSSES, check_loss, gradcam_map, right_reason_prior, rrr_penalty

# ---------------------------------------------------------------------------------------- hand values


def _linear() -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(2))  # class k looks at pixel k
    return net.double()


def test_rrr_hand_value():
    # x = (ln 3, 0): p = (3/4, 1/4); ∇_x Σ_k log p_k = Σ_k W_k − 2 Σ_j p_j W_j = (1, 1) − (3/2, 1/2) = (−1/2, 1/2)
    net = _linear()
    x = torch.tensor([[[[math.log(3.0), 0.0]]]], dtype=torch.float64)
    per, grad = rrr_penalty(net, x, torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64))
    assert torch.allclose(grad.flatten(), torch.tensor([-0.5, 0.5], dtype=torch.float64))
    assert float(per.detach()) == pytest.approx(0.25)
    # a batch of two, the second sample unmasked: mean over B = 0.25·… with both pixels masked: 0.5 / 2
    xb = torch.cat([x, x])
    mb = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]], dtype=torch.float64)
    res = right_reason_prior(net, xb, torch.tensor([0, 1]), mb, loss="rrr")
    assert float(res.loss) == pytest.approx(0.25)
    assert res.per_sample.tolist() == pytest.approx([0.5, 0.0])
    assert res.index.tolist() == [0]


class _CamNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_gradcam_hand_value():
    # x = (1, 2): A_0 = (1, 2), A_1 = (2, 4); f_0 = mean A_0 → α = (1/2, 0), cam_0 = ReLU(α·A) = (1/2, 1);
    # f_1 = −mean A_1 → α = (0, −1/2), cam_1 = ReLU(−(1, 2)) = 0
    net = _CamNet().double()
    x = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    assert gradcam_map(net, "conv", x, torch.tensor([0])).flatten().tolist() == pytest.approx([0.5, 1.0])
    assert gradcam_map(net, "conv", x, torch.tensor([1])).flatten().tolist() == pytest.approx([0.0, 0.0])
    mask = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64)
    res = right_reason_prior(net, x, torch.tensor([0]), mask, loss="rrr_gradcam", layer="conv")
    assert float(res.loss) == pytest.approx(1.0)  # (1 · 1)²
    res.loss.backward()  # differentiable w.r.t. the weights: ∂/∂c_0 of (c_0 · V_00/2 · x_1)² = 2·1·(1/2·2) = 2
    assert float(net.conv.weight.grad[0].flatten()[0]) == pytest.approx(2.0)
    full = right_reason_prior(net, x, torch.tensor([0]), torch.ones_like(mask), loss="rrr_gradcam", layer="conv")
    assert float(full.loss) == pytest.approx(1.25)


def test_mask_pooled_to_cam_resolution():
    net = nn.Sequential(nn.Conv2d(1, 2, 2, stride=2, bias=False), nn.Flatten(), nn.LazyLinear(2))
    x = torch.rand(3, 1, 4, 4)
    net(x)
    res = right_reason_prior(net, x, torch.tensor([0, 1, 0]), torch.zeros(3, 1, 4, 4), loss="rrr_gradcam",
                             layer="0")
    assert float(res.loss) == 0.0 and res.index.numel() == 0


def test_bad_options():
    assert LOSSES == ("negspace", "rrr", "rrr_gradcam")
    with pytest.raises(ValueError, match="loss must be one of"):
        check_loss("rbr")
    with pytest.raises(ValueError, match="needs layer="):
        AttributionPrior(loss="rrr_gradcam")
    with pytest.raises(ValueError, match="loss must be one of"):
        AttributionPrior(loss="cdep")


# ------------------------------------------------------------------------------- Trainer == hand loop
B, N_BATCHES, HW = 4, 3, 6


class Net(nn.Module):
    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(F.avg_pool2d(F.softplus(self.bn(self.conv(x))), 2).flatten(1))


class Module(L.LightningModule):
    def __init__(self, bn: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net(bn)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class Data(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        n = B * N_BATCHES
        self.x = torch.rand(n, 3, HW, HW, generator=g)
        self.y = torch.arange(n) % 2
        self.mask = torch.zeros(n, 1, HW, HW)
        self.mask[self.y == 0, :, :3, :3] = 1.0
        self.x[self.y == 0, :, :3, :3] = 0.9

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "mask": self.mask[i]}


def _hand_penalty(net: nn.Module, x, y, m, loss: str) -> torch.Tensor:
    rows = (m.flatten(1).sum(1) > 0).nonzero().flatten()
    if loss == "rrr":
        xr = x.detach().requires_grad_(True)  # the whole batch (BatchNorm: full-batch statistics) ...
        (g,) = torch.autograd.grad(F.log_softmax(net(xr), 1).sum(), xr, create_graph=True)
        return ((m * g) ** 2).flatten(1).sum(1)[rows].sum() / x.shape[0]  # ... only masked rows count
    acts = []
    h = net.conv.register_forward_hook(lambda mod, a, out: acts.append(out))
    logits = net(x)
    h.remove()
    (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), acts[0], create_graph=True)
    cam = F.relu((g.mean((2, 3), keepdim=True) * acts[0]).sum(1))
    mp = F.adaptive_avg_pool2d(m, cam.shape[-2:])[:, 0]
    return ((mp * cam) ** 2).flatten(1).sum(1)[rows].sum() / x.shape[0]


@pytest.mark.parametrize(("loss", "bn"), [("rrr", False), ("rrr", True), ("rrr_gradcam", False)])
def test_trainer_equals_hand_loop(loss, bn):
    lam, data = 0.5, Data()
    module = Module(bn)
    cb = AttributionPrior(lam=lam, loss=loss, layer="net.conv" if loss == "rrr_gradcam" else None)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="32-true",
                        accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(data, batch_size=B, shuffle=False))
    assert cb.penalised_batches == N_BATCHES

    ref = Module(bn).net
    opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    for i in range(N_BATCHES):
        sl = slice(i * B, (i + 1) * B)
        x, y, m = data.x[sl], data.y[sl], data.mask[sl]
        opt.zero_grad()
        ce = F.cross_entropy(ref(x), y)
        with frozen_norm_stats(ref):
            pen = _hand_penalty(ref, x, y, m, loss)
        (ce + lam * pen).backward()
        opt.step()
    for (name, p), q in zip(module.net.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    if bn:
        assert torch.allclose(module.net.bn.running_mean, ref.bn.running_mean, atol=1e-6)
