"""The adapted layers' products at SD1.5 batch-16 shapes, each with the adapter's down product z = s a D that
precedes it: cuBLAS's products, the last a rank-16 product onto the output (addmm_,
`performance.low_rank_kernel=off`); cuBLAS's products with lora_core/low_rank.py's add kernel in place of the
last (`add`); cuBLAS's down product and lora_core/lora_gemm.py's single product (`gemm_z_apart`); and
lora_core/lora_gemm.py's single product computing z as well (`gemm`, what the LoRA functions run where it
applies; not for a group's backward, whose z comes apart), with a few tile configurations. Prints one JSON
line per shape: microseconds per call (CUDA events around a CUDA graph of 10 calls, median of 20 replays), and
for cuBLAS's and the kernel's way the host's microseconds per call to enqueue them without a graph (`_host_us`).

    python3 bench/lora_gemm.py [--configs]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lora_core import lora_gemm, low_rank

# (what, m, k, n, rank, members): forward = x W^T + z U^T with z = s x D^T; backward = gy W + gz D with gz = s gy U
# (a group's backward: R = members x rank, z apart)
SHAPES = [
    ("fwd to_out 64x64", 65536, 320, 320, 16, 1),
    ("fwd qkv 64x64", 65536, 320, 960, 16, 3),
    ("bwd to_out 64x64", 65536, 320, 320, 16, 1),
    ("bwd qkv 64x64", 65536, 960, 320, 48, 1),
    ("fwd to_out 32x32", 16384, 640, 640, 16, 1),
    ("fwd qkv 32x32", 16384, 640, 1920, 16, 3),
    ("bwd qkv 32x32", 16384, 1920, 640, 48, 1),
    ("fwd to_out 16x16", 4096, 1280, 1280, 16, 1),
    ("bwd qkv 16x16", 4096, 3840, 1280, 48, 1),
]
CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (256, 64, 8, 3), (64, 64, 4, 5)]


def timed(fn) -> float:
    """Median microseconds per call, replayed from a CUDA graph of 10 calls (as the training step runs them:
    no launch overhead in the figure)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(10):
            fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 100)  # ms for 10 calls -> us per call
    return sorted(times)[len(times) // 2]


def enqueued(fn) -> float:
    """Microseconds of host time per call to enqueue 50 calls (what a step run without CUDA graphs pays on
    the CPU; the GPU still busy with them at the end)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        fn()
    took = time.perf_counter() - start
    torch.cuda.synchronize()
    return took / 50 * 1e6


def operands(m: int, k: int, n: int, r: int, members: int, fwd: bool):
    dev, dt = "cuda", torch.bfloat16
    a = torch.randn(m, k, device=dev, dtype=dt)
    b = torch.randn(n, k, device=dev, dtype=dt).t() if fwd else torch.randn(k, n, device=dev, dtype=dt)
    down = torch.randn(r * members, k, device=dev, dtype=dt).t() / k**0.5
    c = torch.randn(r, n, device=dev, dtype=dt)
    return a, b, down, c


def measure(what: str, m: int, k: int, n: int, r: int, members: int, configs: list) -> dict:
    """One shape's row: each way's microseconds per call, and each configuration's error against fp32."""
    a, b, down, c = operands(m, k, n, r, members, what.startswith("fwd"))
    member_n = n // members
    slices = [(slice(i * member_n, (i + 1) * member_n), slice(i * r, (i + 1) * r)) for i in range(members)]
    z = torch.mm(a, down).mul_(0.5)

    def cublas(adder) -> None:
        zz = torch.mm(a, down).mul_(0.5)
        y = torch.mm(a, b)
        for cols, zs in slices:
            adder(y[:, cols], zz[:, zs], c[:, cols].t())

    row = {"what": what, "m": m, "k": k, "n": n, "R": r * members}
    row["off_us"] = timed(lambda: cublas(lambda y, zz, u: y.addmm_(zz, u.t())))
    low_rank.enable("add")  # mode gemm leaves the adder to cuBLAS
    row["add_us"] = timed(lambda: cublas(low_rank.add_))
    low_rank.enable("gemm")
    row["mm_only_us"] = timed(lambda: torch.mm(a, b))
    row["off_host_us"] = enqueued(lambda: cublas(lambda y, zz, u: y.addmm_(zz, u.t())))
    grouped_backward = what.startswith("bwd qkv")
    assert lora_gemm.applies(a, b, z, c, member_n), what
    assert grouped_backward or lora_gemm.applies_down(a, b, down, c, member_n), what
    ref = torch.mm(a, b).float()
    for cols, zs in slices:
        ref[:, cols] += z[:, zs].float() @ c[:, cols].float()
    for cfg in configs:
        lora_gemm.BLOCK_M, lora_gemm.BLOCK_K, lora_gemm.WARPS, lora_gemm.STAGES = cfg
        got = lora_gemm.linear(a, b, z, c, None, member_n)
        row[f"gemm_z_apart{cfg}_err"] = round(((got.float() - ref).abs().max() / ref.abs().max()).item(), 5)
        row[f"gemm_z_apart{cfg}_us"] = timed(
            lambda: lora_gemm.linear(a, b, torch.mm(a, down).mul_(0.5), c, None, member_n))
        if not grouped_backward:
            got, got_z = lora_gemm.linear_down(a, b, down, c, 0.5, None, member_n)
            row[f"gemm{cfg}_err"] = round(max(((got.float() - ref).abs().max() / ref.abs().max()).item(),
                                              ((got_z.float() - z.float()).abs().max() / z.float().abs().max()).item()), 5)
            row[f"gemm{cfg}_us"] = timed(lambda: lora_gemm.linear_down(a, b, down, c, 0.5, None, member_n))
            row[f"gemm{cfg}_host_us"] = enqueued(lambda: lora_gemm.linear_down(a, b, down, c, 0.5, None, member_n))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", action="store_true", help="time every tile configuration, not only the default")
    args = ap.parse_args()
    low_rank.enable("gemm")
    lora_gemm.MAX_K = max(shape[2] for shape in SHAPES)  # those the LoRA functions leave to cuBLAS too
    default = (lora_gemm.BLOCK_M, lora_gemm.BLOCK_K, lora_gemm.WARPS, lora_gemm.STAGES)
    for shape in SHAPES:
        print(json.dumps(measure(*shape, CONFIGS if args.configs else [default])), flush=True)


if __name__ == "__main__":
    main()
