"""LayerNorm over the last dimension of half-precision activations in Triton kernels
(`performance.fast_layer_norm`).

The UNet's transformer blocks normalise tens of thousands of short rows (one token's 320-1280 channels).
PyTorch's kernel gives each row a block of its own, and in a batch-16 SD1.5 step its 48 LayerNorms took
3.9 ms for about 5.5 GB of reads and writes, a quarter of what the GPU's memory moves in that time
(bench/RESULTS.md). Here each program normalises a tile of several whole rows: the forward reads the input
once and writes the output and each row's mean and 1/std (fp32); the backward reads the input and the
incoming gradient once and writes the input's gradient, summing the weight's and bias's gradients per
program only when they are trained. `add_layer_norm` also takes the residual sum that precedes a transformer
block's norm (s = attention output + hidden states) into the forward kernel, writing s, and in the backward
adds the gradient s gets along the residual path to the norm's own (bench/RESULTS.md). Statistics are fp32; the output has the input's dtype, as PyTorch's
kernel gives. The backward is not itself differentiable (no double backward).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import kernel_builds
from .kernel_builds import launch
from .nhwc_norm import HALF, on_device, supports

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: PyTorch's LayerNorm runs
    triton = None

log = logging.getLogger(__name__)

TILE = 4096  # elements a program holds at a time (whole rows)
MAX_CHANNELS = 8192  # one row fits a tile
BACKWARD_PROGRAMS = 1024  # the backward's programs at most (each writes a row of weight-gradient partials)
WARPS = 8

_state = {"failed": False, "worked": False}  # the kernels failed to build on this machine / ran at least once


def available() -> bool:
    return triton is not None and not _state["failed"]


def applies(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None) -> bool:
    """Whether `layer_norm` takes this call: a non-empty contiguous half-precision CUDA tensor normalised
    over its last dimension (at most MAX_CHANNELS), parameters of its dtype (or none), on a GPU Triton
    supports, outside torch.compile (which fuses the norm itself)."""
    return (available() and x.is_cuda and x.dtype in HALF and x.numel() > 0 and x.is_contiguous()
            and len(normalized_shape) == 1 and x.shape[-1] == normalized_shape[0] <= MAX_CHANNELS
            and (weight is None or weight.dtype == x.dtype) and not torch.compiler.is_compiling()
            and supports(x.device.index or 0))


def _blocks(c: int) -> tuple[int, int]:
    """(tile rows, tile columns) for rows of `c` channels."""
    block_c = triton.next_power_of_2(c)
    return max(1, TILE // block_c), block_c


if triton is not None:

    @triton.jit
    def _forward(X, Y, W, B, MEAN, RSTD, A, S, rows, c, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 HAS_ADD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ch = tl.arange(0, BLOCK_C)
        rmask = r < rows
        cmask = ch < c
        mask = rmask[:, None] & cmask[None, :]
        at = r.to(tl.int64)[:, None] * c + ch[None, :]
        x = tl.load(X + at, mask=mask, other=0.0)
        if HAS_ADD:  # normalise s = x + a, rounded to the input's dtype as a separate add would round it
            x = (x.to(tl.float32) + tl.load(A + at, mask=mask, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + at, x, mask=mask)
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / c
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / c + eps)
        y = d * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + at, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + r, mean, mask=rmask)
        tl.store(RSTD + r, rstd, mask=rmask)

    @triton.jit
    def _backward(X, DY, DX, W, MEAN, RSTD, DWB, DS, rows, c, per, HAS_W: tl.constexpr,
                  PARAM_GRADS: tl.constexpr, HAS_DS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        ch = tl.arange(0, BLOCK_C)
        cmask = ch < c
        w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_W:
            w = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
        sum_w = tl.zeros([BLOCK_C], tl.float32)  # per channel: sum of dy * xhat, and of dy
        sum_b = tl.zeros([BLOCK_C], tl.float32)
        r_start = pid * per
        r_end = tl.minimum(r_start + per, rows)
        for r0 in range(r_start, r_end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rmask = r < r_end
            mask = rmask[:, None] & cmask[None, :]
            at = r.to(tl.int64)[:, None] * c + ch[None, :]
            x = tl.load(X + at, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + at, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + r, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + r, mask=rmask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = dy * w[None, :]
            c1 = tl.sum(xhat * wdy, axis=1) / c
            c2 = tl.sum(wdy, axis=1) / c
            dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DS:  # the gradient the input also gets along the residual path, summed here
                dx += tl.load(DS + at, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + at, dx.to(DX.dtype.element_ty), mask=mask)
            if PARAM_GRADS:
                sum_w += tl.sum(dy * xhat, axis=0)
                sum_b += tl.sum(dy, axis=0)
        if PARAM_GRADS:
            row = pid.to(tl.int64) * 2 * c
            tl.store(DWB + row + ch, sum_w, mask=cmask)
            tl.store(DWB + row + c + ch, sum_b, mask=cmask)


def _launch_forward(x2: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, 1/std, s): the norm of s = x2 (+ `add`, a tensor of x2's shape and dtype, summed in the
    kernel and written out as s)."""
    rows, c = x2.shape
    block_r, block_c = _blocks(c)
    y = torch.empty_like(x2)
    s = x2 if add is None else torch.empty_like(x2)
    stats = torch.empty(2, rows, device=x2.device, dtype=torch.float32)
    with on_device(x2):  # Triton launches on the current device
        launch(_forward, (triton.cdiv(rows, block_r),),
               x2, y, weight if weight is not None else x2, bias if bias is not None else x2, stats[0], stats[1],
               add if add is not None else x2, s, rows, c, eps, HAS_W=weight is not None, HAS_B=bias is not None,
               HAS_ADD=add is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=WARPS)
    return y, stats[0], stats[1], s


