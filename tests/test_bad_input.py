"""One table of bad inputs × the expected error (issue 14).

Every row is a case a user can hit: masks, images, labels, model outputs, callback options, checkpoints, data
modules, folders/CSV and the CLI. Each row is either a clear error that names the argument, the value received
and what is allowed (``match=`` pins the message), or documented valid behaviour (``expect=OK``). Rows about code
owned by another engineer that still misbehaves are ``xfail(strict=True)`` with the owner and the fix in the
reason, so they flip (and must be un-marked) the moment the fix lands.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

OK = "ok"  # documented valid behaviour: the call returns


@dataclass
class Case:
    id: str
    run: Callable[..., object]  # takes tmp_path
    exc: type[BaseException] | str = ValueError
    match: str = ""
    xfail: str | None = None


def _net(c: int = 3, k: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, k))


X = torch.rand(2, 3, 8, 8)
Y = torch.tensor([0, 1])
M = torch.zeros(2, 1, 8, 8)
M[:, :, :2, :2] = 1


def _trainer(tmp, cbs, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", default_root_dir=str(tmp), callbacks=cbs, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


class _Tiny(L.LightningModule):
    """A user's own module (not ClassifierModule): tuple batches ``(image, label)``."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.net = _net(k=k)
        self.num_classes = k

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, _, dataloader_idx=0):
        pass

    def test_step(self, batch, _, dataloader_idx=0):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _loader(n: int = 8, k: int = 2, mask: bool = False):
    x, y = torch.rand(n, 3, 8, 8), torch.arange(n) % k
    if mask:
        m = torch.zeros(n, 1, 8, 8)
        m[:, :, :2, :2] = 1
        return DataLoader([{"image": x[i], "label": int(y[i]), "mask": m[i]} for i in range(n)], batch_size=4)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _validate(tmp, cb, loaders, module=None, datamodule=None):
    t = _trainer(tmp, [cb])
    if datamodule is not None:
        return t.validate(module or _Tiny(), datamodule=datamodule, verbose=False)
    return t.validate(module or _Tiny(), dataloaders=loaders, verbose=False)


# ---------------------------------------------------------------------------------------------------------- masks
def _prior(**kw):
    from negspace.priors import prior_loss

    args = {"model": _net(), "x": X.clone(), "y": Y, "mask": M}
    args.update(kw)
    return prior_loss(args.pop("model"), args.pop("x"), args.pop("y"), args.pop("mask"), **args)


def _attr_prior(a, m):
    from negspace.priors import attribution_prior

    return attribution_prior(a, m)


def _in_mask(a, m):
    from negspace.metrics import AttributionInMask

    metric = AttributionInMask(splits=["s"])
    metric.update(a, m, split=0)
    return metric.compute()


MASKS = [
    Case("mask/wrong-spatial-size", lambda t: _prior(mask=torch.zeros(2, 1, 4, 4)), ValueError,
         r"mask of shape \(2, 1, 4, 4\) does not broadcast to \(B, 1, H, W\) = \(2, 1, 8, 8\)"),
    Case("mask/wrong-batch", lambda t: _prior(mask=torch.zeros(3, 1, 8, 8)), ValueError,
         r"mask of shape \(3, 1, 8, 8\) does not broadcast"),
    Case("mask/nan", lambda t: _prior(mask=torch.full((2, 1, 8, 8), float("nan"))), ValueError,
         r"mask contains NaN or inf; it must hold values in \[0, 1\]"),
    Case("mask/not-a-tensor", lambda t: _prior(mask=[[0.0]]), TypeError,
         r"mask must be a torch.Tensor broadcastable to \(B, 1, H, W\), got list"),
    Case("mask/3-channels", lambda t: _prior(mask=M.expand(2, 3, 8, 8)), ValueError,
         r"mask of shape \(2, 3, 8, 8\) does not broadcast to \(B, 1, H, W\) = \(2, 1, 8, 8\) .*use one mask channel"),
    Case("mask/bhw-ok", lambda t: _prior(mask=M[:, 0]), OK),
    Case("mask/empty-ok-costs-zero", lambda t: float(_prior(mask=torch.zeros(2, 1, 8, 8))) == 0.0 or
         pytest.fail("empty masks must cost exactly 0"), OK),
    Case("mask/attribution_prior-shape", lambda t: _attr_prior(torch.rand(2, 3, 8, 8), torch.zeros(2, 1, 5, 5)),
         ValueError, r"mask of shape \(2, 1, 5, 5\) does not broadcast"),
    Case("mask/in-mask-metric-shape", lambda t: _in_mask(torch.rand(2, 3, 8, 8), torch.zeros(2, 1, 4, 4)),
         ValueError, r"mask must have shape \(2, 1, 8, 8\) \(or \(2, 8, 8\)\) to match \(2, 3, 8, 8\), got \(2, 1, 4, 4\)"),
    Case("mask/relative-mass-shape", lambda t: __import__("negspace.reduce", fromlist=["x"]).relative_mass_in_mask(
        torch.rand(2, 3, 8, 8), torch.zeros(3, 1, 8, 8)), ValueError, r"mask must have shape \(2, 1, 8, 8\).*got \(3, 1, 8, 8\)"),
]

# --------------------------------------------------------------------------------------------------------- images


def _ixg(model=None, x=None, target=None, **kw):
    from negspace.attribution import input_x_gradient

    return input_x_gradient(model or _net(), X.clone() if x is None else x, Y if target is None else target, **kw)


def _ig(**kw):
    from negspace.attribution import integrated_gradients

    args = {"model": _net(), "x": X.clone(), "target": Y}
    args.update(kw)
    return integrated_gradients(args.pop("model"), args.pop("x"), args.pop("target"), **args)


