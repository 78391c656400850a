"""Which attention kernel is fastest for each attention call of a real training step, forward and backward.

Every self- and cross-attention shape of SD1.5 (batch 16) and SDXL (batch 4) at their training
resolutions, in the layout the trainer's processor passes them (heads split from `(batch, tokens,
channels)` by a view and a transpose), bf16. Each SDPA backend is forced in turn; `matmul` is attention
spelled out in three operators (scores, softmax in fp32, product), which autograd differentiates.
The times are the GPU's alone: the host launches the calls while the GPU sleeps (an earlier version
timed the launching too, which made cuDNN look slower at the small shapes than it is in a graphed step).

One JSON line per shape: milliseconds per call by kernel, the calls per step, and the fastest.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.attention import timed

log = logging.getLogger(__name__)

# model: (batch, [(query tokens, key tokens, heads, head size, calls per step)])
SD15 = [(4096, 4096, 8, 40, 5), (4096, 77, 8, 40, 5), (1024, 1024, 8, 80, 5), (1024, 77, 8, 80, 5),
        (256, 256, 8, 160, 5), (256, 77, 8, 160, 5), (64, 64, 8, 160, 1), (64, 77, 8, 160, 1)]
SDXL = [(4096, 4096, 10, 64, 4), (4096, 77, 10, 64, 4), (1024, 1024, 20, 64, 24), (1024, 77, 20, 64, 24)]
MODELS = {"sd15": (16, SD15), "sdxl": (4, SDXL)}
KERNELS = ["cudnn", "flash", "efficient", "math", "matmul"]
SLEEP = 20_000_000  # GPU cycles slept while the timed calls queue (about 10 ms): GPU time, as the graphed step has


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in plain operators, the softmax in fp32."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def attend(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if kernel == "matmul":
        return matmul_attention(q, k, v)
    with sdpa_kernel(getattr(SDPBackend, {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
                                          "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[kernel])):
        return F.scaled_dot_product_attention(q, k, v)


def heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, h, c // h).transpose(1, 2)


def measure(batch: int, nq: int, nk: int, h: int, d: int, backward: bool) -> dict[str, float | str]:
    def tensor(n: int) -> torch.Tensor:
        return torch.randn(batch, n, h * d, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    q, k, v = tensor(nq), tensor(nk), tensor(nk)
    grad = torch.randn(batch, h, nq, d, device="cuda", dtype=torch.bfloat16)
    row: dict[str, float | str] = {}
    reference = attend("math", heads(q, h).float(), heads(k, h).float(), heads(v, h).float()).detach()
    for kernel in KERNELS:
        def call(kernel: str = kernel) -> torch.Tensor:
            out = attend(kernel, heads(q, h), heads(k, h), heads(v, h))
            if backward:
                out.backward(grad)
            return out
        try:
            with torch.set_grad_enabled(backward):
                err = (call().float() - reference).abs().max().item()
                row[kernel] = timed(call, sleep_cycles=SLEEP)
            if err > 0.05:
                row[kernel] = f"wrong: max error {err:.3g}"
        except RuntimeError as e:
            row[kernel] = f"refused: {str(e).splitlines()[0][:80]}"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=sorted(MODELS))
    p.add_argument("--forward-only", action="store_true", help="time the forward alone (as in sampling)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    device = torch.cuda.get_device_name()
    for model in args.models:
        batch, shapes = MODELS[model]
        totals: dict[str, float] = {}
        for nq, nk, h, d, calls in shapes:
            row = measure(batch, nq, nk, h, d, not args.forward_only)
            times = {k: v for k, v in row.items() if isinstance(v, float)}
            best = min(times, key=times.get)
            for k in KERNELS:  # the step's attention time by kernel, and by the fastest per shape
                totals[k] = totals.get(k, 0.0) + calls * times.get(k, float("nan"))
            totals["fastest"] = totals.get("fastest", 0.0) + calls * times[best]
            print(json.dumps({"model": model, "batch": batch, "shape": [nq, nk, h, d], "calls": calls,
                              "backward": not args.forward_only, "ms": row, "fastest": best, "device": device}),
                  flush=True)
        print(json.dumps({"model": model, "batch": batch, "per_step_ms": {k: round(v, 3) for k, v in totals.items()},
                          "backward": not args.forward_only, "device": device}), flush=True)


if __name__ == "__main__":
    main()
