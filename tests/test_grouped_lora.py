"""The grouped projections' autograd function (lora_core/grouped_lora.py) against the same maths written as
plain autograd: outputs and the gradients of the input and of every adapter weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_core import grouped_lora as gl
from lora_core.lora import LoRALinear


def _group(members: int, rank: int = 4, width: int = 24, outs: tuple[int, ...] | None = None,
           ranks: tuple[int, ...] | None = None, seed: int = 0):
    """LoRALinear layers without biases on one input, their base weights concatenated as the group has them;
    one scale for all (alpha = rank / 2)."""
    torch.manual_seed(seed)
    outs = outs or (width,) * members
    ranks = ranks or (rank,) * members
    layers = tuple(LoRALinear(nn.Linear(width, o, bias=False), rank=r, alpha=r / 2) for o, r in zip(outs, ranks, strict=True))
    for m in layers:
        nn.init.normal_(m.lora_up.weight, std=0.1)
        m.base.weight.requires_grad_(False)
    weight = torch.cat([m.base.weight for m in layers])
    return layers, weight


def _plain(x: torch.Tensor, weight: torch.Tensor, layers, scale: float) -> torch.Tensor:
    ups = [F.linear(F.linear(x, m.lora_down.weight), m.lora_up.weight) for m in layers]
    return F.linear(x, weight) + scale * torch.cat(ups, dim=-1)


def _grads(out: torch.Tensor, x: torch.Tensor, layers, seed: int = 3) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    params = [p for m in layers for p in (m.lora_down.weight, m.lora_up.weight)]
    return list(torch.autograd.grad(out, [x, *params], g.to(out.dtype)))


@pytest.mark.parametrize("members,outs,ranks", [(2, None, None), (3, None, None), (3, (24, 40, 8), None),
                                               (3, (24, 40, 8), (2, 8, 5))])
def test_the_function_gives_the_plain_output_and_gradients_in_fp32(members, outs, ranks):
    layers, weight = _group(members, outs=outs, ranks=ranks)
    x = torch.randn(2, 5, 24, requires_grad=True)
    want = _plain(x, weight, layers, 0.5)
    got = gl.grouped_lora(x, weight, layers, 0.5)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(_grads(got, x, layers), _grads(want, x, layers), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_the_backward_never_reads_its_unset_buffer(monkeypatch):
    """The down product's gradient is written member by member into an empty buffer with beta=0: a NaN
    left in that memory must not reach the gradients."""
    layers, weight = _group(3)
    x = torch.randn(7, 24, requires_grad=True)
    want = _grads(gl.grouped_lora(x, weight, layers, 1.0), x, layers)
    real = torch.empty_like
    monkeypatch.setattr(gl.torch, "empty_like", lambda t, **kw: real(t, **kw).fill_(float("nan")))
    got = _grads(gl.grouped_lora(x, weight, layers, 1.0), x, layers)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w)


def test_under_autocast_it_computes_in_bf16_and_gives_fp32_weight_gradients():
    layers, weight = _group(3)
    x = torch.randn(2, 6, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gl.grouped_lora(x, weight.bfloat16(), layers, 0.5)
        want = _plain(x, weight.bfloat16(), layers, 0.5)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    got_grads, want_grads = _grads(got, x, layers), _grads(want, x, layers)
    assert [g.dtype for g in got_grads] == [w.dtype for w in want_grads]  # fp32 input and adapter weights
    for g, w in zip(got_grads, want_grads, strict=True):
        assert ((g - w).norm() / w.norm()).item() < 2e-2


def test_weights_without_gradients_get_none_and_the_rest_still_train():
    layers, weight = _group(2)
    layers[0].lora_down.weight.requires_grad_(False)
    layers[1].lora_up.weight.requires_grad_(False)
    x = torch.randn(4, 24)  # no input gradient either
    out = gl.grouped_lora(x, weight, layers, 1.0)
    out.square().sum().backward()
    assert layers[0].lora_down.weight.grad is None and layers[1].lora_up.weight.grad is None
    assert layers[0].lora_up.weight.grad is not None and layers[1].lora_down.weight.grad is not None


def test_it_applies_where_the_plain_path_computes_in_the_compute_dtype():
    layers, _ = _group(2)
    assert gl.grouped_kernel_applies(torch.randn(2, 24), layers)
    assert not gl.grouped_kernel_applies(torch.randn(2, 24, dtype=torch.bfloat16), layers)  # CPU bf16: fp32 adapters
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gl.grouped_kernel_applies(torch.randn(2, 24), layers)


def test_a_working_copy_is_computed_with_and_the_gradients_go_to_the_fp32_weights(monkeypatch):
    """As in the single layers' function: the half-precision copies are only read; each weight gradient is
    asked of `_mm_as` in fp32 (on a GPU it comes straight out of the GEMM's accumulator) and lands on the
    fp32 weight, none on the copy."""
    layers, weight = _group(3, ranks=(2, 8, 5))
    for m in layers:
        m.work = (m.lora_down.weight.detach().bfloat16().requires_grad_(),
                  m.lora_up.weight.detach().bfloat16().requires_grad_())
    asked = []
    real = gl._mm_as
    monkeypatch.setattr(gl, "_mm_as", lambda a, b, dtype: asked.append(dtype) or real(a, b, dtype))
    x = torch.randn(2, 6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gl.grouped_lora(x, weight.bfloat16(), layers, 0.5)
    out.float().square().sum().backward()
    assert asked and all(dt == torch.float32 for dt in asked)
    for m in layers:
        assert m.lora_down.weight.grad.dtype == m.lora_up.weight.grad.dtype == torch.float32
        assert m.work[0].grad is None and m.work[1].grad is None
    with torch.no_grad():  # and the copies' values are the ones computed with
        layers[0].work[1].mul_(3.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            planted = gl.grouped_lora(x, weight.bfloat16(), layers, 0.5)
    assert not torch.allclose(planted.float(), out.detach().float())


def test_the_plain_path_switch_keeps_groups_off_the_function():
    layers, _ = _group(2)
    layers[1].fused = False  # performance.fused_lora = false
    assert not gl.grouped_kernel_applies(torch.randn(2, 24), layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_the_gpu_tracks_the_plain_path():
    layers, weight = _group(3, rank=16, width=320)
    for m in layers:
        m.cuda()
    weight = weight.cuda().bfloat16()
    x = torch.randn(2, 4096, 320, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = gl.grouped_lora(x, weight, layers, 1.0)
        want = _plain(x, weight, layers, 1.0)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    g = torch.randn(got.shape, device="cuda").bfloat16()
    params = [p for m in layers for p in (m.lora_down.weight, m.lora_up.weight)]
    for a, b in zip(torch.autograd.grad(got, [x, *params], g), torch.autograd.grad(want, [x, *params], g), strict=True):
        assert a.dtype == b.dtype and ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2
