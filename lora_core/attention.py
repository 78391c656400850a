"""Which fused kernel runs the UNet's and text encoders' attention (`performance.attention`).

On an H100 cuDNN's attention kernel measured 1.6-1.8x faster than flash attention for every SD1.5 and
SDXL attention shape, forward and backward (`bench/attention.py`, bench/RESULTS.md). Recent PyTorch
(2.11 measured) already prefers it there; older releases try flash attention first. `auto` puts cuDNN
first on GPUs of that generation or newer whatever the release. Where cuDNN refuses a call (a mask it
does not support, say) PyTorch falls through to the next kernel in the order.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ORDERS = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH],
}
CUDNN_MIN_CAPABILITY = (9, 0)  # Hopper, where it was measured


def kernel_order(mode: str, device: torch.device) -> str:
    """`cudnn` or `flash` (the kernel tried first), or `torch` (PyTorch's own order), for `mode` on `device`."""
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
    return contextlib.nullcontext() if order == "torch" else sdpa_kernel(ORDERS[order], set_priority=True)
