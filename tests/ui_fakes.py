"""Helpers for the app tests: a fake trainer (same contract as lora_core.trainer.train, milliseconds per
step, real PNG previews and a real adapter file) and small captioned images."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from lora_core.config import TrainConfig, save_toml
from lora_core.events import Event, Finished, Sample, Saved, Started, Step


@functools.cache
def adapter_bytes() -> bytes:
    """A real (tiny:sd1) kohya adapter with non-zero up weights, built once per test session."""
    import tempfile

    from lora_core.export import build_metadata, save_adapter
    from lora_core.inject import inject
    from lora_core.models import build_pipeline

    model = build_pipeline("tiny:sd1")
    modules = inject(model.unet, model.text_encoders, model.family, rank=4, alpha=4)
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.weight.normal_(0, 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        save_adapter(path, modules, build_metadata(model, rank=4, alpha=4, output_name="fake"), torch.float32)
        return path.read_bytes()


def write_images(folder: Path, n: int = 6, size: int = 64, captions: bool = True) -> list[Path]:
    """n distinct solid-colour PNGs (and `a photo of colour N` captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.new("RGB", (size, size), (40 * i % 256, 255 - 30 * i % 256, 90)).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"a photo of colour {i}", encoding="utf-8")
        paths.append(path)
    return paths


def fake_train(cfg: TrainConfig, stop: threading.Event | None = None, *, run_dir: str | Path,
               resume: bool = False, delay: float = 0.01, gate: threading.Event | None = None) -> Iterator[Event]:
    """Yields what the real trainer yields; `gate` (if given) holds it before step 1 until set."""
    stop = stop or threading.Event()
    run = Path(run_dir)
    (run / "samples").mkdir(parents=True, exist_ok=True)
    (run / "state").mkdir(parents=True, exist_ok=True)
    save_toml(cfg, run / "config.toml")
    state = run / "state" / "step.txt"
    start = int(state.read_text()) if resume and state.is_file() else 0
    total = cfg.schedule.steps
    yield Started(str(run), total, start, 6, "cpu", cfg.to_dict())

    def sample(step: int) -> Sample:
        paths = []
        for scale in cfg.sampling.scales:
            p = run / "samples" / f"step-{step:06d}-p0-w{scale:g}.png"
            Image.new("RGB", (32, 32), (step * 10 % 256, 0, 0)).save(p)
            paths.append(str(p))
        return Sample(step, paths, ["a prompt"] * len(paths), list(cfg.sampling.scales))

    if start == 0:
        yield sample(0)
    if gate is not None:
        gate.wait(30)
    step = start
    while step < total:
        if stop.is_set():
            state.write_text(str(step))
            yield Finished(step, "", stopped=True)
            return
        time.sleep(delay)
        step += 1
        yield Step(step, 1.0 / step, 1e-4, 100.0, (total - step) * delay)
        if cfg.sampling.every and step % cfg.sampling.every == 0 and step < total:
            yield sample(step)
        if cfg.saving.every and step % cfg.saving.every == 0 and step < total:
            path = run / "checkpoints" / f"step-{step:06d}.safetensors"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(adapter_bytes())
            yield Saved(step, str(path))
    final = run / "adapter.safetensors"
    final.write_bytes(adapter_bytes())
    yield Saved(step, str(final), final=True)
    yield sample(step)
    yield Finished(step, str(final), seconds=0.1)
