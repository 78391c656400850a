"""The forward and backward of a LoRA linear layer as one autograd function (training and sampling).

    y = x W^T + b + s * (x D^T) U^T        (W, b frozen; D = down [r, in], U = up [out, r], s = scale)

Written out by hand it needs fewer and cheaper kernels than the three nn.Linear calls it replaces:
the adapter's output is added inside the up projection's matrix product (addmm) instead of by a
multiply and an add over the whole activation, and the input's gradient from the adapter is added
inside the base layer's gradient product the same way (two more passes over the activation saved).
The fp32 adapter weights are cast to the compute dtype once per call; on a GPU their gradients come
straight out of the GEMM's fp32 accumulator (`_mm_as`). Same maths as the plain path
(`LoRAModule.lora_forward`) under autocast and in fp32, with one rounding fewer (the adapter's product
is added in the GEMM's fp32 accumulator); a half-precision base without autocast computes the adapter
in that precision too. bench/RESULTS.md has the measured effect. Second derivatives are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import lora_gemm, low_rank, weight_grads
from .half_norms import HALF

# cuBLAS can write a half-precision product straight into an fp32 output (torch.mm's out_dtype, CUDA, torch
# 2.8 and later; not used on ROCm, where it is unchecked here)
_MM_INTO_FP32 = "dtype" in torch.ops.aten.mm.overloads() and torch.version.hip is None


class _LoRALinearFn(torch.autograd.Function):
    """x [N, in] -> y [N, out], all in one dtype; the frozen base gets no gradient (`_fuses` checks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                up: torch.Tensor, scale: float, work_down: torch.Tensor | None, work_up: torch.Tensor | None,
                ) -> torch.Tensor:
        # a working copy (already in the compute dtype) replaces the per-call cast
        d = down.to(x.dtype) if work_down is None else work_down.to(x.dtype)
        u = up.to(x.dtype) if work_up is None else work_up.to(x.dtype)
        fused = _gemm_down(x, weight.t(), d.t(), u.t(), scale, bias)  # y and zs in one kernel, where it runs
        if fused is not None:
            y, zs = fused
        else:
            zs = _down(x, d, scale)
            y = _gemm(x, weight.t(), zs, u.t(), bias)  # a rank too large to compute z in the product
            if y is None:
                y = _base_and_adapter(x, weight, bias, zs, u)
        ctx.save_for_backward(x, weight, d, u, zs)
        ctx.scale, ctx.param_dtypes, ctx.params = scale, (down.dtype, up.dtype), (down, up)
        ctx.records = low_rank.records()  # a dry run's: the backward's kernel launches are noted there too
        return y  # not a view: callers may change it in place

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved products are cut from the graph
    def backward(ctx, grad: torch.Tensor):
        x, weight, d, u, zs = ctx.saved_tensors
        g = grad.to(x.dtype)
        need_x, _, _, need_down, need_up = ctx.needs_input_grad[:5]
        # d loss / d (x D^T), with the input's gradient in one kernel where it runs
        fused = _gemm_down(g, weight, u, d, ctx.scale, records=ctx.records) if need_x else None
        grad_x, gz = fused if fused is not None else (None, _down(g, u.t(), ctx.scale))
        grad_down = grad_up = None
        down, up = ctx.params
        if (need_down or need_up) and down.is_leaf and up.is_leaf and weight_grads.active(x.device):
            jobs = ([([down], gz.t(), x)] if need_down else []) + ([([up], g.t(), zs)] if need_up else [])
            weight_grads.accumulate(x.device, jobs, _mm_as, [gz, x, g, zs])  # into .grad from a side stream
        else:
            grad_down = _mm_as(gz.t(), x, ctx.param_dtypes[0]) if need_down else None
            grad_up = _mm_as(g.t(), zs, ctx.param_dtypes[1]) if need_up else None
        if need_x and grad_x is None:
            grad_x = _gemm(g, weight, gz, d, records=ctx.records)
            if grad_x is None:
                grad_x = low_rank.add_(torch.mm(g, weight), gz, d.t(), records=ctx.records)
        return grad_x, None, None, grad_down, grad_up, None, None, None


