"""The real server on a free port, driven through its HTTP API with gradio_client, as another program
(or the browser) would: upload, train with live previews, generate at two weights, export, load in
diffusers."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from ui_fakes import fake_train, write_images

from app.main import launch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Path]]]:
    """start_server(**launch options) -> (url, workspace) of a running app; stopped after the test."""
    demos = []

    def start(**options: object) -> tuple[str, Path]:
        port = free_port()
        demos.append(launch("127.0.0.1", port, workspace=tmp_path / "ws", block=False, **options))
        return f"http://127.0.0.1:{port}/", tmp_path / "ws"

    yield start
    for demo in demos:
        state = demo.ctx.jobs.snapshot()
        if state is not None and state.active:
            demo.ctx.jobs.stop()
        demo.ctx.jobs.join(60)
        demo.close()


def status_of(html: str) -> tuple[str, int]:
    m = re.search(r"data-status='(\w+)' data-step='(\d+)'", html)
    assert m, html
    return m.group(1), int(m.group(2))


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_whole_flow_through_the_api(start_server: Callable[..., tuple[str, Path]], tmp_path: Path) -> None:
    pytest.importorskip("lora_core.trainer")
    url, ws = start_server()
    client = Client(url, verbose=False)
    images = write_images(tmp_path / "upload", 6)
    gallery, report, note, _ = client.predict(
        files=[handle_file(str(p)) for p in images + [p.with_suffix(".txt") for p in images]], api_name="/add_files")
    assert len(gallery) == 6 and "6 image(s) ready" in report, note

    settings = dict(model_base="tiny:sd1", schedule_steps=20, sampling_every=5, data_resolution=32,
                    data_bucket_step=32, data_min_bucket=0, data_max_bucket=0, schedule_batch_size=2, sampling_steps=3, sampling_size=32,
                    sampling_prompts="a photo of colour 1", lora_rank=4, lora_alpha=4, optim_lr=1e-3,
                    performance_log_every=1)
    status, _ = client.predict(**settings, api_name="/start_training")
    assert status_of(status)[0] == "starting"
    with pytest.raises(Exception, match="already running"):  # a second Start says why not
        client.predict(**settings, api_name="/start_training")

    previews_while_training, statuses, second_tab = 0, [], None
    for status, previews, *_ in client.submit(api_name="/watch_job"):
        state, step = status_of(status)
        statuses.append(state)
        if state in ("starting", "running") and previews:
            previews_while_training = max(previews_while_training, len(previews))
        if second_tab is None and state == "running" and step > 0:  # a reload / second tab reconnects
            second_tab = next(iter(Client(url, verbose=False).submit(api_name="/watch_job")))
    assert statuses[-1] == "finished", statuses
    assert previews_while_training >= 2, "at least two previews (step 0 and step 5) arrive while training"
    assert second_tab is not None and status_of(second_tab[0])[0] == "running" and second_tab[1]

    run = next((ws / "runs").iterdir())
    adapter = str(run / "adapter.safetensors")
    common = dict(base="tiny:sd1", prompt="a photo of colour 1", negative="", seed=7, steps=3, size=32,
                  guidance=5.0, adapter_1=adapter)
    base_img, zero, _ = client.predict(**common, weight_1=0.0, api_name="/generate_pair")
    _, one, info = client.predict(**common, weight_1=1.0, api_name="/generate_pair")
    assert np.array_equal(pixels(base_img), pixels(zero)), "weight 0 gives exactly the base image"
    assert not np.array_equal(pixels(base_img), pixels(one)), "weight 1 changes the image"

    files, summary, card, _, _ = client.predict(run_id=run.name, adapter=adapter, precision="fp16",
                                                api_name="/export_adapter")
    downloaded = [f for f in files if f.endswith(".safetensors")][0]
    assert "| format | kohya |" in summary and "lora" in card

    from lora_core.models import build_pipeline

    ref = build_pipeline("tiny:sd1")
    ref.pipe.load_lora_weights(downloaded, adapter_name="ui")  # diffusers reads the downloaded file
    loaded = sum(1 for m in [*ref.unet.modules(), *ref.pipe.text_encoder.modules()]
                 if hasattr(m, "lora_A") and "ui" in m.lora_A)
    layers = int(re.search(r"\| layers \| (\d+)", summary).group(1))
    assert loaded == layers > 0


def test_login_and_upload_limit(start_server: Callable[..., tuple[str, Path]], tmp_path: Path) -> None:
    url, _ = start_server(auth="ann:secret", max_file_size="2kb", train_fn=fake_train)
    with pytest.raises(Exception):  # noqa: B017  # without the login nothing is served
        Client(url, verbose=False)
    client = Client(url, auth=("ann", "secret"), verbose=False)
    big = tmp_path / "big.png"
    Image.effect_noise((128, 128), 64).convert("RGB").save(big)
    assert big.stat().st_size > 2048
    with pytest.raises(Exception, match="(?i)size|large|limit"):
        client.predict(files=[handle_file(str(big))], api_name="/add_files")
    gallery, report, _, trigger, prompt = client.predict(api_name="/load_example")
    assert len(gallery) >= 6 and "ready" in report
