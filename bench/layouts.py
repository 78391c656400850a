"""Which tensors reach the UNet's convolutions in a layout cuDNN must copy, forward and backward, and which
Python lines launch the step's layout copies: a diagnostic of our real training loop, one JSON line per finding.

With channels-last on, every convolution input and every gradient arriving at one should be channels-last;
each that is not costs a copy (bench/data/profile-b16-eager-cl-ops-h200.txt counts them). Usage:
  python bench/layouts.py --batch 16 [--stacks] [--set performance.channels_last=off]
(eager steps, so channels-last is set on: a graphed step's default at every batch where GroupNorm keeps it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lora_core import trainer
from lora_core.config import resolve
from lora_core.dataset import write_example_dataset

RES = {"full:sd15": 512, "full:sdxl": 1024}


def layout(t: torch.Tensor) -> str:
    if t.dim() != 4:
        return f"{t.dim()}-D"
    cl, nchw = t.is_contiguous(memory_format=torch.channels_last), t.is_contiguous()
    return "both" if cl and nchw else "channels_last" if cl else "nchw" if nchw else f"strided{tuple(t.stride())}"


class Convolutions(TorchDispatchMode):
    """Counts, per convolution shape and pass, the layouts its input and its output's gradient arrive in. It
    watches the operators, not the modules: the lean ResNet blocks call their convolutions' functional form."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.seen[("forward input", tuple(args[1].shape), tuple(args[0].shape), layout(args[0]))] += 1
        elif func is torch.ops.aten.convolution_backward.default:
            self.seen[("backward grad_output", tuple(args[2].shape), tuple(args[0].shape), layout(args[0]))] += 1
        return func(*args, **(kwargs or {}))


class CopySites(TorchFunctionMode):
    """Counts the Python lines whose `.contiguous()`, `.reshape()` or `.to()` made a copy, by input shape."""

    WATCHED = (torch.Tensor.contiguous, torch.Tensor.reshape, torch.Tensor.to)

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.WATCHED and isinstance(out, torch.Tensor) and out.numel() > 1 and (
                out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr()):
            frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                      if "torch/" not in f.filename][-3:]
            self.sites[(func.__name__, tuple(args[0].shape), layout(args[0]), " < ".join(reversed(frames)))] += 1
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="full:sd15")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--res", type=int, default=0, help="resolution (default: the model's)")
    ap.add_argument("--stacks", action="store_true", help="also profile one step for the copies' Python lines")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    res = a.res or RES.get(a.model, 64)
    data = tempfile.mkdtemp()
    write_example_dataset(data, n=max(4, a.batch), size=res)
    cfg = resolve(overrides=[
        f"model.base={a.model}", f"data.dir={data}", f"data.resolution={res}", "data.buckets=false",
        f"schedule.batch_size={a.batch}", "schedule.steps=4", "lora.rank=16", "lora.alpha=16", "lora.targets=attn",
        "lora.train_text_encoder=false", "sampling.enabled=false", "saving.every=0", "performance.log_every=1",
        "performance.cuda_graphs=off", "performance.channels_last=on", *a.set], check=False)
    convs, sites = Convolutions(), CopySites()
    for ev in trainer.train(cfg, run_dir=tempfile.mkdtemp() + "/run"):
        if ev.kind == "failed":
            raise SystemExit(ev.message)
        if ev.kind == "step" and ev.step == 2:  # step 3 is watched
            convs.__enter__()
            if a.stacks:
                sites.__enter__()
        if ev.kind == "step" and ev.step == 3:
            if a.stacks:
                sites.__exit__(None, None, None)
            convs.__exit__(None, None, None)
    seen, steps = convs.seen, 1
    for (where, weight, shape, how), n in sorted(seen.items()):
        if how not in ("channels_last", "both"):
            print(json.dumps({"where": where, "weight": weight, "shape": shape, "layout": how, "per_step": n / steps}))
    total = Counter((w, h in ("channels_last", "both")) for (w, _, _, h), n in seen.items() for _ in range(n))
    print(json.dumps({"summary": {f"{w} {'channels_last' if ok else 'other'}": n / steps for (w, ok), n in total.items()}}))
    if a.stacks:
        for (op, shape, how, where), n in sites.sites.most_common(40):
            print(json.dumps({"copy": op, "shape": shape, "layout": how, "python": where, "per_step": n}))


if __name__ == "__main__":
    main()
