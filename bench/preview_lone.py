"""A lone preview image (SD1.5 512, 25 steps, CFG 7, weight 1, a rank-16 adapter, bf16) through the
trainer's preview code (`lora_core.sampling.previews`), four ways: adapters computed beside the base
(the previous default), merged into the base weights (the default on a GPU now), merged with the UNet
in channels-last (a small-batch training run's layout), and merged with the sampling UNet compiled
(torch.compile run inside the sampling graph; `compile_s` is the first call, mostly compiling).
Prints one JSON line of medians of `--repeat` images, in seconds."""

from __future__ import annotations

import argparse
import json
import time
from unittest.mock import patch

import torch

from lora_core.graphed_unet import GraphedUNet
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

    def one(merge: bool) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        previews(model, modules, ["a red circle on a white background"], [1.0], steps=25, guidance=7.0,
                 size=512, merge=merge)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def median(merge: bool) -> float:
        one(merge)  # the sampling graph's capture
        times = sorted(one(merge) for _ in range(a.repeat))
        return round(times[len(times) // 2], 4)

    row: dict = {"preview_lone": "full:sd15", "steps": 25, "cfg": 7.0}
    row["unmerged"] = median(False)
    row["merged"] = median(True)
    model.unet.to(memory_format=torch.channels_last)
    row["merged_channels_last"] = median(True)
    model.unet.to(memory_format=torch.contiguous_format)
    if not a.no_compile:
        fwd = torch.compile(type(model.unet).forward, dynamic=False)
        model.unet.__dict__.pop("_graphed_sampling", None)
        with patch.object(GraphedUNet, "_eager", lambda self, *x, **k: fwd(self.unet, *x, **k)):
            t = time.perf_counter()
            one(True)
            row["compile_s"] = round(time.perf_counter() - t, 1)
            row["merged_compiled"] = median(True)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
