#!/usr/bin/env python3
"""Train the bundled `demo` base model from scratch on the demo world (lora_core/demo_world.py).

The result is a standard diffusers Stable Diffusion 1.x folder (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, the project's tokenizer, an Euler scheduler) that `StableDiffusionPipeline.from_pretrained`
loads; 64x64 images, 16x16x4 latents; fp16 safetensors, under 30 MB in all. Two stages:
  1. the VAE alone: reconstruction (MSE + L1) plus a small KL term; then frozen, every image encoded once;
  2. UNet + text encoder jointly: epsilon objective (min-SNR weighted), captions dropped 10% of the time
     for classifier-free guidance, size/position words dropped 25% each, EMA of the weights.
Held-out concepts (demo_world.HELDOUT: star, heart, pink, stripes) are never shown. At the end the saved
folder is reloaded and scored with lora_core.checker on 100 prompts; `eval.json` records the result.

  python tools/train_demo_base.py                      # GPU: ~8 minutes on one H100 -> assets/demo-base/
  python tools/train_demo_base.py --smoke --out /tmp/x # CPU: tiny sizes, a few steps, for tests
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lora_core import checker, demo_world  # noqa: E402
from lora_core.tokenizer import BOS, EOS, build_vocab, make_tokenizer, save_tokenizer  # noqa: E402

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, timestep_spacing="trailing", prediction_type="epsilon")
CAPTION_VARIANTS = ((True, True), (False, True), (True, False), (False, False))  # (size, position) kept


@dataclass
class Sizes:
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 3 levels: 64x64 -> 16x16 latents
    unet_channels: tuple[int, ...] = (64, 128, 192)  # 16x16, 8x8, 4x4; cross-attention at every level
    layers_per_block: int = 1
    heads: int = 8
    text_hidden: int = 256  # = the UNet's cross_attention_dim
    text_layers: int = 3
    text_heads: int = 4
    groups: int = 32


SMOKE = Sizes(vae_channels=(8, 16, 16), unet_channels=(16, 32, 32), heads=2, text_hidden=32, text_layers=2,
              text_heads=2, groups=8)


def build_models(s: Sizes) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s.vae_channels,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=s.groups, sample_size=64)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=s.unet_channels,
        layers_per_block=s.layers_per_block, cross_attention_dim=s.text_hidden, attention_head_dim=s.heads,
        norm_num_groups=s.groups, down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3)
    vocab, _ = build_vocab()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=s.text_hidden, intermediate_size=2 * s.text_hidden,
        num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=s.text_hidden,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))
    return vae, unet, text


# ----------------------------------------------------------------------------- data


def _chunk(n: int, seed: int) -> tuple[np.ndarray, list[demo_world.Scene]]:
    images, _, scenes = demo_world.make_batch(n, seed)
    return images, scenes


def make_data(n: int, seed: int, workers: int) -> tuple[np.ndarray, list[demo_world.Scene]]:
    """n training-concept images (uint8, N x 64 x 64 x 3) and their scenes, rendered in parallel."""
    sizes = [min(2000, n - i) for i in range(0, n, 2000)]
    jobs = [(k, seed * 100_003 + i) for i, k in enumerate(sizes)]
    if workers > 1:  # fork before CUDA is touched
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.starmap(_chunk, jobs)
    else:
        parts = [_chunk(*job) for job in jobs]
    return np.concatenate([p[0] for p in parts]), [s for p in parts for s in p[1]]


def caption_table(scenes: list[demo_world.Scene]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Token ids of every distinct caption (row 0: the empty caption) and, per image, the row of each
    CAPTION_VARIANTS variant: (U, 77) ids, (N, 4) rows, the U strings."""
    strings: dict[str, int] = {"": 0}
    rows = [[strings.setdefault(demo_world.caption(s, size=a, position=b), len(strings))
             for a, b in CAPTION_VARIANTS] for s in scenes]
    texts = list(strings)
    leaked = sorted({w for t in texts for w in t.replace(",", "").split() if w in demo_world.HELDOUT_WORDS})
    if leaked:
        raise SystemExit(f"held-out words in training captions: {leaked}")
    tok = make_tokenizer()
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return ids, torch.tensor(rows), texts


