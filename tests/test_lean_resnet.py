"""The lean ResNet blocks (lora_core/lean_resnet.py) against diffusers' ResnetBlock2D: the same outputs and
gradients (parameters' too), channels-last kept without a layout copy, adapters on the convolutions
honoured, blocks the lean forward does not cover left as they are, and the first GroupNorm's kernels
summing the shortcut's gradient (lora_core/nhwc_norm.py, `residual_group_norm`; in Triton's interpreter on
the CPU)."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from interpreted import cpu_only, worst_errors
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lora_core.inject import inject
from lora_core.lean_resnet import LeanResnetBlock2D, use_lean_resnets
from lora_core.models import load_model

CL = torch.channels_last


class Copies(TorchFunctionMode):
    """Counts `.contiguous()` calls that made a copy."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.contiguous and out.data_ptr() != args[0].data_ptr():
            self.n += 1
        return out


class Convolutions(TorchDispatchMode):
    """Counts convolutions run without a bias (the lean block moves conv1's, and conv2's where a shortcut
    convolution takes it) and with one."""

    def __init__(self) -> None:
        super().__init__()
        self.without_bias = self.with_bias = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            if args[2] is None:
                self.without_bias += 1
            else:
                self.with_bias += 1
        return func(*args, **(kwargs or {}))


def _pair(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(diffusers' block, a deep copy made lean), in training mode."""
    lean = copy.deepcopy(block)
    assert use_lean_resnets(lean) == sum(isinstance(m, ResnetBlock2D) for m in lean.modules())
    return block.train(), lean.train()


def _run(block: nn.Module, x: torch.Tensor, temb: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    out = block(x, temb)
    out.backward(grad)
    return out, x.grad, {n: p.grad for n, p in block.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("out_channels", "scale"), [(32, 1.0), (64, 1.0), (64, 2.0)])
def test_lean_block_computes_what_diffusers_block_does(out_channels, scale):
    torch.manual_seed(0)
    ref, lean = _pair(ResnetBlock2D(in_channels=32, out_channels=out_channels, temb_channels=16, groups=8,
                                    output_scale_factor=scale))
    assert type(lean) is LeanResnetBlock2D and (lean.conv_shortcut is not None) == (out_channels != 32)
    x = torch.randn(2, 32, 8, 8).to(memory_format=CL)
    temb, grad = torch.randn(2, 16), torch.randn(2, out_channels, 8, 8)
    want, want_dx, want_dp = _run(ref, x, temb, grad)
    with Copies() as copies, Convolutions() as convs:
        got, got_dx, got_dp = _run(lean, x, temb, grad)
    assert copies.n == 0
    shortcut = out_channels != 32  # then conv2's bias joins the shortcut's, else it stays on conv2
    assert (convs.without_bias, convs.with_bias) == ((2, 1) if shortcut else (1, 1)), vars(convs)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_dx, want_dx, rtol=1e-5, atol=1e-5)
    assert got_dp.keys() == want_dp.keys()
    for name in want_dp:  # the biases that moved get the gradient they had where they were
        torch.testing.assert_close(got_dp[name], want_dp[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_copy_counter_sees_a_layout_copy():
    x = torch.randn(1, 4, 3, 3).to(memory_format=CL)
    with Copies() as copies:
        x.contiguous()
    assert copies.n == 1


@pytest.mark.parametrize("targets", ["attn", "conv"])
def test_unet_with_lean_blocks_matches_diffusers(targets):
    """tiny:sd1's UNet with adapters (given non-zero up weights) on its attention layers, where the lean blocks
    move the convolutions' biases, or on its ResNet convolutions too, where they take the adapters' path."""
    torch.manual_seed(0)
    unet = load_model("tiny:sd1").unet.float()
    loras = inject(unet, [], "sd1", targets=targets, text_encoder=False)
    for m in loras.values():
        nn.init.normal_(m.lora_up.weight, std=0.02)
    ref, lean = _pair(unet)
    wrapped = [type(m.conv1) is not nn.Conv2d for m in lean.modules() if isinstance(m, LeanResnetBlock2D)]
    assert all(wrapped) if targets == "conv" else not any(wrapped)
    c = unet.config
    x = torch.randn(2, c.in_channels, 16, 16).to(memory_format=CL)
    ctx = torch.randn(2, 7, c.cross_attention_dim)
    t = torch.tensor([10, 500])
    want = ref(x, t, ctx).sample
    with Convolutions() as convs:
        got = lean(x, t, ctx).sample
    if targets == "attn":  # (the conv adapters' own convolutions have no bias)
        assert convs.without_bias > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    want.square().mean().backward()
    got.square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in lean.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-3, atol=1e-6, msg=name)


def test_blocks_the_lean_forward_does_not_cover_keep_diffusers_forward():
    resampling = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4, up=True)
    scale_shift = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4,
                                time_embedding_norm="scale_shift")
    plain = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4)
    model = nn.ModuleList([resampling, scale_shift, plain])
    keys = list(model.state_dict())
    assert use_lean_resnets(model) == 1
    assert [type(m) for m in model] == [ResnetBlock2D, ResnetBlock2D, LeanResnetBlock2D]
    assert list(model.state_dict()) == keys


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("out_channels", [320, 640])
def test_lean_block_on_the_gpu_fuses_each_silu_into_its_groupnorm(out_channels, monkeypatch):
    """bf16, channels-last, the GroupNorm kernels: both norms take the fused SiLU, and the block agrees with
    diffusers' (fp32 on the GPU) to bf16 rounding, forward and backward."""
    from lora_core import nhwc_norm
    from lora_core.half_norms import use_half_norms

    torch.manual_seed(0)
    ref = ResnetBlock2D(in_channels=320, out_channels=out_channels, temb_channels=1280, groups=32).cuda()
    ref.requires_grad_(False)
    fast = copy.deepcopy(ref).to(torch.bfloat16)
    use_half_norms(fast, nhwc=True)
    assert use_lean_resnets(fast) == 1
    fused, residual = [], []
    real, real_residual = nhwc_norm.group_norm, nhwc_norm.residual_group_norm
    monkeypatch.setattr(nhwc_norm, "group_norm", lambda *a, **k: fused.append(k.get("silu")) or real(*a, **k))
    monkeypatch.setattr(nhwc_norm, "residual_group_norm",
                        lambda *a, **k: residual.append(k.get("silu")) or real_residual(*a, **k))
    x = torch.randn(2, 320, 32, 32, device="cuda").to(memory_format=CL)
    temb, grad = torch.randn(2, 1280, device="cuda"), torch.randn(2, out_channels, 32, 32, device="cuda")
    want, want_dx, _ = _run(ref.train(), x, temb, grad)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, got_dx, _ = _run(fast.train(), x.bfloat16(), temb, grad.bfloat16())
    assert residual == [True] and fused == [True]  # norm1 also sums the shortcut's gradient
    assert got.is_contiguous(memory_format=CL)
    for a, b in ((got, want), (got_dx, want_dx)):
        assert ((a.float() - b).abs().max() / b.abs().max()).item() < 3e-2


