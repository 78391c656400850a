"""Train tab: base model, preset, settings (basic in view, the rest under Advanced), an estimate, and
Start / Stop / Resume with live progress, loss plot, previews and log.

Progress streams through `watch_job`, a generator that yields whenever the job's state changes and ends
with the job. Every page load and every change of the hidden job marker (polled every 2 s, so a second
tab notices a job started elsewhere) starts a watcher, which is how a reload reconnects.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app import datasets, uploads
from app.context import AppContext, bind
from app.estimate import estimate_markdown
from app.jobs import JobState, format_seconds
from app.ui_fields import BASIC, DEFAULTS, config_from_params, form_values, preset_config, start_preset
from app.workspace import AppError, is_inside
from lora_core.config import list_presets, load_toml, validate
from lora_core.dataset import scan
from lora_core.errors import ConfigError, ModelError

KEEP_ON_PRESET = ("data.trigger_word", "data.default_caption")  # belong to the dataset, not the recipe
ESTIMATE_KEYS = ("model.base", *BASIC, "data.repeats", "schedule.epochs", "optim.grad_accum",
                 "performance.gradient_checkpointing", "sampling.steps", "sampling.scales", "sampling.size")
CHECKPOINT_TYPES = (".safetensors", ".ckpt")
WATCH_TIMEOUT_S = 1.0
LOG_TAIL = 8  # lines shown; the whole log is RUN/log.jsonl
MIN_YIELD_INTERVAL_S = 0.25
_TITLES = {"starting": "Starting", "running": "Training", "stopping": "Stopping", "finished": "Finished",
           "stopped": "Stopped", "failed": "Failed", "interrupted": "Interrupted"}


def preset_keys(ctx: AppContext) -> list[str]:
    return [k for k in ctx.form.keys() if k not in KEEP_ON_PRESET]


def apply_preset(ctx: AppContext, name: str) -> list[Any]:
    """Form values for the defaults with preset `name` applied (in `preset_keys` order)."""
    return form_values(preset_config(name), preset_keys(ctx))


def estimate_run(ctx: AppContext, **params: Any) -> str:
    """Rough time and memory of the run the form describes."""
    try:
        cfg = config_from_params(params)
    except ConfigError as e:
        return "**Fix these settings first:**\n" + "\n".join(f"- {p}" for p in e.problems)
    return estimate_markdown(cfg, len(datasets.list_images(ctx.workspace.dataset_dir)))


def upload_checkpoint(ctx: AppContext, file: str | None) -> str:
    """Keep an uploaded base-model checkpoint in the workspace; returns its path (the new base model)."""
    if not file:
        raise AppError("No file was uploaded.")
    src = Path(file)
    if src.suffix.lower() not in CHECKPOINT_TYPES:
        raise AppError(f"{src.name}: a base model checkpoint must be a {' or '.join(CHECKPOINT_TYPES)} file.")
    if src.suffix.lower() == ".safetensors":
        _check_safetensors_checkpoint(src)
    dest = ctx.workspace.models_dir / uploads.safe_file_name(src.name, src.suffix.lower(), "model")
    return str(uploads.store_upload(src, dest))


def _check_safetensors_checkpoint(path: Path) -> None:
    """Header only (no tensor is read): a truncated file or one that claims absurd sizes is refused now.
    A .ckpt is checked when it is loaded (without running its pickle code)."""
    from safetensors import safe_open

    from lora_core.export import tensor_bytes
    from lora_core.singlefile import MAX_CHECKPOINT_BYTES

    try:
        tensor_bytes(path, "Stable Diffusion checkpoint", MAX_CHECKPOINT_BYTES)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            f.keys()
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ModelError(f"'{path.name}' is not a readable .safetensors checkpoint ({e}). It may be truncated; "
                         "download it again.") from None


def check_base(ctx: AppContext, base: str) -> None:
    """A local path as base model must be an uploaded checkpoint or inside an --allow-folder folder."""
    path = Path(base).expanduser()
    looks_local = path.is_absolute() or base.startswith((".", "~")) or path.suffix.lower() in CHECKPOINT_TYPES \
        or path.exists()
    if not looks_local:
        return  # a built-in name or a hub id
    roots = (ctx.workspace.models_dir, *ctx.allowed_folders)
    if not any(is_inside(path, root) for root in roots):
        raise AppError(f"The base model path {base} is outside the folders this app may read. Upload the "
                       "checkpoint, or start the app with --allow-folder naming its folder.")


def start_training(ctx: AppContext, **params: Any) -> tuple[str, str]:
    """Start a new run of the form's settings on a copy of the dataset: (status, job marker)."""
    ctx.jobs.check_idle()
    cfg = config_from_params(params, check=False)
    cfg.data.dir = str(ctx.workspace.dataset_dir)
    validate(cfg)
    check_base(ctx, cfg.model.base)
    if not datasets.list_images(ctx.workspace.dataset_dir):
        raise AppError("The dataset is empty. Add images on the Dataset tab (or load the example dataset) first.")
    scan(ctx.workspace.dataset_dir, trigger_word=cfg.data.trigger_word)  # DatasetError if nothing usable
    run = ctx.workspace.new_run_dir(cfg.saving.output_name)
    datasets.snapshot(ctx.workspace.dataset_dir, run / "dataset")
    cfg.data.dir = str(run / "dataset")
    state = ctx.jobs.start(cfg, run)
    return status_html(state), job_marker(ctx)


