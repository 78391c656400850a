"""Where a training step's GPU time goes: torch.profiler over 10 steps of our real loop (after warm-up).

Writes the top kernels by CUDA time as a table (and a Chrome trace with --trace). Usage:
  python bench/profile_step.py --batch 16 --out prof-b16.txt [--set performance.cuda_graphs=off]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="full:sd15")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", required=True)
    ap.add_argument("--trace", default="")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--ops", action="store_true",
                    help="also the operators by GPU time (useful with performance.cuda_graphs=off: a graph's "
                         "replay hides which operator launched a kernel)")
    ap.add_argument("--shapes", action="store_true",
                    help="also the matrix products by input shapes, with their achieved rates (records shapes)")
    a = ap.parse_args()
    res = 512 if a.model == "full:sd15" else 1024
    data = tempfile.mkdtemp()
    write_example_dataset(data, n=16, size=res)
    cfg = resolve(overrides=[
        f"model.base={a.model}", f"data.dir={data}", f"data.resolution={res}", "data.buckets=false",
        f"schedule.batch_size={a.batch}", "schedule.steps=30", "lora.rank=16", "lora.alpha=16", "lora.targets=attn",
        "lora.train_text_encoder=false", "sampling.enabled=false", "performance.log_every=10", *a.set])
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=a.shapes)
    for ev in train(cfg, run_dir=tempfile.mkdtemp() + "/run"):
        if ev.kind == "step" and ev.step == 20:
            torch.cuda.synchronize()
            prof.start()
        if ev.kind == "step" and ev.step == 30:
            torch.cuda.synchronize()
            prof.stop()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40,
                                      max_name_column_width=140 if a.ops else 70)
    if a.ops:
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.device_time_total > 0]
        ops.sort(key=lambda e: e.self_device_time_total, reverse=True)
        table += "\noperators by their own kernels' time, per step: name, calls, ms\n" + "\n".join(
            f"{e.key:60s} {e.count / 10:8.1f} {e.self_device_time_total / 10_000:8.3f}" for e in ops[:40])
        table += "\n\nkernels by the operators that launched them, per step: kernels, ms, chain\n" + launchers(prof)
    if a.shapes:
        table += "\n\nmatrix products by input shapes, per step\n" + products(prof)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1000
    copies = sum("copy" in e.name.lower() for e in kernels)
    summary = (f"per step: {len(kernels) / 10:.0f} GPU kernels ({copies / 10:.0f} of them copies), "
               f"{busy_ms / 10:.2f} ms of kernel time")
    with open(a.out, "w") as f:
        f.write(f"{a.model} batch {a.batch} {a.set}: 10 steps\n{summary}\n{table}\n")
    print(summary)
    if a.trace:
        prof.export_chrome_trace(a.trace)


def products(prof: profile, top: int = 60, per: int = 10) -> str:
    """aten::mm/addmm/addmm_ grouped by input shapes: calls and ms per step, with the TFLOP/s and the GB/s
    (inputs read and output written once, 2 bytes an element) each group reached."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::mm", "aten::addmm", "aten::addmm_") or e.self_device_time_total <= 0:
            continue
        shapes = [s for s in e.input_shapes if len(s) == 2]
        a_, b_ = (shapes[-2], shapes[-1]) if len(shapes) >= 2 else ([0, 0], [0, 0])
        m, k, n = a_[0], a_[1], b_[1]
        us = e.self_device_time_total / e.count
        tflops = 2 * m * k * n / us / 1e6
        gbs = 2 * (m * k + k * n + m * n) / us / 1e3
        rows.append((e.self_device_time_total / per / 1000, e.count / per, e.key, m, k, n, tflops, gbs))
    rows.sort(reverse=True)
    return "ms/step  calls  op  M x K x N  TFLOP/s  GB/s\n" + "\n".join(
        f"{ms:7.3f} {c:6.1f}  {op:13s} {m:>6} x {k:>6} x {n:>6}  {tf:7.1f} {gb:7.0f}"
        for ms, c, op, m, k, n, tf, gb in rows[:top])


def launchers(prof: profile, top: int = 40, per: int = 10) -> str:
    """Kernel counts and time grouped by the chain of operators above each launch (innermost first), divided
    by `per` (the profiled steps)."""
    agg: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CPU or not e.kernels:
            continue
        chain, p = [], e
        while p is not None and len(chain) < 5:
            if not p.name.startswith("cuda"):
                chain.append(p.name)
            p = p.cpu_parent
        key = " < ".join(chain) or e.name
        n_t = agg.setdefault(key, [0, 0.0])
        n_t[0] += len(e.kernels)
        n_t[1] += sum(k.duration for k in e.kernels)
    rows = sorted(agg.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    return "\n".join(f"{n / per:7.1f} {t / per / 1000:8.3f}  {key}" for key, (n, t) in rows)


if __name__ == "__main__":
    main()
