"""The fused GEGLU kernels (lora_core/geglu.py) against diffusers' split, GELU and multiply: values and the
projection output's gradient. On the CPU the kernels run in Triton's interpreter (in a subprocess: the
interpreter is chosen when Triton is imported); on a GPU compiled, in bf16, at the UNet's shapes; and the
UNet's feed-forward layers take them when they apply."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lora_core import geglu
from lora_core.models import load_model

CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from lora_core import geglu
    torch.manual_seed(0)
    worst, worst_half = 0.0, 0.0
    # rows and channels that leave partly masked tiles (8 x 128), one larger than a tile in both
    for shape in [(2, 5, 2 * 7), (3, 2 * 130), (1, 9, 11, 2 * 129), (20, 2 * 256)]:
        for dtype in (torch.float32, torch.bfloat16):
            h = (torch.randn(shape) * 2).to(dtype).requires_grad_()
            y = geglu._GEGLU.apply(h)
            assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype
            g = torch.randn(y.shape).to(dtype)
            (dh,) = torch.autograd.grad(y, h, g)
            assert dh.dtype == dtype
            ref_h = h.detach().double().requires_grad_()
            a, gate = ref_h.chunk(2, dim=-1)
            ref = a * F.gelu(gate)
            (ref_dh,) = torch.autograd.grad(ref, ref_h, g.double())
            for got, want in ((y, ref), (dh, ref_dh)):
                err = ((got.double() - want).abs().max() / want.abs().max()).item()
                if dtype == torch.float32:
                    worst = max(worst, err)
                else:
                    worst_half = max(worst_half, err)
    print("worst", worst, worst_half)
""")

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The first call builds the kernels. Under gradient checkpointing that call comes inside a checkpointed forward,
# where anything the build saved for autograd would be recorded, and the recomputation would not match it.
CHECKPOINTED = textwrap.dedent("""
    import torch
    from torch.utils.checkpoint import checkpoint
    from lora_core import geglu
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 2 * 6)
    x = torch.randn(3, 5, 8, requires_grad=True)
    body = lambda x: geglu.geglu(proj(x)) * 2
    out = checkpoint(body, x, use_reentrant=False)
    out.square().sum().backward()
    assert geglu._state["worked"] and not geglu._state["failed"], geglu._state
    got = (out.detach().clone(), x.grad.clone(), proj.weight.grad.clone())
    x.grad, proj.weight.grad = None, None
    a, g = proj(x).chunk(2, dim=-1)
    want = a * torch.nn.functional.gelu(g) * 2
    want.square().sum().backward()
    for name, u, v in zip(("out", "x.grad", "weight.grad"), got, (want.detach(), x.grad, proj.weight.grad)):
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-6), name
    print("ok")
""")


def _interpret(code: str) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels are tested instead")
def test_kernels_match_geglu_in_the_interpreter():
    pytest.importorskip("triton")
    out = _interpret(CHECK)
    assert out.returncode == 0, out.stderr[-3000:]
    worst, worst_half = map(float, out.stdout.split("worst")[-1].split())
    assert worst < 1e-5 and worst_half < 2e-2, out.stdout  # fp32 against float64; bf16 rounding


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the checkpointed UNet step is tested instead")
def test_first_call_inside_a_gradient_checkpoint_builds_the_kernels_and_trains():
    pytest.importorskip("triton")
    out = _interpret(CHECKPOINTED)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_only_contiguous_half_tensors_with_an_even_last_dimension_fit():
    h = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    assert geglu.fits(h) and geglu.fits(h.half())
    assert not geglu.fits(h.float())
    assert not geglu.fits(h.transpose(0, 1))  # the kernels walk a contiguous [rows, 2d]
    assert not geglu.fits(h[..., :15])
    assert not geglu.fits(h[:, :0])
    assert geglu.fits(h[1])  # a contiguous view with an offset
    assert not geglu.applies(h)  # a CPU tensor: diffusers' GEGLU


