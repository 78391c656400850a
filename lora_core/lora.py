"""Low-rank adapters around a frozen base layer.

    y = base(x) + multiplier * (alpha / rank) * up(down(dropout(x)))

`down` is kaiming-uniform and `up` zeros, so a new adapter changes nothing. The base stays frozen in
its own dtype (bf16/fp16 on a GPU); `down`/`up` are fp32. `multiplier` is the blend slider: 0 is the
base model, 1 the trained adapter, other values extrapolate; `per_image` gives each image of a batch
its own (previews at several weights in one batch). Merging writes the fp32 delta into the
base weight; unmerging puts back the exact original tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterError
from .lora_fused import lora_linear


def delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale * up @ down in fp32, shaped like the base weight.

    Linear: down [r, in], up [out, r] -> [out, in].
    Conv:   down [r, in, kh, kw], up [out, r, 1, 1] -> [out, in, kh, kw].
    """
    d, u = down.float(), up.float()
    if d.dim() == 2:
        return scale * (u @ d)
    r = d.shape[0]
    return scale * (u.reshape(u.shape[0], r) @ d.reshape(r, -1)).reshape(u.shape[0], *d.shape[1:])


def merged_weight(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + ΔW computed in fp32 and cast back; refuses a non-finite result."""
    out = weight.float() + delta
    if not torch.isfinite(out).all():
        raise AdapterError("Merging the adapter produced NaN or infinite weights; the base was left as it was.")
    return out.to(weight.dtype)


def _layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`layer(x)` computed with `weight` in place of the layer's own (LoRA layers have no bias)."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, None)
    return F.linear(x, weight)


def in_adapter_dtype(x: torch.Tensor, adapter: Callable[[torch.Tensor], torch.Tensor],
                     weight_dtype: torch.dtype) -> torch.Tensor:
    """adapter(x) in the dtype the base computes in: under autocast its compute dtype; for a half-precision
    base without autocast (sampling on a GPU) the activations' dtype; otherwise the LoRA weights' dtype
    (fp32). The activations are never cast to a wider type: they are large, the adapter's weights small."""
    if torch.is_autocast_enabled(x.device.type):
        return adapter(x)
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cuda":
        with torch.autocast("cuda", dtype=x.dtype):
            return adapter(x)
    return adapter(x.to(weight_dtype))


class LoRAModule(nn.Module):
    """Shared state of LoRALinear and LoRAConv2d: scaling, multiplier, merge bookkeeping."""

    base: nn.Module
    lora_down: nn.Module
    lora_up: nn.Module

    def _setup(self, base: nn.Module, rank: int, alpha: float | None, dropout: float, multiplier: float) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha) if alpha else float(rank)  # kohya: alpha 0/None means alpha = rank
        self.multiplier = multiplier
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.per_image: torch.Tensor | None = None  # one multiplier per image of a batched preview, if set
        self.fused = True  # run through lora_fused where it applies (`performance.fused_lora`)
        self._merged_as: float | None = None  # multiplier baked into base.weight, if merged
        self._original: torch.Tensor | None = None
        self.work: tuple[torch.Tensor, torch.Tensor] | None = None  # half copies of down/up (working_copy.py)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        """alpha / rank: the one place the scaling is computed."""
        return self.alpha / self.rank

    @property
    def merged(self) -> bool:
        return self._merged_as is not None

    def delta_weight(self) -> torch.Tensor:
        """The fp32 weight delta at multiplier 1."""
        return delta_weight(self.lora_down.weight, self.lora_up.weight, self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Bake multiplier * ΔW into the base weight; forward then runs the base alone."""
        if self.merged:
            return
        w = self.base.weight
        new = merged_weight(w, self.multiplier * self.delta_weight().to(w.device))
        self._original = w.detach().clone()
        w.copy_(new)
        self._merged_as = self.multiplier

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before merge()."""
        if not self.merged:
            return
        self.base.weight.copy_(self._original)
        self._original, self._merged_as = None, None

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * scale * up(down(dropout(x))), in the dtype of `in_adapter_dtype`."""
        h = in_adapter_dtype(x, lambda x: self._adapter(self.dropout(x)), self.lora_down.weight.dtype)
        if self.per_image is None:
            return h * (self.multiplier * self.scale)
        # the pipeline runs [negative prompts..., prompts...] as one batch under CFG: the images' multipliers
        # repeat in the same order
        m = self.per_image.repeat(h.shape[0] // self.per_image.shape[0]) * self.scale
        return h * m.to(h.dtype).view(-1, *[1] * (h.dim() - 1))

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        """up(down(x)), with the step's working copy of the weights when one is set."""
        if self.work is None:
            return self.lora_up(self.lora_down(x))
        return _layer(self.lora_up, _layer(self.lora_down, x, self.work[0]), self.work[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.per_image is None and self.multiplier == 0:
            return self.base(x)
        if self._fuses():
            return lora_linear(x, self.base, self.lora_down.weight, self.lora_up.weight,
                               self.multiplier * self.scale, self.work)
        y = self.base(x)
        return y + self.lora_forward(x).to(y.dtype)

    def _fuses(self) -> bool:
        """Whether this call takes the hand-written kernel (training and sampling alike): a frozen Linear,
        one multiplier for the batch, no dropout; per-image multipliers and conv layers take the plain path."""
        return (self.fused and type(self.base) is nn.Linear and self.per_image is None
                and isinstance(self.dropout, nn.Identity)
                and not self.base.weight.requires_grad
                and (self.base.bias is None or not self.base.bias.requires_grad))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, multiplier={self.multiplier}, merged={self.merged}"


class LoRALinear(LoRAModule):
    """LoRA on an nn.Linear: down [r, in], up [out, r]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 multiplier: float = 1.0) -> None:
        super().__init__()
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        self._setup(base, rank, alpha, dropout, multiplier)


class LoRAConv2d(LoRAModule):
    """LoRA on an nn.Conv2d: down is a conv with the base's kernel/stride/padding, up a 1x1 conv."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 multiplier: float = 1.0) -> None:
        super().__init__()
        if base.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        dev = base.weight.device
        self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                   base.dilation, bias=False, device=dev)
        self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=dev)
        self._setup(base, rank, alpha, dropout, multiplier)


def wrap(base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
         multiplier: float = 1.0) -> LoRAModule:
    """The LoRA wrapper that fits `base` (Linear or Conv2d)."""
    if isinstance(base, nn.Linear):
        return LoRALinear(base, rank, alpha, dropout, multiplier)
    if isinstance(base, nn.Conv2d):
        return LoRAConv2d(base, rank, alpha, dropout, multiplier)
    raise TypeError(f"LoRA supports nn.Linear and nn.Conv2d, not {type(base).__name__}")
