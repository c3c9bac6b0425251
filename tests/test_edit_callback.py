"""The ChannelEdit callback in a Trainer: make_permanent (bake at the end of fit: the final checkpoint loads into a
plain model), checkpoint state checked against the configured edit (issue 14 defect 1), old checkpoints; the
VirtualNeurons router baked at the end of fit."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers import hook_count
from negspace.callbacks import ChannelEdit
from negspace.editing import ChannelEdit as Edit
from negspace.editing import bake, bake_plan

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-6


def make_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),  # 0 1 2
        nn.Conv2d(6, 8, 3), nn.ReLU(),  # 3 4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),  # 5 6 7
    ).double()


class Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = make_net()
        self.hooks_in_validation: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.hooks_in_validation.append(hook_count(self.net))
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    return x, y


def loader(data, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=batch_size)  # tuple batches


def trainer(tmp_path, *callbacks, **kw) -> L.Trainer:
    opts = dict(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=2, logger=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                num_sanity_val_steps=0, callbacks=list(callbacks))
    return L.Trainer(**{**opts, **kw})


def plain(state: dict, prefix: str = "net.") -> nn.Sequential:
    """A fresh, unedited architecture with the checkpoint's weights (strict)."""
    net = make_net().eval()
    net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return net


def outputs(net: nn.Module, x: torch.Tensor, edit: Edit | None = None) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        if edit is None:
            return net(x)
        with edit.applied(net):
            return net(x)


def callback_state(ckpt: dict, cb: ChannelEdit) -> dict:
    return ckpt["callbacks"][cb.state_key]


# ------------------------------------------------------------------------------------------ make_permanent
@pytest.mark.parametrize(
    ("edits", "mode", "value", "how"),
    [
        ({"1": [0, 2], "3": [1], "7": [2]}, "ablate", 0.5, {"own"}),  # BatchNorm, Conv2d, Linear: own weights
        ({"2": [0, 1, 2]}, "preserve", "zero", {"next"}),  # a ReLU: folded into the next conv's input columns
    ],
)
def test_make_permanent_checkpoint_loads_into_a_plain_model(tmp_path, data, edits, mode, value, how):
    cb = ChannelEdit(edits, mode=mode, value=value, forward="net", make_permanent=True)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    lit = Lit()
    tr = trainer(tmp_path, cb, ckpt_cb)
    tr.fit(lit, loader(data), loader(data))
    assert cb.baked and not cb.active and hook_count(lit) == 0 and "(baked)" in repr(cb)
    assert lit.hooks_in_validation and set(lit.hooks_in_validation) == {len(edits)}  # hooked during fit's validation
    final = tmp_path / "final.ckpt"
    tr.save_checkpoint(final)
    ckpt = torch.load(final, weights_only=True)
    last = torch.load(ckpt_cb.last_model_path, weights_only=True)
    # ModelCheckpoint saved at the last validation end, before the bake: unedited weights, the edit in its state
    assert callback_state(last, cb)["permanent"] == 0 and callback_state(ckpt, cb)["permanent"] == 1
    x = data[0]
    hooked = outputs(plain(last["state_dict"]), x, Edit(edits, mode=mode, value=value))
    baked = plain(ckpt["state_dict"])  # strict: a plain architecture, no negspace module
    assert hook_count(baked) == 0
    torch.testing.assert_close(outputs(baked, x), hooked, atol=ATOL, rtol=0)
    assert (outputs(plain(last["state_dict"]), x) - hooked).abs().max() > 1e-3  # the edit does change the outputs
    assert {s.how for s in bake_plan(plain(last["state_dict"]), Edit(edits, mode=mode, value=value), x[:8])} == how
    # validating after fit: the weights hold the edit, the callback no longer hooks this network
    lit.hooks_in_validation.clear()
    tr.validate(lit, loader(data), verbose=False)
    assert set(lit.hooks_in_validation) == {0}
    torch.testing.assert_close(outputs(lit.net, x), hooked, atol=ATOL, rtol=0)


def test_make_permanent_with_a_mask_warns_and_loads_into_the_baked_architecture(tmp_path, data):
    edits = {"4": [1, 5]}
    cb = ChannelEdit(edits, value="mean", forward="net", make_permanent=True, stages="fit")
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    lit = Lit()
    tr = trainer(tmp_path, cb, ckpt_cb)
    with pytest.warns(UserWarning, match=r"could not be folded into weights everywhere \(4: value='mean' depends "
                      r"on the batch\).*'net\.4\.fill\.channels'.*load only into the baked architecture"):
        tr.fit(lit, loader(data), loader(data))
    assert type(lit.net[4]).__name__ == "EditedLayer" and hook_count(lit) == 0
    tr.save_checkpoint(tmp_path / "final.ckpt")
    state = torch.load(tmp_path / "final.ckpt", weights_only=True)["state_dict"]
    with pytest.raises(RuntimeError, match="Unexpected key"):
        plain(state)
    x = data[0]
    unedited = plain(torch.load(ckpt_cb.last_model_path, weights_only=True)["state_dict"])
    hooked = outputs(unedited, x, Edit(edits, value="mean"))
    rebuilt = bake(make_net(), Edit(edits, value="mean"), x[:8], inplace=True)  # the baked architecture
    rebuilt.load_state_dict({k[4:]: v for k, v in state.items()}, strict=True)
    torch.testing.assert_close(outputs(rebuilt, x), hooked, atol=ATOL, rtol=0)