IMAGES = [
    Case("image/int-dtype", lambda t: _ixg(x=torch.zeros(2, 3, 8, 8, dtype=torch.uint8)), TypeError,
         r"x must be a floating-point tensor, got dtype torch.uint8"),
    Case("image/not-tensor", lambda t: _ixg(x=[[0.0]]), TypeError, r"x must be a torch.Tensor, got list"),
    Case("image/nan", lambda t: _ixg(x=torch.full((2, 3, 8, 8), float("nan"))), ValueError,
         r"x contains NaN or inf \(samples \[0, 1\]"),
    Case("image/inf-one-sample", lambda t: _ixg(x=torch.cat([X[:1], torch.full((1, 3, 8, 8), float("inf"))])),
         ValueError, r"samples \[1\]"),
    Case("image/empty-batch", lambda t: _ixg(x=torch.zeros(0, 3, 8, 8), target=torch.zeros(0, dtype=torch.long)),
         ValueError, r"non-empty batch dimension, got shape \(0, 3, 8, 8\)"),
    Case("image/wrong-channels", lambda t: _ixg(x=torch.rand(2, 1, 8, 8)), RuntimeError,
         r"expected input\[2, 1, 8, 8\] to have 3 channels"),  # the model's own error, unchanged
    Case("image/ig-baseline-shape", lambda t: _ig(baseline=torch.zeros(5, 3, 8, 8)), ValueError,
         r"baseline of shape \(5, 3, 8, 8\) does not broadcast to x \(2, 3, 8, 8\)"),
    Case("image/ig-baseline-type", lambda t: _ig(baseline="black"), TypeError,
         r"baseline must be None, a float or a Tensor, got str"),
    Case("image/ig-n_steps-0", lambda t: _ig(n_steps=0), ValueError, r"n_steps must be a positive int, got 0"),
    Case("image/ig-method", lambda t: _ig(method="simpson"), ValueError,
         r"method must be one of .*riemann_trapezoid'; got 'simpson'"),
    Case("image/ig-internal-batch", lambda t: _ig(internal_batch_size=0), ValueError,
         r"internal_batch_size must be a positive int or None, got 0"),
    Case("image/prior-nan-input", lambda t: _prior(x=torch.full((2, 3, 8, 8), float("nan"))), ValueError,
         r"x contains NaN or inf \(samples \[0, 1\]\)"),
    Case("image/collect-images-empty", lambda t: __import__("negspace.batch", fromlist=["x"]).collect_images([]),
         ValueError, r"negspace: data is empty"),
    Case("image/iter-images-bad-type", lambda t: list(__import__("negspace.batch", fromlist=["x"]).iter_images(3)),
         TypeError, r"data must be a tensor \(N, \.\.\.\) or an iterable of batches, got int"),
    Case("image/collect-max-images-0", lambda t: __import__("negspace.batch", fromlist=["x"]).collect_images(
        X, max_images=0), ValueError, r"max_images must be a positive int or None, got 0"),
]

# --------------------------------------------------------------------------------------------------------- labels
LABELS = [
    Case("label/out-of-range", lambda t: _ixg(target=torch.tensor([0, 5])), ValueError,
         r"class index out of range \[0, 2\): got values in \[0, 5\]"),
    Case("label/negative", lambda t: _ixg(target=torch.tensor([0, -1])), ValueError,
         r"class index out of range \[0, 2\): got values in \[-1, 0\]"),
    Case("label/float", lambda t: _ixg(target=torch.tensor([0.0, 1.0])), TypeError,
         r"target tensor must hold integer class indices, got dtype torch.float32"),
    Case("label/bool", lambda t: _ixg(target=True), TypeError, r"got bool"),
    Case("label/wrong-batch", lambda t: _ixg(target=torch.tensor([0, 1, 1])), ValueError, r"B=2, got 3"),
    Case("label/3d", lambda t: _ixg(target=torch.zeros(2, 1, 1, dtype=torch.long)), ValueError,
         r"target must be \(B,\) or \(B, K\), got shape \(2, 1, 1\)"),
    Case("label/string", lambda t: _ixg(target="cat"), TypeError,
         r"target must be an int, a LongTensor \(B,\) or \(B, K\), or an objective .*; got str"),
    Case("label/named-target-unknown", lambda t: __import__("negspace.objectives", fromlist=["x"]).named_target(
        "top_logits"), ValueError, r"target must be one of .* got 'top_logits'"),
    Case("label/prior-out-of-range", lambda t: _prior(y=torch.tensor([0, 7])), ValueError,
         r"y holds class indices outside \[0, 2\) of the model output \(got 0..7\)"),
    Case("label/prior-float", lambda t: _prior(y=torch.tensor([0.0, 1.0])), TypeError,
         r"y must hold integer class indices, got dtype torch.float32"),
    Case("label/group-accuracy-out-of-range", lambda t: _group_acc(torch.tensor([0, 3])), ValueError,
         r"target must hold class indices in \[0, 2\), got values in \[0, 3\]"),
    Case("label/group-accuracy-float", lambda t: _group_acc(torch.tensor([0.0, 0.5])), ValueError,
         r"target must hold integer class indices, got non-integer values \[0.0, 0.5\]"),
    Case("label/split-unknown", lambda t: __import__("negspace.metrics", fromlist=["x"]).GroupAccuracy(
        2, splits=["a"]).update(torch.rand(1, 2), torch.tensor([0]), split="b"), ValueError,
         r"split must be one of \['a'\] or an index, got 'b'"),
    Case("label/dict-tensor-fractional", lambda t: __import__("negspace.data_modules", fromlist=["x"])
         .DictTensorDataset(torch.rand(2, 3, 8, 8), torch.tensor([0.0, 0.5])), ValueError,
         r"labels must be integer class indices, got non-integer values \[0.0, 0.5\]"),
    Case("label/dict-tensor-negative", lambda t: __import__("negspace.data_modules", fromlist=["x"])
         .DictTensorDataset(torch.rand(2, 3, 8, 8), torch.tensor([0, -1])), ValueError, r"labels must be >= 0, got -1"),
    Case("label/iter-batches-bare-tensor", lambda t: list(__import__("negspace.batch", fromlist=["x"]).iter_batches(
        X, require=("image", "label"))), ValueError, r"a bare image tensor carries no \['label'\]; pass batches"),
    Case("label/topk-too-large", lambda t: _ixg(target=__import__("negspace.objectives", fromlist=["x"]).topk_sum(5)),
         ValueError, r"topk_sum: k=5 exceeds the number of classes 2"),
    Case("label/topk-0", lambda t: __import__("negspace.objectives", fromlist=["x"]).topk_sum(0), ValueError,
         r"topk_sum: k must be a positive int, got 0"),
    Case("label/contrastive-one-class", lambda t: __import__("negspace.objectives", fromlist=["x"]).contrastive(a=1),
         ValueError, r"give both classes a and b, or neither"),
]


def _group_acc(y):
    from negspace.metrics import GroupAccuracy

    m = GroupAccuracy(2, splits=["s"])
    m.update(torch.rand(2, 2), y, split=0)
    return m.compute()


# --------------------------------------------------------------------------------------------------- model outputs
class _TupleOut(nn.Module):
    def forward(self, x):
        return (x.mean((1, 2, 3))[:, None].repeat(1, 2), None)


class _DictOut(nn.Module):
    def forward(self, x):
        return {"logits": x.mean((2, 3))[:, :2]}


class _OneD(nn.Module):
    def forward(self, x):
        return x.mean((1, 2, 3))


class _WrongBatch(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))[:1, :2]


