"""Adapter files: the kohya/sd-scripts `.safetensors` format, read and written.

Written: per module `NAME.lora_down.weight`, `NAME.lora_up.weight`, `NAME.alpha` (0-d) and nothing else,
with kohya's `ss_*` metadata, `sshs_model_hash` and `modelspec.*`. Read: kohya files, diffusers/PEFT
(`lora_A`/`lora_B`) files and the older diffusers layouts, all normalised to kohya names.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import math
import os
import re
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from .errors import AdapterError, LoraStudioError
from .inject import _set_module, text_prefixes, unet_kohya_name
from .lora import LoRAModule, wrap
from .models import LoadedModel

log = logging.getLogger(__name__)

FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}
_VERSION_FAMILY = {"sd_v1": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2", "sdxl_base_v1-0": "sdxl"}
_ARCH = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512",
         "sd_v2_v": "stable-diffusion-v2-768-v", "sdxl_base_v1-0": "stable-diffusion-xl-v1-base"}


@dataclass
class LayerWeights:
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class Adapter:
    """An adapter file's content with kohya layer names."""

    path: str
    format: str  # "kohya" | "peft" | "diffusers-old"
    layers: dict[str, LayerWeights]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def family(self) -> str | None:
        """From the metadata, else from the key names (SDXL only), else unknown."""
        version = self.metadata.get("ss_base_model_version", "")
        if version in _VERSION_FAMILY:
            return _VERSION_FAMILY[version]
        if version.startswith("sdxl"):
            return "sdxl"
        if any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks",
                             "lora_unet_middle_block")) for n in self.layers):
            return "sdxl"
        return None

    @property
    def rank(self) -> int:
        return Counter(w.rank for w in self.layers.values()).most_common(1)[0][0]

    @property
    def alpha(self) -> float:
        return Counter(w.alpha for w in self.layers.values()).most_common(1)[0][0]


# ----------------------------------------------------------------------------- writing

def tensor_data_hash(blob: bytes) -> str:
    """SHA-256 of a safetensors file's tensor data: the bytes after the 8-byte length and the header."""
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + n:]).hexdigest()


class WriteError(LoraStudioError, OSError):
    """A file could not be written (disk full, no permission, ...). Both a LoraStudioError, so the CLI
    and the UI show its message, and an OSError (with errno and filename), so code that handles I/O
    errors still catches it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


def _write_error(path: Path, e: OSError) -> WriteError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "the disk is full. Free some space and try again; files saved before are intact"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "there is no permission to write there. Choose another folder"
    else:
        advice = f"{e.strerror or e}"
    err = WriteError(f"Could not write '{path.name}' in {path.parent}: {advice}.")
    err.errno, err.strerror, err.filename = e.errno, e.strerror, str(path)
    return err


def atomic_write_bytes(path: str | Path, blob: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: never a half-written final file.

    A crash (even kill -9) before the rename leaves the previous file untouched and at most a hidden
    `.NAME.*.tmp` beside it; an I/O error (full disk) removes the temp file and raises WriteError.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise _write_error(path, e) from e
        raise


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Save atomically with `sshs_model_hash` and `modelspec.hash_sha256` filled in; returns the hash."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    digest = tensor_data_hash(st_save(tensors, metadata={k: v for k, v in metadata.items() if v is not None}))
    metadata = dict(metadata, sshs_model_hash=digest)
    if any(k.startswith("modelspec.") for k in metadata):
        metadata["modelspec.hash_sha256"] = "0x" + digest
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))
    return digest


def adapter_tensors(layers: dict[str, LayerWeights], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Kohya tensors: down, up in `dtype`; alpha as a 0-d fp32 tensor."""
    out = {}
    for name, w in layers.items():
        out[f"{name}.lora_down.weight"] = w.down.to(dtype)
        out[f"{name}.lora_up.weight"] = w.up.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    return out


def layers_of(modules: dict[str, LoRAModule]) -> dict[str, LayerWeights]:
    return {n: LayerWeights(m.lora_down.weight.detach().float().cpu(), m.lora_up.weight.detach().float().cpu(),
                            m.alpha) for n, m in modules.items()}


