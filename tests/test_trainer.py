"""The engine on tiny models, on CPU: the whole run layout, learning, resume, stop, failures, generate."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_core import trainer as trainer_mod
from lora_core.cli import main
from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.export import apply_adapter, load_adapter
from lora_core.models import build_pipeline
from lora_core.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.resolution=32", "data.min_bucket=32", "data.max_bucket=64", "data.bucket_step=32",
        "schedule.batch_size=2", "optim.lr=1e-3", "optim.text_encoder_lr=1e-3", "schedule.scheduler=constant",
        "sampling.steps=3", "sampling.prompts=[\"a red circle on a white background\"]"]


def sets(*items):
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_example_dataset(d, n=6, size=64)
    return d


def events(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def losses(run):
    return [e["loss"] for e in events(run) if e["event"] == "step"]


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("base", ["tiny:sd1", "tiny:sd2-v", "tiny:sdxl"])
def test_cli_train_writes_run_and_learns(tmp_path, data, base):
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--base", base, "--out", str(run)]
    assert main(args + sets(*TINY, "schedule.steps=30", "sampling.every=10", "saving.every=10")) == 0
    for name in ("config.toml", "log.jsonl", "adapter.safetensors", "state/train_state.pt"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["step-000010.safetensors", "step-000020.safetensors"]
    samples = sorted(p.name for p in (run / "samples").iterdir())
    assert samples[0].startswith("step-000000-") and samples[-1].startswith("step-000030-")
    kinds = {e["event"] for e in events(run)}
    assert kinds == {"started", "step", "sample", "saved", "finished"}
    step = next(e for e in events(run) if e["event"] == "step")
    assert {"step", "loss", "lr", "samples_per_s"} <= step.keys()
    seq = losses(run)
    assert len(seq) == 30 and np.mean(seq[-5:]) < np.mean(seq[:5])
    _diffusers_loads_like_us(run / "adapter.safetensors", base)


def _diffusers_loads_like_us(path, base):
    """The foundation's interop check on a trained file: diffusers' loader == our injection of it."""
    from tests.test_export import probe

    ours = build_pipeline(base)
    modules = apply_adapter(ours, load_adapter(path, ours), 1.0)
    ref = build_pipeline(base)
    ref.pipe.load_lora_weights(str(path), adapter_name="ours")
    loaded = sum(1 for m in [*ref.unet.modules(), *(x for te in ref.text_encoders for x in te.modules())]
                 if hasattr(m, "lora_A") and "ours" in m.lora_A)
    assert loaded == len(modules)
    (u1, h1), (u2, h2) = probe(ours), probe(ref)
    assert (u1 - u2).abs().max() <= 1e-4
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(h1, h2, strict=True))


def test_resume_continues_bit_identically(tmp_path, data):
    straight, split = tmp_path / "straight", tmp_path / "split"
    base = ["train", "--data", str(data), "--base", "tiny:sd1"]
    extra = ["lora.dropout=0.1", "data.flip=true", "data.shuffle_tags=true"]  # exercise every RNG
    assert main(base + ["--out", str(straight)] + sets(*TINY, *extra, "schedule.steps=20")) == 0
    assert main(base + ["--out", str(split)] + sets(*TINY, *extra, "schedule.steps=10")) == 0
    assert main(["train", "--resume", str(split)] + sets("schedule.steps=20")) == 0
    assert losses(straight) == losses(split)
    a, b = tensors(straight / "adapter.safetensors"), tensors(split / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_request_ends_within_one_step(tmp_path, data):
    cfg = resolve(overrides=[*TINY, f"data.dir={data}", "model.base=tiny:sd1", "schedule.steps=200"])
    stop = threading.Event()
    seen = []
    for ev in train(cfg, stop, run_dir=tmp_path / "run"):
        seen.append(ev)
        if ev.kind == "step" and ev.step == 5:
            stop.set()
    assert seen[-1].kind == "finished" and seen[-1].stopped and seen[-1].step == 5
    m = build_pipeline("tiny:sd1")
    apply_adapter(m, load_adapter(tmp_path / "run" / "adapter.safetensors", m))  # loadable


def test_nan_loss_fails_with_message_and_keeps_checkpoint(tmp_path, data, monkeypatch):
    real = trainer_mod._loss
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(trainer_mod, "_loss", flaky)
    cfg = resolve(overrides=[*TINY, f"data.dir={data}", "model.base=tiny:sd1", "schedule.steps=20",
                             "saving.every=2"])
    evs = list(train(cfg, run_dir=tmp_path / "run"))
    assert evs[-1].kind == "failed" and "learning rate" in evs[-1].message
    assert evs[-1].checkpoint.endswith("step-000004.safetensors") and Path(evs[-1].checkpoint).is_file()
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_two_process_data_parallel_ends_with_equal_weights(tmp_path, data):
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys\nfrom lora_core.config import resolve\nfrom lora_core.trainer import train\n"
        f"cfg = resolve(overrides={TINY + ['schedule.steps=6', 'model.base=tiny:sd1']!r} + ['data.dir=' + sys.argv[1]])\n"
        "for ev in train(cfg, run_dir=sys.argv[2]):\n"
        "    if ev.kind == 'finished':\n"
        "        import os; open(sys.argv[2] + '.rank' + os.environ['RANK'], 'w').write(ev.digest)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # --multi_gpu selects accelerate's torch.distributed launcher; with no GPU the trainer asks for the CPU
    # and accelerate runs the processes over gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29533", str(script), str(data), str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d0, d1 = (Path(f"{tmp_path / 'run'}.rank{r}").read_text() for r in (0, 1))
    assert d0 == d1 and len(d0) == 64
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    assert len(losses(tmp_path / "run")) == 6


def test_generate_weight_zero_is_the_base_image(tmp_path, data):
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--base", "tiny:sd1", "--out", str(run)]
                + sets(*TINY, "schedule.steps=10")) == 0
    adapter = run / "adapter.safetensors"
    common = ["generate", "--base", "tiny:sd1", "--prompt", "a red circle", "--steps", "4", "--size", "32x32"]
    outs = {}
    for name, extra in (("base", []), ("w0", ["--lora", f"{adapter}:0"]), ("w1", ["--lora", f"{adapter}:1"])):
        assert main(common + extra + ["--out", str(tmp_path / f"{name}.png")]) == 0
        outs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(outs["base"], outs["w0"])
    assert not np.array_equal(outs["base"], outs["w1"])


def test_a_second_training_in_one_process_may_change_device_and_precision(tmp_path, data):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    Accelerator(cpu=True, mixed_precision="bf16")  # what an earlier run in this app process left behind
    cfg = resolve(overrides=[f"data.dir={data}", "model.base=tiny:sd1", *TINY, "schedule.steps=2",
                             "sampling.enabled=false"])
    kinds = [ev.kind for ev in train(cfg, run_dir=tmp_path / "run")]
    assert kinds[-1] == "finished", kinds


@pytest.mark.parametrize("te", ["true", "false"])
def test_clip_skip_2_trains(tmp_path, data, te):
    cfg = resolve(overrides=[f"data.dir={data}", "model.base=tiny:sd1", *TINY, "schedule.steps=2", "model.clip_skip=2",
                             f"lora.train_text_encoder={te}", "sampling.enabled=false"])
    kinds = [ev.kind for ev in train(cfg, run_dir=tmp_path / "run")]
    assert kinds[-1] == "finished", kinds
