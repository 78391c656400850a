"""Our trainer's real training loop (`lora_core.trainer.train`), timed between loss read-backs.

A synthetic 16-image dataset is written at the model's resolution; previews and checkpoints are off, so
the timed window holds only training steps. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from unittest.mock import patch

import torch
import torch._inductor.config

from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.trainer import train

RES = {"full:sd15": 512, "full:sdxl": 1024, "full:sd21-v": 768}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="full:sd15")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=20, help="steps before timing (compile, caches); multiple of 10")
    ap.add_argument("--steps", type=int, default=30, help="timed steps; multiple of 10")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--te", action="store_true", help="train the text-encoder LoRA too (no text cache)")
    ap.add_argument("--set", action="append", default=[], help="extra TrainConfig overrides")
    ap.add_argument("--keep-kernel", action="store_true",
                    help="a compiled UNet's adapters keep the fused kernel (the trainer gives them the plain path)")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="a torch._inductor.config setting for a compiled run, e.g. combo_kernels=true")
    a = ap.parse_args()
    for kv in a.inductor:
        key, value = kv.split("=", 1)
        setattr(torch._inductor.config, key, json.loads(value))
    res = RES[a.model]
    data = tempfile.mkdtemp()
    write_example_dataset(data, n=16, size=res)
    cfg = resolve(overrides=[
        f"model.base={a.model}", f"data.dir={data}", f"data.resolution={res}", "data.buckets=false",
        f"schedule.batch_size={a.batch}", f"schedule.steps={a.warmup + a.steps}", "schedule.scheduler=constant",
        "lora.rank=16", "lora.alpha=16", "lora.targets=attn", f"lora.train_text_encoder={str(a.te).lower()}",
        "sampling.enabled=false", "saving.every=0", "performance.log_every=10",
        f"performance.gradient_checkpointing={str(a.gc).lower()}", *a.set])
    marks = {}
    t_start = time.perf_counter()
    keep = patch("lora_core.fast_step.plain_adapters", lambda unet: None) if a.keep_kernel else nullcontext()
    with keep:
        events = train(cfg, run_dir=tempfile.mkdtemp() + "/run")
        for ev in events:
            if ev.kind == "started":
                t_started = time.perf_counter()
                torch.cuda.reset_peak_memory_stats()
            if ev.kind == "step" and ev.step in (a.warmup, a.warmup + a.steps):
                marks.setdefault(ev.step, time.perf_counter())
            if ev.kind == "failed":
                raise SystemExit(ev.message)
    ms = (marks[a.warmup + a.steps] - marks[a.warmup]) / a.steps * 1000
    extra = a.set + (["keep_kernel"] if a.keep_kernel else []) + [f"inductor.{kv}" for kv in a.inductor]
    print(json.dumps({"impl": "ours", "model": a.model, "batch": a.batch, "gc": a.gc, "te": a.te,
                      "extra": extra, "ms_per_step": round(ms, 2), "samples_per_s": round(a.batch * 1000 / ms, 2),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "setup_s": round(t_started - t_start, 1),
                      "warmup_s": round(marks[a.warmup] - t_started, 1)}))


if __name__ == "__main__":
    main()
