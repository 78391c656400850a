"""A lone preview image (SD1.5 512, 25 steps, CFG 7, weight 1, a rank-16 adapter, bf16) through the
trainer's preview code (`lora_core.sampling.previews`): adapters computed beside the base (the previous
default), merged into the base weights (the default on a GPU now), both with the UNet in channels-last
(a small-batch training run's layout), and each merged layout with the sampling UNet compiled
(`sampling.compile`; `compile_s` is the first call, mostly compiling).
Prints one JSON line of medians of `--repeat` images, in seconds."""

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
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    model = load_model("full:sd15", device=torch.device("cuda"))
    model.pipe.to(dtype=torch.bfloat16)
    model.pipe.set_progress_bar_config(disable=True)
    modules = inject(model.unet, model.text_encoders, model.family, targets="attn", rank=16, alpha=16)
    for m in modules.values():
        torch.nn.init.normal_(m.lora_up.weight, std=1e-3)

    def one(merge: bool, compiled: bool = False) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        previews(model, modules, ["a red circle on a white background"], [1.0], steps=25, guidance=7.0,
                 size=512, merge=merge, compiled=compiled)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def median(merge: bool, compiled: bool = False) -> float:
        first = one(merge, compiled)  # the sampling graph's capture (and compile)
        if compiled:
            row.setdefault("compile_s", []).append(round(first, 1))
        times = sorted(one(merge, compiled) for _ in range(a.repeat))
        return round(times[len(times) // 2], 4)

    row: dict = {"preview_lone": "full:sd15", "steps": 25, "cfg": 7.0}
    try:
        row["unmerged"] = median(False)
        row["merged"] = median(True)
        if not a.no_compile:
            row["merged_compiled"] = median(True, compiled=True)
        model.unet.to(memory_format=torch.channels_last)
        row["unmerged_channels_last"] = median(False)
        row["merged_channels_last"] = median(True)
        if not a.no_compile:
            torch._dynamo.reset()  # a run sets its layout once, before its first preview; so does this row
            row["merged_compiled_channels_last"] = median(True, compiled=True)
    finally:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
