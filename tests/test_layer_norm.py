"""The LayerNorm kernels (lora_core/layer_norm.py) against PyTorch's LayerNorm: values and gradients, with
the backward's rows split over several programs and tiles. On the CPU the kernels run in Triton's
interpreter (in a subprocess: the interpreter is chosen when Triton is imported); on a GPU compiled, in
bf16, at the UNet's shapes; and the UNet's LayerNorms take them when the switch is on."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from interpreted import cpu_only, worst_errors

from lora_core import layer_norm
from lora_core.half_norms import HalfLayerNorm, use_half_norms

CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint
    from lora_core import layer_norm
    layer_norm.TILE, layer_norm.BACKWARD_PROGRAMS = 64, 3  # several rows per tile, several tiles per program
    torch.manual_seed(0)

    # the first call, which builds the kernels, inside a gradient checkpoint
    x = torch.randn(4, 5, 12, requires_grad=True)
    y = checkpoint(lambda t: layer_norm.layer_norm(t, (12,), None, None, 1e-5) * 2, x, use_reentrant=False)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    ref_x = x.detach().requires_grad_()
    (want,) = torch.autograd.grad((F.layer_norm(ref_x, (12,)) * 2).square().sum(), ref_x)
    assert layer_norm._state["worked"] and not layer_norm._state["failed"]
    torch.testing.assert_close(gx, want, rtol=1e-4, atol=1e-4)

    worst, worst_half = 0.0, 0.0
    cases = [((2, 9, 10), "wb"), ((37, 40), "wb"), ((3, 7, 16), ""), ((5, 33), "w"), ((1, 3, 24), "b"), ((1, 6), "wb")]
    for dtype in (torch.float32, torch.bfloat16):
        for shape, params in cases:
            c = shape[-1]
            x = ((torch.randn(shape) * 3 + 5).to(dtype)).requires_grad_()  # a mean far from zero
            w = (torch.randn(c) + 1).to(dtype).requires_grad_() if "w" in params else None
            b = torch.randn(c).to(dtype).requires_grad_() if "b" in params else None
            y = layer_norm.layer_norm(x, (c,), w, b, 1e-5)
            assert y.shape == x.shape and y.dtype == dtype
            g = torch.randn(shape).to(dtype)
            ins = [t for t in (x, w, b) if t is not None]
            got = [y, *torch.autograd.grad(y, ins, g)]
            assert all(a.dtype == dtype for a in got)
            ref_in = [t.detach().double().requires_grad_() for t in ins]
            rw = ref_in[1] if w is not None else None
            rb = ref_in[-1] if b is not None else None
            ref = F.layer_norm(ref_in[0], (c,), rw, rb, eps=1e-5)
            want = [ref, *torch.autograd.grad(ref, ref_in, g.double())]
            for a, r in zip(got, want, strict=True):
                err = ((a.double() - r).abs().max() / r.abs().max().clamp_min(1)).item()
                if dtype == torch.float32:
                    worst = max(worst, err)
                else:
                    worst_half = max(worst_half, err)
    print("worst", worst, worst_half)
""")


@cpu_only
def test_kernels_match_layer_norm_in_the_interpreter():
    worst, worst_half = worst_errors(CHECK)
    assert worst < 1e-5 and worst_half < 3e-2  # fp32 against float64; bf16 rounding


def test_which_tensors_the_kernels_take():
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    w = torch.ones(16, dtype=torch.bfloat16)
    assert not layer_norm.applies(x, (16,), w)  # a CPU tensor: PyTorch's LayerNorm
    norm = torch.nn.LayerNorm(16).to(torch.bfloat16)
    assert use_half_norms(torch.nn.Sequential(norm), rows=True) == 1
    assert isinstance(norm, HalfLayerNorm) and norm.rows
    with torch.autocast("cpu", dtype=torch.bfloat16):  # on the CPU the module keeps PyTorch's maths
        torch.testing.assert_close(norm(x), F.layer_norm(x, (16,), norm.weight, norm.bias))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(16, 4096, 320), (4, 1024, 640), (2, 256, 1280), (3, 77, 768), (5, 1000)])
def test_kernels_match_layer_norm_on_the_gpu(shape):
    torch.manual_seed(0)
    c = shape[-1]
    x = (torch.randn(shape, device="cuda") * 2 + 1).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(c, device="cuda") + 1).to(torch.bfloat16).requires_grad_()
    b = torch.randn(c, device="cuda").to(torch.bfloat16).requires_grad_()
    assert layer_norm.applies(x, (c,), w)
    y = layer_norm.layer_norm(x, (c,), w, b, 1e-5)
    g = torch.randn(shape, device="cuda").to(torch.bfloat16)
    got = [y, *torch.autograd.grad(y, [x, w, b], g)]
    ref_in = [t.detach().float().requires_grad_() for t in (x, w, b)]
    ref = F.layer_norm(ref_in[0], (c,), ref_in[1], ref_in[2], eps=1e-5)
    want = [ref, *torch.autograd.grad(ref, ref_in, g.float())]
    for name, a, r in zip(["y", "dx", "dw", "db"], got, want, strict=True):
        err = ((a.float() - r).abs().max() / r.abs().max()).item()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"  # bf16 output rounding, fp32 reference


@pytest.mark.parametrize("on", [True, False])
def test_the_switch_decides_whether_the_unet_takes_the_kernels(on, fast_tiny_unet):
    unet = fast_tiny_unet(f"performance.fast_layer_norm={str(on).lower()}")
    norms = [m for m in unet.modules() if isinstance(m, HalfLayerNorm)]
    assert norms and all(m.rows == on for m in norms)


@pytest.mark.gpu
@gpu
def test_unet_layer_norms_take_the_kernels_in_training(fast_tiny_unet, monkeypatch):
    calls = []
    real = layer_norm._LayerNorm.apply
    monkeypatch.setattr(layer_norm._LayerNorm, "apply", lambda *a: calls.append(1) or real(*a))
    # channels-last, as training on a GPU runs: the blocks' tokens are then contiguous rows (in NCHW the first
    # norm of each block gets a transposed view, which PyTorch's LayerNorm takes)
    # the lean transformer blocks' norms take the residual variant (tests/test_lean_transformer.py)
    unet = fast_tiny_unet("performance.fast_layer_norm=true", "performance.channels_last=on",
                          "performance.lean_transformers=false").cuda()
    x = torch.randn(2, 4, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    x.requires_grad_()  # the UNet's own weights are frozen
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = unet(x, torch.tensor([10, 20], device="cuda"), ctx).sample
    out.float().square().mean().backward()
    assert len(calls) == len([m for m in unet.modules() if isinstance(m, HalfLayerNorm)])
