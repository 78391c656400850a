"""GEGLU's backward in the epilogue of the output projection's gradient product, alone, against what the
trainer runs (cuBLAS's product dy = d_out W2, then lora_core/geglu.py's backward kernel), at the SD1.5 shapes
that product would take, for several tile configurations.

The kernel was in the trainer at commit 5cf4f83 (`performance.geglu_in_product`) and was reverted: with its one
configuration (128 x 64 tiles, 4 warps) the batch-16 step took 1.1 ms longer on an H100 (bench/RESULTS.md).
This script, a record kept in bench/ (the trainer does not use it), asks whether another configuration beats
the separate kernels at all. Prints one JSON line per shape: microseconds per call (CUDA events around a
CUDA graph of 10 calls, median of 20 replays) and the largest error against the separate kernels' dh.

    python3 bench/geglu_product.py
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl

from bench.lora_gemm import timed
from lora_core import geglu

# (what, rows m, model width n, inner width d): d_out [m, n], W2 [n, d], h and dh [m, 2d]
SHAPES = [
    ("batch 16, 64x64", 65536, 320, 1280),
    ("batch 16, 32x32", 16384, 640, 2560),
    ("batch 1, 64x64", 4096, 320, 1280),
]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the first is the reverted commit's
CONFIGS = [(128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (64, 128, 64, 4, 4),
           (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 64, 4, 4)]
GROUP_M = 8


@triton.jit
def _dgeglu(DH, G, W, H, m, n, d, g_m, w_k, w_n,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # G [m, n] (unit column step), W [n, d], H and DH [m, 2d] contiguous: a tile of dy = G W, then of dh
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(m, BLOCK_M), tl.cdiv(d, BLOCK_N)
    first = (pid // (GROUP_M * tiles_n)) * GROUP_M
    rows_here = tl.minimum(tiles_m - first, GROUP_M)
    tile_m = first + (pid % (GROUP_M * tiles_n)) % rows_here
    tile_n = (pid % (GROUP_M * tiles_n)) // rows_here
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < m, cols < d
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, n, BLOCK_K):
        ks = (start + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = ks < n
        a = tl.load(G + rows64[:, None] * g_m + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(W + ks[:, None] * w_k + cols[None, :] * w_n, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    mask = rmask[:, None] & cmask[None, :]
    off = rows64[:, None] * (2 * d) + cols[None, :]
    value = tl.load(H + off, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(H + off + d, mask=mask, other=0.0).to(tl.float32)
    gelu, slope = geglu._gelu_parts(gate)
    tl.store(DH + off, (acc * gelu).to(DH.dtype.element_ty), mask=mask)
    tl.store(DH + off + d, (acc * value * slope).to(DH.dtype.element_ty), mask=mask)


def separate(g: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """What the trainer runs: cuBLAS's dy = g w, then the GEGLU backward kernel (lora_core/geglu.py)."""
    dy = torch.mm(g, w)
    dh = torch.empty_like(h)
    rows, d = h.shape[0], h.shape[1] // 2
    geglu._backward[geglu._grid(rows, d)](h, dy, dh, rows, d, BLOCK_R=geglu.BLOCK_R, BLOCK_C=geglu.BLOCK_C)
    return dh


def fused(dh: torch.Tensor, g: torch.Tensor, w: torch.Tensor, h: torch.Tensor, config: tuple) -> None:
    bm, bn, bk, warps, stages = config
    (m, n), d = g.shape, w.shape[1]
    _dgeglu[(triton.cdiv(m, bm) * triton.cdiv(d, bn),)](
        dh, g, w, h, m, n, d, g.stride(0), w.stride(0), w.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, num_warps=warps, num_stages=stages)


def main() -> None:
    torch.manual_seed(0)
    for what, m, n, d in SHAPES:
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, d, device="cuda", dtype=torch.bfloat16) / n**0.5
        h = torch.randn(m, 2 * d, device="cuda", dtype=torch.bfloat16)
        want = separate(g, w, h)
        row = {"shape": what, "m": m, "n": n, "d": d,
               "separate_us": round(timed(lambda g=g, w=w, h=h: separate(g, w, h)), 1),
               "product_only_us": round(timed(lambda g=g, w=w: torch.mm(g, w)), 1)}
        for config in CONFIGS:
            dh = torch.empty_like(h)
            key = "x".join(map(str, config))
            try:
                row[f"fused_{key}_us"] = round(timed(lambda dh=dh, g=g, w=w, h=h, c=config: fused(dh, g, w, h, c)), 1)
                err = ((dh.float() - want.float()).abs().max() / want.float().abs().max()).item()
                row[f"fused_{key}_err"] = round(err, 5)
            except Exception as e:  # a configuration that does not build here (shared memory, registers)
                row[f"fused_{key}_us"] = f"failed: {type(e).__name__}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
