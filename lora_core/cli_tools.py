"""`lora-studio merge`, `resize` and `merge-loras`: adapter and checkpoint utilities.

    lora-studio merge --base MODEL --lora FILE[:W] ... --out MERGED.safetensors
    lora-studio resize FILE --rank N --out FILE
    lora-studio merge-loras FILE[:W] ... --out FILE [--mode concat|svd] [--rank N]

cli.py calls `register(subparsers)`; handlers give their results to cli.py's `report` and raise
LoraStudioError subclasses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .cli import report
from .errors import AdapterError, ConfigError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_weighted(spec: str) -> tuple[str, float]:
    """'FILE[:W]' -> (FILE, W); W defaults to 1. A colon not followed by a number belongs to the path."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def _load_adapters(specs: list[str], model: object = None) -> list:
    from .export import load_adapter

    return [(load_adapter(path, model), w) for path, w in map(parse_weighted, specs)]


def _out_path(out: str) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"--out '{out}': the output must be a .safetensors file.")
    return path


def cmd_merge(args: argparse.Namespace) -> int:
    from .adapter_ops import merge_into_checkpoint
    from .models import load_model
    from .singlefile import save_single_file

    out = _out_path(args.out)
    model = load_model(args.base, device=args.device, vae=args.vae)
    adapters = _load_adapters(args.lora, model)
    count = merge_into_checkpoint(model, adapters)
    sources = ", ".join(f"{Path(a.path).name}:{w:g}" for a, w in adapters)
    save_single_file(model, out, dtype=DTYPES[args.dtype], metadata={"modelspec.merged_from": sources})
    report(f"merged {len(adapters)} adapter(s) into {count} layers of {args.base} ({model.family}, "
           f"{model.prediction_type})", f"wrote {out}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from .adapter_ops import resize_adapter
    from .export import load_adapter, save_adapter

    out = _out_path(args.out)
    adapter = load_adapter(args.file)
    resized, energy = resize_adapter(adapter, args.rank)
    save_adapter(out, resized.layers, resized.metadata, dtype=DTYPES[args.dtype])
    report(f"resized {Path(args.file).name}: rank {energy.old_rank} -> {energy.new_rank}, "
           f"alpha {adapter.alpha:g} -> {resized.alpha:g}, {len(resized.layers)} layers",
           f"kept energy: min {energy.min:.4f}, mean {energy.mean:.4f}", f"wrote {out}")
    return 0


def cmd_merge_loras(args: argparse.Namespace) -> int:
    from .adapter_ops import merge_adapters
    from .export import save_adapter

    out = _out_path(args.out)
    if args.mode == "svd" and not args.rank:
        raise AdapterError("--mode svd needs --rank N (the rank of the merged adapter).")
    merged = merge_adapters(_load_adapters(args.files), mode=args.mode, rank=args.rank)
    save_adapter(out, merged.layers, merged.metadata, dtype=DTYPES[args.dtype])
    report(f"merged {len(args.files)} adapters ({args.mode}): {len(merged.layers)} layers, "
           f"rank {merged.metadata['ss_network_dim']}, alpha {merged.metadata['ss_network_alpha']}",
           f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the merge, resize and merge-loras subcommands to `lora-studio`."""
    m = sub.add_parser("merge", help="merge LoRA adapters into a base model; write a single-file checkpoint")
    m.add_argument("--base", required=True, help="MODEL: built-in, diffusers folder, .safetensors/.ckpt, hub id")
    m.add_argument("--lora", required=True, nargs="+", action="extend", metavar="FILE[:W]", help="adapter file, weight W (1)")
    m.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    m.add_argument("--vae", help="replace the base model's VAE with this file or folder")
    m.add_argument("--dtype", choices=DTYPES, default="fp16", help="weight precision in the file (fp16)")
    m.add_argument("--device", default="cpu", help="where to do the merge (cpu, cuda)")
    m.set_defaults(func=cmd_merge)

    r = sub.add_parser("resize", help="change an adapter's rank by SVD, keeping its effect")
    r.add_argument("file", help="adapter file (.safetensors)")
    r.add_argument("--rank", required=True, type=int, help="new rank")
    r.add_argument("--out", required=True, help="output adapter (.safetensors)")
    r.add_argument("--dtype", choices=DTYPES, default="fp16", help="weight precision in the file (fp16)")
    r.set_defaults(func=cmd_resize)

    g = sub.add_parser("merge-loras", help="combine adapters into one (exact concat, or SVD to a rank)")
    g.add_argument("files", nargs="+", metavar="FILE[:W]", help="adapter files with optional weights")
    g.add_argument("--out", required=True, help="output adapter (.safetensors)")
    g.add_argument("--mode", choices=("concat", "svd"), default="concat",
                   help="concat: exact, ranks add up; svd: approximate at --rank")
    g.add_argument("--rank", type=int, help="rank of the result (svd mode)")
    g.add_argument("--dtype", choices=DTYPES, default="fp16", help="weight precision in the file (fp16)")
    g.set_defaults(func=cmd_merge_loras)