INTERPRETED = textwrap.dedent("""
    import copy, torch, torch.nn.functional as F
    from diffusers.models.resnet import ResnetBlock2D
    from lora_core import nhwc_norm
    from lora_core.half_norms import use_half_norms
    from lora_core.lean_resnet import use_lean_resnets
    nhwc_norm.TILE = 64  # several tiles per program, several programs per sample
    torch.manual_seed(0)
    CL = torch.channels_last
    worst = {}

    def err(name, a, r):
        worst[name] = max(worst.get(name, 0.0), ((a.double() - r.double()).abs().max() / r.double().abs().max()).item())

    # residual_group_norm against x and a separate GroupNorm (and SiLU), the residual's gradient in either layout
    for dtype in (torch.float32, torch.bfloat16):
        for silu, ds_layout in ((False, CL), (True, CL), (True, torch.contiguous_format)):
            x = (torch.randn(2, 12, 5, 7) * 3 + 2).to(dtype).contiguous(memory_format=CL).requires_grad_()
            w = (torch.randn(12) + 1).to(dtype)
            b = torch.randn(12).to(dtype)
            gs = torch.randn(2, 12, 5, 7).to(dtype).contiguous(memory_format=ds_layout)
            gy = torch.randn(2, 12, 5, 7).to(dtype).contiguous(memory_format=CL)
            s, y = nhwc_norm.residual_group_norm(x, 3, w, b, 1e-5, silu=silu)
            assert s.data_ptr() == x.data_ptr() and y.is_contiguous(memory_format=CL)
            (dx,) = torch.autograd.grad([s, y], [x], [gs, gy])
            rx = x.detach().double().requires_grad_()
            ry = F.group_norm(rx, 3, w.double(), b.double(), 1e-5)
            ry = F.silu(ry) if silu else ry
            (want,) = torch.autograd.grad([rx, ry], [rx], [gs.double(), gy.double()])
            err(str(dtype), y, ry)
            err(str(dtype), dx, want)

    # lean blocks whose norms take the kernels against diffusers' blocks, in fp32: identity and conv shortcuts
    nhwc_norm.applies = lambda *args, **kwargs: True  # CPU tensors, which the interpreter runs
    calls = []
    real = nhwc_norm._GroupNormNHWCResidual.apply
    nhwc_norm._GroupNormNHWCResidual.apply = lambda *args: calls.append(1) or real(*args)
    for out_channels in (16, 24):
        ref = ResnetBlock2D(in_channels=16, out_channels=out_channels, temb_channels=8, groups=4).train()
        lean = copy.deepcopy(ref)
        use_half_norms(lean, nhwc=True)
        assert use_lean_resnets(lean) == 1
        x = torch.randn(2, 16, 6, 5).contiguous(memory_format=CL)
        temb, g = torch.randn(2, 8), torch.randn(2, out_channels, 6, 5).contiguous(memory_format=CL)
        results = []
        for block in (ref, lean):
            xi = x.clone().requires_grad_()
            out = block(xi, temb)
            results.append([out, *torch.autograd.grad(out, [xi, *block.parameters()], g)])
        for a, r in zip(results[1], results[0], strict=True):
            err("block", a, r)
    assert len(calls) == 2, calls
    print("worst", worst["torch.float32"], worst["torch.bfloat16"], worst["block"])
""")


@cpu_only
def test_first_norm_sums_the_shortcut_gradient_in_the_interpreter():
    fp32, bf16, block = worst_errors(INTERPRETED)
    assert fp32 < 1e-5 and bf16 < 3e-2 and block < 1e-4  # against float64; bf16 rounding
