"""Images from a base model with adapters at chosen weights: previews while training, and generation.

Every image is drawn with a fixed seed, so the same prompt at weight 0 gives exactly the base model's
image and a scale sweep shows only the adapter's effect.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image

from .attention import attention_kernels
from .errors import AdapterError
from .export import Adapter, LayerWeights, apply_adapter, check_fits, load_adapter
from .fused_projections import assembled
from .geglu import use_fused_geglu
from .graphed_unet import graphed
from .half_norms import use_half_norms
from .inject import remove, set_multiplier, set_per_image
from .lean_resnet import use_lean_resnets
from .lean_transformer import use_lean_transformers
from .lora import LoRAModule
from .models import LoadedModel, load_model
from .nhwc_norm import keep_channels_last, use_nhwc_norms
from .working_copy import WorkingCopy

log = logging.getLogger(__name__)

_models: dict[tuple[str, str], LoadedModel] = {}
PREVIEW_BATCH_PIXELS = 4 * 512 * 512  # preview images per call on a GPU: 4 at 512 px, 1 at 1024 px
_lock = threading.Lock()  # one generation at a time per process: pipelines are not re-entrant


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cached_model(base: str, device: str = "auto") -> LoadedModel:
    """Load a base model once per process and keep it (the UI generates many times)."""
    dev = pick_device(device)
    key = (base, str(dev))
    if key not in _models:
        model = load_model(base, device=dev)
        if dev.type == "cuda":
            model.pipe.to(dtype=torch.bfloat16)
            model.unet.to(memory_format=torch.channels_last)  # cuDNN's layout: ~10% faster sampling
            use_half_norms(model.unet, nhwc=True, rows=True)  # GroupNorms that keep it (nhwc_norm.py), LayerNorm kernels
            keep_channels_last(model.unet)
            use_fused_geglu(model.unet)  # one kernel for the feed-forward's gate (lora_core/geglu.py)
            use_lean_resnets(model.unet)  # fewer passes per ResNet block (lora_core/lean_resnet.py)
            use_lean_transformers(model.unet)  # residual sums inside the LayerNorms (lean_transformer.py)
        _models.clear()  # keep one base in memory
        _models[key] = model
    return _models[key]


@torch.no_grad()
def draw(model: LoadedModel, prompts: Sequence[str], *, seed: int = 0, steps: int = 20, guidance: float = 7.0,
         size: int | tuple[int, int] | None = None, negative: str = "", graphs: bool = True,
         attention: str = "auto", seeds: Sequence[int] | None = None, batch: int = 1,
         compiled: bool = False, nhwc_norms: bool = True) -> list[Image.Image]:
    """One image per prompt with the model as it is now (adapters at their current multipliers), image i
    from seed `seeds[i]` (default seed + i), `batch` images per pipeline call. On a GPU the UNet is replayed
    from CUDA graphs unless `graphs` is False, recorded from a torch.compile of it if `compiled`.
    `attention`: lora_core/attention.py. `nhwc_norms`: the VAE's GroupNorms take lora_core/nhwc_norm.py's
    kernels (`performance.nhwc_norms`)."""
    w, h = (size, size) if isinstance(size, int) else (size or (model.resolution, model.resolution))
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    images = []
    if nhwc_norms and model.unet.device.type == "cuda" and not model.pipe.vae.__dict__.get("_nhwc_norms"):
        model.pipe.vae.__dict__["_nhwc_norms"] = use_nhwc_norms(model.pipe.vae)  # a faster decode, the same maths
    replay = graphed(model.unet, compiled) if graphs and model.unet.device.type == "cuda" else nullcontext()
    with replay, attention_kernels(attention, model.unet.device):
        for i in range(0, len(prompts), batch):
            part = list(prompts[i:i + batch])
            gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[i:i + batch]]
            out = model.pipe(prompt=part, negative_prompt=[negative] * len(part) if negative else None,
                             num_inference_steps=steps, guidance_scale=guidance, width=w, height=h,
                             generator=gens, output_type="pil")
            images += out.images
    return images


def preview_batch(model: LoadedModel, size: int | tuple[int, int] | None) -> int:
    """Images per pipeline call in previews: batching fills a GPU that one 512 px image leaves idle
    (bench/RESULTS.md); on a CPU it only costs memory."""
    if model.unet.device.type != "cuda":
        return 1
    w, h = (size, size) if isinstance(size, int) else (size or (model.resolution, model.resolution))
    return max(1, PREVIEW_BATCH_PIXELS // (w * h))


def previews(model: LoadedModel, modules: dict[str, LoRAModule], prompts: Sequence[str],
             scales: Sequence[float], *, seed: int = 0, batch: int | None = None, merge: bool = False,
             working_copy: bool = True, **kw: object) -> list[tuple[str, float, Image.Image]]:
    """Preview images of every prompt at each multiplier in `scales` (prompt i from seed + i at every
    scale), drawn `batch` at a time (default: preview_batch), each image with its own multiplier; the
    training multiplier (1) is restored after. With `merge`, a batch at one non-zero weight is drawn with
    the adapters merged into the base weights (unmerging restores them exactly). Off by default: on a GPU
    0-8% faster (bench/RESULTS.md), but a bf16 weight drops every part of the adapter's change smaller
    than half its rounding step, so an early preview would under-show what the adapter has learned.
    `working_copy`: on a half-precision GPU model, compute with `_sampling_copy`'s copies of the adapters."""
    roots = [model.unet, *model.text_encoders]
    was_training = [r.training for r in roots]
    for r in roots:
        r.eval()
    jobs = [(i, p, s) for s in scales for i, p in enumerate(prompts)]
    batch = batch or preview_batch(model, kw.get("size"))  # type: ignore[arg-type]
    out = []
    try:
        copy = _sampling_copy(model.unet, modules) if working_copy else None
        for k in range(0, len(jobs), batch):
            part = jobs[k:k + batch]
            weights = [s for _, _, s in part]
            if len(set(weights)) == 1:  # one weight for all: the plain path (weight 0 skips the adapters)
                set_per_image(modules, None)
                set_multiplier(modules, weights[0])
                if merge and weights[0] != 0:
                    _merge(modules)
            else:
                set_per_image(modules, weights)
            with copy.active() if copy else nullcontext(), assembled(model.unet) if copy else nullcontext():
                pics = draw(model, [p for _, p, _ in part], seeds=[seed + i for i, _, _ in part], batch=batch, **kw)
            out += [(p, s, img) for (_, p, s), img in zip(part, pics, strict=True)]
    finally:
        set_per_image(modules, None)
        set_multiplier(modules, 1.0)
        for r, t in zip(roots, was_training, strict=True):
            r.train(t)
    return out


