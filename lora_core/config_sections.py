"""The sections of TrainConfig: every setting as a typed dataclass field whose metadata carries its help
text and what it accepts (`range` = (low, high) inclusive, either end None = open; `min_exclusive` /
`max_exclusive`; `choices`; `multiple_of`). `lora_core.config` assembles them, checks and reads them.
"""

from dataclasses import dataclass, field
from typing import Any

AUTO_OFF_ON = ["auto", "on", "off"]
SEED_MAX = 2**32 - 1


def _f(default: Any, help: str, *, bounds: tuple[Any, Any] | None = None, choices: list[str] | None = None,
       multiple_of: int | None = None, min_exclusive: bool = False, max_exclusive: bool = False) -> Any:
    """A dataclass field carrying its help text and constraints in `metadata`."""
    meta: dict[str, Any] = {"help": help}
    if bounds is not None:
        meta["range"] = bounds
    if choices is not None:
        meta["choices"] = choices
    if multiple_of is not None:
        meta["multiple_of"] = multiple_of
    if min_exclusive:
        meta["min_exclusive"] = True
    if max_exclusive:
        meta["max_exclusive"] = True
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """The base model the adapter is trained for."""

    base: str = _f("demo", "Base model: `demo` (bundled), `tiny:sd1`, `tiny:sd2`, `tiny:sd2-v`, `tiny:sdxl`, "
                   "`full:sd15`, `full:sd21-v`, `full:sdxl`, a Hugging Face hub id, a local diffusers folder "
                   "or a single .safetensors/.ckpt checkpoint.")
    vae: str = _f("", "Replacement VAE (hub id, folder or file). Empty = the base model's own VAE.")
    clip_skip: int = _f(1, "Use the output of the N-th last text-encoder layer. 1 = last layer (normal); "
                        "2 is common for anime-style SD 1.5 models.", bounds=(1, 4))
    prediction_type: str = _f("auto", "What the UNet predicts. `auto` reads it from the model; set "
                              "`v_prediction` for SD 2.x 768-v style models whose config is missing it.",
                              choices=["auto", "epsilon", "v_prediction"])


