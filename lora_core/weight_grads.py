"""The adapters' weight gradients on a CUDA stream of their own (`performance.weight_grad_stream`).

In the backward pass of an adapted layer (lora_core/lora_fused.py, grouped_lora.py) only the input's
gradient lies on the path to the layers before it. The adapters' weight gradients, `gy^T z` for the up
weight and `gz^T x` for the down weight, are products over every token of the batch that nothing reads until
the optimizer: small, memory-bound matrix products (about 1.9 ms of an SD1.5 batch-16 step on an H100,
bench/RESULTS.md) that otherwise wait their turn between the compute-bound attention and convolution
kernels. Inside `on_side_stream` they run on a second stream, beside the rest of the backward pass, and
go straight into the weights' `.grad` (added where one is there); the autograd function returns no
gradient for those weights. The stream forks from the step's stream at each layer (so it reads finished
inputs), the step's stream waits for it at the end of the block (so the optimizer reads finished
gradients), and the tensors it reads are kept alive until the step's stream has waited for the work that
reads them: at most LAG layers behind, else the memory they hold would grow through the backward pass.
CUDA-graph capture records the same forks and joins. The sums are the ones autograd would make.

Measured on an H100 (bench/data/sidegrads*-h100.jsonl, graphed steps): SD1.5 batch 1 13.61-13.68 ms against
13.92-13.96 without it, SDXL batch 4 151.35-151.54 against 153.26-153.83; SD1.5 batch 16 unchanged
(90.25-90.45 against 90.19-90.48), where the step's own kernels fill the GPU and the side products find no
room beside them.

The switch is per device, not per thread: autograd runs a GPU's backward functions in a thread of its own.
Within one backward pass a weight must get its gradient from this path only (a layer called once, through
the hand-written functions): a second contribution through autograd would be added on the step's stream
while the side stream writes.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator

import torch

LAG = 8  # layers' weight gradients in flight at most; the step's stream waits for older ones


class _Side:
    """A device's side stream and the work queued on it: (event recorded after it, tensors it reads). Nothing
    is allocated on the stream except right after `fork`, which waits for the step's stream: so a `.grad`
    made here and later freed on the step's stream (the optimizer's `zero_grad`) is only reused after the
    step's stream has finished with it."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.device = device
        self.pending: deque[tuple[torch.cuda.Event | None, list[torch.Tensor]]] = deque()

    def fork(self) -> contextlib.AbstractContextManager:
        """Make the side stream wait for the step's stream and current within the block."""
        if self.stream is None:  # a CPU stand-in (tests): the work runs in line
            return contextlib.nullcontext()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

    def done(self, keep: list[torch.Tensor]) -> None:
        """Note the work just queued, which reads `keep`; retire the oldest beyond LAG."""
        event = None
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending.append((event, keep))
        while len(self.pending) > LAG:
            self._retire()

    def _retire(self) -> None:
        event, _ = self.pending.popleft()  # the tensors are released after the step's stream waits
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def join(self) -> None:
        """Make the step's stream wait for all the side work, then release what it read."""
        try:
            if self.stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
        finally:
            self.pending.clear()


_SIDES: dict[tuple[str, int], _Side] = {}
_ACTIVE: dict[tuple[str, int], _Side] = {}


def _key(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda" and device.index is None:
        return "cuda", torch.cuda.current_device()
    return device.type, device.index or 0


@contextlib.contextmanager
def on_side_stream(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Within the block (a step's backward pass), adapted layers' weight gradients go to `.grad` from a side
    stream on `device` (in line on a CPU, for tests); the step's stream waits for them when the block ends."""
    key = _key(device)
    if not enabled or key in _ACTIVE:
        yield
        return
    if key not in _SIDES:
        _SIDES[key] = _Side(torch.device(*key) if key[0] == "cuda" else torch.device(key[0]))
    side = _ACTIVE[key] = _SIDES[key]
    try:
        yield
    finally:
        del _ACTIVE[key]
        side.join()


def active(device: torch.device) -> bool:
    """Whether `device`'s backward pass is inside `on_side_stream` (its layers then hand their products here);
    never under torch.compile."""
    return bool(_ACTIVE) and not torch.compiler.is_compiling() and _key(device) in _ACTIVE


Product = Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]  # (a, b, dtype) -> a @ b in dtype


def accumulate(device: torch.device, jobs: list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]],
               product: Product, keep: list[torch.Tensor]) -> None:
    """For each (params, a, b): `product(a, b, dtype)` split by rows among `params` (one weight, or a group's
    stacked down weights), each part added to its weight's `.grad` (or made it, where there is none), on the
    side stream of `device`; `keep`: every tensor the products read, held until the step's stream has waited
    for them. Only where `active(device)`."""
    side = _ACTIVE[_key(device)]
    try:
        with side.fork():
            for params, a, b in jobs:
                whole = product(a, b, params[0].dtype)
                parts = whole.split([p.shape[0] for p in params]) if len(params) > 1 else (whole,)
                for param, grad in zip(params, parts, strict=True):
                    grad = grad.to(param.dtype)
                    if param.grad is None:
                        param.grad = grad
                    else:
                        param.grad.add_(grad)
    finally:  # whatever was queued keeps its inputs alive until the step's stream waits for it
        side.done(keep)
