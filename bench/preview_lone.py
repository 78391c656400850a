"""A lone preview image (SD1.5 512, 25 steps, CFG 7, weight 1, a rank-16 adapter, bf16) through the
trainer's preview code (`lora_core.sampling.previews`), in the UNet's contiguous layout (batch ≥ 8 runs)
and in channels-last (batch ≤ 4 runs); for each, the adapters computed beside the base (the default) or
merged into the base weights (`merge=True`), with the sampling UNet replayed from CUDA graphs as it is or
compiled (`sampling.compile`; `compile_s` holds each compiled row's first call, mostly compiling).
Prints one JSON line per row, medians of `--repeat` images in seconds, as each row finishes.

    python bench/preview_lone.py [--rows unmerged,unmerged_compiled,...] [--grouped] [--nhwc-norms] [--geglu] [--lean] [--layer-norm] [--no-copy]

`--grouped` groups the attention projections first, as a training run does (`performance.fused_projections`);
`--nhwc-norms` gives channels-last rows the GroupNorm kernels that keep the layout (`performance.nhwc_norms`);
`--geglu` gives the feed-forward the fused GEGLU kernels (`performance.fused_geglu`);
`--lean` gives the ResNet blocks the lean forward (`performance.lean_resnets`);
`--layer-norm` gives the transformer blocks the LayerNorm kernels (`performance.fast_layer_norm`).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lora_core.fused_projections import fuse_projections
from lora_core.geglu import use_fused_geglu
from lora_core.half_norms import use_half_norms
from lora_core.inject import inject
from lora_core.lean_resnet import use_lean_resnets
from lora_core.models import load_model
from lora_core.nhwc_norm import keep_channels_last
from lora_core.sampling import previews

ROWS = ("unmerged", "merged", "unmerged_compiled", "merged_compiled", "unmerged_channels_last",
        "merged_channels_last", "unmerged_compiled_channels_last", "merged_compiled_channels_last")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS))
    ap.add_argument("--grouped", action="store_true", help="group the attention projections (fuse_projections)")
    ap.add_argument("--nhwc-norms", action="store_true", help="GroupNorm kernels that keep channels-last")
    ap.add_argument("--geglu", action="store_true", help="the fused GEGLU kernels (performance.fused_geglu)")
    ap.add_argument("--lean", action="store_true", help="the lean ResNet blocks (performance.lean_resnets)")
    ap.add_argument("--layer-norm", action="store_true", help="the LayerNorm kernels (fast_layer_norm)")
    ap.add_argument("--no-copy", action="store_true", help="no working copy of the adapters (adapter_copy off)")
    a = ap.parse_args()
    rows = a.rows.split(",")
    model = load_model("full:sd15", device=torch.device("cuda"))
    model.pipe.to(dtype=torch.bfloat16)
    model.pipe.set_progress_bar_config(disable=True)
    modules = inject(model.unet, model.text_encoders, model.family, targets="attn", rank=16, alpha=16)
    for m in modules.values():
        torch.nn.init.normal_(m.lora_up.weight, std=1e-3)
    if a.grouped:
        fuse_projections(model.unet)
    use_half_norms(model.unet, nhwc=a.nhwc_norms, rows=a.layer_norm)
    if a.nhwc_norms:
        keep_channels_last(model.unet)
    if a.geglu:
        use_fused_geglu(model.unet)
    if a.lean:
        use_lean_resnets(model.unet)

    def one(merge: bool, compiled: bool) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        previews(model, modules, ["a red circle on a white background"], [1.0], steps=25, guidance=7.0,
                 size=512, merge=merge, compiled=compiled, working_copy=not a.no_copy)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    for name in (r for r in ROWS if r in rows):  # contiguous rows first, then channels-last
        if name.endswith("channels_last") and model.unet.conv_in.weight.is_contiguous():
            model.unet.to(memory_format=torch.channels_last)
            torch._dynamo.reset()  # a run sets its layout once, before its first preview; so does this bench
            model.unet.__dict__.pop("_sampling_compiled_layout", None)
        merge, compiled = name.startswith("merged"), "compiled" in name
        first = one(merge, compiled)  # the sampling graph's capture (and compile)
        times = sorted(one(merge, compiled) for _ in range(a.repeat))
        row = {"preview_lone": "full:sd15", "steps": 25, "cfg": 7.0, "row": name,
               "median_s": round(times[len(times) // 2], 4), "min_s": round(times[0], 4), "grouped": a.grouped,
               "nhwc_norms": a.nhwc_norms, "geglu": a.geglu, "lean": a.lean, "working_copy": not a.no_copy}
        if compiled:
            row["compile_s"] = round(first, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
