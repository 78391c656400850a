"""The forward and backward of a LoRA linear layer as one autograd function (training and sampling).

    y = x W^T + b + s * (x D^T) U^T        (W, b frozen; D = down [r, in], U = up [out, r], s = scale)

Written out by hand it needs fewer and cheaper kernels than the three nn.Linear calls it replaces:
the adapter's output is added inside the up projection's matrix product (addmm) instead of by a
multiply and an add over the whole activation, and the input's gradient from the adapter is added
inside the base layer's gradient product the same way (two more passes over the activation saved).
The fp32 adapter weights are cast to the compute dtype once per call. Same maths as the plain path
(`LoRAModule.lora_forward`), with one rounding fewer: bench/RESULTS.md has the measured effect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                up: torch.Tensor, scale: float) -> torch.Tensor:
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        d, u = down.to(dt), up.to(dt)
        zs = torch.mm(x2, d.t()).mul_(scale)  # [N, r]: small, so the scale costs nothing here
        y = F.linear(x2, weight, bias)
        y.addmm_(zs, u.t())
        ctx.save_for_backward(x2, weight, d, u, zs)
        ctx.scale, ctx.in_shape = scale, x.shape
        ctx.param_dtypes = (down.dtype, up.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, weight, d, u, zs = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        gz = torch.mm(g, u).mul_(ctx.scale)  # d loss / d (x D^T)
        grad_up = torch.mm(g.t(), zs).to(ctx.param_dtypes[1])
        grad_down = torch.mm(gz.t(), x2).to(ctx.param_dtypes[0])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight.to(g.dtype)).addmm_(gz, d).view(ctx.in_shape)
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
    with torch.autocast(x.device.type, enabled=False):
        return _LoRALinearFn.apply(x.to(dt), base.weight.to(dt), bias, down, up, scale)
