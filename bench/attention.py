"""Which scaled-dot-product-attention backend is fastest for SD's self-attention shapes on this GPU:
forward only (sampling) and forward + backward (training), bf16, each backend forced in turn.
Prints one JSON line per shape: milliseconds per call by backend (missing: the backend refused it)."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# (name, batch, heads, tokens, head size, backward)
SHAPES = [
    ("sd15 sampling 64x64 b2", 2, 8, 4096, 40, False),
    ("sd15 train 64x64 b1", 1, 8, 4096, 40, True),
    ("sd15 train 64x64 b16", 16, 8, 4096, 40, True),
    ("sd15 train 32x32 b16", 16, 8, 1024, 80, True),
    ("sdxl train 64x64 b4", 4, 10, 4096, 64, True),
    ("sdxl train 32x32 b4", 4, 20, 1024, 64, True),
]
BACKENDS = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"]


def timed(fn, repeat: int = 20, sleep_cycles: int = 0) -> float:
    """Milliseconds per call of `fn` by CUDA events, after a warm-up. With `sleep_cycles` the GPU first sleeps
    that long while the calls are queued, so a small call's time is the GPU's alone (as in a CUDA graph),
    not the host's time to launch it."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if sleep_cycles:
        torch.cuda._sleep(sleep_cycles)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / repeat, 4)


def main() -> None:
    for name, b, h, n, d, backward in SHAPES:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                   for _ in range(3))
        grad = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)

        def call(q=q, k=k, v=v, grad=grad, backward=backward) -> None:
            out = F.scaled_dot_product_attention(q, k, v)
            if backward:
                out.backward(grad)

        row = {}
        for backend in BACKENDS:
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)), torch.set_grad_enabled(backward):
                    row[backend.lower()] = timed(call)
            except RuntimeError as e:
                row[backend.lower()] = f"refused: {str(e)[:80]}"
        print(json.dumps({"attention": name, "ms": row}))


if __name__ == "__main__":
    main()
