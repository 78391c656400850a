"""GroupNorm and LayerNorm of a half-precision UNet without autocast's fp32 round trip
(`performance.half_norms`).

Under autocast the normalisations run in fp32: each casts its bf16 input up, writes an fp32 output, and
the next convolution or linear layer casts it back down; the backward pass does the same in reverse.
PyTorch's bf16/fp16 norm kernels already accumulate their statistics in fp32, so running them on the
half-precision input directly gives the same statistics; the output is rounded to the half type where
the next convolution or linear layer would round it anyway (one SiLU in between now sees the rounded
value). Sampling (no autocast) already runs them this way. The swap changes only the class of
each norm module: parameters, state dicts and adapter files are untouched.

With `nhwc`, a GroupNorm given a channels-last half-precision CUDA tensor runs lora_core/nhwc_norm.py's
kernels, which keep the layout (in training and in sampling alike); with `rows`, a LayerNorm given a
contiguous half-precision CUDA tensor runs lora_core/layer_norm.py's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import layer_norm, nhwc_norm

HALF = (torch.bfloat16, torch.float16)


def _native(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Half-precision input under autocast with parameters of the same dtype (or none)."""
    return (x.dtype in HALF and torch.is_autocast_enabled(x.device.type)
            and (weight is None or weight.dtype == x.dtype))


class HalfGroupNorm(nn.GroupNorm):
    nhwc = False  # set per module by use_half_norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc and nhwc_norm.applies(x, self.weight):
            with torch.autocast(x.device.type, enabled=False):
                return nhwc_norm.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if not _native(x, self.weight):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def with_silu(self, x: torch.Tensor) -> torch.Tensor:
        """F.silu(self(x)), in the norm's own kernels where the channels-last ones apply."""
        if self.nhwc and nhwc_norm.applies(x, self.weight):
            with torch.autocast(x.device.type, enabled=False):
                return nhwc_norm.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=True)
        return F.silu(self(x))

    def with_residual(self, x: torch.Tensor, silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, self(x)), or with `silu` (x, F.silu(self(x))), for an input that also feeds a residual path,
        which takes the x returned: where the channels-last kernels apply, the gradient x gets along that
        path is summed inside the norm's backward kernel."""
        if self.nhwc and nhwc_norm.applies(x, self.weight):
            with torch.autocast(x.device.type, enabled=False):
                return nhwc_norm.residual_group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                                     silu=silu)
        return x, self.with_silu(x) if silu else self(x)


class HalfLayerNorm(nn.LayerNorm):
    rows = False  # set per module by use_half_norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows and layer_norm.applies(x, self.normalized_shape, self.weight):
            with torch.autocast(x.device.type, enabled=False):
                return layer_norm.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if not _native(x, self.weight):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def add_norm(self, x: torch.Tensor, add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, self(s)) for the residual sum s = add + x (x itself where `add` is None): one kernel each way
        where the row kernels apply, whose backward also sums the gradient s gets along the residual path."""
        kernels = self.rows and layer_norm.applies(x, self.normalized_shape, self.weight)
        if kernels and layer_norm.add_applies(x, add):
            with torch.autocast(x.device.type, enabled=False):
                return layer_norm.add_layer_norm(x, add, self.normalized_shape, self.weight, self.bias,
                                                 self.eps)
        s = x if add is None else add + x
        return s, self(s)


SWAPS = {nn.GroupNorm: HalfGroupNorm, nn.LayerNorm: HalfLayerNorm}


def use_half_norms(model: nn.Module, nhwc: bool = False, rows: bool = False) -> int:
    """Give every plain GroupNorm/LayerNorm in `model` the half-precision forward (GroupNorms the
    channels-last kernels too if `nhwc`, LayerNorms the row kernels if `rows`); returns how many."""
    n = 0
    for m in model.modules():
        if type(m) in SWAPS:
            m.__class__ = SWAPS[type(m)]
            n += 1
        if isinstance(m, HalfGroupNorm):
            m.nhwc = nhwc
        if isinstance(m, HalfLayerNorm):
            m.rows = rows
    return n
