"""LoRA Studio's web UI: `build_ui()` lays out the four tabs; `launch()` serves them.

Served on 127.0.0.1:7860 by default. Other hosts and `--share` only when asked, with a warning;
`--auth USER:PASS` puts a login in front; uploads are limited by `max_file_size`; Gradio's analytics
are off (see app/__init__.py), so the app makes no outbound calls.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from app.context import AppContext
from app.jobs import JobManager, TrainFn
from app.tabs import dataset, export, generate, train
from app.ui_fields import FieldForm, preset_config, start_preset
from app.workspace import Workspace

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_MAX_UPLOAD = "2gb"
CSS = """
.ls-status { padding: 8px 12px; border: 1px solid var(--border-color-primary); border-radius: 8px; }
#dataset-report table, #inspect table { font-size: 0.9em; }
footer { display: none !important; }
#img-base img, #img-lora img { min-width: 256px; object-fit: contain; image-rendering: pixelated; }
"""
THEME = gr.themes.Default(primary_hue="orange", secondary_hue="slate")


def build_ui(workspace: str | Path | Workspace | None = None, *, allowed_folders: Sequence[str | Path] = (),
             train_fn: TrainFn | None = None, jobs: JobManager | None = None) -> gr.Blocks:
    """The whole app as a gr.Blocks (not launched). `train_fn` replaces the trainer (tests)."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
    with gr.Blocks(title="LoRA Studio", analytics_enabled=False) as demo:
        ctx = AppContext(ws, jobs or JobManager(ws, train_fn), FieldForm(preset_config(start_preset())),
                         tuple(Path(f).expanduser().resolve() for f in allowed_folders))
        gr.Markdown("## LoRA Studio\nTrain a Stable Diffusion LoRA: **1** add and caption images, **2** train "
                    "and watch previews, **3** try it at different weights, **4** download the adapter.",
                    elem_id="header")
        with gr.Tabs(elem_id="tabs"):
            dataset.build(ctx)
            train.build(ctx)
            generate.build(ctx)
            export.build(ctx)
        dataset.wire(ctx, demo)
        train.wire(ctx, demo)
    demo.ctx = ctx  # type: ignore[attr-defined]  # tests and launch() reach the job manager through it
    return demo


PUBLIC_PATHS = frozenset({"/", "/login", "/login/", "/favicon.ico", "/theme.css", "/robots.txt", "/manifest.json",
                          "/gradio_api/theme.css", "/gradio_api/startup-events"})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/")  # Gradio's own front-end files, the same for every app


