"""Optimizers over the LoRA parameters and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import importlib.util
import math

import torch

from .config import TrainConfig
from .errors import ConfigError
from .lora import LoRAModule


def lr_factor(schedule, step: int, total: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based) of `total`: warmup, then the curve."""
    warmup = min(schedule.warmup_steps, max(0, total - 1))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    kind = schedule.scheduler
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "cosine_restarts":
        cycle = (progress * schedule.restarts) % 1.0
        return 0.5 * (1.0 + math.cos(math.pi * cycle))
    raise ConfigError(f"schedule.scheduler = {kind!r} is not a known schedule")


def _groups(cfg: TrainConfig, modules: dict[str, LoRAModule]) -> list[dict]:
    unet = [p for n, m in modules.items() if n.startswith("lora_unet") for p in m.parameters() if p.requires_grad]
    text = [p for n, m in modules.items() if n.startswith("lora_te") for p in m.parameters() if p.requires_grad]
    groups = [{"params": unet, "lr": cfg.optim.lr, "initial_lr": cfg.optim.lr}]
    if text:
        lr = cfg.optim.text_encoder_lr
        groups.append({"params": text, "lr": lr, "initial_lr": lr})
    return groups


def make_optimizer(cfg: TrainConfig, modules: dict[str, LoRAModule], device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), or 8-bit AdamW / Prodigy when their packages are installed."""
    o = cfg.optim
    groups = _groups(cfg, modules)
    kw = dict(betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if o.optimizer == "adamw":
        fused = device.type == "cuda"
        return torch.optim.AdamW(groups, fused=fused, foreach=None if fused else True, **kw)
    if o.optimizer == "adamw8bit":
        _require("bitsandbytes", "optim.optimizer = adamw8bit")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    if o.optimizer == "prodigy":
        _require("prodigyopt", "optim.optimizer = prodigy")
        from prodigyopt import Prodigy

        return Prodigy(groups, **kw)
    raise ConfigError(f"optim.optimizer = {o.optimizer!r}: choose adamw, adamw8bit or prodigy")


def _require(package: str, setting: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{setting} needs the '{package}' package, which is not installed. Install it with "
                          f"`pip install {package}`, or choose optim.optimizer = adamw.")
