"""The whole optimizer step replayed as one CUDA graph: UNet forward, loss, backward, clipping, AdamW.

At small batch sizes an SD step launches thousands of short kernels and the GPU waits on the host
between them. Capturing the complete step (not only the UNet) removes that wait without a compile.

The host still does everything random or data-dependent outside the graph (batch assembly, noise,
timesteps, text embeddings, the preservation target), with the same code as the eager step, and copies
the results into the graph's static inputs; so a graphed run draws exactly what an eager run draws.
Each batch shape gets its own graph after WARMUP eager steps of that shape; the graphs share one memory
pool, which is safe because they are replayed one at a time and keep nothing in the pool between
replays except their own loss, which is copied out at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from . import low_rank, nhwc_norm
from .fused_projections import fuse_projections
from .geglu import use_fused_geglu
from .half_norms import HALF, use_half_norms
from .lean_resnet import use_lean_resnets
from .lean_transformer import use_lean_transformers
from .lora import LoRAModule

if TYPE_CHECKING:
    from .config import TrainConfig
    from .models import LoadedModel

log = logging.getLogger(__name__)

WARMUP = 2  # eager steps of a new batch shape before it is captured (allocator, cuBLAS and autotune warm-up)
MAX_GRAPHS = 8  # more distinct batch shapes than this run eagerly


@dataclass
class StepInputs:
    """Everything the graphed part of a step reads; made on the host side by the same code for both paths."""

    noisy: torch.Tensor
    t: torch.Tensor
    embeds: torch.Tensor | None  # None when the text encoder is trained: the step encodes `ids` itself
    target: torch.Tensor
    weight: torch.Tensor  # per-sample loss weight (min-SNR), ones when off
    pooled: torch.Tensor | None = None  # SDXL
    time_ids: torch.Tensor | None = None  # SDXL
    ids: torch.Tensor | None = None  # token ids of a trained text encoder
    ids_2: torch.Tensor | None = None  # and of SDXL's second one

    def key(self) -> tuple:
        return tuple(tuple(getattr(self, f.name).shape) for f in fields(self) if getattr(self, f.name) is not None)

    def clone(self) -> StepInputs:
        return StepInputs(**{f.name: None if (v := getattr(self, f.name)) is None else v.detach().clone()
                             for f in fields(self)})

    def resized(self, n: int, height: int, width: int) -> StepInputs:
        """Inputs of the same kinds, dtypes and layouts for `n` latents of `height` x `width`, their values of
        no meaning (a dry run's: kernel_builds.py)."""
        def one(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if name in ("noisy", "target"):
                return t.new_zeros(n, t.shape[1], height, width)
            return t[:1].expand(n, *t.shape[1:]).contiguous()

        return StepInputs(**{f.name: one(f.name, getattr(self, f.name)) for f in fields(self)})

    def copy_from(self, other: StepInputs) -> None:
        for f in fields(self):
            if (mine := getattr(self, f.name)) is not None:
                mine.copy_(getattr(other, f.name), non_blocking=True)


class GraphedStep:
    """Calls `compute(inputs) -> loss` (forward, backward and optimizer update) eagerly for the first
    WARMUP steps of each batch shape, then captures it and replays the graph."""

    def __init__(self, compute: Callable[[StepInputs], torch.Tensor], opt: torch.optim.Optimizer) -> None:
        self.compute, self.opt = compute, opt
        self.seen: Counter[tuple] = Counter()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, StepInputs, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream()

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        key = inputs.key()
        if key in self.graphs:
            graph, static, loss = self.graphs[key]
            static.copy_from(inputs)
            graph.replay()
            return loss.clone()
        self.seen[key] += 1
        if self.seen[key] <= WARMUP or len(self.graphs) >= MAX_GRAPHS:
            return self._eager(inputs)
        return self._capture(key, inputs)

    def _eager(self, inputs: StepInputs) -> torch.Tensor:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self.opt.zero_grad(set_to_none=True)  # gradients may still point into a graph's memory
            loss = self.compute(inputs)
            self.opt.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(self.side)
        return loss

    def _capture(self, key: tuple, inputs: StepInputs) -> torch.Tensor:
        log.info("capturing the training step for batch shape %s as a CUDA graph", key[0])
        static = inputs.clone()
        self.opt.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients it then reads
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self.compute(static)
        self.graphs[key] = (graph, static, loss)
        graph.replay()  # capturing records without running: this is the step itself
        return loss.clone()


# `compile = auto` compiles when the time it saves exceeds the compile (132-153 s for SD1.5 on a fresh H200,
# 173 s on an H100). Measured (bench/RESULTS.md): the graphed step with channels-last GroupNorm and the fused
# GEGLU takes 15.4 ms at SD1.5 batch 1 and 101.5 ms at batch 16, the compiled one 14.9 and 98.95 ms, so
# compiling saves about 0.5 ms per sample at batch 1 (pays after ~300k samples) and 0.16 ms at batch 16
# (~950k; batches 2-8 are not measured and take the larger threshold). Against an eager step (graphs
# blocked) it saved 83 ms per batch-16 step on the H100, so it pays after ~2000 batches. Gradient
# checkpointing under the compiler is not measured (speed or memory), so `auto` leaves those runs eager.
COMPILE_MIN_SAMPLES_GRAPHED_B1 = 300_000
COMPILE_MIN_SAMPLES_GRAPHED = 1_000_000  # batch 2 and larger
COMPILE_MIN_BATCHES_EAGER = 2000


def compiles(cfg: TrainConfig, device: torch.device, steps: int, graphs: bool) -> bool:
    """Whether the run's UNet is torch.compiled (`performance.compile`): `steps` = optimizer steps still to
    run, `graphs` = whether the step is a CUDA graph."""
    mode = cfg.performance.compile
    if mode != "auto":
        return mode == "on"
    if device.type != "cuda" or cfg.performance.gradient_checkpointing:
        return False
    batches = steps * cfg.optim.grad_accum
    if graphs:
        batch = cfg.schedule.batch_size
        return batches * batch >= (COMPILE_MIN_SAMPLES_GRAPHED_B1 if batch == 1 else COMPILE_MIN_SAMPLES_GRAPHED)
    return batches >= COMPILE_MIN_BATCHES_EAGER


# with PyTorch's GroupNorm (which copies channels-last tensors to NCHW and back), channels-last helps graphed
# steps up to this many latent pixels per batch (batch x (resolution / 8)^2): SD1.5 512 at batch 4, SDXL 1024
# at batch 1 (bench/RESULTS.md)
CHANNELS_LAST_MAX_LATENT = 4 * 64 * 64


def wants_channels_last(cfg: TrainConfig, unet_dtype: torch.dtype, device: torch.device, graphs: bool,
                        compiled: bool) -> bool:
    """`performance.channels_last`: `auto` = for graphed steps, at any batch where GroupNorm keeps the layout
    (`nhwc_norms` on a half-precision base, not compiled), else for small batches only.

    cuDNN's convolutions want NHWC: with NCHW a quarter of a graphed SD1.5 batch-1 step's GPU time went to
    layout conversions. Measured (bench/RESULTS.md): with PyTorch's GroupNorm, SD1.5 +9% at batch 1, +3% at
    batch 4, -8% at batch 16 (SDXL +7% at batch 1, -7% at batch 4); with the layout-keeping norms, SD1.5
    batch 16 +12%. Eager steps wait on the host and gain nothing."""
    perf = cfg.performance
    if perf.channels_last != "auto":
        return perf.channels_last == "on"
    if not graphs:
        return False
    keeps_layout = (perf.half_norms and perf.nhwc_norms and unet_dtype in HALF and not compiled
                    and nhwc_norm.runs_on(device))
    return keeps_layout or cfg.schedule.batch_size * (cfg.data.resolution // 8) ** 2 <= CHANNELS_LAST_MAX_LATENT


def prebuilds(cfg: TrainConfig, device: torch.device) -> bool:
    """`performance.prebuild_kernels`: build the step's Triton kernels ahead of its first run (CUDA only)."""
    return cfg.performance.prebuild_kernels and device.type == "cuda"


def graph_blockers(cfg: TrainConfig, processes: int) -> list[str]:
    """Why the step of this run can't be captured as a CUDA graph (empty when it can)."""
    why = []
    if processes > 1:
        why.append("several processes (gradients are averaged between them)")
    if cfg.optim.grad_accum > 1:
        why.append("optim.grad_accum > 1")
    if cfg.performance.gradient_checkpointing:
        why.append("gradient checkpointing")
    if cfg.lora.dropout > 0:
        why.append("lora.dropout > 0")
    if cfg.optim.optimizer != "adamw":
        why.append(f"optim.optimizer = {cfg.optim.optimizer}")
    return why


def use_graphs(cfg: TrainConfig, processes: int, device: torch.device) -> bool:
    """`performance.cuda_graphs`: `auto` = on a GPU whenever the step can be captured."""
    mode = cfg.performance.cuda_graphs
    if device.type != "cuda" or mode == "off":
        return False
    if why := graph_blockers(cfg, processes):
        level = logging.WARNING if mode == "on" else logging.INFO
        log.log(level, "the training step runs without CUDA graphs (slower): %s", "; ".join(why))
        return False
    return True


def fast_unet(cfg: TrainConfig, model: LoadedModel, device: torch.device, steps: int,
              graphs: bool) -> torch.nn.Module:
    """The UNet callable of the training step: channels-last, half-precision norms and compiled as configured.

    `auto` compiles on CUDA for runs long enough that it pays for itself (`compiles`). Under a graphed
    step the compiled UNet runs inside the captured graph. Previews keep the plain module (replayed from
    CUDA graphs), except for blocks compiled in place (`compile_scope = blocks`).
    """
    perf = cfg.performance
    compiled = compiles(cfg, device, steps, graphs)
    if wants_channels_last(cfg, model.unet.dtype, device, graphs, compiled):
        model.unet.to(memory_format=torch.channels_last)
    if perf.half_norms and model.unet.dtype in HALF:  # a half-precision base means mixed precision is on
        log.info("normalisations run in the compute dtype: %d layers%s",
                 use_half_norms(model.unet, nhwc=perf.nhwc_norms, rows=perf.fast_layer_norm),
                 ", GroupNorm in channels-last where the tensors are" if perf.nhwc_norms and nhwc_norm.available() else "")
        if perf.nhwc_norms:
            nhwc_norm.keep_channels_last(model.unet)
    if perf.fused_geglu and model.unet.dtype in HALF:  # CPU tensors take diffusers' path in the layer
        log.info("feed-forward GEGLU fused into one kernel each way: %d layers", use_fused_geglu(model.unet))
    if perf.lean_resnets:
        log.info("ResNet blocks run without layout copies, divides by 1 or separate bias passes: %d blocks",
                 use_lean_resnets(model.unet))
    low_rank.enable(low_rank_mode(perf.low_rank_kernel, device, graphs))
    if perf.lean_transformers:
        log.info("transformer blocks join their residual sums to the LayerNorms after them (one kernel each way "
                 "where the LayerNorm kernels run): %d blocks", use_lean_transformers(model.unet))
    # kept off for an fp16 base (no loss scaling here): under torch.compile the grouped adapters run as plain
    # autograd, whose weight gradients come out in the compute dtype, where fp32 ones matter
    if perf.fused_projections and model.unet.dtype != torch.float16:
        log.info("attention projections grouped into one product each: %d groups", fuse_projections(model.unet))
    if not compiled:
        if perf.compile == "auto" and device.type == "cuda":
            log.info("the UNet is not compiled: too short a run to win the compile time back "
                     "(`performance.compile = on` compiles it anyway)")
        return model.unet
    plain_adapters(model.unet)
    if perf.compile_scope == "blocks":
        log.info("compiling the UNet's blocks (%d); the first steps are slow", compile_blocks(model.unet))
        return model.unet
    log.info("compiling the UNet; the first steps are slow")
    return torch.compile(model.unet, dynamic=False)


def low_rank_mode(mode: str, device: torch.device, graphs: bool) -> str:
    """`performance.low_rank_kernel`, with `auto` resolved: `gemm` for a graphed step on a GPU (H100: 89.9
    against 91.3-91.6 ms at SD1.5 batch 16, 14.2 against 14.7 ms at batch 1), else `off` (launched from
    Python step by step the Triton kernel loses: 237.7 against 201.1 ms at batch 1 with gradient
    checkpointing, 153.8 against 144.5 ms at batch 16 without graphs; bench/data/gemm*-h100.jsonl)."""
    if mode != "auto":
        return mode
    mode = "gemm" if graphs and device.type == "cuda" else "off"
    log.info("adapter products: %s", "base and adapter in one kernel (graphed step)" if mode == "gemm"
             else "cuBLAS's (the step is not graphed)")
    return mode


def weight_grad_stream(mode: str, device: torch.device, graphs: bool) -> bool:
    """`performance.weight_grad_stream`, with `auto` resolved: on for a graphed step on a GPU."""
    return device.type == "cuda" and (mode == "on" or (mode == "auto" and graphs))


def plain_adapters(unet: torch.nn.Module) -> None:
    """The UNet's adapters take the plain path, which the compiler fuses itself. Through the hand-written
    kernel's old in-place forward a compiled step trained nothing on a GPU with torch 2.11
    (bench/compile_check.py, bench/RESULTS.md). Its out-of-place compiled forward trains correctly on the
    GPU since, but only the plain path's compiled speed is measured (bench/data/compiled-h200.jsonl)."""
    fused = [m for m in unet.modules() if isinstance(m, LoRAModule) and m.fused]
    for m in fused:
        m.fused = False
    if fused:
        log.info("compiled UNet: its %d adapters take the plain path (the compiler fuses it)", len(fused))


BLOCKS = ("Transformer2DModel", "ChannelsLastTransformer2DModel", "ResnetBlock2D", "LeanResnetBlock2D")  # most of an SD UNet's kernels
BLOCK_RECOMPILE_LIMIT = 64  # compiled variants per block class: one per input shape (SDXL has about 20)


def compile_blocks(unet: torch.nn.Module) -> int:
    """Compile each transformer and ResNet block of `unet` in place (regional compilation); returns how
    many. Blocks of one class and input shape share one compiled graph (their weights are graph inputs),
    so compile time grows with the number of distinct shapes, not of blocks. The blocks stay compiled for
    previews too, which compile their own (no-gradient) variants on first use."""
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, BLOCK_RECOMPILE_LIMIT)  # process-wide
    blocks = [m for m in unet.modules() if type(m).__name__ in BLOCKS]
    for m in blocks:
        m.compile(dynamic=False)
    unet.compiled_blocks = len(blocks)
    return len(blocks)


def has_compiled_blocks(unet: torch.nn.Module) -> bool:
    """Whether compile_blocks compiled blocks of `unet` in place (they would then run inside a sampling
    graph, which no test has checked on a GPU yet)."""
    return bool(getattr(unet, "compiled_blocks", 0))


@contextlib.contextmanager
def conv_autotune(on: bool):
    """`performance.cudnn_benchmark`: within the block cuDNN times its convolution algorithms on the first
    call of each shape and keeps the fastest. Off by default: on the H200 the timing cost 11 s at SD1.5
    batch 16 for a gain inside the noise between machines (bench/RESULTS.md)."""
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = was


def make_capturable(opt: torch.optim.Optimizer) -> None:
    """Let AdamW run inside a graph: state and learning rate on the device (the lr tensor is updated in
    place by the schedule, so a replay always sees the current value)."""
    for group in opt.param_groups:
        device = group["params"][0].device
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)


def step_autocast(acc):
    """The autocast of the training step; its weight cache is off, which graph capture needs."""
    if acc.mixed_precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float16
    return torch.autocast(acc.device.type, dtype=dtype, cache_enabled=False)
