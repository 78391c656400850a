"""What every tab's handlers share: the workspace, the job manager, the field form and permissions;
and `ui()`, which turns a plain handler into a Gradio event function."""

from __future__ import annotations

import functools
import html
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from app.jobs import JobManager
from app.ui_fields import FieldForm
from app.workspace import Workspace
from lora_core.errors import LoraStudioError


@dataclass
class AppContext:
    workspace: Workspace
    jobs: JobManager
    form: FieldForm
    allowed_folders: tuple[Path, ...] = ()  # server folders the Dataset tab and base-model paths may read
    extra: dict[str, Any] = field(default_factory=dict)

    def data_params(self) -> dict[str, gr.Component]:
        """The form's data.* components as {param: component} (what the dataset report depends on)."""
        return {name: c for name, c in self.form.inputs().items() if name.startswith("data_")}


def _html(e: Exception) -> str:
    """gr.Error renders HTML: escape the message, keep its line breaks."""
    return html.escape(str(e)).replace("\n", "<br>")


def ui(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a handler for Gradio: its LoraStudioError becomes a gr.Error (a message box, no traceback).

    Works for generator handlers too; the signature is kept so Gradio sees the real parameters.
    """
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except LoraStudioError as e:
                raise gr.Error(_html(e), print_exception=False) from None
        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LoraStudioError as e:
            raise gr.Error(_html(e), print_exception=False) from None
    return call


def bind(fn: Callable[..., Any], ctx: AppContext) -> Callable[..., Any]:
    """`ui(partial(fn, ctx))` with the handler's name kept (API names and logs use it)."""
    wrapped = ui(functools.partial(fn, ctx))
    wrapped.__name__ = fn.__name__  # type: ignore[attr-defined]
    try:  # evaluated hints, so Gradio recognises injected parameters such as `evt: gr.SelectData`
        wrapped.__annotations__ = typing.get_type_hints(fn)
    except (NameError, TypeError):
        pass
    return wrapped
