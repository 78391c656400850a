"""One matrix product for the projections an attention layer applies to one input, adapters included
(`performance.fused_projections`).

At batch 1 an SD step is a chain of thousands of small GPU kernels. Self-attention projects the same
input three times (q, k, v) and cross-attention the text twice (k, v); with adapters each projection
is a base product plus the adapter's down and up products, forward and backward. Here the group's
frozen base weights share one storage (the layers' own weights become views into it: no extra
memory), and the group runs as

    [q | k | v] = x [Wq; Wk; Wv]^T + s * [(x Dq^T) Uq^T | (x Dk^T) Uk^T | (x Dv^T) Uv^T]

one base product and one down product for the group, then split. Training (and sampling outside an
`assembled` block) goes through lora_core/grouped_lora.py, which adds each member's up product into its
columns of the base's output; previews inside `assembled` use one product with blockdiag(Uq, Uk, Uv) made once
per preview; under torch.compile the plain autograd form runs (`_adapters`). The maths is the layer-by-layer
maths. A group that can't go this way (a merged adapter, per-image multipliers, dropout, unequal scales,
biases, weights moved since they were grouped) runs layer by layer as before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from .attention import attend
from .grouped_lora import grouped_kernel_applies, grouped_lora
from .lora import LoRALinear, LoRAModule, in_adapter_dtype

log = logging.getLogger(__name__)


def _base(layer: nn.Module) -> nn.Module:
    return layer.base if isinstance(layer, LoRAModule) else layer


class Group:
    """The shared base weight of projections applied to one input, and where each layer's rows start."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.assembled: tuple[torch.Tensor, torch.Tensor] | None = None  # see `assembled`
        self._assembly: tuple[torch.Tensor, torch.Tensor] | None = None
        weights = [_base(m).weight for m in layers]
        self.weight = torch.cat([w.detach() for w in weights])
        self.sizes = [w.shape[0] for w in weights]
        start = 0
        for w, n in zip(weights, self.sizes, strict=True):
            w.data = self.weight[start:start + n]  # the layer's weight is now a view: no second copy
            start += n

    def still_shared(self, layers: tuple[nn.Module, ...]) -> bool:
        """Each base weight is still the view made at grouping (a `.to()` or load gives new storage)."""
        step = self.weight.element_size() * self.weight.shape[1]
        offsets = [sum(self.sizes[:i]) * step for i in range(len(self.sizes))]
        return all(_base(m).weight.data_ptr() == self.weight.data_ptr() + off for m, off in zip(layers, offsets, strict=True))

    def scale(self, layers: tuple[nn.Module, ...]) -> float | None:
        """The adapters' common multiplier x scale (0.0 for plain layers), or None when the group must run
        layer by layer (a trainable base weight or a hook would be bypassed by the shared product, too)."""
        if any(_base(m).bias is not None or _base(m).weight.requires_grad or m._forward_hooks
               or m._forward_pre_hooks for m in layers):
            return None
        if all(type(m) is nn.Linear for m in layers):
            return 0.0
        if not all(isinstance(m, LoRALinear) and not m.merged and m.per_image is None
                   and isinstance(m.dropout, nn.Identity) for m in layers):
            return None
        scales = {m.multiplier * m.scale for m in layers}
        return scales.pop() if len(scales) == 1 else None

    def __call__(self, x: torch.Tensor, layers: tuple[nn.Module, ...], s: float) -> list[torch.Tensor]:
        if s != 0 and (self.assembled is None or torch.is_grad_enabled()) and grouped_kernel_applies(x, layers):
            return list(grouped_lora(x, self.weight, layers, s).split(self.sizes, dim=-1))
        y = F.linear(x, self.weight)
        ready = self.assembled
        if s != 0 and ready is not None and not torch.is_grad_enabled() and ready[0].dtype == x.dtype == y.dtype:
            # sampling: the adapters' product accumulated into the base's output, the assembly made beforehand
            h = F.linear(x, ready[0])
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), ready[1].t(), alpha=s)
        elif s != 0:
            y = y + _adapters(x, layers, s).to(y.dtype)
        return list(y.split(self.sizes, dim=-1))

    def assemble(self, layers: tuple[nn.Module, ...]) -> None:
        """Build [D;D;D] and blockdiag(U) from the layers' working copies into buffers kept on the group (the
        same storage every time, so sampling graphs read them), for `__call__` to use without gradients."""
        pairs = [getattr(m, "work", None) for m in layers]
        if any(p is None for p in pairs):
            self.assembled = None
            return
        with torch.no_grad():
            down, up = torch.cat([d for d, _ in pairs]), torch.block_diag(*[u for _, u in pairs])
            buf = self._assembly
            if buf is None or any((a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device)
                                  for a, b in zip(buf, (down, up), strict=True)):
                buf = self._assembly = (down, up)
            else:
                buf[0].copy_(down)
                buf[1].copy_(up)
        self.assembled = buf


