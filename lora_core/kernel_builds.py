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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

import torch
import torch.utils.checkpoint

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


class _Pointer:
    """What Triton's specialisation reads of a tensor argument: its dtype, and its address modulo 16 (a
    multiple of 16 or not is part of what a kernel is built for)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype, self.offset = t.dtype, t.data_ptr() % 16

    def data_ptr(self) -> int:
        return self.offset

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Pointer) and (self.dtype, self.offset) == (other.dtype, other.offset)

    def __hash__(self) -> int:
        return hash((self.dtype, self.offset))


def ready(state: dict, probe: Callable[[], None], fallback: str) -> bool:
    """Whether a module's kernels run on this machine. The first call builds and runs them through `probe`
    on small tensors (a dry run only notes that probe's launches and leaves `state`); on a machine without
    what Triton needs they fail, and `state["failed"]` makes the module fall back for good, with a warning
    that `fallback` (what runs instead) runs."""
    if state["worked"]:
        return True
    try:
        probe()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        if recording_launches():
            raise
        state["failed"] = True
        log.warning("%s: %s", fallback, e)
        return False
    if not recording_launches():
        state["worked"] = True
    return True


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`, or, under `recording`, a note of it, each tensor noted by what a
    build depends on (`_Pointer`), not its data."""
    records = _records.get()
    if records is None:
        kernel[grid](*args, **kwargs)
        return
    records.append((kernel, grid, tuple(_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args), kwargs))


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


def available() -> bool:
    """Whether this Triton builds kernels in the background (AsyncCompileMode, Triton 3.4 and later)."""
    try:
        import triton
    except ImportError:
        return False
    return hasattr(triton, "AsyncCompileMode")


def distinct(records: list) -> list:
    """One record per kernel and build (the grid is not part of a build)."""
    seen = {}
    for kernel, grid, args, kwargs in records:
        seen.setdefault((kernel, args, tuple(sorted(kwargs.items()))), (kernel, grid, args, kwargs))
    return list(seen.values())


def build_workers() -> int:
    """Threads for one process's builds: its CPUs, shared with the other training processes of this machine
    (each builds the same kernels), at most MAX_WORKERS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(MAX_WORKERS, cpus // local))


def build(records: list, device: torch.device, workers: int | None = None) -> int:
    """Build the noted launches' kernels for `device` on `workers` threads (default: the CPUs this process
    may use, at most MAX_WORKERS); returns how many distinct launches were submitted (those already built
    take no time). A build that fails is dropped: the kernel's first real launch meets the failure, where the
    kernels' own fall-back handles it."""
    if not records or not available():
        return 0
    import triton

    unique = distinct(records)
    workers = workers or build_workers()
    with (torch.cuda.device(device), ThreadPoolExecutor(workers) as pool,
          triton.AsyncCompileMode(pool, ignore_errors=True)):
        for kernel, grid, args, kwargs in unique:
            try:
                kernel.warmup(*args, grid=grid, **kwargs)
            except Exception as e:  # the next ones are still worth building
                log.debug("could not submit a build of %s: %s", getattr(kernel, "__name__", kernel), e)
    return len(unique)


def checkpoint(module: Any, *args: Any) -> Any:
    """diffusers' default gradient checkpoint (non-reentrant), whose recomputation, which autograd runs on a
    thread of its own, notes its launches where the forward noted its own (in a dry run; else it launches)."""
    records = current()
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                             context_fn=lambda: (contextlib.nullcontext(), noting(records)))
