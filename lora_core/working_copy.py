"""A half-precision working copy of the adapter weights for one training step (`performance.adapter_copy`).

Under mixed precision the adapters keep fp32 weights and the frozen base computes in bf16/fp16, so every
adapted layer casts its two weights to the compute dtype in its forward, and the plain path casts their
gradients back in the backward: two small kernels per weight, 512 per SD1.5 step with the `attn`
targets, which at batch 1 is a tenth of the step's kernels. Here the whole set is cast by one
multi-tensor copy at the start of the step, the layers compute with those copies, and the gradients
that land on them come back into the fp32 weights' `.grad` by one more. The values are the ones the
per-layer casts make, so the step trains the same model (tests/test_working_copy.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from .lora import LoRAModule


class WorkingCopy:
    """bf16/fp16 copies of the trainable adapters' weights, used by the layers inside `active()`."""

    def __init__(self, modules: Iterable[LoRAModule], dtype: torch.dtype) -> None:
        self.modules = [m for m in modules if m.lora_down.weight.requires_grad]
        self.params = [p for m in self.modules for p in (m.lora_down.weight, m.lora_up.weight)]
        self.copies = [torch.empty_like(p, dtype=dtype).requires_grad_() for p in self.params]
        self.dtype = dtype

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Refresh the copies from the fp32 weights, then let the layers compute with them inside the
        block (forward and backward alike: gradient checkpointing recomputes inside the backward)."""
        with torch.no_grad():
            torch._foreach_copy_(self.copies, self.params)
        for i, m in enumerate(self.modules):
            m.work = (self.copies[2 * i], self.copies[2 * i + 1])
        try:
            yield
        finally:
            for m in self.modules:
                m.work = None

    def gradients_back(self) -> None:
        """Move the gradients the copies received into the fp32 weights' `.grad` (added where one is
        already there: accumulation, or a layer whose fused kernel writes fp32 gradients itself)."""
        fresh, more = [], []
        for p, c in zip(self.params, self.copies, strict=True):
            if c.grad is not None:
                (fresh if p.grad is None else more).append((p, c.grad))
            c.grad = None
        for p, _ in fresh:
            p.grad = torch.empty_like(p)
        if fresh:
            torch._foreach_copy_([p.grad for p, _ in fresh], [g for _, g in fresh])
        for p, g in more:
            p.grad.add_(g)


def working_copy(modules: Iterable[LoRAModule], mixed_precision: str, on: bool) -> WorkingCopy | None:
    """The step's working copy: under bf16/fp16 mixed precision when `performance.adapter_copy` is on."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return WorkingCopy(modules, dtype) if on and dtype is not None else None