OUTPUTS = [
    Case("output/tuple", lambda t: _ixg(model=_TupleOut()), TypeError,
         r"the model returned tuple, not a logits Tensor; wrap it"),
    Case("output/dict", lambda t: _ixg(model=_DictOut()), TypeError, r"the model returned dict, not a logits Tensor"),
    Case("output/1d", lambda t: _ixg(model=_OneD()), ValueError,
         r"logit expects model outputs of shape \(B, num_classes\), got \(2,\)"),
    Case("output/wrong-batch", lambda t: _ixg(model=_WrongBatch()), ValueError,
         r"the model returned outputs of shape \(1, 2\) for a batch of 2 inputs"),
    Case("output/objective-bad-return", lambda t: _ixg(target=lambda out: out.sum()), ValueError,
         r"must return shape \(B,\)=\(2,\) or \(B, K\), got \(\)"),
    Case("output/neuron-unknown-layer", lambda t: _ixg(target=__import__("negspace.objectives", fromlist=["x"]).neuron(
        "layer9", 0)), ValueError,
         r"layer 'layer9' does not exist in Sequential. Valid layer names \(5\)"),
    Case("output/neuron-channel-out-of-range", lambda t: _ixg(
        target=__import__("negspace.objectives", fromlist=["x"]).neuron("1", 99)), ValueError,
         r"neuron: index 99 out of range for layer '1' with 4 channels"),
    Case("output/layer-contrib-unknown-layer", lambda t: __import__("negspace.attribution", fromlist=["x"])
         .layer_contributions(_net(), ["conv9"], X, 0), ValueError, r"layer 'conv9' does not exist"),
    Case("output/layer-contrib-method", lambda t: __import__("negspace.attribution", fromlist=["x"])
         .layer_contributions(_net(), ["1"], X, 0, method="saliency"), ValueError,
         r"method must be one of .* got 'saliency'"),
    Case("output/layers-duplicates", lambda t: __import__("negspace.hooks", fromlist=["x"]).normalize_layers(
        ["1", "1"]), ValueError, r"layers contains duplicates"),
    Case("output/layer-name-object", lambda t: __import__("negspace.hooks", fromlist=["x"]).get_layer(
        _net(), nn.ReLU()), TypeError, r"layer names must be dotted strings"),
    Case("output/summarize-reduce", lambda t: __import__("negspace.reduce", fromlist=["x"]).summarize(
        torch.rand(2, 4, 3, 3), "median"), ValueError, r"reduce must be one of .* got 'median'"),
    Case("output/summarize-5d", lambda t: __import__("negspace.reduce", fromlist=["x"]).summarize(
        torch.rand(2, 4, 3, 3, 3), "mean"), ValueError, r"unsupported activation shape \(2, 4, 3, 3, 3\)"),
    Case("output/cls-on-conv", lambda t: __import__("negspace.reduce", fromlist=["x"]).summarize(
        torch.rand(2, 4, 3, 3), "cls"), ValueError, r"reduce='cls' needs a token layer"),
    Case("output/pearson-length", lambda t: __import__("negspace.stats", fromlist=["x"]).pearson(
        torch.rand(3), torch.rand(4)), ValueError, r"same number of entries, got 3 and 4"),
    Case("output/kmeans-k", lambda t: __import__("negspace.stats", fromlist=["x"]).kmeans(torch.rand(3, 2), 5),
         ValueError, r"need 1 <= k <= N=3, got k=5"),
    Case("output/kmeans-1d", lambda t: __import__("negspace.stats", fromlist=["x"]).kmeans(torch.rand(3), 1),
         ValueError, r"x must be \(N, D\), got \(3,\)"),
    Case("output/pca-variance", lambda t: __import__("negspace.stats", fromlist=["x"]).pca_dimensionality(
        torch.rand(5, 3), 1.5), ValueError, r"variance must be in \(0, 1\], got 1.5"),
    Case("output/hoyer-one-entry", lambda t: __import__("negspace.reduce", fromlist=["x"]).hoyer(torch.rand(3, 1)),
         ValueError, r"hoyer needs at least 2 entries"),
    Case("output/intervene-tensor-shape", lambda t: _intervene_run({"1": torch.zeros(5)}), ValueError,
         r"the replacement tensor for layer '1' has shape \(5,\), which does not broadcast to the layer output "
         r"\(2, 4, 8, 8\)"),
    Case("output/intervene-fn-shape", lambda t: _intervene_run({"1": lambda o: o[:1]}), ValueError,
         r"edit of layer '1' must return a tensor of shape \(2, 4, 8, 8\), got \(1, 4, 8, 8\)"),
    Case("output/kmeans-nan", lambda t: __import__("negspace.stats", fromlist=["x"]).kmeans(
        torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]]), 2), ValueError,
         r"kmeans: x contains NaN or inf in rows \[1\]"),
    Case("output/pearson-constant-is-nan", lambda t: __import__("math").isnan(__import__(
        "negspace.stats", fromlist=["x"]).pearson(torch.ones(4), torch.rand(4))) or pytest.fail("must be NaN"), OK),
    Case("output/capture-unknown-layer", lambda t: __import__("negspace.hooks", fromlist=["x"]).capture(
        _net(), ["nope"]).__enter__(), ValueError, r"layer 'nope' does not exist in Sequential"),
    Case("output/direction-zero", lambda t: __import__("negspace.objectives", fromlist=["x"]).direction(
        "1", torch.zeros(3)), ValueError, r"direction: vector must be a finite, non-zero 1-D tensor"),
    Case("output/ig-trapezoid-1-step", lambda t: _ig(n_steps=1, method="riemann_trapezoid"), ValueError,
         r"riemann_trapezoid needs n_steps >= 2"),
    Case("output/intervene-empty", lambda t: __import__("negspace.hooks", fromlist=["x"]).intervene(
        _net(), {}).__enter__(), TypeError, r"edits must be a non-empty mapping"),
]

def _intervene_run(edits):
    from negspace.hooks import intervene

    net = _net()
    with intervene(net, edits):
        net(X)


# ----------------------------------------------------------------------------------------------- callback options


def _cb(name, *a, **kw):
    import negspace.callbacks as cbs

    return getattr(cbs, name)(*a, **kw)


def _report_validate(tmp, cb, loaders, datamodule=None, module=None):
    return _validate(tmp, cb, loaders, module=module, datamodule=datamodule)


class _ThreeSplits(L.LightningDataModule):
    split_names = ("train_bias", "inverse_bias", "no_bias")

    def val_dataloader(self):
        return [_loader(mask=True) for _ in range(3)]


def _single_val_named(tmp):
    cb = _cb("BiasedSplitReport", n_figures=0, print_table=False)
    _report_validate(tmp, cb, _loader(mask=True))
    assert list(cb.result) == ["val", "worst"], cb.result  # a plain val loader is not called "train_bias"


def _split_names_from_dm(tmp):
    cb = _cb("BiasedSplitReport", n_figures=0, print_table=False)
    _report_validate(tmp, cb, None, datamodule=_ThreeSplits())
    assert list(cb.result)[:3] == ["train_bias", "inverse_bias", "no_bias"]


def _image_dm_test_names(tmp):
    from negspace.data_modules import DictTensorDataset, ImageDataModule

    def ds():
        m = torch.zeros(8, 1, 8, 8)
        m[:, :, :2, :2] = 1
        return DictTensorDataset(torch.rand(8, 3, 8, 8), torch.arange(8) % 2, m)

    dm = ImageDataModule(ds(), val={"a": ds(), "b": ds()}, test={"held_out": ds()}, augment=False, batch_size=4)
    cb = _cb("BiasedSplitReport", n_figures=0, print_table=False)
    _trainer(tmp, [cb]).test(_classifier(model=_net()), datamodule=dm, verbose=False)
    assert list(cb.result) == ["held_out", "worst"], cb.result
    metrics = _trainer(tmp, []).validate(_classifier(model=_net()), datamodule=dm, verbose=False)
    assert "val/a/acc" in metrics[0] and "val/b/acc" in metrics[1]


