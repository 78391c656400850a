"""Building the trainer's Triton kernels (nhwc_norm.py, layer_norm.py, geglu.py) ahead of the first step,
in parallel (`performance.prebuild_kernels`).

Triton builds a kernel for each specialisation it meets (block sizes, integers equal to 1 or multiples of
16), at its first launch, one at a time: on a machine whose kernel cache is empty the first step of each
batch shape waits for dozens of builds in a row. Here a dry run of that step (forward and backward on the
real tensors, under `recording`) lists the launches it would make without making them; `build` then
builds them all on a pool of threads (Triton's compiler releases the GIL) and the real step finds them
built. Kernels the dry run missed are still built at their first launch, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_WORKERS = 16
_records: ContextVar[list | None] = ContextVar("kernel_launch_records", default=None)


def recording_launches() -> bool:
    """Whether launches in this thread are being recorded (a dry run): outputs are left unwritten."""
    return _records.get() is not None


def current() -> list | None:
    """The list this thread's launches are noted in, if any: an autograd function keeps it for its backward,
    which autograd runs on a thread of its own."""
    return _records.get()


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`, or, under `recording`, a note of it. Tensors are noted by dtype
    (Triton builds for a dtype and an alignment, not for the data); one whose address is not a multiple of
    16 bytes is left to be built at its first launch."""
    records = _records.get()
    if records is None:
        kernel[grid](*args, **kwargs)
        return
    if any(isinstance(a, torch.Tensor) and a.data_ptr() % 16 for a in args):
        return
    records.append((kernel, grid, tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args), kwargs))


@contextlib.contextmanager
def noting(records: list | None) -> Iterator[list | None]:
    """Within: this thread's kernel launches are noted in `records`, not made (made as usual if None)."""
    if records is None:
        yield None
        return
    token = _records.set(records)
    try:
        yield records
    finally:
        _records.reset(token)


def recording() -> contextlib.AbstractContextManager[list]:
    """Within: this thread's kernel launches (and their backward's) are noted in the list yielded, not made."""
    return noting([])


def build(records: list, device: torch.device, workers: int | None = None) -> int:
    """Build the noted launches' kernels for `device` on `workers` threads (default: the CPU count, at most
    MAX_WORKERS); returns how many builds were asked for. A build that fails is dropped: the kernel's first
    real launch meets the failure, where the kernels' own fall-back handles it."""
    if not records:
        return 0
    try:  # Triton's compile-in-the-background mode (Triton 3.4 and later)
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        log.info("this Triton cannot build kernels in the background: they are built at their first launch")
        return 0
    workers = workers or min(MAX_WORKERS, os.cpu_count() or 1)
    with torch.cuda.device(device), ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for kernel, grid, args, kwargs in records:  # each specialisation is submitted once
            kernel.warmup(*args, grid=grid, **kwargs)
    return len(records)
