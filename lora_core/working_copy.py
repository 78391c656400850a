"""A half-precision working copy of the adapter weights for one training step (`performance.adapter_copy`).

Under mixed precision the adapters keep fp32 weights and the frozen base computes in bf16/fp16, so every
adapted layer casts its two weights to the compute dtype in its forward, and the plain path casts their
gradients back in the backward: two small kernels per weight, 512 per SD1.5 step with the `attn`
targets, which at batch 1 is a tenth of the step's kernels. Here the whole set is cast by one
multi-tensor copy at the start of the step, the layers compute with those copies, and the gradients
that land on them come back into the fp32 weights' `.grad` by one more. The values are the ones the
per-layer casts make, so the step trains the same model (tests/test_working_copy.py).

The layers of a group of grouped projections (lora_core/fused_projections.py) compute together as
`x [D1; D2; D3]^T blockdiag(U1, U2, U3)^T`. Given the groups, the copy keeps each group's stacked downs
and block-diagonal ups as two tensors (the off-diagonal zeros written once), and the layers' own copies
are views into them: the step's one cast fills them, where the group assembled both at every call (a
concatenation, a fill and a copy per up weight: 128 kernels per SD1.5 step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .lora import LoRAModule


@dataclass
class Pack:
    """A group's stacked downs and block-diagonal ups; `spans[j]` = (index of layer j's down weight in
    `params`, its rows in `down`, its rows in `up`)."""

    group: object  # the fused_projections.Group, whose `packed` is set while the copy is active
    down: torch.Tensor
    up: torch.Tensor
    spans: list[tuple[int, slice, slice]]


class WorkingCopy:
    """bf16/fp16 copies of the trainable adapters' weights, used by the layers inside `active()`.
    `groups`: (group, its layers) of grouped projections, whose copies are kept stacked (module docstring)."""

    def __init__(self, modules: Iterable[LoRAModule], dtype: torch.dtype,
                 groups: Iterable[tuple[object, Sequence[LoRAModule]]] = ()) -> None:
        self.modules = [m for m in modules if m.lora_down.weight.requires_grad]
        self.params = [p for m in self.modules for p in (m.lora_down.weight, m.lora_up.weight)]
        self.dtype = dtype
        self.copies: list[torch.Tensor | None] = [None] * len(self.params)
        self.packs = [p for g, layers in groups if (p := self._pack(g, layers)) is not None]
        self.copies = [torch.empty_like(p, dtype=dtype).requires_grad_() if c is None else c
                       for c, p in zip(self.copies, self.params, strict=True)]

    def _pack(self, group: object, layers: Sequence[LoRAModule]) -> Pack | None:
        """Stacked copies for a group whose layers are all trained here (else None: they get their own)."""
        index = {id(m): 2 * i for i, m in enumerate(self.modules)}
        if not layers or any(id(m) not in index or self.copies[index[id(m)]] is not None for m in layers):
            return None
        downs, ups = [m.lora_down.weight for m in layers], [m.lora_up.weight for m in layers]
        if len({(d.shape[1], d.device) for d in downs}) != 1:
            return None
        rows, outs = sum(d.shape[0] for d in downs), sum(u.shape[0] for u in ups)
        down = torch.empty(rows, downs[0].shape[1], dtype=self.dtype, device=downs[0].device)
        up = torch.zeros(outs, rows, dtype=self.dtype, device=downs[0].device)
        spans, r, o = [], 0, 0
        for m, d, u in zip(layers, downs, ups, strict=True):
            i, rs, os = index[id(m)], slice(r, r + d.shape[0]), slice(o, o + u.shape[0])
            # the layer's own copies: leaves of their own that share the pack's storage
            self.copies[i], self.copies[i + 1] = down.detach()[rs].requires_grad_(), up.detach()[os, rs].requires_grad_()
            spans.append((i, rs, os))
            r, o = r + d.shape[0], o + u.shape[0]
        return Pack(group, down.requires_grad_(), up.requires_grad_(), spans)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Refresh the copies from the fp32 weights, then let the layers compute with them inside the
        block (forward and backward alike: gradient checkpointing recomputes inside the backward)."""
        with torch.no_grad():
            torch._foreach_copy_(self.copies, self.params)
        for i, m in enumerate(self.modules):
            m.work = (self.copies[2 * i], self.copies[2 * i + 1])
        for pack in self.packs:
            pack.group.packed = (pack.down, pack.up)
        try:
            yield
        finally:
            for m in self.modules:
                m.work = None
            for pack in self.packs:
                pack.group.packed = None

    def gradients_back(self) -> None:
        """Move the gradients the copies received into the fp32 weights' `.grad` (added where one is
        already there: accumulation, or a layer whose fused kernel writes fp32 gradients itself)."""
        fresh, more, seen = [], [], set()
        for p, g in self._pieces():
            first = p.grad is None and id(p) not in seen
            (fresh if first else more).append((p, g))
            seen.add(id(p))
        for p, _ in fresh:
            p.grad = torch.empty_like(p)
        if fresh:
            torch._foreach_copy_([p.grad for p, _ in fresh], [g for _, g in fresh])
        for p, g in more:
            p.grad.add_(g)

    def _pieces(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(fp32 weight, a gradient for it) from the layers' copies and the packs' blocks; clears them."""
        for p, c in zip(self.params, self.copies, strict=True):
            if c.grad is not None:
                yield p, c.grad
            c.grad = None
        for pack in self.packs:
            for which, buf in enumerate((pack.down, pack.up)):
                if buf.grad is not None:
                    for i, rs, os in pack.spans:
                        yield self.params[i + which], buf.grad[rs] if which == 0 else buf.grad[os, rs]
                buf.grad = None


def working_copy(modules: Iterable[LoRAModule], mixed_precision: str, on: bool,
                 groups: Iterable[tuple[object, Sequence[LoRAModule]]] = ()) -> WorkingCopy | None:
    """The step's working copy: under bf16/fp16 mixed precision when `performance.adapter_copy` is on."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return WorkingCopy(modules, dtype, groups) if on and dtype is not None else None
