"""Our trainer's real training loop (`lora_core.trainer.train`), timed between loss read-backs.

A synthetic 16-image dataset is written at the model's resolution; previews and checkpoints are off, so
the timed window holds only training steps. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import nullcontext
from unittest.mock import patch

import torch
import torch._inductor.config

from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.trainer import train

RES = {"full:sd15": 512, "full:sdxl": 1024, "full:sd21-v": 768}


def split_attention_for(heads: set[int]):
    """Route scaled-dot-product attention of these head sizes to bench/attention_split.py's kernels (a whole-step
    A/B of that experiment; the trainer itself does not take them). Block sizes are tuned at a shape's first
    call outside CUDA-graph capture (the graphed step's eager warm-up), else the untuned default is used."""
    from bench import attention_split

    plain = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if (q.is_cuda and q.shape[-1] in heads and attn_mask is None and not dropout_p and not is_causal
                and not kwargs and q.dtype in (torch.bfloat16, torch.float16)
                and q.shape[-2] % 64 == 0 and k.shape[-2] % 64 == 0):
            attention_split.TUNE = not torch.cuda.is_current_stream_capturing()
            return attention_split.split_attention(q, k, v)
        return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    return patch("torch.nn.functional.scaled_dot_product_attention", sdpa)


def matmul_attention_for(heads: set[int], max_keys: int):
    """Route attention of these head sizes, or with at most `max_keys` keys, to attention spelled out in plain
    operators (bench/attention_pick.py's `matmul_attention`): a whole-step A/B of that choice."""
    from bench.attention_pick import matmul_attention

    plain = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if (attn_mask is None and not dropout_p and not is_causal and not kwargs
                and (q.shape[-1] in heads or k.shape[-2] <= max_keys)):
            return matmul_attention(q, k, v)
        return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    return patch("torch.nn.functional.scaled_dot_product_attention", sdpa)


def pad_attention_for(pairs: dict[int, int]):
    """Zero-pad q, k and v of attention with these head sizes to a larger one before cuDNN's kernel, and slice the
    output back (the scale stays that of the real head size): a whole-step A/B of whether the kernel's time at the
    padded size, plus the copies, beats its time at the real one. The trainer does not do this."""
    plain = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        d = q.shape[-1]
        if d in pairs and k.shape[-1] == d and v.shape[-1] == d and attn_mask is None and not kwargs:
            widen = (0, pairs[d] - d)
            out = plain(*(torch.nn.functional.pad(t, widen) for t in (q, k, v)), dropout_p=dropout_p,
                        is_causal=is_causal, scale=d ** -0.5 if scale is None else scale)
            return out[..., :d]
        return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    return patch("torch.nn.functional.scaled_dot_product_attention", sdpa)


def no_weight_grads():
    """Replace the adapters' weight-gradient products with a zero tensor kept from the first call of each shape:
    what those products cost in the step (an upper bound on moving them off its path; the run trains nothing)."""
    from lora_core import grouped_lora, lora_fused

    kept: dict = {}

    def zeros(a, b, dtype):
        key = (a.shape[0], b.shape[1], dtype, a.device)
        if key not in kept:
            kept[key] = torch.zeros(a.shape[0], b.shape[1], dtype=dtype, device=a.device)
        return kept[key]

    return patch.object(lora_fused, "_mm_as", zeros), patch.object(grouped_lora, "_mm_as", zeros)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="full:sd15")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=20, help="steps before timing (compile, caches); multiple of 10")
    ap.add_argument("--steps", type=int, default=30, help="timed steps; multiple of 10")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--te", action="store_true", help="train the text-encoder LoRA too (no text cache)")
    ap.add_argument("--set", action="append", default=[], help="extra TrainConfig overrides")
    ap.add_argument("--keep-kernel", action="store_true",
                    help="a compiled UNet's adapters keep the fused kernel (the trainer gives them the plain path)")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="a torch._inductor.config setting for a compiled run, e.g. combo_kernels=true")
    ap.add_argument("--no-weight-grads", action="store_true",
                    help="skip the adapters' weight-gradient products (a probe of their cost; trains nothing)")
    ap.add_argument("--split-attention", type=int, action="append", default=[], metavar="HEAD",
                    help="self-attention of this head size runs bench/attention_split.py's kernels (e.g. 40)")
    ap.add_argument("--pad-attention", action="append", default=[], metavar="HEAD:PADDED",
                    help="zero-pad attention of head size HEAD to PADDED before the kernel (an A/B; see pad_attention_for)")
    ap.add_argument("--matmul-attention", type=int, action="append", default=[], metavar="HEAD",
                    help="attention of this head size is spelled out in plain operators (e.g. 160)")
    ap.add_argument("--matmul-keys", type=int, default=0, metavar="N",
                    help="attention with at most N keys is spelled out in plain operators (e.g. 77)")
    a = ap.parse_args()
    for kv in a.inductor:
        key, value = kv.split("=", 1)
        setattr(torch._inductor.config, key, json.loads(value))
    res = RES[a.model]
    data = tempfile.mkdtemp()
    write_example_dataset(data, n=16, size=res)
    cfg = resolve(overrides=[
        f"model.base={a.model}", f"data.dir={data}", f"data.resolution={res}", "data.buckets=false",
        f"schedule.batch_size={a.batch}", f"schedule.steps={a.warmup + a.steps}", "schedule.scheduler=constant",
        "lora.rank=16", "lora.alpha=16", "lora.targets=attn", f"lora.train_text_encoder={str(a.te).lower()}",
        "sampling.enabled=false", "saving.every=0", "performance.log_every=10",
        f"performance.gradient_checkpointing={str(a.gc).lower()}", *a.set])
    marks = {}
    t_start = time.perf_counter()
    keep = patch("lora_core.fast_step.plain_adapters", lambda unet: None) if a.keep_kernel else nullcontext()
    split = split_attention_for(set(a.split_attention)) if a.split_attention else nullcontext()
    spelled = (matmul_attention_for(set(a.matmul_attention), a.matmul_keys)
               if a.matmul_attention or a.matmul_keys else nullcontext())
    pads = dict(tuple(int(x) for x in p.split(":")) for p in a.pad_attention)
    padding = pad_attention_for(pads) if pads else nullcontext()
    probe_a, probe_b = no_weight_grads() if a.no_weight_grads else (nullcontext(), nullcontext())
    with keep, split, spelled, padding, probe_a, probe_b:
        events = train(cfg, run_dir=tempfile.mkdtemp() + "/run")
        for ev in events:
            if ev.kind == "started":
                t_started = time.perf_counter()
                torch.cuda.reset_peak_memory_stats()
            if ev.kind == "step" and ev.step in (a.warmup, a.warmup + a.steps):
                marks.setdefault(ev.step, time.perf_counter())
            if ev.kind == "failed":
                raise SystemExit(ev.message)
    ms = (marks[a.warmup + a.steps] - marks[a.warmup]) / a.steps * 1000
    extra = a.set + (["keep_kernel"] if a.keep_kernel else []) + (["no_weight_grads"] if a.no_weight_grads else []) + [f"inductor.{kv}" for kv in a.inductor] + [
        f"split_attention.{d}" for d in a.split_attention] + [f"pad_attention.{p}" for p in a.pad_attention] + [f"matmul_attention.{d}" for d in a.matmul_attention] + (
        [f"matmul_keys.{a.matmul_keys}"] if a.matmul_keys else []) + [
        f"{k}={v}" for k, v in os.environ.items() if k.startswith("CUDNN_FRONTEND_")]
    print(json.dumps({"impl": "ours", "model": a.model, "batch": a.batch, "gc": a.gc, "te": a.te,
                      "extra": extra, "ms_per_step": round(ms, 2), "samples_per_s": round(a.batch * 1000 / ms, 2),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "setup_s": round(t_started - t_start, 1),
                      "warmup_s": round(marks[a.warmup] - t_started, 1)}))


if __name__ == "__main__":
    main()
