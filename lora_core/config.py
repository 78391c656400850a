"""TrainConfig: every training setting in one typed place, with TOML I/O, presets and validation.

Each setting is a dataclass field whose metadata holds its help text and what it accepts (the sections
are in `config_sections.py`). The CLI's `--set`, presets, adapter metadata and the UI's advanced panel
are all generated from `iter_fields()`: there is no second list of names.

Layering (`resolve`): defaults <- preset <- config file <- `section.field=value` overrides.
"""

import copy
import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import tempfile
import textwrap
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import Field, dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from lora_core.config_sections import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PerformanceConfig,
    SamplingConfig,
    SavingConfig,
    ScheduleConfig,
)
from lora_core.errors import ConfigError

logger = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
@dataclass
class TrainConfig:
    """Everything a training run needs besides the images themselves."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    saving: SavingConfig = field(default_factory=SavingConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict {section: {field: value}} (TOML/JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = True) -> "TrainConfig":
        """Defaults updated by a (partial) nested dict. Unknown names raise unless strict=False."""
        return _merge(cls(), d, strict=strict, source="config")

    def merged(self, d: Mapping[str, Any], *, strict: bool = True) -> "TrainConfig":
        """A copy of this config updated by a (partial) nested dict."""
        return _merge(self, d, strict=strict, source="config")

    def validate(self) -> None:
        """Raise ConfigError listing every problem; see module-level `validate`."""
        validate(self)


# ---------------------------------------------------------------------------------------------------
# Field registry


@functools.cache
def _registry() -> tuple[tuple[str, str, Field, Any], ...]:
    rows = []
    for sec in dataclasses.fields(TrainConfig):
        cls = sec.default_factory
        hints = get_type_hints(cls)
        rows += [(sec.name, f.name, f, hints[f.name]) for f in dataclasses.fields(cls)]
    return tuple(rows)


def iter_fields() -> Iterator[tuple[str, str, Field, Any]]:
    """Yield (section, name, dataclasses.Field, type) for every setting, in declaration order.

    The type is `bool`, `int`, `float`, `str`, `list[str]` or `list[float]`; help and constraints are in
    `Field.metadata`, the default in `Field.default` (or `Field.default_factory()` for lists).
    """
    yield from _registry()


def iter_sections() -> Iterator[tuple[str, str]]:
    """Yield (section, description) in declaration order."""
    for sec in dataclasses.fields(TrainConfig):
        yield sec.name, (sec.default_factory.__doc__ or "").strip()


def _sections() -> dict[str, dict[str, tuple[Field, Any]]]:
    out: dict[str, dict[str, tuple[Field, Any]]] = {}
    for section, name, f, tp in _registry():
        out.setdefault(section, {})[name] = (f, tp)
    return out


def _unknown(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown {kind} '{name}'{hint}; valid: {', '.join(valid)}"


# ---------------------------------------------------------------------------------------------------
# Types


def _type_name(tp: Any) -> str:
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0]).removeprefix('a ')}s"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[tp]


def _check_type(value: Any, tp: Any) -> Any:
    """Return value converted to tp (int -> float, tuple -> list) or raise TypeError."""
    if get_origin(tp) is list:
        try:
            if not isinstance(value, list | tuple):
                raise TypeError
            return [_check_type(v, get_args(tp)[0]) for v in value]
        except TypeError:
            raise TypeError(f"expected {_type_name(tp)}") from None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise TypeError(f"expected {_type_name(tp)}")
    return float(value) if tp is float else value


def _show(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


# settings whose values were once true/false: what those mean now (configs saved with earlier runs still load)
_FORMER_VALUES = {("performance", "low_rank_kernel"): {True: "add", False: "off"}}


def _merge(cfg: TrainConfig, d: Mapping[str, Any], *, strict: bool, source: str) -> TrainConfig:
    """Copy of cfg with d's values set; collects unknown names and wrong types into one ConfigError."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a table of sections, got {_show(d)}")
    out = copy.deepcopy(cfg)
    sections = _sections()
    problems: list[str] = []
    unknown: list[str] = []
    for section, values in d.items():
        if section not in sections:
            unknown.append(_unknown("section", section, sections))
            continue
        if not isinstance(values, Mapping):
            problems.append(f"[{section}] must be a table of settings, got {_show(values)}")
            continue
        for name, value in values.items():
            if name not in sections[section]:
                unknown.append(f"{section}: " + _unknown("field", name, sections[section]))
                continue
            value = _FORMER_VALUES.get((section, name), {}).get(value, value) if isinstance(value, bool) else value
            try:
                setattr(getattr(out, section), name, _check_type(value, sections[section][name][1]))
            except TypeError as e:
                problems.append(f"{section}.{name} = {_show(value)}: {e}")
    if strict:
        problems = unknown + problems
    elif unknown:
        logger.warning("%s: ignoring %s", source, "; ".join(unknown))
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems),
                          problems)
    return out


