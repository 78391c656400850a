"""Export tab: pick a run's final adapter or a checkpoint, re-save it at a chosen precision, and download
it with its config.toml, a short model card and a preview image; plus what `lora-studio inspect` says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from app.context import AppContext, bind
from app.workspace import AppError, checkpoint_step, is_inside, latest_sample, run_adapters
from lora_core.config import TrainConfig, from_metadata, load_toml, save_toml
from lora_core.export import inspect_file, load_adapter, save_adapter

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_RECOMPUTED = ("sshs_model_hash", "modelspec.hash_sha256")  # save_adapter writes them anew


def run_choices(ctx: AppContext) -> list[str]:
    return [r.name for r in ctx.workspace.runs()]


def adapter_options(ctx: AppContext, run_id: str | None) -> list[tuple[str, str]]:
    if not run_id:
        return []
    return [(label, str(path)) for label, path in run_adapters(ctx.workspace.run(run_id))]


def _config(run: Path, metadata: dict[str, str]) -> TrainConfig:
    if (run / "config.toml").is_file():
        return load_toml(run / "config.toml")
    return from_metadata(metadata)


def model_card(cfg: TrainConfig, file_name: str, info: dict[str, Any], step: int | None, preview: bool) -> str:
    """A short README for the adapter: what it is, its trigger word, how it was trained, how to use it."""
    c = cfg
    trigger = c.data.trigger_word.strip()
    name = Path(file_name).stem
    lines = [f"# {c.saving.output_name}", "",
             f"A LoRA adapter for **{info['family']}** (base model `{c.model.base}`), trained with LoRA Studio"
             + (f" (checkpoint at step {step})." if step else "."), ""]
    lines += [f"**Trigger word:** `{trigger}`; put it in your prompt." if trigger else
              "**Trigger word:** none; the adapter acts on every prompt.", ""]
    lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
    rows = [("rank / alpha", f"{c.lora.rank} / {c.lora.alpha:g}"), ("layers", c.lora.targets),
            ("text encoder trained", "yes" if c.lora.train_text_encoder else "no"),
            ("steps trained", info["metadata"].get("ss_steps") or str(step or c.schedule.steps)),
            ("batch size", str(c.schedule.batch_size)), ("learning rate", f"{c.optim.lr:g} ({c.schedule.scheduler})"),
            ("resolution", str(c.data.resolution)), ("seed", str(c.schedule.seed)),
            ("file", f"`{file_name}` ({info['modules']} layers)")]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Use it", "",
              f"- AUTOMATIC1111 / Forge: copy the file to `models/Lora` and add `<lora:{name}:1>` to the prompt.",
              "- ComfyUI: copy it to `models/loras` and load it with a LoraLoader node.",
              f"- diffusers: `pipe.load_lora_weights(\".\", weight_name=\"{file_name}\")`.", ""]
    if preview:
        lines += ["## Preview", "", "![preview](preview.png)", ""]
    return "\n".join(lines)


def inspect_markdown(info: dict[str, Any]) -> str:
    rows = [("format", info["format"]), ("made for", info["family"]), ("base model version", info["base_model_version"]),
            ("rank", info["rank"]), ("alpha", info["alpha"]),
            ("layers", f"{info['modules']} ({info['unet_modules']} UNet, {info['text_encoder_modules']} text encoder)"),
            ("size", f"{Path(info['file']).stat().st_size / 1024**2:.2f} MB"),
            ("sha256 of the weights", info["metadata"].get("sshs_model_hash", "-")),
            ("metadata keys", len(info["metadata"]))]
    return "\n".join(["| adapter file | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])


def export_adapter(ctx: AppContext, run_id: str, adapter: str, precision: str = "fp16"
                   ) -> tuple[list[str], str, str, str | None, dict[str, str]]:
    """Re-save an adapter of a run at `precision` with its config, card and preview.

    Returns (files to download, inspect summary, model card, preview image, metadata).
    """
    if precision not in PRECISIONS:
        raise AppError(f"Precision must be one of {', '.join(PRECISIONS)}.")
    run = ctx.workspace.run(run_id)
    if not adapter:
        raise AppError("This run has no adapter yet: wait for training to finish, or pick another run.")
    src = ctx.workspace.check_file(adapter)
    if not is_inside(src, run):
        raise AppError(f"{src.name} does not belong to run {run_id}.")
    loaded = load_adapter(src)
    cfg = _config(run, loaded.metadata)
    metadata = {k: v for k, v in loaded.metadata.items() if k not in _RECOMPUTED}
    metadata["saving.precision"] = json.dumps(precision)
    step = checkpoint_step(src)
    out_dir = run / "export"
    out = out_dir / f"{cfg.saving.output_name}{f'-step{step}' if step else ''}-{precision}.safetensors"
    save_adapter(out, loaded.layers, metadata, PRECISIONS[precision])
    config = out_dir / "config.toml"
    if (run / "config.toml").is_file():
        shutil.copyfile(run / "config.toml", config)
    else:
        save_toml(cfg, config)
    files = [str(out), str(config)]
    sample = latest_sample(run)
    if sample is not None:
        shutil.copyfile(sample, out_dir / "preview.png")
    info = inspect_file(out)
    card = model_card(cfg, out.name, info, step, sample is not None)
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    files.append(str(out_dir / "README.md"))
    if sample is not None:
        files.append(str(out_dir / "preview.png"))
    shown = card.replace("![preview](preview.png)", "(the preview image is shown beside this card)")
    return files, inspect_markdown(info), shown, str(out_dir / "preview.png") if sample else None, info["metadata"]


def refresh(ctx: AppContext, run_id: str | None = None) -> tuple[Any, Any]:
    """Updated run list and that run's adapters (newest run when none is chosen)."""
    runs = run_choices(ctx)
    run_id = run_id if run_id in runs else (runs[0] if runs else None)
    options = adapter_options(ctx, run_id)
    return (gr.update(choices=runs, value=run_id),
            gr.update(choices=options, value=options[0][1] if options else None))


def build(ctx: AppContext) -> None:
    runs = run_choices(ctx)
    options = adapter_options(ctx, runs[0]) if runs else []
    with gr.Tab("4. Export", id="export") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                run = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run", allow_custom_value=True,
                                  elem_id="export-run")
                adapter = gr.Dropdown(options, value=options[0][1] if options else None, label="Adapter",
                                      info="The final adapter, or a checkpoint saved during training.",
                                      allow_custom_value=True, elem_id="export-adapter")
                precision = gr.Radio(list(PRECISIONS), value="fp16", label="Precision",
                                     info="fp16 is what other tools expect; fp32 doubles the size.")
                go = gr.Button("Prepare download", variant="primary", elem_id="export-btn")
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
                summary = gr.Markdown(elem_id="inspect")
                with gr.Accordion("All metadata in the file", open=False):
                    metadata = gr.JSON()
            with gr.Column(scale=3):
                card = gr.Markdown(elem_id="model-card")
                preview = gr.Image(label="Preview", interactive=False, height=256)

    go.click(bind(export_adapter, ctx), [run, adapter, precision], [files, summary, card, preview, metadata],
             api_name="export_adapter")
    run.change(lambda r: refresh(ctx, r)[1], run, adapter, api_visibility="private")
    tab.select(bind(refresh, ctx), run, [run, adapter], api_visibility="private", show_progress="hidden")
