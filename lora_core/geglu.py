"""The feed-forward's GEGLU (`a * gelu(g)`, `a` and `g` the two halves of the projection's output) as one
Triton kernel each way (`performance.fused_geglu`).

diffusers splits the projection's output, runs GELU on the gate and multiplies: three element-wise kernels
forward, and backward the multiply's two products, GELU's backward and a concatenation that joins the two
halves' gradients. In a graphed SD1.5 batch-16 step that work took about 11 ms of 108 (bench/RESULTS.md).
Here the forward reads the projection's output once and writes the product; the backward reads it and the
incoming gradient once and writes both halves' gradients in place, recomputing GELU (exact, erf-based, as
`F.gelu`) in fp32. Only the projection's output is saved for the backward, where autograd also kept the
gate's GELU (1.4 GiB less at SD1.5 batch 16). The backward is not itself differentiable (no double
backward), as nothing in training needs one.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from torch import nn
from torch.autograd.function import once_differentiable

from . import kernel_builds
from .kernel_builds import launch, recording_launches
from .nhwc_norm import HALF, on_device, supports

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: diffusers' GEGLU runs
    triton = None

log = logging.getLogger(__name__)

BLOCK_R, BLOCK_C = 8, 128  # a program's tile: rows (tokens) by columns (channels of one half)

_state = {"failed": False, "worked": False}  # the kernels failed to build on this machine / ran at least once


def available() -> bool:
    return triton is not None and not _state["failed"]


def fits(h: torch.Tensor) -> bool:
    """Whether the kernels can read `h`: a non-empty contiguous half-precision tensor, last dimension even."""
    return h.dtype in HALF and h.numel() > 0 and h.shape[-1] % 2 == 0 and h.is_contiguous()


def applies(h: torch.Tensor) -> bool:
    """Whether `geglu` takes this projection output: one that `fits`, on a GPU Triton supports, outside
    torch.compile (which fuses the element-wise work itself)."""
    return (available() and h.is_cuda and fits(h) and not torch.compiler.is_compiling()
            and supports(h.device.index or 0))


if triton is not None:

    @triton.jit
    def _gelu_parts(g):
        """GELU of fp32 `g` and its derivative."""
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327

    @triton.jit
    def _forward(H, Y, rows, d, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # H [rows, 2d] contiguous (value half, then gate half), Y [rows, d] contiguous
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r < rows)[:, None] & (c < d)[None, :]
        src = H + r[:, None] * (2 * d) + c[None, :]
        a = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
        gelu, _ = _gelu_parts(g)
        tl.store(Y + r[:, None] * d + c[None, :], (a * gelu).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward(H, DY, DH, rows, d, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # H, DH [rows, 2d] and DY [rows, d], all contiguous
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r < rows)[:, None] & (c < d)[None, :]
        off = r[:, None] * (2 * d) + c[None, :]
        a = tl.load(H + off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(H + off + d, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r[:, None] * d + c[None, :], mask=mask, other=0.0).to(tl.float32)
        gelu, slope = _gelu_parts(g)
        tl.store(DH + off, (dy * gelu).to(DH.dtype.element_ty), mask=mask)
        tl.store(DH + off + d, (dy * a * slope).to(DH.dtype.element_ty), mask=mask)


def _grid(rows: int, d: int) -> tuple[int, int]:
    return triton.cdiv(rows, BLOCK_R), triton.cdiv(d, BLOCK_C)


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        d = h.shape[-1] // 2
        rows = h.numel() // (2 * d)
        y = torch.empty(*h.shape[:-1], d, device=h.device, dtype=h.dtype)
        with on_device(h):  # Triton launches on the current device
            launch(_forward, _grid(rows, d), h, y, rows, d, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
        ctx.save_for_backward(h)
        ctx.records = kernel_builds.current()  # a dry run's: its backward is noted there too
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        d = h.shape[-1] // 2
        rows = h.numel() // (2 * d)
        dh = torch.empty_like(h)
        with on_device(h), kernel_builds.noting(ctx.records):
            launch(_backward, _grid(rows, d), h, dy.contiguous(), dh, rows, d, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
        return dh


def _probe(like: torch.Tensor) -> None:
    """Build and run both kernels on a small tensor of `like`'s device and dtype, 16 x 16 so that Triton
    compiles the variant most real shapes take (it specialises integers equal to 1 and multiples of 16). The
    kernels are launched directly, not through autograd: a probe that saved tensors would join an enclosing
    gradient checkpoint's recording, which its recomputation would then not match."""
    h = torch.zeros(16, 32, device=like.device, dtype=like.dtype)
    y = torch.empty(16, 16, device=like.device, dtype=like.dtype)
    with on_device(h):
        launch(_forward, _grid(16, 16), h, y, 16, 16, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
        launch(_backward, _grid(16, 16), h, y, torch.empty_like(h), 16, 16, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """`a * gelu(g)` for `a, g = h.chunk(2, -1)`, for a tensor `applies` accepts."""
    if recording_launches() and not _state["worked"]:  # a dry run notes the first call's probe too
        with on_device(h):
            _probe(h)
    if _state["worked"] or recording_launches():  # a dry run notes the launches and leaves the state
        return _GEGLU.apply(h)
    try:  # the first call builds the kernels: a machine without what Triton needs falls back for good
        _probe(h)
        y = _GEGLU.apply(h)  # may build another variant (the shape's own specialisation)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        _state["failed"] = True
        log.warning("the fused GEGLU kernels do not run here, diffusers' GEGLU runs instead: %s", e)
        a, g = h.chunk(2, dim=-1)
        return a * F.gelu(g)
    _state["worked"] = True
    return y


class FusedGEGLU(GEGLU):
    """diffusers' GEGLU taking the kernels where they apply; everything else, the state dict included, is
    the parent's."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.proj(hidden_states)
        if applies(h):
            return geglu(h)
        a, gate = h.chunk(2, dim=-1)
        return a * self.gelu(gate)


def use_fused_geglu(model: nn.Module) -> int:
    """Give every diffusers GEGLU in `model` the fused kernels (FusedGEGLU); returns how many."""
    layers = [m for m in model.modules() if type(m) is GEGLU]
    for m in layers:
        m.__class__ = FusedGEGLU
    return len(layers)
