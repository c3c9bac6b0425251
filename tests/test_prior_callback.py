"""AttributionPrior callback: an unmodified module trains exactly like a hand-written ``CE + λ·prior_loss`` loop."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers import is_wrapped
from negspace.callbacks import AttributionPrior
from negspace.hooks import frozen_norm_stats
from negspace.priors import non_target_classes, prior_loss

B, N_BATCHES, HW = 4, 4, 6


class Net(nn.Module):
    def __init__(self, num_classes: int = 2, bn: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4 * 3 * 3, num_classes)

    def forward(self, x):
        h = F.avg_pool2d(F.softplus(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1))


class Module(L.LightningModule):
    """A plain classifier that knows nothing about priors."""

    def __init__(
        self, num_classes: int = 2, fail_at: int | None = None, dict_out: bool = False, bn: bool = True
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net(num_classes, bn)
        self.fail_at = fail_at
        self.dict_out = dict_out

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("user error in training_step")
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])
        loss = F.cross_entropy(self(x), y)
        return {"loss": loss, "ce": loss.detach()} if self.dict_out else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def make_data(num_classes: int = 2, n: int = B * N_BATCHES, seed: int = 0, all_masked: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, HW, HW, generator=g)
    y = torch.arange(n) % num_classes
    mask = torch.zeros(n, 1, HW, HW)
    mask[y == 0, :, :3, :3] = 1.0  # spurious patch on class-0 samples only (half the batch unmasked)
    if all_masked:
        mask[y != 0, :, 3:, 3:] = 1.0
    x[y == 0, :, :3, :3] = 0.9
    return x, y, mask


class DictData(Dataset):
    def __init__(self, x, y, mask, as_tuple: bool = False) -> None:
        self.x, self.y, self.mask, self.as_tuple = x, y, mask, as_tuple

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        if self.as_tuple:
            return self.x[i], self.y[i], self.mask[i], 0
        return {"image": self.x[i], "label": self.y[i], "mask": self.mask[i], "group": 0}


def loader(num_classes=2, as_tuple=False, all_masked=False):
    data = DictData(*make_data(num_classes, all_masked=all_masked), as_tuple=as_tuple)
    return DataLoader(data, batch_size=B, shuffle=False)


def trainer(callbacks, **kw):
    kw.setdefault("max_epochs", 1)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def hand_shared_prior(module, xr, logits, y, mask, *, mode="presence_absence", non_target="complement",
                      generator=None):
    """norm_mode='shared' by hand: one backward per class of the masked rows' logits of the full-batch forward
    ``logits = module(xr)``, read off at the masked rows (eqs. 2/3 of paper 000)."""
    idx = (mask.flatten(1).sum(1) > 0).nonzero().flatten()
    if idx.numel() == 0:
        return logits.sum() * 0.0
    yi = y[idx]
    if mode == "presence":
        classes = yi[:, None]
    else:
        classes = non_target_classes(yi, logits[idx].detach(), non_target, generator)
    m = mask[idx]
    terms = []
    for k in range(classes.shape[1]):
        (g,) = torch.autograd.grad(logits[idx].gather(1, classes[:, k : k + 1]).sum(), xr, create_graph=True)
        a = (g[idx] * xr.detach()[idx]).abs()
        terms.append((a * m).flatten(1).sum(1) / (m.flatten(1).sum(1) + 1e-5))
    per = 2 * terms[0] if mode == "presence" else terms[0] + torch.stack(terms[1:], 1).mean(1)
    return per.sum() / len(xr)


def reference(lam, *, mode="presence_absence", epochs=1, accumulate=1, autocast=None, scaler=None, num_classes=2,
              non_target="complement", gen_seed=None, bn=True, all_masked=False, shared=None, **prior_kw):
    """Plain PyTorch loop: loss = CE + λ·prior (prior with autocast off). ``shared`` (default: for BN models
    with input×gradient, what norm_mode='auto' does) uses the training forward's logits (recomputed in full
    precision under autocast, running statistics untouched); otherwise ``prior_loss``."""
    module = Module(num_classes, bn=bn)
    module.train()
    if shared is None:
        shared = bn and prior_kw.get("method", "input_x_gradient") == "input_x_gradient"
    opt = module.configure_optimizers()
    x, y, mask = make_data(num_classes, all_masked=all_masked)
    gen = torch.Generator().manual_seed(gen_seed) if gen_seed is not None else None
    i = 0
    for _ in range(epochs):
        for s in range(0, len(x), B):
            xb, yb, mb = x[s : s + B], y[s : s + B], mask[s : s + B]
            xr = xb.clone().requires_grad_(shared)
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                logits = module(xr)
                ce = F.cross_entropy(logits, yb)
                with torch.autocast("cpu", enabled=False):
                    if not shared:
                        pen = prior_loss(module, xb, yb, mb, mode=mode, non_target=non_target, generator=gen,
                                         **prior_kw)
                    else:
                        if autocast is not None:
                            with frozen_norm_stats(module):
                                logits = module(xr)
                        pen = hand_shared_prior(module, xr, logits.float(), yb, mb, mode=mode, non_target=non_target,
                                                generator=gen)
                loss = ce + lam * pen
            loss = loss / accumulate
            (scaler.scale(loss) if scaler is not None else loss).backward()
            i += 1
            if i % accumulate == 0:
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad()
    return module


def assert_same_state(a: nn.Module, b: nn.Module, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


def fit(cb, module=None, **kw):
    module = module or Module()
    dl = kw.pop("dataloader", None) or loader()
    trainer(cb if isinstance(cb, list) else [cb], **kw).fit(module, dl)
    return module


# ------------------------------------------------------------------------------------------ exactness
def test_32true_equals_plain_loop_and_no_wrapper_left():
    module = fit(AttributionPrior(lam=3.0))
    assert_same_state(module, reference(3.0), rtol=1e-5, atol=1e-6)
    assert not is_wrapped(module) and "training_step" not in module.__dict__
    # the prior changed training (the comparison could fail) and BN stats are those of the CE forwards only
    plain = reference(0.0)
    assert not torch.allclose(module.net.fc.weight, plain.net.fc.weight)


def test_dict_output_tuple_batches_presence():
    module = Module(dict_out=True)
    fit(AttributionPrior(lam=2.0, mode="presence"), module, dataloader=loader(as_tuple=True))
    assert_same_state(module, reference(2.0, mode="presence"), rtol=1e-5, atol=1e-6)


def test_integrated_gradients_method():
    module = fit(AttributionPrior(lam=3.0, method="integrated_gradients", n_steps=4))
    ref = reference(3.0, method="integrated_gradients", n_steps=4)
    assert_same_state(module, ref, rtol=1e-5, atol=1e-6)


def test_accumulate_grad_batches():
    module = fit(AttributionPrior(lam=3.0), accumulate_grad_batches=2)
    assert_same_state(module, reference(3.0, accumulate=2), rtol=1e-5, atol=1e-6)


def test_bf16_mixed_against_autocast_reference():
    module = fit(AttributionPrior(lam=3.0), precision="bf16-mixed")
    assert_same_state(module, reference(3.0, autocast=torch.bfloat16), rtol=1e-4, atol=1e-5)


def test_16_mixed_with_grad_scaler_on_cpu():
    plugin = MixedPrecision("16-mixed", "cpu")
    assert plugin.scaler is not None
    module = fit(AttributionPrior(lam=3.0), plugins=[plugin])
    ref = reference(3.0, autocast=torch.float16, scaler=torch.amp.GradScaler("cpu"))
    assert_same_state(module, ref, rtol=1e-4, atol=1e-5)


def test_start_step_schedule_and_two_instances():
    a = AttributionPrior(lam=2.0, mode="presence", start_step=2, name="pres")
    b = AttributionPrior(lam=1.0, lam_schedule="linear:2", name="pa")
    assert a.state_key != b.state_key
    assert [a.effective_lam(s) for s in range(4)] == [0.0, 0.0, 2.0, 2.0]
    assert [b.effective_lam(s) for s in range(3)] == [0.5, 1.0, 1.0]
    module = Module()
    tr = trainer([a, b])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(module, loader())
    assert not [w for w in caught if "did not see" in str(w.message)]  # both priors share one captured forward
    assert not is_wrapped(module)
    # reference: step s gets 2·[s>=2]·presence + min(1,(s+1)/2)·presence_absence
    ref = Module()
    opt = ref.configure_optimizers()
    x, y, mask = make_data()
    for s in range(N_BATCHES):
        xb, yb, mb = x[s * B : (s + 1) * B], y[s * B : (s + 1) * B], mask[s * B : (s + 1) * B]
        xr = xb.clone().requires_grad_(True)
        logits = ref(xr)  # BatchNorm model: both priors differentiate the training forward (norm_mode="auto")
        loss = F.cross_entropy(logits, yb)
        if s >= 2:
            loss = loss + 2.0 * hand_shared_prior(ref, xr, logits, yb, mb, mode="presence")
        loss = loss + min(1.0, (s + 1) / 2) * hand_shared_prior(ref, xr, logits, yb, mb)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert_same_state(module, ref, rtol=1e-5, atol=1e-6)
    metrics = tr.callback_metrics
    for key in ("pres/penalty", "pa/penalty", "pa/mass_in_mask", "pa/lam"):
        assert key in metrics, sorted(metrics)
    assert 0 < float(metrics["pa/mass_in_mask"]) < 1


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    kw = {"lam": 2.0, "non_target": "sample:1", "seed": 7}
    full = Module(num_classes=3)
    trainer([AttributionPrior(**kw)], max_epochs=2).fit(full, loader(3))

    first = Module(num_classes=3)
    t1 = trainer([AttributionPrior(**kw)], max_epochs=1)
    t1.fit(first, loader(3))
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    cb_states = [v for k, v in state["callbacks"].items() if k.startswith("AttributionPrior")]
    assert cb_states and cb_states[0]["penalised_batches"] == N_BATCHES
    assert isinstance(cb_states[0]["generator_state"], torch.Tensor)

    resumed = Module(num_classes=3)
    trainer([AttributionPrior(**kw)], max_epochs=2).fit(resumed, loader(3), ckpt_path=ckpt)
    assert_same_state(resumed, full, rtol=0, atol=0)
    # and the run is the hand-written loop with the same class draws
    assert_same_state(full, reference(2.0, epochs=2, num_classes=3, non_target="sample:1", gen_seed=7),
                      rtol=1e-5, atol=1e-6)


def _count_net_calls(module):
    calls = []
    module.net.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("share", ["auto", True])
def test_shared_forward_equals_separate_pass_without_batchnorm(share):
    module = Module(bn=False)
    calls = _count_net_calls(module)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batch["image"].requires_grad)

    tr = trainer([AttributionPrior(lam=3.0, share_forward=share), Spy()])
    tr.fit(module, loader(all_masked=True))
    assert calls == [B] * N_BATCHES  # one (shared) forward per step, no separate prior pass
    assert seen == [False] * N_BATCHES  # the user's batch tensors are not modified
    assert_same_state(module, reference(3.0, bn=False, all_masked=True), rtol=1e-5, atol=1e-6)
    assert "attribution_prior/mass_in_mask" in tr.callback_metrics


def test_shared_forward_fallbacks():
    # auto + train-mode BatchNorm: the training forward itself (norm_mode="shared"), no extra pass
    module = Module()
    calls = _count_net_calls(module)
    fit(AttributionPrior(lam=3.0), module)
    assert calls == [B] * N_BATCHES
    # share_forward=False (deprecated alias of norm_mode="separate"): separate pass on the masked samples
    module = Module()
    calls = _count_net_calls(module)
    with pytest.warns(DeprecationWarning, match="norm_mode"):
        cb = AttributionPrior(lam=3.0, share_forward=False)
    assert cb.norm_mode == "separate"
    fit(cb, module)
    assert calls == [B, B // 2] * N_BATCHES
    # auto + no BatchNorm but only half the batch masked: separate pass on the masked half is as cheap
    module = Module(bn=False)
    calls = _count_net_calls(module)
    fit(AttributionPrior(lam=3.0), module)
    assert calls == [B, B // 2] * N_BATCHES
    # share_forward=True with half masked: shared
    module = Module(bn=False)
    calls = _count_net_calls(module)
    fit(AttributionPrior(lam=3.0, share_forward=True), module)
    assert calls == [B] * N_BATCHES
    assert_same_state(module, reference(3.0, bn=False), rtol=1e-5, atol=1e-6)
    # under autocast it falls back to the separate full-precision pass (with a warning when asked for)
    module = Module(bn=False)
    with pytest.warns(UserWarning, match="falls back"):
        fit(AttributionPrior(lam=3.0, share_forward=True), module, precision="bf16-mixed")
    assert_same_state(module, reference(3.0, autocast=torch.bfloat16, bn=False), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="share_forward"):
        AttributionPrior(share_forward=True, method="integrated_gradients")
    with pytest.raises(ValueError, match="share_forward"):
        AttributionPrior(share_forward="yes")


# --------------------------------------------------------------------------------- wrapper lifecycle
def test_no_wrapper_left_after_exception_in_training_step():
    module = Module(fail_at=1)
    cb = AttributionPrior()
    with pytest.raises(RuntimeError, match="user error"):
        fit(cb, module)
    assert not is_wrapped(module) and "training_step" not in module.__dict__
    assert cb.penalised_batches == 1


class ManualModule(Module):
    def __init__(self, prior: AttributionPrior) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.prior = prior
        self.penalties: list[float] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.cross_entropy(self(batch["image"]), batch["label"])
        pen = self.prior.penalty(self, batch)
        self.penalties.append(float(pen.detach()))
        opt.zero_grad()
        self.manual_backward(loss + pen)
        opt.step()


def test_manual_optimisation_warns_and_penalty_call_works():
    cb = AttributionPrior(lam=3.0)
    module = ManualModule(cb)
    with pytest.warns(UserWarning, match="manual optimization"):
        fit(cb, module)
    assert not is_wrapped(module)
    assert_same_state(module.net, reference(3.0).net, rtol=1e-5, atol=1e-6)
    assert all(p > 0 for p in module.penalties)


class ManualAutoModule(ManualModule):
    def __init__(self, prior: AttributionPrior, with_task: bool) -> None:
        super().__init__(prior)
        self.with_task = with_task

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.cross_entropy(self(batch["image"]), batch["label"])
        pen = self.prior.penalty(self, batch, task_loss=loss if self.with_task else None)
        opt.zero_grad()
        self.manual_backward(loss + pen)
        opt.step()


@pytest.mark.parametrize("with_task", [True, False])
def test_manual_optimisation_calibrates_and_monitors_only_with_the_task_loss(with_task):
    cb = AttributionPrior(lam="auto")
    module = ManualAutoModule(cb, with_task)
    with pytest.warns(UserWarning, match="manual optimization"):
        fit(cb, module)
    assert cb.calibrated == with_task and (cb.lam != 1.0) == with_task
    assert (cb.monitor.state_dict()["steps"] > 0) == with_task


class DictForward(Module):
    def forward(self, x):
        return {"logits": self.net(x), "features": x.mean()}

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"])["logits"], batch["label"])


def test_forward_option_and_batch_keys():
    data = [({"x": xb, "y": yb, "m": mb}) for xb, yb, mb in zip(*(t.split(B) for t in make_data()))]

    class KeyModule(Module):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["x"]), batch["y"])

    module = KeyModule()
    fit(AttributionPrior(lam=3.0, batch_keys={"image": "x", "label": "y", "mask": "m"}, forward="net"), module,
        dataloader=DataLoader(data, batch_size=None))
    assert_same_state(module, reference(3.0), rtol=1e-5, atol=1e-6)
    # a forward that returns a dict: picked via "logits"
    module = DictForward()
    fit(AttributionPrior(lam=3.0), module)
    assert_same_state(module, reference(3.0), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- errors
def _bad_loader(**change):
    x, y, mask = make_data()
    items = [{"image": x[i], "label": y[i], "mask": mask[i]} for i in range(len(x))]
    for it in items:
        for k, v in change.items():
            if v is None:
                it.pop(k)
            else:
                it[k] = v(it[k])
    return DataLoader(items, batch_size=B)


@pytest.mark.parametrize(
    ("change", "err", "match"),
    [
        ({"mask": None}, ValueError, "no mask under key 'mask'"),
        ({"mask": lambda m: m[:, :3, :]}, ValueError, "does not broadcast"),
        ({"mask": lambda m: m * 3}, ValueError, r"values must lie in \[0, 1\]"),
    ],
)
def test_batch_errors(change, err, match):
    module = Module()
    with pytest.raises(err, match=match):
        fit(AttributionPrior(), module, dataloader=_bad_loader(**change))
    assert not is_wrapped(module)


def _nan_forward(module, x):
    # d/dx sqrt(x) is inf at x == 0, times 0 → NaN gradients, hence a NaN attribution and penalty
    return module(x) + 0.0 * x.sqrt().flatten(1).sum(1, keepdim=True)


def test_nan_penalty_raises_or_skips():
    x, y, mask = make_data()
    x[0, :, 0, 0] = 0.0  # inside the mask of sample 0
    dl = DataLoader(DictData(x, y, mask), batch_size=B)
    module = Module()
    with pytest.raises(FloatingPointError, match="on_nan='skip'"):
        fit(AttributionPrior(forward=_nan_forward), module, dataloader=dl)
    assert not is_wrapped(module)
    module = Module()
    with pytest.warns(RuntimeWarning, match="skipping the prior"):
        fit(AttributionPrior(lam=3.0, forward=_nan_forward, on_nan="skip"), module, dataloader=dl)
    for p in module.parameters():
        assert torch.isfinite(p).all()


def test_constructor_errors():
    with pytest.raises(ValueError, match="lam"):
        AttributionPrior(lam=-1)
    with pytest.raises(ValueError, match="mode"):
        AttributionPrior(mode="absence")
    with pytest.raises(ValueError, match="non_target"):
        AttributionPrior(non_target="top:x")
    with pytest.raises(ValueError, match="lam_schedule"):
        AttributionPrior(lam_schedule="cosine")
    with pytest.raises(ValueError, match="on_nan"):
        AttributionPrior(on_nan="ignore")
    with pytest.raises(ValueError, match="batch_keys"):
        AttributionPrior(batch_keys={"img": "x"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AttributionPrior(batch_keys=("x", "y", "m"), forward="model.net")


def test_two_instances_with_the_same_name_fail_at_setup():
    module = Module()
    with pytest.raises(ValueError, match="name="):
        fit([AttributionPrior(lam=1.0), AttributionPrior(lam=2.0, mode="presence")], module)
    assert not is_wrapped(module) and "training_step" not in module.__dict__
