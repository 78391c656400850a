"""Which fused kernel runs the UNet's and text encoders' attention (`performance.attention`).

PyTorch tries flash attention before cuDNN's. On an H100 cuDNN's kernel measured 1.6-1.8x faster for
every SD1.5 and SDXL attention shape, forward and backward (`bench/attention.py`, bench/RESULTS.md), so
`auto` puts it first on GPUs of that generation or newer. Where cuDNN refuses a call (a mask it does
not support, say) PyTorch falls through to the next kernel in the order.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]
CUDNN_MIN_CAPABILITY = (9, 0)  # Hopper, where it was measured


def cudnn_first(mode: str, device: torch.device) -> bool:
    """Whether attention on `device` runs cuDNN's kernel first (`mode`: auto, cudnn or torch)."""
    if mode == "torch" or device.type != "cuda":
        return False
    return mode == "cudnn" or torch.cuda.get_device_capability(device) >= CUDNN_MIN_CAPABILITY


def attention_kernels(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Within the block, scaled-dot-product attention prefers the kernel `mode` picks for `device`.

    The choice is process-wide while the block runs (PyTorch keeps it in global flags), and restored
    after it; CUDA graphs captured inside keep the kernels chosen at capture.
    """
    if not cudnn_first(mode, device):
        return contextlib.nullcontext()
    return sdpa_kernel(CUDNN_FIRST, set_priority=True)
