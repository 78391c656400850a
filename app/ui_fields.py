"""The one place that maps UI components to TrainConfig fields.

Every field of `TrainConfig` (from `iter_fields()`) gets one component, built from its type, its
constraints and its help text. The tabs render the few they show in view (`BASIC`, the Dataset tab's
trigger word and repeats); `render_advanced` puts every other field, section by section, into the
"Advanced" accordion. Handlers receive the values as keyword arguments named `section_field` (e.g.
`lora_rank`), which is also what the HTTP API calls them, and turn them into a validated TrainConfig
with `config_from_params`. Adding a field to TrainConfig adds it here with no second list of names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, Field
from typing import Any, get_args, get_origin

import gradio as gr

from lora_core.config import TrainConfig, iter_fields, iter_sections, list_presets, load_preset, validate
from lora_core.errors import ConfigError

# Shown in view on the Train tab, in this order; everything else goes to the Advanced accordion.
BASIC = ("lora.rank", "lora.alpha", "schedule.steps", "optim.lr", "data.resolution", "schedule.batch_size",
         "lora.train_text_encoder", "sampling.every", "sampling.prompts")
DATASET = ("data.trigger_word", "data.repeats")  # shown on the Dataset tab
APP_MANAGED = ("data.dir",)  # set by the app when a run starts (a copy of the workspace dataset)
DEFAULTS = "(defaults)"
START_PRESET = "quick-demo"  # preselected with the `demo` base: a first run finishes in minutes on a CPU
LABELS = {"optim.lr": "Learning rate", "sampling.every": "Preview every N steps", "sampling.prompts": "Preview prompts",
          "lora.train_text_encoder": "Train the text encoder", "schedule.steps": "Steps",
          "schedule.batch_size": "Batch size", "data.trigger_word": "Trigger word",
          "data.repeats": "Repeats per image"}

# Base models offered in the picker; any hub id, local path or uploaded checkpoint can be typed or chosen.
WELL_KNOWN_BASES = [
    ("demo (bundled tiny model)", "demo"),
    ("tiny:sd1 (random tiny SD 1.x, for tests)", "tiny:sd1"),
    ("SD 1.5: stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("SD 2.1 (768, v): stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2-1"),
    ("SDXL: stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
]


def param(key: str) -> str:
    """'lora.rank' -> 'lora_rank' (section names have no underscore, so this is reversible)."""
    return key.replace(".", "_", 1)


def key_of(name: str) -> str:
    """'lora_rank' -> 'lora.rank'."""
    return name.replace("_", ".", 1)


def _fields() -> dict[str, tuple[Field, Any]]:
    return {f"{s}.{n}": (f, tp) for s, n, f, tp in iter_fields()}


def _default(f: Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def _label(key: str) -> str:
    return LABELS.get(key) or key.split(".", 1)[1].replace("_", " ").capitalize()


def to_ui(key: str, value: Any) -> Any:
    """A config value as its component shows it (lists become text)."""
    tp = _fields()[key][1]
    if get_origin(tp) is list:
        if get_args(tp)[0] is str:
            return "\n".join(value)
        return ", ".join(f"{v:g}" for v in value)
    return value


def from_ui(key: str, value: Any) -> Any:
    """A component's value as the config value; ConfigError saying what to type if it cannot be read."""
    tp = _fields()[key][1]
    try:
        if get_origin(tp) is list:
            text = value if isinstance(value, str) else "\n".join(map(str, value or []))
            if get_args(tp)[0] is str:
                return [line.strip() for line in text.splitlines() if line.strip()]
            return [float(v) for v in text.replace("\n", ",").split(",") if v.strip()]
        if tp is bool:
            return bool(value)
        if tp is str:
            return "" if value is None else str(value).strip()
        if value is None or value == "":
            raise ValueError
        number = float(value)
        if tp is int:
            if not math.isfinite(number) or number != int(number):
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError):
        what = {int: "a whole number", float: "a number"}.get(tp, "numbers separated by commas")
        raise ConfigError(f"{key}: enter {what} (got {value!r}).", [f"{key}: enter {what}"]) from None