def stop_training(ctx: AppContext) -> str:
    return status_html(ctx.jobs.stop())


def resume_training(ctx: AppContext) -> tuple[str, str]:
    """Continue the last run from its saved state, with the settings it was started with."""
    state = ctx.jobs.snapshot()
    if state is None or not state.resumable:
        raise AppError("There is no stopped run with saved state to resume. Start a new run instead.")
    run = Path(state.run_dir)
    cfg = load_toml(run / "config.toml")
    new = ctx.jobs.start(cfg, run, resume=True)
    return status_html(new), job_marker(ctx)


def last_run_form(ctx: AppContext) -> list[Any]:
    """Form values of the current (or last) run's config, so a reload shows what is training; else skips."""
    state = ctx.jobs.snapshot()
    config = Path(state.run_dir) / "config.toml" if state else None
    if config is None or not config.is_file():
        return [gr.skip()] * (len(ctx.form.keys()) + 1)
    try:
        cfg = load_toml(config)
    except ConfigError:
        return [gr.skip()] * (len(ctx.form.keys()) + 1)
    return ["(settings of the last run)", *form_values(cfg, ctx.form.keys())]  # type: ignore[union-attr]


def job_marker(ctx: AppContext) -> str:
    """'RUN_ID:STATUS' of the current job (changes when a job starts or ends anywhere)."""
    state = ctx.jobs.snapshot()
    return f"{state.run_id}:{state.status}" if state else "none"


def status_html(state: JobState | None) -> str:
    """Status line, progress bar and message of a job."""
    if state is None:
        return "<div class='ls-status'><b>No training yet.</b> Prepare a dataset, then press Start.</div>"
    total = state.total_steps or 0
    pct = min(100.0, 100.0 * state.step / total) if total else 0.0
    end = state.ended_at or time.time()
    parts = [f"<b>{_TITLES.get(state.status, state.status)}</b>", f"step {state.step} / {total or '?'}"]
    if state.loss is not None:
        parts.append(f"loss {state.loss:.4f}")
    if state.samples_per_s:
        parts.append(f"{state.samples_per_s:.2f} samples/s")
    if state.active and state.eta_s is not None:
        parts.append(f"ETA {format_seconds(state.eta_s)}")
    parts.append(f"elapsed {format_seconds(end - state.started_at)}")
    colour = {"failed": "#dc2626", "stopped": "#ca8a04", "interrupted": "#ca8a04"}.get(state.status, "#ea580c")
    message = f"<div>{html.escape(state.message)}</div>" if state.message else ""
    return (f"<div class='ls-status' id='job-status' data-status='{state.status}' data-step='{state.step}'>"
            f"<div>{' &middot; '.join(parts)}</div>"
            f"<div style='background:#e5e7eb;border-radius:4px;height:10px;margin:6px 0'>"
            f"<div style='width:{pct:.1f}%;background:{colour};height:10px;border-radius:4px'></div></div>"
            f"{message}<div style='font-size:0.85em;opacity:0.7'>run {html.escape(state.run_id)}"
            f"{' on ' + html.escape(state.device) if state.device else ''}</div></div>")


def preview_items(state: JobState | None) -> list[tuple[str, str]]:
    """(image, caption) of every preview, newest first; step 0 is the base model before training."""
    items = []
    for sample in reversed(state.samples if state else []):
        prompts, scales = sample.get("prompts", []), sample.get("scales", [])
        for i, p in enumerate(sample.get("paths", [])):
            path = state.path(p)  # type: ignore[union-attr]
            if not path.is_file():
                continue
            bits = [f"step {sample['step']}" + (" (base model)" if sample["step"] == 0 else "")]
            if i < len(scales):
                bits.append(f"weight {scales[i]:g}")
            if i < len(prompts):
                bits.append(prompts[i][:60])
            items.append((str(path), " | ".join(bits)))
    return items


def loss_frame(state: JobState | None) -> pd.DataFrame:
    rows = state.losses if state else []
    return pd.DataFrame({"step": [s for s, _ in rows], "loss": [v for _, v in rows]})


def _buttons(state: JobState | None) -> tuple[Any, Any, Any]:
    active = bool(state and state.active)
    return (gr.update(interactive=not active), gr.update(interactive=active),
            gr.update(interactive=bool(state and state.resumable and not active)))


