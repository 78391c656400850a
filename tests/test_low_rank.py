"""The low-rank add kernel (lora_core/low_rank.py) against addmm_: values for the shapes and layouts the
LoRA functions pass (column slices of a grouped output, a transposed factor, ranks that are not a power of
two, a bias), and the LoRA functions' outputs and gradients with and without it. On the CPU the kernel runs
in Triton's interpreter (in a subprocess); on a GPU compiled, in bf16, at SD1.5's shapes."""

from __future__ import annotations

import textwrap

import pytest
import torch
from interpreted import cpu_only, worst_errors

from lora_core import low_rank
from lora_core.lora_fused import _LoRALinearFn

INTERPRETED = textwrap.dedent("""
    import torch
    from lora_core import low_rank
    from lora_core.grouped_lora import _GroupedLoRAFn
    from lora_core.lora_fused import _LoRALinearFn
    low_rank.BLOCK_M, low_rank.BLOCK_N = 16, 16  # several programs each way
    low_rank.enable(True)
    low_rank.applies = lambda *args: low_rank._state["enabled"]  # CPU tensors, which the interpreter runs
    torch.manual_seed(0)
    worst = {}

    def err(name, a, r):
        worst[name] = max(worst.get(name, 0.0), ((a.double() - r.double()).abs().max() / r.double().abs().max()).item())

    for dtype in (torch.float32, torch.bfloat16):
        for m, n, r, bias, kind in ((37, 40, 16, True, "plain"), (50, 33, 48, False, "slice"), (20, 24, 5, False, "t")):
            y = torch.randn(m, 3 * n if kind == "slice" else n).to(dtype)
            target = y[:, n:2 * n] if kind == "slice" else y
            z = torch.randn(m, r).to(dtype)
            u = torch.randn(r, n).to(dtype).t() if kind == "t" else torch.randn(n, r).to(dtype)
            b = torch.randn(n).to(dtype) if bias else None
            want = target.double() + z.double() @ u.double().t() + (b.double() if bias else 0)
            before = y.clone()
            assert low_rank.add_(target, z, u, b) is target
            err(str(dtype), target, want)
            if kind == "slice":  # the other columns untouched
                assert torch.equal(y[:, :n], before[:, :n]) and torch.equal(y[:, 2 * n:], before[:, 2 * n:])

    # the LoRA functions with the kernel against addmm_ (fp32): outputs and every gradient
    x = torch.randn(30, 24, requires_grad=True)
    w, b = torch.randn(20, 24), torch.randn(20)
    d, u = torch.randn(4, 24, requires_grad=True), torch.randn(20, 4, requires_grad=True)
    g = torch.randn(30, 20)
    ws = torch.randn(3 * 8, 24)
    ps = [torch.randn(4, 24, requires_grad=True) for _ in range(3)] + [torch.randn(8, 4, requires_grad=True) for _ in range(3)]
    gg = torch.randn(30, 24)
    results = []
    for on in (True, False):
        low_rank.enable(on)
        y = _LoRALinearFn.apply(x, w, b, d, u, 0.5, None, None)
        single = [y, *torch.autograd.grad(y, [x, d, u], g)]
        yg = _GroupedLoRAFn.apply(x, ws, 0.5, [p.detach() for p in ps], *ps)
        grouped = [yg, *torch.autograd.grad(yg, [x, *ps], gg)]
        results.append(single + grouped)
    for a, r in zip(*results, strict=True):
        err("functions", a, r)
    print("worst", worst["torch.float32"], worst["torch.bfloat16"], worst["functions"])
""")


@cpu_only
def test_kernel_matches_addmm_in_the_interpreter():
    fp32, bf16, functions = worst_errors(INTERPRETED)
    assert fp32 < 1e-5 and bf16 < 1e-2 and functions < 1e-5  # against float64; bf16 rounding


