"""Which layers get adapters, what kohya calls them, and putting the adapters in and out.

Target sets (DESIGN.md):
  attn      UNet attn1/attn2 to_q, to_k, to_v, to_out.0 + text encoders' self_attn q/k/v/out_proj
  attn-mlp  attn + UNet ff.net.0.proj, ff.net.2, proj_in, proj_out + text mlp.fc1, mlp.fc2
  conv      attn-mlp + ResNet 3x3 convs and the down/up-sampler convs (LoCon)

Kohya names: prefix + module path with '.' -> '_'. SD1/SD2 UNets keep diffusers paths; SDXL UNet
paths are rewritten to the original SGM layout (input_blocks / middle_block / output_blocks).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .lora import LoRAModule, wrap

TARGET_SETS = ("attn", "attn-mlp", "conv")

_UNET_ATTN = re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_UNET_MLP = re.compile(r"(\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)|\.attentions\.\d+\.(proj_in|proj_out))$")
_UNET_CONV = re.compile(r"(\.resnets\.\d+\.(conv1|conv2)|\.(downsamplers|upsamplers)\.0\.conv)$")
_TEXT_ATTN = re.compile(r"^encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_TEXT_MLP = re.compile(r"^encoder\.layers\.\d+\.mlp\.(fc1|fc2)$")


@dataclass
class Target:
    """One layer that takes an adapter."""

    kohya_name: str
    root: nn.Module  # the UNet or a text encoder
    path: str  # dotted module path inside root
    module: nn.Module  # the base layer (or its LoRA wrapper once injected)
    is_conv3x3: bool


def _unet_selected(path: str, targets: str) -> bool:
    if _UNET_ATTN.search(path):
        return True
    if targets in ("attn-mlp", "conv") and _UNET_MLP.search(path):
        return True
    return targets == "conv" and bool(_UNET_CONV.search(path))


def _text_selected(path: str, targets: str) -> bool:
    return bool(_TEXT_ATTN.match(path) or (targets != "attn" and _TEXT_MLP.match(path)))


def sgm_path(path: str, layers_per_block: int, up_has_attn: list[bool]) -> str:
    """Rewrite a diffusers SDXL UNet module path into the original SGM layout."""
    n = layers_per_block
    resnet_parts = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                    "conv_shortcut": "skip_connection"}

    def tail(rest: str, kind: str) -> str:
        if kind == "resnets":
            head, _, more = rest.partition(".")
            return resnet_parts.get(head, head) + ("." + more if more else "")
        return rest

    if m := re.match(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + i * (n + 1) + j}.{1 if kind == 'attentions' else 0}.{tail(rest, kind)}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)", path):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op{m[2]}"
    if m := re.match(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", path):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{1 if kind == 'attentions' else 2 * j}.{tail(rest, kind)}"
    if m := re.match(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * (n + 1) + j}.{1 if kind == 'attentions' else 0}.{tail(rest, kind)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)", path):
        i = int(m[1])
        return f"output_blocks.{i * (n + 1) + n}.{2 if up_has_attn[i] else 1}.conv{m[2]}"
    return path


def unet_kohya_name(path: str, unet: nn.Module, family: str) -> str:
    """'lora_unet_' + the module path (SGM layout for SDXL) with '.' -> '_'."""
    if family == "sdxl":
        cfg = unet.config
        up_has_attn = ["CrossAttn" in t for t in cfg.up_block_types]
        path = sgm_path(path, cfg.layers_per_block, up_has_attn)
    return "lora_unet_" + path.replace(".", "_")


def text_prefixes(family: str) -> list[str]:
    return ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]


def _base_of(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, LoRAModule) else module


def find_targets(unet: nn.Module, text_encoders: Iterable[nn.Module], family: str, targets: str = "attn",
                 text_encoder: bool = True) -> dict[str, Target]:
    """Every layer the target set selects, keyed by kohya name, in model order."""
    if targets not in TARGET_SETS:
        raise ValueError(f"Unknown target set '{targets}'; choose one of {', '.join(TARGET_SETS)}")
    found: dict[str, Target] = {}
    for path, module in unet.named_modules():
        if isinstance(_base_of(module), (nn.Linear, nn.Conv2d)) and "base" not in path.split(".") \
                and _unet_selected(path, targets):
            base = _base_of(module)
            conv3 = isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1)
            found[unet_kohya_name(path, unet, family)] = Target(
                unet_kohya_name(path, unet, family), unet, path, module, conv3)
    if text_encoder:
        for prefix, te in zip(text_prefixes(family), text_encoders, strict=False):
            for path, module in te.named_modules():
                # transformers 5 dropped CLIPTextModel's `text_model.` level; kohya names keep it
                canonical = path.removeprefix("text_model.")
                if isinstance(_base_of(module), nn.Linear) and _text_selected(canonical, targets):
                    name = prefix + "_text_model_" + canonical.replace(".", "_")
                    found[name] = Target(name, te, path, module, False)
    return found


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, new)


def inject(unet: nn.Module, text_encoders: Iterable[nn.Module], family: str, *, targets: str = "attn",
           rank: int = 16, alpha: float = 8.0, dropout: float = 0.0, text_encoder: bool = True,
           conv_rank: int | None = None, conv_alpha: float | None = None,
           multiplier: float = 1.0) -> dict[str, LoRAModule]:
    """Wrap every selected layer in a LoRA adapter; returns {kohya_name: LoRA module}.

    3x3 convs use conv_rank/conv_alpha when given (kohya's conv_dim/conv_alpha), else rank/alpha.
    """
    modules: dict[str, LoRAModule] = {}
    for name, t in find_targets(unet, text_encoders, family, targets, text_encoder).items():
        if isinstance(t.module, LoRAModule):
            raise ValueError(f"{name} already has an adapter; call remove() first")
        r, a = (conv_rank or rank, conv_alpha or alpha) if t.is_conv3x3 else (rank, alpha)
        lora = wrap(t.module, r, a, dropout, multiplier)
        _set_module(t.root, t.path, lora)
        modules[name] = lora
    return modules


def remove(*roots: nn.Module) -> int:
    """Put every base layer back in place of its LoRA wrapper (unmerging first); returns how many."""
    count = 0
    for root in roots:
        for path, module in list(root.named_modules()):
            if isinstance(module, LoRAModule):
                module.unmerge()
                _set_module(root, path, module.base)
                count += 1
    return count


def set_multiplier(modules: dict[str, LoRAModule] | Iterable[LoRAModule], value: float) -> None:
    """Set the blend multiplier of every adapter (merged ones are unmerged first)."""
    for m in (modules.values() if isinstance(modules, dict) else modules):
        m.unmerge()
        m.multiplier = value


_PER_IMAGE: dict[tuple, torch.Tensor] = {}  # one tensor per (device, values): graphs captured with it stay valid


def set_per_image(modules: dict[str, LoRAModule], values: Sequence[float] | None) -> None:
    """Give image i of the next batches multiplier values[i] in every adapter (None: back to `multiplier`)."""
    tensor = None
    if values is not None:
        device = next(iter(modules.values())).lora_down.weight.device
        key = (str(device), tuple(float(v) for v in values))
        if key not in _PER_IMAGE:
            if len(_PER_IMAGE) >= 16:
                _PER_IMAGE.clear()  # a graph keys on the tensor's address and values, so none reads a stale one
            _PER_IMAGE[key] = torch.tensor(key[1], device=device)
        tensor = _PER_IMAGE[key]
    for m in modules.values():
        m.unmerge()
        m.per_image = tensor


@contextmanager
def adapters_off(modules: dict[str, LoRAModule]) -> Iterator[None]:
    """Run the base model alone inside the block (every multiplier 0), then restore each multiplier."""
    saved = {name: m.multiplier for name, m in modules.items()}
    set_multiplier(modules, 0.0)
    try:
        yield
    finally:
        for name, m in modules.items():
            m.multiplier = saved[name]


def lora_parameters(modules: dict[str, LoRAModule], prefix: str | None = None) -> list[nn.Parameter]:
    """The trainable down/up weights, optionally only of names starting with `prefix`."""
    return [p for name, m in modules.items() if prefix is None or name.startswith(prefix)
            for p in (m.lora_down.weight, m.lora_up.weight)]
