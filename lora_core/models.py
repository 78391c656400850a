"""Resolve a MODEL string to a loaded pipeline, and build the test architectures.

`tiny:*` are small random-init pipelines built from the real diffusers/transformers classes (a training
step takes milliseconds on a CPU); `full:*` are the real architectures' configs with random weights, for
GPU benchmarks. Both are deterministic from a seed and need no download.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .errors import ModelError
from .tokenizer import BOS, EOS, build_vocab, make_tokenizer

log = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl")
BASE_MODEL_VERSION = {  # (family, prediction type) -> kohya's ss_base_model_version
    ("sd1", "epsilon"): "sd_v1",
    ("sd2", "epsilon"): "sd_v2",
    ("sd2", "v_prediction"): "sd_v2_v",
    ("sdxl", "epsilon"): "sdxl_base_v1-0",
    # v-prediction fine-tunes of SD1/SDXL exist; kohya marks them only by ss_v_parameterization
    ("sd1", "v_prediction"): "sd_v1",
    ("sdxl", "v_prediction"): "sdxl_base_v1-0",
}
ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass
class LoadedModel:
    """A pipeline plus what the trainer and the exporter need to know about it."""

    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    name: str
    resolution: int  # native image size in pixels
    clip_skip: int = 1  # 1 = last text-encoder layer; 2 = penultimate (SD1 "clip skip 2")

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipe.unet

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        encoders = [self.pipe.text_encoder]
        if self.family == "sdxl":
            encoders.append(self.pipe.text_encoder_2)
        return encoders

    @property
    def tokenizers(self) -> list:
        toks = [self.pipe.tokenizer]
        if self.family == "sdxl":
            toks.append(self.pipe.tokenizer_2)
        return toks

    @property
    def base_model_version(self) -> str:
        return BASE_MODEL_VERSION[(self.family, self.prediction_type)]

    def noise_scheduler(self) -> DDPMScheduler:
        """The training noise schedule that matches the pipeline's sampler."""
        return DDPMScheduler.from_config(self.pipe.scheduler.config, prediction_type=self.prediction_type)


# ----------------------------------------------------------------------------- architectures

_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, timestep_spacing="leading",
)


def _text_config(size: str, *, hidden: int, layers: int, heads: int, act: str, proj: int) -> CLIPTextConfig:
    vocab, _ = build_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab) if size == "tiny" else 49408,
        hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=proj,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    )


def _tiny_vae(scaling: float) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 32],
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=scaling,
    )


def _full_vae(sample: int, scaling: float) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=sample, scaling_factor=scaling,
    )


