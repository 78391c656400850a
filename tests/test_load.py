"""Load on one real server: two sessions at once, 20 generate requests at once, five training runs in a row.

The server runs in this process (launch(block=False)), so the tests can look inside it: how many
generations ran at the same time, and how much memory (RSS) the process holds after each run.
"""

from __future__ import annotations

import gc
import re
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client
from PIL import Image
from ui_fakes import fake_train

from app.main import launch
from app.tabs import generate as generate_tab
from lora_core import trainer as trainer_mod

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

RSS_GROWTH_BOUND_MB = 100  # runs 2-5 together may not leave more than this behind (measured ~20 MB)
GATE = threading.Event()


def dispatch_train(cfg, stop=None, *, run_dir, resume=False):
    """Runs named `held` use the fake trainer held before step 1 until GATE opens; others the real one."""
    if cfg.saving.output_name == "held":
        return fake_train(cfg, stop, run_dir=run_dir, resume=resume, gate=GATE)
    return trainer_mod.train(cfg, stop, run_dir=run_dir, resume=resume)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch("127.0.0.1", port, workspace=tmp_path_factory.mktemp("load") / "ws", block=False,
                  train_fn=dispatch_train)
    yield f"http://127.0.0.1:{port}/", demo
    GATE.set()
    jobs = demo.ctx.jobs  # type: ignore[attr-defined]
    state = jobs.snapshot()
    if state is not None and state.active:
        jobs.stop()
    jobs.join(60)
    demo.close()


def status_of(html: str) -> tuple[str, str]:
    m = re.search(r"data-status='(\w+)'", html)
    run = re.search(r"run ([0-9]{8}-[0-9]{6}-[\w.-]+)", html)
    assert m and run, html
    return m.group(1), run.group(1)


SETTINGS = dict(model_base="tiny:sd1", schedule_steps=6, sampling_every=3, data_resolution=32, data_bucket_step=32,
                data_min_bucket=0, data_max_bucket=0, schedule_batch_size=2, sampling_steps=1, sampling_size=32,
                sampling_prompts="a red circle", lora_rank=4, lora_alpha=4, saving_every=3, schedule_warmup_steps=0)


def test_two_sessions_see_one_job_and_cannot_start_a_second(server: tuple[str, object]) -> None:
    url, demo = server
    first, second = Client(url, verbose=False), Client(url, verbose=False)
    first.predict("coloured shapes (generated)", api_name="/load_example")
    GATE.clear()
    status, _ = first.predict(**SETTINGS, saving_output_name="held", api_name="/start_training")
    state, run = status_of(status)
    assert state == "starting"
    seen = next(iter(second.submit(api_name="/watch_job")))  # the other session sees the same job
    assert status_of(seen[0]) in (("starting", run), ("running", run))
    with pytest.raises(Exception, match="A training job is already running"):
        second.predict(**SETTINGS, saving_output_name="second", api_name="/start_training")
    with pytest.raises(Exception, match="no stopped run"):  # Resume is no way around it either
        second.predict(api_name="/resume_training")
    assert len(list(demo.ctx.workspace.runs_dir.iterdir())) == 1  # type: ignore[attr-defined]
    second.predict(api_name="/stop_training")  # either session may stop it
    GATE.set()
    assert demo.ctx.jobs.join(60)  # type: ignore[attr-defined]
    assert demo.ctx.jobs.snapshot().status == "stopped"  # type: ignore[attr-defined]


def test_twenty_generate_requests_at_once_all_complete_one_at_a_time(server: tuple[str, object],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = server
    active, peak, lock = [0], [0], threading.Lock()
    real_draw = generate_tab._draw

    def draw(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real_draw(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(generate_tab, "_draw", draw)
    clients = [Client(url, verbose=False) for _ in range(4)]  # four browser sessions, five requests each
    jobs = [clients[i % 4].submit("tiny:sd1", "a red circle", "", i, 1, 32, 5.0, api_name="/generate_pair")
            for i in range(20)]
    t0 = time.monotonic()
    results = [job.result(timeout=300) for job in jobs]
    elapsed = time.monotonic() - t0
    assert len(results) == 20 and peak[0] == 1, f"{peak[0]} generations ran at the same time"
    for i, (plain, _with_lora, info) in enumerate(results):
        assert Image.open(plain).size == (32, 32) and f"Seed {i}," in info
    assert elapsed < 240


def _rss_mb() -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status: RSS cannot be read on this system")


def test_five_training_runs_in_a_row_do_not_grow_memory(server: tuple[str, object],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """RSS after run 5 stays within RSS_GROWTH_BOUND_MB of RSS after run 1 (measured: ~20 MB), and no
    run's model outlives its run (a tiny model is only ~4 MB, too small for RSS alone to show a leak)."""
    url, demo = server
    models: list[weakref.ref] = []
    real_load = trainer_mod.load_model

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        models.append(weakref.ref(model.unet))
        return model

    monkeypatch.setattr(trainer_mod, "load_model", load)
    client = Client(url, verbose=False)
    client.predict("coloured shapes (generated)", api_name="/load_example")
    jobs = demo.ctx.jobs  # type: ignore[attr-defined]
    rss = []
    for i in range(5):
        client.predict(**SETTINGS, saving_output_name=f"rss{i}", api_name="/start_training")
        assert jobs.join(180)
        state = jobs.snapshot()
        assert state.status == "finished" and state.step == 6, state.message
        rss.append(_rss_mb())
    growth = rss[-1] - rss[0]
    print(f"RSS after each run (MB): {[round(r) for r in rss]}; growth after the first: {growth:.0f} MB")
    assert growth < RSS_GROWTH_BOUND_MB, rss
    assert len(models) == 5 and all(ref() is None for ref in models), "a finished run's model is still alive"
