"""The training loop: `train(cfg, stop, run_dir=...)` yields events while it turns images into a LoRA.

RUN/ holds config.toml, log.jsonl, samples/, checkpoints/, state/ and adapter.safetensors (DESIGN.md).
Randomness of step s comes from generators seeded by (seed, s), so `resume` continues bit-identically.
Under `accelerate launch` every process takes its own micro-batches, gradients are averaged, and only
the main process writes files.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from . import checkpoints as ckpt
from . import kernel_builds, weight_grads
from .attention import attention_kernels
from .batches import Batch, TextCache, TrainData
from .config import TrainConfig, validate
from .errors import TrainingError
from .events import Event, Failed, Finished, Sample, Saved, Started, Step
from .fast_step import (
    GraphedStep,
    StepInputs,
    conv_autotune,
    fast_unet,
    has_compiled_blocks,
    make_capturable,
    prebuilds,
    step_autocast,
    use_graphs,
    weight_grad_stream,
)
from .inject import adapters_off, inject, lora_parameters
from .lora import LoRAModule
from .models import LoadedModel, load_model
from .optim import lr_factor, make_optimizer
from .parking import Parking
from .sampling import previews, save_png
from .text_ids import encode_ids, encode_text, token_ids
from .working_copy import working_copy

log = logging.getLogger(__name__)
# (what the kernels depend on, batch shape or preview batch) this process has dry-run: its kernels are built
# (Triton keeps them in memory), so a second training in the app does not pay for the dry runs again
_BUILT_AHEAD: set[tuple] = set()


def _kernel_context(cfg: TrainConfig, model: LoadedModel) -> tuple:
    """What the shapes, dtypes and layouts of our kernels' launches depend on besides the batch shape."""
    dtype = next(model.unet.parameters()).dtype
    return cfg.model.base, str(dtype), repr(cfg.performance), cfg.lora.train_text_encoder


def total_steps(cfg: TrainConfig, data: TrainData, world: int = 1) -> int:
    """Optimizer steps of the run: `schedule.steps`, or epochs x batches / (accumulation x processes)."""
    if cfg.schedule.epochs > 0:
        per_step = cfg.optim.grad_accum * world
        return max(1, math.ceil(cfg.schedule.epochs * data.batches_per_epoch / per_step))
    return cfg.schedule.steps


def _accelerator(cfg: TrainConfig) -> Accelerator:
    dev = cfg.performance.device
    cpu = dev == "cpu" or (dev == "auto" and not torch.cuda.is_available())
    mp = cfg.performance.mixed_precision
    if mp == "auto":
        mp = "no" if cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps its state per process; one app process runs many trainings, each with its own
        # device and precision, so a single-process run starts from a clean state.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision="no" if cpu else mp)


def _setup_model(cfg: TrainConfig, acc: Accelerator) -> tuple[LoadedModel, dict]:
    model = load_model(cfg.model.base, device=acc.device)
    if acc.mixed_precision in ("bf16", "fp16"):  # frozen base in the compute dtype, LoRA stays fp32
        model.pipe.to(dtype=torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float16)
    if cfg.model.prediction_type != "auto":
        model.prediction_type = cfg.model.prediction_type
    torch.manual_seed(cfg.schedule.seed)  # LoRA init: the same on every process
    lo = cfg.lora
    modules = inject(model.unet, model.text_encoders, model.family, targets=lo.targets, rank=lo.rank,
                     alpha=lo.alpha, dropout=lo.dropout, text_encoder=lo.train_text_encoder,
                     conv_rank=lo.conv_rank or None, conv_alpha=lo.conv_alpha or None)
    for m in modules.values():
        m.fused = cfg.performance.fused_lora
    if cfg.performance.gradient_checkpointing:  # with prebuild_kernels, a checkpoint whose dry run notes its
        noting = prebuilds(cfg, acc.device) and cfg.performance.compile != "on"  # recomputation's launches
        model.unet.enable_gradient_checkpointing(kernel_builds.checkpoint if noting else None)
        for te in model.text_encoders if lo.train_text_encoder else []:
            te.gradient_checkpointing_enable()
    model.unet.train()
    for te in model.text_encoders:
        te.train(lo.train_text_encoder)
    return model, modules


