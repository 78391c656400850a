"""The channels-last GroupNorm kernels (lora_core/nhwc_norm.py) against PyTorch's GroupNorm: values and
gradients, in both layouts, with the work split over several programs and tiles. On the CPU the kernels
run in Triton's interpreter (in a subprocess: the interpreter is chosen when Triton is imported); on a
GPU compiled, in bf16, at the UNet's shapes; and the UNet's norm modules take them when they apply."""

from __future__ import annotations

import contextlib
import logging
import textwrap

import pytest
import torch
import torch.nn.functional as F
from interpreted import cpu_only, worst_errors
from torch.utils._python_dispatch import TorchDispatchMode

from lora_core import nhwc_norm

CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from lora_core import nhwc_norm
    nhwc_norm.TILE = 64  # several tiles per program, several programs per sample
    torch.manual_seed(0)

    def layout(t, kind):
        if kind == "cl":
            return t.contiguous(memory_format=torch.channels_last)
        if kind == "w1":  # [N, C, L, 1] from a [N, L, C] sequence: channels-last, W's stride meaningless
            return t[..., 0].permute(0, 2, 1).contiguous().permute(0, 2, 1).unsqueeze(-1)
        if kind == "hw_swapped":  # H and W not walkable as one pixel index
            return t.transpose(2, 3).contiguous().transpose(2, 3)
        return t.contiguous()

    worst = {torch.float32: 0.0, torch.bfloat16: 0.0}

    def check(shape, groups, x_kind, params, g_kind, dtype, silu):
        x = layout((torch.randn(shape) * 3 + 5).to(dtype), x_kind)  # a mean far from zero
        x.requires_grad_()
        w = (torch.randn(shape[1]) + 1).to(dtype).requires_grad_() if "w" in params else None
        b = torch.randn(shape[1]).to(dtype).requires_grad_() if "b" in params else None
        y = nhwc_norm.group_norm(x, groups, w, b, 1e-5, silu=silu)
        assert y.stride() == x.stride(), "the output left the input's layout"
        assert y.dtype == dtype
        g = layout(torch.randn(shape).to(dtype), g_kind)
        ins = [t for t in (x, w, b) if t is not None]
        got = [y, *torch.autograd.grad(y, ins, g)]
        assert all(a.dtype == dtype for a in got)
        ref_in = [t.detach().double().requires_grad_() for t in ins]
        # PyTorch's CPU backward fails for a bias without a weight: a weight of ones is the same norm
        rw = ref_in[1] if w is not None else torch.ones(shape[1], dtype=torch.double) if b is not None else None
        rb = ref_in[-1] if b is not None else None
        ref = F.group_norm(ref_in[0], groups, rw, rb, eps=1e-5)
        ref = F.silu(ref) if silu else ref
        want = [ref, *torch.autograd.grad(ref, ref_in, g.double())]
        for a, r in zip(got, want, strict=True):
            worst[dtype] = max(worst[dtype], ((a.double() - r).abs().max() / r.abs().max().clamp_min(1)).item())

    cases = [((2, 12, 5, 7), 3, "cl", "wb", "cl"), ((1, 40, 9, 9), 4, "cl", "wb", "nchw"),
             ((1, 40, 9, 9), 4, "nchw", "wb", "hw_swapped"), ((3, 8, 13, 11), 2, "cl", "", "cl"),
             ((1, 6, 30, 31), 3, "cl", "b", "cl"), ((2, 8, 37, 1), 4, "w1", "wb", "cl"),
             ((2, 8, 1, 37), 1, "cl", "w", "cl")]
    # (programs wanted, fewest channels per program): whole pixels; then pixels split by groups as well
    settings = [(16, 64, dtype, silu) for dtype in (torch.float32, torch.bfloat16) for silu in (False, True)]
    settings += [(256, 2, torch.float32, True)]
    for target, min_run, dtype, silu in settings:
        nhwc_norm.TARGET_PROGRAMS, nhwc_norm.MIN_RUN = target, min_run
        for shape, groups, x_kind, params, g_kind in cases:
            if min_run == 2:
                assert nhwc_norm._plan(shape[0], shape[2] * shape[3], shape[1], groups)[4] < groups or groups % 2
            else:
                assert nhwc_norm._plan(shape[0], shape[2] * shape[3], shape[1], groups)[4] == groups
            check(shape, groups, x_kind, params, g_kind, dtype, silu)
    # several whole groups per program, but not all of them (channels per group not a power of two)
    for shape, groups, target, min_run, gpp in [((1, 40, 5, 7), 8, 64, 10, 2), ((1, 30, 6, 6), 6, 64, 10, 3)]:
        nhwc_norm.TARGET_PROGRAMS, nhwc_norm.MIN_RUN = target, min_run
        assert nhwc_norm._plan(shape[0], shape[2] * shape[3], shape[1], groups)[4] == gpp
        check(shape, groups, "cl", "wb", "nchw", torch.float32, True)
    worst, worst_half = worst[torch.float32], worst[torch.bfloat16]
    print("worst", worst, worst_half)
