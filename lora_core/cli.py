"""`lora-studio` command line: the same engine as the web UI, headless."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from .errors import ConfigError, LoraStudioError

log = logging.getLogger("lora_studio")


def report(*lines: str) -> None:
    """A command's result on stdout, a line each (what a script that runs the command reads)."""
    print("\n".join(lines))


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


def _progress(event, total: list[int]) -> None:
    """One status line on stderr: a bar, step, loss, samples/s and ETA; other events on their own line."""
    if event.kind == "started":
        total[0] = event.total_steps
        print(f"training {event.images} images for {event.total_steps} steps on {event.device} -> "
              f"{event.run_dir}", file=sys.stderr)
    elif event.kind == "step":
        n = total[0] or 1
        bar = "#" * int(30 * event.step / n)
        print(f"\r[{bar:<30}] {event.step}/{n} loss {event.loss:.4f} {event.samples_per_s:.1f} samples/s "
              f"ETA {event.eta_s:.0f}s ", end="", file=sys.stderr, flush=True)
    elif event.kind == "sample":
        print(f"\npreview at step {event.step}: {', '.join(event.paths)}", file=sys.stderr)
    elif event.kind == "saved":
        print(f"\nsaved {event.path}", file=sys.stderr)
    elif event.kind == "finished":
        state = "stopped" if event.stopped else "finished"
        print(f"{state} at step {event.step} in {event.seconds:.1f}s: {event.adapter}", file=sys.stderr)
    elif event.kind == "failed":
        print(f"\nfailed at step {event.step}: {event.message}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    import threading
    import time
    from pathlib import Path

    from .config import load_toml, resolve, validate
    from .trainer import train

    overrides = list(args.set or [])
    if args.resume:
        run = Path(args.resume)
        cfg = load_toml(run / "config.toml")
        from .config import apply_overrides

        cfg = apply_overrides(cfg, overrides + _data_base_overrides(args))
        validate(cfg)
    else:
        cfg = resolve(preset=args.preset, config_file=args.config, overrides=_data_base_overrides(args) + overrides)
        if not cfg.data.dir:
            raise ConfigError("No images given: pass --data DIR (a folder of images with optional .txt captions).")
        run = Path(args.out or f"runs/{cfg.saving.output_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    import torch

    from .checkpoints import OOM_ADVICE

    stop, total, failed = threading.Event(), [0], False
    try:
        for event in train(cfg, stop, run_dir=run, resume=bool(args.resume)):
            _progress(event, total)
            failed = failed or event.kind == "failed"
    except KeyboardInterrupt:
        print("\ninterrupted: the last checkpoint is kept; continue with --resume " + str(run), file=sys.stderr)
        return 130
    except LoraStudioError:
        print(file=sys.stderr)  # end the progress line; main() prints the message
        raise
    except torch.cuda.OutOfMemoryError:  # outside the step loop (model load, previews), where the trainer
        torch.cuda.empty_cache()  # does not turn it into a Failed event
        print(f"\nerror: {OOM_ADVICE}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _data_base_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.data:
        out.append(f"data.dir={args.data}")
    if args.base:
        out.append(f"model.base={args.base}")
    return out


def _lora_arg(text: str) -> tuple[str, float]:
    path, sep, scale = text.rpartition(":")
    if sep and path and not path.endswith(("\\", "/")):
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def cmd_generate(args: argparse.Namespace) -> int:
    from .sampling import generate, save_png

    size = None
    if args.size:
        w, _, h = args.size.lower().partition("x")
        size = (int(w), int(h or w))
    images = generate(args.base, [args.prompt], loras=[_lora_arg(x) for x in args.lora or []],
                      negative=args.negative or "", seed=args.seed, steps=args.steps, size=size,
                      guidance=args.guidance)
    print(save_png(images[0], args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-studio", description="Train Stable Diffusion LoRA adapters.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("ui", help="start the web UI (the default with no command); see `lora-studio ui --help`")
    ins = sub.add_parser("inspect", help="describe an adapter file: format, family, rank, alpha, metadata")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(func=cmd_inspect)

    tr = sub.add_parser("train", help="train a LoRA on a folder of images")
    tr.add_argument("--data", help="folder of images (+ same-name .txt captions; N_name subfolders = repeats)")
    tr.add_argument("--base", help="base model: demo, tiny:sd1, a hub id, a diffusers folder or a .safetensors")
    group = tr.add_mutually_exclusive_group()
    group.add_argument("--preset", help="a preset name from presets/")
    group.add_argument("--config", help="a TOML file of settings")
    tr.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override one setting")
    tr.add_argument("--out", help="run folder (default runs/NAME-TIMESTAMP)")
    tr.add_argument("--resume", metavar="RUN", help="continue a stopped or checkpointed run")
    tr.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="draw an image with a base model and adapters at chosen weights")
    gen.add_argument("--base", default="demo")
    gen.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="adapter and weight (default 1)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=7.0)
    gen.add_argument("--size", help="WxH in pixels (default: the model's native size)")
    gen.add_argument("--out", default="out.png")
    gen.set_defaults(func=cmd_generate)

    from . import cli_tools

    cli_tools.register(sub)
    return p


def run_ui_command(argv: list[str]) -> int:
    """`lora-studio [ui] [--host H] [--port P] ...`: the web UI. Only this command loads the app package
    (and with it gradio); the engine itself never imports it."""
    from app.main import add_ui_arguments, run_ui

    parser = add_ui_arguments(argparse.ArgumentParser(prog="lora-studio ui", description="Start the web UI."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_ui(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "ui" or argv[0].startswith("--") and argv[0] not in ("--help", "-h"):
        return run_ui_command(argv[1:] if argv and argv[0] == "ui" else argv)
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
    except OSError as e:  # the machine, not the program: a missing file, no permission, a full disk
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}. Check the path and that there is space and permission.",
              file=sys.stderr)
        log.debug("details", exc_info=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
