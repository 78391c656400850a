"""A rough run-time and memory estimate shown before a run starts.

It is a formula, not a measurement: per-family costs taken from published H100
measurements (bf16, cached latents) and from the tiny models on a CPU, scaled by
batch size, resolution, gradient checkpointing and previews. The UI says so next to the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lora_core.config import TrainConfig
from lora_core.sampling import PREVIEW_BATCH_PIXELS


@dataclass(frozen=True)
class Cost:
    native: int  # resolution the numbers below were taken at
    weights_gib: float  # frozen base in the compute dtype
    act_gib: float  # activations per sample at `native`
    step_s: float  # seconds per batch-1 step at `native`, overhead included
    sample_s: float  # extra seconds per extra sample in a batch
    denoise_s: float  # seconds per preview denoising step (guidance included)
    load_s: float  # loading and caching


_GPU = {
    "tiny": Cost(32, 0.05, 0.01, 0.02, 0.001, 0.01, 2),
    "sd1": Cost(512, 2.1, 1.2, 0.20, 0.012, 0.03, 15),
    "sd2": Cost(768, 2.6, 2.7, 0.30, 0.03, 0.06, 20),
    "sdxl": Cost(1024, 6.6, 8.0, 0.60, 0.35, 0.12, 40),
}
_CPU_TINY = Cost(32, 0.05, 0.01, 0.15, 0.02, 0.05, 5)
_CPU_SLOWDOWN = 60  # a full-size model on a CPU


def family_of(base: str) -> str:
    """Best guess of a MODEL string's family, for the estimate only."""
    b = base.lower()
    if b == "demo" or b.startswith("tiny:"):
        return "tiny"
    if "xl" in b:
        return "sdxl"
    if "sd2" in b or "2-1" in b or "2.1" in b or "sd21" in b or "2-base" in b:
        return "sd2"
    return "sd1"


def total_steps(cfg: TrainConfig, images: int) -> int:
    s = cfg.schedule
    if s.epochs:
        per_epoch = math.ceil(max(1, images) * cfg.data.repeats / s.batch_size)
        return max(1, math.ceil(s.epochs * per_epoch / cfg.optim.grad_accum))
    return s.steps


def estimate(cfg: TrainConfig, images: int, *, cuda: bool | None = None) -> dict[str, float]:
    """{"seconds", "memory_gib", "steps", "previews"} for cfg on `images` images (cuda: auto-detected)."""
    if cuda is None:
        cuda = torch.cuda.is_available() and cfg.performance.device != "cpu"
    family = family_of(cfg.model.base)
    cost = _GPU[family] if cuda else (_CPU_TINY if family == "tiny" else _GPU[family])
    slow = 1 if cuda or family == "tiny" else _CPU_SLOWDOWN
    area = (cfg.data.resolution / cost.native) ** 2
    batch = cfg.schedule.batch_size
    ckpt = cfg.performance.gradient_checkpointing
    te = 1.15 if cfg.lora.train_text_encoder else 1.0
    step_s = (cost.step_s + cost.sample_s * (batch - 1)) * max(1.0, area) * te * (1.7 if ckpt else 1.0)
    steps = total_steps(cfg, images)
    sm = cfg.sampling
    events = (steps // sm.every if sm.every else 0) + 2
    size_area = ((sm.size or cfg.data.resolution) / cost.native) ** 2
    per_image = sm.steps * cost.denoise_s * max(0.25, size_area)
    shown = max(1, len(sm.prompts)) * len(sm.scales)
    if cuda:  # drawn several to a call; an image after a call's first costs about half (bench/RESULTS.md)
        size = sm.size or cfg.data.resolution
        calls = math.ceil(shown / max(1, PREVIEW_BATCH_PIXELS // (size * size)))
        shown = calls + 0.5 * (shown - calls)
    preview_s = events * shown * per_image
    seconds = (cost.load_s + images * 0.05 + steps * cfg.optim.grad_accum * step_s + preview_s) * slow
    memory = cost.weights_gib + cost.act_gib * batch * area * (0.35 if ckpt else 1.0) * te + 0.5
    return {"seconds": seconds, "memory_gib": memory, "steps": steps, "previews": events}


def human_duration(seconds: float) -> str:
    """'40 s', '12 min', '3 h 05 min'."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def estimate_markdown(cfg: TrainConfig, images: int) -> str:
    cuda = torch.cuda.is_available() and cfg.performance.device != "cpu"
    e = estimate(cfg, images, cuda=cuda)
    family = family_of(cfg.model.base)
    where = (f"on this GPU ({torch.cuda.get_device_name(0)})" if cuda else "on this computer's CPU (no CUDA GPU)")
    lines = [f"**Rough estimate** for {e['steps']} steps {where}: about **{human_duration(e['seconds'])}** "
             f"including {int(e['previews'])} preview round(s), and about "
             f"**{e['memory_gib']:.1f} GiB** of {'GPU ' if cuda else ''}memory."]
    if cuda:
        lines.append("Computed from a formula fitted to H100 speeds; consumer GPUs take 2-5x longer.")
    elif family != "tiny":
        lines.append("A full-size model on a CPU is not practical: use a CUDA GPU, or the `demo` base to try the app.")
    else:
        lines.append("Computed from a formula, not measured on this machine.")
    if cuda and e["memory_gib"] > torch.cuda.get_device_properties(0).total_memory / 1024**3:
        lines.append("**This will not fit in the GPU's memory**: lower the batch size or resolution, or turn on "
                     "gradient checkpointing (Advanced > Performance).")
    return " ".join(lines)