CALLBACKS = [
    Case("report/test-names-from-data-module", _image_dm_test_names, OK),
    # BiasedSplitReport (defect 4)
    Case("report/single-loader-is-not-train_bias", _single_val_named, OK),
    Case("report/names-from-data-module", _split_names_from_dm, OK),
    Case("report/splits-count-mismatch", lambda t: _report_validate(
        t, _cb("BiasedSplitReport", splits=["a", "b"], n_figures=0), _loader()), ValueError,
         r"splits=\['a', 'b'\] names 2 dataloader\(s\) but the val stage has 1"),
    Case("report/several-unnamed-loaders", lambda t: _report_validate(
        t, _cb("BiasedSplitReport", n_figures=0), [_loader(), _loader()]), ValueError,
         r"the val stage has 2 dataloaders but no split names; pass splits="),
    Case("report/spurious-class-out-of-range", lambda t: _report_validate(
        t, _cb("BiasedSplitReport", spurious_class=7, n_figures=0), _loader()), ValueError,
         r"spurious_class must be None or a class index in \[0, 2\), got 7"),
    Case("report/spurious-class-negative", lambda t: _cb("BiasedSplitReport", spurious_class=-1), ValueError,
         r"spurious_class must be None or a class index >= 0, got -1"),
    Case("report/spurious-class-str", lambda t: _cb("BiasedSplitReport", spurious_class="benign"), ValueError,
         r"spurious_class .* got 'benign'"),
    Case("report/duplicate-splits", lambda t: _cb("BiasedSplitReport", splits=["a", "a"]), ValueError,
         r"splits must be distinct, got \['a', 'a'\]"),
    Case("report/splits-string", lambda t: _cb("BiasedSplitReport", splits="no_bias"), ValueError,
         r"splits must be a list of non-empty names, got 'no_bias'"),
    Case("report/class-names-count", lambda t: _report_validate(
        t, _cb("BiasedSplitReport", class_names=["a", "b", "c"], n_figures=0), _loader()), ValueError,
         r"class_names has 3 names .* 2 classes"),
    Case("report/method", lambda t: _cb("BiasedSplitReport", method="saliency"), ValueError,
         r"method must be one of \['input_x_gradient', 'integrated_gradients'\], got 'saliency'"),
    Case("report/n_figures", lambda t: _cb("BiasedSplitReport", n_figures=-1), ValueError,
         r"n_figures must be >= 0, got -1"),
    Case("report/max_attr_samples", lambda t: _cb("BiasedSplitReport", max_attr_samples=-2), ValueError,
         r"max_attr_samples must be None or >= 0, got -2"),
    Case("report/batch_keys-unknown-role", lambda t: _cb("BiasedSplitReport", batch_keys={"img": "x"}), ValueError,
         r"batch_keys may only name the roles"),
    # AttributionPrior
    Case("prior/lam-negative", lambda t: _cb("AttributionPrior", lam=-1.0), ValueError, r"lam must be a finite float >= 0.*, got -1.0"),
    Case("prior/mode", lambda t: _cb("AttributionPrior", mode="absence"), ValueError,
         r"mode must be one of \('presence', 'presence_absence'\), got 'absence'"),
    Case("prior/method", lambda t: _cb("AttributionPrior", method="saliency"), ValueError,
         r"method must be one of .* got 'saliency'"),
    Case("prior/non_target", lambda t: _cb("AttributionPrior", non_target="top:0"), ValueError,
         r"non_target must be .*'top:K' .* got 'top:0'"),
    Case("prior/n_steps", lambda t: _cb("AttributionPrior", n_steps=0), ValueError, r"n_steps must be a positive int, got 0"),
    Case("prior/on_nan", lambda t: _cb("AttributionPrior", on_nan="ignore"), ValueError,
         r"on_nan must be 'raise' or 'skip', got 'ignore'"),
    Case("prior/start_step", lambda t: _cb("AttributionPrior", start_step=-3), ValueError, r"start_step must be an int >= 0, got -3"),
    Case("prior/lam_schedule", lambda t: _cb("AttributionPrior", lam_schedule="exp"), ValueError,
         r"lam_schedule must be None, 'constant', 'linear:<steps>' or a callable; got 'exp'"),
    Case("prior/nan-images-shared-forward", lambda t: _fit_prior(t, nan=True, share_forward=True), ValueError,
         r"the batch images contain NaN or inf \(samples \[1\]\) at global step 0; the input is broken"),
    Case("prior/nan-images", lambda t: _fit_prior(t, nan=True), ValueError,
         r"the batch images contain NaN or inf \(samples \[1\]\)"),
    Case("prior/forward-modifies-input-in-place", lambda t: _fit_prior(t, inplace=True), (RuntimeError, ValueError),
         r"modifies its input tensor in place"),
    # the shared vocabulary
    Case("analysis/every_n_epochs-0", lambda t: _cb("TensionReport", "1", [0], every_n_epochs=0), ValueError,
         r"every_n_epochs must be None \(once, at the end of fit\) or a positive int, got 0"),
    Case("analysis/dataloader_idx-negative", lambda t: _cb("TensionReport", "1", [0], dataloader_idx=-1),
         ValueError, r"dataloader_idx must be a non-negative int, got -1"),
    Case("analysis/forward-not-str", lambda t: _cb("CodecModes", "1", forward=nn.Linear(1, 1)), TypeError,
         r"forward must be a dotted submodule name or None, got Linear"),
    Case("analysis/root-deprecated", lambda t: _deprecated_root(), OK),
    Case("analysis/forward-unknown-before-training", lambda t: _fit_counting(
        t, _cb("TensionReport", "1", [0], forward="nett", every_n_epochs=None)), ValueError,
         r"layer 'nett' does not exist in _Tiny. Closest matches: \['net', "),
    Case("analysis/dataloader_idx-missing-loader", lambda t: _fit_counting(
        t, _cb("TensionReport", "net.1", [0], forward=None, every_n_epochs=None, dataloader_idx=2)), ValueError,
         r"TensionReport: dataloader_idx=2 but there is one validation loader"),
    Case("report/batch_keys-missing-key", lambda t: _report_validate(
        t, _cb("BiasedSplitReport", batch_keys={"image": "img"}, n_figures=0), _loader(mask=True)),
         ValueError, r"BiasedSplitReport: the batch has no image under key 'img' \(batch keys: \['image', 'label', 'mask'\]\)"),
    Case("prior/batch-without-mask-first-batch", lambda t: _fit_counting(t, _cb("AttributionPrior", lam=1.0)),
         ValueError, r"AttributionPrior: the batch has no mask at position 2 of a 2-element batch; pass batch_keys="),
    Case("codec/method", lambda t: _cb("CodecModes", "1", method="bogus"), ValueError, r"method .*'bogus'"),
    Case("codec/target", lambda t: _cb("CodecModes", "1", target="bogus"), ValueError,
         r"target must be one of .* got 'bogus'"),
    Case("codec/k-0", lambda t: _cb("CodecModes", "1", k=0), ValueError, r"\bk\b.*0"),
    Case("pure/k-bad", lambda t: _cb("VirtualNeurons", "2", "1", k=0), ValueError, r"k must be an int >= 2 or 'auto', got 0"),
    Case("pure/n_ref-0", lambda t: _cb("VirtualNeurons", "2", "1", n_ref=0), ValueError, r"k=2 is larger than n_ref=0"),
    Case("pure/tuple-batch-fails-at-start", lambda t: _fit_pure_tuple(t), OK),
    Case("le/concepts-unknown", lambda t: _cb("LinearExplanations", "1", concepts="colours"), ValueError,
         r"concepts must be 'labels', one of \['digits', 'lesions'\], a Tensor \(N, M\) or a callable; got 'colours'"),
    Case("le/scaling", lambda t: _cb("LinearExplanations", "1", scaling="minmax"), ValueError,
         r"scaling must be one of \('optim', 'norm', 'none'\), got 'minmax'"),
    Case("le/reduce", lambda t: _cb("LinearExplanations", "1", reduce="median"), ValueError,
         r"reduce must be one of \('mean', 'max', 'cls'\), got 'median'"),
    Case("tension/reduce", lambda t: _cb("TensionReport", "1", [0], reduce="median"), ValueError, r"reduce.*'median'"),
    Case("tension/threshold", lambda t: _cb("TensionReport", "1", [0], threshold=-1.0), ValueError, r"threshold.*-1"),
    Case("tension/channels-str", lambda t: _cb("TensionReport", "1", "some"), ValueError,
         r"channels must be a non-empty list of non-negative ints, got 'some'"),
    Case("edit/mode", lambda t: _cb("ChannelEdit", {"1": [0]}, mode="delete"), ValueError,
         r"mode must be one of \('ablate', 'preserve'\), got 'delete'"),
    Case("edit/empty", lambda t: _cb("ChannelEdit", {}), TypeError,
         r"edits must be a non-empty mapping \{layer: channels\}, got \{\}"),
    Case("edit/stages", lambda t: _cb("ChannelEdit", {"1": [0]}, stages=["train"]), ValueError,
         r"stages must be a non-empty subset of .* got \('train',\)"),
    Case("edit/negative-channel", lambda t: _cb("ChannelEdit", {"1": [-1]}), ValueError,
         r"channels for layer '1' must be non-negative, got \[-1\]"),
]