def warn_split_words(texts: list[str]) -> None:
    tok = make_tokenizer()
    words = sorted({w for t in texts for w in t.replace(",", " ").split()})
    split = [w for w in words if tok.tokenize(w) != [w + "</w>"]]
    if split:
        print(f"WARNING: the tokenizer splits caption words into pieces: {', '.join(split)}")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 64, 64, 3) -> float (B, 3, 64, 64) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- training


class Clock:
    """Cosine learning-rate schedule with warmup over whichever ends first: the steps or the time."""

    def __init__(self, steps: int, deadline: float | None, warmup: int) -> None:
        self.steps, self.deadline, self.warmup, self.start = steps, deadline, warmup, time.time()

    def progress(self, step: int) -> float:
        p = step / self.steps
        if self.deadline is not None:
            p = max(p, (time.time() - self.start) / max(1e-6, self.deadline - self.start))
        return p

    def lr_scale(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, self.progress(step)))))


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _optimizer(groups: list[dict], device: torch.device, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=device.type == "cuda")


def train_vae(vae: AutoencoderKL, images: torch.Tensor, args: argparse.Namespace, clock: Clock) -> None:
    device = images.device
    opt = _optimizer([{"params": vae.parameters(), "lr": args.vae_lr}], device, 0.0)
    vae.train()
    step, t0, total = 0, time.time(), torch.zeros((), device=device)
    while step < args.vae_steps and clock.progress(step) < 1.0:
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * clock.lr_scale(step)
        x = to_float(images[torch.randint(len(images), (args.vae_batch,), device=device)])
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        total += loss.detach()
        step += 1
        if step % args.log_every == 0 or step == args.vae_steps:
            n = args.log_every if step % args.log_every == 0 else step % args.log_every
            print(f"vae  step {step:6d}  loss {total.item() / n:.5f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{step / (time.time() - t0):.1f} it/s", flush=True)
            total.zero_()
    vae.eval().requires_grad_(False)
    print(f"vae: {step} steps in {time.time() - t0:.0f} s")


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, fp16 (N, 4, 16, 16) each."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        with _autocast(images.device):
            post = vae.encode(to_float(images[i:i + batch])).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
    return torch.cat(means), torch.cat(stds)


