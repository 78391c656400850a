"""Resolve a MODEL string to a loaded pipeline, and build the test architectures.

`tiny:*` are small random-init pipelines built from the real diffusers/transformers classes (a training
step takes milliseconds on a CPU); `full:*` are the real architectures' configs with random weights, for
GPU benchmarks. Both are deterministic from a seed and need no download.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

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
}


@dataclass
class LoadedModel:
    """A pipeline plus what the trainer and the exporter need to know about it."""

    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    name: str
    resolution: int  # native image size in pixels

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
    tokenizer = make_tokenizer()
    parts = dict(vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    if spec["family"] == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=encoders[1], tokenizer_2=make_tokenizer(),
                                         force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for module in [unet, vae, *encoders]:
        module.eval().requires_grad_(False)
    return LoadedModel(pipe=pipe, family=spec["family"], prediction_type=spec["pred"], name=name,
                       resolution=spec["res"])


def load_model(model: str, *, device: str | torch.device = "cpu", seed: int = 0) -> LoadedModel:
    """Resolve a MODEL string (see DESIGN.md) to a LoadedModel on `device`."""
    if model == "demo":
        name = "tiny:sd1"  # until the trained demo base is bundled
        log.info("demo base resolves to %s", name)
        return build_pipeline(name, seed=seed, device=device)
    if model in BUILTIN:
        return build_pipeline(model, seed=seed, device=device)
    raise ModelError(
        f"Cannot load base model '{model}': only the built-in models ({', '.join(('demo',) + BUILTIN)}) "
        "are supported in this version."
    )
