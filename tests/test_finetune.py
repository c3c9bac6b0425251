"""Fine-tuning: input normalisation (data modules + CLI), ClassifierModule's optimisers, parameter groups,
schedules, freezing (own and Lightning's BackboneFinetuning), label smoothing, local weights."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from negspace.cli import fill_normalize, run_cli
from negspace.data_modules import (
    GreenPixelDataModule,
    ImageDataModule,
    SpuriousPatchDataModule,
    SyntheticLesionDataModule,
    denormalize,
    resolve_normalize,
)
from negspace.data_modules.folder import DictTensorDataset
from negspace.data_modules.patches import default_dilation, dilate_mask, draw_patch, patch_rng
from negspace.modules import ClassifierModule
from negspace.modules.finetune import backbone_modules, find_head, load_weights, warmup_cosine_factor

MEAN, STD = (0.2, 0.5, 0.7), (0.25, 0.5, 0.125)
FAST = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3, padding=1), bn=nn.BatchNorm2d(4), relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(), fc=nn.Linear(4, 2),
    ))


def _dm(n: int = 32, **kw) -> ImageDataModule:
    g = torch.Generator().manual_seed(0)
    ds = DictTensorDataset(torch.rand(n, 3, 8, 8, generator=g), torch.arange(n) % 2)
    return ImageDataModule(ds, ds, batch_size=8, augment=False, **kw)


# ---------------------------------------------------------------- normalisation
def test_resolve_normalize_values_and_errors():
    assert resolve_normalize(None) is None
    assert resolve_normalize("imagenet") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert resolve_normalize((0.5, 0.25)) == ((0.5,), (0.25,))
    assert resolve_normalize([[0, 1, 2], [1, 1, 1]]) == ((0.0, 1.0, 2.0), (1.0, 1.0, 1.0))
    for bad in ("cifar", (0.5,), ([0.5, 0.5], [1.0, 1.0, 1.0]), (0.5, 0.0), ("a", "b")):
        with pytest.raises(ValueError, match="normalize"):
            resolve_normalize(bad)
    with pytest.raises(ValueError, match="normalize"):
        SyntheticLesionDataModule(n_train=8, n_val=4, n_test=0, normalize="nope")
    dm = GreenPixelDataModule(n_train=8, n_val=8, n_test=8, batch_size=8, normalize=((0.5, 0.5), (1.0, 1.0)))
    with pytest.raises(ValueError, match="3 channels"):  # 2 channel values for RGB images
        next(iter(dm.train_dataloader()))


def test_model_with_non_default_stats_gives_normalised_batches_and_patches_in_pixel_space():
    import timm

    net = timm.create_model("test_byobnet", num_classes=2, pretrained_cfg_overlay={"mean": MEAN, "std": STD})
    module = ClassifierModule(model=net)
    dm = SyntheticLesionDataModule(n_train=32, n_val=16, n_test=0, image_size=32, batch_size=32, augment=False)
    assert fill_normalize(module, dm) == (MEAN, STD) and dm.normalization == (MEAN, STD)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()[0]))  # train_bias: every benign image carries a patch
    raw = torch.stack([dm.val_sets[0][i]["image"] for i in range(len(batch["label"]))])
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(batch["image"], (raw - m) / s)
    torch.testing.assert_close(denormalize(batch["image"], (MEAN, STD)), raw)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}  # masks are never normalised
    # the patch pixels, de-normalised, equal the configured patch drawn in [0, 1] pixel space
    base = dm.val_dataset
    checked = 0
    for i, present in enumerate(batch["group"] % 2):
        if not present:
            continue
        idx = int(batch["index"][i])
        img, pmask = draw_patch(base[idx]["image"], "colorful", round(0.2 * 32), patch_rng(0, idx), "border")
        inside = pmask[0].bool()
        torch.testing.assert_close(denormalize(batch["image"][i], (MEAN, STD))[:, inside], img[:, inside])
        torch.testing.assert_close(batch["mask"][i], dilate_mask(pmask, default_dilation(32)))
        checked += 1
    assert checked > 0
    # an explicit setting wins over the model's statistics
    dm2 = SyntheticLesionDataModule(n_train=8, n_val=4, n_test=0, normalize="imagenet")
    assert fill_normalize(module, dm2) is None and dm2.normalize == "imagenet"


def test_every_data_module_takes_normalize():
    base = TensorDataset(torch.rand(20, 3, 8, 8), torch.arange(20) % 2)
    sp = SpuriousPatchDataModule(base, batch_size=4, augment=False, normalize=(0.5, 0.5))
    sp.setup("fit")
    assert float(next(iter(sp.train_dataloader()))["image"].min()) < 0
    import pickle

    wrapped = sp.train_dataloader().dataset  # picklable for DataLoader workers, forwards targets
    assert pickle.loads(pickle.dumps(wrapped)).targets == sp.train_set.targets
    for dm in (_dm(normalize=(0.5, 0.5)), GreenPixelDataModule(8, 8, 8, batch_size=8, normalize=(0.5, 0.5))):
        dm.setup("fit")
        x = next(iter(dm.train_dataloader()))["image"]
        assert float(x.min()) >= -1.0 and float(x.min()) < 0


def test_cli_fills_normalize_from_the_backbone(tmp_path):
    common = ["fit", "--data", "negspace.data_modules.SyntheticLesionDataModule", "--data.n_train", "16",
              "--data.n_val", "8", "--data.n_test", "0", "--data.image_size", "32", "--data.batch_size", "8",
              "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(tmp_path)]
    cli = run_cli([*common, "--model.model", "timm:test_convnext"])
    assert cli.datamodule.normalization == ((0.5,) * 3, (0.5,) * 3)
    cli = run_cli([*common, "--model.model", "timm:test_byobnet"])  # another backbone, other statistics
    assert cli.datamodule.normalization == resolve_normalize("imagenet")
    cli = run_cli([*common, "--model.model", "timm:test_byobnet", "--data.normalize", "[0.0, 1.0]"])
    assert cli.datamodule.normalization == ((0.0,), (1.0,))  # the recipe wins
    cli = run_cli([*common, "--model.model", "xsmallcnn"])
    assert cli.datamodule.normalization is None  # negspace models see [0, 1] pixels


# ---------------------------------------------------------------- ClassifierModule fine-tuning
def test_optimizers_and_backbone_multiplier():
    for name, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        m = ClassifierModule(model=_net(), optimizer=name, lr=0.1, backbone_lr_mult=0.01)
        opt = m.configure_optimizers()
        assert isinstance(opt, cls)
        names = [g["name"] for g in opt.param_groups]
        assert names == ["head", "backbone"]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.001])
        assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in m.model.fc.parameters()}
    assert ClassifierModule(model=_net(), optimizer="sgd", momentum=0.5).configure_optimizers().defaults["momentum"] == 0.5


def test_head_detection():
    import timm

    assert find_head(_net()) == ["fc"]
    assert find_head(timm.create_model("test_convnext", num_classes=2)) == ["head.fc"]
    from negspace.models.xmodels import XSmallCNN

    assert find_head(XSmallCNN()) == ["classifier"]
    vit = timm.create_model("test_vit", num_classes=2)
    back = backbone_modules(vit, find_head(vit))
    ids = {id(p) for p in back.parameters()}
    assert id(vit.cls_token) in ids and not ids & {id(p) for p in vit.head.parameters()}
    assert len(ids) + len(list(vit.head.parameters())) == len(list(vit.parameters()))
    with pytest.raises(ValueError, match="head"):
        ClassifierModule(model=nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), backbone_lr_mult=0.1)


def test_warmup_cosine_schedule_per_step():
    assert warmup_cosine_factor(0, 4, 20, True) == pytest.approx(0.25)
    assert warmup_cosine_factor(3, 4, 20, True) == pytest.approx(1.0)
    assert warmup_cosine_factor(12, 4, 20, True) == pytest.approx(0.5)
    assert warmup_cosine_factor(20, 4, 20, True, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(12, 4, 20, False) == 1.0
    m = ClassifierModule(model=_net(), lr=0.1, schedule="cosine", warmup_epochs=1, optimizer="sgd")
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    L.Trainer(max_epochs=3, callbacks=[Record()], limit_val_batches=0, **FAST).fit(m, datamodule=_dm())
    total, warmup = 12, 4  # 4 batches per epoch
    expected = [0.1 * warmup_cosine_factor(s, warmup, total, True) for s in range(total)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(0.025) and lrs[4] == pytest.approx(0.1) and lrs[8] == pytest.approx(0.05)


def test_cli_lr_scheduler_section_keeps_parameter_groups(tmp_path):
    cli = run_cli([
        "fit", "--model.model", "xsmallcnn", "--model.backbone_lr_mult", "0.5", "--model.lr", "0.2",
        "--data", "negspace.data_modules.SyntheticLesionDataModule", "--data.n_train", "16", "--data.n_val", "8",
        "--data.n_test", "0", "--data.image_size", "16", "--data.batch_size", "8",
        "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.4",
        "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1",
        "--lr_scheduler.gamma", "0.5",
        "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path),
    ])
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD)
    assert [g["name"] for g in opt.param_groups] == ["head", "backbone"]
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.2])  # optimizer lr × multiplier
    assert isinstance(cli.trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.StepLR)


def _snapshot(m: ClassifierModule) -> tuple[torch.Tensor, torch.Tensor]:
    return m.model.conv.weight.detach().clone(), m.model.fc.weight.detach().clone()


def test_freeze_backbone_epochs():
    m = ClassifierModule(model=_net(), lr=0.05, freeze_backbone_epochs=1)
    conv0, fc0 = _snapshot(m)
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, **FAST)
    trainer.fit(m, datamodule=_dm())
    conv1, fc1 = _snapshot(m)
    assert torch.equal(conv0, conv1) and not torch.equal(fc0, fc1)
    assert all(p.requires_grad for p in m.parameters())  # restored after fit
    m2 = ClassifierModule(model=_net(), lr=0.05, freeze_backbone_epochs=1)
    L.Trainer(max_epochs=2, limit_val_batches=0, **FAST).fit(m2, datamodule=_dm())
    assert not torch.equal(conv0, _snapshot(m2)[0]) and all(p.requires_grad for p in m2.parameters())


def test_lightning_backbone_finetuning_callback():
    from lightning.pytorch.callbacks import BackboneFinetuning

    m = ClassifierModule(model=_net(), lr=0.05)
    seen = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append((len(trainer.optimizers[0].param_groups), pl_module.model.conv.weight.detach().clone()))

    conv0 = m.model.conv.weight.detach().clone()
    cb = BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    L.Trainer(max_epochs=2, limit_val_batches=0, callbacks=[cb, Record()], **FAST).fit(m, datamodule=_dm())
    # epoch 0: head (+ BatchNorm, train_bn=True) only; epoch 1: the callback adds the backbone group and trains it
    assert torch.equal(seen[0][1], conv0) and not torch.equal(seen[1][1], conv0) and seen[1][0] == seen[0][0] + 1
    assert sum(p.numel() for p in m.backbone.parameters()) + sum(p.numel() for p in m.model.fc.parameters()) == sum(
        p.numel() for p in m.model.parameters())
    assert not any(k.startswith("backbone") for k in m.state_dict())  # no duplicated checkpoint keys
    with pytest.raises(ValueError, match="either"):
        m = ClassifierModule(model=_net(), freeze_backbone_epochs=1)
        L.Trainer(max_epochs=1, limit_val_batches=0, callbacks=[BackboneFinetuning(1)], **FAST).fit(m, datamodule=_dm())


def test_label_smoothing_matches_hand_formula():
    logits, y = torch.tensor([[2.0, -1.0]]), torch.tensor([0])
    m = ClassifierModule(model=nn.Identity(), loss="ce", label_smoothing=0.2)
    logp = torch.log_softmax(logits, 1)[0]
    assert float(m.compute_loss(logits, y)) == pytest.approx(float(-(0.9 * logp[0] + 0.1 * logp[1])), rel=1e-6)
    m = ClassifierModule(model=nn.Identity(), loss="bce", label_smoothing=0.2)
    sig = torch.sigmoid(logits[0])
    hand = -(0.9 * math.log(sig[0]) + 0.1 * math.log(1 - sig[0]) + 0.1 * math.log(sig[1]) + 0.9 * math.log(1 - sig[1])) / 2
    assert float(m.compute_loss(logits, y)) == pytest.approx(hand, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassifierModule(model=nn.Identity(), label_smoothing=1.0)


def test_weights_files_load_with_clear_errors(tmp_path: Path):
    from safetensors.torch import save_file

    src = _net()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, tmp_path / "w.ckpt")
    for f in ("w.safetensors", "w.ckpt"):
        m = ClassifierModule(model=_net(), weights=str(tmp_path / f))
        assert all(torch.equal(a, b) for a, b in zip(m.model.state_dict().values(), src.state_dict().values()))
    other = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3, padding=1), fc=nn.Linear(4, 5)))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"missing keys \['bn.weight'.*shape-mismatched keys \['fc.weight"):
        ClassifierModule(model=_net(), weights=str(tmp_path / "other.pt"))
    torch.save({"conv.weight": torch.zeros(1), "extra.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        load_weights(_net(), tmp_path / "bad.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module: refused by weights_only=True
    with pytest.raises(ValueError, match="weights_only"):
        ClassifierModule(model=_net(), weights=str(tmp_path / "module.pt"))
    with pytest.raises(ValueError, match="not found"):
        ClassifierModule(model=_net(), weights=str(tmp_path / "nope.pt"))
    # a checkpoint trained on 5 classes: load the backbone, keep the new 2-class head
    src5 = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3, padding=1), bn=nn.BatchNorm2d(4), relu=nn.ReLU(),
                                     pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4, 5)))
    torch.save(src5.state_dict(), tmp_path / "five.pt")
    m = ClassifierModule(model=_net(), weights=str(tmp_path / "five.pt"), weights_head=False)
    assert torch.equal(m.model.conv.weight, src5.conv.weight) and m.model.fc.weight.shape == (2, 4)
    with pytest.warns(DeprecationWarning, match="weights"):
        ClassifierModule(model=_net(), checkpoint=str(tmp_path / "w.safetensors"))


def test_timm_pretrained_file_overlay(tmp_path: Path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    pre = timm.create_model("test_byobnet", num_classes=7)  # a "pretrained" net with another head
    save_file(pre.state_dict(), str(tmp_path / "pre.safetensors"))
    m = ClassifierModule(model="timm:test_byobnet", num_classes=2, pretrained_file=str(tmp_path / "pre.safetensors"))
    head = find_head(m.model)[0]
    own, ref = m.model.state_dict(), pre.state_dict()
    body = [k for k in ref if not k.startswith(head)]
    assert body and all(torch.equal(own[k], ref[k]) for k in body)
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(ValueError, match="timm"):
        ClassifierModule(model="xsmallcnn", pretrained_file=str(tmp_path / "pre.safetensors"))


def test_finetune_demo_smoke(tmp_path: Path):
    """The whole demo path on a tiny budget with a negspace backbone (weights= with a fresh head)."""
    import json

    from negspace.demo import run_finetune_demo

    s = run_finetune_demo(quick=True, out=str(tmp_path), progress=False, model="xsmallcnn", n_pretrain=64,
                          pretrain_epochs=1, n_train=64, n_val=32, n_test=32, epochs=2, lambdas=[10.0], image_size=16)
    assert set(s["by_setting"]) == {"unbiased", "none", "presence", "presence_absence"}
    assert (tmp_path / "pretrained_seed0.safetensors").is_file() and "Pattern check" in (tmp_path / "table.md").read_text()
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 4
