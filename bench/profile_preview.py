"""Where a lone preview's time goes (SD1.5 512, 25 steps, CFG 7, a rank-16 adapter at weight 1, bf16,
channels-last, grouped projections, GroupNorms on channels-last tensors: what a training run's preview does): wall time against the GPU's
kernel time, with the top kernels and the top operators by GPU time, over one image after two warm-up
images (the first records the sampling graphs).

    python bench/profile_preview.py --out F [--compiled] [--ungrouped] [--plain-norms] [--no-copy] [--eager]

`--eager` draws without the sampling graphs and adds the kernels grouped by the operators that launched
them (a graph's replay hides that); its wall time is the host-bound eager one.
"""

from __future__ import annotations

import argparse
import time

import torch
from profile_step import launchers
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lora_core.fused_projections import fuse_projections
from lora_core.geglu import use_fused_geglu
from lora_core.half_norms import use_half_norms
from lora_core.inject import inject
from lora_core.models import load_model
from lora_core.nhwc_norm import keep_channels_last
from lora_core.sampling import previews


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--compiled", action="store_true", help="the sampling UNet compiled (sampling.compile)")
    ap.add_argument("--ungrouped", action="store_true", help="leave the attention projections layer by layer")
    ap.add_argument("--plain-norms", action="store_true", help="PyTorch's GroupNorm (performance.nhwc_norms off)")
    ap.add_argument("--plain-geglu", action="store_true", help="diffusers' GEGLU (performance.fused_geglu off)")
    ap.add_argument("--no-copy", action="store_true", help="no working copy of the adapters (adapter_copy off)")
    ap.add_argument("--trace", default="", help="also write a Chrome trace (where the gaps between kernels are)")
    ap.add_argument("--eager", action="store_true", help="no sampling graphs; kernels by launching operators")
    a = ap.parse_args()
    model = load_model("full:sd15", device=torch.device("cuda"))
    model.pipe.to(dtype=torch.bfloat16)
    model.pipe.set_progress_bar_config(disable=True)
    model.unet.to(memory_format=torch.channels_last)
    use_half_norms(model.unet, nhwc=not a.plain_norms)
    if not a.plain_norms:
        keep_channels_last(model.unet)
    modules = inject(model.unet, model.text_encoders, model.family, targets="attn", rank=16, alpha=16)
    for m in modules.values():
        torch.nn.init.normal_(m.lora_up.weight, std=1e-3)
    if not a.ungrouped:
        fuse_projections(model.unet)
    if not a.plain_geglu:
        use_fused_geglu(model.unet)

    def one() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        previews(model, modules, ["a red circle on a white background"], [1.0], steps=25, guidance=7.0,
                 size=512, compiled=a.compiled, working_copy=not a.no_copy, graphs=not a.eager)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    one(), one()
    walls = sorted(one() for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled = one()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    first = min(e.time_range.start for e in kernels)
    last = max(e.time_range.end for e in kernels)
    summary = (f"lone preview, compiled={a.compiled}, grouped={not a.ungrouped}, nhwc_norms={not a.plain_norms}, "
               f"geglu={not a.plain_geglu}, "
               f"working_copy={not a.no_copy}: median wall {walls[1]:.4f} s "
               f"(profiled {profiled:.4f} s); {len(kernels)} GPU kernels, {busy:.4f} s of kernel time, "
               f"first to last kernel {(last - first) / 1e6:.4f} s")
    kern = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=110)
    kern += "\n\n" + gaps(prof, kernels)
    if a.eager:
        kern += "\n\nkernels by the operators that launched them, per image: kernels, ms, chain\n" + launchers(prof, per=1)
    with open(a.out, "w") as f:
        f.write(f"{summary}\n{kern}\n")
    print(summary)
    if a.trace:
        prof.export_chrome_trace(a.trace)


def gaps(prof: profile, kernels: list, top: int = 8) -> str:
    """The GPU's idle time between kernels: how much of it is in gaps of 10 us or more, and what the host
    was doing during the longest ones (the CPU events overlapping each gap)."""
    ks = sorted(kernels, key=lambda e: e.time_range.start)
    idle = [(b.time_range.start - a.time_range.end, a.time_range.end) for a, b in zip(ks, ks[1:], strict=False)]
    idle = [(g, t) for g, t in idle if g > 0]
    big = sorted((x for x in idle if x[0] >= 10), reverse=True)
    cpu = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    lines = [f"idle between kernels: {sum(g for g, _ in idle) / 1e3:.1f} ms in {len(idle)} gaps; "
             f"{sum(g for g, _ in big) / 1e3:.1f} ms in {len(big)} gaps of 10 us or more; the longest:"]
    for g, t in big[:top]:
        host = sorted({e.name for e in cpu if e.time_range.start < t + g and e.time_range.end > t})
        lines.append(f"  {g:8.0f} us  host in: {', '.join(host)[:300]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