def train_unet(unet: UNet2DConditionModel, text: CLIPTextModel, latents: tuple[torch.Tensor, torch.Tensor],
               tokens: torch.Tensor, rows: torch.Tensor, scale: float, args: argparse.Namespace,
               clock: Clock) -> dict:
    mean, std = latents
    device = mean.device
    alphas = torch.tensor(_alphas_cumprod(), device=device, dtype=torch.float32)
    params = [p for m in (unet, text) for p in m.parameters()]
    opt = _optimizer([{"params": params, "lr": args.lr}], device, 0.01)
    ema = [p.detach().clone() for p in params]
    model = torch.compile(unet) if args.compile else unet
    unet.train()
    text.train()
    step, t0, total, history = 0, time.time(), torch.zeros((), device=device), []
    while step < args.steps and clock.progress(step) < 1.0:
        for g in opt.param_groups:
            g["lr"] = args.lr * clock.lr_scale(step)
        b = args.batch
        idx = torch.randint(len(mean), (b,), device=device)
        z = (mean[idx].float() + std[idx].float() * torch.randn(b, *mean.shape[1:], device=device)) * scale
        noise = torch.randn_like(z)
        t = torch.randint(0, len(alphas), (b,), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        # caption: a variant (size / position words kept with p 0.75 each), or empty with p 0.1 (CFG)
        variant = (torch.rand(b, device=device) < 0.25).long() + 2 * (torch.rand(b, device=device) < 0.25).long()
        row = torch.where(torch.rand(b, device=device) < 0.1, 0, rows[idx, variant])
        with _autocast(device):
            context = text(tokens[row])[0]
            pred = model(noisy, t, context).sample.float()
        snr = (a / (1 - a)).view(-1)
        weight = snr.clamp(max=args.snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        total += loss.detach()
        step += 1
        if step % args.log_every == 0:
            history.append(round(total.item() / args.log_every, 5))
            total.zero_()
            if not math.isfinite(history[-1]):
                raise SystemExit(f"UNet loss is {history[-1]} at step {step}: lower --lr (now {args.lr})")
            print(f"unet step {step:6d}  loss {history[-1]:.5f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{step / (time.time() - t0):.1f} it/s  {time.time() - t0:.0f} s", flush=True)
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    print(f"unet: {step} steps in {time.time() - t0:.0f} s")
    return {"steps": step, "seconds": round(time.time() - t0, 1), "loss_every_log": history}


def _alphas_cumprod() -> np.ndarray:
    betas = np.linspace(SCHEDULER["beta_start"] ** 0.5, SCHEDULER["beta_end"] ** 0.5,
                        SCHEDULER["num_train_timesteps"], dtype=np.float64) ** 2  # "scaled_linear"
    return np.cumprod(1.0 - betas)


# ----------------------------------------------------------------------------- save and evaluate


def save(vae: AutoencoderKL, unet: UNet2DConditionModel, text: CLIPTextModel, out: Path) -> float:
    """Write the pipeline folder in fp16; returns the weights' size in MB."""
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=make_tokenizer(), unet=unet,
                                   scheduler=EulerDiscreteScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    for model in (vae, unet, text):
        model.to("cpu", torch.float16)
    pipe.save_pretrained(out, safe_serialization=True, variant=None)
    # fp16 on disk, but loaded as fp32 unless asked otherwise, like the diffusers parts (transformers
    # would otherwise load the text encoder as fp16 next to a fp32 UNet: a dtype clash on CPU)
    config = out / "text_encoder" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"dtype": "float32"}, indent=2) + "\n")
    save_tokenizer(out / "tokenizer")
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    print(f"saved {out} ({size:.1f} MB of weights)" + ("  WARNING: over 30 MB" if size > 30 else ""))
    return size


def _rates(images: list[Image.Image], scenes: list[demo_world.Scene], keys: tuple[str, ...]) -> dict:
    found = [checker.detect(im) for im in images]
    rates = {k: float(np.mean([getattr(d, k) == getattr(s, k) for d, s in zip(found, scenes, strict=True)]))
             for k in keys}
    rates["shape+colour"] = float(np.mean([checker.matches(d, s) for d, s in zip(found, scenes, strict=True)]))
    return rates


