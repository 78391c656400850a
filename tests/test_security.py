"""The server lets no one in where they don't belong: a real server on a free port, raw HTTP against it.

Default bind 127.0.0.1; with --auth every route except the login page and Gradio's static files needs the
login (app.main.LoginGate on top of Gradio's own checks); only workspace files can be fetched; uploaded
names are cleaned; server folders only with --allow-folder; no pickle is ever executed.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image
from ui_fakes import fake_train

from app.main import add_ui_arguments, is_public_path, launch
from lora_core import checkpoints
from lora_core.errors import TrainingError
from lora_core.lora import wrap

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "ann", "s3cret-pass"
SECRET = "TOP-SECRET-CONTENT"
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, demo, port: int, ws: Path, outside: Path) -> None:
        self.demo, self.port, self.ws, self.outside = demo, port, ws, outside
        self.url = f"http://127.0.0.1:{port}"

    def client(self, login: bool) -> httpx.Client:
        c = httpx.Client(base_url=self.url, timeout=20, follow_redirects=False)
        if login:
            r = c.post("/login", data={"username": USER, "password": PASSWORD})
            assert r.status_code == 200, r.text
        return c


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The app as `lora-studio ui --auth ann:...` starts it: default host, no --allow-folder."""
    root = tmp_path_factory.mktemp("security")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    port = free_port()
    demo = launch(port=port, auth=f"{USER}:{PASSWORD}", workspace=root / "ws", block=False, train_fn=fake_train)
    yield Server(demo, port, root / "ws", outside)
    demo.close()


# ----------------------------------------------------------------------------- bind address


def test_default_bind_is_this_computer_only(server: Server) -> None:
    assert add_ui_arguments(__import__("argparse").ArgumentParser()).parse_args([]).host == "127.0.0.1"
    assert inspect.signature(launch).parameters["host"].default == "127.0.0.1"
    assert server.demo.server_name == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the address other machines would use
        try:
            s.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it only picks the outgoing interface
            external = s.getsockname()[0]
        except OSError:
            external = "127.0.0.1"
    if not external.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((external, server.port), timeout=5).close()


# ----------------------------------------------------------------------------- login on every route


def _routes(app) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route the server has, Gradio's included routers too."""
    out = []

    def walk(routes) -> None:
        for r in routes:
            inner = getattr(r, "original_router", None) or getattr(r, "app", None)
            if inner is not None and hasattr(inner, "routes") and not hasattr(r, "methods"):
                walk(inner.routes)
            elif getattr(r, "path", None):
                out.extend((m, r.path) for m in sorted(getattr(r, "methods", None) or ["GET"]))
    walk(app.routes)
    return out


def _fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_route_needs_the_login(server: Server) -> None:
    routes = _routes(server.demo.server_app)
    paths = {p for _, p in routes}
    assert {"/config", "/gradio_api/file={path_or_url:path}", "/gradio_api/queue/join", "/gradio_api/upload",
            "/gradio_api/cancel", "/openapi.json"} <= paths, "the route list looks wrong"
    anon = server.client(login=False)
    checked = 0
    for method, path in routes:
        url = _fill(path)
        if is_public_path(url):
            continue
        r = anon.request(method, url, json={}, timeout=10)
        assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
        checked += 1
    assert checked > 60
    # the public part is only the login page and Gradio's own front-end files: none of the app's content
    for path in ("/", "/theme.css", "/manifest.json", "/favicon.ico", "/robots.txt", "/gradio_api/startup-events"):
        r = anon.get(path)
        for leak in (str(server.ws), "start_training", "Start training", "generate_pair", "dataset-upload"):
            assert leak not in r.text, (path, leak)
    # ... and with the login, the app is there
    user = server.client(login=True)
    assert user.get("/config").status_code == 200 and "start_training" in user.get("/gradio_api/info").text
    assert anon.post("/login", data={"username": USER, "password": "wrong"}).status_code >= 400


