"""Single-file checkpoints (.safetensors, .ckpt): read safely, recognise, load offline, write.

Reading never runs pickle code: `.ckpt` goes through `torch.load(weights_only=True)` and a file that
needs more than tensors is refused. Loading is offline: the architecture comes from the configs our
writer embeds in the file's metadata, else from the configs shipped in assets/configs/{sd15,sd21-v,sdxl}.

Recognition, from the weights alone:
  family      SDXL base: conditioner.embedders.1.* (CLIP-L at embedders.0, OpenCLIP-G at embedders.1);
              SD 2.x: OpenCLIP text encoder at cond_stage_model.model.* (cross-attention width 1024);
              SD 1.x: CLIP text encoder at cond_stage_model.transformer.* (cross-attention width 768).
  refused     SDXL refiner (OpenCLIP-G at embedders.0 only, adm_in_channels 2560), inpainting and
              other UNets without 4 input channels, LoRA adapters, VAEs alone, embeddings.
  prediction  v-prediction if the file says so: a `v_pred` tensor key, modelspec.prediction_type, or
              kohya's ss_v_parameterization. Without such a hint, SD 2.x files are taken as
              v-prediction (the 768-px 2.0-v/2.1 releases; pass prediction_type="epsilon" for the
              512-px SD 2.x base) and SD 1.x/SDXL files as epsilon.

Writing produces the original LDM (SD1/SD2) / SGM (SDXL) key layout (see ldm_keys.py) that A1111,
Forge, ComfyUI and diffusers' `from_single_file` load.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pickle
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ModelError
from .export import _ARCH, FAMILY_NAMES, tensor_bytes
from .ldm_keys import PREFIXES, from_ldm, to_ldm
from .lora import LoRAModule
from .models import ASSETS, LoadedModel, assemble, save_configs
from .tokenizer import make_tokenizer

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
META_CONFIGS = "lora_studio.configs"  # JSON of the component configs, written by save_single_file
MAX_CHECKPOINT_BYTES = 32 * 1024**3  # an fp32 SDXL file with its VAE and both text encoders is ~14 GB
CONFIG_DIRS = {"sd1": "sd15", "sd2": "sd21-v", "sdxl": "sdxl"}  # assets/configs/<dir>, from full:<dir>
_IMPLEMENTATION = {"sd1": "https://github.com/CompVis/stable-diffusion",
                   "sd2": "https://github.com/Stability-AI/stablediffusion",
                   "sdxl": "https://github.com/Stability-AI/generative-models"}
_CLASSES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection}


# ----------------------------------------------------------------------------- reading

def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors or pickled (.ckpt/.pt/.pth/.bin) file, on the CPU."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Checkpoint file '{p}' does not exist. Check the path, or pick the file again.")
    if p.suffix.lower() == ".safetensors":
        try:
            tensor_bytes(p, "Stable Diffusion checkpoint", MAX_CHECKPOINT_BYTES)  # before allocating anything
            with safe_open(str(p), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises several types for a damaged file
            raise ModelError(f"'{p.name}' is not a readable .safetensors file ({e}). It may be truncated; "
                             "download it again.") from None
    return _read_pickle(p), {}


def _read_pickle(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(
            f"'{p.name}' holds Python objects besides tensors, and unpickling them could run code hidden in "
            "the file, so LoRA Studio refuses to load it. Use a .safetensors version of this model, or "
            "convert the file with a tool you trust.") from None
    except Exception as e:  # not a torch file at all, or truncated
        raise ModelError(f"'{p.name}' is not a readable checkpoint ({type(e).__name__}: {e}). "
                         "Download it again, or use a .safetensors version.") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise ModelError(f"'{p.name}' holds no tensors; it is not a model checkpoint.")
    return tensors


def _normalise(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older SD1 files name the CLIP weights without transformers' `text_model.` level."""
    old = "cond_stage_model.transformer."
    if any(k.startswith(old + "embeddings.") for k in tensors):
        return {(old + "text_model." + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}
    return tensors


@dataclass
class Detected:
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    why: str  # how the prediction type was decided, for the log


def detect(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> Detected:
    """Family and prediction type from the weights; refuses what is not an SD1/SD2/SDXL base model."""
    _refuse_non_base(tensors, name)
    family = _family(tensors, name)
    pred, why = _prediction(tensors, metadata, family)
    return Detected(family, pred, why)


def _refuse_non_base(t: dict[str, torch.Tensor], name: str) -> None:
    keys = list(t)
    if any(k.startswith(("lora_unet", "lora_te")) or ".lora_" in k or ".lora_A." in k for k in keys):
        raise ModelError(f"'{name}' is a LoRA adapter, not a base model. Choose a base model (an SD 1.x, 2.x "
                         f"or SDXL checkpoint, a diffusers folder, or 'demo') and load this file as a LoRA "
                         f"(--lora {name}).")
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") for k in keys):
        raise ModelError(f"'{name}' is a textual-inversion embedding, not a base model. Choose an SD 1.x, "
                         "2.x or SDXL checkpoint or a diffusers folder as the base.")
    if not any(k.startswith(UNET) for k in keys):
        bare = [k.removeprefix("first_stage_model.").removeprefix("vae.") for k in keys]
        if all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in bare):
            raise ModelError(f"'{name}' is a VAE on its own, not a full model. Pass it as the separate VAE "
                             f"(--vae {name}) together with a base model.")
        if any(k.startswith(("down_blocks.", "mid_block.", "time_embedding.")) for k in keys):
            raise ModelError(f"'{name}' is one component of a diffusers folder (a UNet), not a whole model. "
                             "Pass the diffusers folder that holds model_index.json instead.")
        raise ModelError(f"'{name}' is not a Stable Diffusion checkpoint LoRA Studio recognises: it has no "
                         f"UNet weights (model.diffusion_model.*); its first keys are {keys[:3]}. Pass an "
                         "SD 1.x, SD 2.x or SDXL base checkpoint, or a diffusers folder.")
    conv_in = t.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        n = conv_in.shape[1]
        kind = {9: "an inpainting model (its UNet takes 9 input channels: latents, mask and masked image)",
                8: "an image-editing model (InstructPix2Pix style, 8 UNet input channels)"}.get(
            n, f"a model whose UNet takes {n} input channels")
        raise ModelError(f"'{name}' is {kind}. LoRA Studio trains text-to-image base models (4 input "
                         "channels); use the regular, non-inpainting version of this model.")


def _family(t: dict[str, torch.Tensor], name: str) -> str:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in t)

    adm = t.get(UNET + "label_emb.0.0.weight")
    if has("conditioner.embedders.1."):
        family = "sdxl"
    elif has("conditioner.embedders.0.model.") or (adm is not None and adm.shape[1] == 2560):
        raise ModelError(f"'{name}' is an SDXL refiner (one OpenCLIP-G text encoder, adm_in_channels 2560), "
                         "which only polishes images made by SDXL base. LoRA Studio trains on SDXL base; "
                         "choose the SDXL base checkpoint.")
    elif has("cond_stage_model.model."):
        family = "sd2"
    elif has("cond_stage_model.transformer."):
        family = "sd1"
    else:
        raise ModelError(f"'{name}' has a UNet but no text encoder weights (cond_stage_model.* or "
                         "conditioner.*), so it cannot be used for text-to-image. Use a complete checkpoint.")
    ctx = next((v.shape[1] for k, v in t.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    expected = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
    if ctx in expected.values() and ctx != expected[family]:
        log.warning("%s: text encoder layout says %s but cross-attention width is %s", name, family, ctx)
    return family


def _prediction(t: dict[str, torch.Tensor], meta: dict[str, str], family: str) -> tuple[str, str]:
    spec = meta.get("modelspec.prediction_type", "").lower()
    if "v_pred" in t:
        return "v_prediction", "the file has a v_pred key"
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction", "modelspec.prediction_type"
    if spec in ("epsilon", "eps"):
        return "epsilon", "modelspec.prediction_type"
    if meta.get("ss_v_parameterization", "").lower() == "true":
        return "v_prediction", "ss_v_parameterization"
    if family == "sd2":
        return "v_prediction", "no hint in the file; SD 2.x defaults to the 768-px v-prediction model"
    return "epsilon", "no hint in the file"


# ----------------------------------------------------------------------------- loading

@cache
def config_folder(family: str) -> Path:
    """assets/configs/<family dir>; regenerated into a temp folder if the assets are not installed."""
    folder = ASSETS / "configs" / CONFIG_DIRS[family]
    if (folder / "model_index.json").is_file():
        return folder
    log.info("no shipped configs at %s; generating them", folder)
    return save_configs("full:" + CONFIG_DIRS[family], Path(tempfile.mkdtemp(prefix="lora-studio-cfg-")))


def _configs(family: str, pred: str, meta: dict[str, str]) -> tuple[dict[str, dict], Path | None]:
    """Component configs: embedded in the file by our writer, else the shipped ones (and their folder)."""
    if META_CONFIGS in meta:
        return json.loads(meta[META_CONFIGS]), None
    folder = config_folder(family)
    cfg = {c: json.loads((folder / c / "config.json").read_text())
           for c, _, _ in PREFIXES[family]}
    cfg["scheduler"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if family == "sd2" and pred == "epsilon":
        cfg["unet"]["sample_size"] = 64  # SD 2.x base is the 512-px model; 2.x-v the 768-px one
    return cfg, folder


def _component(component: str, cfg: dict, tensors: dict[str, torch.Tensor], scheme: str, prefix: str,
               source: str, dtype: torch.dtype, what: str = "") -> torch.nn.Module:
    cls = _CLASSES[component]
    with init_empty_weights():
        module = cls.from_config(cfg) if component in ("unet", "vae") else cls(CLIPTextConfig.from_dict(cfg))
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    state = from_ldm(tensors, scheme, module.config, prefix, shapes, source, f"{what} {component}".strip())
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return module


def load_single_file(path: str | Path, *, dtype: torch.dtype | None = None,
                     prediction_type: str | None = None) -> LoadedModel:
    """A single-file SD1/SD2/SDXL base checkpoint as a LoadedModel on the CPU (fp32 unless `dtype`)."""
    p = Path(path).expanduser()
    tensors, meta = read_checkpoint(p)
    return pipeline_from_tensors(tensors, meta, str(path), dtype=dtype, prediction_type=prediction_type)


def pipeline_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], name: str, *,
                          dtype: torch.dtype | None = None, prediction_type: str | None = None) -> LoadedModel:
    """Recognise a single-file state dict and build its pipeline (the file's `name` is for messages)."""
    tensors, source = _normalise(tensors), Path(name).name
    found = detect(tensors, meta, source)
    pred = prediction_type or found.prediction_type
    log.info("%s: %s, %s (%s)", source, FAMILY_NAMES[found.family], pred,
             "as asked" if prediction_type else found.why)
    configs, folder = _configs(found.family, pred, meta)
    what = FAMILY_NAMES[found.family] + ("" if folder is None else f" ({folder.name} configs)")
    parts = {c: _component(c, configs[c], tensors, scheme, prefix, source, dtype or torch.float32, what)
             for c, scheme, prefix in PREFIXES[found.family]}
    encoders = [parts[c] for c in ("text_encoder", "text_encoder_2") if c in parts]
    tokenizers = [CLIPTokenizer.from_pretrained(folder / sub) if folder else make_tokenizer()
                  for sub in ("tokenizer", "tokenizer_2")[:len(encoders)]]
    scheduler = EulerDiscreteScheduler.from_config(configs["scheduler"], prediction_type=pred)
    pipe = assemble(found.family, parts["unet"], parts["vae"], encoders, tokenizers, scheduler)
    res = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return LoadedModel(pipe=pipe, family=found.family, prediction_type=pred, name=name, resolution=res)


def load_vae(source: str | Path, config: dict, dtype: torch.dtype | None = None) -> AutoencoderKL:
    """A separate VAE: a diffusers folder, or a file in the LDM or diffusers layout (config: the base's)."""
    p = Path(source).expanduser()
    if p.is_dir():
        sub = p if (p / "config.json").is_file() else p / "vae"
        if not (sub / "config.json").is_file():
            raise ModelError(f"'{p}' is a folder without a VAE config.json; pass a VAE file or a diffusers VAE "
                             "folder.")
        return AutoencoderKL.from_pretrained(str(sub), local_files_only=True,
                                             dtype=dtype or torch.float32).eval().requires_grad_(False)
    tensors, _ = read_checkpoint(p)
    if any(k.startswith(UNET) for k in tensors):
        raise ModelError(f"'{p.name}' is a whole model, not a VAE. Pass it as the base model, or pick the VAE "
                         "file (usually named '...vae...safetensors').")
    bare = {k.removeprefix("first_stage_model.").removeprefix("vae."): v for k, v in tensors.items()}
    scheme = "vae" if any(k.startswith("encoder.down.") for k in bare) else "diffusers"
    vae = _component("vae", dict(config), bare, scheme, "", p.name, dtype or torch.float32)
    return vae.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- writing

def checkpoint_tensors(model: LoadedModel) -> dict[str, torch.Tensor]:
    """Every UNet, VAE and text-encoder weight under its single-file (LDM/SGM) key."""
    roots = [model.unet, *model.text_encoders]
    if any(isinstance(m, LoRAModule) for root in roots for m in root.modules()):
        raise ModelError(f"'{model.name}' carries injected LoRA layers. Fold adapters in with "
                         "adapter_ops.merge_into_checkpoint, or remove them, before writing a checkpoint.")
    out: dict[str, torch.Tensor] = {}
    for component, scheme, prefix in PREFIXES[model.family]:
        module = getattr(model.pipe, component)
        out.update(to_ldm(module.state_dict(), scheme, module.config, prefix))
    if model.prediction_type == "v_prediction":
        out["v_pred"] = torch.tensor([])  # the marker ComfyUI and others read
    return out


def checkpoint_metadata(model: LoadedModel, title: str) -> dict[str, str]:
    """modelspec keys plus the component configs, so the file loads offline with its exact architecture."""
    pipe, res = model.pipe, model.resolution
    configs = {c: json.loads(getattr(pipe, c).to_json_string()) if c in ("unet", "vae")
               else getattr(pipe, c).config.to_diff_dict() for c, _, _ in PREFIXES[model.family]}
    configs["scheduler"] = json.loads(pipe.scheduler.to_json_string())
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": _ARCH[model.base_model_version],
        "modelspec.implementation": _IMPLEMENTATION[model.family],
        "modelspec.title": title,
        "modelspec.date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if model.prediction_type == "v_prediction" else "epsilon",
        "lora_studio.family": model.family,
        META_CONFIGS: json.dumps(configs, default=str),
    }


def save_single_file(model: LoadedModel, path: str | Path, dtype: torch.dtype = torch.float16,
                     metadata: dict[str, str] | None = None, embed_configs: bool = True) -> Path:
    """Write the pipeline as one .safetensors in the original LDM/SGM layout, atomically.

    `metadata` adds keys; `embed_configs=False` leaves out the component configs (the file then loads
    with the shipped standard configs, like any checkpoint from elsewhere).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"'{path.name}': checkpoints are written as .safetensors only; change the extension.")
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in checkpoint_tensors(model).items()}
    meta = dict(checkpoint_metadata(model, title=path.stem), **(metadata or {}))
    if not embed_configs:
        del meta[META_CONFIGS]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d tensors, %s)", path, len(tensors), str(dtype).removeprefix("torch."))
    return path