def _inputs(model: LoadedModel, sched, cfg: TrainConfig, batch: Batch, text, gen: torch.Generator,
            modules: dict[str, LoRAModule], preserve: list[bool]) -> StepInputs:
    """Everything random or data-dependent in a step: noise, timesteps, embeddings, target, loss weights.

    Samples flagged in `preserve` get an empty caption and the base model's own prediction as target.
    """
    lat = batch.latents
    noise = torch.randn(lat.shape, generator=gen, device=lat.device)
    if cfg.optim.noise_offset > 0:
        noise += cfg.optim.noise_offset * torch.randn((*lat.shape[:2], 1, 1), generator=gen, device=lat.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=gen, device=lat.device)
    noisy = sched.add_noise(lat, noise, t)
    captions = ["" if p else c for c, p in zip(batch.captions, preserve, strict=True)]
    ids = token_ids(model, captions, lat.device) if cfg.lora.train_text_encoder else None
    embeds, pooled = (None, None) if ids else text(captions)  # a trained encoder runs inside the step
    target = noise if model.prediction_type == "epsilon" else sched.get_velocity(lat, noise, t)
    if any(preserve):
        keep = torch.tensor(preserve, device=lat.device)
        target = target.clone()
        target[keep] = _base_prediction(model, modules, text, noisy[keep], t[keep], batch, keep)
    weight = _snr_weight(sched, t, cfg.optim.min_snr_gamma, model.prediction_type) if cfg.optim.min_snr_gamma > 0 \
        else torch.ones(len(t), device=lat.device)
    dtype = model.unet.dtype
    return StepInputs(noisy.to(dtype), t, None if embeds is None else embeds.to(dtype), target, weight, pooled,
                      batch.time_ids if model.family == "sdxl" else None, *(ids or [None]))


def _loss(model: LoadedModel, unet, x: StepInputs, clip_skip: int = 1) -> torch.Tensor:
    """Diffusion loss of one micro-batch: encode the captions if the text encoder is trained, predict with
    `unet` (maybe compiled), weighted MSE."""
    embeds, pooled = x.embeds, x.pooled
    if embeds is None:
        embeds, pooled = encode_ids(model, [i for i in (x.ids, x.ids_2) if i is not None], clip_skip)
        embeds = embeds.to(model.unet.dtype)
    pred = unet(x.noisy, x.t, embeds, **_sdxl_kwargs(model, pooled, x.time_ids)).sample.float()
    loss = F.mse_loss(pred, x.target, reduction="none").mean(dim=(1, 2, 3))
    return (loss * x.weight).mean()