def _base_and_adapter(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, zs: torch.Tensor,
                      u: torch.Tensor) -> torch.Tensor:
    """x W^T + b + zs U^T through cuBLAS (and lora_core/low_rank.py's add kernel in mode add)."""
    if torch.compiler.is_compiling():
        # out of place: torch 2.11's Dynamo returns each intermediate of an autograd.Function's forward as
        # an extra output, and the alias of `y` made by addmm_ took the gradient meant for `y`; the backward
        # got zeros and no adapter trained (pytorch issue 180642, fixed in 2.12)
        return torch.addmm(F.linear(x, weight, bias), zs, u.t())
    if low_rank.wanted_add(x):  # the bias rides on the adapter's pass
        return low_rank.add_(torch.mm(x, weight.t()), zs, u, bias)
    return F.linear(x, weight, bias).addmm_(zs, u.t())


def _down(x: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    """scale x D^T, [N, r]: small, so the scale costs nothing here."""
    return torch.mm(x, d.t()).mul_(scale)


def _gemm(a: torch.Tensor, b: torch.Tensor, z: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None,
          member_n: int | None = None, records: list | None = None) -> torch.Tensor | None:
    """a b + z c (+ bias) in one kernel (lora_core/lora_gemm.py) where it applies and runs, else None."""
    if not lora_gemm.applies(a, b, z, c, member_n):
        return None
    return lora_gemm.linear(a, b, z, c, bias, member_n, records)


def _gemm_down(a: torch.Tensor, b: torch.Tensor, down: torch.Tensor, c: torch.Tensor, scale: float,
               bias: torch.Tensor | None = None, member_n: int | None = None, records: list | None = None
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a b + z c (+ bias), z = scale a down) in one kernel (lora_core/lora_gemm.py) where it applies and
    runs, else None."""
    if not lora_gemm.applies_down(a, b, down, c, member_n):
        return None
    return lora_gemm.linear_down(a, b, down, c, scale, bias, member_n, records)


def _mm_as(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype`. The fp32 gradient of an adapter weight from half-precision activations comes out of
    the GEMM's fp32 accumulator in one kernel on a GPU (no rounding to the half type, no cast kernel);
    elsewhere, and under torch.compile, the product is computed in the half type and then cast."""
    if dtype == a.dtype:
        return torch.mm(a, b)
    if (_MM_INTO_FP32 and a.is_cuda and dtype == torch.float32 and a.dtype in HALF
            and not torch.compiler.is_compiling()):
        return torch.mm(a, b, out_dtype=dtype)
    return torch.mm(a, b).to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in here: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lora_linear(x: torch.Tensor, base: torch.nn.Linear, down: torch.Tensor, up: torch.Tensor,
                scale: float, work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """base(x) + scale * up(down(x)) through `_LoRALinearFn`, in the compute dtype of `compute_dtype`.
    `work`: half-precision copies of down and up to compute with (lora_core/working_copy.py); the
    gradients still go to the fp32 `down` and `up`."""
    dt = compute_dtype(x)
    bias = None if base.bias is None else base.bias.to(dt)
    x2 = x.to(dt).reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        d, u = (None, None) if work is None else (work[0].detach(), work[1].detach())
        if torch.is_grad_enabled():
            y = _LoRALinearFn.apply(x2, base.weight.to(dt), bias, down, up, scale, d, u)
        else:  # sampling: nothing to save for a backward, and the scale rides on the up product
            d = (down if d is None else d).to(dt)
            u = (up if u is None else u).to(dt)
            y = F.linear(x2, base.weight.to(dt), bias).addmm_(F.linear(x2, d), u.t(), alpha=scale)
    return y.view(*x.shape[:-1], y.shape[-1])
