"""Objectives against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from negspace import objectives as obj
from negspace.attribution.engine import forward_objective


def test_logit_objectives():
    out = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    torch.testing.assert_close(obj.logit(1)(out), torch.tensor([3.0, -1.0]))
    torch.testing.assert_close(obj.logit([0, 2])(out), torch.tensor([[1.0, 2.0], [0.0, 5.0]]))
    torch.testing.assert_close(obj.logit(torch.tensor([2, 0]))(out), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(obj.top_logit()(out), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(obj.topk_sum(2)(out), torch.tensor([5.0, 5.0]))
    torch.testing.assert_close(obj.contrastive()(out), torch.tensor([1.0, 5.0]))
    torch.testing.assert_close(obj.contrastive(0, 1)(out), torch.tensor([-2.0, 1.0]))
    p = torch.softmax(torch.tensor([1.0, 3.0, 2.0]), 0)
    torch.testing.assert_close(obj.entropy()(out)[0], -(p * p.log()).sum())
    u = torch.zeros(1, 4)
    assert obj.entropy()(u).item() == pytest.approx(math.log(4))
    fixed = obj.top_logit().fix(out)
    torch.testing.assert_close(fixed(torch.tensor([[9.0, 0.0, 0.0], [9.0, 0.0, 1.0]])), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="out of range"):
        obj.logit(3)(out)
    with pytest.raises(ValueError, match="k must be"):
        obj.topk_sum(0)


def test_neuron_reductions_and_layout():
    act = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    n = obj.neuron("l", 1, reduce="mean")
    torch.testing.assert_close(n(act), act[:, 1].mean((1, 2)))
    torch.testing.assert_close(obj.neuron("l", 2, reduce="max")(act), act[:, 2].amax((1, 2)))
    torch.testing.assert_close(obj.neuron("l", 0, reduce="sum")(act), act[:, 0].sum((1, 2)))
    torch.testing.assert_close(obj.neuron("l", 0, reduce="center")(act), act[:, 0, 1, 1])
    torch.testing.assert_close(obj.neuron("l", [0, 2])(act), act[:, [0, 2]].mean((2, 3)))
    torch.testing.assert_close(obj.neuron("l", torch.tensor([2, 0]))(act), torch.stack([act[0, 2].mean(), act[1, 0].mean()]))
    tokens = torch.randn(2, 5, 4)  # (B, T, D): channel axis last
    torch.testing.assert_close(obj.neuron("l", 3)(tokens), tokens[..., 3].mean(1))
    with pytest.raises(ValueError, match="out of range for layer 'l' with 3 channels"):
        obj.neuron("l", 3)(act)
    with pytest.raises(ValueError, match="reduce must be one of"):
        obj.neuron("l", 0, reduce="median")
    d = obj.direction("l", [0.0, 3.0, 4.0])
    torch.testing.assert_close(d(act), (0.6 * act[:, 1] + 0.8 * act[:, 2]).mean((1, 2)))


def test_layer_objective_runs_model_up_to_layer():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    vals = forward_objective(m, x, obj.neuron("1", [0, 3]))
    torch.testing.assert_close(vals, torch.relu(m[0](x))[:, [0, 3]])
