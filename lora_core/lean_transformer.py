"""diffusers' transformer block with each residual sum joined to the LayerNorm after it
(`performance.lean_transformers`).

In an SD UNet's BasicTransformerBlock the hidden states go through three LayerNorms, each followed by a
residual sum (attention or feed-forward output + hidden states), and each norm's input also feeds that
sum. diffusers adds in a pass of its own and autograd adds the norm's input gradient to the residual's in
another. Where the LayerNorm kernels apply (lora_core/layer_norm.py, `add_layer_norm`) this block does the
sum inside the norm's forward kernel and the gradients' sum inside its backward kernel: the same maths,
with one rounding fewer in the backward, and two passes over the activation fewer each way per sum.
Elsewhere (CPU, fp32, PyTorch's LayerNorm, torch.compile) it computes what diffusers' block computes.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .half_norms import HalfLayerNorm


def _add_norm(
    norm: nn.Module, x: torch.Tensor, add: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) for s = add + x (x where `add` is None)."""
    if isinstance(norm, HalfLayerNorm):
        return norm.add_norm(x, add)
    s = x if add is None else add + x
    return s, norm(s)


class LeanBasicTransformerBlock(BasicTransformerBlock):
    """BasicTransformerBlock for the blocks `fits` accepts; the state dict and everything else are the
    parent's."""

    @staticmethod
    def fits(block: BasicTransformerBlock) -> bool:
        """The SD UNets' blocks: plain LayerNorms, self- then cross-attention, no positional embedding,
        no feed-forward chunking."""
        return (
            block.norm_type == "layer_norm"
            and block.pos_embed is None
            and not block.only_cross_attention
            and block.attn2 is not None
            and block._chunk_size is None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # the time step, class labels and added conditions are unused by a block of plain LayerNorms
        if cross_attention_kwargs or hidden_states.ndim != 3:  # GLIGEN, the deprecated scale, 4-D states
            return super().forward(
                hidden_states,
                attention_mask,
                encoder_hidden_states,
                encoder_attention_mask,
                timestep,
                cross_attention_kwargs,
                class_labels,
                added_cond_kwargs,
            )
        h, n = _add_norm(self.norm1, hidden_states, None)
        a = self.attn1(n, encoder_hidden_states=None, attention_mask=attention_mask)
        h, n = _add_norm(self.norm2, h, a)
        a = self.attn2(n, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask)
        h, n = _add_norm(self.norm3, h, a)
        return self.ff(n) + h


def use_lean_transformers(model: nn.Module) -> int:
    """Give every transformer block of `model` that fits the lean forward; returns how many have it."""
    for m in model.modules():
        if type(m) is BasicTransformerBlock and LeanBasicTransformerBlock.fits(m):
            m.__class__ = LeanBasicTransformerBlock
    return sum(type(m) is LeanBasicTransformerBlock for m in model.modules())
