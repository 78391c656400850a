"""Generate tab: one prompt, the base model and the same seed with up to three adapters applied (each
with its own weight, -1..2), side by side; and a scale sweep of the adapters' weights as one row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from app import uploads
from app.context import AppContext, bind
from app.tabs.train import check_base
from app.ui_fields import WELL_KNOWN_BASES
from app.workspace import AppError, run_adapters
from lora_core.config import load_toml
from lora_core.errors import AdapterError, ConfigError
from lora_core.export import check_adapter_file

SLOTS = 3
SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)
WEIGHT_RANGE = (-1.0, 2.0)


def adapter_choices(ctx: AppContext) -> list[tuple[str, str]]:
    """(label, path) of every run's final adapter and checkpoints (newest run first), then uploads."""
    choices = [(f"{run.name}: {label}", str(path))
               for run in ctx.workspace.runs() for label, path in run_adapters(run)]
    choices += [(f"uploaded: {p.name}", str(p)) for p in sorted(ctx.workspace.adapters_dir.glob("*.safetensors"))]
    return choices


def default_base(ctx: AppContext) -> str:
    """The base model of the newest run, else `demo`."""
    for run in ctx.workspace.runs():
        if (run / "config.toml").is_file():
            try:
                return load_toml(run / "config.toml").model.base
            except ConfigError:  # a damaged config only loses the default
                continue
    return "demo"


def upload_adapters(ctx: AppContext, files: list[str] | None) -> list[str]:
    """Keep uploaded .safetensors adapters in the workspace (names cleaned); returns their new paths.

    Each file is checked first (a readable LoRA in a layout we read, tensors of a sane size); a bad one
    is not kept, and the error names it. Good files of the same upload are kept.
    """
    added, problems = [], []
    for f in files or []:
        src = Path(f)
        if src.suffix.lower() != ".safetensors":
            problems.append(f"{src.name}: adapters must be .safetensors files.")
            continue
        try:
            check_adapter_file(src)
        except AdapterError as e:
            problems.append(str(e))
            continue
        dest = ctx.workspace.adapters_dir / uploads.safe_file_name(src.name, ".safetensors", "adapter")
        added.append(str(uploads.store_upload(src, dest)))
    if problems:
        kept = f" Kept: {', '.join(Path(a).name for a in added)}." if added else ""
        raise AdapterError("Not added:\n" + "\n".join(problems) + kept)
    return added


def _loras(ctx: AppContext, slots: list[tuple[str | None, float | None]]) -> list[tuple[str, float]]:
    out = []
    for path, weight in slots:
        if not path:
            continue
        w = float(weight if weight is not None else 1.0)
        if not WEIGHT_RANGE[0] <= w <= WEIGHT_RANGE[1]:
            raise AppError(f"Adapter weights go from {WEIGHT_RANGE[0]:g} to {WEIGHT_RANGE[1]:g}; got {w:g}.")
        out.append((str(ctx.workspace.check_file(path)), w))
    return out


def _draw(base: str, prompt: str, loras: list[tuple[str, float]], **kw: Any) -> Image.Image:
    from lora_core.sampling import generate

    return generate(base, [prompt], loras=loras, **kw)[0]


def _settings(ctx: AppContext, base: str, prompt: str, negative: str, seed: float, steps: float, size: float,
              guidance: float) -> dict[str, Any]:
    base = (base or "").strip() or "demo"
    check_base(ctx, base)
    if not (prompt or "").strip():
        raise AppError("Type a prompt.")
    if not 1 <= int(steps or 0) <= 200:
        raise AppError("Steps go from 1 to 200.")
    if int(size or 0) % 8:
        raise AppError("Size must be a multiple of 8 (or 0 for the model's own size).")
    return dict(base=base, prompt=prompt.strip(), negative=negative or "", seed=int(seed or 0), steps=int(steps),
                size=int(size) or None, guidance=float(guidance))


def generate_pair(ctx: AppContext, base: str, prompt: str, negative: str, seed: float, steps: float, size: float,
                  guidance: float, adapter_1: str | None = None, weight_1: float = 1.0,
                  adapter_2: str | None = None, weight_2: float = 1.0, adapter_3: str | None = None,
                  weight_3: float = 1.0) -> tuple[Image.Image, Image.Image, str]:
    """(base image, image with the adapters, description): same prompt, same seed."""
    s = _settings(ctx, base, prompt, negative, seed, steps, size, guidance)
    loras = _loras(ctx, [(adapter_1, weight_1), (adapter_2, weight_2), (adapter_3, weight_3)])
    model, text = s.pop("base"), s.pop("prompt")
    plain = _draw(model, text, [], **s)
    with_loras = _draw(model, text, loras, **s)
    used = ", ".join(f"{Path(p).parent.name}/{Path(p).name} x {w:g}" for p, w in loras) or "none selected"
    return plain, with_loras, f"Seed {int(seed or 0)}, {int(steps)} steps. Adapters: {used}."