def _fit_counting(tmp, cb):
    """Fit 2 epochs; the callback's error must come before the second training batch."""
    seen = []

    class _Count(L.Callback):
        def on_train_batch_end(self, *a, **k):
            seen.append(1)

    try:
        _trainer(tmp, [cb, _Count()], max_epochs=2, limit_train_batches=2, limit_val_batches=1).fit(
            _Tiny(), _loader(), _loader())
    finally:
        assert len(seen) <= 1, f"the error came after {len(seen)} training batches"


class _InPlace(_Tiny):
    def forward(self, x):
        x.sub_(0.5)  # normalises its input in place
        return self.net(x)


def _fit_prior(tmp, nan=False, inplace=False, **kw):
    x = torch.rand(8, 3, 8, 8)
    if nan:
        x[1] = float("nan")
    m = torch.zeros(8, 1, 8, 8)
    m[:, :, :2, :2] = 1
    data = DataLoader([(x[i], i % 2, m[i]) for i in range(8)], batch_size=4)
    _trainer(tmp, [_cb("AttributionPrior", lam=1.0, **kw)], max_epochs=1).fit(_InPlace() if inplace else _Tiny(), data)


def _deprecated_root():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _cb("CodecModes", "1", root="net")
    assert any(issubclass(x.category, DeprecationWarning) and "forward" in str(x.message) for x in w)


def _fit_pure_tuple(tmp):
    """Defect 2's rule: a tuple-batch problem (or none) shows on the first batch / at setup, not after the fit."""
    cb = _cb("VirtualNeurons", "net.2", "net.1", neurons=[0], k=2, n_ref=4, figures=False)
    seen = []

    class _Count(L.Callback):
        def on_train_batch_end(self, *a, **k):
            seen.append(1)

    t = _trainer(tmp, [cb, _Count()], max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    try:
        t.fit(_Tiny(), _loader(), _loader())
    except ValueError:
        assert not seen, "VirtualNeurons failed only after training batches ran"


# ---------------------------------------------------------------------------------------------------- checkpoints
def _classifier(**kw):
    from negspace.modules import ClassifierModule

    return ClassifierModule(**kw)


def _report_state_roundtrip(tmp):
    cb = _cb("BiasedSplitReport", n_figures=0, print_table=False)
    _report_validate(tmp, cb, None, datamodule=_ThreeSplits())
    path = tmp / "s.pt"
    torch.save(cb.state_dict(), path)
    other = _cb("BiasedSplitReport")
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.result == cb.result


def _edit_other_checkpoint(tmp):
    a = _cb("ChannelEdit", {"net.1": [0]}, mode="ablate")
    b = _cb("ChannelEdit", {"net.1": [1, 2]}, mode="ablate")
    b.load_state_dict(a.state_dict())  # a checkpoint of another edit: error naming both, or the passed edit wins
    assert "[1, 2]" in repr(b) or "1, 2" in str(b.state_dict())


CHECKPOINTS = [
    Case("ckpt/weights-missing-file", lambda t: _classifier(weights=str(t / "nope.ckpt")), ValueError, r"weights file not found: '.*nope.ckpt'"),
    Case("ckpt/weights-not-a-checkpoint", lambda t: (t / "x.ckpt").write_text("hello") and
         _classifier(weights=str(t / "x.ckpt")), ValueError,
         r"cannot load weights '.*x.ckpt' with torch.load\(weights_only=True\).*Save a plain state dict"),
    Case("ckpt/weights-wrong-architecture", lambda t: torch.save({"state_dict": {"foo.weight": torch.zeros(1)}},
                                                                  t / "w.ckpt") or _classifier(weights=str(t / "w.ckpt")),
         ValueError,
         r"weights '.*w.ckpt' do not fit XSmallCNN: missing keys .*unexpected keys \['foo.weight'\]"),
    Case("ckpt/checkpoint-and-weights-differ", lambda t: _classifier(weights="a.ckpt", checkpoint="b.ckpt"),
         ValueError, r"pass either weights or the deprecated checkpoint, got 'a.ckpt' and 'b.ckpt'"),
    Case("ckpt/negspace-model-pretrained", lambda t: _classifier(model="xsmallcnn", pretrained=True), ValueError,
         r"negspace model 'xsmallcnn' has no published weights"),
    Case("ckpt/report-state-roundtrip", _report_state_roundtrip, OK),
    Case("ckpt/edit-from-other-config", _edit_other_checkpoint, ValueError,
         r"the checkpoint holds the edit ChannelEdit\(\{'net.1': \[0\]\}.*configured with ChannelEdit\(\{'net.1': \[1, 2\]\}"),
    Case("module/model-unknown", lambda t: _classifier(model="resnet9000"), ValueError,
         r"unknown model name 'resnet9000': use 'timm:<name>', 'torchvision:<name>' or one of"),
    Case("module/loss", lambda t: _classifier(loss="mse"), ValueError, r"loss must be one of \['ce', 'bce'\], got 'mse'"),
    Case("module/optimizer", lambda t: _classifier(optimizer="lion"), ValueError, r"optimizer must be one of .* 'lion'"),
    Case("module/lr-0", lambda t: _classifier(lr=0.0), ValueError, r"lr must be a number in \(0.0, inf\), got 0.0"),
    Case("module/label-smoothing", lambda t: _classifier(label_smoothing=1.5), ValueError,
         r"label_smoothing must be a number in \[0.0, 1.0\), got 1.5"),
    Case("module/min-lr-ratio", lambda t: _classifier(min_lr_ratio=2.0), ValueError,
         r"min_lr_ratio must be in \[0, 1\], got 2.0"),
    Case("module/freeze-epochs", lambda t: _classifier(freeze_backbone_epochs=-1), ValueError,
         r"freeze_backbone_epochs must be an int >= 0, got -1"),
    Case("module/schedule", lambda t: _classifier(schedule="step"), ValueError,
         r"schedule must be one of \['constant', 'cosine'\], got 'step'"),
    Case("module/splits-duplicates", lambda t: _classifier(splits=["a", "a"]), ValueError,
         r"ClassifierModule: splits must be distinct"),
    Case("module/splits-count", lambda t: _trainer(t, []).validate(_classifier(model=_net(), splits=["a", "b"]),
                                                                  dataloaders=_loader(), verbose=False),
         ValueError, r"splits=\['a', 'b'\] names 2 dataloader\(s\) but the val stage has 1"),
    Case("module/num-classes-1", lambda t: _classifier(num_classes=1), ValueError,
         r"num_classes must be an int >= 2 \(one logit per class\), got 1"),
    Case("module/model-outputs-other-num-classes", lambda t: _fit_classifier(t, outputs=10), ValueError,
         r"the model must return logits \(B, num_classes\) = \(4, 2\), got \(4, 10\); set num_classes"),
    Case("module/label-out-of-range", lambda t: _fit_classifier(t, k=3), ValueError,
         r"labels must be in \[0, num_classes=2\), got values in \[0, 2\]"),
    Case("module/float-labels", lambda t: _fit_classifier(t, float_labels=True), ValueError,
         r"labels must be integer class indices \(B,\), got torch.float32 \(4,\)"),
    Case("module/model-not-module", lambda t: _classifier(model=42), TypeError,
         r"model must be a model name \(str\) or an nn.Module, got int"),
    Case("module/batch-without-label", lambda t: _trainer(t, []).validate(
        _classifier(model=_net()), dataloaders=DataLoader(torch.rand(4, 3, 8, 8), batch_size=2), verbose=False),
         ValueError,
         r"ClassifierModule: the batch has no label \(got a Tensor\); pass batch_keys="),
]

def _fit_classifier(tmp, outputs=2, k=2, float_labels=False):
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % k
    data = DataLoader(TensorDataset(x, y.float() if float_labels else y), batch_size=4)
    module = _classifier(model=nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, outputs)), num_classes=2)
    _trainer(tmp, [], max_epochs=1).fit(module, data)