@dataclass
class DataConfig:
    """Training images, captions and how they are fed to the model."""

    dir: str = _f("", "Folder of training images with same-name .txt captions. Subfolders named "
                  "`N_name` repeat their images N times per epoch.")
    resolution: int = _f(512, "Training resolution: images are resized so width x height is about "
                         "resolution^2. 512 for SD 1.5, 768 for SD 2.x-768, 1024 for SDXL.",
                         bounds=(32, 2048), multiple_of=8)
    buckets: bool = _f(True, "Group images by aspect ratio instead of cropping all of them to a square.")
    min_bucket: int = _f(0, "Shortest bucket side in pixels. 0 = half the resolution.", bounds=(0, 4096))
    max_bucket: int = _f(0, "Longest bucket side in pixels. 0 = twice the resolution.", bounds=(0, 8192))
    bucket_step: int = _f(64, "Bucket sides are multiples of this many pixels.", bounds=(8, 256), multiple_of=8)
    flip: bool = _f(False, "Randomly mirror images left-right. Doubles variety; leave off for subjects "
                    "that are not symmetric (text, logos, side parts, asymmetric outfits).")
    trigger_word: str = _f("", "Word put in front of every caption (unless already there); use it in "
                           "prompts to call up what was trained.")
    default_caption: str = _f("", "Caption for images without a .txt file.")
    repeats: int = _f(1, "How many times each image (outside `N_name` folders) is shown per epoch.",
                      bounds=(1, 1000))
    shuffle_tags: bool = _f(False, "Shuffle comma-separated caption tags every step (keeps the first "
                            "`keep_tokens` in place).")
    keep_tokens: int = _f(0, "Number of leading caption tags that are never shuffled (e.g. 1 keeps the "
                          "trigger word first).", bounds=(0, 255))
    caption_dropout: float = _f(0.0, "Probability of training a step with an empty caption, which helps "
                                "the adapter work without its trigger word.", bounds=(0.0, 1.0))
    cache_latents: bool = _f(True, "Encode images with the VAE once and reuse the latents (faster, less "
                             "memory). Random flips are cached for both sides.")
    cache_to_disk: bool = _f(False, "Also keep the latent cache on disk so later runs skip encoding.")

    def bucket_range(self) -> tuple[int, int]:
        """(min_side, max_side) of the buckets with the `0 = auto` rules applied."""
        low = self.min_bucket or max(self.bucket_step, self.resolution // 2)
        high = self.max_bucket or self.resolution * 2
        return low, high


@dataclass
class LoraConfig:
    """Shape of the adapter: which layers it touches and how big it is."""

    rank: int = _f(16, "Adapter rank (network dim): size of each low-rank update. 4-16 for a character, "
                   "16-64 for a style; larger = bigger file and more capacity.", bounds=(1, 1024))
    alpha: float = _f(8.0, "Scales the update by alpha/rank. Half the rank is common; lower alpha = "
                      "gentler updates at the same learning rate.", bounds=(0.0, None), min_exclusive=True)
    dropout: float = _f(0.0, "Dropout on the adapter's input during training (0 = off).",
                        bounds=(0.0, 1.0), max_exclusive=True)
    targets: str = _f("attn", "Layers to adapt: `attn` = attention projections; `attn-mlp` also adds "
                      "feed-forward and projection layers (the kohya default); `conv` adds ResNet 3x3 "
                      "convolutions too (LoCon).", choices=["attn", "attn-mlp", "conv"])
    train_text_encoder: bool = _f(True, "Also train adapters on the text encoder(s). Helps trigger words "
                                  "stick; off saves memory and is common for SDXL.")
    conv_rank: int = _f(0, "Rank of the convolution adapters with targets = conv. 0 = same as rank.",
                        bounds=(0, 1024))
    conv_alpha: float = _f(0.0, "Alpha of the convolution adapters. 0 = same as alpha.", bounds=(0.0, None))


@dataclass
class OptimConfig:
    """Optimizer, learning rates and loss options."""

    optimizer: str = _f("adamw", "`adamw`; `adamw8bit` (needs bitsandbytes, less memory); `prodigy` "
                        "(needs prodigyopt, finds its own step size: use lr = 1.0).",
                        choices=["adamw", "adamw8bit", "prodigy"])
    lr: float = _f(1e-4, "Learning rate of the UNet adapters.", bounds=(0.0, 10.0), min_exclusive=True)
    text_encoder_lr: float = _f(5e-5, "Learning rate of the text-encoder adapters (usually half of lr or "
                                "less). To freeze them set lora.train_text_encoder = false.",
                                bounds=(0.0, 10.0), min_exclusive=True)
    weight_decay: float = _f(0.01, "AdamW weight decay.", bounds=(0.0, 1.0))
    beta1: float = _f(0.9, "Adam beta1 (momentum).", bounds=(0.0, 1.0), max_exclusive=True)
    beta2: float = _f(0.999, "Adam beta2 (second-moment decay).", bounds=(0.0, 1.0), max_exclusive=True)
    eps: float = _f(1e-8, "Adam epsilon.", bounds=(0.0, 1.0), min_exclusive=True)
    grad_accum: int = _f(1, "Add up gradients over N batches per optimizer step (effective batch = "
                         "batch_size x N).", bounds=(1, 1024))
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value. 0 = no clipping.", bounds=(0.0, None))
    noise_offset: float = _f(0.0, "Offset noise strength (about 0.05) so the model learns very dark and "
                             "very bright images. 0 = off.", bounds=(0.0, 1.0))
    min_snr_gamma: float = _f(0.0, "Min-SNR loss weighting gamma (5 is typical); steadies training. "
                              "0 = off.", bounds=(0.0, 100.0))
    uncond_preservation: float = _f(0.0, "Share of samples trained with an empty caption towards the base "
                                    "model's own prediction (adapter off). Keeps the adapter out of the "
                                    "unconditional branch, so guidance (CFG) amplifies what it learned instead "
                                    "of cancelling it; costs a forward pass without gradients on those samples. "
                                    "0 = off.", bounds=(0.0, 1.0))


@dataclass
class ScheduleConfig:
    """How long to train and how the learning rate changes over time."""

    steps: int = _f(1000, "Number of optimizer steps (used when epochs = 0).", bounds=(1, 10_000_000))
    epochs: int = _f(0, "Train this many passes over the dataset (images x repeats / batch size "
                     "steps each) instead of a fixed step count. 0 = use steps.", bounds=(0, 100_000))
    batch_size: int = _f(1, "Images per batch. Larger batches need more GPU memory.", bounds=(1, 256))
    scheduler: str = _f("cosine", "Learning-rate curve after warm-up: `constant`, `linear` decay to 0, "
                        "`cosine` decay to 0, or `cosine_restarts` (see restarts).",
                        choices=["constant", "linear", "cosine", "cosine_restarts"])
    warmup_steps: int = _f(0, "Steps over which the learning rate ramps up from 0.", bounds=(0, None))
    restarts: int = _f(1, "Number of cosine cycles with scheduler = cosine_restarts.", bounds=(1, 1000))
    seed: int = _f(42, "Random seed for noise, shuffling and adapter init; the same seed and data "
                   "give the same run.", bounds=(0, SEED_MAX))


@dataclass
class SamplingConfig:
    """Preview images generated while training."""

    enabled: bool = _f(True, "Draw preview images while training (at the start, every N steps, at the end).")
    prompts: list[str] = _f([], "Preview prompts (in --set, use TOML list syntax for prompts with "
                            "commas: [\"a, b\", \"c\"]). Empty = the first caption of the dataset.")
    negative_prompt: str = _f("", "Negative prompt for previews.")
    every: int = _f(0, "Make previews every N steps. 0 = only at the start and the end.", bounds=(0, None))
    steps: int = _f(20, "Denoising steps per preview image.", bounds=(1, 200))
    cfg: float = _f(7.0, "Classifier-free guidance scale of previews (1 = no guidance).", bounds=(1.0, 30.0))
    seed: int = _f(1234, "Seed of previews; fixed so previews are comparable across steps.",
                   bounds=(0, SEED_MAX))
    scales: list[float] = _f([1.0], "Adapter strengths to preview side by side (e.g. 0, 0.5, 1).",
                             bounds=(-4.0, 4.0))
    size: int = _f(0, "Preview width and height in pixels. 0 = the training resolution.",
                   bounds=(0, 2048), multiple_of=8)
    compile: bool = _f(False, "torch.compile the preview UNet (GPU, with CUDA graphs on): about a minute "
                       "per kind of preview batch (its size, one weight or several), then each preview "
                       "faster (a lone SD1.5 512 px image 0.31 s instead of 0.46 s in one H200 run). "
                       "For long runs with frequent previews.")


@dataclass
class SavingConfig:
    """Checkpoints and the final adapter file."""

    every: int = _f(0, "Save a checkpoint adapter every N steps. 0 = only the final adapter.",
                    bounds=(0, None))
    keep_last: int = _f(3, "Keep only the newest N checkpoints. 0 = keep all.", bounds=(0, None))
    output_name: str = _f("lora", "Adapter name, written to its metadata (ss_output_name) and used for "
                          "downloaded file names.")
    precision: str = _f("fp16", "Number format of the saved adapter. fp16 is what other tools expect; "
                        "fp32 doubles the size.", choices=["fp16", "bf16", "fp32"])


@dataclass
class PerformanceConfig:
    """Speed and memory switches. `auto` picks what is known to work on the detected hardware."""

    mixed_precision: str = _f("auto", "Compute type of the frozen model: `auto` = bf16 on GPUs that "
                              "support it, else fp16 on GPU and fp32 on CPU; `no` = fp32.",
                              choices=["auto", "bf16", "fp16", "no"])
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: much less "
                                      "memory, about 20-30% slower.")
    compile: str = _f("auto", "torch.compile the UNet's training step: the first steps take a few minutes, "
                      "every later step is faster. `auto` = on a GPU when the run is long enough to win the "
                      "compile time back: 300,000 samples at batch 1 and 1,000,000 at larger batches when the "
                      "step is a CUDA graph, else 2000 batches (steps x grad_accum); never with gradient "
                      "checkpointing.",
                      choices=AUTO_OFF_ON)
    compile_scope: str = _f("unet", "What `compile` compiles: `unet` = the whole UNet as one graph; `blocks` = "
                            "each transformer and ResNet block on its own, blocks of one shape sharing their "
                            "compiled code (less to compile; previews use the compiled blocks too). "
                            "`blocks` is experimental: it trains the same adapter as `unet` on an H200; its speed is not "
                            "yet measured.",
                            choices=["unet", "blocks"])
    cuda_graphs: str = _f("auto", "Capture the whole training step as a CUDA graph and replay it, so the GPU "
                          "never waits for Python (GPU only). `auto` = whenever the run allows it (not with "
                          "gradient checkpointing, accumulation, several processes or "
                          "LoRA dropout).", choices=AUTO_OFF_ON)
    channels_last: str = _f("auto", "Use channels-last memory format for convolutions. `auto` = with CUDA "
                            "graphs at any batch where GroupNorm keeps the layout (`nhwc_norms` on a half-precision base, "
                            "not compiled), else for small batches only (up to 4 at 512 px, 1 at 1024 px), "
                            "where each measured faster.", choices=AUTO_OFF_ON)
    attention: str = _f("auto", "Attention kernel tried first: `auto` = cuDNN's on H100-class GPUs (measured "
                        "1.6-1.8x faster than flash attention there for the large shapes), PyTorch's own order "
                        "elsewhere; `cudnn` or `flash` on any GPU; `tuned` = for each shape of the UNet's "
                        "attention, the fastest of cuDNN's, flash and memory-efficient attention, timed at its "
                        "first call (with `fused_projections`; cuDNN's first elsewhere; no gain measured on an "
                        "H200); `torch` = PyTorch's order.",
                        choices=["auto", "cudnn", "flash", "tuned", "torch"])
    cudnn_benchmark: bool = _f(False, "Let cuDNN time its convolution algorithms on the first step of each "
                               "batch shape and keep the fastest: seconds more before training, no "
                               "measured gain on an H200.")
    half_norms: bool = _f(True, "Run the UNet's GroupNorm and LayerNorm on bf16/fp16 activations under "
                          "mixed precision (statistics still in fp32) instead of casting to fp32 and back: "
                          "measured 8-12% faster steps and less memory on an H200. Off = autocast's fp32 norms.")
    nhwc_norms: bool = _f(True, "With half_norms and channels-last, run each GroupNorm on the channels-last "
                          "activations as they are (Triton kernels on CUDA) instead of PyTorch's, which "
                          "copies them to the other layout and back in both passes. Previews use them "
                          "too. Off = PyTorch's GroupNorm.")
    fast_layer_norm: bool = _f(True, "With half_norms, run the UNet's LayerNorms on bf16/fp16 activations in "
                               "Triton kernels (CUDA) that normalise several rows per program, instead of "
                               "PyTorch's one row per block: measured 2.2 against 3.8 ms for an SD1.5 batch-16 step's 48 "
                               "LayerNorms on an H200. Previews use them too. Off = PyTorch's LayerNorm.")
    fused_geglu: bool = _f(True, "Run the feed-forward's GEGLU (value times GELU of the gate) as one GPU "
                           "kernel each way on bf16/fp16 activations, instead of diffusers' split, GELU and "
                           "multiply (and a concatenation in the backward pass); it saves only the "
                           "projection's output. Previews use it too. Off = diffusers' GEGLU.")
    lean_resnets: bool = _f(True, "Run the UNet's ResNet blocks without diffusers' copy of the shortcut's "
                            "input to NCHW in training, its divide by an output scale of 1 and the convolutions' "
                            "separate bias passes (the biases join the time embedding and the shortcut): the "
                            "same maths in fewer passes. Previews use it too. Off = diffusers' block.")
    lean_transformers: bool = _f(True, "Join each residual sum of the UNet's transformer blocks to the "
                                 "LayerNorm after it: with fast_layer_norm on a GPU the sum runs inside the "
                                 "norm's kernel, and its gradient is summed inside the norm's backward kernel "
                                 "(the same maths in fewer passes). Previews use it too. Off = diffusers' block.")
    fused_lora: bool = _f(True, "Train each adapted linear layer through one hand-written forward and "
                          "backward (fewer, cheaper GPU kernels; the same maths). Off = the plain "
                          "three-layer path.")
    low_rank_kernel: str = _f("auto", "With fused_lora on a GPU, how each adapter's low-rank product reaches the "
                              "layer's output (and its share the input's gradient): `gemm` = one Triton matrix "
                              "product for the base layer and the adapter together, so the output is written once "
                              "(for layers 320 or 640 wide, where that is faster; cuBLAS for wider ones); `off` = "
                              "cuBLAS's rank-16 product onto the output; `add` = cuBLAS's base product, then one "
                              "Triton kernel that adds the adapter's product and the bias. `auto` = `gemm` where the "
                              "step replays from CUDA graphs, else `off` (launched one by one from Python, the "
                              "Triton kernel costs the host more time than it saves the GPU).",
                              choices=["auto", "off", "add", "gemm"])
    weight_grad_stream: str = _f("auto", "With fused_lora on a GPU, compute the adapters' weight gradients on a "
                                 "second CUDA stream, beside the rest of the backward pass (only the optimizer reads "
                                 "them; the same sums). `auto` = in runs whose step replays from CUDA graphs, their "
                                 "eager warm-up steps included (on an H100: 2% off SD1.5 batch 1, 1.3% off SDXL "
                                 "batch 4, nothing at SD1.5 batch 16); `on` = in every GPU step (not measured "
                                 "without graphs); `off` = in turn with the rest of the backward pass.",
                                 choices=["auto", "on", "off"])
    fused_projections: bool = _f(True, "Compute the q, k and v projections of each UNet self-attention (k and v "
                                 "of cross-attention) as one matrix product, adapters included: fewer, larger "
                                 "GPU kernels, no extra memory, the plain adapter path's maths (not used with "
                                 "an fp16 base). Off = one layer at a time.")
    adapter_copy: bool = _f(True, "Under mixed precision, cast all the adapters' fp32 weights to the compute "
                            "type in one multi-tensor copy per step, and their gradients back in another, "
                            "instead of a cast in every adapted layer (hundreds fewer GPU kernels per step; "
                            "the same values). Off = each layer casts its own.")
    prebuild_kernels: bool = _f(True, "Before the first step and the first preview, list the Triton kernels "
                                "(norms, GEGLU) that steps of every batch shape the run will train on and the "
                                "previews will launch, by dry runs, and build them all at once on every CPU "
                                "core instead of one at a time at their first launch: a machine's first run, "
                                "whose kernel cache is empty, starts training sooner (CUDA only; on an H100 "
                                "the first 3,000-sample job took 45-50 s instead of 90 s). Off = each kernel "
                                "is built at its first launch.")
    device: str = _f("auto", "Where to train: `auto` = CUDA GPU if present, else CPU.",
                     choices=["auto", "cpu", "cuda"])
    log_every: int = _f(10, "Read the loss back from the GPU and report it every N steps (each read "
                        "waits for the GPU).", bounds=(1, 100_000))