def _sdxl_kwargs(model: LoadedModel, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict:
    if model.family != "sdxl":
        return {}
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


@torch.no_grad()
def _base_prediction(model: LoadedModel, modules: dict[str, LoRAModule], text, noisy: torch.Tensor,
                     t: torch.Tensor, batch: Batch, keep: torch.Tensor) -> torch.Tensor:
    """The frozen base model's prediction for an empty caption: the target of uncond preservation."""
    with adapters_off(modules):
        embeds, pooled = text([""] * len(t))
        time_ids = None if batch.time_ids is None else batch.time_ids[keep]
        dtype = model.unet.dtype
        return model.unet(noisy.to(dtype), t, embeds.to(dtype), **_sdxl_kwargs(model, pooled, time_ids)).sample.float()


def _snr_weight(sched, t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    ac = sched.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac)
    return torch.clamp(snr, max=gamma) / (snr + 1 if prediction == "v_prediction" else snr)


def _step_rng(cfg: TrainConfig, step: int, rank: int, device: torch.device) -> tuple[random.Random, torch.Generator]:
    seed = (cfg.schedule.seed * 1_000_003 + step) * 64 + rank
    torch.manual_seed(seed)  # LoRA dropout draws from the global generator
    return random.Random(seed), torch.Generator(device=device).manual_seed(seed)


def _text_and_parking(cfg: TrainConfig, model: LoadedModel, data: TrainData, device: torch.device):
    """The step's text encoding, and the frozen parts that wait in CPU memory while training on a GPU."""
    if cfg.lora.train_text_encoder:
        parking = Parking(model, device, vae=cfg.data.cache_latents, text=False)
        parking.park()
        return (lambda caps: encode_text(model, caps, cfg.model.clip_skip)), parking
    static = not cfg.data.shuffle_tags  # every step's caption is an item's caption or ""
    parking = Parking(model, device, vae=cfg.data.cache_latents, text=static)
    text = TextCache(model, cfg.model.clip_skip, before_encode=parking.unpark)
    captions = list(dict.fromkeys([item.caption for item in data.items] + [""])) if static else []
    for i in range(0, len(captions), 64):
        text(captions[i:i + 64])
    parking.park()
    return text, parking


def _previews(step: int, run: Path, cfg: TrainConfig, model: LoadedModel, modules: dict) -> Sample:
    s = cfg.sampling
    prompts = s.prompts
    # graphed sampling UNet unless graphs are switched off; a compiled training UNet is left as it was
    # (tests/test_graphed_unet.py: previews recompile nothing); blocks compiled in place stay eager
    graphs = cfg.performance.cuda_graphs != "off" and not has_compiled_blocks(model.unet)
    pics = previews(model, modules, prompts, s.scales, seed=s.seed, steps=s.steps, guidance=s.cfg,
                    size=s.size or cfg.data.resolution, negative=s.negative_prompt, graphs=graphs,
                    attention=cfg.performance.attention, compiled=s.compile and graphs,
                    working_copy=cfg.performance.adapter_copy, nhwc_norms=cfg.performance.nhwc_norms)
    paths = []
    for i, (_, scale, img) in enumerate(pics):
        paths.append(str(save_png(img, run / "samples" / f"step-{step:06d}-p{i % len(prompts)}-w{scale:g}.png")))
    return Sample(step, paths, [p for p, _, _ in pics], [sc for _, sc, _ in pics])


def _prebuild_previews(cfg: TrainConfig, model: LoadedModel, modules: dict, device: torch.device) -> None:
    """Build the previews' Triton kernels all at once (kernel_builds.py) from a dry run of a one-step preview
    without CUDA graphs, whose images are dropped."""
    s, start, built = cfg.sampling, time.perf_counter(), 0
    size = s.size or cfg.data.resolution
    key = (_kernel_context(cfg, model), "previews", size, len(s.prompts), tuple(s.scales), s.cfg,
           bool(s.negative_prompt))
    if key in _BUILT_AHEAD:
        return
    try:
        gpus = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus), kernel_builds.recording() as records, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # unwritten outputs make NaN pixels
            previews(model, modules, s.prompts, s.scales, seed=s.seed, steps=1, guidance=s.cfg,
                     size=size, negative=s.negative_prompt, graphs=False,
                     attention=cfg.performance.attention, working_copy=cfg.performance.adapter_copy,
                     nhwc_norms=cfg.performance.nhwc_norms)
        built = kernel_builds.build(records, device)
        _BUILT_AHEAD.add(key)
    except Exception as e:  # out of memory too: each kernel is then built at its first launch, as without the
        log.warning("the previews' GPU kernels could not be built ahead: %s", e)  # dry run, and the preview decides
    if device.type == "cuda":  # the sampling graphs' pool can't reuse the dry run's memory
        torch.cuda.empty_cache()
    log.info("kernels of %d distinct launches built ahead of the first preview in %.1f s", built,
             time.perf_counter() - start)


def _write_failed(error: Exception, run: Path) -> str:
    if isinstance(error, TrainingError):  # already says what was kept and how to resume
        return str(error)
    return (f"Could not write to '{run}': {error.strerror or error}. Files already saved are intact (every "
            "file is written to a temporary name first). Free some disk space, then continue with "
            f"`lora-studio train --resume {run}` or the Resume button.")


def _read_losses(pending: list, acc: Accelerator) -> list[tuple[int, float, float]]:
    """(step, loss, lr) of the pending steps, read back from the device in one transfer."""
    losses = torch.stack([loss for _, loss, _ in pending])
    if acc.num_processes > 1:
        losses = acc.reduce(losses, "mean")
    return [(s, v, lr) for (s, _, lr), v in zip(pending, losses.float().cpu().tolist(), strict=True)]


