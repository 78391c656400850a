"""GroupNorm on channels-last half-precision activations without layout copies (`performance.nhwc_norms`).

PyTorch's CUDA GroupNorm works on the contiguous (NCHW) layout: given a channels-last tensor it copies
the input to NCHW, normalises, and the next convolution (cuDNN's fastest in NHWC) gets an NCHW output
back; the backward pass copies in both directions again. In a graphed SD1.5 batch-1 step these copies
were the largest single line of the profile, and in a lone preview 15% of the GPU time
(bench/RESULTS.md). The Triton kernels here read and write the tensors in whatever layout they have
(strides are arguments), so a channels-last activation stays channels-last.

Each program reads whole pixels (every channel of a run of pixels of one sample), so a channels-last
tensor is read in full contiguous rows; each sample is split over several programs (and at small batches
each pixel's channels by whole groups too) so a batch-1 tensor still fills the GPU. A first kernel keeps a running mean and sum of squared deviations (Welford's) at each
position of its tile, with no reduction inside the loop, then merges them (Chan's formula) per channel and,
through a scratch row of its own, per group, and writes those; a second merges every program's and
normalises. The backward pass is the same two-step shape.
Statistics, scale and shift are fp32; the output has the input's dtype, as PyTorch's kernel gives.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn
from torch.autograd.function import once_differentiable

from . import kernel_builds
from .kernel_builds import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the plain GroupNorm runs
    triton = None

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)
TARGET_PROGRAMS = 512  # programs per launch: a few per SM, so a batch-1 image still fills the GPU
TILE = 4096  # elements each program loads at a time (whole pixels: every channel of a few); measured best
MAX_SPLITS = 64  # programs per sample at most: each reads all its sample's partial statistics
MAX_CHANNELS = 4096  # one pixel's channels fit one tile (SDXL's widest: 2560)
MIN_RUN = 64  # channels a program reads of each pixel at least (128 contiguous bytes in bf16)
WARPS = 4
MIN_CAPABILITY = (7, 0)  # Triton's oldest GPUs


_state = {"failed": False, "worked": False}  # the kernels failed to build on this machine / ran at least once


def available() -> bool:
    return triton is not None and not _state["failed"]


def on_device(t: torch.Tensor) -> torch.cuda.device:
    """Make `t`'s GPU the current one while kernels launch (Triton launches on the current device); a
    no-op for CPU tensors (Triton's interpreter)."""
    return torch.cuda.device(t.device.index if t.is_cuda else -1)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: Triton present and working, a GPU it supports."""
    return available() and device.type == "cuda" and supports(
        device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def supports(index: int) -> bool:
    """Whether Triton supports GPU `index`."""
    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def applies(x: torch.Tensor, weight: torch.Tensor | None, any_layout: bool = False) -> bool:
    """Whether `group_norm` takes this call: a non-empty 4-D channels-last (or with `any_layout`,
    contiguous too) half-precision tensor of at most MAX_CHANNELS channels on a GPU Triton supports,
    parameters of its dtype (or none), outside torch.compile (which fuses the norm itself)."""
    if not (available() and x.is_cuda and x.dim() == 4 and x.dtype in HALF and x.numel() > 0
            and x.shape[1] <= MAX_CHANNELS):
        return False
    layout = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() or (
        any_layout and x.is_contiguous())
    return (layout and _mergeable(x) and (weight is None or weight.dtype == x.dtype)
            and not torch.compiler.is_compiling() and supports(x.device.index or 0))


def _plan(n: int, rows: int, c: int, groups: int) -> tuple[int, int, int, int, int]:
    """(splits per sample, rows per split, tile rows, tile columns, groups per program). A small batch that
    would leave the GPU short of programs splits each pixel's channels too, by whole groups, down to
    MIN_RUN channels per program."""
    cg, gpp = c // groups, groups
    while n * min(math.ceil(rows / max(1, TILE // triton.next_power_of_2(gpp * cg))), MAX_SPLITS) * (
            groups // gpp) < TARGET_PROGRAMS and gpp % 2 == 0 and gpp // 2 * cg >= MIN_RUN:
        gpp //= 2
    block_c = triton.next_power_of_2(gpp * cg)
    block_r = max(1, TILE // block_c)
    splits = max(1, min(math.ceil(TARGET_PROGRAMS * gpp / (n * groups)), math.ceil(rows / block_r), MAX_SPLITS))
    per = math.ceil(math.ceil(rows / splits) / block_r) * block_r
    return math.ceil(rows / per), per, block_r, block_c, gpp


def _view(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of `t` [N, C, H, W] seen as [N, H*W, C] (`_mergeable`). A size-1 W has any stride (layout
    checks ignore it), so the step between pixels is then H's."""
    return t.stride(0), t.stride(3) if t.shape[3] > 1 else t.stride(2), t.stride(1)


def _mergeable(t: torch.Tensor) -> bool:
    """Whether H and W of `t` can be walked as one pixel index with one step."""
    return t.shape[2] == 1 or t.shape[3] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


if triton is not None:

    @triton.jit
    def _channels(gpp, CG: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's channels (its block of `gpp` whole groups) and their mask."""
        local = tl.arange(0, BLOCK_C)
        return tl.program_id(2) * gpp * CG + local, local < gpp * CG

    @triton.jit
    def _groups(gpp, BLOCK_G: tl.constexpr):
        """This program's groups and their mask."""
        local = tl.arange(0, BLOCK_G)
        return tl.program_id(2) * gpp + local, local < gpp

    @triton.jit
    def _stats(X, PART, CHAN, total, rows, c, groups, gpp, s_n, s_r, s_c, per, splits, CG: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
        n = tl.program_id(0)
        s = tl.program_id(1)
        ch, cmask = _channels(gpp, CG, BLOCK_C)
        base = X + n.to(tl.int64) * s_n + ch.to(tl.int64)[None, :] * s_c
        r_start = s * per
        r_end = tl.minimum(r_start + per, rows)
        # Welford per tile position (row slot, channel): no reduction inside the loop
        cnt = tl.zeros([BLOCK_R], tl.float32)
        mean = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for r0 in range(r_start, r_end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rmask = r < r_end
            mask = rmask[:, None] & cmask[None, :]
            v = tl.load(base + r.to(tl.int64)[:, None] * s_r, mask=mask, other=0.0).to(tl.float32)
            cnt = cnt + rmask.to(tl.float32)
            delta = tl.where(mask, v - mean, 0.0)
            mean = mean + delta / tl.maximum(cnt, 1.0)[:, None]
            m2 = m2 + delta * tl.where(mask, v - mean, 0.0)
        # merge the row slots (Chan), then each group's channels through this program's scratch row
        total_cnt = tl.sum(cnt, axis=0)
        mean_c = tl.sum(mean * cnt[:, None], axis=0) / total_cnt
        dev = mean - mean_c[None, :]
        m2_c = tl.sum(m2 + dev * dev * cnt[:, None], axis=0)
        row = CHAN + (n * splits + s).to(tl.int64) * 2 * c
        tl.store(row + ch, mean_c, mask=cmask)
        tl.store(row + c + ch, m2_c, mask=cmask)
        tl.debug_barrier()
        g, gin = _groups(gpp, BLOCK_G)
        j = tl.arange(0, BLOCK_CG)
        gmask = gin[:, None] & (j < CG)[None, :]
        at = g[:, None] * CG + j[None, :]
        mean_gc = tl.load(row + at, mask=gmask, other=0.0)
        g_mean = tl.sum(mean_gc, axis=1) / CG
        dev_g = tl.where(gmask, mean_gc - g_mean[:, None], 0.0)
        g_m2 = tl.sum(tl.load(row + c + at, mask=gmask, other=0.0), axis=1) + total_cnt * tl.sum(dev_g * dev_g, axis=1)
        off = (n * groups + g) * splits + s
        out = gin
        tl.store(PART + off, tl.zeros([BLOCK_G], tl.float32) + total_cnt * CG, mask=out)
        tl.store(PART + total + off, g_mean, mask=out)
        tl.store(PART + 2 * total + off, g_m2, mask=out)

    @triton.jit
    def _group_sums(PART, total, n, groups, gpp, splits, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
        """The [splits, groups] tile of sample `n`'s partials at PART and PART + total, and their sums per
        group, with the 2D masks."""
        k = tl.arange(0, BLOCK_S)
        g, gin = _groups(gpp, BLOCK_G)
        mask = (k < splits)[:, None] & gin[None, :]
        at = (n * groups + g)[None, :] * splits + k[:, None]
        a = tl.load(PART + at, mask=mask, other=0.0)
        b = tl.load(PART + total + at, mask=mask, other=0.0)
        return a, b, mask, at

    @triton.jit
    def _normalise(X, Y, W, B, PART, MEAN, RSTD, total, rows, c, groups, gpp, s_n, s_r, s_c, y_n, y_r, y_c,
                   per, splits, eps, CG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_G: tl.constexpr):
        n = tl.program_id(0)
        s = tl.program_id(1)
        # every program of the sample merges the same partials into the same statistics and stores them
        c_i, mean_i, kg_mask, at = _group_sums(PART, total, n, groups, gpp, splits, BLOCK_G, BLOCK_S)
        m2_i = tl.load(PART + 2 * total + at, mask=kg_mask, other=0.0)
        cnt = tl.sum(c_i, axis=0)
        g_mean = tl.sum(c_i * mean_i, axis=0) / tl.maximum(cnt, 1.0)
        d = tl.where(kg_mask, mean_i - g_mean[None, :], 0.0)
        g_rstd = 1.0 / tl.sqrt(tl.sum(m2_i + c_i * d * d, axis=0) / tl.maximum(cnt, 1.0) + eps)
        g, gin = _groups(gpp, BLOCK_G)
        tl.store(MEAN + n * groups + g, g_mean, mask=gin)
        tl.store(RSTD + n * groups + g, g_rstd, mask=gin)
        tl.debug_barrier()
        ch, cmask = _channels(gpp, CG, BLOCK_C)
        mean = tl.load(MEAN + n * groups + ch // CG, mask=cmask, other=0.0)
        rstd = tl.load(RSTD + n * groups + ch // CG, mask=cmask, other=0.0)
        w, b = _params(W, B, ch, cmask, HAS_W, HAS_B, BLOCK_C)
        scale = rstd * w
        shift = b - mean * scale
        src = X + n.to(tl.int64) * s_n + ch.to(tl.int64)[None, :] * s_c
        dst = Y + n.to(tl.int64) * y_n + ch.to(tl.int64)[None, :] * y_c
        r_start = s * per
        r_end = tl.minimum(r_start + per, rows)
        for r0 in range(r_start, r_end, BLOCK_R):
            r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mask = (r < r_end)[:, None] & cmask[None, :]
            v = tl.load(src + r[:, None] * s_r, mask=mask, other=0.0).to(tl.float32)
            z = v * scale[None, :] + shift[None, :]
            if SILU:
                z = z / (1.0 + tl.exp(-z))
            tl.store(dst + r[:, None] * y_r, z.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_grad(dy, xhat, w, b, SILU: tl.constexpr):
        """The gradient reaching the norm's output: `dy` itself, or through a SiLU of it (recomputed)."""
        if SILU:
            z = xhat * w[None, :] + b[None, :]
            sig = 1.0 / (1.0 + tl.exp(-z))
            dy = dy * (sig * (1.0 + z * (1.0 - sig)))
        return dy

    @triton.jit
    def _params(W, B, ch, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
        w = tl.full([BLOCK_C], 1.0, tl.float32)
        if HAS_W:
            w = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
        b = tl.zeros([BLOCK_C], tl.float32)
        if HAS_B:
            b = tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)
        return w, b

    @triton.jit
    def _grad_sums(X, DY, W, B, MEAN, RSTD, PART, DWB, total, rows, c, groups, gpp,
                   s_n, s_r, s_c, d_n, d_r, d_c, per, splits, CG: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
        n = tl.program_id(0)
        s = tl.program_id(1)
        ch, cmask = _channels(gpp, CG, BLOCK_C)
        mean = tl.load(MEAN + n * groups + ch // CG, mask=cmask, other=0.0)
        rstd = tl.load(RSTD + n * groups + ch // CG, mask=cmask, other=0.0)
        w, b = _params(W, B, ch, cmask, HAS_W, HAS_B, BLOCK_C)
        xs = X + n.to(tl.int64) * s_n + ch.to(tl.int64)[None, :] * s_c
        ds = DY + n.to(tl.int64) * d_n + ch.to(tl.int64)[None, :] * d_c
        acc_a = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)  # per tile position: sum of dy, and of dy * xhat
        acc_b = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        r_start = s * per
        r_end = tl.minimum(r_start + per, rows)
        for r0 in range(r_start, r_end, BLOCK_R):
            r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mask = (r < r_end)[:, None] & cmask[None, :]
            x = tl.load(xs + r[:, None] * s_r, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(ds + r[:, None] * d_r, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
            dy = _silu_grad(dy, xhat, w, b, SILU)
            acc_a += dy
            acc_b += dy * xhat
        # per channel (also the weight's and bias's gradient partials), then per group through that row
        row = DWB + (n * splits + s).to(tl.int64) * 2 * c
        tl.store(row + ch, tl.sum(acc_b, axis=0), mask=cmask)
        tl.store(row + c + ch, tl.sum(acc_a, axis=0), mask=cmask)
        tl.debug_barrier()
        g, gin = _groups(gpp, BLOCK_G)
        j = tl.arange(0, BLOCK_CG)
        gmask = gin[:, None] & (j < CG)[None, :]
        at = g[:, None] * CG + j[None, :]
        w_gc = tl.full([BLOCK_G, BLOCK_CG], 1.0, tl.float32)
        if HAS_W:
            w_gc = tl.load(W + at, mask=gmask, other=0.0).to(tl.float32)
        off = (n * groups + g) * splits + s
        out = gin
        tl.store(PART + off, tl.sum(tl.load(row + c + at, mask=gmask, other=0.0) * w_gc, axis=1), mask=out)
        tl.store(PART + total + off, tl.sum(tl.load(row + at, mask=gmask, other=0.0) * w_gc, axis=1), mask=out)

    @triton.jit
    def _grad_input(X, DY, DX, W, B, MEAN, RSTD, PART, MEANS, DS, total, rows, inv_count, c, groups, gpp,
                    s_n, s_r, s_c, d_n, d_r, d_c, o_n, o_r, o_c, e_n, e_r, e_c, per, splits, CG: tl.constexpr,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, HAS_DS: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr):
        n = tl.program_id(0)
        s = tl.program_id(1)
        # each group's mean of w * dy and of w * dy * xhat, stored alike by every program of the sample
        a_i, b_i, _, _ = _group_sums(PART, total, n, groups, gpp, splits, BLOCK_G, BLOCK_S)
        g, gin = _groups(gpp, BLOCK_G)  # inv_count: 1 / (rows * CG), from the host (rows may be a constant 1)
        tl.store(MEANS + (2 * n) * groups + g, tl.sum(a_i, axis=0) * inv_count, mask=gin)
        tl.store(MEANS + (2 * n + 1) * groups + g, tl.sum(b_i, axis=0) * inv_count, mask=gin)
        tl.debug_barrier()
        ch, cmask = _channels(gpp, CG, BLOCK_C)
        mean_a = tl.load(MEANS + (2 * n) * groups + ch // CG, mask=cmask, other=0.0)
        mean_b = tl.load(MEANS + (2 * n + 1) * groups + ch // CG, mask=cmask, other=0.0)
        mean = tl.load(MEAN + n * groups + ch // CG, mask=cmask, other=0.0)
        rstd = tl.load(RSTD + n * groups + ch // CG, mask=cmask, other=0.0)
        w, b = _params(W, B, ch, cmask, HAS_W, HAS_B, BLOCK_C)
        xs = X + n.to(tl.int64) * s_n + ch.to(tl.int64)[None, :] * s_c
        ds = DY + n.to(tl.int64) * d_n + ch.to(tl.int64)[None, :] * d_c
        os = DX + n.to(tl.int64) * o_n + ch.to(tl.int64)[None, :] * o_c
        es = DS + n.to(tl.int64) * e_n + ch.to(tl.int64)[None, :] * e_c
        r_start = s * per
        r_end = tl.minimum(r_start + per, rows)
        for r0 in range(r_start, r_end, BLOCK_R):
            r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mask = (r < r_end)[:, None] & cmask[None, :]
            x = tl.load(xs + r[:, None] * s_r, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(ds + r[:, None] * d_r, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean[None, :]) * rstd[None, :]
            dy = _silu_grad(dy, xhat, w, b, SILU)
            dx = rstd[None, :] * (dy * w[None, :] - mean_a[None, :] - xhat * mean_b[None, :])
            if HAS_DS:  # the gradient the input also gets along the residual path, summed here
                dx += tl.load(es + r[:, None] * e_r, mask=mask, other=0.0).to(tl.float32)
            tl.store(os + r[:, None] * o_r, dx.to(DX.dtype.element_ty), mask=mask)


def _launch_forward(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernels: the output and the [2, N*groups] fp32 means and reciprocal deviations."""
    n, c, h, w = x.shape
    rows, cg = h * w, c // groups
    splits, per, block_r, block_c, gpp = _plan(n, rows, c, groups)
    total = n * groups * splits
    part = torch.empty(3 * total, device=x.device, dtype=torch.float32)
    chan = torch.empty(n * splits, 2, c, device=x.device, dtype=torch.float32)  # each program's scratch row
    stats = torch.empty(2, n * groups, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    grid = (n, splits, groups // gpp)
    sizes = dict(CG=cg, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_G=triton.next_power_of_2(gpp), num_warps=WARPS)
    launch(_stats, grid, x, part, chan, total, rows, c, groups, gpp, *_view(x), per, splits,
           BLOCK_CG=triton.next_power_of_2(cg), **sizes)
    launch(_normalise, grid, x, y, weight if weight is not None else x, bias if bias is not None else x, part,
           stats[0], stats[1], total, rows, c, groups, gpp, *_view(x), *_view(y), per, splits, eps,
           HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, BLOCK_S=triton.next_power_of_2(splits),
           **sizes)
    return y, stats


def _launch_backward(x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     stats: torch.Tensor, groups: int, silu: bool, input_grad: bool,
                     ds: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The backward kernels: the input's gradient (if `input_grad`; plus `ds`, a gradient of x's shape in a
    `_mergeable` layout that x gets along another path, where given) and each program's fp32 partials of the
    weight's and bias's gradients, [programs, 2, C]. `bias` is needed only to recompute the SiLU's input."""
    n, c, h, w = x.shape
    rows, cg = h * w, c // groups
    splits, per, block_r, block_c, gpp = _plan(n, rows, c, groups)
    total = n * groups * splits
    part = torch.empty(2 * total, device=x.device, dtype=torch.float32)
    dwb = torch.empty(n * splits, 2, c, device=x.device, dtype=torch.float32)  # per program: dweight, dbias
    grid = (n, splits, groups // gpp)
    w_arg, b_arg = (weight if weight is not None else x), (bias if bias is not None else x)
    flags = dict(CG=cg, HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, BLOCK_R=block_r,
                 BLOCK_C=block_c, BLOCK_G=triton.next_power_of_2(gpp), num_warps=WARPS)
    launch(_grad_sums, grid, x, dy, w_arg, b_arg, stats[0], stats[1], part, dwb, total, rows, c, groups, gpp,
           *_view(x), *_view(dy), per, splits, BLOCK_CG=triton.next_power_of_2(cg), **flags)
    dx = None
    if input_grad:
        dx = torch.empty_like(x)
        means = torch.empty(2 * n * groups, device=x.device, dtype=torch.float32)
        launch(_grad_input, grid, x, dy, dx, w_arg, b_arg, stats[0], stats[1], part, means,
               ds if ds is not None else x, total, rows, 1.0 / (rows * cg), c, groups, gpp, *_view(x), *_view(dy),
               *_view(dx), *_view(ds if ds is not None else x), per, splits, HAS_DS=ds is not None,
               BLOCK_S=triton.next_power_of_2(splits), **flags)
    return dx, dwb


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps, silu):
        y, stats = _launch_forward(x, groups, weight, bias, eps, silu)
        ctx.save_for_backward(x, weight, bias if silu else None, stats)  # the bias only to recompute the SiLU's input
        ctx.groups, ctx.silu, ctx.bias_dtype = groups, silu, bias.dtype if bias is not None else None
        ctx.records = kernel_builds.current()  # a dry run's: its backward is noted there too
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, stats = ctx.saved_tensors
        if not _mergeable(dy):  # rare: give it a layout whose pixels are one index
            dy = dy.contiguous(memory_format=torch.channels_last)
        with kernel_builds.noting(ctx.records):
            dx, dwb = _launch_backward(x, dy, weight, bias, stats, ctx.groups, ctx.silu, ctx.needs_input_grad[0])
        return dx, None, *_param_grads(ctx, weight, dwb), None, None


def _param_grads(ctx, weight: torch.Tensor | None, dwb: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The weight's and bias's gradients from the programs' partials, where they are wanted."""
    dweight = dbias = None
    sums = dwb.sum(0) if ctx.needs_input_grad[2] or ctx.needs_input_grad[3] else None
    if weight is not None and ctx.needs_input_grad[2]:
        dweight = sums[0].to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        dbias = sums[1].to(ctx.bias_dtype)
    return dweight, dbias


class _GroupNormNHWCResidual(torch.autograd.Function):
    """(x, GroupNorm(x) [with SiLU]) for an input that also feeds a residual path: x comes back as it is, and
    in the backward the gradient it gets along that path is summed into the norm's input gradient inside the
    kernel, where autograd would add the two in a pass of its own."""

    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps, silu):
        y = _GroupNormNHWC.forward(ctx, x, groups, weight, bias, eps, silu)
        return x, y

    @staticmethod
    @once_differentiable
    def backward(ctx, ds, dy):
        x, weight, bias, stats = ctx.saved_tensors
        dy, ds = (t if _mergeable(t) else t.contiguous(memory_format=torch.channels_last) for t in (dy, ds))
        with kernel_builds.noting(ctx.records):
            dx, dwb = _launch_backward(x, dy, weight, bias, stats, ctx.groups, ctx.silu, ctx.needs_input_grad[0],
                                       ds if ctx.needs_input_grad[0] else None)
        return dx, None, *_param_grads(ctx, weight, dwb), None, None


def _probe(like: torch.Tensor) -> None:
    """Build and run the forward and backward kernels (weight, bias, SiLU, residual: every branch) on a small tensor
    of `like`'s device and dtype, launched directly rather than through autograd (a probe that saved tensors
    would join an enclosing gradient checkpoint's recording, which its recomputation would then not match)."""
    x = torch.zeros(1, 4, 4, 64, device=like.device, dtype=like.dtype).permute(0, 3, 1, 2)  # channels-last
    ones = torch.ones(64, device=like.device, dtype=like.dtype)
    _, stats = _launch_forward(x, 32, ones, ones, 1e-5, True)
    for ds in (None, x):  # without and with a residual's gradient summed
        _launch_backward(x, x, ones, ones, stats, 32, True, True, ds=ds)


class NHWCGroupNorm(nn.GroupNorm):
    """A GroupNorm that takes the kernels where they apply, in any layout (the VAE decodes in NCHW, where
    PyTorch's kernel gives a batch-1 image only 32 blocks to fill the GPU with)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if applies(x, self.weight, any_layout=True):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def use_nhwc_norms(model: nn.Module) -> int:
    """Give every plain GroupNorm in `model` the kernels (NHWCGroupNorm); returns how many."""
    norms = [m for m in model.modules() if type(m) is nn.GroupNorm]
    for m in norms:
        m.__class__ = NHWCGroupNorm
    return len(norms)


def _pointwise(conv: nn.Module) -> bool:
    """A plain 1x1 convolution, which on a channels-last image is a linear layer over its pixels."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1 and conv.padding_mode == "zeros")


def _as_linear(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


class ChannelsLastTransformer2DModel(Transformer2DModel):
    """diffusers' Transformer2DModel kept in channels-last. Where the input is channels-last:
    - its output's `.contiguous()` is left out: the [B, HW, C] tokens are already a channels-last image,
      which the projection and the residual add take as they are (the copy to NCHW left a mixed-layout
      add and a conversion in both passes);
    - 1x1 convolution projections (SD1's proj_in and proj_out) run as linear layers on the pixels, which
      add their bias inside the matrix product where cuDNN's convolution adds it in a pass of its own.
    Everything else, the state dict included, is the parent's."""

    def _operate_on_continuous_inputs(self, hidden_states):
        if (self.use_linear_projection or not _pointwise(self.proj_in) or torch.compiler.is_compiling()
                or not hidden_states.is_contiguous(memory_format=torch.channels_last)):
            return super()._operate_on_continuous_inputs(hidden_states)
        batch, channels, height, width = hidden_states.shape
        tokens = self.norm(hidden_states).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        return _as_linear(self.proj_in, tokens), self.proj_in.out_channels

    def _get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width, inner_dim):
        if torch.compiler.is_compiling() or not residual.is_contiguous(memory_format=torch.channels_last):
            return super()._get_output_for_continuous_inputs(hidden_states, residual, batch_size, height, width,
                                                             inner_dim)
        image = (batch_size, height, width, inner_dim)
        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states).reshape(image).permute(0, 3, 1, 2)
        elif _pointwise(self.proj_out):
            hidden_states = _as_linear(self.proj_out, hidden_states).reshape(
                batch_size, height, width, -1).permute(0, 3, 1, 2)
        else:
            hidden_states = self.proj_out(hidden_states.reshape(image).permute(0, 3, 1, 2))
        return hidden_states + residual


def keep_channels_last(unet: nn.Module) -> int:
    """Let the UNet's transformer blocks hand back channels-last images as they are; returns how many."""
    blocks = [m for m in unet.modules() if type(m) is Transformer2DModel]
    for m in blocks:
        m.__class__ = ChannelsLastTransformer2DModel
    return len(blocks)


def _ready(x: torch.Tensor) -> bool:
    """Whether the kernels run on this machine (`kernel_builds.ready`, probing on x's device and dtype)."""
    def probe() -> None:
        with on_device(x):
            _probe(x)
    return kernel_builds.ready(_state, probe, "the channels-last GroupNorm kernels do not run here, PyTorch's "
                               "GroupNorm runs instead")


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, silu: bool = False) -> torch.Tensor:
    """F.group_norm for a tensor `applies` accepts, in its own layout; with `silu`, F.silu of it in the same
    kernels (the backward recomputes the norm's output instead of keeping it)."""
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    if not _ready(x):
        y = F.group_norm(x, groups, weight, bias, eps)
        return F.silu(y) if silu else y
    with on_device(x):  # Triton launches on the current device (autograd's backward thread sets the tensor's)
        return _GroupNormNHWC.apply(x, groups, weight, bias, eps, silu)


def residual_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float, silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, group_norm(x, ...)) for an input that also feeds a residual path, which takes the x returned: its
    gradient along that path is summed into the norm's backward kernel (`_GroupNormNHWCResidual`)."""
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    if not _ready(x):
        y = F.group_norm(x, groups, weight, bias, eps)
        return x, F.silu(y) if silu else y
    with on_device(x):
        return _GroupNormNHWCResidual.apply(x, groups, weight, bias, eps, silu)