@torch.no_grad()
def evaluate(out: Path, device: torch.device, args: argparse.Namespace) -> dict:
    """Reload the saved folder, generate eval_n training-concept prompts (and a few held-out ones, which
    the base should fail), score them with the checker; writes eval_samples.png."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(out, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)

    def generate(captions: list[str], seed: int) -> list[Image.Image]:
        images = []
        for i in range(0, len(captions), 50):
            gen = torch.Generator("cpu").manual_seed(seed + i)
            images += pipe(captions[i:i + 50], num_inference_steps=args.eval_steps, guidance_scale=args.cfg,
                           generator=gen).images
        return images

    _, captions, scenes = demo_world.make_batch(args.eval_n, seed=10_000 + args.seed)
    images = generate(captions, args.seed)
    result = {"prompts": args.eval_n, "sampling_steps": args.eval_steps, "cfg": args.cfg,
              "train_concepts": _rates(images, scenes, ("shape", "colour", "background", "size", "position"))}
    heldout = {}
    for k, concept in enumerate(demo_world.CONCEPTS):
        rng = np.random.default_rng(20_000 + k)
        c_scenes = [demo_world.concept_scene(rng, concept) for _ in range(args.heldout_n)]
        found = [checker.detect(im) for im in generate([demo_world.caption(s) for s in c_scenes], args.seed)]
        key = "shape" if concept in demo_world.HELDOUT["shape"] else (
            "colour" if concept in demo_world.HELDOUT["colour"] else "pattern")
        heldout[concept] = float(np.mean([getattr(d, key) == concept for d in found]))
    result["heldout_concepts_drawn"] = heldout  # low is expected: the base never saw them
    side = int(math.ceil(math.sqrt(min(64, len(images)))))
    grid = Image.new("RGB", (64 * side, 64 * side))
    for i, im in enumerate(images[:side * side]):
        grid.paste(im, (64 * (i % side), 64 * (i // side)))
    grid.save(out / "eval_samples.png")
    return result


def vae_check(vae: AutoencoderKL, device: torch.device, n: int) -> dict:
    """Reconstruction quality of fresh images (held-out seed): PSNR and the checker on reconstructions."""
    arr, _, scenes = demo_world.make_batch(n, seed=30_000)
    x = to_float(torch.from_numpy(arr).to(device))
    with torch.no_grad(), _autocast(device):
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    psnr = float(10 * torch.log10(4 / F.mse_loss(recon, x)))
    images = [Image.fromarray(a) for a in ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()]
    return {"psnr": round(psnr, 2), **_rates(images, scenes, ("shape", "colour"))}


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "demo-base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=8.0, help="time budget for everything; 0: none")
    p.add_argument("--vae-share", type=float, default=0.2, help="share of --minutes for data + VAE")
    p.add_argument("--steps", type=int, default=200_000, help="most UNet steps (the time budget ends sooner)")
    p.add_argument("--vae-steps", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=1024, help="UNet batch (its steps are bound by Python overhead)")
    p.add_argument("--vae-batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--images", type=int, default=100_000, help="training images rendered at the start")
    p.add_argument("--workers", type=int, default=min(16, multiprocessing.cpu_count()))
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--heldout-n", type=int, default=20, help="prompts per held-out concept in the eval")
    p.add_argument("--eval-steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (CPU test)")
    args = p.parse_args(argv)
    if args.smoke:
        args.__dict__.update(images=64, steps=3, vae_steps=3, batch=4, vae_batch=4, eval_n=2, heldout_n=1,
                             eval_steps=2, minutes=0.0, workers=1, log_every=1)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.time()
    budget = args.minutes * 60 if args.minutes > 0 else None
    reserve = min(45.0, 0.1 * budget) if budget else 0.0  # saving + evaluation
    torch.manual_seed(args.seed)
    sizes = SMOKE if args.smoke else Sizes()
    images_np, scenes = make_data(args.images, args.seed, args.workers)
    tokens, rows, texts = caption_table(scenes)
    warn_split_words(texts)
    print(f"data: {len(images_np)} images, {len(texts) - 1} distinct captions in {time.time() - start:.1f} s")

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    images = torch.from_numpy(images_np).to(device)
    vae, unet, text = (m.to(device) for m in build_models(sizes))
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in (("vae", vae), ("unet", unet), ("text", text))}
    print("parameters:", {k: f"{v / 1e6:.2f}M" for k, v in counts.items()})

    train_vae(vae, images, args, Clock(args.vae_steps, budget and start + args.vae_share * budget, 100))
    latents = encode_all(vae, images)
    scale = float(1.0 / latents[0].float().std())
    vae.register_to_config(scaling_factor=scale)
    vae_eval = vae_check(vae, device, args.eval_n)
    print(f"latent scaling factor {scale:.4f}; VAE reconstructions: {vae_eval}")
    del images

    clock = Clock(args.steps, budget and start + budget - reserve, 200)
    unet_log = train_unet(unet, text, latents, tokens.to(device), rows.to(device), scale, args, clock)
    args.out.mkdir(parents=True, exist_ok=True)
    size_mb = save(vae, unet, text, args.out)
    result = evaluate(args.out, device, args)
    result |= {"vae_reconstruction": vae_eval, "weights_mb": round(size_mb, 2), "parameters": counts,
               "unet_training": unet_log, "sizes": asdict(sizes), "minutes_total": round((time.time() - start) / 60, 2),
               "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"checker shape+colour on {args.eval_n} prompts ({args.eval_steps} steps, cfg {args.cfg}): "
          f"{result['train_concepts']['shape+colour']:.3f}")
    print(json.dumps({k: result[k] for k in ("train_concepts", "heldout_concepts_drawn", "vae_reconstruction")}))
    return result


if __name__ == "__main__":
    main()
