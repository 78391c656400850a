"""The UNet's normalisations on their own: every GroupNorm and LayerNorm of a full model's training step,
forward and backward, at the shapes the step gives them (bf16, channels-last images, frozen parameters),
timed per kernel family, with the memory traffic a two-pass kernel would need (GroupNorm: three passes
forward, five backward; LayerNorm: two and three) over the time taken.

    python bench/norms.py [--model full:sd15] [--batch 16] [--old .prev/lora_core/nhwc_norm.py]
        [--tune TILE=4096,WARPS=8,TARGET_PROGRAMS=512 ...] [--each]

Rows: `ours` (lora_core's kernels as configured, or as each --tune sets them), `torch` (PyTorch's kernels
on the same tensors) and, with --old, another tree's GroupNorm kernels. One JSON line each. With --each,
also one line per distinct GroupNorm call (shape, groups, SiLU): its count in the step, ours and PyTorch's
milliseconds for forward alone and forward + backward, and ours' GB/s against those passes' traffic (three
passes forward, eight in all), to show which shapes run far from memory speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D

from lora_core import layer_norm, models, nhwc_norm

log = logging.getLogger("bench.norms")


def shapes(model: str, batch: int) -> tuple[list[tuple], list[tuple]]:
    """(GroupNorm calls as (shape, groups, silu), LayerNorm input shapes) of one UNet forward, found on the
    meta device."""
    spec = models._spec(model)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
    gn, ln = [], []
    silu_norms = {id(m.norm1) for m in unet.modules() if isinstance(m, ResnetBlock2D)} | {
        id(m.norm2) for m in unet.modules() if isinstance(m, ResnetBlock2D)}
    for m in unet.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.register_forward_hook(lambda mod, inp, out: gn.append(
                (tuple(inp[0].shape), mod.num_groups, id(mod) in silu_norms)))
        elif isinstance(m, torch.nn.LayerNorm):
            m.register_forward_hook(lambda mod, inp, out: ln.append(tuple(inp[0].shape)))
    res = spec["res"] // 8
    cond = dict(encoder_hidden_states=torch.zeros(batch, 77, spec["unet"]["cross_attention_dim"], device="meta"))
    if spec["family"] == "sdxl":
        cond["added_cond_kwargs"] = dict(text_embeds=torch.zeros(batch, 1280, device="meta"),
                                         time_ids=torch.zeros(batch, 6, device="meta"))
    unet(torch.zeros(batch, 4, res, res, device="meta"), torch.zeros(batch, device="meta"), **cond)
    return gn, ln


def timed(calls: list, reps: int) -> float:
    """Milliseconds for one pass over `calls` (each a forward + backward closure), replayed as one CUDA graph
    so that the GPU's time is measured, not Python's launches (as in the graphed training step)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: builds the kernels
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def gn_calls(gn: list[tuple], impl, backward: bool = True) -> list:
    calls = []
    for shape, groups, silu in gn:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(shape[1], device="cuda", dtype=torch.bfloat16) + 1
        b = torch.randn(shape[1], device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)

        def call(x=x, w=w, b=b, dy=dy, groups=groups, silu=silu):
            if not backward:
                with torch.no_grad():
                    return impl(x, groups, w, b, silu)
            y = impl(x, groups, w, b, silu)
            torch.autograd.backward(y, dy)
            x.grad = None
        calls.append(call)
    return calls


def ln_calls(ln: list[tuple], impl) -> list:
    calls = []
    for shape in ln:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_()
        w = torch.randn(shape[-1], device="cuda", dtype=torch.bfloat16) + 1
        b = torch.randn(shape[-1], device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)

        def call(x=x, w=w, b=b, dy=dy):
            torch.autograd.backward(impl(x, w, b), dy)
            x.grad = None
        calls.append(call)
    return calls