def make_component(key: str, value: Any = None, **overrides: Any) -> gr.Component:
    """The component of one field, built from its type, constraints and help text (not rendered)."""
    f, tp = _fields()[key]
    meta = f.metadata
    value = to_ui(key, _default(f) if value is None else value)
    common: dict[str, Any] = dict(label=_label(key), info=meta["help"], render=False, elem_id=f"field-{param(key)}")
    if key == "model.base":
        common.update(choices=WELL_KNOWN_BASES, allow_custom_value=True, label="Base model",
                      info="Pick one, type a Hugging Face hub id or a local path, or upload a checkpoint below.")
        return gr.Dropdown(value=value, **{**common, **overrides})
    low, high = meta.get("range", (None, None))
    if "choices" in meta:
        return gr.Dropdown(choices=meta["choices"], value=value, **{**common, **overrides})
    if tp is bool:
        return gr.Checkbox(value=value, **{**common, **overrides})
    if tp in (int, float):
        return gr.Number(value=value, precision=0 if tp is int else None, minimum=low, maximum=high,
                         step=1 if tp is int else None, **{**common, **overrides})
    if get_origin(tp) is list:
        hint = " One per line." if get_args(tp)[0] is str else " Separate numbers with commas."
        common["info"] = meta["help"] + hint
        return gr.Textbox(value=value, lines=3 if get_args(tp)[0] is str else 1, **{**common, **overrides})
    return gr.Textbox(value=value, **{**common, **overrides})


class FieldForm:
    """All TrainConfig components of one app, created up front so any tab can use any of them."""

    def __init__(self, cfg: TrainConfig | None = None) -> None:
        cfg = cfg or TrainConfig()
        self.components: dict[str, gr.Component] = {}
        for key in _fields():
            if key in APP_MANAGED:
                continue
            section, name = key.split(".", 1)
            self.components[key] = make_component(key, getattr(getattr(cfg, section), name))
        self._rendered: set[str] = set()

    def __getitem__(self, key: str) -> gr.Component:
        return self.components[key]

    def render(self, key: str) -> gr.Component:
        """Place the field's component in the current layout."""
        self._rendered.add(key)
        return self.components[key].render()

    def render_advanced(self) -> None:
        """One accordion per section with every field not rendered elsewhere, three to a row."""
        docs = dict(iter_sections())
        by_section: dict[str, list[str]] = {}
        for key in self.components:
            if key not in self._rendered:
                by_section.setdefault(key.split(".", 1)[0], []).append(key)
        for section, keys in by_section.items():
            with gr.Accordion(f"{section.capitalize()}: {docs.get(section, '')}", open=False):
                for i in range(0, len(keys), 3):
                    with gr.Row():
                        for key in keys[i:i + 3]:
                            self.render(key)

    def inputs(self) -> dict[str, gr.Component]:
        """{param name: component}, for `inputs_kwargs` of events that need the whole form."""
        return {param(k): c for k, c in self.components.items()}

    def outputs(self) -> list[gr.Component]:
        """Every component, in `keys()` order (for handlers that fill the form)."""
        return list(self.components.values())

    def keys(self) -> list[str]:
        return list(self.components)


def config_from_params(params: Mapping[str, Any], *, check: bool = True) -> TrainConfig:
    """A TrainConfig from {param name or section.field: component value}; missing fields keep defaults.

    Raises one ConfigError listing every value that cannot be read or is out of range.
    """
    known = _fields()
    nested: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, value in params.items():
        key = name if name in known else key_of(name)
        if key not in known:
            problems.append(f"unknown setting '{name}'")
            continue
        try:
            section, field_name = key.split(".", 1)
            nested.setdefault(section, {})[field_name] = from_ui(key, value)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError("Some settings cannot be read:\n" + "\n".join(f"  - {p}" for p in problems), problems)
    cfg = TrainConfig.from_dict(nested)
    if check:
        validate(cfg)
    return cfg


def form_values(cfg: TrainConfig, keys: list[str]) -> list[Any]:
    """The components' values for cfg, in `keys` order."""
    return [to_ui(k, getattr(getattr(cfg, k.split(".")[0]), k.split(".", 1)[1])) for k in keys]


def preset_config(name: str) -> TrainConfig:
    """Defaults with a bundled preset applied ("(defaults)" or "" for none)."""
    if not name or name == DEFAULTS:
        return TrainConfig()
    return TrainConfig().merged(load_preset(name))


def start_preset() -> str:
    """The preset the form starts with: START_PRESET where it exists, else the plain defaults."""
    return START_PRESET if START_PRESET in list_presets() else DEFAULTS