# ---------------------------------------------------------------------------------------------------
# Validation


def _describe_range(meta: Mapping[str, Any]) -> str:
    low, high = meta["range"]
    lo_word = "greater than" if meta.get("min_exclusive") else "at least"
    hi_word = "less than" if meta.get("max_exclusive") else "at most"
    if low is not None and high is not None:
        if not meta.get("min_exclusive") and not meta.get("max_exclusive"):
            return f"must be between {low} and {high}"
        return f"must be {lo_word} {low} and {hi_word} {high}"
    return f"must be {lo_word} {low}" if low is not None else f"must be {hi_word} {high}"


def _check_value(value: Any, meta: Mapping[str, Any]) -> str | None:
    """What is wrong with one scalar value under its field's constraints, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if "choices" in meta and value not in meta["choices"]:
        return "must be one of " + ", ".join(_show(c) for c in meta["choices"])
    if "range" in meta:
        low, high = meta["range"]
        too_low = low is not None and (value <= low if meta.get("min_exclusive") else value < low)
        too_high = high is not None and (value >= high if meta.get("max_exclusive") else value > high)
        if too_low or too_high:
            return _describe_range(meta)
    if "multiple_of" in meta and value % meta["multiple_of"]:
        return f"must be a multiple of {meta['multiple_of']}"
    return None


def _field_problems(cfg: TrainConfig) -> tuple[list[str], bool]:
    """Problems of single fields, and whether every field has the right type."""
    problems = []
    types_ok = True
    for section, name, f, tp in _registry():
        value = getattr(getattr(cfg, section), name)
        try:
            value = _check_type(value, tp)
        except TypeError as e:
            problems.append(f"{section}.{name} = {_show(value)}: {e}")
            types_ok = False
            continue
        for v in value if isinstance(value, list) else [value]:
            why = _check_value(v, f.metadata)
            if why:
                problems.append(f"{section}.{name} = {_show(value)}: {why}")
                break
    return problems, types_ok


def _cross_problems(c: TrainConfig) -> list[str]:
    """Rules that involve more than one field. Assumes each field has the right type."""
    p = []
    d = c.data
    if d.min_bucket and d.max_bucket and d.max_bucket < d.min_bucket:
        p.append(f"data.max_bucket = {d.max_bucket}: must be at least data.min_bucket ({d.min_bucket})")
    elif d.buckets:
        low, high = d.bucket_range()
        if d.min_bucket and low > d.resolution:
            p.append(f"data.min_bucket = {low}: must be at most data.resolution ({d.resolution})")
        if d.max_bucket and high < d.resolution:
            p.append(f"data.max_bucket = {high}: must be at least data.resolution ({d.resolution})")
    if d.cache_to_disk and not d.cache_latents:
        p.append("data.cache_to_disk = true: needs data.cache_latents = true")
    s = c.schedule
    if s.epochs == 0 and s.warmup_steps >= s.steps:
        p.append(f"schedule.warmup_steps = {s.warmup_steps}: must be less than schedule.steps ({s.steps})")
    if not c.sampling.scales:
        p.append("sampling.scales = []: needs at least one scale, e.g. [1.0]")
    name = c.saving.output_name
    if not name.strip() or name in {".", ".."} or any(ch in name for ch in '/\\:*?"<>|'):
        p.append(f"saving.output_name = {_show(name)}: must be a plain file name without / \\ : * ? \" < > |")
    perf = c.performance
    if perf.device == "cpu" and perf.mixed_precision == "fp16":
        p.append('performance.mixed_precision = "fp16": needs a CUDA GPU; with device = "cpu" use '
                 '"auto", "bf16" or "no"')
    if perf.device == "cpu" and perf.cuda_graphs == "on":
        p.append('performance.cuda_graphs = "on": needs a CUDA GPU; use "auto" or "off" with device = "cpu"')
    return p


def validate(cfg: TrainConfig) -> None:
    """Check every field (type, range, choices) and cross-field rule; raise ONE ConfigError listing all.

    Each problem reads `section.field = value: what is allowed`.
    """
    problems, types_ok = _field_problems(cfg)
    if types_ok:  # cross-field rules compare values, so they need the right types
        problems += [p for p in _cross_problems(cfg) if p not in problems]
    if problems:
        raise ConfigError(f"Invalid training settings ({len(problems)} problem(s)):\n"
                          + "\n".join(f"  - {p}" for p in problems), problems)
    if cfg.optim.optimizer == "prodigy" and cfg.optim.lr < 0.1:
        logger.warning("optim.optimizer = prodigy usually wants optim.lr = 1.0 (got %g)", cfg.optim.lr)


# ---------------------------------------------------------------------------------------------------
# Overrides


def _parse_list(text: str) -> list[Any]:
    t = text.strip()
    if not t:
        return []
    if t.startswith("["):
        try:
            return tomllib.loads(f"v = {t}")["v"]
        except tomllib.TOMLDecodeError:
            try:
                return json.loads(t)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a valid TOML/JSON list ({e})") from None
    return [part.strip() for part in t.split(",") if part.strip()]


def _parse_value(text: str, tp: Any) -> Any:
    """Parse the text of an override as the field's type; raise ValueError saying what was expected."""
    t = text.strip()
    if tp is bool:
        low = t.lower()
        if low in {"true", "1", "yes", "on"}:
            return True
        if low in {"false", "0", "no", "off"}:
            return False
        raise ValueError("expected true or false (also 1/0, yes/no, on/off)")
    if tp is int or tp is float:
        try:
            return tp(t)
        except ValueError:
            raise ValueError(f"expected {_type_name(tp)}") from None
    if tp is str:
        if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
            try:
                return tomllib.loads(f"v = {t}")["v"]
            except tomllib.TOMLDecodeError:
                pass
        return text
    item_tp = get_args(tp)[0]
    items = _parse_list(text)
    if item_tp is float:
        try:
            items = [float(v) if isinstance(v, str) else v for v in items]
        except ValueError:
            raise ValueError(f"expected {_type_name(tp)}") from None
    try:
        return _check_type(items, tp)
    except TypeError as e:
        raise ValueError(str(e)) from None


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """Copy of cfg with `section.field=value` strings applied, each value parsed by the field's type.

    Bools accept true/false/1/0/yes/no/on/off; lists accept TOML/JSON syntax or `a, b, c`.
    All bad overrides are reported together in one ConfigError.
    """
    sections = _sections()
    updates: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        section, dot, name = key.partition(".")
        if not sep or not dot:
            problems.append(f"'{item}': expected section.field=value, e.g. lora.rank=32")
        elif section not in sections:
            problems.append(f"'{item}': " + _unknown("section", section, sections))
        elif name not in sections[section]:
            problems.append(f"'{item}': " + _unknown("field", name, sections[section]))
        else:
            try:
                updates.setdefault(section, {})[name] = _parse_value(text, sections[section][name][1])
            except ValueError as e:
                problems.append(f"{key} = {text.strip()!r}: {e}")
    if problems:
        raise ConfigError(f"Bad --set override(s) ({len(problems)}):\n" + "\n".join(f"  - {p}" for p in problems),
                          problems)
    return _merge(cfg, updates, strict=True, source="overrides")