""")


@cpu_only
def test_kernels_match_group_norm_in_the_interpreter():
    worst, worst_half = worst_errors(CHECK)
    assert worst < 1e-5 and worst_half < 3e-2  # fp32 against float64; bf16 rounding


def test_only_channels_last_half_cuda_tensors_apply():
    x = torch.randn(1, 8, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert not nhwc_norm.applies(x, None)  # a CPU tensor: PyTorch's own kernel
    assert not nhwc_norm.applies(x.float(), None)
    with pytest.raises(ValueError, match="8 channels do not split into 3 groups"):
        nhwc_norm.group_norm(x, 3, None, None, 1e-5)


def test_backward_kernels_that_do_not_build_fall_back_at_the_first_call(monkeypatch, caplog):
    """The first call builds the backward kernels too, so a machine where only they fail falls back before
    training starts rather than crashing at its first backward pass."""
    monkeypatch.setitem(nhwc_norm._state, "worked", False)
    monkeypatch.setitem(nhwc_norm._state, "failed", False)
    monkeypatch.setattr(nhwc_norm, "_launch_forward", lambda x, groups, *a: (
        torch.empty_like(x), torch.zeros(2, x.shape[0] * groups)))
    monkeypatch.setattr(nhwc_norm, "_launch_backward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no ptxas")))
    monkeypatch.setattr(nhwc_norm, "on_device", lambda x: contextlib.nullcontext())
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8), torch.randn(8)
    with caplog.at_level(logging.WARNING):
        y = nhwc_norm.group_norm(x, 4, w, b, 1e-5, silu=True)
    assert torch.allclose(y, F.silu(F.group_norm(x, 4, w, b, 1e-5)))
    assert nhwc_norm._state["failed"] and not nhwc_norm.available()
    assert "no ptxas" in caplog.text


class _CountCopies(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default)
        return func(*args, **(kwargs or {}))


def test_transformer_blocks_hand_back_channels_last_images_without_a_copy():
    from lora_core.models import load_model

    unet = load_model("tiny:sd1", device=torch.device("cpu")).unet.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim)
    t = torch.tensor([10, 500])
    block = next(m for m in unet.modules() if type(m).__name__ == "Transformer2DModel")
    seen = []
    block.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    blocks = sum(type(m).__name__ == "Transformer2DModel" for m in unet.modules())
    with torch.no_grad():
        with _CountCopies() as before:
            plain = unet(x, t, emb).sample
        assert nhwc_norm.keep_channels_last(unet) == blocks > 0
        with _CountCopies() as after:
            kept = unet(x, t, emb).sample
        contiguous = unet(x.contiguous(), t, emb).sample  # an NCHW input keeps diffusers' own path
    assert before.copies - after.copies == blocks, (before.copies, after.copies)
    assert seen[1].is_contiguous(memory_format=torch.channels_last) and not seen[1].is_contiguous()
    torch.testing.assert_close(kept, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(contiguous, plain, rtol=1e-4, atol=1e-5)


def test_pointwise_projections_run_as_linear_layers_with_the_same_gradients():
    """SD1's 1x1-convolution proj_in/proj_out on a channels-last image: linear layers over the pixels (no
    convolution runs), equal outputs and gradients to diffusers' path, fp32 on the CPU."""
    import copy

    from lora_core.models import load_model

    torch.manual_seed(0)
    plain = load_model("tiny:sd1", device=torch.device("cpu")).unet.to(memory_format=torch.channels_last)
    plain.requires_grad_(True)
    kept = copy.deepcopy(plain)
    nhwc_norm.keep_channels_last(kept)
    convs = []
    for m in kept.modules():
        if isinstance(m, nhwc_norm.Transformer2DModel):
            for proj in (m.proj_in, m.proj_out):
                assert nhwc_norm._pointwise(proj)
                proj.register_forward_hook(lambda *args: convs.append(1))
    x = torch.randn(2, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    emb, t = torch.randn(2, 77, plain.config.cross_attention_dim), torch.tensor([10, 500])
    outs = []
    for unet in (plain, kept):
        out = unet(x, t, emb).sample
        out.square().mean().backward()
        outs.append(out)
    assert not convs
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    want = dict(plain.named_parameters())
    for name, p in kept.named_parameters():
        if ".proj_in." in name or ".proj_out." in name:
            torch.testing.assert_close(p.grad, want[name].grad, rtol=1e-3, atol=1e-6, msg=name)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(1, 320, 64, 64), (2, 640, 32, 32), (4, 1280, 8, 8), (2, 320, 128, 128),
                                   (1, 128, 256, 256)])
