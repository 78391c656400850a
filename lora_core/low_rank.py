"""Adding an adapter's low-rank product into a half-precision output in one Triton kernel
(`performance.low_rank_kernel`).

The hand-written LoRA functions (lora_core/lora_fused.py, grouped_lora.py) add the adapter's product into
the base layer's output, y += (x D^T) U^T, and in the backward pass its share into the input's gradient,
dx += gz D. cuBLAS runs these as rank-16 products onto the output (addmm_), and in an SD1.5 batch-16 step
on an H100 the largest of them took about three times what their bytes need at 3 TB/s
(`bench/profile_step.py --shapes`, bench/RESULTS.md). Here each program reads a tile of y and
the few rows of the two thin factors it needs, and writes the tile back: the same sum in the same fp32
accumulator, one rounding, with the base layer's bias added in the same pass (the base product then runs
without it). Off by default until its effect on the step is measured; elsewhere cuBLAS's addmm_ runs.
"""

from __future__ import annotations

import logging

import torch

from . import kernel_builds
from .kernel_builds import launch
from .nhwc_norm import HALF, on_device, supports

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: addmm_ runs
    triton = None

log = logging.getLogger(__name__)

BLOCK_M, BLOCK_N, WARPS = 128, 64, 4
MAX_RANK = 128  # the thin factors' width at most (a grouped layer's ranks together)

# the switch ("off", "add" or "gemm"); this module's kernel failed here / ran
_state = {"mode": "off", "failed": False, "worked": False}


def enable(mode: bool | str) -> None:
    """Set `performance.low_rank_kernel` for the hand-written LoRA functions: "off" (or False), "add" (or
    True: this module's kernel adds the adapter's product onto cuBLAS's base product) or "gemm" (the base
    and adapter products in one kernel, lora_core/lora_gemm.py, where it applies; cuBLAS's elsewhere).
    `auto` is resolved before this (`fast_step.low_rank_mode`)."""
    mode = {True: "add", False: "off"}.get(mode, mode)
    if mode not in ("off", "add", "gemm"):
        raise ValueError(f"low_rank.enable: {mode!r} is not off, add or gemm")
    _state["mode"] = mode


def wanted_gemm(t: torch.Tensor) -> bool:
    """Whether lora_core/lora_gemm.py's product is to run for tensors like `t` (`wanted`, mode gemm)."""
    return _state["mode"] == "gemm" and wanted(t)


def wanted_add(t: torch.Tensor) -> bool:
    """Whether this module's kernel is to run for tensors like `t` (`wanted`, mode add). Not in mode gemm:
    at the shapes lora_gemm leaves to cuBLAS (long inner products) it measured no faster than cuBLAS's own
    rank-16 product onto the output (bench/lora_gemm.py)."""
    return _state["mode"] == "add" and wanted(t)


def wanted(t: torch.Tensor) -> bool:
    """Whether the kernel is to run for tensors like `t`: switched on, Triton working, a half-precision CUDA
    tensor on a GPU Triton supports, outside torch.compile."""
    return (
        _state["mode"] != "off"
        and triton is not None
        and not _state["failed"]
        and t.is_cuda
        and t.dtype in HALF
        and not torch.compiler.is_compiling()
        and supports(t.device.index or 0)
    )


def applies(y: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether `add_` takes this call (`wanted_add`): tensors of one dtype, y [m, n] and z [m, r] with unit
    column steps, u [n, r] in any layout, r at most MAX_RANK."""
    return (
        wanted_add(y)
        and y.dim() == z.dim() == u.dim() == 2
        and z.dtype == u.dtype == y.dtype
        and z.shape[0] == y.shape[0]
        and tuple(u.shape) == (y.shape[1], z.shape[1])
        and y.stride(1) == 1
        and z.stride(1) == 1
        and z.shape[1] <= MAX_RANK
    )


if triton is not None:

    @triton.jit
    def _add(
        Y,
        Z,
        U,
        B,
        m,
        n,
        r,
        y_m,
        z_m,
        u_n,
        u_r,
        HAS_B: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_R)
        rmask, cmask, kmask = rows < m, cols < n, k < r
        z = tl.load(
            Z + rows.to(tl.int64)[:, None] * z_m + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        ut = tl.load(
            U + cols[None, :] * u_n + k[:, None] * u_r, mask=kmask[:, None] & cmask[None, :], other=0.0
        )
        # [BLOCK_M, BLOCK_N] in fp32, from fp32 operands: on a GPU TF32 products, exact for half-precision
        # values (Triton's interpreter mishandles half-precision operands of tl.dot)
        acc = tl.dot(z.to(tl.float32), ut.to(tl.float32))
        if HAS_B:
            acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        at = Y + rows.to(tl.int64)[:, None] * y_m + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        y = tl.load(at, mask=mask, other=0.0).to(tl.float32)
        tl.store(at, (y + acc).to(Y.dtype.element_ty), mask=mask)


def _launch(y: torch.Tensor, z: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> None:
    m, n = y.shape
    r = z.shape[1]
    with on_device(y):
        launch(
            _add,
            (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N)),
            y,
            z,
            u,
            bias if bias is not None else y,
            m,
            n,
            r,
            y.stride(0),
            z.stride(0),
            u.stride(0),
            u.stride(1),
            HAS_B=bias is not None,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_R=max(16, triton.next_power_of_2(r)),
            num_warps=WARPS,
        )


def _ready(like: torch.Tensor) -> bool:
    """Whether the kernel runs on this machine (`kernel_builds.ready`, probing on `like`'s device and
    dtype)."""

    def probe() -> None:
        y = torch.zeros(16, 16, device=like.device, dtype=like.dtype)
        _launch(y, y, y, y[0])

    return kernel_builds.ready(
        _state, probe, "the low-rank add kernel does not run here, cuBLAS's addmm_ runs instead"
    )


def add_(y: torch.Tensor, z: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None,
         records: list | None = None) -> torch.Tensor:
    """y += z @ u^T (+ bias), in place, and y: y [m, n], z [m, r], u [n, r], bias [n]. The kernel where
    `applies` takes the call, else the same sum through PyTorch (no grad: used inside autograd functions).
    `records`: a dry run's list (`kernel_builds.current()` where the forward ran), for a backward pass, which
    autograd runs on a thread of its own."""
    if applies(y, z, u) and (bias is None or (bias.dtype == y.dtype and bias.is_contiguous())):
        with kernel_builds.noting(records):
            if _ready(y):
                _launch(y, z, u, bias)
                return y
    if bias is not None:
        y.add_(bias)
    return y.addmm_(z, u.t())


def records() -> list | None:
    """A dry run's list of launches, for an autograd function to keep for its backward pass (None under
    torch.compile, which cannot trace the lookup and never takes the kernel)."""
    return None if torch.compiler.is_compiling() else kernel_builds.current()
