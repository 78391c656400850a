"""TrainConfig: every training setting in one typed place, with TOML I/O, presets and validation.

Each setting is a dataclass field whose metadata holds its help text and what it accepts
(`range` = (low, high) inclusive, either end None = open; `min_exclusive`/`max_exclusive`;
`choices`; `multiple_of`). The CLI's `--set`, presets, adapter metadata and the UI's advanced panel
are all generated from `iter_fields()`: there is no second list of names.

Layering (`resolve`): defaults <- preset <- config file <- `section.field=value` overrides.
"""

import copy
import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import tempfile
import textwrap
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import Field, dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from lora_core.errors import ConfigError

logger = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
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
                      "every later step is faster. `auto` = on a GPU for runs of 1000 steps or more.",
                      choices=AUTO_OFF_ON)
    cuda_graphs: str = _f("auto", "Capture the whole training step as a CUDA graph and replay it, so the GPU "
                          "never waits for Python (GPU only). `auto` = whenever the run allows it (not with "
                          "gradient checkpointing, accumulation, several processes or "
                          "LoRA dropout).", choices=AUTO_OFF_ON)
    channels_last: str = _f("auto", "Use channels-last memory format for convolutions. `auto` = with CUDA "
                            "graphs for small batches (up to 4 at 512 px, 1 at 1024 px), where it measured faster.", choices=AUTO_OFF_ON)
    device: str = _f("auto", "Where to train: `auto` = CUDA GPU if present, else CPU.",
                     choices=["auto", "cpu", "cuda"])
    log_every: int = _f(10, "Read the loss back from the GPU and report it every N steps (each read "
                        "waits for the GPU).", bounds=(1, 100_000))


@dataclass
class TrainConfig:
    """Everything a training run needs besides the images themselves."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    saving: SavingConfig = field(default_factory=SavingConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict {section: {field: value}} (TOML/JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = True) -> "TrainConfig":
        """Defaults updated by a (partial) nested dict. Unknown names raise unless strict=False."""
        return _merge(cls(), d, strict=strict, source="config")

    def merged(self, d: Mapping[str, Any], *, strict: bool = True) -> "TrainConfig":
        """A copy of this config updated by a (partial) nested dict."""
        return _merge(self, d, strict=strict, source="config")

    def validate(self) -> None:
        """Raise ConfigError listing every problem; see module-level `validate`."""
        validate(self)


# ---------------------------------------------------------------------------------------------------
# Field registry


@functools.cache
def _registry() -> tuple[tuple[str, str, Field, Any], ...]:
    rows = []
    for sec in dataclasses.fields(TrainConfig):
        cls = sec.default_factory
        hints = get_type_hints(cls)
        rows += [(sec.name, f.name, f, hints[f.name]) for f in dataclasses.fields(cls)]
    return tuple(rows)


def iter_fields() -> Iterator[tuple[str, str, Field, Any]]:
    """Yield (section, name, dataclasses.Field, type) for every setting, in declaration order.

    The type is `bool`, `int`, `float`, `str`, `list[str]` or `list[float]`; help and constraints are in
    `Field.metadata`, the default in `Field.default` (or `Field.default_factory()` for lists).
    """
    yield from _registry()


def iter_sections() -> Iterator[tuple[str, str]]:
    """Yield (section, description) in declaration order."""
    for sec in dataclasses.fields(TrainConfig):
        yield sec.name, (sec.default_factory.__doc__ or "").strip()


def _sections() -> dict[str, dict[str, tuple[Field, Any]]]:
    out: dict[str, dict[str, tuple[Field, Any]]] = {}
    for section, name, f, tp in _registry():
        out.setdefault(section, {})[name] = (f, tp)
    return out


def _unknown(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown {kind} '{name}'{hint}; valid: {', '.join(valid)}"


# ---------------------------------------------------------------------------------------------------
# Types


def _type_name(tp: Any) -> str:
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0]).removeprefix('a ')}s"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[tp]


def _check_type(value: Any, tp: Any) -> Any:
    """Return value converted to tp (int -> float, tuple -> list) or raise TypeError."""
    if get_origin(tp) is list:
        try:
            if not isinstance(value, list | tuple):
                raise TypeError
            return [_check_type(v, get_args(tp)[0]) for v in value]
        except TypeError:
            raise TypeError(f"expected {_type_name(tp)}") from None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise TypeError(f"expected {_type_name(tp)}")
    return float(value) if tp is float else value


def _show(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _merge(cfg: TrainConfig, d: Mapping[str, Any], *, strict: bool, source: str) -> TrainConfig:
    """Copy of cfg with d's values set; collects unknown names and wrong types into one ConfigError."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a table of sections, got {_show(d)}")
    out = copy.deepcopy(cfg)
    sections = _sections()
    problems: list[str] = []
    unknown: list[str] = []
    for section, values in d.items():
        if section not in sections:
            unknown.append(_unknown("section", section, sections))
            continue
        if not isinstance(values, Mapping):
            problems.append(f"[{section}] must be a table of settings, got {_show(values)}")
            continue
        for name, value in values.items():
            if name not in sections[section]:
                unknown.append(f"{section}: " + _unknown("field", name, sections[section]))
                continue
            try:
                setattr(getattr(out, section), name, _check_type(value, sections[section][name][1]))
            except TypeError as e:
                problems.append(f"{section}.{name} = {_show(value)}: {e}")
    if strict:
        problems = unknown + problems
    elif unknown:
        logger.warning("%s: ignoring %s", source, "; ".join(unknown))
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems),
                          problems)
    return out