class Stepper:
    """One optimizer step: micro-batches forward and backward, gradient averaging, clipping, update.

    On a GPU the whole step can run as a CUDA graph (lora_core/fast_step.py); the inputs are made by the
    same code either way, so both paths train the same model.
    """

    def __init__(self, cfg: TrainConfig, model: LoadedModel, modules: dict, data: TrainData, text,
                 opt: torch.optim.Optimizer, acc: Accelerator, total: int, start: int = 0) -> None:
        self.cfg, self.model, self.data, self.text, self.opt, self.acc = cfg, model, data, text, opt, acc
        self.params, self.modules = lora_parameters(modules), modules
        graphs = use_graphs(cfg, acc.num_processes, acc.device)
        self.unet = fast_unet(cfg, model, acc.device, total - start, graphs)
        self.sched = model.noise_scheduler()
        self.sched.alphas_cumprod = self.sched.alphas_cumprod.to(acc.device)
        self.work = working_copy(modules.values(), acc.mixed_precision, cfg.performance.adapter_copy)
        self.graphed = GraphedStep(self._update, opt) if graphs else None
        self.side_grads = weight_grad_stream(cfg.performance.weight_grad_stream, acc.device, graphs)
        if self.side_grads:
            log.info("the adapters' weight gradients are computed on a second CUDA stream")
        if graphs:
            make_capturable(opt)
        # a compiled UNet does not take the kernels (torch.compile fuses the norms itself)
        self.prebuild = (prebuilds(cfg, acc.device) and kernel_builds.available() and self.unet is model.unet
                         and not has_compiled_blocks(model.unet))
        self.prebuilt: set[tuple] = set()  # batch shapes whose kernels were built ahead
        self.previews_ahead = self.prebuild  # the previews' kernels still to build ahead, before the first
        self.context = _kernel_context(cfg, model) if self.prebuild else ()
        self.start, self.total = start, total

    def set_lr(self, step: int, total: int) -> float:
        factor = lr_factor(self.cfg.schedule, step, total)
        for group in self.opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(group["initial_lr"] * factor)
            else:
                group["lr"] = group["initial_lr"] * factor
        return self.opt.param_groups[0]["initial_lr"] * factor

    def _micro(self, index: int) -> StepInputs:
        acc = self.acc
        rng, gen = _step_rng(self.cfg, index, acc.process_index, acc.device)
        batch = self.data.batch(index * acc.num_processes + acc.process_index, rng)
        share = self.cfg.optim.uncond_preservation
        preserve = [rng.random() < share if share else False for _ in batch.captions]
        with acc.autocast():
            return _inputs(self.model, self.sched, self.cfg, batch, self.text, gen, self.modules, preserve)

    def _update(self, x: StepInputs) -> torch.Tensor:
        """Forward, backward, clipping and the optimizer update of a one-micro-batch step (graph-safe)."""
        with self._adapter_copy():
            with step_autocast(self.acc):
                loss = _loss(self.model, self.unet, x, self.cfg.model.clip_skip)
            with weight_grads.on_side_stream(self.acc.device, self.side_grads):
                loss.backward()
        self._gradients_back()
        if self.cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm, foreach=True)
        self.opt.step()
        return loss.detach()

    def _prebuild(self, x: StepInputs) -> None:
        """Build the Triton kernels that steps of `x`'s batch shape launch, all at once (kernel_builds.py), and at
        the first step those of every other batch shape of the run's buckets too, from dry runs of their
        forward and backward that change nothing: no update, their gradients dropped, the random state
        restored."""
        if not self.prebuild or x.key() in self.prebuilt:
            return
        todo = [x] + ([] if self.prebuilt else self._bucket_inputs(x))
        self.prebuilt.update(y.key() for y in todo)  # tried once each, whatever comes of it
        todo = [y for y in todo if (self.context, y.key()) not in _BUILT_AHEAD]  # not by an earlier run either
        if not todo:
            return
        start, built, done = time.perf_counter(), 0, 0
        saved = [p.grad for p in self.params]  # earlier micro-batches' gradients, kept out of the dry run's way
        for p in self.params:
            p.grad = None
        try:
            gpus = [self.acc.device] if self.acc.device.type == "cuda" else []
            with torch.random.fork_rng(devices=gpus), kernel_builds.recording() as records:
                for y in todo:
                    try:
                        self._dry_step(y)
                        done += 1
                        _BUILT_AHEAD.add((self.context, y.key()))
                    except torch.cuda.OutOfMemoryError:
                        log.error("a dry run of batch shape %s ran out of GPU memory, as its training step would",
                                  tuple(y.noisy.shape))
                        raise
                    except Exception as e:  # its kernels are built at their first launch, as without it
                        log.warning("no dry run for batch shape %s: %s", tuple(y.noisy.shape), e)
            built = self._build(records)
        finally:
            for p, g in zip(self.params, saved, strict=True):
                p.grad = g
            for c in self.work.copies if self.work else []:
                c.grad = None
            if self.acc.device.type == "cuda":  # the graphs' pool and side stream can't reuse the dry run's
                torch.cuda.empty_cache()
        log.info("kernels of %d distinct launches built ahead for %d of %d batch shape(s) in %.1f s", built, done,
                 len(todo), time.perf_counter() - start)

    def before_preview(self) -> None:
        """Build the previews' kernels ahead once, before the first preview this process draws (at step 0, or
        later in a resumed run)."""
        if self.previews_ahead:
            self.previews_ahead = False
            _prebuild_previews(self.cfg, self.model, self.modules, self.acc.device)

    def _build(self, records: list) -> int:
        try:
            return kernel_builds.build(records, self.acc.device)
        except Exception as e:  # then each kernel is built at its first launch, as without the dry run
            log.warning("the GPU kernels could not be built ahead of the first step: %s", e)
            return 0

    def _dry_step(self, x: StepInputs) -> None:
        autocast = step_autocast(self.acc) if self.graphed else self.acc.autocast()  # the real step's
        with self._adapter_copy():
            with autocast:
                loss = _loss(self.model, self.unet, x, self.cfg.model.clip_skip)
            loss.backward()

    def _bucket_inputs(self, x: StepInputs) -> list[StepInputs]:
        """Stand-in inputs for the other batch shapes of the micro-batches this process will train on
        (data.batch_shapes), distinct from `x`'s."""
        scale, world, accum = self.model.pipe.vae_scale_factor, self.acc.num_processes, self.cfg.optim.grad_accum
        indices = (i * world + self.acc.process_index for i in range(self.start * accum, self.total * accum))
        shapes = {(n, h // scale, w // scale) for n, h, w in self.data.batch_shapes(indices)}
        shapes.discard((x.noisy.shape[0], *x.noisy.shape[2:]))
        return [x.resized(*shape) for shape in sorted(shapes)]

    def _adapter_copy(self) -> contextlib.AbstractContextManager:
        return self.work.active() if self.work else contextlib.nullcontext()

    def _gradients_back(self) -> None:
        if self.work:
            self.work.gradients_back()

    def step(self, step: int) -> torch.Tensor:
        """Run optimizer step `step` (0-based); returns its mean loss as a device tensor (no host sync)."""
        perf = self.cfg.performance
        with attention_kernels(perf.attention, self.acc.device), conv_autotune(perf.cudnn_benchmark):
            return self._step(step)

    def _step(self, step: int) -> torch.Tensor:
        cfg, acc, accum = self.cfg, self.acc, self.cfg.optim.grad_accum
        if self.graphed:
            x = self._micro(step)
            self._prebuild(x)
            return self.graphed(x)
        loss_sum = torch.zeros((), device=acc.device)
        for micro in range(accum):
            x = self._micro(step * accum + micro)
            self._prebuild(x)
            with self._adapter_copy():
                with acc.autocast():
                    loss = _loss(self.model, self.unet, x, cfg.model.clip_skip) / accum
                with weight_grads.on_side_stream(acc.device, self.side_grads):
                    loss.backward()
            self._gradients_back()
            loss_sum += loss.detach()
        ckpt.average_gradients(acc, self.params)
        if cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.max_grad_norm, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss_sum


def train(cfg: TrainConfig, stop: threading.Event | None = None, *, run_dir: str | Path,
          resume: bool = False) -> Iterator[Event]:
    """Train a LoRA as `cfg` says, writing the run into `run_dir`; yields Started, Step, Sample, Saved,
    and finally Finished or Failed."""
    validate(cfg)
    cfg = copy.deepcopy(cfg)  # the run fills in defaults (preview prompts); the caller's object stays as given
    stop = stop or threading.Event()
    acc = _accelerator(cfg)
    run = Path(run_dir)
    main = acc.is_main_process
    if main:
        ckpt.prepare_run_dir(run, cfg, resume)
    model, modules = _setup_model(cfg, acc)
    data = TrainData(cfg, model, acc.device, run / "cache")
    if not cfg.sampling.enabled:
        cfg.sampling.prompts, cfg.sampling.every = [], 0
    elif not cfg.sampling.prompts:
        cfg.sampling.prompts = [data.items[0].caption]
    data.warm_cache()
    text, parking = _text_and_parking(cfg, model, data, acc.device)
    opt = make_optimizer(cfg, modules, acc.device)
    total = total_steps(cfg, data, acc.num_processes)
    step = ckpt.load_state(run, modules, opt) if resume else 0
    logger = ckpt.EventLog(run / "log.jsonl") if main else None

    def emit(event: Event) -> Event:
        if logger:
            try:
                logger.write(event)
            except OSError as e:  # a full disk must not hide the event from the UI or the CLI
                log.warning("could not append to %s: %s", logger.path, e)
        return event

    yield emit(Started(str(run), total, step, len(data.items), str(acc.device), cfg.to_dict()))
    # before any preview: the step's UNet layout (channels-last) is then the one every preview sees, so
    # sampling graphs (and a compiled sampling UNet) are made once per kind of preview batch
    stepper = Stepper(cfg, model, modules, data, text, opt, acc, total, step)
    if main and step == 0 and cfg.sampling.prompts:
        with parking.back():
            stepper.before_preview()
            sample = _previews(0, run, cfg, model, modules)
        yield emit(sample)
    t0, last_good, seen, start, pending = time.perf_counter(), "", 0, step, []
    every = 1 if acc.device.type == "cpu" else max(1, cfg.performance.log_every)  # loss read-backs sync the GPU
    try:
        while step < total and not stop.is_set():
            lr = stepper.set_lr(step, total)
            pending.append((step + 1, stepper.step(step), lr))
            step += 1
            seen += cfg.schedule.batch_size * cfg.optim.grad_accum * acc.num_processes
            preview = main and cfg.sampling.every and step % cfg.sampling.every == 0 and step < total
            save = main and cfg.saving.every and step % cfg.saving.every == 0 and step < total
            if len(pending) >= every or preview or save or step == total or stop.is_set():
                elapsed = time.perf_counter() - t0
                rate, eta = seen / elapsed, elapsed / (step - start) * (total - step)
                for s, loss, lr_s in _read_losses(pending, acc):
                    if not math.isfinite(loss):
                        yield emit(Failed(s, f"The loss became {loss} at step {s}: training diverged. Lower the "
                                          "learning rate (optim.lr) or turn on gradient clipping "
                                          "(optim.max_grad_norm). The last good checkpoint is kept.", last_good))
                        return
                    yield emit(Step(s, loss, lr_s, round(rate, 3), round(eta, 1)))
                pending = []
            if preview:
                with parking.back():
                    stepper.before_preview()
                    sample = _previews(step, run, cfg, model, modules)
                yield emit(sample)
            if save:
                last_good = ckpt.save_checkpoint(run, cfg, model, modules, opt, step, data)
                yield emit(Saved(step, last_good))
    except torch.cuda.OutOfMemoryError:
        del stepper
        torch.cuda.empty_cache()
        yield emit(Failed(step, ckpt.OOM_ADVICE, last_good))
        return
    except (OSError, TrainingError) as e:  # a full disk or a vanished folder while saving
        yield emit(Failed(step, _write_failed(e, run), last_good))
        return
    stopped, final = step < total, str(run / "adapter.safetensors")
    if main:
        try:
            ckpt.save_final(run, cfg, model, modules, opt, step, data)
        except (OSError, TrainingError) as e:
            yield emit(Failed(step, _write_failed(e, run), last_good))
            return
        yield emit(Saved(step, final, final=True))
        if cfg.sampling.prompts and not stopped:
            with parking.back():
                stepper.before_preview()
                sample = _previews(step, run, cfg, model, modules)
            yield emit(sample)
    acc.wait_for_everyone()
    done = Finished(step, final, stopped=stopped, seconds=round(time.perf_counter() - t0, 2),
                    digest=ckpt.weights_digest(modules))
    yield emit(done) if main else done  # every process reports its weights' digest; only rank 0 logs