def watch_job(ctx: AppContext) -> Iterator[tuple[Any, ...]]:
    """Stream (status, previews, loss, log, start, stop, resume) on every change until the job ends."""
    version, sent = -1, (-1, -1, -1)
    state = ctx.jobs.snapshot()
    while True:
        if state is not None and state.version == version:
            state = ctx.jobs.wait(version, WATCH_TIMEOUT_S)
            continue
        version = state.version if state else 0
        now = (len(state.samples), len(state.losses), len(state.log)) if state else (0, 0, 0)
        changed = [a != b for a, b in zip(now, sent, strict=True)]
        log_text = "\n".join(state.log[-LOG_TAIL:]) if state else ""
        yield (status_html(state),
               preview_items(state) if changed[0] else gr.skip(),
               loss_frame(state) if changed[1] else gr.skip(),
               log_text if changed[2] else gr.skip(),
               *_buttons(state))
        sent = now
        if state is None or not state.active:
            return
        time.sleep(MIN_YIELD_INTERVAL_S)
        state = ctx.jobs.wait(version, WATCH_TIMEOUT_S)


def build(ctx: AppContext) -> None:
    form = ctx.form
    with gr.Tab("2. Train", id="train"):
        with gr.Row():
            with gr.Column(scale=5):
                with gr.Row():
                    preset = gr.Dropdown([DEFAULTS, *list_presets()], value=start_preset(), label="Preset",
                                         allow_custom_value=True,
                                         info="Fills the settings below with a tested recipe.",
                                         elem_id="preset")
                    form.render("model.base")
                checkpoint = gr.UploadButton("Upload a base model checkpoint (.safetensors / .ckpt)",
                                             file_types=list(CHECKPOINT_TYPES), size="sm")
                for i in range(0, len(BASIC) - 1, 3):
                    with gr.Row():
                        for key in BASIC[i:i + 3]:
                            form.render(key)
                with gr.Accordion("Advanced: every other setting, with its help text", open=False,
                                  elem_id="advanced"):
                    form.render_advanced()
                estimate = gr.Markdown(elem_id="estimate")
            with gr.Column(scale=6):
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="start")
                    stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
                    resume = gr.Button("Resume", interactive=False, elem_id="resume")
                status = gr.HTML(status_html(None), elem_id="status")
                previews = gr.Gallery(label="Previews (newest first; step 0 is the base model)", columns=4,
                                      height=330, object_fit="contain", elem_id="previews", format="png")
                loss = gr.LinePlot(loss_frame(None), x="step", y="loss", height=200, label="Loss",
                                   elem_id="loss-plot")
                log_box = gr.Textbox(label="Log (last lines)", lines=LOG_TAIL, max_lines=LOG_TAIL, interactive=False,
                                     elem_id="log")
                marker = gr.Textbox("", visible="hidden", elem_id="job-marker")  # set on load: a change starts watch_job
                timer = gr.Timer(2.0)

    ctx.extra["train"] = dict(preset=preset, estimate=estimate, marker=marker, timer=timer, checkpoint=checkpoint)
    watch_out = [status, previews, loss, log_box, start, stop, resume]
    start.click(bind(start_training, ctx), None, [status, marker], inputs_kwargs=form.inputs(),
                api_name="start_training", concurrency_id="gpu")
    stop.click(bind(stop_training, ctx), None, status, api_name="stop_training", concurrency_limit=None)
    resume.click(bind(resume_training, ctx), None, [status, marker], api_name="resume_training",
                 concurrency_id="gpu")
    marker.change(bind(watch_job, ctx), None, watch_out, api_name="watch_job", concurrency_limit=None,
                  show_progress="hidden")
    timer.tick(bind(job_marker, ctx), None, marker, api_visibility="private", concurrency_limit=None,
               show_progress="hidden")
    checkpoint.upload(bind(_checkpoint_update, ctx), checkpoint, form["model.base"], api_name="upload_checkpoint")


def _checkpoint_update(ctx: AppContext, file: str | None) -> Any:
    path = upload_checkpoint(ctx, file)
    return gr.update(value=path)


def wire(ctx: AppContext, demo: gr.Blocks) -> None:
    """Events on fields rendered in other tabs, and on page load (called once every tab is built)."""
    t, form = ctx.extra["train"], ctx.form
    outputs = [form[k] for k in preset_keys(ctx)]
    t["preset"].input(bind(apply_preset, ctx), t["preset"], outputs, api_name="apply_preset")
    demo.load(bind(last_run_form, ctx), None, [t["preset"], *form.outputs()], api_visibility="private")
    gr.on([form[k].change for k in ESTIMATE_KEYS] + [demo.load], bind(estimate_run, ctx), None, t["estimate"],
          inputs_kwargs=form.inputs(), api_name="estimate_run", show_progress="hidden", trigger_mode="always_last")
    demo.load(bind(job_marker, ctx), None, t["marker"], api_visibility="private")
