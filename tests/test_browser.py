"""One real browser (Debian's Chromium, driven by Playwright) clicking through the app: upload and caption
images, train with live previews, reload mid-training, stop, generate, export and download.

Screenshots of each tab go to test-artifacts/ and docs/screenshots/ (used by the README). Without
/usr/bin/chromium the test skips, unless REQUIRE_BROWSER=1 (set by .ci/run) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from ui_fakes import write_images

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS, SCREENSHOTS = REPO / "test-artifacts", REPO / "docs" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
STAR = REPO / "assets" / "examples" / "star"
PROMPT = "a large blue sks star on a white background, centre"
LOCAL = ("http://127.0.0.1", "data:", "blob:", "about:")

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _browser_or_skip() -> None:
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} not found (install Debian's chromium: apt-get install -y chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright Python package is not installed"
    if missing:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(f"browser test skipped: {missing}")


def _images(folder: Path) -> list[Path]:
    """Six captioned images: the bundled `star` example where it exists, else generated squares."""
    if STAR.is_dir():
        folder.mkdir(parents=True)
        for png in sorted(STAR.glob("*.png"))[:6]:
            shutil.copy(png, folder)
            shutil.copy(png.with_suffix(".txt"), folder)
        return sorted(folder.glob("*.png"))
    return write_images(folder, 6)


def _fill(page, selector: str, value: str) -> None:
    box = page.locator(selector)
    box.fill(value)
    box.press("Tab")  # Gradio commits a Number/Textbox on blur


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)
    shutil.copy(ARTIFACTS / f"{name}.png", SCREENSHOTS / f"{name}.png")


def test_click_through_the_whole_app(tmp_path: Path) -> None:
    _browser_or_skip()
    pytest.importorskip("lora_core.trainer")
    from playwright.sync_api import expect, sync_playwright

    from app.main import launch
    from lora_core.export import load_adapter

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch("127.0.0.1", port, workspace=tmp_path / "ws", block=False)
    url = f"http://127.0.0.1:{port}/"
    outbound: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            page.on("request", lambda r: None if r.url.startswith(LOCAL) else outbound.append(r.url))
            page.goto(url)

            # 1. Dataset: upload six captioned images, fix one caption.
            images = _images(tmp_path / "upload")
            page.locator("#dataset-upload input[type=file]").set_input_files(
                [str(p) for p in images] + [str(p.with_suffix(".txt")) for p in images])
            expect(page.locator("#dataset-gallery button.thumbnail-item")).to_have_count(6)
            expect(page.locator("#dataset-report")).to_contain_text("6 image(s) ready")
            page.locator("#dataset-gallery button.thumbnail-item").nth(1).click()
            caption = page.locator("#caption-box textarea")
            expect(caption).not_to_have_value("")
            caption.fill(caption.input_value() + ", bright")
            page.get_by_role("button", name="Save caption").click()
            expect(page.locator("#dataset-note")).to_contain_text("Saved the caption")
            _shot(page, "dataset")

            # 2. Train: a long run with previews every 5 steps; watch, reload, stop.
            other_tab = browser.new_page()  # opened before the job starts: it must notice it
            other_tab.goto(url)
            other_tab.get_by_role("tab", name="2. Train").click()
            page.get_by_role("tab", name="2. Train").click()
            _fill(page, "#field-schedule_steps input", "400")
            _fill(page, "#field-sampling_every input", "5")
            _fill(page, "#field-sampling_prompts textarea", PROMPT)
            page.get_by_text("Advanced: every other setting").click()
            page.locator("#advanced").get_by_text("Sampling: Preview images").click()
            _fill(page, "#field-sampling_steps input", "10")
            expect(page.locator("#estimate")).to_contain_text("400 steps")
            page.locator("#start").click()
            expect(page.locator("#job-status[data-status='running']")).to_have_count(1)
            expect(page.locator("#previews img")).not_to_have_count(0)
            page.wait_for_function("document.querySelectorAll('#previews img').length >= 4")  # steps 0 and 5
            expect(other_tab.locator("#job-status[data-status='running']")).to_have_count(1, timeout=15_000)
            other_tab.close()
            page.reload()  # a reload reconnects to the running job
            page.get_by_role("tab", name="2. Train").click()
            expect(page.locator("#job-status[data-status='running']")).to_have_count(1)
            page.wait_for_function("document.querySelectorAll('#previews img').length >= 4")
            step_before = int(page.locator("#job-status").get_attribute("data-step"))
            page.wait_for_function(f"+document.querySelector('#job-status').dataset.step > {step_before}")
            expect(page.locator("#field-schedule_steps input")).to_have_value("400")  # the run's settings
            _shot(page, "train")
            page.locator("#stop").click()
            expect(page.locator("#job-status[data-status='stopped']")).to_have_count(1)
            expect(page.locator("#resume")).to_be_enabled()

            # 3. Generate: the stopped run's adapter at weight 1 beside the base, then a sweep.
            page.get_by_role("tab", name="3. Generate").click()
            page.wait_for_function("document.querySelector('#gen-adapter-1 input').value.includes('final adapter')")
            _fill(page, "#gen-prompt textarea", PROMPT)
            _fill(page, "#gen-steps input", "20")
            page.locator("#generate-btn").click()
            expect(page.locator("#img-lora img")).to_have_count(1)
            expect(page.locator("#img-base img")).to_have_count(1)
            page.locator("#sweep-btn").click()
            expect(page.locator("#sweep img")).to_have_count(5)
            _shot(page, "generate")

            # 4. Export: re-save, read the card, download the adapter.
            page.get_by_role("tab", name="4. Export").click()
            page.locator("#export-btn").click()
            expect(page.locator("#model-card h1")).to_have_count(1)
            expect(page.locator("#inspect")).to_contain_text("kohya")
            with page.expect_download() as download:
                page.locator("#downloads a[download$='.safetensors']").click()
            saved = tmp_path / download.value.suggested_filename
            download.value.save_as(saved)
            _shot(page, "export")
            browser.close()
        assert saved.suffix == ".safetensors" and load_adapter(saved).layers
        assert not outbound, f"the page made outbound requests: {outbound}"
    finally:
        state = demo.ctx.jobs.snapshot()
        if state is not None and state.active:
            demo.ctx.jobs.stop()
        demo.ctx.jobs.join(60)
        demo.close()