def test_cpu_tensors_take_addmm_with_the_same_sum():
    low_rank.enable(True)
    try:
        y, z, u, b = torch.randn(6, 5), torch.randn(6, 2), torch.randn(5, 2), torch.randn(5)
        assert not low_rank.applies(y, z, u)
        want = y + z @ u.t() + b
        torch.testing.assert_close(low_rank.add_(y, z, u, b), want)
    finally:
        low_rank.enable(False)


@pytest.mark.parametrize("on", ["add", "gemm", "off"])
def test_the_switch_turns_the_kernel_on(on, fast_tiny_unet):
    try:
        fast_tiny_unet(f"performance.low_rank_kernel={on}")
        assert low_rank._state["enabled"] == (on != "off") and low_rank._state["gemm"] == (on == "gemm")
    finally:
        low_rank.enable(False)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("m", "n", "r"), [(65536, 320, 16), (16384, 640, 16), (4096, 1280, 48), (1232, 1280, 16)])
def test_kernel_matches_addmm_on_the_gpu(m, n, r):
    torch.manual_seed(0)
    low_rank.enable(True)
    try:
        y = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        z = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
        u = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        assert low_rank.applies(y, z, u)
        want = y.float() + z.float() @ u.float().t() + b.float()
        got = low_rank.add_(y.clone(), z, u, b)
        assert ((got.float() - want).abs().max() / want.abs().max()).item() < 1e-2
    finally:
        low_rank.enable(False)


@pytest.mark.gpu
@gpu
def test_lora_functions_agree_with_and_without_the_kernel_on_the_gpu():
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(8192, 320, device=dev, dtype=dt, requires_grad=True)
    w, b = torch.randn(320, 320, device=dev, dtype=dt) / 18, torch.randn(320, device=dev, dtype=dt)
    d = torch.randn(16, 320, device=dev, requires_grad=True)
    u = torch.randn(320, 16, device=dev, requires_grad=True)
    g = torch.randn(8192, 320, device=dev, dtype=dt)
    results = []
    for on in (True, False):
        low_rank.enable(on)
        y = _LoRALinearFn.apply(x, w, b, d, u, 0.5, None, None)
        results.append([y, *torch.autograd.grad(y, [x, d, u], g)])
    low_rank.enable(False)
    for a, r in zip(*results, strict=True):
        assert ((a.float() - r.float()).abs().max() / r.float().abs().max()).item() < 2e-2


@pytest.mark.skipif(low_rank.triton is None, reason="needs Triton for the kernel's definition")
def test_a_dry_run_notes_the_kernels_launches_backward_too(monkeypatch):
    """Under a dry run (kernel_builds.recording) the launches are noted, not made: the forward's, and the
    backward's, which autograd runs on a thread of its own on a GPU."""
    import threading

    from lora_core import kernel_builds

    monkeypatch.setitem(low_rank._state, "worked", False)
    monkeypatch.setattr(low_rank, "wanted", lambda t: True)  # CPU tensors: nothing is launched anyway
    monkeypatch.setattr(low_rank, "applies", lambda y, z, u: True)
    x = torch.randn(32, 24, dtype=torch.bfloat16, requires_grad=True)
    w, b = torch.randn(20, 24, dtype=torch.bfloat16), torch.randn(20, dtype=torch.bfloat16)
    d, u = torch.randn(4, 24, requires_grad=True), torch.randn(20, 4, requires_grad=True)
    with kernel_builds.recording() as records:
        y = _LoRALinearFn.apply(x, w, b, d, u, 0.5, None, None)
    t = threading.Thread(target=lambda: torch.autograd.grad(y, [x, d, u], torch.ones_like(y)))
    t.start()
    t.join()
    launches = [(kernel.__name__, kwargs["HAS_B"]) for kernel, _, _, kwargs in records]
    # each pass: the first call's probe (with a bias), then its own launch (the forward's with the bias)
    assert launches == [("_add", True), ("_add", True), ("_add", True), ("_add", False)], launches
    assert not low_rank._state["worked"]
