"""`bench/ours.py --pad-attention`: zero-padding the heads before the attention kernel must not change
what attention computes (output and the gradients of q, k and v), must leave other head sizes and masked
calls alone, and must restore PyTorch's function afterwards."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.ours import pad_attention_for


def _attend(q, k, v, **kwargs):
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))


def _inputs(d: int, keys: int = 48):
    g = torch.Generator().manual_seed(d)
    q = torch.randn(2, 3, 32, d, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, keys, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    return q, k, v


def test_padded_heads_compute_the_same_attention():
    q, k, v = _inputs(40)
    want = _attend(q, k, v)
    plain = F.scaled_dot_product_attention
    with pad_attention_for({40: 48}):
        assert F.scaled_dot_product_attention is not plain
        got = _attend(q, k, v)
        widened = F.scaled_dot_product_attention(q, k, v)
    assert F.scaled_dot_product_attention is plain
    assert widened.shape == q.shape
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_an_explicit_scale_is_kept():
    q, k, v = _inputs(40)
    want = _attend(q, k, v, scale=0.3)
    with pad_attention_for({40: 48}):
        got = _attend(q, k, v, scale=0.3)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_other_head_sizes_and_masks_pass_through():
    q, k, v = _inputs(24)
    mask = torch.ones(32, 48, dtype=torch.bool).tril()
    want = [_attend(q, k, v), _attend(*_inputs(40), attn_mask=mask)]
    with pad_attention_for({40: 48}):
        got = [_attend(q, k, v), _attend(*_inputs(40), attn_mask=mask)]
    for row_got, row_want in zip(got, want, strict=True):
        for a, b in zip(row_got, row_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
