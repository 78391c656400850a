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
    a = ap.parse_args()
    res = 512 if a.model == "full:sd15" else 1024
    data = tempfile.mkdtemp()
    write_example_dataset(data, n=16, size=res)
    cfg = resolve(overrides=[
        f"model.base={a.model}", f"data.dir={data}", f"data.resolution={res}", "data.buckets=false",
        f"schedule.batch_size={a.batch}", "schedule.steps=30", "lora.rank=16", "lora.alpha=16", "lora.targets=attn",
        "lora.train_text_encoder=false", "sampling.enabled=false", "performance.log_every=10", *a.set])
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    for ev in train(cfg, run_dir=tempfile.mkdtemp() + "/run"):
        if ev.kind == "step" and ev.step == 20:
            torch.cuda.synchronize()
            prof.start()
        if ev.kind == "step" and ev.step == 30:
            torch.cuda.synchronize()
            prof.stop()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
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


if __name__ == "__main__":
    main()