# ---------------------------------------------------------------------------------------------------
# Validation


def _describe_range(meta: Mapping[str, Any]) -> str:
    low, high = meta["range"]
    lo_word = "greater than" if meta.get("min_exclusive") else "at least"
    hi_word = "less than" if meta.get("max_exclusive") else "at most"
    if low is not None and high is not None:
        if not meta.get("min_exclusive") and not meta.get("max_exclusive"):
            return f"must be between {low} and {high}"
        return f"must be {lo_word} {low} and {hi_word} {high}"
    return f"must be {lo_word} {low}" if low is not None else f"must be {hi_word} {high}"


def _check_value(value: Any, meta: Mapping[str, Any]) -> str | None:
    """What is wrong with one scalar value under its field's constraints, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if "choices" in meta and value not in meta["choices"]:
        return "must be one of " + ", ".join(_show(c) for c in meta["choices"])
    if "range" in meta:
        low, high = meta["range"]
        too_low = low is not None and (value <= low if meta.get("min_exclusive") else value < low)
        too_high = high is not None and (value >= high if meta.get("max_exclusive") else value > high)
        if too_low or too_high:
            return _describe_range(meta)
    if "multiple_of" in meta and value % meta["multiple_of"]:
        return f"must be a multiple of {meta['multiple_of']}"
    return None


def _field_problems(cfg: TrainConfig) -> tuple[list[str], bool]:
    """Problems of single fields, and whether every field has the right type."""
    problems = []
    types_ok = True
    for section, name, f, tp in _registry():
        value = getattr(getattr(cfg, section), name)
        try:
            value = _check_type(value, tp)
        except TypeError as e:
            problems.append(f"{section}.{name} = {_show(value)}: {e}")
            types_ok = False
            continue
        for v in value if isinstance(value, list) else [value]:
            why = _check_value(v, f.metadata)
            if why:
                problems.append(f"{section}.{name} = {_show(value)}: {why}")
                break
    return problems, types_ok


def _cross_problems(c: TrainConfig) -> list[str]:
    """Rules that involve more than one field. Assumes each field has the right type."""
    p = []
    d = c.data
    if d.min_bucket and d.max_bucket and d.max_bucket < d.min_bucket:
        p.append(f"data.max_bucket = {d.max_bucket}: must be at least data.min_bucket ({d.min_bucket})")
    elif d.buckets:
        low, high = d.bucket_range()
        if d.min_bucket and low > d.resolution:
            p.append(f"data.min_bucket = {low}: must be at most data.resolution ({d.resolution})")
        if d.max_bucket and high < d.resolution:
            p.append(f"data.max_bucket = {high}: must be at least data.resolution ({d.resolution})")
    if d.cache_to_disk and not d.cache_latents:
        p.append("data.cache_to_disk = true: needs data.cache_latents = true")
    s = c.schedule
    if s.epochs == 0 and s.warmup_steps >= s.steps:
        p.append(f"schedule.warmup_steps = {s.warmup_steps}: must be less than schedule.steps ({s.steps})")
    if not c.sampling.scales:
        p.append("sampling.scales = []: needs at least one scale, e.g. [1.0]")
    name = c.saving.output_name
    if not name.strip() or name in {".", ".."} or any(ch in name for ch in '/\\:*?"<>|'):
        p.append(f"saving.output_name = {_show(name)}: must be a plain file name without / \\ : * ? \" < > |")
    perf = c.performance
    if perf.device == "cpu" and perf.mixed_precision == "fp16":
        p.append('performance.mixed_precision = "fp16": needs a CUDA GPU; with device = "cpu" use '
                 '"auto", "bf16" or "no"')
    if perf.device == "cpu" and perf.cuda_graphs == "on":
        p.append('performance.cuda_graphs = "on": needs a CUDA GPU; use "auto" or "off" with device = "cpu"')
    return p


def validate(cfg: TrainConfig) -> None:
    """Check every field (type, range, choices) and cross-field rule; raise ONE ConfigError listing all.

    Each problem reads `section.field = value: what is allowed`.
    """
    problems, types_ok = _field_problems(cfg)
    if types_ok:  # cross-field rules compare values, so they need the right types
        problems += [p for p in _cross_problems(cfg) if p not in problems]
    if problems:
        raise ConfigError(f"Invalid training settings ({len(problems)} problem(s)):\n"
                          + "\n".join(f"  - {p}" for p in problems), problems)
    if cfg.optim.optimizer == "prodigy" and cfg.optim.lr < 0.1:
        logger.warning("optim.optimizer = prodigy usually wants optim.lr = 1.0 (got %g)", cfg.optim.lr)


# ---------------------------------------------------------------------------------------------------
# Overrides


def _parse_list(text: str) -> list[Any]:
    t = text.strip()
    if not t:
        return []
    if t.startswith("["):
        try:
            return tomllib.loads(f"v = {t}")["v"]
        except tomllib.TOMLDecodeError:
            try:
                return json.loads(t)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a valid TOML/JSON list ({e})") from None
    return [part.strip() for part in t.split(",") if part.strip()]


def _parse_value(text: str, tp: Any) -> Any:
    """Parse the text of an override as the field's type; raise ValueError saying what was expected."""
    t = text.strip()
    if tp is bool:
        low = t.lower()
        if low in {"true", "1", "yes", "on"}:
            return True
        if low in {"false", "0", "no", "off"}:
            return False
        raise ValueError("expected true or false (also 1/0, yes/no, on/off)")
    if tp is int or tp is float:
        try:
            return tp(t)
        except ValueError:
            raise ValueError(f"expected {_type_name(tp)}") from None
    if tp is str:
        if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
            try:
                return tomllib.loads(f"v = {t}")["v"]
            except tomllib.TOMLDecodeError:
                pass
        return text
    item_tp = get_args(tp)[0]
    items = _parse_list(text)
    if item_tp is float:
        try:
            items = [float(v) if isinstance(v, str) else v for v in items]
        except ValueError:
            raise ValueError(f"expected {_type_name(tp)}") from None
    try:
        return _check_type(items, tp)
    except TypeError as e:
        raise ValueError(str(e)) from None


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """Copy of cfg with `section.field=value` strings applied, each value parsed by the field's type.

    Bools accept true/false/1/0/yes/no/on/off; lists accept TOML/JSON syntax or `a, b, c`.
    All bad overrides are reported together in one ConfigError.
    """
    sections = _sections()
    updates: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        section, dot, name = key.partition(".")
        if not sep or not dot:
            problems.append(f"'{item}': expected section.field=value, e.g. lora.rank=32")
        elif section not in sections:
            problems.append(f"'{item}': " + _unknown("section", section, sections))
        elif name not in sections[section]:
            problems.append(f"'{item}': " + _unknown("field", name, sections[section]))
        else:
            try:
                updates.setdefault(section, {})[name] = _parse_value(text, sections[section][name][1])
            except ValueError as e:
                problems.append(f"{key} = {text.strip()!r}: {e}")
    if problems:
        raise ConfigError(f"Bad --set override(s) ({len(problems)}):\n" + "\n".join(f"  - {p}" for p in problems),
                          problems)
    return _merge(cfg, updates, strict=True, source="overrides")


