"""Operations on adapters: merge into a base checkpoint, resize to a lower rank (SVD), merge adapters.

Adapters are read and written by `lora_core.export`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AdapterError
from .export import FAMILY_NAMES, Adapter, LayerWeights, check_fits
from .lora import LoRAModule, delta_weight, merged_weight
from .models import LoadedModel

log = logging.getLogger(__name__)

def merge_into_checkpoint(model: LoadedModel, adapters: Sequence[tuple[Adapter, float]]) -> int:
    """Fold `weight · ΔW` of each adapter into the model's base weights, in place; returns layers changed.

    Every new weight is computed (fp32) and checked finite before any is written, so a refused merge
    leaves the model as it was. Save the result with checkpoint.save_single_file.
    """
    deltas: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
    for adapter, weight in adapters:
        layers = check_fits(adapter, model)
        for name, w in adapter.layers.items():
            layer = layers[name][2]
            if isinstance(layer, LoRAModule):
                raise AdapterError(f"Layer '{name}' carries an injected adapter; remove it before merging files.")
            delta = weight * delta_weight(w.down, w.up, w.alpha / w.rank).reshape(layer.weight.shape)
            prev = deltas.get(id(layer), (layer, 0.0))[1]
            deltas[id(layer)] = (layer, prev + delta.to(layer.weight.device))
    new = {k: merged_weight(layer.weight, delta) for k, (layer, delta) in deltas.items()}
    with torch.no_grad():
        for k, (layer, _) in deltas.items():
            layer.weight.copy_(new[k])
    log.info("merged %d adapter(s) into %d layers of %s", len(adapters), len(deltas), model.name)
    return len(deltas)


def _low_rank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of up @ down ([out, r] @ [r, in]) through two thin QRs: exact, O((out + in)·r²), float64."""
    qu, ru = torch.linalg.qr(up.double())  # up = qu @ ru
    qd, rd = torch.linalg.qr(down.double().T)  # down = rd.T @ qd.T
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def _truncate(w: LayerWeights, rank: int) -> tuple[LayerWeights, float]:
    """The best factors of up @ down at min(rank, old rank), same effective scale; and the kept energy."""
    r, k = w.rank, min(rank, w.rank)
    u, s, vh = _low_rank_svd(w.up.reshape(w.up.shape[0], r), w.down.reshape(r, -1))
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    root = s[:k].sqrt()  # split σ over both factors: similar magnitudes, kinder to fp16
    up, down = u[:, :k] * root, root[:, None] * vh[:k]
    if up.shape[1] < k:  # a layer narrower than k: zero factors fill the rank
        up, down = torch.cat([up, up.new_zeros(up.shape[0], k - up.shape[1])], 1), \
            torch.cat([down, down.new_zeros(k - down.shape[0], down.shape[1])])
    return LayerWeights(down.float().reshape(k, *w.down.shape[1:]),
                        up.float().reshape(w.up.shape[0], k, *w.up.shape[2:]), w.alpha / r * k), kept


@dataclass
class ResizeReport:
    """Fraction of each layer's squared singular values kept by the resize (1.0 = nothing lost)."""

    old_rank: int
    new_rank: int
    kept_energy: dict[str, float]

    @property
    def min(self) -> float:
        return min(self.kept_energy.values(), default=1.0)

    @property
    def mean(self) -> float:
        return sum(self.kept_energy.values()) / max(len(self.kept_energy), 1)


def _common(values: list) -> str:
    return str(values[0]) if values and all(v == values[0] for v in values) else "Dynamic"


def _rank_metadata(meta: dict[str, str], layers: dict[str, LayerWeights], comment: str) -> dict[str, str]:
    """Metadata with ss_network_dim/alpha (and conv_dim/alpha args) matching `layers`; stale hashes dropped."""
    out = {k: v for k, v in meta.items() if k not in ("sshs_model_hash", "sshs_legacy_hash",
                                                      "modelspec.hash_sha256")}
    conv = [w for w in layers.values() if w.down.dim() == 4 and w.down.shape[2:] != (1, 1)]
    plain = [w for w in layers.values() if not (w.down.dim() == 4 and w.down.shape[2:] != (1, 1))]
    out["ss_network_dim"] = _common([w.rank for w in plain or conv])
    out["ss_network_alpha"] = _common([w.alpha for w in plain or conv])
    try:
        args = json.loads(out.get("ss_network_args", "{}") or "{}")
    except json.JSONDecodeError:
        args = {}
    if conv and isinstance(args, dict):
        args.update(conv_dim=_common([w.rank for w in conv]), conv_alpha=_common([w.alpha for w in conv]))
        out["ss_network_args"] = json.dumps(args)
    out["ss_training_comment"] = "; ".join(filter(None, [meta.get("ss_training_comment"), comment]))
    return out


