"""Linear Explanations (paper 003): concepts, linear_explanation, simulation scores, callback, open_clip."""

from __future__ import annotations

import torch

from negspace.explain.clip import encode_images, encode_texts, load_clip


def test_tiny_clip_encodes_to_unit_vectors():
    torch.manual_seed(0)
    model, _preprocess, tokenizer = load_clip("tiny")
    x = torch.rand(5, 3, 32, 32)
    emb = encode_images(model, x, batch_size=2)
    assert emb.shape == (5, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    # batching does not change the result, and a DataLoader-style iterable of (image, label) works
    torch.testing.assert_close(emb, encode_images(model, [(x[:3], 0), (x[3:], 1)]), atol=1e-5, rtol=1e-5)
    txt = encode_texts(model, tokenizer, ["dog", "cat", "lesion"])
    assert txt.shape == (3, 32)
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(3))