# --------------------------------------------------------------------------------------------------- data modules


def _spurious(**kw):
    from negspace.data_modules import SpuriousPatchDataModule

    base = kw.pop("base", TensorDataset(torch.rand(20, 3, 8, 8), torch.arange(20) % 2))
    dm = SpuriousPatchDataModule(base, **kw)
    return dm


def _spurious_setup(**kw):
    dm = _spurious(**kw)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _image_dm(train, **kw):
    from negspace.data_modules import ImageDataModule

    return ImageDataModule(train, **kw)


class _Mixed(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        s = 8 if i % 2 == 0 else 10
        return {"image": torch.rand(3, s, s), "label": i % 2, "index": i}


DATA = [
    Case("dm/spurious-class-negative", lambda t: _spurious(spurious_class=-1), ValueError,
         r"spurious_class must be an int >= 0 \(a class index\), got -1"),
    Case("dm/spurious-class-out-of-range", lambda t: _spurious(spurious_class=5).setup("fit"), ValueError,
         r"spurious_class must be in \[0, 2\), got 5"),
    Case("dm/bias-ratio", lambda t: _spurious(bias_ratio=1.5), ValueError, r"bias_ratio must be a number in \[0, 1\], got 1.5"),
    Case("dm/patch-style", lambda t: _spurious(patch="star"), ValueError, r"patch must be one of .* got 'star'"),
    Case("dm/patch-position", lambda t: _spurious(patch_position="center"), ValueError,
         r"patch_position must be one of .* got 'center'"),
    Case("dm/patch-size-0", lambda t: _spurious(patch_size=0), ValueError, r"patch_size must be an int >= 1"),
    Case("dm/val-fraction", lambda t: _spurious(val_fraction=1.0), ValueError, r"val_fraction must be in \[0, 1\), got 1.0"),
    Case("dm/fractions-sum", lambda t: _spurious(val_fraction=0.6, test_fraction=0.5), ValueError,
         r"val_fraction \+ test_fraction must be < 1"),
    Case("dm/batch-size-0", lambda t: _spurious(batch_size=0), ValueError, r"batch_size must be a positive int, got 0"),
    Case("dm/num-workers", lambda t: _spurious(num_workers=-1), ValueError, r"num_workers must be an int >= 0, got -1"),
    Case("dm/dilation", lambda t: _spurious(dilation=-2), ValueError, r"dilation must be None or an int >= 0"),
    Case("dm/empty-dataset", lambda t: _spurious(base=TensorDataset(torch.rand(0, 3, 8, 8), torch.zeros(0))),
         ValueError, r"empty split: dataset has no samples"),
    Case("dm/image-uint8", lambda t: _spurious_setup(base=TensorDataset(torch.zeros(20, 3, 8, 8, dtype=torch.uint8),
                                                                        torch.arange(20) % 2)),
         ValueError, r"image must be a float tensor \(C, H, W\) in \[0, 1\], got Tensor \(3, 8, 8\) torch.uint8"),
    Case("dm/image-hwc-not-guessed", lambda t: _spurious_setup(base=TensorDataset(torch.rand(20, 8, 8, 3),
                                                                                  torch.arange(20) % 2)),
         ValueError, r"image has shape \(8, 8, 3\), which looks like \(H, W, C\); images must be \(C, H, W\) .*permute"),
    Case("dm/image-0-255", lambda t: _spurious_setup(base=TensorDataset(torch.rand(20, 3, 8, 8) * 255,
                                                                        torch.arange(20) % 2)),
         ValueError, r"image values must be finite and in \[0, 1\]"),
    Case("dm/image-2d", lambda t: _spurious_setup(base=TensorDataset(torch.rand(20, 8, 8), torch.arange(20) % 2)),
         ValueError, r"image must be a float tensor \(C, H, W\)"),
    Case("dm/label-float", lambda t: _spurious_setup(base=TensorDataset(torch.rand(20, 3, 8, 8),
                                                                        (torch.arange(20) % 2).float())),
         ValueError, r"dataset item 0: label must be an int, got tensor 0.0"),
    Case("dm/label-out-of-classes", lambda t: _spurious(base=TensorDataset(torch.rand(20, 3, 8, 8), torch.arange(20) % 3),
                                                        num_classes=2).setup("fit"),
         ValueError, r"labels \[2\] are outside the classes \[0, 2\)"),
    Case("dm/mask-wrong-size", lambda t: _spurious_setup(base=TensorDataset(
        torch.rand(20, 3, 8, 8), torch.arange(20) % 2, torch.zeros(20, 1, 4, 4))), ValueError,
         r"mask has shape \(1, 4, 4\) but the image is \(3, 8, 8\)"),
    Case("dm/num-classes-1", lambda t: _spurious(num_classes=1).setup("fit"), ValueError,
         r"num_classes must be an int >= 2, got 1"),
    Case("dm/normalize-unknown", lambda t: _spurious(normalize="cifar"), ValueError,
         r"normalize must be None, 'imagenet' or \(mean, std\), got 'cifar'"),
    Case("dm/normalize-zero-std", lambda t: _spurious(normalize=([0.5] * 3, [0.0, 1.0, 1.0])), ValueError,
         r"normalize: every std must be > 0, got \(0.0, 1.0, 1.0\)"),
    Case("dm/normalize-channels", lambda t: _spurious_setup(normalize=([0.5, 0.5], [0.2, 0.2])), ValueError,
         r"normalize has 2 channel values .* but the images have 3 channels"),
    Case("dm/lesions-image-size", lambda t: __import__("negspace.data_modules", fromlist=["x"])
         .SyntheticLesionDataModule(image_size=0), ValueError, r"image_size must be an int >= 8, got 0"),
    Case("dm/lesions-n-train", lambda t: __import__("negspace.data_modules", fromlist=["x"])
         .SyntheticLesionDataModule(n_train=0), ValueError, r"n_train must be an int >= 2, got 0"),
    Case("dm/green-pixel-n-val", lambda t: __import__("negspace.data_modules", fromlist=["x"])
         .GreenPixelDataModule(n_val=0), ValueError, r"n_val must be an int >= 1, got 0"),
    Case("dm/motion-width", lambda t: __import__("negspace.data_modules", fromlist=["x"])
         .MotionDataModule(width=0), ValueError,
         r"width must be >= 26 for max_objects=2, got 0"),
    Case("dm/image-dm-empty-train", lambda t: _image_dm(TensorDataset(torch.rand(0, 3, 4, 4))), ValueError,
         r"empty split: the training dataset has no samples"),
    Case("dm/image-dm-empty-val", lambda t: _image_dm(_Mixed(), val={"a": TensorDataset(torch.rand(0, 3, 4, 4))}),
         ValueError, r"empty split: 'a' has no samples"),
    Case("dm/image-dm-batch-size", lambda t: _image_dm(_Mixed(), batch_size=True), ValueError,
         r"batch_size must be a positive int, got True"),
    Case("dm/mixed-sizes-collate", lambda t: next(iter(_image_dm(_Mixed(), augment=False, batch_size=4)
                                                        .train_dataloader())), ValueError,
         r"cannot batch items of different shapes \(index, image shape\): .*\(3, 10, 10\).*size=\(H, W\)"),
    Case("dm/dict-tensor-labels-shape", lambda t: __import__("negspace.data_modules", fromlist=["x"])
         .DictTensorDataset(torch.rand(4, 3, 8, 8), torch.zeros(3)), ValueError, r"labels must be \(N,\) = \(4,\), got \(3,\)"),
    Case("dm/dict-tensor-masks-shape", lambda t: __import__("negspace.data_modules", fromlist=["x"])
         .DictTensorDataset(torch.rand(4, 3, 8, 8), torch.zeros(4), torch.zeros(4, 1, 4, 4)), ValueError,
         r"masks must be \(N, 1, H, W\)"),
    Case("dm/dict-tensor-images-3d", lambda t: __import__("negspace.data_modules", fromlist=["x"])
         .DictTensorDataset(torch.rand(3, 8, 8), torch.zeros(3)), ValueError, r"images must be \(N, C, H, W\), got \(3, 8, 8\)"),
]


# ---------------------------------------------------------------------------------------------------- folders/CSV
def _png(path: Path, size=(8, 8), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size[1], size[0]), color=0 if mode == "L" else (10, 20, 30)).save(path)
    return path