def _spec(name: str) -> dict:
    """Configs of every built-in architecture: unet, vae, text encoder(s), scheduler, family."""
    tiny_unet = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
        norm_num_groups=8, attention_head_dim=8,
    )
    specs = {
        "tiny:sd1": dict(
            family="sd1", pred="epsilon", res=32,
            unet=dict(tiny_unet, cross_attention_dim=32,
                      down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
            vae=_tiny_vae(0.18215),
            te=[_text_config("tiny", hidden=32, layers=2, heads=4, act="quick_gelu", proj=32)],
        ),
        "tiny:sd2": dict(
            family="sd2", pred="epsilon", res=32,
            unet=dict(tiny_unet, cross_attention_dim=32, use_linear_projection=True,
                      attention_head_dim=[2, 4],
                      down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
            vae=_tiny_vae(0.18215),
            te=[_text_config("tiny", hidden=32, layers=2, heads=4, act="gelu", proj=32)],
        ),
        "tiny:sdxl": dict(
            family="sdxl", pred="epsilon", res=32,
            unet=dict(tiny_unet, layers_per_block=2, cross_attention_dim=64, use_linear_projection=True,
                      attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=8 * 6 + 32),
            vae=_tiny_vae(0.13025),
            te=[_text_config("tiny", hidden=32, layers=2, heads=4, act="quick_gelu", proj=32),
                _text_config("tiny", hidden=32, layers=2, heads=4, act="gelu", proj=32)],
        ),
        "full:sd15": dict(
            family="sd1", pred="epsilon", res=512,
            unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                      block_out_channels=[320, 640, 1280, 1280],
                      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
            vae=_full_vae(512, 0.18215),
            te=[_text_config("full", hidden=768, layers=12, heads=12, act="quick_gelu", proj=768)],
        ),
        "full:sd21-v": dict(
            family="sd2", pred="v_prediction", res=768,
            unet=dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                      layers_per_block=2, use_linear_projection=True, upcast_attention=True,
                      block_out_channels=[320, 640, 1280, 1280],
                      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
            vae=_full_vae(768, 0.18215),
            te=[_text_config("full", hidden=1024, layers=23, heads=16, act="gelu", proj=512)],
        ),
        "full:sdxl": dict(
            family="sdxl", pred="epsilon", res=1024,
            unet=dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                      layers_per_block=2, use_linear_projection=True, block_out_channels=[320, 640, 1280],
                      transformer_layers_per_block=[1, 2, 10],
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816),
            vae=_full_vae(1024, 0.13025),
            te=[_text_config("full", hidden=768, layers=12, heads=12, act="quick_gelu", proj=768),
                _text_config("full", hidden=1280, layers=32, heads=20, act="gelu", proj=1280)],
        ),
    }
    specs["tiny:sd2-v"] = dict(copy.deepcopy(specs["tiny:sd2"]), pred="v_prediction")
    if name not in specs:
        raise ModelError(f"Unknown built-in model '{name}'. Built-in models: {', '.join(sorted(specs))}.")
    return specs[name]


BUILTIN = ("tiny:sd1", "tiny:sd2", "tiny:sd2-v", "tiny:sdxl", "full:sd15", "full:sd21-v", "full:sdxl")


def assemble(family: str, unet: UNet2DConditionModel, vae: AutoencoderKL, encoders: list[torch.nn.Module],
             tokenizers: list, scheduler: object) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The pipeline object for `family` from its parts (eval mode, frozen, progress bar off)."""
    parts = dict(vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet, scheduler=scheduler)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
                                         force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for module in [unet, vae, *encoders]:
        module.eval().requires_grad_(False)
    return pipe


def build_pipeline(name: str, seed: int = 0, device: str | torch.device = "cpu") -> LoadedModel:
    """Build a built-in architecture with deterministic random weights (fp32, eval mode)."""
    spec = _spec(name)
    with torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        encoders = [CLIPTextModel(spec["te"][0])]
        if spec["family"] == "sdxl":
            encoders.append(CLIPTextModelWithProjection(spec["te"][1]))
    scheduler = EulerDiscreteScheduler(**_SCHEDULER, prediction_type=spec["pred"])
    pipe = assemble(spec["family"], unet, vae, encoders, [make_tokenizer() for _ in encoders], scheduler)
    return LoadedModel(pipe=pipe, family=spec["family"], prediction_type=spec["pred"], name=name,
                       resolution=spec["res"])


def save_configs(name: str, directory: str | Path) -> Path:
    """Write a built-in architecture's configs in the diffusers folder layout, without weights.

    model_index.json, unet/ vae/ text_encoder(_2)/ config.json, scheduler/, tokenizer(_2)/: what
    `from_single_file(config=...)` and our single-file loader read. assets/configs/ is made by this.
    """
    spec, out = _spec(name), Path(directory)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**spec["unet"]), AutoencoderKL(**spec["vae"])
        encoders = [CLIPTextModel(spec["te"][0])]
        if spec["family"] == "sdxl":
            encoders.append(CLIPTextModelWithProjection(spec["te"][1]))
    scheduler = EulerDiscreteScheduler(**_SCHEDULER, prediction_type=spec["pred"])
    tokenizers = [make_tokenizer() for _ in encoders]
    pipe = assemble(spec["family"], unet, vae, encoders, tokenizers, scheduler)
    pipe.save_config(out)
    unet.save_config(out / "unet")
    vae.save_config(out / "vae")
    scheduler.save_config(out / "scheduler")
    for i, (te, tok) in enumerate(zip(encoders, tokenizers, strict=True)):
        suffix = f"_{i + 1}" if i else ""
        te.config.architectures = [type(te).__name__]
        te.config.save_pretrained(out / f"text_encoder{suffix}")
        tok.save_pretrained(out / f"tokenizer{suffix}")
    return out


# ----------------------------------------------------------------------------- resolving MODEL strings

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_NAMES = "'demo', " + ", ".join(f"'{b}'" for b in BUILTIN)


def load_model(model: str, *, device: str | torch.device = "cpu", seed: int = 0, dtype: torch.dtype | None = None,
               vae: str | None = None, clip_skip: int = 1, prediction_type: str | None = None) -> LoadedModel:
    """Resolve a MODEL string (see DESIGN.md) to a LoadedModel on `device`.

    MODEL: 'demo', a built-in ('tiny:*', 'full:*'), a local diffusers folder, a single-file
    .safetensors/.ckpt checkpoint, or a Hugging Face hub id found in the local cache (never downloaded).
    `vae` replaces the VAE (a file or folder); `clip_skip` 2 makes the trainer use the penultimate
    text-encoder layer; `prediction_type` overrides what the file says or implies (SD2 files without a
    hint are taken as v-prediction, see singlefile.detect).
    """
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ModelError(f"prediction_type must be 'epsilon' or 'v_prediction', not '{prediction_type}'.")
    loaded = _resolve(model, seed=seed, device=device, dtype=dtype, prediction_type=prediction_type)
    if vae:
        from .singlefile import load_vae

        loaded.pipe.register_modules(vae=load_vae(vae, loaded.pipe.vae.config, dtype))
    if prediction_type and prediction_type != loaded.prediction_type:
        loaded.prediction_type = prediction_type
        sched = loaded.pipe.scheduler
        loaded.pipe.register_modules(scheduler=type(sched).from_config(sched.config, prediction_type=prediction_type))
    loaded.clip_skip = _checked_clip_skip(clip_skip, loaded)
    loaded.pipe.to(device=device, dtype=dtype)
    return loaded


def _resolve(model: str, *, seed: int, device: str | torch.device, dtype: torch.dtype | None,
             prediction_type: str | None) -> LoadedModel:
    if model == "demo":
        demo = ASSETS / "demo-base"
        if (demo / "model_index.json").is_file():
            return load_folder(demo, name="demo", dtype=dtype)
        log.info("demo base resolves to tiny:sd1 (no bundled %s)", demo)
        return build_pipeline("tiny:sd1", seed=seed, device=device)
    if model in BUILTIN:
        return build_pipeline(model, seed=seed, device=device)
    path = Path(model).expanduser()
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from .singlefile import load_single_file

        return load_single_file(path, dtype=dtype, prediction_type=prediction_type)
    if path.is_dir():
        return load_folder(path, name=model, dtype=dtype)
    if _HUB_ID.fullmatch(model):
        return load_from_hub_cache(model, dtype=dtype)
    raise ModelError(
        f"Cannot load base model '{model}': it is not a built-in name, an existing folder, a .safetensors/.ckpt "
        f"file or a Hugging Face id (owner/name). Pass one of {_NAMES}, a diffusers folder (the one holding "
        "model_index.json), or a single-file .safetensors checkpoint."
    )


def _checked_clip_skip(clip_skip: int, loaded: LoadedModel) -> int:
    layers = loaded.text_encoders[0].config.num_hidden_layers
    if not 1 <= clip_skip < layers + 1:
        raise ModelError(f"clip_skip must be between 1 (last layer) and {layers} for '{loaded.name}', "
                         f"not {clip_skip}. Use 2 for the usual 'clip skip 2' of anime-style SD1 models.")
    return clip_skip


def load_from_hub_cache(repo_id: str, dtype: torch.dtype | None = None) -> LoadedModel:
    """A hub id from the local Hugging Face cache; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, or a malformed id/cache; either way: not usable offline
        raise ModelError(
            f"Cannot load base model '{repo_id}': it looks like a Hugging Face hub id, but it is not in the "
            "local Hugging Face cache and LoRA Studio never downloads models (no network access was tried). "
            "Pass a local diffusers folder (the one holding model_index.json) or a single-file .safetensors "
            f"checkpoint (SD 1.x, SD 2.x or SDXL base) instead, or one of the built-in models {_NAMES}."
        ) from None
    return load_folder(Path(folder), name=repo_id, dtype=dtype)


def load_folder(path: Path, *, name: str, dtype: torch.dtype | None = None) -> LoadedModel:
    """A diffusers pipeline folder (model_index.json + component subfolders), loaded offline."""
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(f"'{path}' is a folder but not a diffusers pipeline: it has no model_index.json. "
                         "Pass the folder that holds model_index.json (not a component subfolder such as "
                         "unet/), or a single-file .safetensors checkpoint.")
    cls_name = json.loads(index.read_text()).get("_class_name", "")
    classes = {"StableDiffusionPipeline": StableDiffusionPipeline,
               "StableDiffusionXLPipeline": StableDiffusionXLPipeline}
    if cls_name not in classes:
        raise ModelError(f"'{path}' holds a {cls_name or 'unknown pipeline'}, not a text-to-image SD 1.x/2.x "
                         "(StableDiffusionPipeline) or SDXL base (StableDiffusionXLPipeline) model, which are "
                         "what LoRA Studio trains on. Choose such a base model.")
    kwargs: dict = dict(local_files_only=True, dtype=dtype or torch.float32)
    if cls_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = classes[cls_name].from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"Could not load the diffusers folder '{path}': {e}. It may be incomplete (a "
                         "download that stopped); fetch it again or pass a single-file checkpoint.") from None
    family, pred = _family_of(pipe, path)
    pipe = assemble(family, pipe.unet, pipe.vae, [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl"
                    else []), [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else []), pipe.scheduler)
    res = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return LoadedModel(pipe=pipe, family=family, prediction_type=pred, name=name, resolution=res)


def _family_of(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, path: Path) -> tuple[str, str]:
    """(family, prediction type) of a loaded diffusers pipeline."""
    unet = pipe.unet.config
    if unet.in_channels != 4:
        raise ModelError(f"'{path}' has a UNet with {unet.in_channels} input channels (an inpainting or "
                         "image-editing model). LoRA Studio trains on text-to-image base models; choose the "
                         "non-inpainting version.")
    pred = pipe.scheduler.config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise ModelError(f"'{path}' predicts '{pred}'; only epsilon and v-prediction models are supported.")
    if isinstance(pipe, StableDiffusionXLPipeline):
        if pipe.text_encoder is None or pipe.text_encoder_2 is None:
            raise ModelError(f"'{path}' lacks one of SDXL's two text encoders (an SDXL refiner?). "
                             "LoRA Studio trains on the SDXL base model.")
        return "sdxl", pred
    dim = unet.cross_attention_dim
    if dim in (768, 1024):
        return ("sd1" if dim == 768 else "sd2"), pred
    return ("sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"), pred  # OpenCLIP uses gelu