def test_make_permanent_without_validation_data_uses_training_images(tmp_path, data):
    cb = ChannelEdit({"7": [2]}, value=-1.0, forward="net", make_permanent=True, stages="fit")
    lit = Lit()
    tr = trainer(tmp_path, cb, enable_checkpointing=False, limit_val_batches=0)
    tr.fit(lit, loader(data))
    assert cb.baked and type(lit.net[7]) is nn.Linear  # a Linear folds into its own weights only with an example
    x = data[0]
    torch.testing.assert_close(outputs(lit.net, x)[:, 2], torch.full((32,), -1.0, dtype=torch.float64), atol=0, rtol=0)
    tr.save_checkpoint(tmp_path / "final.ckpt")
    plain(torch.load(tmp_path / "final.ckpt", weights_only=True)["state_dict"])  # strict


def test_make_permanent_checks_options_layers_and_batch_layout_early(tmp_path, data):
    with pytest.raises(TypeError, match="make_permanent must be True or False, got 'yes'"):
        ChannelEdit({"1": [0]}, make_permanent="yes")
    lit = Lit()
    bad = ChannelEdit({"nope": [0]}, forward="net", make_permanent=True, stages="test")
    with pytest.raises(ValueError, match="nope"):  # at setup, before any training step
        trainer(tmp_path, bad).fit(lit, loader(data), loader(data))
    dicts = DataLoader([{"x": x, "y": y} for x, y in zip(*data, strict=True)], batch_size=16)
    cb = ChannelEdit({"1": [0]}, forward="net", make_permanent=True, batch_keys={"image": "image"})
    with pytest.raises(ValueError, match="batch_keys"):  # on the first batch, not at the end of fit
        trainer(tmp_path, cb, num_sanity_val_steps=1).fit(lit, loader(data), dicts)
    assert not cb.baked and hook_count(lit) == 0