def _adapters(x: torch.Tensor, layers: tuple[nn.Module, ...], s: float) -> torch.Tensor:
    """s * (x D^T) blockdiag(U)^T for LoRALinear `layers`, in the dtype their plain path computes in."""
    pairs = [m.work or (m.lora_down.weight, m.lora_up.weight) for m in layers]
    down, up = torch.cat([d for d, _ in pairs]), torch.block_diag(*[u for _, u in pairs])
    fp32 = layers[0].lora_down.weight.dtype
    return in_adapter_dtype(x, lambda x: F.linear(F.linear(x, down), up), fp32) * s


NAMES = {"qkv": ("to_q", "to_k", "to_v"), "kv": ("to_k", "to_v")}  # a group's layers, by its key


@contextlib.contextmanager
def assembled(unet: nn.Module) -> Iterator[int]:
    """Within the block, the groups of `unet` whose adapters compute with a working copy use the copy's
    concatenation and block-diagonal made once, at the start, instead of at every call: for previews,
    whose 25 denoising steps read the same adapters. Yields how many groups were assembled."""
    groups = []
    for attn in unet.modules():
        for key, group in getattr(attn, "fused_groups", {}).items():
            group.assemble(tuple(getattr(attn, name) for name in NAMES[key]))
            if group.assembled is not None:
                groups.append(group)
    try:
        yield len(groups)
    finally:
        for group in groups:
            group.assembled = None


def project(x: torch.Tensor, attn: Attention, key: str, layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """The layers applied to x: as the attention layer's group `key` where it can, else one by one."""
    group = attn.fused_groups.get(key)
    if group is not None and not torch.compiler.is_compiling() and not group.still_shared(layers):
        # a `.to()` or a reload gave the weights new storage (the compiled step never moves them)
        log.warning("the %s projections of %s have moved since they were grouped: they run one by one from now "
                    "on (group them again with fuse_projections)", key, type(attn).__name__)
        del attn.fused_groups[key]
        group = None
    s = None if group is None else group.scale(layers)
    if s is None:
        return [m(x) for m in layers]
    return group(x, layers, s)


def _simple(attn: Attention) -> bool:
    """An attention layer of the SD/SDXL transformer blocks: nothing but projections and default-scaled
    attention, on diffusers' own processor (whose maths FusedProjections repeats)."""
    return (type(attn.processor) in (AttnProcessor2_0, FusedProjections) and attn.scale_qk
            and attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None
            and attn.norm_k is None and getattr(attn, "added_kv_proj_dim", None) is None
            and not getattr(attn, "only_cross_attention", False)
            and not attn.residual_connection and attn.rescale_output_factor == 1.0)


class FusedProjections:
    """Attention processor with grouped projections; anything else goes to diffusers' own processor."""

    def __init__(self) -> None:
        self.fallback = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if args or kwargs or attention_mask is not None or hidden_states.ndim != 3:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is None:
            q, k, v = project(hidden_states, attn, "qkv", tuple(getattr(attn, n) for n in NAMES["qkv"]))
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            q = attn.to_q(hidden_states)
            k, v = project(encoder_hidden_states, attn, "kv", tuple(getattr(attn, n) for n in NAMES["kv"]))
        b, heads = hidden_states.shape[0], attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = attend(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3]).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def fuse_projections(unet: nn.Module) -> int:
    """Group the projections of every attention layer of `unet` and give it the grouped processor; returns
    how many groups. Call after the adapters are injected and the base has its final dtype and device: a
    later `.to()` that moves the weights ungroups them (with a warning), it never computes with stale ones."""
    processor, n = FusedProjections(), 0
    for attn in unet.modules():
        if not isinstance(attn, Attention) or not _simple(attn):
            continue
        key = "kv" if attn.is_cross_attention else "qkv"
        layers = [getattr(attn, name) for name in NAMES[key]]
        if any(type(_base(m)) is not nn.Linear or _base(m).bias is not None for m in layers):
            continue
        attn.fused_groups = {key: Group(layers)}
        attn.set_processor(processor)
        n += 1
    return n