def _folder(tmp, sizes=((8, 8), (8, 8)), extra=None):
    for i, s in enumerate(sizes):
        _png(tmp / "imgs" / ("a" if i % 2 == 0 else "b") / f"{i}.png", s)
    for rel, text in (extra or {}).items():
        (tmp / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "imgs" / rel).write_text(text)
    return tmp / "imgs"


def _ifm(root, **kw):
    from negspace.data_modules import ImageFolderWithMasks

    return ImageFolderWithMasks(root, **kw)


def _csv(tmp, rows, header="image,label,mask"):
    p = tmp / "data.csv"
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return p


def _csvds(path, **kw):
    from negspace.data_modules import CSVImageDataset

    args = {"image_col": "image", "label_col": "label"}
    args.update(kw)
    return CSVImageDataset(path, **args)


def _hidden_ignored(tmp):
    ds = _ifm(_folder(tmp, extra={"a/.DS_Store": "x"}))
    assert len(ds) == 2


def _other_files_warn(tmp):
    with pytest.warns(UserWarning, match=r"1 file\(s\) or folder\(s\) .* skipped \(ignore_other_files=True\)"):
        ds = _ifm(_folder(tmp, extra={"a/notes.txt": "x"}), ignore_other_files=True)
    assert len(ds) == 2


def _mask_of_other_size(tmp):
    root = _folder(tmp)
    _png(tmp / "masks" / "a" / "0.png", (4, 4), mode="L")
    return _ifm(root, masks_root=tmp / "masks")[0]


def _resize_mixed_ok(tmp):
    ds = _ifm(_folder(tmp, sizes=((8, 8), (10, 12))), size=8)
    assert ds[1]["image"].shape == (3, 8, 8)


