"""What limits cuDNN's attention at SD1.5's 4,096-token self-attention (batch 16, 8 heads of 40).

Times cuDNN's kernel, forward and forward + backward in bf16, at head counts and sizes chosen to separate
the work that grows with the score tiles (softmax: exponentials, scaling, the row sums) from the work that
grows with the head size (the matrix products): 8 heads of 16, 32, 40, 48 and 64 have the same number of
scores; 5 heads of 64 have the products of 8 heads of 40 (320 channels) and 5/8 of the scores. One JSON line
per shape, then a least-squares fit of time = a * scores + b * scores * padded head. The fit assumes heads up
to 64 are padded to 64 and larger ones to 128; since every head up to 64 runs the same 64-wide kernel
(Nsight Compute, `bench/experiment.sh attnpipes`), it cannot tell the two parts apart for those heads, and
bench/RESULTS.md draws on the timings and the counters, not on it.
`--once HEADS HEAD` runs one shape's forward and backward twice, for a profiler's counters.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.attention import timed

BATCH, TOKENS = 16, 4096
SHAPES = [(8, 16), (8, 32), (8, 40), (8, 48), (8, 64), (5, 64), (4, 80), (16, 40), (16, 64)]


def padded(d: int) -> int:
    """The head size cuDNN's tiles work on, as named in its kernels (64 up to 64, then 128)."""
    return 64 if d <= 64 else 128


def row(heads: int, d: int) -> dict:
    q, k, v = (torch.randn(BATCH, heads, TOKENS, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def fwd() -> None:
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    def both() -> None:
        F.scaled_dot_product_attention(q, k, v).backward(grad)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        f, fb = timed(fwd), timed(both)
    scores = BATCH * heads * TOKENS * TOKENS
    flop = 4 * scores * d  # forward's two products at the real head size
    return {"heads": heads, "head": d, "forward_ms": f, "forward_backward_ms": fb, "backward_ms": round(fb - f, 4),
            "gscores": round(scores / 1e9, 3), "forward_tflops": round(flop / f / 1e9, 1),
            "backward_tflops": round(2.5 * flop / (fb - f) / 1e9, 1)}


def fit(rows: list[dict], key: str) -> dict:
    """time = a * Gscores + b * Gscores * padded head (ms): the per-score and per-product parts."""
    a = torch.tensor([[r["gscores"], r["gscores"] * padded(r["head"])] for r in rows], dtype=torch.float64)
    y = torch.tensor([[r[key]] for r in rows], dtype=torch.float64)
    sol = torch.linalg.lstsq(a, y).solution.flatten().tolist()
    ref = next(r for r in rows if (r["heads"], r["head"]) == (8, 40))
    per_score = sol[0] * ref["gscores"]
    return {"fit": key, "ms_per_gscore": round(sol[0], 5), "ms_per_gscore_per_head": round(sol[1], 6),
            "sd15_layer_ms": ref[key], "of_which_per_score_ms": round(per_score, 3),
            "of_which_products_ms": round(sol[1] * ref["gscores"] * padded(40), 3)}


def once(heads: int, d: int) -> None:
    """One forward + backward as warm-up, then one more: for Nsight Compute's counters of the second pair
    (bench/experiment.sh attnpipes skips the first pair's kernels)."""
    q, k, v = (torch.randn(BATCH, heads, TOKENS, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for _ in range(2):
            F.scaled_dot_product_attention(q, k, v).sum().backward()
    torch.cuda.synchronize()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--once":
        once(int(sys.argv[2]), int(sys.argv[3]))
        return
    rows = []
    for heads, d in SHAPES:
        rows.append(row(heads, d))
        print(json.dumps({"attention_limit": rows[-1]}), flush=True)
    for key in ("forward_ms", "backward_ms"):
        print(json.dumps(fit(rows, key)), flush=True)


if __name__ == "__main__":
    main()
