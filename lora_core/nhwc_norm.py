"""GroupNorm on channels-last half-precision activations without layout copies (`performance.nhwc_norms`).

PyTorch's CUDA GroupNorm works on the contiguous (NCHW) layout: given a channels-last tensor it copies
the input to NCHW, normalises, and the next convolution (cuDNN's fastest in NHWC) gets an NCHW output
back; the backward pass copies in both directions again. In a graphed SD1.5 batch-1 step these copies
were the largest single line of the profile, and in a lone preview 15% of the GPU time
(bench/RESULTS.md). The Triton kernels here read and write the tensors in whatever layout they have
(strides are arguments), so a channels-last activation stays channels-last.

Each (sample, group) is split over several programs so a batch-1 tensor still fills the GPU: a first
kernel writes every program's count, mean and sum of squared deviations (merged with Chan's formula, as
stable as Welford's), a second merges them and normalises. The backward pass is the same two-step shape.
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

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the plain GroupNorm runs
    triton = None

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)
TARGET_PROGRAMS = 512  # programs per launch: a few per SM, so one sample's 32 groups still fill the GPU
TILE = 2048  # elements each program loads at a time
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
    contiguous too) half-precision tensor on a GPU Triton supports, parameters of its dtype (or none),
    outside torch.compile (which fuses the norm itself)."""
    if not (available() and x.is_cuda and x.dim() == 4 and x.dtype in HALF and x.numel() > 0):
        return False
    layout = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() or (
        any_layout and x.is_contiguous())
    return (layout and _mergeable(x) and (weight is None or weight.dtype == x.dtype)
            and not torch.compiler.is_compiling() and supports(x.device.index or 0))