def build_metadata(model: LoadedModel, *, rank: int, alpha: float, output_name: str = "lora",
                   network_args: dict | None = None, resolution: int | None = None,
                   trigger_phrase: str = "", extra: dict[str, str] | None = None) -> dict[str, str]:
    """kohya's minimum ss_* keys, the modelspec keys, plus any training fields in `extra`."""
    version = model.base_model_version
    res = resolution or model.resolution
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({k: str(v) for k, v in (network_args or {}).items()}),
        "ss_base_model_version": version,
        "ss_v2": str(model.family == "sd2"),
        "ss_output_name": output_name,
        "ss_resolution": f"({res}, {res})",
        "ss_sd_model_name": model.name,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": _ARCH[version] + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if model.family == "sdxl" else "diffusers",
        "modelspec.title": output_name,
        "modelspec.date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if model.prediction_type == "v_prediction" else "epsilon",
    }
    if trigger_phrase:
        meta["modelspec.trigger_phrase"] = trigger_phrase
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def save_adapter(path: str | Path, modules: dict[str, LoRAModule] | dict[str, LayerWeights],
                 metadata: dict[str, str], dtype: torch.dtype = torch.float16) -> str:
    """Write an adapter file in the kohya format; returns its sshs_model_hash."""
    first = next(iter(modules.values()), None)
    layers = layers_of(modules) if isinstance(first, LoRAModule) else modules  # type: ignore[arg-type]
    return write_safetensors(path, adapter_tensors(layers, dtype), metadata)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- reading

_OLD_LAYOUT = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


MAX_ADAPTER_BYTES = 8 * 1024**3  # tensor bytes; the largest real LoRAs (SDXL, rank 256, fp32) are ~4 GB
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 1024**2  # the safetensors format's own limit


def _available_memory() -> int | None:
    """Bytes of memory available to this process (Linux MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def tensor_bytes(path: str | Path, what: str, limit: int) -> int:
    """Bytes the tensors of a .safetensors file would take in memory, read from its header alone.

    Raises ValueError (with a message for the user) when the header is not a safetensors header, or
    claims more than `limit` bytes or more memory than is available, so nothing is ever allocated for
    a file that lies about its size.
    """
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("the file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= _MAX_HEADER:
            raise ValueError(f"its header claims to be {n} bytes long, which no safetensors file is")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    total = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            shape = [int(d) for d in info["shape"]]
            size = _DTYPE_BYTES[info["dtype"]] * math.prod(shape)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor '{key}' has no valid dtype and shape in the header") from None
        if min(shape, default=0) < 0:
            raise ValueError(f"tensor '{key}' has a negative dimension")
        total += size
    gib = 1024**3
    if total > limit:
        raise ValueError(f"its header claims {total / gib:.1f} GB of tensors, more than a {what} can hold "
                         f"({limit / gib:.0f} GB); the file is damaged or not a {what}")
    available = _available_memory()
    if available is not None and total > available:
        raise ValueError(f"its tensors need {total / gib:.1f} GB of memory but only {available / gib:.1f} GB "
                         "is available. Close other programs, or use a machine with more memory")
    return total


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata, with a clear error for a missing, truncated, oversized or foreign file."""
    p = Path(path)
    if not p.is_file():
        raise AdapterError(f"Adapter file '{p}' does not exist. Check the path, or pick the file again.")
    try:
        tensor_bytes(p, "LoRA adapter", MAX_ADAPTER_BYTES)
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a damaged file
        raise AdapterError(
            f"'{p.name}' is not a readable .safetensors file ({e}). It may be truncated or not a LoRA at "
            "all; download it again or choose another file.") from None


def _peft_to_kohya(key: str, model: LoadedModel | None, family: str) -> str:
    """'unet.<path>' / 'text_encoder[_2].<path>' (PEFT/diffusers) -> kohya layer name."""
    key = key.removeprefix("base_model.model.")
    root, _, path = key.partition(".")
    if root == "unet":
        unet = model.unet if model else _default_unet_config(family)
        return unet_kohya_name(path, unet, family)
    if root in ("text_encoder", "text_encoder_2"):
        prefixes = text_prefixes("sdxl" if root == "text_encoder_2" or family == "sdxl" else family)
        prefix = prefixes[1] if root == "text_encoder_2" else prefixes[0]
        return prefix + "_text_model_" + path.removeprefix("text_model.").replace(".", "_")
    raise AdapterError(f"Key '{key}' names no UNet or text-encoder layer.")


