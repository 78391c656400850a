"""diffusers' ResNet block with the same maths in fewer passes over the image (`performance.lean_resnets`).

What diffusers' ResnetBlock2D does that costs a training step time (bench/layouts.py finds it, and
bench/RESULTS.md has the measurements):
- in training it calls `.contiguous()` on the input of the shortcut convolution: a channels-last
  activation is copied to NCHW, which cuDNN copies back, and the gradients cross layouts again (diffusers
  does it to keep DDP from warning about the shortcut weight's gradient strides; here the shortcut is
  frozen and never takes an adapter, so it has no gradient);
- it divides the output by `output_scale_factor`, which is 1.0 in every SD UNet: one pass forward and
  one backward for nothing;
- each convolution adds its bias in a pass of its own after cuDNN's kernel;
- each SiLU after a GroupNorm is a pass of its own each way.

Here the first convolution's bias joins the time embedding (a [batch, channels] add) before the one add
the block does anyway, and the second's joins the shortcut convolution's bias where the block has one.
Where the GroupNorm runs lora_core/nhwc_norm.py's kernels, they apply the SiLU too (and recompute the norm's
output in the backward pass rather than keep it), and the first norm's backward kernel also sums the
gradient the block's input gets through the shortcut, which autograd would add in a pass of its own. The
results differ from diffusers' only by rounding: the order of those additions, and the SiLU taking the
norm's fp32 output where diffusers' takes it rounded.

The plain convolutions run through `_conv_forward` (and SD1's projections, lora_core/nhwc_norm.py, through
F.linear), so hooks registered on those Conv2d modules do not fire; adapters replace the module and are
called as modules.
"""

from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .half_norms import HalfGroupNorm


def _plain(conv: nn.Module | None) -> bool:
    """A convolution whose bias can move: plain Conv2d (not an adapter's wrapper) with a bias."""
    return type(conv) is nn.Conv2d and conv.bias is not None


class LeanResnetBlock2D(ResnetBlock2D):
    """ResnetBlock2D for the blocks `fits` accepts; the state dict and everything else are the parent's."""

    @staticmethod
    def fits(block: ResnetBlock2D) -> bool:
        """The SD UNets' blocks: time embedding added (not scale-shift), no resampling inside the block."""
        return block.time_embedding_norm == "default" and block.upsample is None and block.downsample is None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:  # diffusers' deprecated `scale` argument: let the parent warn about it
            return super().forward(input_tensor, temb, *args, **kwargs)
        input_tensor, h = self._first_norm_act(input_tensor)
        h = self._conv1_with_time(h, temb)
        h = self._norm_act(self.norm2, h)
        if self.dropout.p > 0:
            h = self.dropout(h)
        shortcut, conv2 = self.conv_shortcut, self.conv2
        if _plain(shortcut) and _plain(conv2):
            out = shortcut._conv_forward(input_tensor, shortcut.weight, shortcut.bias + conv2.bias)
            out = out + conv2._conv_forward(h, conv2.weight, None)
        else:
            out = (input_tensor if shortcut is None else shortcut(input_tensor)) + conv2(h)
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor

    def _norm_act(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """nonlinearity(norm(x)): one kernel each way for a SiLU after a GroupNorm that has it fused."""
        if isinstance(norm, HalfGroupNorm) and type(self.nonlinearity) is nn.SiLU:
            return norm.with_silu(x)
        return self.nonlinearity(norm(x))

    def _first_norm_act(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, nonlinearity(norm1(x))), the x returned for the shortcut: where norm1's kernels take x, the
        gradient it gets through the shortcut is summed inside the norm's backward kernel."""
        if isinstance(self.norm1, HalfGroupNorm) and type(self.nonlinearity) is nn.SiLU:
            return self.norm1.with_residual(x, silu=True)
        return x, self.nonlinearity(self.norm1(x))

    def _conv1_with_time(self, h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """conv1(h) + time embedding, conv1's bias added to the embedding rather than to the image."""
        conv1 = self.conv1
        if temb is None:
            return conv1(h)
        if self.time_emb_proj is None:  # an embedding of the image's shape, added as it is
            return conv1(h) + temb
        temb = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
        if not _plain(conv1):
            return conv1(h) + temb[:, :, None, None]
        h = conv1._conv_forward(h, conv1.weight, None)
        return h + (temb + conv1.bias.to(temb.dtype)).to(h.dtype)[:, :, None, None]


def use_lean_resnets(model: nn.Module) -> int:
    """Give every ResNet block of `model` that fits the lean forward; returns how many have it."""
    for m in model.modules():
        if type(m) is ResnetBlock2D and LeanResnetBlock2D.fits(m):
            m.__class__ = LeanResnetBlock2D
    return sum(type(m) is LeanResnetBlock2D for m in model.modules())
