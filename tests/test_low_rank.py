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
from lora_core.config import TrainConfig
from lora_core.fast_step import low_rank_mode

INTERPRETED = textwrap.dedent("""
    import torch
    from lora_core import low_rank
    low_rank.BLOCK_M, low_rank.BLOCK_N = 16, 16  # several programs each way
    low_rank.enable(True)
    low_rank.wanted = lambda t: low_rank._state["mode"] != "off"  # CPU tensors, which the interpreter runs
    low_rank.applies = lambda *args: low_rank._state["mode"] == "add"
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
    from interpreted import lora_functions_worst_error
    worst["functions"] = lora_functions_worst_error("add", width=8)
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


@pytest.mark.parametrize(("on", "mode"), [("add", "add"), ("gemm", "gemm"), ("off", "off"), ("auto", "off")])
def test_the_switch_turns_the_kernel_on(on, mode, fast_tiny_unet):
    try:
        fast_tiny_unet(f"performance.low_rank_kernel={on}")  # a CPU step, not graphed: auto is off
        assert low_rank._state["mode"] == mode
    finally:
        low_rank.enable(False)


@pytest.mark.parametrize(("device", "graphs", "mode"), [("cuda", True, "gemm"), ("cuda", False, "off"),
                                                         ("cpu", True, "off"), ("cpu", False, "off")])
def test_auto_takes_the_one_kernel_product_only_for_a_graphed_gpu_step(device, graphs, mode):
    assert low_rank_mode("auto", torch.device(device), graphs) == mode
    for chosen in ("off", "add", "gemm"):  # a chosen mode is kept as it is
        assert low_rank_mode(chosen, torch.device(device), graphs) == chosen


def test_auto_is_the_default():
    assert TrainConfig().performance.low_rank_kernel == "auto"


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


# the LoRA functions with and without it on a GPU: tests/test_lora_gemm.py, for both kernels
# a dry run noting the kernel's launches, forward and backward: tests/test_lora_gemm.py, for both kernels