def each_gn(gn: list[tuple], ours, head: dict, reps: int) -> None:
    """One JSON line per distinct GroupNorm call of the step (see the module's docstring)."""
    counts: dict[tuple, int] = {}
    for call in gn:
        counts[call] = counts.get(call, 0) + 1
    for (shape, groups, silu), count in counts.items():
        nbytes = torch.Size(shape).numel() * 2
        row = dict(head, what="groupnorm_each", shape=list(shape), groups=groups, silu=silu, count=count)
        for name, impl in (("ours", ours), ("torch", torch_gn)):
            fwd = timed(gn_calls([(shape, groups, silu)], impl, backward=False), reps)
            both = timed(gn_calls([(shape, groups, silu)], impl), reps)
            row.update({f"{name}_fwd_ms": round(fwd, 4), f"{name}_ms": round(both, 4)})
            if name == "ours":
                row.update(fwd_gb_per_s=round(3 * nbytes / fwd / 1e6), gb_per_s=round(8 * nbytes / both / 1e6))
        print(json.dumps(row), flush=True)


def torch_gn(x, groups, w, b, silu):
    y = F.group_norm(x, groups, w, b, 1e-5)
    return F.silu(y) if silu else y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="full:sd15")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--old", help="another tree's nhwc_norm.py to time too")
    p.add_argument("--each", action="store_true", help="also time each distinct GroupNorm call on its own")
    p.add_argument("--tune", action="append", default=[], help="module settings for one more `ours` row, "
                   "e.g. TILE=2048,WARPS=4 (GroupNorm and LayerNorm alike)")
    a = p.parse_args()
    gn, ln = shapes(a.model, a.batch)
    gn_bytes = sum(torch.Size(s).numel() * 2 for s, _, _ in gn)
    ln_bytes = sum(torch.Size(s).numel() * 2 for s in ln)
    head = dict(model=a.model, batch=a.batch, device=torch.cuda.get_device_name())

    def report(what: str, impl: str, ms: float, **extra) -> None:
        traffic = (8 * gn_bytes if what == "groupnorm" else 5 * ln_bytes) / 1e9
        print(json.dumps(dict(head, what=what, impl=impl, calls=len(gn if what == "groupnorm" else ln),
                              ms=round(ms, 3), ideal_gb=round(traffic, 2), gb_per_s=round(traffic / ms * 1e3),
                              **extra)), flush=True)

    ours_gn = lambda x, g, w, b, silu: nhwc_norm.group_norm(x, g, w, b, 1e-5, silu=silu)  # noqa: E731
    ours_ln = lambda x, w, b: layer_norm.layer_norm(x, (x.shape[-1],), w, b, 1e-5)  # noqa: E731
    report("groupnorm", "torch", timed(gn_calls(gn, torch_gn), a.reps))
    report("layernorm", "torch", timed(ln_calls(ln, lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)),
                                       a.reps))
    if a.old:
        spec = importlib.util.spec_from_file_location("old_nhwc_norm", a.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        report("groupnorm", "old", timed(gn_calls(gn, lambda x, g, w, b, silu: old.group_norm(
            x, g, w, b, 1e-5, silu=silu)), a.reps))
    defaults = {module: vars(module).copy() for module in (nhwc_norm, layer_norm)}
    for tune in [""] + a.tune:
        settings = dict(kv.split("=") for kv in tune.split(",") if kv)
        for module, own in defaults.items():  # each row from the modules' own settings, not the last row's
            for k, v in settings.items():
                if k in own:
                    setattr(module, k, int(v))
            for k in set(own) - set(settings):
                if k.isupper():
                    setattr(module, k, own[k])
        extra = dict(settings=settings) if settings else {}
        report("groupnorm", "ours", timed(gn_calls(gn, ours_gn), a.reps), **extra)
        report("layernorm", "ours", timed(ln_calls(ln, ours_ln), a.reps), **extra)
    if a.each:
        for module, own in defaults.items():
            for k in own:
                if k.isupper():
                    setattr(module, k, own[k])
        each_gn(gn, ours_gn, head, a.reps * 5)
    if nhwc_norm._state["failed"] or layer_norm._state["failed"]:
        raise SystemExit("our kernels fell back to PyTorch's: see the log")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