def _launch_backward(x2: torch.Tensor, dy2: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                     rstd: torch.Tensor, param_grads: bool, ds2: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input's gradient (plus `ds2`, the gradient it gets along another path, where given), and with
    `param_grads` the [2, c] fp32 sums of dy * xhat and dy."""
    rows, c = x2.shape
    block_r, block_c = _blocks(c)
    programs = min(triton.cdiv(rows, block_r), BACKWARD_PROGRAMS)
    per = math.ceil(math.ceil(rows / programs) / block_r) * block_r
    programs = triton.cdiv(rows, per)
    dx = torch.empty_like(x2)
    dwb = torch.empty(programs, 2, c, device=x2.device, dtype=torch.float32) if param_grads else mean
    with on_device(x2):
        launch(_backward, (programs,), x2, dy2, dx, weight if weight is not None else x2, mean, rstd, dwb,
               ds2 if ds2 is not None else x2, rows, c, per, HAS_W=weight is not None, PARAM_GRADS=param_grads,
               HAS_DS=ds2 is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=WARPS)
    return dx, dwb.sum(0) if param_grads else None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = x.view(-1, x.shape[-1])
        y, mean, rstd, _ = _launch_forward(x2, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.records = kernel_builds.current()  # a dry run's: its backward is noted there too
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        c = x.shape[-1]
        param_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        with kernel_builds.noting(ctx.records):
            dx, sums = _launch_backward(x.view(-1, c), dy.contiguous().view(-1, c), weight, mean, rstd, param_grads)
        dweight = sums[0].to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = sums[1].to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx.view(x.shape) if ctx.needs_input_grad[0] else None, dweight, dbias, None


class _AddLayerNorm(torch.autograd.Function):
    """(s, LayerNorm(s)) for s = h + a, or s = h where `a` is None (s is then h itself). In the backward
    s's own gradient (the residual path's) is summed into the norm's input gradient inside the kernel,
    where autograd would add the two in a pass of its own; h and a get that one gradient."""

    @staticmethod
    def forward(ctx, h, a, weight, bias, eps):
        c = h.shape[-1]
        y, mean, rstd, s = _launch_forward(h.view(-1, c), weight, bias, eps, None if a is None else a.view(-1, c))
        s = h if a is None else s.view(h.shape)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.records = kernel_builds.current()
        return s, y.view(h.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, ds, dy):
        s, weight, mean, rstd = ctx.saved_tensors
        c = s.shape[-1]
        need_h, need_a, need_w, need_b = ctx.needs_input_grad[:4]
        with kernel_builds.noting(ctx.records):
            dx, sums = _launch_backward(s.view(-1, c), dy.contiguous().view(-1, c), weight, mean, rstd,
                                        need_w or need_b, ds.contiguous().view(-1, c))
        dx = dx.view(s.shape)
        dweight = sums[0].to(weight.dtype) if need_w else None
        dbias = sums[1].to(ctx.bias_dtype) if need_b else None
        return dx if need_h else None, dx if need_a else None, dweight, dbias, None


def _probe(like: torch.Tensor) -> None:
    """Build and run both kernels, with and without parameters, on a small tensor of `like`'s device and
    dtype, launched directly rather than through autograd (a probe that saved tensors would join an
    enclosing gradient checkpoint's recording, which its recomputation would then not match)."""
    x = torch.zeros(16, 16, device=like.device, dtype=like.dtype)
    ones = torch.ones(16, device=like.device, dtype=like.dtype)
    for weight, param_grads in ((None, False), (ones, True)):  # without parameters; with them and a residual
        residual = x if weight is not None else None
        _, mean, rstd, _ = _launch_forward(x, weight, weight, 1e-5, add=residual)
        _launch_backward(x, x, weight, mean, rstd, param_grads, ds2=residual)


def _ready(x: torch.Tensor) -> bool:
    """Whether the kernels run on this machine (`kernel_builds.ready`, probing on x's device and dtype)."""
    def probe() -> None:
        with on_device(x):
            _probe(x)
    return kernel_builds.ready(_state, probe, "the LayerNorm kernels do not run here, PyTorch's LayerNorm runs instead")


def layer_norm(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.layer_norm for a call `applies` accepts."""
    if not _ready(x):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps)


def add_applies(h: torch.Tensor, a: torch.Tensor | None) -> bool:
    """Whether `add_layer_norm` can sum `a` into `h` in its kernel (where `applies` takes `h`)."""
    return a is None or (a.shape == h.shape and a.dtype == h.dtype and a.device == h.device and a.is_contiguous())


def add_layer_norm(h: torch.Tensor, a: torch.Tensor | None, normalized_shape: tuple[int, ...],
                   weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, F.layer_norm(s, ...)) for s = h + a (h itself where `a` is None), for a call `applies` and
    `add_applies` accept: one kernel each way, the residual's gradient summed in the backward's."""
    if not _ready(h):
        s = h if a is None else h + a
        return s, F.layer_norm(s, normalized_shape, weight, bias, eps)
    return _AddLayerNorm.apply(h, a, weight, bias, eps)
