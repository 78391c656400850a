"""The feed-forward with GEGLU's backward inside the output projection's gradient product
(lora_core/ff_fused.py) against diffusers' FeedForward: the kernel's values, and the layer's output and input
gradient. On the CPU the kernels run in Triton's interpreter (in a subprocess, fp32); on a GPU compiled, in
bf16, at SD1.5's shapes. Which calls take it, and the switch."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
from diffusers.models.attention import FeedForward
from interpreted import cpu_only, worst_errors

from lora_core import ff_fused, geglu, low_rank
from lora_core.lora import LoRALinear

INTERPRETED = textwrap.dedent('''
import copy
import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from lora_core import ff_fused, geglu, low_rank
ff_fused.BLOCK_M, ff_fused.BLOCK_N, ff_fused.BLOCK_K, ff_fused.GROUP_M = 16, 16, 16, 2
low_rank.wanted = lambda t: low_rank._state["mode"] != "off"
low_rank.enable("gemm")
geglu._state["worked"] = True
torch.manual_seed(0)
worst = {"kernel": 0.0, "layer": 0.0}
def err(name, got, want):
    e = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    worst[name] = max(worst[name], e)
# the kernel alone: ragged rows, an inner dimension that is not a whole number of 16s, a transposed weight
for m, n, d in ((37, 40, 48), (16, 16, 16), (50, 24, 32)):
    g, h = torch.randn(m, n), torch.randn(m, 2 * d) * 2
    w = torch.randn(d, n).t()  # [n, d] with a column step of n
    got = ff_fused.dgeglu(g, w, h)
    ref_h = h.double().requires_grad_()
    a, gate = ref_h.chunk(2, dim=-1)
    (want,) = torch.autograd.grad(a * F.gelu(gate), ref_h, g.double() @ w.double())
    err("kernel", got, want)
# the layer: output and input gradient against diffusers' FeedForward, with and without a final dropout
for dim, mult, final in ((16, 2, False), (24, 4, True)):
    plain = FeedForward(dim, mult=mult, activation_fn="geglu", final_dropout=final).requires_grad_(False)
    fused = copy.deepcopy(plain)
    geglu.use_fused_geglu(fused)
    assert ff_fused.use_fused_feed_forward(fused) == 1
    x = torch.randn(3, 7, dim, requires_grad=True)
    assert fused.takes(x)
    calls = []
    launch = ff_fused._launch
    ff_fused._launch = lambda *args: (calls.append(1), launch(*args))
    go = torch.randn(3, 7, dim)
    got = fused(x)
    (got_dx,) = torch.autograd.grad(got, x, go)
    ff_fused._launch = launch
    want = plain(x)
    (want_dx,) = torch.autograd.grad(want, x, go)
    assert calls == [1], calls  # the backward took the kernel (the probe was made before)
    err("layer", got, want)
    err("layer", got_dx, want_dx)
print("worst", worst["kernel"], worst["layer"])
''')


@cpu_only
def test_kernel_and_layer_match_diffusers_in_the_interpreter():
    kernel, layer = worst_errors(INTERPRETED)
    assert kernel < 1e-5 and layer < 1e-5


def _layer(dim: int = 16, **kw) -> FeedForward:
    ff = FeedForward(dim, mult=4, activation_fn="geglu", **kw).requires_grad_(False)
    geglu.use_fused_geglu(ff)
    ff_fused.use_fused_feed_forward(ff)
    return ff


@pytest.fixture
def switched_on(monkeypatch):
    """The conditions outside the layer met on the CPU: the one-kernel products on, the GEGLU kernels checked."""
    monkeypatch.setattr(low_rank, "wanted", lambda t: True)
    monkeypatch.setattr(geglu, "checked", lambda: True)
    low_rank.enable("gemm")
    yield
    low_rank.enable("off")


def test_which_calls_take_it(switched_on):
    ff = _layer()
    x = torch.randn(2, 16, requires_grad=True)
    assert ff.takes(x)
    assert not ff.takes(x.detach())  # nothing to differentiate
    with torch.no_grad():
        assert not ff.takes(x)  # previews, sampling
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ff.takes(x)  # fp32 activations under autocast: not in the compute dtype
    assert not _layer(dim=1280).takes(torch.randn(2, 1280, requires_grad=True))  # wider than lora_gemm.MAX_K
    dropping = _layer(dropout=0.1)
    assert not dropping.takes(x)
    assert dropping.eval().takes(x)
    adapted = _layer()
    adapted.net[2] = LoRALinear(adapted.net[2], rank=4, alpha=4.0)
    assert not adapted.takes(x)  # an adapter on the projection: the parent's path
    trained = _layer()
    trained.net[0].proj.weight.requires_grad_(True)
    assert not trained.takes(x)
    low_rank.enable("off")
    assert not ff.takes(x)


def test_on_the_cpu_it_keeps_the_parents_outputs_and_state_dict():
    plain = FeedForward(16, mult=4, activation_fn="geglu")
    fused = copy.deepcopy(plain)
    geglu.use_fused_geglu(fused)
    assert ff_fused.use_fused_feed_forward(fused) == 1 and ff_fused.use_fused_feed_forward(fused) == 0
    x = torch.randn(2, 3, 16, requires_grad=True)
    assert not fused.takes(x)  # a CPU tensor
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    assert list(fused.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("on", [True, False])
def test_the_switch(on, fast_tiny_unet):
    unet = fast_tiny_unet(f"performance.geglu_in_product={str(on).lower()}")
    layers = [m for m in unet.modules() if isinstance(m, FeedForward)]
    assert layers and all((type(m) is ff_fused.FusedFeedForward) == on for m in layers)


@pytest.mark.gpu
@pytest.mark.parametrize("dim,tokens", [(320, 4096), (640, 1024)])
def test_it_matches_the_separate_kernels_on_the_gpu_in_bf16(dim, tokens):
    torch.manual_seed(0)
    plain = FeedForward(dim, mult=4, activation_fn="geglu").cuda().bfloat16().requires_grad_(False)
    geglu.use_fused_geglu(plain)
    fused = copy.deepcopy(plain)
    ff_fused.use_fused_feed_forward(fused)
    x = torch.randn(4, tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn_like(x)
    plain(x)  # the GEGLU kernels' first call checks them
    low_rank.enable("gemm")
    try:
        assert fused.takes(x)
        got = fused(x)
        (got_dx,) = torch.autograd.grad(got, x, go)
    finally:
        low_rank.enable("off")
    want = plain(x)
    (want_dx,) = torch.autograd.grad(want, x, go)
    for g, w in ((got, want), (got_dx, want_dx)):
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() < 1e-2
