"""Does a compiled training step train? For each variant a few tiny:sd1 steps, then the adapter's largest
up-projection weight (zero at the start, so zero at the end means no gradient reached it) and its largest
difference from the plain eager run's adapter. Usage: python bench/compile_check.py [VARIANT ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from unittest.mock import patch

from safetensors.torch import load_file

from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.trainer import train

PLAIN = ["performance.compile=off", "performance.cuda_graphs=off", "performance.fused_lora=false",
         "performance.half_norms=false", "performance.adapter_copy=false",
         "performance.fused_projections=false"]
VARIANTS = {
    "plain": PLAIN,
    "graphed": ["performance.compile=off"],
    "compiled_eager": ["performance.compile=on", "performance.cuda_graphs=off"],
    "compiled_graphed": ["performance.compile=on"],
    "compiled_graphed_unfused": ["performance.compile=on", "performance.fused_lora=false"],
    "compiled_graphed_fp32norms": ["performance.compile=on", "performance.half_norms=false"],
    "blocks_graphed": ["performance.compile=on", "performance.compile_scope=blocks"],
    "compiled_graphed_kernel": ["performance.compile=on"],  # the UNet's adapters keep the fused kernel
}
KEEP_KERNEL = {"compiled_graphed_kernel"}


def run(extra: list[str], root: Path, name: str) -> tuple[list[float], dict]:
    cfg = resolve(overrides=[f"data.dir={root / 'data'}", "model.base=tiny:sd1", "data.resolution=64",
                             "data.buckets=false", "schedule.steps=6", "optim.lr=1e-3", "sampling.enabled=false",
                             "performance.log_every=1", "performance.mixed_precision=bf16",
                             "saving.precision=fp32", *extra])
    losses = []
    keep = patch("lora_core.fast_step.plain_adapters", lambda unet: None) if name in KEEP_KERNEL else nullcontext()
    with keep:
        events = list(train(cfg, run_dir=root / name))
    for ev in events:
        if ev.kind == "failed":
            raise SystemExit(ev.message)
        if ev.kind == "step":
            losses.append(round(ev.loss, 6))
    return losses, load_file(str(root / name / "adapter.safetensors"))


def main(names: list[str]) -> None:
    root = Path(tempfile.mkdtemp())
    write_example_dataset(root / "data", n=4, size=64)
    _, ref = run(PLAIN, root, "ref")
    for name in names or list(VARIANTS):
        losses, sd = run(VARIANTS[name], root, name)
        up = max(float(t.abs().max()) for k, t in sd.items() if "lora_up" in k)
        diff = max(float((t - ref[k]).abs().max()) for k, t in sd.items() if "lora_" in k)
        print(json.dumps({"variant": name, "losses": losses, "max_up": up, "max_diff_to_plain": diff}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
