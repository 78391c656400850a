"""The LoRA product kernel (lora_core/lora_gemm.py) against cuBLAS's products: values for the shapes and
layouts the LoRA functions pass (a transposed weight, ragged edges, ranks that are not a power of two, a
group's members side by side, a bias), and the LoRA functions' outputs and gradients with and without it.
On the CPU the kernel runs in Triton's interpreter (in a subprocess, in fp32: the interpreter mishandles
half-precision products); on a GPU compiled, in bf16, at SD1.5's shapes."""

from __future__ import annotations

import textwrap
import threading

import pytest
import torch
from interpreted import cpu_only, lora_functions_worst_error, worst_errors

from lora_core import kernel_builds, lora_gemm, low_rank
from lora_core.lora_fused import _LoRALinearFn

INTERPRETED = textwrap.dedent('''
import torch
from lora_core import low_rank, lora_gemm
lora_gemm.BLOCK_M, lora_gemm.BLOCK_K, lora_gemm.GROUP_M = 16, 16, 2
lora_gemm.block_n = lambda member_n: 16 if member_n % 16 == 0 else 8
low_rank.BLOCK_M, low_rank.BLOCK_N = 16, 16
low_rank.wanted = lambda t: low_rank._state["mode"] != "off"
low_rank.applies = lambda *a: low_rank._state["mode"] == "add"
torch.manual_seed(0)
worst = {}
def err(name, a, r):
    worst[name] = max(worst.get(name, 0.0), ((a.double() - r.double()).abs().max() / r.double().abs().max()).item())
low_rank.enable("gemm")
# direct: shapes with ragged edges, strided b, groups
for m, k, n, r, member, bias in ((37, 40, 48, 16, None, True), (50, 33, 48, 5, 16, False), (70, 24, 32, 48, None, False)):
    a = torch.randn(m, k); b = torch.randn(n, k).t(); R = r * (n // (member or n))
    z = torch.randn(m, R); c = torch.randn(r, n); bb = torch.randn(n) if bias else None
    assert lora_gemm.applies(a, b, z, c, member), (m, k, n, r, member)
    got = lora_gemm.linear(a, b, z, c, bb, member)
    want = a.double() @ b.double() + (b.double()[0] * 0 if bb is None else bb.double())
    mw = member or n
    for i in range(n // mw):
        want[:, i*mw:(i+1)*mw] += z.double()[:, i*r:(i+1)*r] @ c.double()[:, i*mw:(i+1)*mw]
    err("direct", got, want)
    if m != 70:  # z computed in the kernel as well: from down [k, R], scaled
        down = torch.randn(R, k).t()
        got, got_z = lora_gemm.linear_down(a, b, down, c, 0.5, bb, member)
        zd = 0.5 * a.double() @ down.double()
        want = a.double() @ b.double() + (0 if bb is None else bb.double())
        for i in range(n // mw):
            want[:, i*mw:(i+1)*mw] += zd[:, i*r:(i+1)*r] @ c.double()[:, i*mw:(i+1)*mw]
        err("direct", got, want)
        err("direct", got_z, zd)
from interpreted import lora_functions_worst_error
# rank 4: z computed in the product (16-wide tiles here); rank 12: past half a tile, z comes apart
worst["functions"] = max(lora_functions_worst_error("gemm"), lora_functions_worst_error("gemm", rank=12))
calls = []
launch = lora_gemm._launch
lora_gemm._launch = lambda *args: (calls.append(len(args) > 7), launch(*args))
lora_functions_worst_error("gemm", rank=12)
lora_functions_worst_error("gemm")
assert calls == [False] * 4 + [True, True, True, False], calls  # grouped backward: z apart at any rank
print("worst", worst["direct"], worst["functions"])
''')


@cpu_only
def test_kernel_matches_cublas_in_the_interpreter():
    direct, functions = worst_errors(INTERPRETED)
    assert direct < 1e-5 and functions < 1e-5  # against float64 / the cuBLAS path, fp32


def test_cpu_tensors_take_cublas():
    low_rank.enable("gemm")
    try:
        a, b, z, c = torch.randn(6, 5), torch.randn(5, 4), torch.randn(6, 2), torch.randn(2, 4)
        assert not lora_gemm.applies(a, b, z, c)
    finally:
        low_rank.enable("off")


def test_members_must_be_whole_tiles(monkeypatch):
    monkeypatch.setattr(low_rank, "wanted", lambda t: True)
    low_rank.enable("gemm")
    try:
        a, b = torch.randn(8, 16), torch.randn(16, 3 * 320)
        z, c = torch.randn(8, 3 * 4), torch.randn(4, 3 * 320)
        assert lora_gemm.applies(a, b, z, c, 320)
        assert not lora_gemm.applies(a, b[:, :3 * 96], z, c[:, :3 * 96], 96)  # 96 columns: not whole 64s
        assert not lora_gemm.applies(a, b, z[:, :8], c, 320)  # z must hold every member's rank
    finally:
        low_rank.enable("off")


@pytest.mark.parametrize(("mode", "module", "kernel", "flag"), [("gemm", lora_gemm, "_gemm", "HAS_BIAS"),
                                                         ("add", low_rank, "_add", "HAS_B")])
