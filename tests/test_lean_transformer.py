"""The lean transformer blocks (lora_core/lean_transformer.py) and the LayerNorm kernels' residual sums
(lora_core/layer_norm.py, `add_layer_norm`): the same outputs and gradients as diffusers' block and as a
separate add and LayerNorm, on the CPU (plain path, and the kernels in Triton's interpreter) and on a GPU."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from interpreted import cpu_only, worst_errors

from lora_core import layer_norm
from lora_core.half_norms import HalfLayerNorm, use_half_norms
from lora_core.lean_transformer import LeanBasicTransformerBlock, use_lean_transformers

INTERPRETED = textwrap.dedent("""
    import copy, torch, torch.nn.functional as F
    import torch.utils.checkpoint
    from diffusers.models.attention import BasicTransformerBlock
    from lora_core import layer_norm
    from lora_core.half_norms import use_half_norms
    from lora_core.lean_transformer import use_lean_transformers
    layer_norm.TILE, layer_norm.BACKWARD_PROGRAMS = 64, 3  # several rows per tile, several tiles per program
    torch.manual_seed(0)
    worst = {}

    def err(name, a, r):
        worst[name] = max(worst.get(name, 0.0), ((a.double() - r.double()).abs().max() / r.double().abs().max()).item())

    # add_layer_norm against a separate add and F.layer_norm, with and without the add, s used downstream too
    for dtype in (torch.float32, torch.bfloat16):
        for shape, with_add in (((2, 9, 12), True), ((37, 20), True), ((3, 7, 16), False)):
            c = shape[-1]
            h = (torch.randn(shape) * 3 + 2).to(dtype).requires_grad_()
            a = torch.randn(shape).to(dtype).requires_grad_() if with_add else None
            w = (torch.randn(c) + 1).to(dtype).requires_grad_()
            b = torch.randn(c).to(dtype).requires_grad_()
            gs, gy = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
            ins = [t for t in (h, a, w, b) if t is not None]
            s, y = layer_norm.add_layer_norm(h, a, (c,), w, b, 1e-5)
            if a is None:
                assert s.data_ptr() == h.data_ptr()  # the residual is the input itself
            got = [s, y, *torch.autograd.grad([s, y], ins, [gs, gy])]
            ref_in = [t.detach().double().requires_grad_() for t in ins]
            rs = ref_in[0] if a is None else ref_in[1] + ref_in[0]
            ry = F.layer_norm(rs, (c,), ref_in[-2], ref_in[-1], eps=1e-5)
            want = [rs, ry, *torch.autograd.grad([rs, ry], ref_in, [gs.double(), gy.double()])]
            for t, r in zip(got, want, strict=True):
                assert t.dtype == dtype and t.shape == r.shape
                err(str(dtype), t, r)

    # a lean block whose LayerNorms take the kernels against diffusers' block, in fp32
    layer_norm.applies = lambda *args: True  # CPU tensors, which the interpreter runs
    ref = BasicTransformerBlock(32, 4, 8, cross_attention_dim=24).train()
    lean = copy.deepcopy(ref)
    use_half_norms(lean, rows=True)
    assert use_lean_transformers(lean) == 1
    calls = []
    real = layer_norm._AddLayerNorm.apply
    layer_norm._AddLayerNorm.apply = lambda *args: calls.append(args[1] is None) or real(*args)
    x, ctx, g = torch.randn(2, 16, 32), torch.randn(2, 5, 24), torch.randn(2, 16, 32)
    outs = []
    for block in (ref, lean):
        xi = x.clone().requires_grad_()
        out = block(xi, encoder_hidden_states=ctx)
        grads = torch.autograd.grad(out, [xi, *block.parameters()], g)
        outs.append([out, *grads])
    assert calls == [True, False, False], calls  # norm1 alone, norm2 and norm3 with the attention's output
    xi = x.clone().requires_grad_()  # and inside a gradient checkpoint, as a checkpointed UNet runs it
    out = torch.utils.checkpoint.checkpoint(lambda t: lean(t, encoder_hidden_states=ctx), xi, use_reentrant=False)
    outs.append([out, *torch.autograd.grad(out, [xi, *lean.parameters()], g)])
    for got in outs[1:]:
        for t, r in zip(got, outs[0], strict=True):
            err("block", t, r)
    print("worst", worst["torch.float32"], worst["torch.bfloat16"], worst["block"])
