"""Which fused kernel runs the UNet's and text encoders' attention (`performance.attention`).

On an H100 cuDNN's attention kernel measured 1.6-1.8x faster than flash attention for SD1.5's and
SDXL's large attention shapes, forward and backward (`bench/attention.py`, bench/RESULTS.md). Recent
PyTorch (2.11 measured) already prefers it there; older releases try flash attention first. But no kernel
is fastest at every shape: at SD1.5's head sizes of 80 and 160, PyTorch's memory-efficient kernel beat
cuDNN's by up to 1.8x on an H100 (`bench/attention_pick.py`). So `tuned` times cuDNN's, flash and the
memory-efficient kernel once for each new shape of the UNet's attention (`attend`, forward and backward
when training) and keeps the fastest; calls elsewhere try cuDNN first. `auto` puts cuDNN first on GPUs of
that generation or newer.
Where a kernel refuses a call (a mask it does not support, say) PyTorch falls through to the next one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

ORDERS = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH],
}
ORDERS["tuned"] = ORDERS["cudnn"]  # for the calls `attend` does not time
CUDNN_MIN_CAPABILITY = (9, 0)  # Hopper, where it was measured
CANDIDATES = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
TIMING = (2, 5)  # untimed and timed calls of each kernel when a shape is tuned

_tuning = False  # inside an `attention_kernels` block of the `tuned` order
_chosen: dict[tuple, SDPBackend | None] = {}  # by `_shape_key`: the fastest kernel (None: none ran)


def kernel_order(mode: str, device: torch.device) -> str:
    """`cudnn` or `flash` (the kernel tried first), `tuned` (the fastest for each shape, see `attend`), or
    `torch` (PyTorch's own order), for `mode` on `device`."""
    if mode == "torch" or device.type != "cuda":
        return "torch"
    if mode == "auto":
        return "cudnn" if torch.cuda.get_device_capability(device) >= CUDNN_MIN_CAPABILITY else "torch"
    return mode


def attention_kernels(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Within the block, scaled-dot-product attention tries kernels in the order `mode` picks for `device`.

    The order is process-wide while the block runs (PyTorch keeps it in global flags), and restored
    after it; CUDA graphs captured inside keep the kernels chosen at capture.
    """
    order = kernel_order(mode, device)
    if order == "torch":
        return contextlib.nullcontext()
    return _tuned_block(order) if order == "tuned" else sdpa_kernel(ORDERS[order], set_priority=True)


@contextlib.contextmanager
def _tuned_block(order: str) -> Iterator[None]:
    global _tuning
    before = _tuning
    _tuning = True
    try:
        with sdpa_kernel(ORDERS[order], set_priority=True):
            yield
    finally:
        _tuning = before


def _shape_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool) -> tuple:
    return (q.device, q.dtype, backward, *((tuple(t.shape), t.stride()) for t in (q, k, v)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v)` with default scale, no mask and no dropout, on the kernel
    found fastest for this shape inside a `tuned` block (timed at its first call; never while a CUDA graph is
    captured or under torch.compile, which take PyTorch's order)."""
    if not _tuning or not q.is_cuda or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = _shape_key(q, k, v, backward)
    if key not in _chosen:
        if torch.cuda.is_current_stream_capturing():
            return F.scaled_dot_product_attention(q, k, v)
        _chosen[key] = fastest_kernel(q, k, v, backward)
    kernel = _chosen[key]
    if kernel is None:
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel([kernel, *(b for b in ORDERS["cudnn"] if b != kernel)], set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)


def fastest_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool,
                   timer: Callable[[Callable[[], object]], float] | None = None) -> SDPBackend | None:
    """The candidate kernel that runs attention of these tensors' shapes and layouts fastest (forward and
    backward if `backward`), timed on random tensors of the same layout; None if none of them ran."""
    timer = timer or _cuda_time

    def like(t: torch.Tensor) -> torch.Tensor:
        x = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).normal_()
        return x.requires_grad_(backward)

    times = {}
    # identity hooks: a checkpointed forward's own hooks must not pack the timing's saved tensors
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.set_grad_enabled(backward):
        a, b, c = like(q), like(k), like(v)
        grad = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device) if backward else None
        for kernel in CANDIDATES:
            def call(kernel: SDPBackend = kernel) -> None:
                with sdpa_kernel([kernel]):
                    out = F.scaled_dot_product_attention(a, b, c)
                if grad is not None:
                    torch.autograd.grad(out, (a, b, c), grad)
            try:
                times[kernel] = timer(call)
            except RuntimeError as e:  # refused this shape, or out of memory
                log.debug("attention kernel %s skipped for %s: %s", kernel.name, tuple(q.shape), e)
    best = min(times, key=times.get) if times else None
    log.info("attention %s x %s keys%s: %s", tuple(q.shape), k.shape[-2], " with backward" if backward else "",
             ", ".join(f"{b.name.lower()} {ms:.3f} ms" for b, ms in times.items()) or "no kernel ran")
    return best


def _cuda_time(fn: Callable[[], object]) -> float:
    """Milliseconds per call of `fn`, by CUDA events."""
    for _ in range(TIMING[0]):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(TIMING[1]):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / TIMING[1]