# ---------------------------------------------------------------------------------------------------
# TOML files and presets


def _read_toml(path: str | Path, what: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {p}. Check the path.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {p} cannot be read: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {p} is not valid TOML: {e}. Fix that line or re-save it from the app.") from None


def load_toml(path: str | Path) -> TrainConfig:
    """Read a (full or partial) config file over the defaults. Does not validate ranges: call validate()."""
    return _merge(TrainConfig(), _read_toml(path, "Config file"), strict=True, source=str(path))


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_toml(cfg: TrainConfig) -> str:
    """TOML text of the whole config, each setting preceded by its help text as a comment."""
    lines = ["# LoRA Studio training config. Load with: lora-studio train --config THIS_FILE"]
    docs = dict(iter_sections())
    current = None
    for section, name, f, _ in _registry():
        if section != current:
            current = section
            lines += ["", f"# {docs[section]}", f"[{section}]"]
        lines += textwrap.wrap(f.metadata["help"], 100, initial_indent="# ", subsequent_indent="# ")
        lines.append(tomli_w.dumps({name: getattr(getattr(cfg, section), name)}).rstrip("\n"))
    return "\n".join(lines) + "\n"


def save_toml(cfg: TrainConfig, path: str | Path) -> None:
    """Write the config as commented TOML, atomically (temp file in the same folder, then rename)."""
    _atomic_write_text(Path(path), to_toml(cfg))


def list_presets() -> list[str]:
    """Names of the bundled presets (presets/*.toml)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The partial {section: {field: value}} overrides of presets/NAME.toml, checked for unknown names."""
    available = list_presets()
    if name not in available:
        raise ConfigError(f"Unknown preset '{name}'. Available presets: {', '.join(available) or '(none)'}. "
                          "For your own settings file use --config FILE.toml.")
    data = _read_toml(PRESETS_DIR / f"{name}.toml", "Preset")
    _merge(TrainConfig(), data, strict=True, source=f"preset {name}")
    return data


def resolve(preset: str | None = None, config_file: str | Path | None = None,
            overrides: Iterable[str] = (), *, check: bool = True) -> TrainConfig:
    """Defaults <- preset <- config file <- overrides; validated unless check=False."""
    cfg = TrainConfig()
    if preset:
        cfg = _merge(cfg, load_preset(preset), strict=True, source=f"preset {preset}")
    if config_file:
        cfg = _merge(cfg, _read_toml(config_file, "Config file"), strict=True, source=str(config_file))
    cfg = apply_overrides(cfg, overrides)
    if check:
        validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------
# Adapter metadata


def to_metadata(cfg: TrainConfig) -> dict[str, str]:
    """Flat {"section.field": JSON value} for the adapter's safetensors metadata (all strings)."""
    return {f"{s}.{n}": json.dumps(getattr(getattr(cfg, s), n), ensure_ascii=False)
            for s, n, _, _ in _registry()}


def from_metadata(metadata: Mapping[str, str]) -> TrainConfig:
    """Inverse of to_metadata; keys that are not config fields (ss_*, modelspec.*) are ignored."""
    sections = _sections()
    nested: dict[str, dict[str, Any]] = {}
    for key, text in metadata.items():
        section, _, name = key.partition(".")
        if section in sections and name in sections[section]:
            try:
                nested.setdefault(section, {})[name] = json.loads(text)
            except json.JSONDecodeError:
                logger.warning("adapter metadata %s = %r is not JSON; using the default", key, text)
    return _merge(TrainConfig(), nested, strict=False, source="adapter metadata")