""")


@cpu_only
def test_residual_kernels_match_add_and_layer_norm_in_the_interpreter():
    fp32, bf16, block = worst_errors(INTERPRETED)
    assert fp32 < 1e-5 and bf16 < 3e-2 and block < 1e-4  # against float64; bf16 rounding


def _run(block: torch.nn.Module, x: torch.Tensor, ctx: torch.Tensor, g: torch.Tensor, **kwargs):
    xi = x.clone().requires_grad_()
    out = block(xi, encoder_hidden_states=ctx, **kwargs)
    return [out, *torch.autograd.grad(out, [xi, *block.parameters()], g)]


@pytest.mark.parametrize("half_norms", [False, True])
def test_lean_block_computes_what_diffusers_block_does_on_the_cpu(half_norms):
    torch.manual_seed(0)
    ref = BasicTransformerBlock(32, 4, 8, cross_attention_dim=24).train()
    lean = copy.deepcopy(ref)
    if half_norms:
        use_half_norms(lean, rows=True)
        assert all(isinstance(m, HalfLayerNorm) for m in (lean.norm1, lean.norm2, lean.norm3))
    assert use_lean_transformers(lean) == 1 and type(lean) is LeanBasicTransformerBlock
    x, ctx, g = torch.randn(2, 16, 32), torch.randn(2, 5, 24), torch.randn(2, 16, 32)
    for got, want in zip(_run(lean, x, ctx, g), _run(ref, x, ctx, g), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert lean.state_dict().keys() == ref.state_dict().keys()


def test_blocks_the_lean_forward_does_not_cover_are_left_as_they_are():
    chunked = BasicTransformerBlock(32, 4, 8, cross_attention_dim=24)
    chunked.set_chunk_feed_forward(8, 1)
    ada = BasicTransformerBlock(32, 4, 8, cross_attention_dim=24, norm_type="ada_norm", num_embeds_ada_norm=10)
    model = torch.nn.ModuleList([chunked, ada, BasicTransformerBlock(32, 4, 8, cross_attention_dim=24)])
    assert use_lean_transformers(model) == 1
    assert type(chunked) is BasicTransformerBlock and type(ada) is BasicTransformerBlock
    assert use_lean_transformers(model) == 1  # already swapped


def test_cross_attention_kwargs_take_diffusers_forward(monkeypatch):
    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 4, 8, cross_attention_dim=24)
    use_lean_transformers(block)
    seen = []
    monkeypatch.setattr(BasicTransformerBlock, "forward", lambda self, *a, **k: seen.append(k) or a[0])
    x, ctx = torch.randn(1, 4, 32), torch.randn(1, 3, 24)
    assert block(x, encoder_hidden_states=ctx, cross_attention_kwargs={"gligen": None}) is x and len(seen) == 1
    assert block(x, encoder_hidden_states=ctx).shape == x.shape and len(seen) == 1  # the lean forward


@pytest.mark.parametrize("on", [True, False])
def test_the_switch_decides_whether_the_unet_takes_the_lean_blocks(on, fast_tiny_unet):
    unet = fast_tiny_unet(f"performance.lean_transformers={str(on).lower()}")
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all((type(m) is LeanBasicTransformerBlock) == on for m in blocks)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(16, 4096, 320), (4, 1024, 640), (2, 256, 1280), (5, 1000)])
@pytest.mark.parametrize("with_add", [True, False])
def test_residual_kernels_match_add_and_layer_norm_on_the_gpu(shape, with_add):
    torch.manual_seed(0)
    c = shape[-1]
    h = (torch.randn(shape, device="cuda") * 2 + 1).to(torch.bfloat16).requires_grad_()
    a = torch.randn(shape, device="cuda").to(torch.bfloat16).requires_grad_() if with_add else None
    w = (torch.randn(c, device="cuda") + 1).to(torch.bfloat16).requires_grad_()
    b = torch.randn(c, device="cuda").to(torch.bfloat16).requires_grad_()
    ins = [t for t in (h, a, w, b) if t is not None]
    assert layer_norm.applies(h, (c,), w) and layer_norm.add_applies(h, a)
    s, y = layer_norm.add_layer_norm(h, a, (c,), w, b, 1e-5)
    gs, gy = (torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(2))
    got = [s, y, *torch.autograd.grad([s, y], ins, [gs, gy])]
    ref_in = [t.detach().float().requires_grad_() for t in ins]
    rs = ref_in[0] if a is None else ref_in[1] + ref_in[0]
    ry = torch.nn.functional.layer_norm(rs, (c,), ref_in[-2], ref_in[-1], eps=1e-5)
    want = [rs, ry, *torch.autograd.grad([rs, ry], ref_in, [gs.float(), gy.float()])]
    names = ["s", "y", "dh", *(["da"] if with_add else []), "dw", "db"]
    for name, t, r in zip(names, got, want, strict=True):
        e = ((t.float() - r).abs().max() / r.abs().max()).item()
        assert e < 2e-2, f"{name}: relative error {e:.3g}"  # bf16 rounding, fp32 reference


@pytest.mark.gpu
@gpu
def test_unet_lean_blocks_take_the_kernels_and_agree_on_the_gpu(fast_tiny_unet, monkeypatch):
    calls = []
    real = layer_norm._AddLayerNorm.apply
    monkeypatch.setattr(layer_norm._AddLayerNorm, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 4, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    t = torch.tensor([10, 20], device="cuda")
    results = []
    for on in (True, False):
        unet = fast_tiny_unet(f"performance.lean_transformers={str(on).lower()}",
                              "performance.channels_last=on").cuda()
        ctx = torch.randn(2, 7, unet.config.cross_attention_dim, device="cuda", generator=torch.Generator(
            "cuda").manual_seed(0))
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = unet(xi, t, ctx).sample
        out.float().square().mean().backward()
        results.append((out.float(), xi.grad.float()))
        if on:
            blocks = sum(type(m) is LeanBasicTransformerBlock for m in unet.modules())
            assert blocks and len(calls) == 3 * blocks
    for got, want in zip(*results, strict=True):
        assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