def test_a_dry_run_notes_the_kernels_launches_backward_too(monkeypatch, mode, module, kernel, flag):
    """Under a dry run (kernel_builds.recording) the launches are noted, not made: the forward's, and the
    backward's, which autograd runs on a thread of its own on a GPU."""
    pytest.importorskip("triton")
    monkeypatch.setitem(module._state, "worked", False)
    monkeypatch.setattr(low_rank, "wanted", lambda t: True)  # CPU tensors: nothing is launched anyway
    monkeypatch.setattr(low_rank, "applies", lambda y, z, u: True)
    low_rank.enable(mode)
    try:
        x = torch.randn(32, 24, dtype=torch.bfloat16, requires_grad=True)
        w, b = torch.randn(20, 24, dtype=torch.bfloat16), torch.randn(20, dtype=torch.bfloat16)
        d, u = torch.randn(4, 24, requires_grad=True), torch.randn(20, 4, requires_grad=True)
        with kernel_builds.recording() as records:
            y = _LoRALinearFn.apply(x, w, b, d, u, 0.5, None, None)
        t = threading.Thread(target=lambda: torch.autograd.grad(y, [x, d, u], torch.ones_like(y)))
        t.start()
        t.join()
    finally:
        low_rank.enable("off")
    launches = [(k.__name__, kwargs[flag]) for k, _, _, kwargs in records]
    # each pass: the first call's probe (with a bias), then its own launch (the forward's with the bias)
    assert launches == [(kernel, True), (kernel, True), (kernel, True), (kernel, False)], launches
    assert not module._state["worked"]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, r: torch.Tensor) -> float:
    return ((a.float() - r.float()).abs().max() / r.float().abs().max()).item()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("m", "k", "n", "members"), [(65536, 320, 960, 3), (16384, 640, 640, 1), (16384, 640, 1920, 3),
                                                      (1232, 320, 640, 2)])
def test_kernel_matches_fp32_on_the_gpu(m, k, n, members):
    torch.manual_seed(0)
    low_rank.enable("gemm")
    try:
        dev, dt, r = "cuda", torch.bfloat16, 16
        a, b = torch.randn(m, k, device=dev, dtype=dt), torch.randn(n, k, device=dev, dtype=dt).t()
        z, c = torch.randn(m, r * members, device=dev, dtype=dt), torch.randn(r, n, device=dev, dtype=dt)
        bias = torch.randn(n, device=dev, dtype=dt)
        assert lora_gemm.applies(a, b, z, c, n // members)
        want = a.float() @ b.float() + bias.float()
        w = n // members
        for i in range(members):
            want[:, i * w:(i + 1) * w] += z[:, i * r:(i + 1) * r].float() @ c[:, i * w:(i + 1) * w].float()
        assert _rel(lora_gemm.linear(a, b, z, c, bias, n // members), want) < 1e-2
    finally:
        low_rank.enable("off")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", ["gemm", "add"])
def test_lora_functions_agree_with_and_without_the_kernels_on_the_gpu(kernel):
    """Outputs and every gradient of the single and grouped LoRA functions with each kernel
    (`low_rank_kernel` = gemm: this module's; add: lora_core/low_rank.py's) against cuBLAS's path."""
    torch.manual_seed(0)
    worst = lora_functions_worst_error(kernel, width=320, rank=16, rows=8192, inputs=320, device="cuda",
                                       dtype=torch.bfloat16)
    assert (lora_gemm if kernel == "gemm" else low_rank)._state["worked"]
    assert worst < 2e-2


def test_a_kernel_that_failed_here_is_not_tried_again(monkeypatch):
    monkeypatch.setattr(low_rank, "wanted", lambda t: True)
    monkeypatch.setitem(lora_gemm._state, "failed", True)
    low_rank.enable("gemm")
    try:
        a, b, z, c = torch.randn(8, 16), torch.randn(16, 64), torch.randn(8, 4), torch.randn(4, 64)
        assert not lora_gemm.applies(a, b, z, c)
        assert not lora_gemm.applies_down(a, b, torch.randn(16, 4), c)
    finally:
        low_rank.enable("off")


def test_long_inner_products_take_cublas(monkeypatch):
    """Past MAX_K cuBLAS's main loop outruns the kernel's, and the single pass over the output no longer pays
    (bench/lora_gemm.py), so the LoRA functions take cuBLAS's products there."""
    monkeypatch.setattr(low_rank, "wanted", lambda t: True)
    low_rank.enable("gemm")
    try:
        n, r = 64, 4
        for k, takes in ((lora_gemm.MAX_K, True), (lora_gemm.MAX_K + 1, False)):
            a, b, c = torch.randn(8, k), torch.randn(k, n), torch.randn(r, n)
            assert lora_gemm.applies(a, b, torch.randn(8, r), c) == takes
            assert lora_gemm.applies_down(a, b, torch.randn(k, r), c) == takes
    finally:
        low_rank.enable("off")


def test_large_ranks_compute_z_apart(monkeypatch):
    """Each tile recomputes its member's z: past half a tile's width that costs more than it saves, so the
    LoRA functions compute z with cuBLAS and pass it in."""
    monkeypatch.setattr(low_rank, "wanted", lambda t: True)
    low_rank.enable("gemm")
    try:
        a, b = torch.randn(8, 16), torch.randn(16, 320)
        assert lora_gemm.applies_down(a, b, torch.randn(16, 32), torch.randn(32, 320))  # 64-wide tiles
        assert not lora_gemm.applies_down(a, b, torch.randn(16, 64), torch.randn(64, 320))
        assert lora_gemm.applies(a, b, torch.randn(8, 64), torch.randn(64, 320))
    finally:
        low_rank.enable("off")