def test_without_make_permanent_nothing_is_baked(tmp_path, data):
    cb = ChannelEdit({"1": [0]}, forward="net")
    lit = Lit()
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    trainer(tmp_path, cb, enable_checkpointing=False, limit_train_batches=0).fit(lit, loader(data), loader(data))
    assert not cb.baked and all(torch.equal(v, lit.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------------------------ checkpoint state
@pytest.fixture
def saved(tmp_path, data):
    """A checkpoint written with ChannelEdit({'1': [0, 2]}, value=0.5, forward='net')."""
    cb = ChannelEdit({"1": [0, 2]}, value=0.5, forward="net")
    tr = trainer(tmp_path, cb, enable_checkpointing=False)
    tr.validate(Lit(), loader(data), verbose=False)
    path = tmp_path / "saved.ckpt"
    tr.save_checkpoint(path)
    return path


def validate(tmp_path, data, cb: ChannelEdit, ckpt) -> Lit:
    lit = Lit()
    trainer(tmp_path, cb, enable_checkpointing=False).validate(lit, loader(data), ckpt_path=ckpt, verbose=False)
    return lit


MISMATCH = [
    ({"1": [1]}, 0.5, r"\{'1': \[1\]\}, mode='ablate', value=0\.5\)"),
    ({"1": [0, 2]}, "zero", r"\{'1': \[0, 2\]\}, mode='ablate', value='zero'\)"),
    ({"1": [0, 2]}, {"1": torch.full((6,), 0.5)}, r"\{'1': \[0, 2\]\}, mode='ablate', value=\{'1': \[0\.5, 0\.5, 0\.5, 0\.5, 0\.5, 0\.5\]\}\)"),
]


@pytest.mark.parametrize(("edits", "value", "configured"), MISMATCH)
def test_a_checkpoint_with_another_edit_is_an_error_naming_both(tmp_path, data, saved, edits, value, configured):
    cb = ChannelEdit(edits, value=value, forward="net")
    with pytest.raises(ValueError, match=r"the checkpoint holds the edit ChannelEdit\(\{'1': \[0, 2\]\}, "
                       r"mode='ablate', value=0\.5\), but this ChannelEdit callback is configured with ChannelEdit\("
                       + configured + r"; .*adopt_checkpoint=True"):
        validate(tmp_path, data, cb, saved)
    assert not cb.active


def test_the_same_edit_loads_and_adopt_checkpoint_takes_the_checkpoints_edit(tmp_path, data, saved):
    cb = ChannelEdit({"1": [2, 0]}, value=0.5, forward="net", stages="test")  # same edit; stages stay configured
    validate(tmp_path, data, cb, saved)
    assert cb.stages == ("test",) and cb.enabled
    same = ChannelEdit({"1": torch.tensor([0, 2])}, value=0.5, forward="net")
    validate(tmp_path, data, same, saved)
    cb = ChannelEdit({"1": [1]}, value="zero", forward="net", adopt_checkpoint=True)
    lit = validate(tmp_path, data, cb, saved)
    assert cb.edit.channels["1"].tolist() == [0, 2] and cb.edit.value == 0.5 and set(lit.hooks_in_validation) == {1}
    other = ChannelEdit({"3": [1]}, forward="net")  # other layers: another state key, the configuration is used
    with pytest.warns(UserWarning, match="ckpt_path"):  # Lightning: the checkpoint's callback is not configured
        validate(tmp_path, data, other, saved)
    assert list(other.edit.channels) == ["3"] and other.edit.channels["3"].tolist() == [1]


def test_checkpoint_state_loads_with_weights_only_and_bad_states_are_errors(saved):
    ckpt = torch.load(saved, weights_only=True)
    cb = ChannelEdit({"1": [0, 2]}, value=0.5, forward="net")
    state = callback_state(ckpt, cb)
    assert set(state) == {"edit", "stages", "enabled", "permanent"}
    cb.load_state_dict(state)
    with pytest.raises(ValueError, match=r"not a ChannelEdit checkpoint state: .*got \['stages'\]"):
        cb.load_state_dict({"stages": ["validate"]})


def test_old_checkpoints_with_the_root_key_still_load(tmp_path, data, saved):
    ckpt = torch.load(saved, weights_only=True)
    old_key = "ChannelEdit{'mode': 'ablate', 'layers': ('1',), 'root': 'net'}"  # the 0.1 key, field name root
    state = ckpt["callbacks"].pop(ChannelEdit({"1": [0]}, forward="net").state_key)
    ckpt["callbacks"][old_key] = {"edit": state["edit"], "stages": ["validate", "test"], "enabled": 1}  # 0.1 state
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    cb = ChannelEdit({"1": [0, 2]}, value=0.5, forward="net")
    assert cb.state_key == old_key
    lit = validate(tmp_path, data, cb, old)
    assert set(lit.hooks_in_validation) == {1}
    with pytest.warns(DeprecationWarning, match="root"):
        cb = ChannelEdit({"1": [0]}, value=0.5, root="net")
    with pytest.raises(ValueError, match=r"checkpoint holds the edit ChannelEdit\(\{'1': \[0, 2\]\}"):
        validate(tmp_path, data, cb, old)


# ------------------------------------------------------------------------------------ router callback
def test_virtual_neurons_make_permanent_bakes_the_router(tmp_path, data):
    from negspace.callbacks import VirtualNeurons

    with pytest.raises(ValueError, match="make_permanent must be True \\(needs edit=\\)"):
        VirtualNeurons("net.3", "net.2", [0], make_permanent=True)
    edit = {"neuron": 0, "virtual": 1, "scale": 0.0}
    cb = VirtualNeurons("3", "2", [0], k=2, n_ref=24, edit=edit, figures=False, forward="net", make_permanent=True)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    lit = Lit()
    tr = trainer(tmp_path, cb, ckpt_cb)
    with pytest.warns(UserWarning, match=r"VirtualNeurons\(make_permanent=True\).*RoutedLayer.*baked architecture"):
        tr.fit(lit, loader(data), loader(data))
    assert cb.baked and type(lit.net[3]).__name__ == "RoutedLayer" and hook_count(lit) == 0
    tr.save_checkpoint(tmp_path / "final.ckpt")
    state = torch.load(tmp_path / "final.ckpt", weights_only=True)["state_dict"]
    x = data[0]
    unedited = plain(torch.load(ckpt_cb.last_model_path, weights_only=True)["state_dict"])
    hooked = outputs(unedited, x, cb.router)
    assert (hooked - outputs(unedited, x)).abs().max() > 0  # the router changes something
    rebuilt = bake(make_net(), cb.router)
    rebuilt.load_state_dict({k[4:]: v for k, v in state.items()}, strict=True)
    torch.testing.assert_close(outputs(rebuilt, x), hooked, atol=ATOL, rtol=0)
    lit.hooks_in_validation.clear()
    tr.validate(lit, loader(data), verbose=False)  # baked: the router hook is not applied again
    assert set(lit.hooks_in_validation) == {0} and not cb.router.active
