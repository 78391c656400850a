"""Reference recipe: the diffusers training example's LoRA step (peft `add_adapter`), same settings as ours.

bf16 UNet, rank-16 LoRA on to_q/to_k/to_v/to_out.0 in fp32, autocast, AdamW, latents and text
embeddings precomputed on the GPU. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig

from lora_core.models import build_pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="full:sd15")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    a = ap.parse_args()
    dev = torch.device("cuda")
    m = build_pipeline(a.model, device=dev)
    unet = m.unet.to(torch.bfloat16)
    del m.pipe.vae, m.pipe.text_encoder
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if a.gc:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler.from_config(m.pipe.scheduler.config)
    cfg = unet.config
    side = cfg.sample_size
    lat = torch.randn(a.batch, 4, side, side, device=dev)
    ctx = torch.randn(a.batch, 77, cfg.cross_attention_dim, device=dev)
    kw = {}
    if m.family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(a.batch, 1280, device=dev),
                                   "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * a.batch, device=dev)}
    torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (a.batch,), device=dev)
        noisy = sched.add_noise(lat, noise, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(noisy, t, ctx, **kw).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / a.steps * 1000
    print(json.dumps({"impl": "reference", "model": a.model, "batch": a.batch, "gc": a.gc, "te": False,
                      "ms_per_step": round(ms, 2), "samples_per_s": round(a.batch * 1000 / ms, 2),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}))


if __name__ == "__main__":
    main()
