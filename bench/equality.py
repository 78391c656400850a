"""Fast path vs plain eager path on the GPU: per-step losses of 50 bf16 SD1.5 steps for each switch.

Usage: python bench/equality.py OUT.json [--te]   (prints max relative difference of each variant to eager;
--te trains the text-encoder LoRA too, which the graphed step then encodes inside the graph)
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.trainer import train

VARIANTS = {
    "eager": ["performance.cuda_graphs=off", "performance.channels_last=off", "performance.attention=flash"],
    "eager_cl": ["performance.cuda_graphs=off", "performance.channels_last=on", "performance.attention=flash"],
    "eager_cudnn": ["performance.cuda_graphs=off", "performance.channels_last=off", "performance.attention=cudnn"],
    "graphed_nocl": ["performance.cuda_graphs=on", "performance.channels_last=off", "performance.attention=flash"],
    "graphed": ["performance.cuda_graphs=on", "performance.channels_last=on", "performance.attention=flash"],
    "fast": ["performance.cuda_graphs=on", "performance.channels_last=on", "performance.attention=cudnn"],
}


def losses(overrides: list[str], run: Path) -> list[float]:
    out = []
    for ev in train(resolve(overrides=overrides), run_dir=run):
        assert ev.kind != "failed", ev.message
        if ev.kind == "step":
            out.append(ev.loss)
    return out


def main(dest: str, te: bool) -> None:
    root = Path(tempfile.mkdtemp())
    write_example_dataset(root / "data", n=8, size=512)
    common = [f"data.dir={root / 'data'}", "model.base=full:sd15", "data.resolution=512", "data.buckets=false",
              f"lora.train_text_encoder={str(te).lower()}", "lora.rank=16", "lora.alpha=16", "lora.targets=attn",
              "schedule.steps=50", "schedule.batch_size=1", "optim.lr=1e-4", "sampling.enabled=false",
              "performance.log_every=10", "performance.compile=off"]
    res = {name: losses(common + extra, root / name) for name, extra in VARIANTS.items()}
    e = torch.tensor(res["eager"])
    report = {name: float(((torch.tensor(v) - e).abs() / e.abs()).max()) for name, v in res.items()}
    print(json.dumps({"max_rel_diff": report}))
    Path(dest).write_text(json.dumps({"losses": res, "max_rel_diff": report}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], "--te" in sys.argv[2:])
