"""ClassifierModule: losses against hand-written formulas, model construction, optimiser choice, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from negspace.modules import ClassifierModule
from negspace.modules.classifier import unpack_batch


def test_bce_is_one_hot_bce_of_every_logit_and_ce_is_softmax_ce():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.25]])
    y = torch.tensor([0, 1])
    m = ClassifierModule(model=nn.Identity(), num_classes=2, loss="bce")
    sig = torch.sigmoid
    hand = -(math.log(sig(torch.tensor(2.0))) + math.log(1 - sig(torch.tensor(-1.0)))
             + math.log(1 - sig(torch.tensor(0.5))) + math.log(sig(torch.tensor(0.25)))) / 4
    assert float(m.compute_loss(logits, y)) == pytest.approx(hand, rel=1e-6)
    m = ClassifierModule(model=nn.Identity(), num_classes=2, loss="ce")
    lse = [math.log(math.exp(2.0) + math.exp(-1.0)), math.log(math.exp(0.5) + math.exp(0.25))]
    hand = ((lse[0] - 2.0) + (lse[1] - 0.25)) / 2
    assert float(m.compute_loss(logits, y)) == pytest.approx(hand, rel=1e-6)


def test_model_by_name_and_optimizers():
    m = ClassifierModule(model="xsmallcnn", num_classes=3)
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    assert isinstance(m.configure_optimizers(), torch.optim.Adam)
    m = ClassifierModule(model="green_pixel", optimizer="adamw", weight_decay=0.1)
    opt = m.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.1
    assert ClassifierModule(model="motion", in_chans=2).configure_optimizers() is None  # frozen, hand-set


def test_training_step_and_batches():
    torch.manual_seed(0)
    m = ClassifierModule(model=nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), num_classes=2)
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 1, 0])
    loss_dict = m.training_step({"image": x, "label": y, "mask": torch.zeros(4, 1, 2, 2)}, 0)
    loss_tuple = m.training_step((x, y), 0)
    assert loss_dict.requires_grad and torch.equal(loss_dict, loss_tuple)
    with pytest.raises(ValueError, match="no image under key 'image'"):
        unpack_batch({"img": x})


def test_errors():
    with pytest.raises(ValueError, match="loss"):
        ClassifierModule(model=nn.Identity(), loss="mse")
    with pytest.raises(ValueError, match="optimizer"):
        ClassifierModule(model=nn.Identity(), optimizer="rmsprop")
    with pytest.raises(TypeError, match="model"):
        ClassifierModule(model=3)
    with pytest.raises(ValueError, match="unknown model"):
        ClassifierModule(model="resnet_nope")