def test_kernels_match_group_norm_on_the_gpu(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * 2 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(shape[1], device="cuda") + 1).to(torch.bfloat16)
    b = torch.randn(shape[1], device="cuda").to(torch.bfloat16)
    assert nhwc_norm.applies(x, w)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y = nhwc_norm.group_norm(x, 32, w, b, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, device="cuda").to(torch.bfloat16)
    got = [y, *torch.autograd.grad(y, [x, w, b], g)]
    ref_in = [t.detach().float().requires_grad_() for t in (x, w, b)]
    ref = F.group_norm(ref_in[0], 32, ref_in[1], ref_in[2], eps=1e-5)
    want = [ref, *torch.autograd.grad(ref, ref_in, g.float())]
    for name, a, r in zip(["y", "dx", "dw", "db"], got, want, strict=True):
        err = ((a.float() - r).abs().max() / r.abs().max()).item()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"  # bf16 output rounding, fp32 reference


@pytest.mark.gpu
@gpu
def test_unet_norms_take_the_kernels_in_channels_last():
    from lora_core.half_norms import use_half_norms
    from lora_core.models import load_model

    model = load_model("tiny:sd1", device=torch.device("cuda"))
    unet = model.unet.to(dtype=torch.bfloat16)
    x = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.bfloat16)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([10, 500], device="cuda")
    with torch.no_grad():
        plain = unet(x, t, emb).sample.float()
        unet.to(memory_format=torch.channels_last)
        use_half_norms(unet, nhwc=True)
        calls = []
        real = nhwc_norm._GroupNormNHWC.apply
        nhwc_norm._GroupNormNHWC.apply = lambda *a: calls.append(1) or real(*a)
        try:
            fast = unet(x.contiguous(memory_format=torch.channels_last), t, emb).sample.float()
        finally:
            nhwc_norm._GroupNormNHWC.apply = real
    assert calls, "no GroupNorm took the channels-last kernels"
    assert ((fast - plain).abs().max() / plain.abs().max()).item() < 3e-2


@pytest.mark.parametrize("on", [True, False])
def test_the_switch_decides_whether_the_unet_takes_the_kernels(on, fast_tiny_unet):
    from lora_core.half_norms import HalfGroupNorm

    unet = fast_tiny_unet(f"performance.nhwc_norms={str(on).lower()}")
    norms = [m for m in unet.modules() if isinstance(m, HalfGroupNorm)]
    blocks = [m for m in unet.modules() if isinstance(m, nhwc_norm.Transformer2DModel)]
    assert norms and blocks
    assert all(m.nhwc == on for m in norms)
    assert all((type(m) is nhwc_norm.ChannelsLastTransformer2DModel) == on for m in blocks)


def test_a_unet_with_channels_last_blocks_pickles():
    import io

    from lora_core.models import load_model

    unet = load_model("tiny:sd1", device=torch.device("cpu")).unet
    nhwc_norm.keep_channels_last(unet)
    buf = io.BytesIO()
    torch.save(unet, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert any(type(m) is nhwc_norm.ChannelsLastTransformer2DModel for m in again.modules())


@pytest.mark.gpu
@gpu
def test_which_gpu_tensors_the_kernels_take():
    cl = torch.randn(1, 64, 8, 8, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    assert nhwc_norm.applies(cl, w) and nhwc_norm.applies(cl, None)
    assert not nhwc_norm.applies(cl, w.float())  # parameters of another dtype: PyTorch's kernel
    assert not nhwc_norm.applies(cl.float(), None)
    assert not nhwc_norm.applies(cl.contiguous(), w)  # NCHW: only with any_layout (the VAE)
    assert nhwc_norm.applies(cl.contiguous(), w, any_layout=True)
    both = torch.randn(1, 64, 1, 1, device="cuda", dtype=torch.bfloat16)  # channels-last and contiguous at once
    assert not nhwc_norm.applies(both, w) and nhwc_norm.applies(both, w, any_layout=True)
    assert not nhwc_norm.applies(cl[:0], w)  # empty
