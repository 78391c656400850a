"""Preview speed: one SD1.5 512 image, 25 steps with CFG, through the trainer's own preview code
(`lora_core.sampling.previews`, a rank-16 adapter injected, bf16 base). Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time

import torch

from lora_core.inject import inject
from lora_core.models import load_model
from lora_core.sampling import previews


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="full:sd15")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    model = load_model(a.model, device=torch.device("cuda"))
    model.pipe.to(dtype=torch.bfloat16)
    model.pipe.set_progress_bar_config(disable=True)
    modules = inject(model.unet, model.text_encoders, model.family, targets="attn", rank=16, alpha=16)
    size = 512 if a.model == "full:sd15" else 1024

    def one() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        previews(model, modules, ["a red circle on a white background"], [1.0], steps=a.steps, guidance=7.0,
                 size=size)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    one()  # warm-up
    times = sorted(one() for _ in range(a.repeat))
    print(json.dumps({"preview": a.model, "steps": a.steps, "cfg": True, "median_s": round(times[len(times) // 2], 3),
                      "min_s": round(times[0], 3)}))


if __name__ == "__main__":
    main()