class _Cfg:
    def __init__(self, **kw: object) -> None:
        self.config = type("C", (), kw)


def _default_unet_config(family: str) -> _Cfg:
    return _Cfg(layers_per_block=2, up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])


def _group(tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """Detect the layout and group tensors per layer as {'down','up','alpha'}."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    kohya = all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in tensors)
    fmt = "kohya" if kohya else "peft"
    for key, t in tensors.items():
        if kohya:
            name, _, part = key.partition(".")
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
        elif m := _OLD_LAYOUT.match(key):
            fmt, name = "diffusers-old", f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")
            role = m[3]
        else:
            m = re.match(r"^(.*)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                         r"lora_linear_layer\.up)\.weight$", key)
            name, role = (m[1], "down" if m[2].endswith(("A", "down")) else "up") if m else (key, None)
            if key.endswith(".alpha"):
                name, role = key[: -len(".alpha")], "alpha"
        if role is None:
            raise AdapterError(f"Unexpected tensor '{key}': this file is not a LoRA adapter in a format "
                               "LoRA Studio reads (kohya, diffusers/PEFT). Is it a full model or an embedding?")
        groups.setdefault(name, {})[role] = t
    return fmt, groups


def _layer_weights(name: str, g: dict[str, torch.Tensor], file: str) -> LayerWeights:
    """Check one layer's tensors (present, shapes that fit together, finite) and convert to fp32."""
    if "down" not in g or "up" not in g:
        raise AdapterError(f"Layer '{name}' in '{file}' lacks its {'up' if 'down' in g else 'down'} weight; "
                           "the file is incomplete.")
    down, up = g["down"], g["up"]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or down.shape[0] != up.shape[1] or down.shape[0] < 1 \
            or down.numel() == 0 or up.numel() == 0 or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise AdapterError(f"Layer '{name}' in '{file}' has down {tuple(down.shape)} and up {tuple(up.shape)} "
                           "weights that do not form a LoRA (down [rank, in], up [out, rank]); the file is "
                           "damaged or not a LoRA.")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise AdapterError(f"Layer '{name}' in '{file}' stores {down.dtype}/{up.dtype} weights, not floats; "
                           "it is not a LoRA adapter.")
    alpha = float(down.shape[0])  # no alpha: scale 1
    if "alpha" in g:
        if g["alpha"].numel() != 1:
            raise AdapterError(f"Layer '{name}' in '{file}' has an alpha of shape {tuple(g['alpha'].shape)}; "
                               "it must be a single number. The file is damaged.")
        alpha = float(g["alpha"].float().item())
    down, up = down.float(), up.float()
    if not (math.isfinite(alpha) and bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())):
        raise AdapterError(f"Layer '{name}' in '{file}' holds NaN or infinite values; the file is damaged "
                           "(or was saved from a run that diverged). Use an earlier checkpoint.")
    return LayerWeights(down, up, alpha)


def _check_groups(path: str | Path, tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, dict]]:
    if not tensors:
        raise AdapterError(f"'{Path(path).name}' holds no tensors; it is not a LoRA adapter.")
    return _group(tensors)


def check_adapter_file(path: str | Path) -> None:
    """Raise AdapterError unless `path` is a readable LoRA file in a layout we read (no model needed)."""
    tensors, _ = read_safetensors(path)
    _, groups = _check_groups(path, tensors)
    for name, g in groups.items():
        _layer_weights(name, g, Path(path).name)


def load_adapter(path: str | Path, model: LoadedModel | None = None) -> Adapter:
    """Read an adapter file of any supported layout; layer names normalised to kohya's."""
    tensors, metadata = read_safetensors(path)
    fmt, groups = _check_groups(path, tensors)
    if fmt != "kohya" and not any(k.startswith(("unet.", "text_encoder")) for k in groups):
        groups = {"unet." + k: v for k, v in groups.items()}  # old diffusers files name UNet layers bare
    family = _VERSION_FAMILY.get(metadata.get("ss_base_model_version", ""), model.family if model else "sd1")
    layers = {}
    for name, g in groups.items():
        weights = _layer_weights(name, g, Path(path).name)
        try:
            kname = name if fmt == "kohya" else _peft_to_kohya(name, model, family)
        except (KeyError, ValueError, IndexError, AttributeError, TypeError) as e:
            raise AdapterError(f"Layer '{name}' in '{Path(path).name}' names no layer of a "
                               f"{FAMILY_NAMES[family]} model ({type(e).__name__}: {e}).") from None
        layers[kname] = weights
    return Adapter(str(path), fmt, layers, metadata)