def test_a_browser_logs_in_through_the_gate(server: Server) -> None:
    """The login page still works in a real browser (Debian's Chromium), and only after logging in does
    the app appear. Skips without Chromium unless REQUIRE_BROWSER=1, like tests/test_browser.py."""
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        sync_playwright = None  # type: ignore[assignment]
    if not chromium.exists() or sync_playwright is None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("REQUIRE_BROWSER=1 but Chromium or playwright is missing")
        pytest.skip("browser login test skipped: no /usr/bin/chromium or playwright")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=args)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            password = page.locator("input[type=password]")
            expect(password).to_be_visible(timeout=30_000)
            assert "start_training" not in page.content() and page.locator("#header").count() == 0
            page.locator("input[type=text]").first.fill(USER)
            password.fill("wrong")
            password.press("Enter")
            expect(page.get_by_text("Incorrect Credentials")).to_be_visible(timeout=15_000)
            page.locator("input[type=text]").first.fill(USER)
            password.fill(PASSWORD)
            password.press("Enter")
            expect(page.locator("#header")).to_be_visible(timeout=60_000)
            expect(page.get_by_role("tab", name="2. Train")).to_be_visible()
        finally:
            browser.close()


def test_the_api_client_works_with_the_login(server: Server) -> None:
    with pytest.raises(Exception):  # noqa: B017  # gradio_client's own error types vary by version
        Client(server.url + "/", verbose=False)
    client = Client(server.url + "/", auth=(USER, PASSWORD), verbose=False)
    gallery, report, note = client.predict(api_name="/dataset_view")
    assert "No images yet" in report


# ----------------------------------------------------------------------------- files


def test_only_workspace_files_can_be_fetched(server: Server) -> None:
    inside = server.ws / "runs" / "r1" / "samples"
    inside.mkdir(parents=True, exist_ok=True)
    (inside / "ok.txt").write_text("INSIDE")
    link = server.ws / "runs" / "r1" / "link.txt"
    if not link.exists():
        link.symlink_to(server.outside / "secret.txt")
    ok = f"/gradio_api/file={inside / 'ok.txt'}"
    anon, user = server.client(login=False), server.client(login=True)
    assert anon.get(ok).status_code == 401 and anon.get(f"/gradio_api/file/{inside / 'ok.txt'}").status_code == 401
    assert user.get(ok).status_code == 200 and user.get(ok).text == "INSIDE"
    ws, out = server.ws, server.outside
    attempts = [
        f"/gradio_api/file={ws}/../outside/secret.txt",
        f"/gradio_api/file={ws}/%2e%2e/outside/secret.txt",
        f"/gradio_api/file={ws}/%2e%2e%2foutside%2fsecret.txt",
        f"/gradio_api/file={ws}/..%2foutside/secret.txt",
        f"/gradio_api/file={ws}/%252e%252e/outside/secret.txt",
        f"/gradio_api/file={out}/secret.txt",
        f"/gradio_api/file={link}",  # a link inside the workspace that points out of it
        f"/gradio_api/file/{out}/secret.txt",
        "/gradio_api/file=../../../../../../etc/passwd",
        "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=%2Fetc%2Fpasswd",
        "/gradio_api/file//etc/passwd",
        "/gradio_api/file=file:///etc/passwd",
        f"/gradio_api/file={ROOT / 'pyproject.toml'}",  # the server's working folder is not served
        "/gradio_api/file=pyproject.toml",
        "/file=/etc/passwd",
        f"/file={out}/secret.txt",
        "/gradio_api/proxy=http://127.0.0.1:1/",
    ]
    for url in attempts:
        r = user.get(url)
        assert r.status_code in (400, 403, 404), (url, r.status_code)
        assert SECRET not in r.text and "root:x:0" not in r.text, url


