"""Preview speed: SD1.5 512 images, 25 steps with CFG, through the trainer's own preview code
(`lora_core.sampling.previews`, a rank-16 adapter injected, bf16 base): one image at weight 1, and the
presets' preview of one prompt at weights 0, 0.5 and 1 (drawn as one batch). Prints one JSON line."""

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
    ap.add_argument("--plain", action="store_true", help="the plain LoRA path (performance.fused_lora=false)")
    a = ap.parse_args()
    model = load_model(a.model, device=torch.device("cuda"))
    model.pipe.to(dtype=torch.bfloat16)
    model.pipe.set_progress_bar_config(disable=True)
    modules = inject(model.unet, model.text_encoders, model.family, targets="attn", rank=16, alpha=16)
    for m in modules.values():
        m.fused = not a.plain
    size = 512 if a.model == "full:sd15" else 1024

    def one(scales: list[float]) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        previews(model, modules, ["a red circle on a white background"], scales, steps=a.steps, guidance=7.0,
                 size=size)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    row = {"preview": a.model, "steps": a.steps, "cfg": True, "fused_lora": not a.plain}
    for name, scales in (("one_image", [1.0]), ("three_weights", [0.0, 0.5, 1.0])):
        one(scales)  # warm-up: the graph's capture
        times = sorted(one(scales) for _ in range(a.repeat))
        row[name] = {"median_s": round(times[len(times) // 2], 3), "min_s": round(times[0], 3),
                     "per_image_s": round(times[len(times) // 2] / len(scales), 3)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