def is_public_path(path: str) -> bool:
    """What the login page itself needs: the page, its scripts, styles and fonts, and the login form."""
    if ".." in path.split("/"):
        return False
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class LoginGate:
    """ASGI middleware: with --auth, every route except the login page and Gradio's static files needs the
    login cookie. Gradio checks the login on its API and file routes itself; this gate refuses the rest
    too (cancel, reset, streams, run history, openapi.json, and any route a later Gradio adds), so
    "logged in or refused" holds for the whole server. It reads Gradio's own session: the
    `access-token[-unsecure]-<cookie_id>` cookie must name one of the app's tokens. If Gradio renames
    those, the gate fails closed (refuses everyone) and tests/test_security.py says so.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # served under a prefix (behind a proxy)
            path = path[len(root):] or "/"
        if scope["type"] not in ("http", "websocket") or _logged_in(scope):
            await self.app(scope, receive, send)
        elif not is_public_path(path):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            from starlette.responses import JSONResponse

            refuse = JSONResponse({"detail": {"error": "Not authenticated", "auth_message": None}}, status_code=401)
            await refuse(scope, receive, send)
        elif path == "/":
            await self.app(scope, receive, _without_api_info(send))
        else:
            await self.app(scope, receive, send)


_API_INFO = re.compile(rb"<script>window\.gradio_api_info = .*?;</script>", re.DOTALL)
_NO_API_INFO = b'<script>window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>'


def _without_api_info(send: Any) -> Any:
    """Gradio's login page embeds the app's whole API description (every endpoint with its defaults and
    choices: run ids, adapter paths, prompts) even for visitors who are not logged in. Strip it."""
    start: dict = {}
    body: list[bytes] = []

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        if message["type"] != "http.response.body":
            await send(message)
            return
        body.append(message.get("body", b""))
        if message.get("more_body"):
            return
        page = _API_INFO.sub(_NO_API_INFO, b"".join(body))
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(page)).encode())]})
        await send({"type": "http.response.body", "body": page})

    return wrapped


def _logged_in(scope: dict) -> bool:
    from starlette.requests import HTTPConnection

    server = scope.get("app")
    cookie_id, tokens = getattr(server, "cookie_id", None), getattr(server, "tokens", None)
    if not cookie_id or not isinstance(tokens, dict):
        return False
    cookies = HTTPConnection(scope).cookies
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return token is not None and token in tokens


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """'USER:PASS' -> (user, pass); ValueError for anything else."""
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like USER:PASSWORD (both non-empty).")
    return user, password


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, auth: str | None = None, *,
           workspace: str | Path | None = None, allowed_folders: Sequence[str | Path] = (),
           max_file_size: str | int = DEFAULT_MAX_UPLOAD, open_browser: bool = False, block: bool = True,
           train_fn: TrainFn | None = None) -> gr.Blocks:
    """Build and serve the app. With block=False it returns once the server is up (tests)."""
    credentials = parse_auth(auth)
    if host not in LOCAL_HOSTS:
        log.warning("Listening on %s:%d: anyone who can reach this machine can use the app, read its workspace "
                    "and run training on its GPU.%s", host, port,
                    "" if credentials else " Add --auth USER:PASSWORD to require a login.")
    if share:
        log.warning("--share opens a public *.gradio.live link through Gradio's relay servers (an outbound "
                    "connection): anyone with the link can use the app.%s",
                    "" if credentials else " Add --auth USER:PASSWORD to require a login.")
    demo = build_ui(workspace, allowed_folders=allowed_folders, train_fn=train_fn)
    ws: Workspace = demo.ctx.workspace  # type: ignore[attr-defined]
    demo.queue(default_concurrency_limit=4)
    from starlette.middleware import Middleware

    demo.launch(server_name=host, server_port=port, share=share, auth=credentials, inbrowser=open_browser,
                max_file_size=max_file_size, allowed_paths=[str(ws.root)], prevent_thread_lock=True,
                footer_links=[], theme=THEME, css=CSS, quiet=True, ssr_mode=False, mcp_server=False,
                pwa=False, enable_monitoring=False,
                app_kwargs={"middleware": [Middleware(LoginGate)]} if credentials else None)
    log.info("LoRA Studio on %s (workspace %s)%s", demo.local_url, ws.root,
             f"; public link {demo.share_url}" if demo.share_url else "")
    if block:
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            log.info("stopping")
    return demo


def add_ui_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `lora-studio ui` options (also what plain `lora-studio` uses)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0 = every "
                        "network interface, which lets other machines in)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (outbound)")
    parser.add_argument("--auth", metavar="USER:PASS", help="require this login")
    parser.add_argument("--allow-folder", action="append", default=[], metavar="DIR",
                        help="let the app read this server folder (dataset import, base models); repeatable")
    parser.add_argument("--workspace", metavar="DIR",
                        help="where datasets, runs and uploads live (default $LORA_STUDIO_HOME or ./workspace)")
    parser.add_argument("--max-upload", default=DEFAULT_MAX_UPLOAD, metavar="SIZE",
                        help=f"largest file one upload may be, e.g. 500mb, 8gb (default {DEFAULT_MAX_UPLOAD}; "
                        "SDXL checkpoints are about 7 GB)")
    parser.add_argument("--open", action="store_true", help="open the app in a browser")
    return parser


def run_ui(args: argparse.Namespace) -> int:
    """Serve the app until interrupted; returns the exit status."""
    try:
        parse_auth(args.auth)
    except ValueError as e:
        log.error("%s", e)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up checks of the local URL
    missing = [f for f in args.allow_folder if not Path(f).expanduser().is_dir()]
    if missing:
        log.error("--allow-folder: not a folder: %s", ", ".join(missing))
        return 2
    launch(args.host, args.port, args.share, args.auth, workspace=args.workspace, allowed_folders=args.allow_folder,
           max_file_size=args.max_upload, open_browser=args.open)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_ui_arguments(argparse.ArgumentParser(prog="python -m app.main", description="LoRA Studio web UI"))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_ui(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
