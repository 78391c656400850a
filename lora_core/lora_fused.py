"""The forward and backward of a LoRA linear layer as one autograd function (training and sampling).

    y = x W^T + b + s * (x D^T) U^T        (W, b frozen; D = down [r, in], U = up [out, r], s = scale)

Written out by hand it needs fewer and cheaper kernels than the three nn.Linear calls it replaces:
the adapter's output is added inside the up projection's matrix product (addmm) instead of by a
multiply and an add over the whole activation, and the input's gradient from the adapter is added
inside the base layer's gradient product the same way (two more passes over the activation saved).
The fp32 adapter weights are cast to the compute dtype once per call. Same maths as the plain path
(`LoRAModule.lora_forward`) under autocast and in fp32, with one rounding fewer (the adapter's product
is added in the GEMM's fp32 accumulator); a half-precision base without autocast computes the adapter
in that precision too. bench/RESULTS.md has the measured effect. Second derivatives are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LoRALinearFn(torch.autograd.Function):
    """x [N, in] -> y [N, out], all in one dtype; the frozen base gets no gradient (`_fuses` checks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                up: torch.Tensor, scale: float) -> torch.Tensor:
        d, u = down.to(x.dtype), up.to(x.dtype)
        zs = torch.mm(x, d.t()).mul_(scale)  # [N, r]: small, so the scale costs nothing here
        y = F.linear(x, weight, bias)
        y.addmm_(zs, u.t())
        ctx.save_for_backward(x, weight, d, u, zs)
        ctx.scale, ctx.param_dtypes = scale, (down.dtype, up.dtype)
        return y  # not a view: callers may change it in place

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved products are cut from the graph
    def backward(ctx, grad: torch.Tensor):
        x, weight, d, u, zs = ctx.saved_tensors
        g = grad.to(x.dtype)
        gz = torch.mm(g, u).mul_(ctx.scale)  # d loss / d (x D^T)
        need_x, _, _, need_down, need_up, _ = ctx.needs_input_grad
        grad_down = torch.mm(gz.t(), x).to(ctx.param_dtypes[0]) if need_down else None
        grad_up = torch.mm(g.t(), zs).to(ctx.param_dtypes[1]) if need_up else None
        grad_x = torch.mm(g, weight).addmm_(gz, d) if need_x else None
        return grad_x, None, None, grad_down, grad_up, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in here: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lora_linear(x: torch.Tensor, base: torch.nn.Linear, down: torch.Tensor, up: torch.Tensor,
                scale: float) -> torch.Tensor:
    """base(x) + scale * up(down(x)) through `_LoRALinearFn`, in the compute dtype of `compute_dtype`."""
    dt = compute_dtype(x)
    bias = None if base.bias is None else base.bias.to(dt)
    x2 = x.to(dt).reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        y = _LoRALinearFn.apply(x2, base.weight.to(dt), bias, down, up, scale)
    return y.view(*x.shape[:-1], y.shape[-1])
