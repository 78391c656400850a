"""Dataset tab: add images (files, a .zip, an allowed server folder or the example set), caption them
one by one or with find/replace, and see what training will make of them.

Every handler that changes the dataset returns the same three things: gallery items, the report
(problems, buckets) and a note about what just happened.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from app import datasets, uploads
from app.context import AppContext, bind
from app.ui_fields import config_from_params
from app.workspace import AppError
from lora_core.config import DataConfig
from lora_core.dataset import write_example_dataset
from lora_core.errors import ConfigError

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"
GENERATED_EXAMPLE = "coloured shapes (generated)"
View = tuple[list[tuple[str, str]], str, str]  # gallery items, report markdown, note


def _data(params: dict[str, Any]) -> DataConfig:
    try:
        return config_from_params(params, check=False).data
    except ConfigError:
        return DataConfig()


def view(ctx: AppContext, note: str = "", **data: Any) -> View:
    """Gallery items, report and note for the dataset as it is now."""
    folder = ctx.workspace.dataset_dir
    return datasets.gallery_items(folder), datasets.report_markdown(folder, _data(data)), note


def add_files(ctx: AppContext, files: list[str] | None, **data: Any) -> View:
    """Copy uploaded images, captions and .zip archives into the dataset."""
    if not files:
        return view(ctx, "Nothing was uploaded.", **data)
    result = uploads.import_files([str(f) for f in files], ctx.workspace.dataset_dir)
    return view(ctx, result.summary(), **data)


def example_names() -> list[str]:
    """Bundled example datasets (assets/examples/*, `heart` first: the quick-demo preset learns it best),
    then the generated one."""
    bundled = sorted(p.name for p in EXAMPLES_DIR.iterdir() if p.is_dir()) if EXAMPLES_DIR.is_dir() else []
    return sorted(bundled, key=lambda n: n != "heart") + [GENERATED_EXAMPLE]


def _add_files_ui(ctx: AppContext, files: list[str] | None, **data: Any) -> tuple[Any, ...]:
    trigger = example_hints(ctx)[0] if not data.get("data_trigger_word") else gr.skip()
    return (*add_files(ctx, files, **data), trigger if files else gr.skip())


def example_hints(ctx: AppContext) -> tuple[Any, Any]:
    """(trigger word, preview prompt) suggested by the dataset: `sks` if every caption has it, and the
    first caption as the preview prompt; gr.skip() where there is nothing to suggest."""
    captions = [datasets.read_caption(p) for p in datasets.list_images(ctx.workspace.dataset_dir)]
    captions = [c for c in captions if c]
    if not captions:
        return gr.skip(), gr.skip()
    trigger = "sks" if all("sks" in c.split() for c in captions) else gr.skip()
    return trigger, captions[0]


def load_example(ctx: AppContext, name: str = GENERATED_EXAMPLE, **data: Any) -> View:
    """Add an example dataset: a bundled assets/examples folder, or 6 generated captioned shapes."""
    dest = ctx.workspace.dataset_dir
    if name and name != GENERATED_EXAMPLE:
        if name not in example_names():
            raise AppError(f"There is no example dataset '{name}'.")
        files = sorted(p for p in (EXAMPLES_DIR / name).iterdir() if p.is_file())
        result = uploads.import_files(files, dest)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            write_example_dataset(tmp, n=6, size=64)
            result = uploads.import_files(sorted(Path(tmp).iterdir()), dest)
    return view(ctx, f"Example dataset '{name or GENERATED_EXAMPLE}': {result.summary()}", **data)


def import_server_folder(ctx: AppContext, folder: str, **data: Any) -> View:
    """Copy the images and captions of a server folder the app was allowed to read (--allow-folder)."""
    path = uploads.resolve_allowed_folder(folder, ctx.allowed_folders)
    result = uploads.import_folder(path, ctx.workspace.dataset_dir, ctx.allowed_folders)
    return view(ctx, f"From {path}: {result.summary()}", **data)


def clear_dataset(ctx: AppContext, **data: Any) -> View:
    uploads.remove_all(ctx.workspace.dataset_dir)
    return view(ctx, "Removed every image and caption from the dataset (runs keep their own copy).", **data)


def select_image(ctx: AppContext, index: int) -> tuple[str, str, str | None]:
    """(name, caption, image path) of the index-th image of the gallery."""
    images = datasets.list_images(ctx.workspace.dataset_dir)
    if not 0 <= index < len(images):
        return "", "", None
    image = images[index]
    return image.name, datasets.read_caption(image), str(image)


def save_caption(ctx: AppContext, name: str, caption: str, **data: Any) -> View:
    image = datasets.image_named(ctx.workspace.dataset_dir, name)
    datasets.write_caption(image, caption)
    return view(ctx, f"Saved the caption of {name}.", **data)


def save_and_next(ctx: AppContext, name: str, caption: str, **data: Any) -> tuple[Any, ...]:
    """Save this caption and select the next image: View + (name, caption, image path)."""
    gallery, report, note = save_caption(ctx, name, caption, **data)
    names = [p.name for p in datasets.list_images(ctx.workspace.dataset_dir)]
    following = names.index(name) + 1 if name in names else 0
    return (gallery, report, note, *select_image(ctx, following % max(1, len(names))))


def delete_selected(ctx: AppContext, name: str, **data: Any) -> tuple[Any, ...]:
    """Remove the selected image and its caption: View + cleared selection."""
    datasets.delete_image(ctx.workspace.dataset_dir, name)
    return (*view(ctx, f"Removed {name}.", **data), "", "", None)


def replace_in_captions(ctx: AppContext, find: str, replace: str, **data: Any) -> View:
    changed = datasets.find_replace(ctx.workspace.dataset_dir, find, replace)
    return view(ctx, f"Replaced '{find}' with '{replace}' in {changed} caption(s).", **data)


def _load_example_ui(ctx: AppContext, name: str, **data: Any) -> tuple[Any, ...]:
    return (*load_example(ctx, name, **data), *example_hints(ctx))


def _on_select(ctx: AppContext, evt: gr.SelectData) -> tuple[str, str, str | None]:
    return select_image(ctx, evt.index if isinstance(evt.index, int) else evt.index[0])


def build(ctx: AppContext) -> None:
    form, data = ctx.form, ctx.data_params()
    with gr.Tab("1. Dataset", id="dataset"):
        with gr.Row():
            with gr.Column(scale=3):
                upload = gr.File(label="Drop images, .txt captions (same name as the image) or a .zip",
                                 file_count="multiple", file_types=["image", ".txt", ".zip"], height=140,
                                 elem_id="dataset-upload")
                with gr.Row():
                    example = gr.Dropdown(example_names(), value=example_names()[0], label="Example dataset",
                                          scale=2, visible=len(example_names()) > 1)
                    example_btn = gr.Button("Load example dataset", elem_id="load-example")
                    clear_btn = gr.Button("Remove all images", variant="stop", size="sm")
                with gr.Row(visible=bool(ctx.allowed_folders)):
                    folder = gr.Textbox(label="Server folder", scale=3,
                                        placeholder=str(ctx.allowed_folders[0]) if ctx.allowed_folders else "",
                                        info="Allowed: " + ", ".join(map(str, ctx.allowed_folders)))
                    folder_btn = gr.Button("Import folder")
                gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=320,
                                     allow_preview=False, object_fit="cover", elem_id="dataset-gallery")
                note = gr.Markdown(elem_id="dataset-note")
            with gr.Column(scale=2):
                with gr.Group():
                    selected = gr.Textbox(label="Selected image", interactive=False)
                    preview = gr.Image(label="Preview", interactive=False, height=180, show_label=False)
                    caption = gr.Textbox(label="Caption", lines=3, placeholder="a photo of ...",
                                         elem_id="caption-box")
                    with gr.Row():
                        save_btn = gr.Button("Save caption", variant="primary", size="sm")
                        next_btn = gr.Button("Save and next", size="sm")
                        delete_btn = gr.Button("Remove image", variant="stop", size="sm")
                with gr.Row():
                    form.render("data.trigger_word")
                    form.render("data.repeats")
                with gr.Accordion("Find and replace in every caption", open=False):
                    with gr.Row():
                        find = gr.Textbox(label="Find")
                        replace = gr.Textbox(label="Replace with")
                    replace_btn = gr.Button("Replace in all captions", size="sm")
                report = gr.Markdown(elem_id="dataset-report")

    outs = [gallery, report, note]
    pick = [selected, caption, preview]
    hints = [form["data.trigger_word"], form["sampling.prompts"]]
    upload.upload(bind(_add_files_ui, ctx), [upload], outs + [form["data.trigger_word"]], inputs_kwargs=data,
                  api_name="add_files").then(lambda: None, None, upload, api_visibility="private")
    example_btn.click(bind(_load_example_ui, ctx), [example], outs + hints, inputs_kwargs=data,
                      api_name="load_example")
    folder_btn.click(bind(import_server_folder, ctx), [folder], outs, inputs_kwargs=data,
                     api_name="import_server_folder")
    clear_btn.click(bind(clear_dataset, ctx), None, outs, inputs_kwargs=data, api_name="clear_dataset")
    gallery.select(bind(_on_select, ctx), None, pick, api_visibility="private")
    save_btn.click(bind(save_caption, ctx), [selected, caption], outs, inputs_kwargs=data, api_name="save_caption")
    caption.submit(bind(save_caption, ctx), [selected, caption], outs, inputs_kwargs=data,
                   api_visibility="private")
    next_btn.click(bind(save_and_next, ctx), [selected, caption], outs + pick, inputs_kwargs=data,
                   api_name="save_and_next")
    delete_btn.click(bind(delete_selected, ctx), [selected], outs + pick, inputs_kwargs=data,
                     api_name="delete_image")
    replace_btn.click(bind(replace_in_captions, ctx), [find, replace], outs, inputs_kwargs=data,
                      api_name="replace_in_captions")
    ctx.extra["dataset_view"] = outs


def wire(ctx: AppContext, demo: gr.Blocks) -> None:
    """Events that involve other tabs' components (called once every tab is built)."""
    outs, data = ctx.extra["dataset_view"], ctx.data_params()
    demo.load(bind(view, ctx), None, outs, inputs_kwargs=data, api_name="dataset_view")
    for key in ("data.trigger_word", "data.repeats", "data.resolution", "data.buckets"):
        ctx.form[key].change(bind(view, ctx), None, outs, inputs_kwargs=data, api_visibility="private",
                             show_progress="hidden")