FOLDERS = [
    Case("folder/root-missing", lambda t: _ifm(t / "nope"), ValueError, r"root is not a directory: '.*nope'"),
    Case("folder/no-class-dirs", lambda t: (t / "r").mkdir() or _ifm(t / "r"), ValueError,
         r"no class sub-directories found"),
    Case("folder/no-images", lambda t: (t / "r" / "a").mkdir(parents=True) or _ifm(t / "r"), ValueError,
         r"no images with extensions"),
    Case("folder/other-file-not-skipped", lambda t: _ifm(_folder(t, extra={"a/notes.txt": "x"})), ValueError,
         r"1 file\(s\) or folder\(s\) .* are not images .*notes.txt.*ignore_other_files=True"),
    Case("folder/file-in-root-not-skipped", lambda t: _ifm(_folder(t, extra={"labels.csv": "x"})), ValueError,
         r"1 file\(s\) or folder\(s\) under .* not images .*labels.csv'\]; remove them or pass ignore_other_files"),
    Case("folder/other-files-warned", _other_files_warn, OK),
    Case("folder/hidden-files-ignored", _hidden_ignored, OK),
    Case("folder/mixed-sizes", lambda t: _ifm(_folder(t, sizes=((8, 8), (10, 12), (8, 8)))), ValueError,
         r"2 different sizes \(H x W\) and size=None: 8x8: 2 file\(s\).*10x12: 1 file\(s\).*pass size=\(8, 8\)"),
    Case("folder/mixed-sizes-resized-ok", _resize_mixed_ok, OK),
    Case("folder/size-bad", lambda t: _ifm(_folder(t), size=(8,)), ValueError,
         r"size must be None, a positive int or \(H, W\), got \(8,\)"),
    Case("folder/size-negative", lambda t: _ifm(_folder(t), size=-3), ValueError,
         r"size must be None, a positive int or \(H, W\), got -3"),
    Case("folder/class-not-in-class_names", lambda t: _ifm(_folder(t), class_names=["a"]), ValueError,
         r"class folders \['b'\] .* are not in class_names=\['a'\]"),
    Case("folder/class_names-without-folder", lambda t: _ifm(_folder(t), class_names=["a", "b", "c"]), ValueError,
         r"class_names \['c'\] have no folder"),
    Case("folder/masks-root-missing", lambda t: _ifm(_folder(t), masks_root=t / "nomasks"), ValueError,
         r"masks_root is not a directory"),
    Case("folder/require-masks", lambda t: (t / "m").mkdir() or _ifm(_folder(t), masks_root=t / "m",
                                                                    require_masks=True), ValueError,
         r"2 mask file\(s\) missing \(require_masks=True\)"),
    Case("folder/mask-size-differs", _mask_of_other_size, ValueError, r"has size 4x4 but its image is 8x8"),
    Case("folder/unreadable-image", lambda t: _ifm(_folder(t, extra={"a/bad.png": "not a png"})), ValueError,
         r"cannot read image .*bad.png"),
    Case("csv/missing-file", lambda t: _csvds(t / "none.csv"), ValueError, r"csv_path not found: '.*none.csv'"),
    Case("csv/missing-column", lambda t: _csvds(_csv(t, ["x.png,0,"]), label_col="class"), ValueError,
         r"label_col='class' is not a column of .*; columns: \['image', 'label', 'mask'\]"),
    Case("csv/missing-mask-column", lambda t: _csvds(_csv(t, ["x.png,0,"]), mask_col="seg"), ValueError,
         r"mask_col='seg' is not a column"),
    Case("csv/no-rows", lambda t: _csvds(_csv(t, [])), ValueError, r"has no data rows"),
    Case("csv/missing-image", lambda t: _csvds(_csv(t, ["x.png,0,"])), ValueError,
         r"1 file\(s\) listed in .* do not exist \(line, path\): \[\(2, '.*x.png'\)\]"),
    Case("csv/missing-mask", lambda t: _png(t / "x.png") and _csvds(_csv(t, ["x.png,0,m.png"]), mask_col="mask"),
         ValueError,
         r"1 file\(s\) listed in .* do not exist \(line, path\): \[\(2, '.*m.png'\)\]"),
    Case("csv/label-outside-class_names", lambda t: _png(t / "x.png") and _csvds(
        _csv(t, ["x.png,cat,"]), class_names=["dog"]), ValueError, r"1 label\(s\) outside the classes \['dog'\] .*\(2, 'cat'\)"),
    Case("csv/negative-label", lambda t: _png(t / "x.png") and _csvds(_csv(t, ["x.png,-1,"])), ValueError,
         r"labels must be >= 0, got -1"),
    Case("csv/mixed-sizes", lambda t: _png(t / "x.png") and _png(t / "y.png", (9, 9)) and _csvds(
        _csv(t, ["x.png,0,", "y.png,1,"])), ValueError, r"2 different sizes .*size=None.*pass size="),
    Case("csv/grey-image-read-as-rgb", lambda t: (_png(t / "x.png", mode="L") and _csvds(
        _csv(t, ["x.png,0,"]))[0]["image"].shape == (3, 8, 8)) or pytest.fail("grey must read as (3, H, W)"), OK),
]

# ------------------------------------------------------------------------------------------------------------ CLI


def _cli(argv):
    from negspace.cli import run_cli

    return run_cli(argv)


def _recipe(tmp, class_path):
    p = tmp / "r.yaml"
    p.write_text(f"trainer:\n  callbacks:\n    - class_path: {class_path}\n")
    return str(p)


def _main_exit(tmp):
    from negspace.cli import main

    with pytest.raises(SystemExit, match=r"negspace: error: .*has no class 'AttributionPrio'"):
        main(["fit", "--config", _recipe(tmp, "negspace.callbacks.AttributionPrio")])


CLI = [
    Case("cli/misspelt-callback", lambda t: _cli(["fit", "--config", _recipe(t, "negspace.callbacks.BiasedSplitReprt")]),
         ValueError, r"class_path 'negspace.callbacks.BiasedSplitReprt': 'negspace.callbacks' has no class "
                     r"'BiasedSplitReprt'; close names: \['negspace.callbacks.BiasedSplitReport'\]"),
    Case("cli/misspelt-module", lambda t: _cli(["fit", "--config", _recipe(t, "negspace.callbak.AttributionPrior")]),
         ValueError, r"module 'negspace.callbak' does not exist; close names: \['negspace.callbacks'\]"),
    Case("cli/misspelt-lightning-callback", lambda t: _cli(
        ["fit", "--config", _recipe(t, "lightning.pytorch.callbacks.EarlyStoping")]), ValueError,
         r"has no class 'EarlyStoping'; close names: \['lightning.pytorch.callbacks.EarlyStopping'"),
    Case("cli/misspelt-class-path-argument", lambda t: _cli(
        ["fit", "--data.class_path", "negspace.data_modules.SyntheticLesionDataModul"]), ValueError,
         r"has no class 'SyntheticLesionDataModul'; close names: \['negspace.data_modules.SyntheticLesionDataModule'"),
    Case("cli/main-exits-with-message", _main_exit, OK),
    Case("cli/demo-bad-seeds", lambda t: __import__("negspace.cli", fromlist=["x"]).demo_parser().parse_args(
        ["--seeds", "two"]), SystemExit, r"^2$"),  # argparse: "argument --seeds: invalid int value: 'two'" on stderr
    Case("cli/demo-unknown-flag", lambda t: __import__("negspace.cli", fromlist=["x"]).demo_parser().parse_args(
        ["--lamdas", "1"]), SystemExit, r"^2$"),  # "unrecognized arguments: --lamdas 1"
]

TABLE: list[Case] = MASKS + IMAGES + LABELS + OUTPUTS + CALLBACKS + CHECKPOINTS + DATA + FOLDERS + CLI


def _param(c: Case):
    marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
    return pytest.param(c, id=c.id, marks=marks)


def test_table_is_large_and_unique():
    ids = [c.id for c in TABLE]
    assert len(ids) >= 100 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", [_param(c) for c in TABLE])
def test_bad_input(case: Case, tmp_path, one_thread):
    if case.exc == OK:
        case.run(tmp_path)
        return
    with pytest.raises(case.exc, match=case.match or None):
        case.run(tmp_path)