def test_uploaded_names_are_sanitised(server: Server, tmp_path: Path) -> None:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    user = server.client(login=True)
    names = ["../../../escape.png", "..\\..\\escape2.png", "/etc/escape3.png", "ok\u202egnp.png"]
    r = user.post("/gradio_api/upload", files=[("files", (n, buf.getvalue(), "image/png")) for n in names])
    assert r.status_code == 200, r.text
    stored = [Path(p) for p in r.json()]
    cache = Path(server.demo.server_app.uploaded_file_dir).resolve()
    assert len(stored) == 4 and all(cache in p.resolve().parents for p in stored), stored
    assert all("\\" not in p.name and p.name not in (".", "..") for p in stored), [p.name for p in stored]
    for where in (server.ws.parent, server.ws, cache.parent, Path("/etc")):
        assert not list(where.glob("escape*.png")), where
    # the same names through the app's dataset upload end up cleaned, inside the dataset folder
    client = Client(server.url + "/", auth=(USER, PASSWORD), verbose=False)
    src = tmp_path / "..weird ✓ name\u202e.png"
    src.write_bytes(buf.getvalue())
    client.predict(files=[handle_file(str(src))], api_name="/add_files")
    dataset = server.ws / "dataset"
    assert [p.name for p in dataset.iterdir()] == ["weird _ name_.png"]


def test_server_folders_only_with_the_flag(server: Server) -> None:
    client = Client(server.url + "/", auth=(USER, PASSWORD), verbose=False)
    with pytest.raises(Exception, match="Importing server folders is off.*--allow-folder"):
        client.predict(folder=str(server.outside), api_name="/import_server_folder")
    model = server.outside / "model.safetensors"
    model.write_bytes(b"x")
    with pytest.raises(Exception, match="outside the folders this app may read"):
        client.predict(base=str(model), prompt="a", negative="", seed=0, steps=1, size=32, guidance=5.0,
                       api_name="/generate_pair")
    with pytest.raises(Exception, match="outside the folders this app may read"):
        client.predict(model_base=str(server.outside / ".." / "outside" / "model.safetensors"),
                       api_name="/start_training")
    assert not (server.ws / "dataset").exists() or not any(p.suffix == ".safetensors"
                                                           for p in (server.ws / "dataset").iterdir())


# ----------------------------------------------------------------------------- no pickle


class Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_saved_state_with_pickle_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    torch.save({"step": 3, "lora": {}, "optimizer": {}, "x": Evil(str(marker))}, run / "state" / checkpoints.STATE_FILE)
    modules = {"a": wrap(torch.nn.Linear(4, 4), 2)}
    opt = torch.optim.AdamW([modules["a"].lora_down.weight])
    with pytest.raises(TrainingError, match="cannot be read"):
        checkpoints.load_state(run, modules, opt)
    assert not marker.exists()


UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"),
                ("dill", "loads"), ("joblib", "load"), ("marshal", "loads"), ("shelve", "open"),
                ("yaml", "load"), ("yaml", "unsafe_load"), ("cloudpickle", "loads")}


def test_no_code_path_can_unpickle() -> None:
    """Every torch.load in the project passes weights_only=True; nothing calls pickle-like loaders, numpy
    with allow_pickle, eval or exec. (Gradio, diffusers and transformers load .bin files with
    weights_only=True themselves.)"""
    problems, loads = [], 0
    for path in sorted([*ROOT.glob("lora_core/*.py"), *ROOT.glob("app/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name):
                name = ("", func.id)
            elif isinstance(func, ast.Attribute):  # module.function; a method call on an expression: (None, attr)
                name = (func.value.id if isinstance(func.value, ast.Name) else None, func.attr)
            else:
                continue
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name == ("torch", "load"):
                loads += 1
                flag = kw.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif name in UNSAFE_CALLS or name[1] in ("eval", "exec") and name[0] in ("", "builtins"):
                problems.append(f"{where}: {'.'.join(n for n in name if n)}")
            elif name[1] == "load" and name[0] in ("np", "numpy") and isinstance(kw.get("allow_pickle"), ast.Constant) \
                    and kw["allow_pickle"].value:
                problems.append(f"{where}: numpy.load(allow_pickle=True)")
    assert loads >= 2, "the scan found no torch.load at all: it is looking in the wrong place"
    assert not problems, problems
