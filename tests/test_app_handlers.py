"""The web UI's handlers as plain functions: no server, no browser, a fake trainer."""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import stat
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open
from ui_fakes import adapter_bytes, fake_train, write_images

from app import datasets, uploads
from app.context import AppContext
from app.estimate import estimate
from app.jobs import JobManager, JobState
from app.tabs import dataset as dataset_tab
from app.tabs import export as export_tab
from app.tabs import generate as generate_tab
from app.tabs import train as train_tab
from app.ui_fields import (
    APP_MANAGED,
    FieldForm,
    config_from_params,
    form_values,
    from_ui,
    param,
    preset_config,
)
from app.workspace import AppError, Workspace
from lora_core.config import DataConfig, TrainConfig, iter_fields, resolve
from lora_core.errors import ConfigError, ModelError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def ctx(tmp_path: Path) -> AppContext:
    ws = Workspace.open(tmp_path / "ws")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    return AppContext(ws, JobManager(ws, fake_train), FieldForm(), (allowed.resolve(),))


def params(cfg: TrainConfig | None = None, **changes: object) -> dict[str, object]:
    """The whole form's values as the UI sends them, with some changed (keys like lora_rank)."""
    form_keys = [f"{s}.{n}" for s, n, _, _ in iter_fields() if f"{s}.{n}" not in APP_MANAGED]
    values = dict(zip(map(param, form_keys), form_values(cfg or TrainConfig(), form_keys), strict=True))
    values.update(changes)
    return values


# ----------------------------------------------------------------------------- uploads


def test_import_pairs_captions_and_keeps_pairs_together_on_name_clash(tmp_path: Path) -> None:
    src = tmp_path / "src"
    images = write_images(src, 2)
    dest = tmp_path / "dest"
    first = uploads.import_files([*images, *(p.with_suffix(".txt") for p in images)], dest)
    assert [p.name for p in first.added] == ["img0.png", "img1.png"]
    assert (dest / "img0.txt").read_text().strip() == "a photo of colour 0"
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (64, 64), "blue").save(other / "img0.png")
    (other / "img0.txt").write_text("a blue square")
    second = uploads.import_files([other / "img0.png", other / "img0.txt"], dest)
    assert [p.name for p in second.added] == ["img0-1.png"]
    assert (dest / "img0-1.txt").read_text().strip() == "a blue square"
    again = uploads.import_files([images[0]], dest)  # the very same image: not copied twice
    assert not again.added and "already in the dataset" in again.notes[0]


def test_import_explains_what_it_skips(tmp_path: Path) -> None:
    for name in ("photo.heic", "notes.pdf", "lonely.txt"):
        (tmp_path / name).write_bytes(b"x")
    result = uploads.import_files([tmp_path / n for n in ("photo.heic", "notes.pdf", "lonely.txt")], tmp_path / "d")
    text = "\n".join(result.notes)
    assert "not supported; convert it" in text and "notes.pdf: not an image" in text
    assert "lonely.txt has no image" in text and not result.added


