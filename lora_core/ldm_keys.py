"""Key names of the original single-file layouts (LDM for SD1/SD2, SGM for SDXL) <-> diffusers.

One naming function per component maps a diffusers state-dict key to its slot in the single file:
`(ldm_key, qkv_index, transpose)`. Writing and reading both use it, so the two directions cannot drift:

    UNet      model.diffusion_model.   input_blocks / middle_block / output_blocks; resnets as in_layers/...
    VAE       first_stage_model.       encoder.down.i.block.j, decoder.up.(N-1-i), mid.attn_1.{q,k,v}
    CLIP      cond_stage_model.transformer.text_model.*      (SD1; SDXL embedders.0.transformer.)
    OpenCLIP  cond_stage_model.model.*                       (SD2; SDXL embedders.1.model.)
              q/k/v fused into attn.in_proj_{weight,bias} (qkv_index 0/1/2); text_projection transposed

Shapes differ in one place besides those: the VAE attention weights are 1x1 convs in the file and
Linear layers in diffusers; `from_ldm` reshapes to the model's shape, `to_ldm` to [C, C, 1, 1].
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from .errors import ModelError

Slot = tuple[str, int | None, bool]  # (single-file key, index into a fused q/k/v tensor, transposed)

PREFIXES = {  # family -> [(pipeline component, naming scheme, single-file prefix)]
    "sd1": [("unet", "unet", "model.diffusion_model."), ("vae", "vae", "first_stage_model."),
            ("text_encoder", "clip", "cond_stage_model.transformer.")],
    "sd2": [("unet", "unet", "model.diffusion_model."), ("vae", "vae", "first_stage_model."),
            ("text_encoder", "openclip", "cond_stage_model.model.")],
    "sdxl": [("unet", "unet", "model.diffusion_model."), ("vae", "vae", "first_stage_model."),
             ("text_encoder", "clip", "conditioner.embedders.0.transformer."),
             ("text_encoder_2", "openclip", "conditioner.embedders.1.model.")],
}

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def _resnet(rest: str) -> str:
    head, _, param = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{param}"


def unet_slot(key: str, cfg: Mapping) -> Slot:
    """diffusers UNet key -> SGM/LDM key (without the model.diffusion_model. prefix)."""
    n = cfg["layers_per_block"]
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}", None, False
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        idx = 1 + int(m[1]) * (n + 1) + int(m[3])
        return (f"input_blocks.{idx}.0.{_resnet(m[4])}" if m[2] == "resnets"
                else f"input_blocks.{idx}.1.{m[4]}"), None, False
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}", None, False
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        return (f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets"
                else f"middle_block.1.{m[3]}"), None, False
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        idx = int(m[1]) * (n + 1) + int(m[3])
        return (f"output_blocks.{idx}.0.{_resnet(m[4])}" if m[2] == "resnets"
                else f"output_blocks.{idx}.1.{m[4]}"), None, False
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        pos = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1
        return f"output_blocks.{i * (n + 1) + n}.{pos}.conv.{m[2]}", None, False
    raise KeyError(key)


def vae_slot(key: str, cfg: Mapping) -> Slot:
    """diffusers AutoencoderKL key -> LDM key (without the first_stage_model. prefix)."""
    n_up = len(cfg["up_block_types"])
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", None, False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", None, False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i = n_up - 1 - int(m[1])
        return f"decoder.up.{i}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", None, False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}", None, False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", None, False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}", None, False
    return key, None, False


def clip_slot(key: str, cfg: Mapping) -> Slot:
    """transformers CLIPTextModel key -> HF-CLIP single-file key (under text_model.)."""
    return "text_model." + key.removeprefix("text_model."), None, False


def openclip_slot(key: str, cfg: Mapping) -> Slot:
    """transformers CLIPTextModel(WithProjection) key -> OpenCLIP key."""
    key = key.removeprefix("text_model.")
    if key == "text_projection.weight":
        return "text_projection", None, True
    if key in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[key], None, False
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if not m:
        raise KeyError(key)
    layer, module, param = m[1], m[2], m[3]
    if qkv := re.fullmatch(r"self_attn\.([qkv])_proj", module):
        return f"transformer.resblocks.{layer}.attn.in_proj_{param}", "qkv".index(qkv[1]), False
    return f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[module]}.{param}", None, False


def same_slot(key: str, cfg: Mapping) -> Slot:
    """A file already in the diffusers layout (e.g. a standalone diffusers VAE)."""
    return key, None, False


SLOTS = {"unet": unet_slot, "vae": vae_slot, "clip": clip_slot, "openclip": openclip_slot, "diffusers": same_slot}


def to_ldm(state: Mapping[str, torch.Tensor], scheme: str, cfg: Mapping, prefix: str) -> dict[str, torch.Tensor]:
    """A component's diffusers state dict in the single-file layout (keys prefixed)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in state.items():
        name, idx, transpose = SLOTS[scheme](key, cfg)
        if idx is not None:
            fused.setdefault(name, {})[idx] = t
            continue
        if transpose:
            t = t.T.contiguous()
        if scheme == "vae" and ".mid.attn_1." in name and t.dim() == 2:
            t = t[:, :, None, None]  # LDM's VAE attention is made of 1x1 convs
        out[prefix + name] = t
    for name, parts in fused.items():
        out[prefix + name] = torch.cat([parts[i] for i in range(3)])
    return out


def from_ldm(tensors: Mapping[str, torch.Tensor], scheme: str, cfg: Mapping, prefix: str,
             shapes: Mapping[str, torch.Size], source: str, what: str = "") -> dict[str, torch.Tensor]:
    """The diffusers state dict (keys and shapes from `shapes`) gathered from single-file `tensors`.

    `source` (the file name) and `what` (e.g. 'SDXL unet') name the problem in the error message.
    """
    out, missing, wrong = {}, [], []
    for key, shape in shapes.items():
        name, idx, transpose = SLOTS[scheme](key, cfg)
        t = tensors.get(prefix + name)
        if t is None:
            missing.append(prefix + name)
            continue
        if idx is not None:
            t = t.chunk(3, dim=0)[idx]
        if transpose:
            t = t.T
        if t.numel() != math.prod(shape):
            wrong.append(f"{prefix + name} is {list(t.shape)}, expected {list(shape)}")
            continue
        out[key] = t.reshape(shape).contiguous()
    if missing or wrong:
        detail = (f"{len(missing)} weights are missing, e.g. '{missing[0]}'" if missing
                  else f"{len(wrong)} weights have another shape, e.g. {wrong[0]}")
        raise ModelError(f"'{source}' does not match the {what or scheme} architecture LoRA Studio expected: {detail}. "
                         "The file may be truncated or a variant of the model this version does not support; "
                         "try the model as a diffusers folder instead.")
    return out
