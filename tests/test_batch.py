"""Batch layout rules shared by every callback and dataset-level function."""

from __future__ import annotations

import pytest
import torch

from negspace.batch import Batch, BatchKeys, unpack_batch

x, y, m, g = torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), torch.ones(2, 1, 4, 4), torch.tensor([1, 2])


def test_default_layouts():
    b = unpack_batch({"image": x, "label": y, "mask": m, "group": g})
    assert b.image is x and b.label is y and b.mask is m and b.group is g
    b = unpack_batch((x, y))
    assert b.image is x and b.label is y and b.mask is None and b.group is None
    assert unpack_batch(x).image is x and unpack_batch(x).label is None


def test_custom_keys_sequences_and_callables():
    assert unpack_batch({"x": x, "y": y}, ("x", "y")).label is y
    assert unpack_batch({"x": x, "seg": m}, {"image": "x", "mask": "seg"}).mask is m
    assert unpack_batch((x, y, g, m), {"mask": 3, "group": 2}).mask is m
    assert unpack_batch({"a": (x, y, m)}, lambda bt: bt["a"]).mask is m
    assert unpack_batch("ignored", lambda bt: Batch(x, y)).label is y


def test_clear_errors():
    with pytest.raises(ValueError, match=r"prior: the batch has no mask under key 'mask' \(batch keys: \['image', 'label'\]\)"):
        unpack_batch({"image": x, "label": y}, require=("image", "mask"), who="prior")
    with pytest.raises(ValueError, match="no label at position 1 of a 1-element batch"):
        unpack_batch((x,), require=("image", "label"))
    with pytest.raises(ValueError, match="unknown roles"):
        BatchKeys({"img": "x"})
    with pytest.raises(TypeError, match="batch_keys must be"):
        BatchKeys(42)
    with pytest.raises(TypeError, match="a batch must be"):
        unpack_batch(3.0)
    with pytest.raises(ValueError, match="gives label as key 'y', but the batch is a tuple"):
        unpack_batch((x, y), {"label": "y"})
