"""The whole job, timed by phase: a 20-image SD1.5 512 dataset, 3,000 samples, four previews, adapter written.

Phases come from the trainer's own events: setup (model load, latent and text caching) ends at `started`;
previews are the time from the event before each `sample` to it; training is the rest until the adapter
is saved. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="full:sd15")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--set", action="append", default=[], help="extra TrainConfig overrides")
    a = ap.parse_args()
    data = tempfile.mkdtemp()
    write_example_dataset(data, n=20, size=512)
    steps = -(-a.samples // a.batch)
    cfg = resolve(overrides=[
        f"model.base={a.model}", f"data.dir={data}", "data.resolution=512", "data.buckets=false",
        f"schedule.batch_size={a.batch}", f"schedule.steps={steps}", "lora.rank=16", "lora.alpha=16",
        "lora.targets=attn", "lora.train_text_encoder=false", "sampling.steps=25", "sampling.cfg=7",
        "sampling.scales=[1.0]", f"sampling.every={steps // 3}", "saving.every=0", *a.set])
    t0 = time.perf_counter()
    last, phases, previews = t0, {}, []
    for ev in train(cfg, run_dir=tempfile.mkdtemp() + "/run"):
        now = time.perf_counter()
        if ev.kind == "started":
            phases["setup_s"] = now - t0
        elif ev.kind == "sample":
            previews.append(now - last)
        elif ev.kind == "saved" and ev.final:
            phases["until_adapter_s"] = now - t0
        elif ev.kind == "failed":
            raise SystemExit(ev.message)
        last = now
    total = time.perf_counter() - t0
    phases["previews_s"] = sum(previews)
    phases["training_s"] = phases["until_adapter_s"] - phases["setup_s"] - sum(previews[:-1])
    print(json.dumps({"job": a.model, "batch": a.batch, "steps": steps, "samples": steps * a.batch,
                      "extra": a.set, "total_s": round(total, 1), "previews": len(previews),
                      "preview_each_s": [round(p, 2) for p in previews],
                      **{k: round(v, 1) for k, v in phases.items()}}))


if __name__ == "__main__":
    main()
