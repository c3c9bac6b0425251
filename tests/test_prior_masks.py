"""``AttributionPrior(mask=...)``: masks from a batch key or computed per batch by a mask source.

Oracles: a prior fed by a detector trains exactly like one fed the same masks in the batch; the source runs
once per batch, without grad and in float32 under bf16-mixed; a source that needs the model is bound to a
frozen copy at fit start, checkpointed, and a checkpoint from another mask configuration is refused.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from negspace.callbacks import AttributionPrior
from negspace.masks import ConceptMask, Detector

N, HW = 16, 8


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, 3, HW, HW, generator=g) * 0.5
    y = torch.tensor([0, 1] * (N // 2))
    mask = torch.zeros(N, 1, HW, HW)
    mask[y == 0, :, :3, :3] = 1.0
    x[y == 0, :, :3, :3] = 1.0  # a bright square on class 0: the "sticker"
    return x, y, mask


def bright_square(images: torch.Tensor) -> torch.Tensor:
    """A detector that finds the sticker from the pixels alone (all channels at 1)."""
    return (images.amin(1, keepdim=True) >= 0.99).float()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0] if isinstance(batch, list | tuple) else batch["image"]),
                               batch[1] if isinstance(batch, list | tuple) else batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(cb: AttributionPrior, loader: DataLoader, **kw) -> Module:
    module = Module()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **kw)
    trainer.fit(module, loader)
    return module


def _same(a: nn.Module, b: nn.Module) -> None:
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=lambda m, k=k: f"{k}: {m}")


def test_detector_trains_like_batch_masks():
    x, y, mask = _data()
    assert torch.equal(bright_square(x), mask)  # the detector recovers the true masks exactly
    ref = _fit(AttributionPrior(lam=5.0), DataLoader(TensorDataset(x, y, mask), batch_size=8))
    got = _fit(AttributionPrior(lam=5.0, mask=bright_square), DataLoader(TensorDataset(x, y), batch_size=8))
    plain = _fit(AttributionPrior(lam=0.0), DataLoader(TensorDataset(x, y, mask), batch_size=8))
    _same(got, ref)
    with pytest.raises(AssertionError):
        _same(got, plain)  # the prior did act


class DictData(Dataset):
    def __init__(self) -> None:
        self.x, self.y, self.m = _data()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "sticker": self.m[i]}


def test_mask_names_a_batch_key():
    x, y, mask = _data()
    ref = _fit(AttributionPrior(lam=5.0), DataLoader(TensorDataset(x, y, mask), batch_size=8))
    got = _fit(AttributionPrior(lam=5.0, mask="sticker"), DataLoader(DictData(), batch_size=8))
    _same(got, ref)
    with pytest.raises(ValueError, match="batch_keys is a callable"):
        AttributionPrior(mask="sticker", batch_keys=lambda b: b)


def test_source_runs_once_per_batch_without_grad_in_float32():
    x, y, _ = _data()
    seen: list[tuple[bool, torch.dtype]] = []

    class Probe(Detector):
        def compute(self, images):
            seen.append((torch.is_grad_enabled(), F.conv2d(images, torch.ones(1, 3, 1, 1)).dtype))  # bf16 if autocast
            return super().compute(images)

    cb = AttributionPrior(lam=5.0, mask=Probe(bright_square), norm_mode="shared")
    _fit(cb, DataLoader(TensorDataset(x, y), batch_size=8), precision="bf16-mixed")
    assert len(seen) == 4  # 2 epochs × 2 batches: once per batch although the prior reads the mask twice
    assert all(not grad and dtype == torch.float32 for grad, dtype in seen)


def test_bad_mask_argument():
    with pytest.raises(TypeError, match="MaskSource"):
        AttributionPrior(mask=3.5)


def _concept(**kw) -> ConceptMask:
    d = torch.tensor([1.0, 0.0, 0.0, 0.0])
    return ConceptMask("net.conv", d, threshold=0.1, dilate=0, **kw)


def test_concept_mask_bound_to_a_frozen_copy_at_fit_start_and_checkpointed(tmp_path):
    x, y, _ = _data()
    source = _concept()
    assert source.needs_model
    cb = AttributionPrior(lam=5.0, mask=source)
    module = Module()
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert not source.needs_model
    ref = source.model
    assert ref is not module and not any(p.requires_grad for p in ref.parameters())
    torch.testing.assert_close(ref.net.conv.weight, before["conv.weight"])  # frozen: the weights from before fit
    assert not torch.allclose(module.net.conv.weight, before["conv.weight"])  # while the model trained
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("AttributionPrior"))
    assert saved["mask_source"]["type"] == "ConceptMask"

    # resume with the same configuration: the reference is the saved one, not the resumed model
    resumed = _concept()
    cb2 = AttributionPrior(lam=5.0, mask=resumed)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=[cb2], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path / "b")
    trainer.fit(Module(), DataLoader(TensorDataset(x, y), batch_size=8), ckpt_path=ckpt)
    torch.testing.assert_close(resumed.model.net.conv.weight, before["conv.weight"])

    # another mask configuration: refused with a clear error
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=[AttributionPrior(lam=5.0)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="mask source ConceptMask"):
        trainer.fit(Module(), DataLoader(TensorDataset(x, y, _data()[2]), batch_size=8), ckpt_path=ckpt)


def test_concept_mask_layer_checked_at_setup():
    x, y, _ = _data()
    cb = AttributionPrior(lam=5.0, mask=ConceptMask("net.nope", torch.ones(4), threshold=0.1))
    with pytest.raises(ValueError, match=r"net\.conv"):  # the error lists the valid names
        _fit(cb, DataLoader(TensorDataset(x, y), batch_size=8))
    cb = AttributionPrior(lam=5.0, mask=_concept(), forward=lambda m, x: m(x))
    with pytest.raises(ValueError, match="forward= is a callable"):
        _fit(cb, DataLoader(TensorDataset(x, y), batch_size=8))
