"""`lora-studio` command line: the same engine as the web UI, headless."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from .errors import LoraStudioError

log = logging.getLogger("lora_studio")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .export import inspect_file

    info = inspect_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("file", "format", "family", "base_model_version", "rank", "alpha", "modules",
                "unet_modules", "text_encoder_modules"):
        print(f"{key:22} {info[key]}")
    meta = info["metadata"]
    print(f"metadata ({len(meta)} keys)")
    for k in sorted(meta):
        v = meta[k] if len(meta[k]) <= 100 else meta[k][:97] + "..."
        print(f"  {k:30} {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-studio", description="Train Stable Diffusion LoRA adapters.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command")
    ins = sub.add_parser("inspect", help="describe an adapter file: format, family, rank, alpha, metadata")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return func(args)
    except LoraStudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