def _zip(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _png(colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_zip_is_extracted_flat_and_refuses_escapes(tmp_path: Path) -> None:
    archive = tmp_path / "set.zip"
    archive.write_bytes(_zip({
        "set/a.png": _png("red"), "set/a.txt": b"a red square", "set/sub/b.png": _png("green"),
        "../evil.png": _png("blue"), "/abs.png": _png("white"), "__MACOSX/set/._a.png": b"junk",
        "set/readme.md": b"hi",
    }, symlink="set/link.png"))
    dest = tmp_path / "dest"
    result = uploads.import_files([archive], dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a.png", "a.txt", "b.png"]
    notes = "\n".join(result.notes)
    assert "points outside the archive" in notes and "absolute path" in notes and "symbolic link" in notes
    assert not (tmp_path / "evil.png").exists()


def test_zip_limits_are_enforced_while_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "big.zip"
    archive.write_bytes(_zip({f"{i}.png": _png() for i in range(5)}))
    monkeypatch.setattr(uploads, "MAX_FILES", 3)
    with pytest.raises(AppError, match="holds 5 files; the limit is 3"):
        uploads.extract_zip(archive, tmp_path / "d")
    monkeypatch.setattr(uploads, "MAX_FILES", 100)
    monkeypatch.setattr(uploads, "MAX_TOTAL_BYTES", len(_png()) * 2)  # room for two images only
    result = uploads.extract_zip(archive, tmp_path / "d")
    assert len(result.added) == 2 and any("unpacks to more than" in n for n in result.notes)
    assert uploads.import_files([tmp_path / "nope.zip"], tmp_path / "d").notes  # unreadable: a note


def test_server_folders_only_when_allowed(ctx: AppContext, tmp_path: Path) -> None:
    allowed = ctx.allowed_folders[0]
    write_images(allowed / "set", 2)
    secret = tmp_path / "secret"
    write_images(secret, 1)
    os.symlink(secret / "img0.png", allowed / "set" / "leak.png")
    gallery, report, note = dataset_tab.import_server_folder(ctx, str(allowed / "set"))
    assert len(gallery) == 2 and "pointing outside the allowed folders" in note
    with pytest.raises(AppError, match="outside the allowed folders"):
        dataset_tab.import_server_folder(ctx, str(allowed / ".." / "secret"))
    with pytest.raises(AppError, match="--allow-folder"):
        uploads.resolve_allowed_folder(str(secret), ())


# ----------------------------------------------------------------------------- dataset tab


def test_captions_edit_find_replace_and_delete(ctx: AppContext, tmp_path: Path) -> None:
    images = write_images(tmp_path / "src", 3)
    gallery, _, note = dataset_tab.add_files(ctx, [str(p) for p in images] + [str(p.with_suffix(".txt")) for p in images])
    assert len(gallery) == 3 and "Added 3 image(s)" in note
    name, caption, path = dataset_tab.select_image(ctx, 1)
    assert (name, caption) == ("img1.png", "a photo of colour 1") and Path(path).is_file()
    dataset_tab.save_caption(ctx, "img1.png", "  a  photo of\nsomething  ")
    assert datasets.read_caption(ctx.workspace.dataset_dir / "img1.png") == "a photo of something"
    *_, next_name, _, _ = dataset_tab.save_and_next(ctx, "img1.png", "a photo of something")
    assert next_name == "img2.png"
    _, _, note = dataset_tab.replace_in_captions(ctx, "a photo", "a picture")
    assert "in 3 caption(s)" in note
    assert datasets.read_caption(ctx.workspace.dataset_dir / "img0.png") == "a picture of colour 0"
    gallery, *_ = dataset_tab.delete_selected(ctx, "img0.png")
    assert len(gallery) == 2 and not (ctx.workspace.dataset_dir / "img0.txt").exists()
    with pytest.raises(AppError):
        dataset_tab.save_caption(ctx, "../escape.png", "x")


def test_report_in_plain_words(ctx: AppContext, tmp_path: Path) -> None:
    folder = ctx.workspace.dataset_dir
    assert "No images yet" in datasets.report_markdown(folder, DataConfig())
    write_images(folder, 2)
    Image.new("RGB", (192, 64), "white").save(folder / "wide.png")  # no caption
    Image.new("RGB", (16, 16), "white").save(folder / "tiny.png")
    (folder / "copy.png").write_bytes((folder / "img0.png").read_bytes())
    text = datasets.report_markdown(folder, DataConfig(resolution=128, trigger_word="sks", repeats=3))
    assert "**3 image(s) ready**, 9 shown per epoch" in text and "Trigger word `sks`" in text
    assert "only 16x16 pixels" in text and "exact copy of" in text and "wide.png has no caption" in text
    assert "| 128 x 128 | 6 |" in text and "| 192 x 64 | 3 |" in text  # 2 squares, 1 wide, 3 repeats each


def test_example_dataset_is_one_click(ctx: AppContext) -> None:
    gallery, report, note = dataset_tab.load_example(ctx, dataset_tab.GENERATED_EXAMPLE)
    assert len(gallery) == 6 and "6 image(s) ready" in report and "Added 6" in note
    assert dataset_tab.example_hints(ctx)[1] == "a red circle on a white background"
    dataset_tab.clear_dataset(ctx)
    for name in dataset_tab.example_names()[:-1]:  # bundled assets/examples folders, if any
        gallery, report, _ = dataset_tab.load_example(ctx, name)
        assert "ready" in report and dataset_tab.example_hints(ctx)[0] == "sks"
        dataset_tab.clear_dataset(ctx)


# ----------------------------------------------------------------------------- the field form


def test_every_config_field_has_exactly_one_component() -> None:
    form = FieldForm()
    expected = [f"{s}.{n}" for s, n, _, _ in iter_fields() if f"{s}.{n}" not in APP_MANAGED]
    assert form.keys() == expected
    assert config_from_params(params(), check=False) == TrainConfig()
    custom = preset_config("quick-demo")
    assert config_from_params(params(custom), check=False) == custom


def test_form_values_are_parsed_and_checked() -> None:
    cfg = config_from_params(params(lora_rank=8.0, sampling_prompts="a cat\n\n a dog ", sampling_scales="0, .5,1"))
    assert cfg.lora.rank == 8 and cfg.sampling.prompts == ["a cat", "a dog"] and cfg.sampling.scales == [0, 0.5, 1]
    with pytest.raises(ConfigError) as e:
        config_from_params(params(lora_rank=2.5, optim_lr=None, sampling_scales="a, b"))
    assert len(e.value.problems) == 3 and "lora.rank: enter a whole number" in e.value.problems
    with pytest.raises(ConfigError, match="lora.rank = 0: must be between 1 and 1024"):
        config_from_params(params(lora_rank=0))
    assert from_ui("lora.train_text_encoder", None) is False


def test_preset_fills_the_form_but_keeps_the_trigger_word(ctx: AppContext) -> None:
    values = dict(zip(train_tab.preset_keys(ctx), train_tab.apply_preset(ctx, "quick-demo"), strict=True))
    assert values["model.base"] == "demo" and values["schedule.steps"] == 500
    assert "data.trigger_word" not in values


# ----------------------------------------------------------------------------- jobs


def _quick(steps: int = 6, **sampling: object) -> TrainConfig:
    cfg = TrainConfig()
    cfg.schedule.steps, cfg.sampling.every, cfg.sampling.scales = steps, 2, [0.0, 1.0]
    for k, v in sampling.items():
        setattr(cfg.saving, k, v)
    return cfg


def test_job_runs_in_the_background_and_is_found_again(ctx: AppContext) -> None:
    run = ctx.workspace.new_run_dir("t")
    state = ctx.jobs.start(_quick(every=3), run)
    assert state.status == "starting"
    assert ctx.jobs.join(30)
    done = ctx.jobs.snapshot()
    assert done.status == "finished" and done.step == 6 and len(done.losses) == 6
    assert [s["step"] for s in done.samples] == [0, 2, 4, 6] and done.adapter.endswith("adapter.safetensors")
    assert len(done.checkpoints) == 1 and "finished at step 6" in done.log[-1]
    again = JobManager(ctx.workspace, fake_train).snapshot()  # a restarted server reads job.json
    assert again.status == "finished" and again.losses == done.losses and again.samples == done.samples


def test_one_job_at_a_time_stop_and_resume(ctx: AppContext) -> None:
    gate = threading.Event()
    jobs = JobManager(ctx.workspace, functools.partial(fake_train, gate=gate, delay=0.05))
    run = ctx.workspace.new_run_dir("t")
    jobs.start(_quick(steps=400), run)
    with pytest.raises(AppError, match="already running .*Stop it first"):
        jobs.start(_quick(), ctx.workspace.new_run_dir("u"))
    state = jobs.wait(-1, 5)
    while not state.samples:  # the step-0 preview arrives before the gate
        state = jobs.wait(state.version, 5)
    assert jobs.stop().status == "stopping"
    gate.set()
    assert jobs.join(30)
    stopped = jobs.snapshot()
    assert stopped.status == "stopped" and stopped.resumable and stopped.step < 400
    with pytest.raises(AppError, match="No training job is running"):
        jobs.stop()
    jobs.start(_quick(steps=stopped.step + 3), run, resume=True)
    assert jobs.join(30)
    resumed = jobs.snapshot()
    assert resumed.status == "finished" and resumed.step == stopped.step + 3
    assert resumed.samples[0]["step"] == 0  # previews of the first part are kept


def test_job_interrupted_by_a_restart_and_crashes_are_reported(ctx: AppContext) -> None:
    run = ctx.workspace.new_run_dir("t")
    (run / "job.json").write_text(JobState(run.name, str(run), status="running", step=3).to_json())
    assert JobManager(ctx.workspace).snapshot().status == "interrupted"

    def broken(cfg, stop, *, run_dir, resume):
        yield from fake_train(cfg, stop, run_dir=run_dir)
        raise RuntimeError("boom")

    jobs = JobManager(ctx.workspace, broken)
    jobs.start(_quick(), ctx.workspace.new_run_dir("t"))
    jobs.join(30)
    assert jobs.snapshot().status == "finished"  # Finished came before the crash
    jobs = JobManager(ctx.workspace, lambda cfg, stop, **kw: iter([]))
    jobs.start(_quick(), ctx.workspace.new_run_dir("t"))
    jobs.join(30)
    failed = jobs.snapshot()
    assert failed.status == "failed" and "without reporting the end" in failed.message


# ----------------------------------------------------------------------------- train tab


def test_start_needs_images_then_trains_a_copy_of_the_dataset(ctx: AppContext, tmp_path: Path) -> None:
    with pytest.raises(AppError, match="dataset is empty"):
        train_tab.start_training(ctx, **params())
    dataset_tab.load_example(ctx)
    status, marker = train_tab.start_training(ctx, **params(schedule_steps=5, sampling_every=2))
    assert "Starting" in status and marker.endswith(":starting")
    state = ctx.jobs.snapshot()
    run = Path(state.run_dir)
    assert len(list((run / "dataset").glob("*.png"))) == 6
    ctx.jobs.join(30)
    dataset_tab.save_caption(ctx, "shape_000.png", "changed")  # the run keeps the captions it started with
    assert (run / "dataset" / "shape_000.txt").read_text().strip() != "changed"
    outputs = list(train_tab.watch_job(ctx))
    status, previews, loss, log, start, stop, resume = outputs[-1]
    assert "Finished" in status and len(previews) == 4 and list(loss["step"]) == [1, 2, 3, 4, 5]
    assert "finished at step 5" in log and start["interactive"] and not stop["interactive"]
    assert previews[-1][1].startswith("step 0 (base model)")


def test_watch_streams_progress_while_training(ctx: AppContext) -> None:
    gate = threading.Event()
    ctx.jobs = JobManager(ctx.workspace, functools.partial(fake_train, gate=gate, delay=0.1))
    dataset_tab.load_example(ctx)
    train_tab.start_training(ctx, **params(schedule_steps=20, sampling_every=5))
    stream = train_tab.watch_job(ctx)
    first = next(stream)
    assert "Starting" in first[0] or "Training" in first[0]
    assert not first[4]["interactive"] and first[5]["interactive"]  # Start off, Stop on
    with pytest.raises(AppError, match="already running"):
        train_tab.start_training(ctx, **params())
    gate.set()
    steps_seen = {int(o[0].split("data-step='")[1].split("'")[0]) for o in stream}
    assert len(steps_seen) > 2 and 20 in steps_seen


def test_base_model_paths_must_be_allowed(ctx: AppContext, tmp_path: Path) -> None:
    for ok in ("demo", "tiny:sd1", "stabilityai/stable-diffusion-xl-base-1.0",
               str(ctx.allowed_folders[0] / "model.safetensors"), str(ctx.workspace.models_dir / "m.ckpt")):
        train_tab.check_base(ctx, ok)
    for bad in (str(tmp_path / "model.safetensors"), "/etc", "../model.ckpt", "~/model.safetensors"):
        with pytest.raises(AppError, match="outside the folders"):
            train_tab.check_base(ctx, bad)
    upload = tmp_path / "up.safetensors"
    upload.write_bytes(b"x")  # not a safetensors file: refused at upload (tests/test_reliability_inputs.py)
    with pytest.raises(ModelError, match="up.safetensors' is not a readable .safetensors checkpoint"):
        train_tab.upload_checkpoint(ctx, str(upload))
    upload.write_bytes(adapter_bytes())  # a well-formed file: kept; what it holds is checked when loaded
    assert train_tab.upload_checkpoint(ctx, str(upload)) == str(ctx.workspace.models_dir / "up.safetensors")


def test_estimate_says_it_is_rough(ctx: AppContext) -> None:
    text = train_tab.estimate_run(ctx, **params(preset_config("quick-demo")))
    assert "Rough estimate" in text and "500 steps" in text and "GiB" in text
    assert "Fix these settings" in train_tab.estimate_run(ctx, **params(lora_rank=0))


@pytest.mark.parametrize(("cuda", "ratio"), [(True, 8.0), (False, 4.0)])
def test_estimate_prices_previews_drawn_together_on_a_gpu(cuda: bool, ratio: float) -> None:
    def preview_cost(size: int, scales: str) -> float:
        cfg = resolve(overrides=["data.dir=.", "model.base=full:sd15", "data.resolution=512",
                                 f"sampling.size={size}", f"sampling.scales={scales}"])
        return estimate(cfg, 20, cuda=cuda)["seconds"]

    # two more weights cost 2 images at 1024 px (one per call) and 4x the pixels each; at 512 px a GPU
    # draws the three together, each image after the first at half price: 2 x 4 / 1 = 8 (a CPU: 2 x 4 / 2)
    big = preview_cost(1024, "[0,0.5,1]") - preview_cost(1024, "[1]")
    small = preview_cost(512, "[0,0.5,1]") - preview_cost(512, "[1]")
    assert big / small == pytest.approx(ratio)


# ----------------------------------------------------------------------------- generate and export


def _finished_run(ctx: AppContext, trigger: str = "sks") -> Path:
    dataset_tab.load_example(ctx)
    train_tab.start_training(ctx, **params(schedule_steps=4, sampling_every=2, saving_every=2,
                                           data_trigger_word=trigger))
    ctx.jobs.join(30)
    return Path(ctx.jobs.snapshot().run_dir)


def test_adapters_must_come_from_the_workspace(ctx: AppContext, tmp_path: Path) -> None:
    outside = tmp_path / "x.safetensors"
    outside.write_bytes(adapter_bytes())
    with pytest.raises(AppError, match="not a file of this workspace"):
        generate_tab._loras(ctx, [(str(outside), 1.0)])
    [kept] = generate_tab.upload_adapters(ctx, [str(outside)])
    assert generate_tab._loras(ctx, [(kept, 0.5), (None, 1.0)]) == [(kept, 0.5)]
    with pytest.raises(AppError, match="from -1 to 2"):
        generate_tab._loras(ctx, [(kept, 3.0)])
    assert ("uploaded: x.safetensors", kept) in generate_tab.adapter_choices(ctx)


def test_generate_weight_zero_is_the_base_image(ctx: AppContext) -> None:
    run = _finished_run(ctx)
    adapter = str(run / "adapter.safetensors")
    assert generate_tab.adapter_choices(ctx)[0] == (f"{run.name}: final adapter", adapter)
    settings = dict(base="tiny:sd1", prompt="a red circle", negative="", seed=3, steps=2, size=32, guidance=5.0)
    base, zero, _ = generate_tab.generate_pair(ctx, **settings, adapter_1=adapter, weight_1=0.0)
    _, one, info = generate_tab.generate_pair(ctx, **settings, adapter_1=adapter, weight_1=1.0)
    assert base.tobytes() == zero.tobytes() and base.tobytes() != one.tobytes()
    assert "adapter.safetensors x 1" in info


def test_export_resaves_with_config_card_and_preview(ctx: AppContext) -> None:
    run = _finished_run(ctx, trigger="sks")
    options = export_tab.adapter_options(ctx, run.name)
    assert [label for label, _ in options] == ["final adapter", "checkpoint at step 2"]
    files, summary, card, preview, metadata = export_tab.export_adapter(ctx, run.name, options[1][1], "bf16")
    names = [Path(f).name for f in files]
    assert names == ["lora-step2-bf16.safetensors", "config.toml", "README.md", "preview.png"]
    with safe_open(files[0], "pt") as f:
        key = next(k for k in f.keys() if k.endswith("lora_up.weight"))
        assert str(f.get_tensor(key).dtype) == "torch.bfloat16"
        assert json.loads(f.metadata()["saving.precision"]) == "bf16"
    assert "| rank | 4 |" in summary and "`sks`" in card and "<lora:lora-step2-bf16:1>" in card
    assert Path(preview).is_file() and metadata["sshs_model_hash"]
    other = _finished_run(ctx)
    with pytest.raises(AppError, match="does not belong to run"):
        export_tab.export_adapter(ctx, run.name, str(other / "adapter.safetensors"))
    with pytest.raises(AppError, match="no run"):
        export_tab.export_adapter(ctx, "../..", str(other / "adapter.safetensors"))


# ----------------------------------------------------------------------------- launch options


def test_launch_options() -> None:
    from app.main import add_ui_arguments, parse_auth, run_ui

    args = add_ui_arguments(argparse.ArgumentParser()).parse_args([])
    assert (args.host, args.port, args.share, args.auth, args.allow_folder) == ("127.0.0.1", 7860, False, None, [])
    assert parse_auth("ann:se:cret") == ("ann", "se:cret")
    for bad in ("ann", ":x", "ann:"):
        with pytest.raises(ValueError):
            parse_auth(bad)
    assert run_ui(argparse.Namespace(**{**vars(args), "auth": "nopassword"})) == 2
    assert run_ui(argparse.Namespace(**{**vars(args), "allow_folder": ["/no/such/dir"]})) == 2
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_build_ui_exposes_the_flow_as_named_endpoints(ctx: AppContext) -> None:
    from app.main import build_ui

    demo = build_ui(ctx.workspace, train_fn=fake_train)
    names = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert {"add_files", "load_example", "save_caption", "replace_in_captions", "start_training", "stop_training",
            "resume_training", "watch_job", "generate_pair", "scale_sweep", "export_adapter"} <= names
    assert demo.analytics_enabled is False