def _plan(n: int, groups: int, rows: int, cg: int) -> tuple[int, int, int, int]:
    """(splits per group, rows per split, tile rows, tile columns)."""
    block_c = triton.next_power_of_2(cg)
    block_r = max(1, TILE // block_c)
    splits = max(1, min(math.ceil(TARGET_PROGRAMS / (n * groups)), math.ceil(rows / block_r), 64))
    per = math.ceil(math.ceil(rows / splits) / block_r) * block_r
    return math.ceil(rows / per), per, block_r, block_c


def _view(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of `t` [N, C, H, W] seen as [N, H*W, C] (`_mergeable`). A size-1 W has any stride (layout
    checks ignore it), so the step between pixels is then H's."""
    return t.stride(0), t.stride(3) if t.shape[3] > 1 else t.stride(2), t.stride(1)


def _mergeable(t: torch.Tensor) -> bool:
    """Whether H and W of `t` can be walked as one pixel index with one step."""
    return t.shape[2] == 1 or t.shape[3] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


if triton is not None:

    @triton.jit
    def _stats(X, PART, total, rows, cg, groups, s_n, s_r, s_c, per, splits,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.program_id(1)
        n = pid // groups
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < cg
        base = X + n.to(tl.int64) * s_n + ((pid % groups) * cg + cols).to(tl.int64)[None, :] * s_c
        r_start = s * per
        r_end = tl.minimum(r_start + per, rows)
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for r0 in range(r_start, r_end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mask = (r < r_end)[:, None] & cmask[None, :]
            v = tl.load(base + r.to(tl.int64)[:, None] * s_r, mask=mask, other=0.0).to(tl.float32)
            nt = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
            mt = tl.sum(tl.sum(v, axis=1), axis=0) / nt
            d = tl.where(mask, v - mt, 0.0)
            tot = cnt + nt
            delta = mt - mean
            mean = mean + delta * (nt / tot)
            m2 = m2 + tl.sum(tl.sum(d * d, axis=1), axis=0) + delta * delta * (cnt * nt / tot)
            cnt = tot
        off = pid * splits + s
        tl.store(PART + off, cnt)
        tl.store(PART + total + off, mean)
        tl.store(PART + 2 * total + off, m2)

    @triton.jit
    def _normalise(X, Y, W, B, PART, MEAN, RSTD, total, rows, cg, groups, s_n, s_r, s_c, y_n, y_r, y_c,
                   per, splits, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.program_id(1)
        n = pid // groups
        k = tl.arange(0, BLOCK_S)
        kmask = k < splits
        c_i = tl.load(PART + pid * splits + k, mask=kmask, other=0.0)
        mean_i = tl.load(PART + total + pid * splits + k, mask=kmask, other=0.0)
        m2_i = tl.load(PART + 2 * total + pid * splits + k, mask=kmask, other=0.0)
        cnt = tl.sum(c_i, axis=0)
        mean = tl.sum(c_i * mean_i, axis=0) / cnt
        d = mean_i - mean
        rstd = 1.0 / tl.sqrt(tl.sum(m2_i + c_i * d * d, axis=0) / cnt + eps)
        tl.store(MEAN + pid, mean, mask=s == 0)
        tl.store(RSTD + pid, rstd, mask=s == 0)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < cg
        ch = (pid % groups) * cg + cols
        scale = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
        if HAS_W:
            scale = scale * tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
        shift = -mean * scale
        if HAS_B:
            shift = shift + tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)
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
    def _grad_sums(X, DY, W, B, MEAN, RSTD, PART, DWB, total, rows, cg, groups, channels,
                   s_n, s_r, s_c, d_n, d_r, d_c, per, splits, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   SILU: tl.constexpr, PARAM_GRADS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.program_id(1)
        n = pid // groups
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < cg
        ch = (pid % groups) * cg + cols
        mean = tl.load(MEAN + pid)
        rstd = tl.load(RSTD + pid)
        w, b = _params(W, B, ch, cmask, HAS_W, HAS_B, BLOCK_C)
        xs = X + n.to(tl.int64) * s_n + ch.to(tl.int64)[None, :] * s_c
        ds = DY + n.to(tl.int64) * d_n + ch.to(tl.int64)[None, :] * d_c
        sum_a = tl.zeros([BLOCK_C], tl.float32)  # per channel: sum of dy, and of dy * xhat
        sum_b = tl.zeros([BLOCK_C], tl.float32)
        r_start = s * per
        r_end = tl.minimum(r_start + per, rows)
        for r0 in range(r_start, r_end, BLOCK_R):
            r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mask = (r < r_end)[:, None] & cmask[None, :]
            x = tl.load(xs + r[:, None] * s_r, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(ds + r[:, None] * d_r, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            dy = _silu_grad(dy, xhat, w, b, SILU)
            sum_a += tl.sum(dy, axis=0)
            sum_b += tl.sum(dy * xhat, axis=0)
        off = pid * splits + s
        tl.store(PART + off, tl.sum(sum_a * w, axis=0))
        tl.store(PART + total + off, tl.sum(sum_b * w, axis=0))
        if PARAM_GRADS:  # per (sample, split) rows of dweight and dbias partials, summed on the host side
            row = (n * splits + s).to(tl.int64) * 2 * channels
            tl.store(DWB + row + ch, sum_b, mask=cmask)
            tl.store(DWB + row + channels + ch, sum_a, mask=cmask)

    @triton.jit
    def _grad_input(X, DY, DX, W, B, MEAN, RSTD, PART, total, rows, cg, groups,
                    s_n, s_r, s_c, d_n, d_r, d_c, o_n, o_r, o_c, per, splits, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.program_id(1)
        n = pid // groups
        k = tl.arange(0, BLOCK_S)
        kmask = k < splits
        count = (rows * cg).to(tl.float32)
        mean_a = tl.sum(tl.load(PART + pid * splits + k, mask=kmask, other=0.0), axis=0) / count
        mean_b = tl.sum(tl.load(PART + total + pid * splits + k, mask=kmask, other=0.0), axis=0) / count
        mean = tl.load(MEAN + pid)
        rstd = tl.load(RSTD + pid)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < cg
        ch = (pid % groups) * cg + cols
        w, b = _params(W, B, ch, cmask, HAS_W, HAS_B, BLOCK_C)
        xs = X + n.to(tl.int64) * s_n + ch.to(tl.int64)[None, :] * s_c
        ds = DY + n.to(tl.int64) * d_n + ch.to(tl.int64)[None, :] * d_c
        os = DX + n.to(tl.int64) * o_n + ch.to(tl.int64)[None, :] * o_c
        r_start = s * per
        r_end = tl.minimum(r_start + per, rows)
        for r0 in range(r_start, r_end, BLOCK_R):
            r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mask = (r < r_end)[:, None] & cmask[None, :]
            x = tl.load(xs + r[:, None] * s_r, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(ds + r[:, None] * d_r, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            dy = _silu_grad(dy, xhat, w, b, SILU)
            dx = rstd * (dy * w[None, :] - mean_a - xhat * mean_b)
            tl.store(os + r[:, None] * o_r, dx.to(DX.dtype.element_ty), mask=mask)


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps, silu):
        n, c, h, w = x.shape
        rows, cg = h * w, c // groups
        splits, per, block_r, block_c = _plan(n, groups, rows, cg)
        total = n * groups * splits
        part = torch.empty(3 * total, device=x.device, dtype=torch.float32)
        stats = torch.empty(2, n * groups, device=x.device, dtype=torch.float32)
        y = torch.empty_like(x)
        grid = (n * groups, splits)
        _stats[grid](x, part, total, rows, cg, groups, *_view(x), per, splits, BLOCK_R=block_r, BLOCK_C=block_c)
        _normalise[grid](x, y, weight if weight is not None else x, bias if bias is not None else x, part,
                         stats[0], stats[1], total, rows, cg, groups, *_view(x), *_view(y), per, splits, eps,
                         HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, BLOCK_R=block_r,
                         BLOCK_C=block_c, BLOCK_S=triton.next_power_of_2(splits))
        ctx.save_for_backward(x, weight, bias if silu else None, stats)  # the bias only to recompute the SiLU's input
        ctx.groups, ctx.silu, ctx.has_bias = groups, silu, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, stats = ctx.saved_tensors
        has_bias = ctx.has_bias
        n, c, h, w = x.shape
        if not _mergeable(dy):  # rare: give it a layout whose pixels are one index
            dy = dy.contiguous(memory_format=torch.channels_last)
        groups = ctx.groups
        rows, cg = h * w, c // groups
        splits, per, block_r, block_c = _plan(n, groups, rows, cg)
        total = n * groups * splits
        param_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        part = torch.empty(2 * total, device=x.device, dtype=torch.float32)
        dwb = torch.empty(n * splits, 2, c, device=x.device, dtype=torch.float32) if param_grads else part
        grid = (n * groups, splits)
        w_arg, b_arg = (weight if weight is not None else x), (bias if bias is not None else x)
        flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=ctx.silu)
        _grad_sums[grid](x, dy, w_arg, b_arg, stats[0], stats[1], part, dwb, total, rows, cg, groups, c,
                         *_view(x), *_view(dy), per, splits, **flags, PARAM_GRADS=param_grads,
                         BLOCK_R=block_r, BLOCK_C=block_c)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            _grad_input[grid](x, dy, dx, w_arg, b_arg, stats[0], stats[1], part, total, rows, cg, groups,
                              *_view(x), *_view(dy), *_view(dx), per, splits, **flags, BLOCK_R=block_r,
                              BLOCK_C=block_c, BLOCK_S=triton.next_power_of_2(splits))
        dweight = dbias = None
        if param_grads:
            sums = dwb.sum(0)
            if weight is not None and ctx.needs_input_grad[2]:
                dweight = sums[0].to(weight.dtype)
            if has_bias and ctx.needs_input_grad[3]:
                dbias = sums[1].to(x.dtype)
        return dx, None, dweight, dbias, None, None


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


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, silu: bool = False) -> torch.Tensor:
    """F.group_norm for a tensor `applies` accepts, in its own layout; with `silu`, F.silu of it in the same
    kernels (the backward recomputes the norm's output instead of keeping it)."""
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    if _state["worked"]:
        with on_device(x):  # Triton launches on the current device (autograd's backward
            return _GroupNormNHWC.apply(x, groups, weight, bias, eps, silu)  # thread sets the tensor's)
    try:  # the first call builds the kernels: a machine without what Triton needs falls back for good
        with on_device(x):
            y = _GroupNormNHWC.apply(x, groups, weight, bias, eps, silu)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        _state["failed"] = True
        log.warning("the channels-last GroupNorm kernels do not run here, PyTorch's GroupNorm runs instead: %s", e)
        y = F.group_norm(x, groups, weight, bias, eps)
        return F.silu(y) if silu else y
    _state["worked"] = True
    return y