def _sampling_copy(unet: torch.nn.Module, modules: dict[str, LoRAModule]) -> WorkingCopy | None:
    """Half-precision copies of a half-precision GPU UNet's trained fp32 adapters for previews, refreshed at
    each preview: one multi-tensor cast instead of two casts in every adapted layer at every denoising
    step. Kept on the UNet, so the sampling graphs read the same storage at every preview."""
    if unet.device.type != "cuda" or unet.dtype not in (torch.bfloat16, torch.float16):
        return None
    copy = unet.__dict__.get("_sampling_copy")
    wanted = [m for m in modules.values() if m.lora_down.weight.requires_grad]
    if copy is None or [id(m) for m in copy.modules] != [id(m) for m in wanted] or copy.dtype != unet.dtype:
        copy = unet.__dict__["_sampling_copy"] = WorkingCopy(wanted, unet.dtype)
    return copy if copy.modules else None


def _merge(modules: dict[str, LoRAModule]) -> None:
    """Merge every adapter at its multiplier; if one will not merge (non-finite weights), none is."""
    try:
        for m in modules.values():
            m.merge()
    except AdapterError as e:
        log.warning("preview drawn with the adapters unmerged: %s", e)
        for m in modules.values():
            m.unmerge()


def generate(base: str | LoadedModel, prompts: Sequence[str], *, loras: Sequence[tuple[str, float]] = (),
             negative: str = "", seed: int = 0, steps: int = 20, size: int | tuple[int, int] | None = None, guidance: float = 7.0,
             device: str = "auto") -> list[Image.Image]:
    """Images from `base` with each adapter file applied at its weight (weight 0 = the base image)."""
    with _lock:
        model = cached_model(base, device) if isinstance(base, str) else base
        active = [(load_adapter(path, model), w) for path, w in loras if w != 0]  # weight 0: not applied
        for adapter, _ in active:
            check_fits(adapter, model)
        try:
            if active:
                apply_adapter(model, combine(active), 1.0)
            return draw(model, prompts, seed=seed, steps=steps, guidance=guidance, size=size, negative=negative)
        finally:
            remove(model.unet, *model.text_encoders)


def combine(adapters: Sequence[tuple[Adapter, float]]) -> Adapter:
    """Several weighted adapters as one, exactly: per layer, downs and scaled ups concatenated along rank."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for adapter, weight in adapters:
        for name, lw in adapter.layers.items():
            scale = weight * lw.alpha / lw.rank
            parts.setdefault(name, []).append((lw.down, lw.up * scale))
    layers = {}
    for name, pairs in parts.items():
        down = torch.cat([d for d, _ in pairs], 0)
        up = torch.cat([u for _, u in pairs], 1)
        layers[name] = LayerWeights(down, up, float(down.shape[0]))  # alpha = rank: scale 1
    first = adapters[0][0]
    return Adapter(first.path, first.format, layers, first.metadata)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (temp file, then rename)."""
    import io

    from .export import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