def scale_sweep(ctx: AppContext, base: str, prompt: str, negative: str, seed: float, steps: float, size: float,
                guidance: float, adapter_1: str | None = None, weight_1: float = 1.0,
                adapter_2: str | None = None, weight_2: float = 1.0, adapter_3: str | None = None,
                weight_3: float = 1.0) -> list[tuple[Image.Image, str]]:
    """Images with every adapter's weight multiplied by 0, 0.25, 0.5, 0.75 and 1 (same seed)."""
    loras = _loras(ctx, [(adapter_1, weight_1), (adapter_2, weight_2), (adapter_3, weight_3)])
    if not loras:
        raise AppError("Choose at least one adapter for the sweep.")
    s = _settings(ctx, base, prompt, negative, seed, steps, size, guidance)
    model, text = s.pop("base"), s.pop("prompt")
    return [(_draw(model, text, [(p, w * k) for p, w in loras], **s), f"x {k:g}") for k in SWEEP]


def refresh_choices(ctx: AppContext, *current: str | None) -> list[Any]:
    """New choices for every adapter slot; slot 1 gets the newest adapter if it is empty."""
    choices = adapter_choices(ctx)
    values = list(current) + [None] * (SLOTS - len(current))
    if not values[0] and choices:
        values[0] = choices[0][1]
    return [gr.update(choices=choices, value=v) for v in values[:SLOTS]]


def _after_upload(ctx: AppContext, files: list[str] | None, *current: str | None) -> list[Any]:
    added = upload_adapters(ctx, files)
    values = list(current)
    for path in added:  # fill empty slots with the new files
        if None in values or "" in values:
            values[values.index(None) if None in values else values.index("")] = path
    return refresh_choices(ctx, *values)


def build(ctx: AppContext) -> None:
    choices = adapter_choices(ctx)
    with gr.Tab("3. Generate", id="generate") as tab:
        with gr.Row():
            with gr.Column(scale=4):
                base = gr.Dropdown(WELL_KNOWN_BASES, value=default_base(ctx), allow_custom_value=True,
                                   label="Base model", elem_id="gen-base")
                prompt = gr.Textbox(label="Prompt", lines=2, value="a red circle on a white background",
                                    elem_id="gen-prompt")
                negative = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                    steps = gr.Number(20, label="Steps", precision=0, minimum=1, maximum=200, elem_id="gen-steps")
                    size = gr.Number(0, label="Size (px, 0 = model's own)", precision=0, minimum=0, maximum=2048,
                                     step=8)
                    guidance = gr.Number(7.0, label="Guidance", minimum=1.0, maximum=30.0)
                slots: list[gr.components.Component] = []
                with gr.Group():
                    for i in range(1, SLOTS + 1):
                        with gr.Row():
                            slots.append(gr.Dropdown(choices, value=choices[0][1] if i == 1 and choices else None,
                                                     allow_custom_value=True, label=f"Adapter {i}", scale=3,
                                                     elem_id=f"gen-adapter-{i}"))
                            slots.append(gr.Slider(*WEIGHT_RANGE, value=1.0, step=0.05, label="Weight", scale=2,
                                                   elem_id=f"gen-weight-{i}"))
                upload = gr.UploadButton("Upload adapters (.safetensors)", file_count="multiple",
                                         file_types=[".safetensors"], size="sm")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                    sweep_btn = gr.Button("Scale sweep 0 to 1", elem_id="sweep-btn")
            with gr.Column(scale=5):
                with gr.Row():
                    plain = gr.Image(label="Base model", format="png", interactive=False, height=280,
                                     elem_id="img-base")
                    with_lora = gr.Image(label="With adapters", format="png", interactive=False, height=280,
                                         elem_id="img-lora")
                info = gr.Markdown()
                sweep = gr.Gallery(label="Scale sweep: every adapter's weight times 0, 0.25, 0.5, 0.75, 1",
                                   columns=5, rows=1, height=220, format="png", object_fit="contain",
                                   elem_id="sweep")

    inputs = [base, prompt, negative, seed, steps, size, guidance, *slots]
    adapters = slots[0::2]
    go.click(bind(generate_pair, ctx), inputs, [plain, with_lora, info], api_name="generate_pair",
             concurrency_id="gpu", concurrency_limit=1)
    sweep_btn.click(bind(scale_sweep, ctx), inputs, sweep, api_name="scale_sweep", concurrency_id="gpu",
                    concurrency_limit=1)
    tab.select(bind(refresh_choices, ctx), adapters, adapters, api_visibility="private", show_progress="hidden")
    upload.upload(bind(_after_upload, ctx), [upload, *adapters], adapters, api_name="upload_adapters")