# ----------------------------------------------------------------------------- applying

def model_layers(model: LoadedModel) -> dict[str, tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Every Linear/Conv2d of the UNet and text encoders by kohya name: (root, path, layer)."""
    out = {}
    for path, mod in model.unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, LoRAModule)) and ".base" not in f".{path}":
            out[unet_kohya_name(path, model.unet, model.family)] = (model.unet, path, mod)
    for prefix, te in zip(text_prefixes(model.family), model.text_encoders, strict=False):
        for path, mod in te.named_modules():
            if isinstance(mod, (torch.nn.Linear, LoRAModule)) and ".base" not in f".{path}":
                out[prefix + "_text_model_" + path.removeprefix("text_model.").replace(".", "_")] = (te, path, mod)
    return out


def check_fits(adapter: Adapter, model: LoadedModel) -> dict[str, tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Refuse an adapter made for another family or shape, naming what each is."""
    name = Path(adapter.path).name
    fam = adapter.family
    if fam is not None and fam != model.family:
        raise AdapterError(f"'{name}' is a {FAMILY_NAMES[fam]} LoRA, but the base model '{model.name}' is "
                           f"{FAMILY_NAMES[model.family]}. Choose a {FAMILY_NAMES[fam]} base, or an adapter "
                           f"trained for {FAMILY_NAMES[model.family]}.")
    layers = model_layers(model)
    missing = [n for n in adapter.layers if n not in layers]
    if missing:
        raise AdapterError(f"'{name}' does not fit the base model '{model.name}' "
                           f"({FAMILY_NAMES[model.family]}): {len(missing)} of its {len(adapter.layers)} "
                           f"layers do not exist there, e.g. '{missing[0]}'. It was made for another model.")
    for n, w in adapter.layers.items():
        base = layers[n][2].base if isinstance(layers[n][2], LoRAModule) else layers[n][2]
        shape = tuple(base.weight.shape)
        if (w.up.shape[0], w.down.shape[1]) != shape[:2] or math.prod(w.down.shape[1:]) != math.prod(shape[1:]):
            in_file = "x".join(map(str, (w.up.shape[0], *w.down.shape[1:])))
            raise AdapterError(f"'{name}' does not fit the base model '{model.name}': layer '{n}' is "
                               f"{in_file} in the file but {'x'.join(map(str, shape))} in the model. It was "
                               "made for a model of another size.")
    return layers


def apply_adapter(model: LoadedModel, adapter: Adapter, multiplier: float = 1.0) -> dict[str, LoRAModule]:
    """Inject the file's layers into the model at `multiplier`; returns {kohya_name: LoRA module}."""
    layers = check_fits(adapter, model)
    modules = {}
    for n, w in adapter.layers.items():
        root, path, layer = layers[n]
        if isinstance(layer, LoRAModule):
            raise AdapterError(f"Layer '{n}' already carries an adapter; remove it before applying another.")
        base_w = layer.weight
        lora = wrap(layer, w.rank, w.alpha, 0.0, multiplier)
        with torch.no_grad():
            lora.lora_down.weight.copy_(w.down.reshape(lora.lora_down.weight.shape).to(base_w.device))
            lora.lora_up.weight.copy_(w.up.reshape(lora.lora_up.weight.shape).to(base_w.device))
        lora.requires_grad_(False)
        _set_module(root, path, lora)
        modules[n] = lora
    return modules


def inspect_file(path: str | Path) -> dict:
    """What `lora-studio inspect` prints: format, family, rank, alpha, module count, metadata."""
    a = load_adapter(path)
    meta = a.metadata
    return {
        "file": str(path),
        "format": a.format,
        "family": FAMILY_NAMES.get(a.family or "", "unknown (no metadata; SD1.x or SD2.x)"),
        "base_model_version": meta.get("ss_base_model_version", "unknown"),
        "rank": a.rank,
        "alpha": a.alpha,
        "modules": len(a.layers),
        "unet_modules": sum(n.startswith("lora_unet") for n in a.layers),
        "text_encoder_modules": sum(n.startswith("lora_te") for n in a.layers),
        "metadata": meta,
    }
