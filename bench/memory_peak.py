"""What is live on the GPU at a training run's peak: the real loop (`lora_core.trainer.train`) with
allocator history recorded, then the allocations alive at the highest point between the start of
training and its last step, grouped by the Python line that made them. Prints a table; `--json` writes the groups too.

  python bench/memory_peak.py --model full:sd15 --gc [--batch 1] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict

import torch

from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.trainer import train

RES = {"full:sd15": 512, "full:sdxl": 1024}
MIB = 2**20


def _where(frames: list[dict]) -> str:
    """The innermost frame in the project, diffusers or transformers (else the innermost Python frame)."""
    for f in frames:
        name = f.get("filename", "")
        for package in ("lora_core/", "diffusers/", "transformers/", "bench/"):
            if package in name:
                return f"{package}{name.split(package, 1)[1]}:{f.get('line')} {f.get('name')}"
    py = [f for f in frames if f.get("filename", "").endswith(".py")]
    return f"{py[0]['filename'].rsplit('/', 2)[-1]}:{py[0]['line']} {py[0]['name']}" if py else "<no python frame>"


def live_at_peak(trace: list[dict], start: int, end: int | None = None) -> tuple[int, int, dict[str, int]]:
    """(bytes live at the peak in trace[start:end], bytes live at `start`, bytes per origin at the peak)."""
    live: dict[int, tuple[int, str]] = {}
    now = base = peak = 0
    peak_live: dict[int, tuple[int, str]] = {}
    for i, ev in enumerate(trace[:end]):
        if i == start:
            base = peak = now
            peak_live = dict(live)
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], _where(ev.get("frames", [])))
            now += ev["size"]
            if i >= start and now > peak:
                peak, peak_live = now, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            now -= live.pop(ev["addr"])[0]
    groups: dict[str, int] = defaultdict(int)
    for size, where in peak_live.values():
        groups[where] += size
    return peak, base, dict(groups)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="full:sd15")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--gc", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    res = RES[a.model]
    data = tempfile.mkdtemp()
    write_example_dataset(data, n=4, size=res)
    cfg = resolve(overrides=[
        f"model.base={a.model}", f"data.dir={data}", f"data.resolution={res}", "data.buckets=false",
        f"schedule.batch_size={a.batch}", f"schedule.steps={a.steps}", "schedule.scheduler=constant",
        "lora.rank=16", "lora.alpha=16", "lora.targets=attn", "lora.train_text_encoder=false",
        "sampling.enabled=false", "saving.every=0", "performance.log_every=1",
        f"performance.gradient_checkpointing={str(a.gc).lower()}", *a.set])
    torch.cuda.memory._record_memory_history(max_entries=3_000_000)
    start = end = 0
    for ev in train(cfg, run_dir=tempfile.mkdtemp() + "/run"):
        if ev.kind == "started":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = len(torch.cuda.memory._snapshot()["device_traces"][0])
        if ev.kind == "step" and ev.step == a.steps:  # the training steps end here; saving follows
            torch.cuda.synchronize()
            end = len(torch.cuda.memory._snapshot()["device_traces"][0])
        if ev.kind == "failed":
            raise SystemExit(ev.message)
    measured = torch.cuda.max_memory_allocated()
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    peak, base, groups = live_at_peak(trace, start, end)
    whole_run = live_at_peak(trace, start)[0]
    rows = sorted(groups.items(), key=lambda kv: -kv[1])
    print(f"{a.model} batch {a.batch} gc={a.gc} {a.set}: max_memory_allocated {measured / MIB:.0f} MiB; "
          f"replayed: peak while training {peak / MIB:.0f} MiB, until the run ended {whole_run / MIB:.0f} MiB; "
          f"live when training started {base / MIB:.0f} MiB")
    for where, size in rows[:30]:
        print(f"{size / MIB:10.1f} MiB  {where}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "gc": a.gc, "measured_mib": measured / MIB,
                       "peak_mib": peak / MIB, "run_peak_mib": whole_run / MIB, "base_mib": base / MIB,
                       "groups_mib": {k: v / MIB for k, v in rows}}, f, indent=1)


if __name__ == "__main__":
    main()
