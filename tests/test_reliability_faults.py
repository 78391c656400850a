"""Faults lose nothing: kill -9 while training and while writing, a full disk, running out of GPU memory.

Training runs on tiny:sd1 at 32 px with one torch thread (a step takes ~0.1 s on the 2-core CI machine).
"""

from __future__ import annotations

import errno
import gc
import os
import select
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.jobs import JobManager
from app.workspace import Workspace
from lora_core import checkpoints
from lora_core import trainer as trainer_mod
from lora_core.checkpoints import OOM_ADVICE, STATE_FILE
from lora_core.cli import main
from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.errors import TrainingError
from lora_core.export import atomic_write_bytes, load_adapter, save_adapter
from lora_core.lora import wrap

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.resolution=32", "data.min_bucket=32", "data.max_bucket=64", "data.bucket_step=32",
        "schedule.batch_size=2", "optim.lr=1e-3", "schedule.scheduler=constant", "sampling.enabled=false"]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")



@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_example_dataset(d, n=6, size=64)
    return d


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def events(run: Path) -> list[dict]:
    return checkpoints.read_log(run / "log.jsonl")


def state_step(run: Path) -> int:
    return int(torch.load(run / "state" / STATE_FILE, map_location="cpu", weights_only=True)["step"])


def final_files(run: Path) -> list[Path]:
    """Files under their final names (not the hidden temp files of an interrupted write)."""
    return [p for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")]


# ----------------------------------------------------------------------------- kill -9


def test_kill_9_during_training_then_resume_completes(tmp_path: Path, data: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora_core.cli", "train", "--data", str(data), "--base", "tiny:sd1", "--out",
           str(run), *sets(*TINY, "schedule.steps=40", "saving.every=2", "saving.keep_last=0")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (run / "state" / STATE_FILE).exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "adapter.safetensors").exists(), "killed before the end"
    for path in final_files(run):  # nothing half-written under a final name
        if path.suffix == ".safetensors":
            load_adapter(path)
    saved = state_step(run)
    ckpts = sorted(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("step-*.safetensors"))
    assert saved >= 2 and ckpts and saved in (ckpts[-1], ckpts[-1] - 2), (saved, ckpts)

    assert main(["train", "--resume", str(run)]) == 0
    log = events(run)
    started = [e for e in log if e["event"] == "started"]
    assert started[-1]["start_step"] == saved
    after = [e["step"] for e in log[log.index(started[-1]):] if e["event"] == "step"]
    assert after == list(range(saved + 1, 41))
    assert log[-1]["event"] == "finished" and log[-1]["step"] == 40 and state_step(run) == 40
    load_adapter(run / "adapter.safetensors")


def _killed_while_writing(write, marker: str) -> None:
    """Run write() in a forked child whose fsync of the file named like `marker` never returns, and
    kill -9 the child there: the moment between writing the bytes and renaming them into place."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_end)
            real = os.fsync

            def stuck(fd: int) -> None:
                if marker in os.readlink(f"/proc/self/fd/{fd}"):
                    real(fd)
                    os.write(write_end, b"x")
                    time.sleep(120)
                real(fd)

            os.fsync = stuck
            write()
        finally:
            os._exit(1)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 60)
        assert ready, "the child never reached the write"
        assert os.read(read_end, 1) == b"x"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)


def test_kill_9_during_a_write_keeps_the_previous_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    layer = wrap(torch.nn.Linear(8, 8), 2, 2.0)
    with torch.no_grad():
        layer.lora_up.weight.fill_(0.5)
    modules = {"lora_unet_a": layer}
    opt = torch.optim.AdamW([layer.lora_down.weight, layer.lora_up.weight])
    adapter = run / "adapter.safetensors"
    save_adapter(adapter, modules, {"ss_network_module": "networks.lora"}, torch.float32)
    checkpoints.save_state(run, modules, opt, 10)
    old_adapter, old_state = adapter.read_bytes(), (run / "state" / STATE_FILE).read_bytes()

    with torch.no_grad():
        layer.lora_up.weight.fill_(2.0)
    _killed_while_writing(lambda: save_adapter(adapter, modules, {"ss_network_module": "networks.lora"},
                                               torch.float32), "adapter.safetensors")
    _killed_while_writing(lambda: checkpoints.save_state(run, modules, opt, 20), STATE_FILE)
    _killed_while_writing(lambda: atomic_write_bytes(run / "log.txt", b"new"), "log.txt")

    assert adapter.read_bytes() == old_adapter and (run / "state" / STATE_FILE).read_bytes() == old_state
    assert sorted(p.name for p in final_files(run)) == ["adapter.safetensors", STATE_FILE]
    temps = sorted(p.name for p in run.rglob(".*.tmp"))
    assert len(temps) == 3, temps  # the interrupted writes, under hidden temp names only
    new = next(run.glob(".adapter.safetensors.*.tmp"))
    assert float(load_file(new)["lora_unet_a.lora_up.weight"][0, 0]) == 2.0  # the new bytes were written
    assert float(load_adapter(adapter).layers["lora_unet_a"].up[0, 0]) == 0.5
    assert state_step(run) == 10


# ----------------------------------------------------------------------------- full disk


@pytest.fixture
def disk_full_at(monkeypatch: pytest.MonkeyPatch):
    """disk_full_at(name): every fsync of a file whose name contains `name` fails with ENOSPC."""
    real = os.fsync

    def arm(name: str) -> None:
        def fsync(fd: int) -> None:
            if name in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd)
        monkeypatch.setattr(os, "fsync", fsync)

    yield arm
    monkeypatch.setattr(os, "fsync", real)


def test_full_disk_during_a_checkpoint_is_reported_and_resumable(tmp_path: Path, data: Path, disk_full_at,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    disk_full_at("step-000004")
    args = ["train", "--data", str(data), "--base", "tiny:sd1", "--out", str(run)]
    # 2: the save error ends the CLI (today); 1: a Failed event ends it (once the trainer turns it into one)
    assert main(args + sets(*TINY, "schedule.steps=6", "saving.every=2")) in (1, 2)
    err = capsys.readouterr().err
    assert "Could not save the checkpoint at step 4" in err and "step-000004.safetensors" in err
    assert "the disk is full" in err and "state saved at step 2 is intact" in err
    assert f"--resume {run}" in err and "Traceback" not in err
    assert sorted(p.name for p in final_files(run / "checkpoints")) == ["step-000002.safetensors"]
    assert not list(run.rglob("*.tmp")), "the failed write left no temp file"
    load_adapter(run / "checkpoints" / "step-000002.safetensors")
    assert state_step(run) == 2

    disk_full_at("no-such-file")  # space again
    assert main(["train", "--resume", str(run)]) == 0
    assert events(run)[-1]["event"] == "finished" and state_step(run) == 6


def test_full_disk_ends_the_run_with_a_failed_event(tmp_path: Path, data: Path, disk_full_at) -> None:
    disk_full_at("step-000004")
    cfg = resolve(overrides=[*TINY, f"data.dir={data}", "model.base=tiny:sd1", "schedule.steps=6", "saving.every=2"])
    evs = list(trainer_mod.train(cfg, run_dir=tmp_path / "run"))
    assert evs[-1].kind == "failed" and "disk is full" in evs[-1].message
    assert evs[-1].checkpoint.endswith("step-000002.safetensors")
    assert events(tmp_path / "run")[-1]["event"] == "failed"


# ----------------------------------------------------------------------------- out of GPU memory


def _cfg(data: Path, steps: int = 6):
    return resolve(overrides=[*TINY, f"data.dir={data}", "model.base=tiny:sd1", f"schedule.steps={steps}",
                              "saving.every=2"])


def test_out_of_memory_ends_the_job_with_advice_and_the_next_job_runs(tmp_path: Path, data: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.open(tmp_path / "ws")
    jobs = JobManager(ws)  # the real trainer
    models: list[weakref.ref] = []
    real_load, real_loss = trainer_mod.load_model, trainer_mod._loss
    calls = {"n": 0}

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        models.append(weakref.ref(model.unet))
        return model

    def loss(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_loss(*args)

    monkeypatch.setattr(trainer_mod, "load_model", load)
    monkeypatch.setattr(trainer_mod, "_loss", loss)
    jobs.start(_cfg(data), ws.new_run_dir("oom"))
    assert jobs.join(120)
    failed = jobs.snapshot()
    assert failed.status == "failed" and failed.message == OOM_ADVICE and failed.step == 2
    for advice in ("smaller batch", "gradient checkpointing", "lower resolution"):
        assert advice in failed.message
    assert failed.checkpoints and Path(failed.checkpoints[-1]).is_file()  # step 2 was saved before
    gc.collect()
    assert models and models[0]() is None, "the failed job's model is still in memory"

    jobs.start(_cfg(data, steps=4), ws.new_run_dir("next"))  # the app starts the next job
    assert jobs.join(120)
    assert jobs.snapshot().status == "finished"


def test_out_of_memory_outside_the_step_loop_still_gets_advice(tmp_path: Path, data: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    def setup(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory while loading the model")

    monkeypatch.setattr(trainer_mod, "_setup_model", setup)
    ws = Workspace.open(tmp_path / "ws")
    jobs = JobManager(ws)
    jobs.start(_cfg(data), ws.new_run_dir("oom"))
    assert jobs.join(60)
    assert jobs.snapshot().status == "failed" and jobs.snapshot().message == OOM_ADVICE
    args = ["train", "--data", str(data), "--base", "tiny:sd1", "--out", str(tmp_path / "cli")]
    assert main(args + sets(*TINY)) == 1
    err = capsys.readouterr().err
    assert "smaller batch" in err and "Traceback" not in err


def test_resume_with_changed_settings_is_refused_before_anything_is_written(
        tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--base", "tiny:sd1", "--out", str(run)]
    assert main(args + sets(*TINY, "schedule.steps=2", "lora.rank=4")) == 0
    config = (run / "config.toml").read_bytes()
    assert main(["train", "--resume", str(run)] + sets("lora.rank=8", "schedule.steps=4")) == 2
    err = capsys.readouterr().err
    assert "Cannot resume" in err and "lora.rank (4 -> 8)" in err and "Traceback" not in err
    assert (run / "config.toml").read_bytes() == config and state_step(run) == 2  # the run is untouched
    assert main(["train", "--resume", str(run)] + sets("schedule.steps=4")) == 0
    assert state_step(run) == 4


def test_saved_state_that_does_not_fit_is_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    small = {"lora_unet_a": wrap(torch.nn.Linear(8, 8), 2)}
    checkpoints.save_state(run, small, torch.optim.AdamW([p for m in small.values() for p in m.parameters()
                                                          if p.requires_grad]), 5)
    big = {"lora_unet_a": wrap(torch.nn.Linear(8, 8), 4)}
    opt = torch.optim.AdamW([p for m in big.values() for p in m.parameters() if p.requires_grad])
    with pytest.raises(TrainingError, match="does not fit this run's settings"):
        checkpoints.load_state(run, big, opt)
    (run / "state" / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="cannot be read"):
        checkpoints.load_state(run, big, opt)


def test_full_disk_while_logging_warns_once_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from lora_core.events import Step

    log = checkpoints.EventLog(tmp_path / "log.jsonl")
    log.write(Step(1, 0.5, 1e-4, 1.0, 1.0))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints, "open", full, raising=False)
    with caplog.at_level("WARNING", logger="lora_core.checkpoints"):
        log.write(Step(2, 0.4, 1e-4, 1.0, 1.0))
        log.write(Step(3, 0.3, 1e-4, 1.0, 1.0))
    assert [r.getMessage() for r in caplog.records if "could not append" in r.getMessage()] == \
        [f"could not append to {tmp_path / 'log.jsonl'} (No space left on device); training goes on without it"]
    monkeypatch.undo()
    log.write(Step(4, 0.2, 1e-4, 1.0, 1.0))
    assert [e["step"] for e in checkpoints.read_log(tmp_path / "log.jsonl")] == [1, 4]