def resize_adapter(adapter: Adapter, new_rank: int) -> tuple[Adapter, ResizeReport]:
    """Every layer cut to `new_rank` by SVD with the same alpha/rank·ΔW: new_alpha = old_alpha/old_rank·new_rank.

    Ranks are capped at each layer's old rank (a larger rank would add nothing).
    """
    if new_rank < 1:
        raise AdapterError(f"The new rank must be at least 1, not {new_rank}.")
    if new_rank > adapter.rank:
        log.warning("rank %d is above the adapter's rank %d; layers keep their rank", new_rank, adapter.rank)
    layers, kept = {}, {}
    for name, w in adapter.layers.items():
        layers[name], kept[name] = _truncate(w, new_rank)
    meta = _rank_metadata(adapter.metadata, layers, f"resized from rank {adapter.rank} to {new_rank}")
    report = ResizeReport(adapter.rank, new_rank, kept)
    log.info("resized %s to rank %d: kept energy min %.4f, mean %.4f", adapter.path, new_rank, report.min,
             report.mean)
    return Adapter(adapter.path, "kohya", layers, meta), report


def merge_adapters(adapters: Sequence[tuple[Adapter, float]], mode: str = "concat",
                   rank: int | None = None) -> Adapter:
    """One adapter with ΔW = Σ wᵢ·ΔWᵢ per layer.

    concat: exact; ranks add up, each wᵢ·alphaᵢ/rᵢ folded into the factors, alpha = rank (scale 1).
    svd: that concatenation reduced to `rank` by SVD (exact where the sum has rank <= `rank`).
    """
    if mode not in ("concat", "svd"):
        raise AdapterError(f"Unknown merge mode '{mode}'; choose 'concat' (exact) or 'svd' (to a rank).")
    if mode == "svd" and not rank:
        raise AdapterError("An SVD merge needs the target rank (--rank N).")
    if not adapters:
        raise AdapterError("Nothing to merge: give at least one adapter file.")
    families = {a.family for a, _ in adapters if a.family}
    if len(families) > 1:
        raise AdapterError("These adapters are for different model families ("
                           + ", ".join(sorted(FAMILY_NAMES[f] for f in families)) + "); merge adapters of one.")
    names = list(dict.fromkeys(n for a, _ in adapters for n in a.layers))
    layers = {n: _concat(n, [(a.layers[n], w) for a, w in adapters if n in a.layers]) for n in names}
    first = adapters[0][0]
    sources = ", ".join(f"{Path(a.path).name}:{w:g}" for a, w in adapters)
    meta = _rank_metadata(dict(first.metadata, ss_merged_from=sources), layers, f"merged ({mode}) from {sources}")
    merged = Adapter("", "kohya", layers, meta)
    return resize_adapter(merged, rank)[0] if mode == "svd" and rank else merged


def _concat(name: str, parts: list[tuple[LayerWeights, float]]) -> LayerWeights:
    """Stack the factors along the rank: up = [s₁·up₁ | s₂·up₂ ...], down = [down₁; down₂ ...] (√|s| each)."""
    ref_down, ref_up = parts[0][0].down, parts[0][0].up
    downs, ups = [], []
    for w, weight in parts:
        if w.up.shape[0] != ref_up.shape[0] or w.down[0].numel() != ref_down[0].numel():
            raise AdapterError(f"Layer '{name}' has different shapes in the adapters ({list(w.up.shape)} x "
                               f"{list(w.down.shape)} vs {list(ref_up.shape)} x {list(ref_down.shape)}); "
                               "they were made for different models.")
        s = weight * w.alpha / w.rank
        root = abs(s) ** 0.5
        downs.append(w.down.reshape(w.rank, *ref_down.shape[1:]) * root)
        ups.append(w.up.reshape(ref_up.shape[0], w.rank, *ref_up.shape[2:]) * (root if s >= 0 else -root))
    down, up = torch.cat(downs), torch.cat(ups, 1)
    return LayerWeights(down, up, float(down.shape[0]))
