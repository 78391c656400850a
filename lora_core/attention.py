"""Which fused kernel runs the UNet's and text encoders' attention (`performance.attention`).

On an H100 cuDNN's attention kernel measured 1.6-1.8x faster than flash attention for SD1.5's and
SDXL's large attention shapes, forward and backward (`bench/attention.py`, bench/RESULTS.md). Recent
PyTorch (2.11 measured) already prefers it there; older releases try flash attention first. No kernel is
sure to be fastest at every shape on every GPU, so `tuned` times cuDNN's, flash and the memory-efficient
kernel once for each new shape of the UNet's attention (`attend`, forward and backward when training) and
keeps the fastest; calls elsewhere try cuDNN first. On an H200 it kept cuDNN's at every SD1.5 batch-16 shape
but one and the step took the same time (bench/RESULTS.md), so `auto` puts cuDNN first, without timing, on
GPUs of that generation or newer.
Where a kernel refuses a call (a mask it does not support, say) PyTorch falls through to the next one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from functools import partial

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
TIMING = (2, 10, 10_000_000)  # untimed and timed calls of each kernel when a shape is tuned; GPU cycles
# slept first, which hides the host's launching of the timed calls (ample at about 1.8 GHz)

_lock = threading.Lock()
_tuning = 0  # how many `attention_kernels` blocks of the `tuned` order are open
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
    """`attend` tunes while any such block is open, in any thread (a depth count: blocks of two threads may
    close in any order)."""
    global _tuning
    with _lock:
        _tuning += 1
    try:
        with sdpa_kernel(ORDERS[order], set_priority=True):
            yield
    finally:
        with _lock:
            _tuning -= 1


def _shape_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool) -> tuple:
    """What the fastest kernel may depend on: shapes, layouts, dtypes, autocast, and whether it runs backward."""
    autocast = torch.is_autocast_enabled(q.device.type) and torch.get_autocast_dtype(q.device.type)
    return (q.device, q.dtype, autocast, backward, *((tuple(t.shape), t.stride()) for t in (q, k, v)))


def _on_gpu(q: torch.Tensor) -> bool:
    return q.is_cuda


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v)` with default scale, no mask and no dropout, on the kernel
    found fastest for this shape inside a `tuned` block (timed at its first call; never while a CUDA graph is
    captured or under torch.compile, which take the block's order, cuDNN first)."""
    if torch.compiler.is_compiling() or not _tuning or not _on_gpu(q):
        return F.scaled_dot_product_attention(q, k, v)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = _shape_key(q, k, v, backward)
    if key not in _chosen:
        if _capturing():
            return F.scaled_dot_product_attention(q, k, v)
        try:
            _chosen[key] = fastest_kernel(q, k, v, backward)
        except torch.OutOfMemoryError:
            log.warning("attention %s: no GPU memory left to time its kernels; cuDNN's first this time",
                        tuple(q.shape))
            return F.scaled_dot_product_attention(q, k, v)
    kernel = _chosen[key]
    if kernel is None or kernel == ORDERS["tuned"][0]:  # the block's order has it first already
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel([kernel, *(other for other in ORDERS["tuned"] if other != kernel)], set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)


def fastest_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool,
                   timer: Callable[[Callable[[], object]], float] | None = None) -> SDPBackend | None:
    """The candidate kernel that runs attention of these tensors' shapes and layouts fastest (forward and
    backward if `backward`), timed on random tensors of the same layout; None if none of them takes it.

    The random tensors come from a forked generator (the run's random stream is untouched), and the
    timing's saved tensors bypass a checkpointed forward's hooks. Running out of memory is raised.
    """
    timer = timer or _cuda_time
    times = {}
    with torch.random.fork_rng(devices=[q.device] if q.is_cuda else []), torch.set_grad_enabled(backward), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        try:
            a, b, c = (_like(t, backward) for t in (q, k, v))
        except RuntimeError as e:  # a layout no tensor of its own can have (overlapping strides)
            log.info("attention %s: kernels not timed (%s)", tuple(q.shape), e)
            return None
        # the gradient arrives in the layout the processor's transpose gives: tokens before heads
        grad = torch.randn(q.shape[0], q.shape[2], q.shape[1], v.shape[-1], dtype=q.dtype,
                           device=q.device).transpose(1, 2) if backward else None
        for kernel in CANDIDATES:
            with sdpa_kernel([kernel, SDPBackend.MATH]):  # math too: other threads' calls always find one
                if torch._fused_sdp_choice(a, b, c) != kernel.value:
                    continue  # the kernel does not take this shape
                try:
                    times[kernel] = timer(partial(_attention_pass, a, b, c, grad))
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError as e:  # took the shape, then failed on it: not a candidate
                    log.info("attention %s: %s failed (%s)", tuple(q.shape), kernel.name.lower(), e)
    best = min(times, key=times.get) if times else None
    log.info("attention %s x %s keys%s: %s", tuple(q.shape), k.shape[-2], " with backward" if backward else "",
             ", ".join(f"{kernel.name.lower()} {ms:.3f} ms" for kernel, ms in times.items()) or "no kernel ran")
    return best


def _like(t: torch.Tensor, backward: bool) -> torch.Tensor:
    x = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).normal_()
    return x.requires_grad_(backward)


def _attention_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor | None) -> None:
    out = F.scaled_dot_product_attention(q, k, v)
    if grad is not None:
        torch.autograd.grad(out, (q, k, v), grad)


def _cuda_time(fn: Callable[[], object]) -> float:
    """Milliseconds per call of `fn` on the GPU, by CUDA events. The GPU first sleeps while the calls are
    queued, so that the host's time to launch them (which a CUDA graph does not pay) is not measured."""
    for _ in range(TIMING[0]):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(TIMING[2])
    start.record()
    for _ in range(TIMING[1]):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / TIMING[1]
