"""The forward and backward of a group of LoRA projections of one input as one autograd function (training).

    [y_1 | ... | y_G] = x [W_1; ...; W_G]^T + s * [(x D_1^T) U_1^T | ... | (x D_G^T) U_G^T]

(lora_core/fused_projections.py groups the q, k and v of self-attention and the k and v of cross-attention.)
Written as plain autograd this took a block-diagonal matrix of the up weights, assembled at every call (a
zeroed matrix and one copy per member, and in the backward one copy per member to take each gradient back
out of it), and the adapters' output was multiplied by s and added to the base's in passes of their own over
the whole [tokens, G x out] activation, forward and backward. Here each member's up product is added into its
columns of the base's output inside the product (addmm_ on a column slice, which cuBLAS writes in place), the
scale rides on the small [tokens, G x rank] down product, and the backward writes the same way. Same maths,
with one rounding fewer (the adapters' product is added in the GEMM's fp32 accumulator). As in the single
layers' function (lora_core/lora_fused.py), a working copy's half-precision weights are only computed with:
the gradients go to the fp32 weights, out of the GEMM's fp32 accumulator on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import lora_gemm, low_rank, weight_grads
from .lora_fused import _down, _gemm, _gemm_down, _mm_as, compute_dtype


def grouped_kernel_applies(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> bool:
    """Whether `grouped_lora` computes what the plain path would: the adapters in the base's compute dtype
    (`lora.in_adapter_dtype`), outside torch.compile (which fuses the plain path itself; an in-place product
    on an output is what torch 2.11's Dynamo mishandles in an autograd.Function, lora_core/lora_fused.py),
    for layers left on the hand-written path (`performance.fused_lora`)."""
    if torch.compiler.is_compiling() or not all(m.fused for m in layers):
        return False
    if torch.is_autocast_enabled(x.device.type) or (x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda):
        return True
    return x.dtype == layers[0].lora_down.weight.dtype


class _GroupedLoRAFn(torch.autograd.Function):
    """x [N, in] -> y [N, sum(outs)], all in one dtype; the frozen base gets no gradient (`Group.scale` checks).
    `params` holds the G downs, then the G ups, which get the gradients, in their own dtypes (fp32 straight
    out of the GEMM's accumulator on a GPU, `_mm_as`); `computes` the same weights to compute with (a working
    copy's half-precision tensors where one is active)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale: float, computes: list[torch.Tensor],
                *params: torch.Tensor) -> torch.Tensor:
        g = len(params) // 2
        downs, ups = [w.to(x.dtype) for w in computes[:g]], [w.to(x.dtype) for w in computes[g:]]
        down = torch.cat(downs) if g > 1 else downs[0]
        c, width = _side_by_side(x, ups), ups[0].shape[0]
        fused = None if c is None else _gemm_down(x, weight.t(), down.t(), c, scale, member_n=width)
        if fused is not None:  # the group's output and zs from one kernel
            y, zs = fused
        else:
            zs = _down(x, down, scale)  # [N, G x rank]
            y = None if c is None else _gemm(x, weight.t(), zs, c, member_n=width)  # a rank too large for z
            if y is None:
                y = F.linear(x, weight)
                for y_i, z_i, u in zip(y.split(_outs(ups), 1), zs.split(_ranks(ups), 1), ups, strict=True):
                    low_rank.add_(y_i, z_i, u)  # into the member's columns, in place
        ctx.save_for_backward(x, weight, down, zs, *ups)
        ctx.scale, ctx.dtypes, ctx.params = scale, [p.dtype for p in params], params
        ctx.records = low_rank.records()  # a dry run's: the backward's kernel launches are noted there too
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved products are cut from the graph
    def backward(ctx, grad: torch.Tensor):
        x, weight, down, zs, *ups = ctx.saved_tensors
        gy, g, needs = grad.to(x.dtype), len(ups), ctx.needs_input_grad[_PARAMS:]
        gys = gy.split(_outs(ups), 1)
        gz = torch.empty_like(zs)  # d loss / d (x D^T); beta=0: its unset values are never read
        for gz_i, gy_i, u in zip(gz.split(_ranks(ups), 1), gys, ups, strict=True):
            gz_i.addmm_(gy_i, u, beta=0, alpha=ctx.scale)
        grad_downs, grad_ups = [None] * g, [None] * g
        if all(needs) and all(p.is_leaf for p in ctx.params) and weight_grads.active(x.device):  # a side stream
            z_parts, ups_p = zs.split(_ranks(ups), 1), ctx.params[g:]
            jobs = [(list(ctx.params[:g]), gz.t(), x)]  # the downs' gradients: one product, split by rows
            jobs += [([u], gy_i.t(), z_i) for u, gy_i, z_i in zip(ups_p, gys, z_parts, strict=True)]
            weight_grads.accumulate(x.device, jobs, _mm_as, [gy, gz, x, zs])
        else:
            grad_downs, grad_ups = _weight_grads(ctx, gys, gz, x, zs, _ranks(ups))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _gemm(gy, weight, gz, down, records=ctx.records)
            if grad_x is None:
                grad_x = low_rank.add_(torch.mm(gy, weight), gz, down.t(), records=ctx.records)
        return grad_x, None, None, None, *grad_downs, *grad_ups


_PARAMS = 4  # where `params` start among the function's inputs (x, weight, scale, computes)


def _weight_grads(ctx, gys: tuple[torch.Tensor, ...], gz: torch.Tensor, x: torch.Tensor, zs: torch.Tensor,
                  ranks: list[int]) -> tuple[list, list]:
    """The members' down and up weights' gradients (None where not needed), returned to autograd."""
    g, needs = len(ranks), ctx.needs_input_grad[_PARAMS:]
    grad_ups = [_mm_as(gy_i.t(), z_i, dt) if need else None for gy_i, z_i, dt, need
                in zip(gys, zs.split(ranks, 1), ctx.dtypes[g:], needs[g:], strict=True)]
    grad_downs = [None] * g
    if any(needs[:g]):
        rows = _mm_as(gz.t(), x, ctx.dtypes[0]).split(ranks)
        grad_downs = [r.to(dt) if need else None for r, dt, need in zip(rows, ctx.dtypes[:g], needs[:g], strict=True)]
    return grad_downs, grad_ups


def _side_by_side(x: torch.Tensor, ups: list[torch.Tensor]) -> torch.Tensor | None:
    """The members' up weights side by side, [rank, G x out], for one product with every member's adapter
    (lora_core/lora_gemm.py): where that kernel is wanted, takes x's inner dimension and the members are
    alike (one width, one rank); else None, without assembling them."""
    if not low_rank.wanted_gemm(x) or x.shape[-1] > lora_gemm.MAX_K:
        return None
    if len(set(_outs(ups))) > 1 or len(set(_ranks(ups))) > 1:
        return None
    return (torch.cat(ups) if len(ups) > 1 else ups[0]).t()


def _outs(ups: list[torch.Tensor]) -> list[int]:
    return [u.shape[0] for u in ups]


def _ranks(ups: list[torch.Tensor]) -> list[int]:
    return [u.shape[1] for u in ups]


def grouped_lora(x: torch.Tensor, weight: torch.Tensor, layers: tuple[nn.Module, ...], scale: float) -> torch.Tensor:
    """x [..., in] through the group's shared base `weight` [sum(outs), in] and the adapters of `layers`
    (LoRALinear, one scale), in the dtype `compute_dtype` gives: [..., sum(outs)]."""
    dt = compute_dtype(x)
    x2 = x.to(dt).reshape(-1, x.shape[-1])
    work = [m.work or (m.lora_down.weight, m.lora_up.weight) for m in layers]  # a working copy where active
    computes = [d.detach() for d, _ in work] + [u.detach() for _, u in work]
    params = [m.lora_down.weight for m in layers] + [m.lora_up.weight for m in layers]
    with torch.autocast(x.device.type, enabled=False):
        y = _GroupedLoRAFn.apply(x2, weight.to(dt), scale, computes, *params)
    return y.view(*x.shape[:-1], y.shape[-1])