def test_the_swap_keeps_the_outputs_the_state_dict_and_pickling():
    unet = load_model("tiny:sd1", device=torch.device("cpu")).unet
    x = torch.randn(1, 4, 16, 16)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim)
    t = torch.tensor([10])
    keys = list(unet.state_dict())
    with torch.no_grad():
        before = unet(x, t, emb).sample
        assert geglu.use_fused_geglu(unet) > 0
        after = unet(x, t, emb).sample  # on the CPU the fused layer takes diffusers' path
    assert torch.equal(before, after)
    assert list(unet.state_dict()) == keys
    assert geglu.use_fused_geglu(unet) == 0  # already swapped
    buf = io.BytesIO()
    torch.save(unet, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert any(type(m) is geglu.FusedGEGLU for m in again.modules())


@pytest.mark.parametrize("on", [True, False])
def test_the_switch_decides_whether_the_unet_takes_the_kernels(on, fast_tiny_unet):
    unet = fast_tiny_unet(f"performance.fused_geglu={str(on).lower()}")
    layers = [m for m in unet.modules() if isinstance(m, geglu.GEGLU)]
    assert layers
    assert all((type(m) is geglu.FusedGEGLU) == on for m in layers)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(1, 4096, 2 * 1280), (16, 1024, 2 * 2560), (2, 64, 2 * 5120), (3, 77, 2 * 40)])
def test_kernels_match_geglu_on_the_gpu_in_bf16(shape):
    h = torch.randn(shape, device="cuda").to(torch.bfloat16).requires_grad_()
    assert geglu.applies(h)
    y = geglu._GEGLU.apply(h)  # the kernels themselves: `geglu` would fall back if they failed to build
    g = torch.randn(y.shape, device="cuda").to(torch.bfloat16)
    (dh,) = torch.autograd.grad(y, h, g)
    ref_h = h.detach().float().requires_grad_()
    a, gate = ref_h.chunk(2, dim=-1)
    ref = a * F.gelu(gate)
    (ref_dh,) = torch.autograd.grad(ref, ref_h, g.float())
    for name, got, want in (("y", y, ref), ("dh", dh, ref_dh)):
        err = ((got.float() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-2, f"{name}: relative error {err:.3g}"  # bf16 output rounding, fp32 reference


@pytest.mark.gpu
@gpu
def test_unet_feed_forwards_take_the_kernels(monkeypatch):
    model = load_model("tiny:sd1", device=torch.device("cuda"))
    unet = model.unet.to(dtype=torch.bfloat16)
    x = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.bfloat16)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([10, 500], device="cuda")
    with torch.no_grad():
        plain = unet(x, t, emb).sample.float()
        geglu.use_fused_geglu(unet)
        calls = []
        real = geglu._GEGLU.apply
        monkeypatch.setattr(geglu._GEGLU, "apply", lambda *a: calls.append(1) or real(*a))
        fast = unet(x, t, emb).sample.float()
    assert calls, "no feed-forward took the fused kernels"
    assert geglu._state["worked"] and not geglu._state["failed"], "the kernels failed and diffusers' GEGLU ran"
    assert ((fast - plain).abs().max() / plain.abs().max()).item() < 3e-2


@pytest.mark.gpu
@gpu
def test_a_checkpointed_unet_builds_the_kernels_inside_its_first_checkpoint(monkeypatch):
    monkeypatch.setitem(geglu._state, "worked", False)  # as in a fresh process: the first call builds them
    monkeypatch.setitem(geglu._state, "failed", False)
    unet = load_model("tiny:sd1", device=torch.device("cuda")).unet.to(dtype=torch.bfloat16)
    unet.enable_gradient_checkpointing()
    unet.train().requires_grad_(True)  # the loaded base is frozen: nothing would be recorded
    assert geglu.use_fused_geglu(unet)
    x = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.bfloat16)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.bfloat16)
    unet(x, torch.tensor([10, 500], device="cuda"), emb).sample.float().square().mean().backward()
    assert geglu._state["worked"] and not geglu._state["failed"], "the kernels failed and diffusers' GEGLU ran"
    grads = [p.grad for p in unet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