# ---------------------------------------------------------------------------------------------------
# TOML files and presets


def _read_toml(path: str | Path, what: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {p}. Check the path.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {p} cannot be read: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {p} is not valid TOML: {e}. Fix that line or re-save it from the app.") from None


def load_toml(path: str | Path) -> TrainConfig:
    """Read a (full or partial) config file over the defaults. Does not validate ranges: call validate()."""
    return _merge(TrainConfig(), _read_toml(path, "Config file"), strict=True, source=str(path))


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_toml(cfg: TrainConfig) -> str:
    """TOML text of the whole config, each setting preceded by its help text as a comment."""
    lines = ["# LoRA Studio training config. Load with: lora-studio train --config THIS_FILE"]
    docs = dict(iter_sections())
    current = None
    for section, name, f, _ in _registry():
        if section != current:
            current = section
            lines += ["", f"# {docs[section]}", f"[{section}]"]
        lines += textwrap.wrap(f.metadata["help"], 100, initial_indent="# ", subsequent_indent="# ")
        lines.append(tomli_w.dumps({name: getattr(getattr(cfg, section), name)}).rstrip("\n"))
    return "\n".join(lines) + "\n"


def save_toml(cfg: TrainConfig, path: str | Path) -> None:
    """Write the config as commented TOML, atomically (temp file in the same folder, then rename)."""
    _atomic_write_text(Path(path), to_toml(cfg))


def list_presets() -> list[str]:
    """Names of the bundled presets (presets/*.toml)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The partial {section: {field: value}} overrides of presets/NAME.toml, checked for unknown names."""
    available = list_presets()
    if name not in available:
        raise ConfigError(f"Unknown preset '{name}'. Available presets: {', '.join(available) or '(none)'}. "
                          "For your own settings file use --config FILE.toml.")
    data = _read_toml(PRESETS_DIR / f"{name}.toml", "Preset")
    _merge(TrainConfig(), data, strict=True, source=f"preset {name}")
    return data


def resolve(preset: str | None = None, config_file: str | Path | None = None,
            overrides: Iterable[str] = (), *, check: bool = True) -> TrainConfig:
    """Defaults <- preset <- config file <- overrides; validated unless check=False."""
    cfg = TrainConfig()
    if preset:
        cfg = _merge(cfg, load_preset(preset), strict=True, source=f"preset {preset}")
    if config_file:
        cfg = _merge(cfg, _read_toml(config_file, "Config file"), strict=True, source=str(config_file))
    cfg = apply_overrides(cfg, overrides)
    if check:
        validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------
# Adapter metadata


def to_metadata(cfg: TrainConfig) -> dict[str, str]:
    """Flat {"section.field": JSON value} for the adapter's safetensors metadata (all strings)."""
    return {f"{s}.{n}": json.dumps(getattr(getattr(cfg, s), n), ensure_ascii=False)
            for s, n, _, _ in _registry()}


def from_metadata(metadata: Mapping[str, str]) -> TrainConfig:
    """Inverse of to_metadata; keys that are not config fields (ss_*, modelspec.*) are ignored."""
    sections = _sections()
    nested: dict[str, dict[str, Any]] = {}
    for key, text in metadata.items():
        section, _, name = key.partition(".")
        if section in sections and name in sections[section]:
            try:
                nested.setdefault(section, {})[name] = json.loads(text)
            except json.JSONDecodeError:
                logger.warning("adapter metadata %s = %r is not JSON; using the default", key, text)
    return _merge(TrainConfig(), nested, strict=False, source="adapter metadata")
