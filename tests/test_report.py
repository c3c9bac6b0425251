"""BiasedSplitReport inside Trainer.validate/test: values against a naive loop with Captum as the oracle."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch
from captum.attr import InputXGradient
from torch import nn
from torch.utils.data import DataLoader

from negspace.callbacks import BiasedSplitReport
from negspace.metrics.report import format_table
from negspace.modules import ClassifierModule

SPLITS = ("train_bias", "inverse_bias", "no_bias")


def _split_data(seed: int, patched_class: int | None, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.arange(n) % 2
    mask = torch.zeros(n, 1, 8, 8)
    if patched_class is not None:
        sel = y == patched_class
        mask[sel, :, :3, :3] = 1.0
        x[sel, :, :3, :3] = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    return [
        {"image": x[i], "label": int(y[i]), "mask": mask[i], "group": int(2 * y[i] + (mask[i].sum() > 0))}
        for i in range(n)
    ]


class _Data(L.LightningDataModule):
    split_names = SPLITS

    def __init__(self):
        super().__init__()
        self.splits = [_split_data(1, 0), _split_data(2, 1), _split_data(3, None)]

    def train_dataloader(self):
        return DataLoader(self.splits[0], batch_size=4)

    def val_dataloader(self):
        return [DataLoader(s, batch_size=5) for s in self.splits]

    def test_dataloader(self):
        return self.val_dataloader()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2, bias=False))


def _expected(module: ClassifierModule, data: _Data):
    ixg = InputXGradient(module.model)
    out = {}
    for name, split in zip(SPLITS, data.splits):
        x = torch.stack([s["image"] for s in split])
        y = torch.tensor([s["label"] for s in split])
        m = torch.stack([s["mask"] for s in split])
        pred = module.model(x).argmax(1)
        row = {f"class_{c}": float((pred[y == c] == c).float().mean()) for c in (0, 1)}
        row["avg"] = (row["class_0"] + row["class_1"]) / 2
        has = m.flatten(1).amax(1) > 0
        if has.any():
            for key, tgt in (("attr", y), ("attr_nontarget", 1 - y)):
                a = ixg.attribute(x[has], target=tgt[has]).detach().abs()
                ratios = [float((a[i] * m[has][i]).sum() / a[i].sum()) for i in range(int(has.sum()))]
                row[key] = sum(ratios) / len(ratios)
        else:
            row["attr"] = row["attr_nontarget"] = float("nan")
        out[name] = row
    return out


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_report_matches_naive_loop(tmp_path, stage):
    module = ClassifierModule(model=_model(), num_classes=2)
    data = _Data()
    report = BiasedSplitReport(class_names=["benign", "malignant"], n_figures=2, print_table=True,
                               save_dir=str(tmp_path / "report"))
    trainer = L.Trainer(
        accelerator="cpu", default_root_dir=str(tmp_path), callbacks=[report], logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    metrics = getattr(trainer, stage)(module, datamodule=data, verbose=False)
    exp = _expected(module, data)
    key = "val" if stage == "validate" else "test"
    for name in SPLITS:
        for k, v in exp[name].items():
            got = report.result[name][k]
            if math.isnan(v):
                assert math.isnan(got), (name, k)
            else:
                assert got == pytest.approx(v, abs=1e-5), (name, k)
    assert report.results[key] is report.result
    assert metrics[0][f"report/{key}/train_bias/avg"] == pytest.approx(exp["train_bias"]["avg"], abs=1e-6)
    assert len(report.figure_paths) == 1 and os.path.getsize(report.figure_paths[0]) > 1000
    assert report.figure_paths[0].startswith(str(tmp_path))
    # checkpoint state is primitives only and round-trips
    state = report.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    other = BiasedSplitReport()
    other.load_state_dict(state)
    assert other.result["no_bias"]["avg"] == pytest.approx(report.result["no_bias"]["avg"])


def test_report_ig_equals_ixg_for_linear_bias_free_model(tmp_path):
    module = ClassifierModule(model=_model(), num_classes=2)
    results = []
    for method in ("input_x_gradient", "integrated_gradients"):
        report = BiasedSplitReport(method=method, n_figures=0, print_table=False)
        L.Trainer(accelerator="cpu", default_root_dir=str(tmp_path), callbacks=[report], logger=False,
                  enable_progress_bar=False, enable_model_summary=False).validate(module, datamodule=_Data(),
                                                                                  verbose=False)
        results.append(report.result)
    assert results[0]["train_bias"]["attr"] == pytest.approx(results[1]["train_bias"]["attr"], abs=1e-4)


def test_no_files_without_logger_or_save_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = BiasedSplitReport(n_figures=1, print_table=False)
    L.Trainer(accelerator="cpu", default_root_dir=str(tmp_path), callbacks=[report], logger=False,
              enable_progress_bar=False, enable_model_summary=False).validate(
        ClassifierModule(model=_model(), num_classes=2), datamodule=_Data(), verbose=False)
    assert report.figure_paths == [] and list(tmp_path.iterdir()) == []


def test_format_table_and_errors():
    res = {"train_bias": {"class_0": 1.0, "class_1": 0.5, "avg": 0.75, "attr": 0.4}, "no_bias": {"avg": 0.5}}
    text = format_table({"no debiasing": res}, class_names=["benign", "malignant"],
                        stds={"no debiasing": {"train_bias": {"avg": 0.01}}})
    assert "train_bias: benign*" in text and "inverse_bias: malignant*" in text
    assert "0.75 ± 0.01" in text and "| no debiasing | 1.00 | 0.50 |" in text
    with pytest.raises(ValueError, match="method"):
        BiasedSplitReport(method="saliency")
    with pytest.raises(ValueError, match="batch_keys"):
        BiasedSplitReport(batch_keys={"img": "x"})
