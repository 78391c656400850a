"""TrainConfig: defaults, presets, validation that reports everything, TOML, overrides, metadata."""

import dataclasses
from typing import get_args, get_origin

import pytest

from lora_core import config
from lora_core.config import TrainConfig
from lora_core.errors import ConfigError


def test_defaults_validate():
    config.validate(TrainConfig())
    TrainConfig().validate()


@pytest.mark.parametrize("name", config.list_presets())
def test_every_preset_loads_and_validates(name):
    overrides = config.load_preset(name)
    assert overrides, f"preset {name} is empty"
    text = (config.PRESETS_DIR / f"{name}.toml").read_text(encoding="utf-8")
    assert text.startswith("#"), f"preset {name} must start with a comment saying what it is for"
    cfg = config.resolve(preset=name)
    for section, fields in overrides.items():
        for field_name, value in fields.items():
            assert getattr(getattr(cfg, section), field_name) == value


def test_expected_presets_exist():
    expected = {"quick-demo", "character-sd15", "style-sd15", "character-sdxl", "style-sdxl", "low-vram"}
    assert expected <= set(config.list_presets())
    demo = config.resolve(preset="quick-demo")
    assert (demo.model.base, demo.data.resolution, demo.lora.rank) == ("demo", 64, 16)
    low = config.resolve(preset="low-vram")
    assert low.performance.gradient_checkpointing and low.schedule.batch_size == 1
    assert low.performance.mixed_precision == "fp16"


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError) as e:
        config.load_preset("nope")
    assert "quick-demo" in str(e.value) and "nope" in str(e.value)


def test_five_wrong_fields_in_one_error():
    cfg = TrainConfig()
    cfg.lora.rank = 0
    cfg.data.resolution = 100  # not a multiple of 8
    cfg.optim.optimizer = "sgd"
    cfg.data.flip = "yes"  # wrong type
    cfg.sampling.scales = [1.0, 9.0]
    with pytest.raises(ConfigError) as e:
        config.validate(cfg)
    message = str(e.value)
    for key in ["lora.rank", "data.resolution", "optim.optimizer", "data.flip", "sampling.scales"]:
        assert key in message
    assert len(e.value.problems) == 5
    assert "multiple of 8" in message and '"adamw"' in message


def test_cross_field_rules_reported_with_field_errors():
    cfg = TrainConfig()
    cfg.lora.rank = -1
    cfg.data.min_bucket, cfg.data.max_bucket = 512, 256
    cfg.data.cache_latents, cfg.data.cache_to_disk = False, True
    cfg.schedule.steps, cfg.schedule.warmup_steps = 10, 10
    cfg.saving.output_name = "a/b"
    with pytest.raises(ConfigError) as e:
        config.validate(cfg)
    message = str(e.value)
    for key in ["lora.rank", "data.max_bucket", "data.cache_to_disk", "schedule.warmup_steps",
                "saving.output_name"]:
        assert key in message


def test_exclusive_bounds():
    cfg = TrainConfig()
    cfg.lora.alpha = 0.0
    cfg.lora.dropout = 1.0
    with pytest.raises(ConfigError) as e:
        config.validate(cfg)
    assert "greater than 0" in str(e.value) and "less than 1" in str(e.value)


def test_toml_round_trip(tmp_path):
    cfg = config.apply_overrides(TrainConfig(), [
        "lora.rank=32", "sampling.prompts=[\"a, b\", \"ünïcode\"]", "sampling.scales=0,0.5,1",
        "data.flip=true", "optim.lr=3e-4", "model.base=some/hub-id"])
    path = tmp_path / "sub" / "config.toml"
    config.save_toml(cfg, path)
    assert config.load_toml(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.toml"]  # no temp files left
    text = path.read_text(encoding="utf-8")
    assert "# Adapter rank" in text  # help text written as comments
    assert "\nrank = 32\n" in text


def test_dict_and_metadata_round_trip():
    cfg = config.apply_overrides(TrainConfig(), ["schedule.seed=7", "sampling.scales=[0.25]"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    md = config.to_metadata(cfg)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert md["schedule.seed"] == "7"
    md["ss_network_dim"] = "16"  # foreign keys are ignored
    assert config.from_metadata(md) == cfg


def test_from_dict_partial_and_type_problems():
    cfg = TrainConfig.from_dict({"lora": {"rank": 4}, "optim": {"lr": 1}})
    assert cfg.lora.rank == 4 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.resolution == 512  # untouched sections keep defaults
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"lora": {"rank": "big", "dropout": True}, "data": {"flip": 1}})
    assert len(e.value.problems) == 3


def test_unknown_names_listed():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"lorra": {"rank": 4}})
    assert "lorra" in str(e.value) and "lora" in str(e.value) and "schedule" in str(e.value)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"lora": {"rnak": 4}})
    assert "rnak" in str(e.value) and "alpha" in str(e.value) and "did you mean 'rank'" in str(e.value)
    assert TrainConfig.from_dict({"lora": {"rnak": 4}, "future": {}}, strict=False) == TrainConfig()
    with pytest.raises(ConfigError) as e:
        config.apply_overrides(TrainConfig(), ["lora.rnak=4", "nosection.x=1", "justtext"])
    message = str(e.value)
    assert "rank, alpha" in message and "model, data" in message and "section.field=value" in message


def test_overrides_parse_types():
    cfg = config.apply_overrides(TrainConfig(), [
        "data.flip=yes", "data.cache_latents=0", "lora.train_text_encoder=False",
        "lora.rank=64", "lora.alpha=32", "optim.lr=1e-3",
        "sampling.prompts=a cat, a dog", "sampling.scales=[0, 1.5]", "data.trigger_word=  sks  ",
        "saving.output_name=\"my lora\"", "model.base=a=b"])
    assert cfg.data.flip is True and cfg.data.cache_latents is False and cfg.lora.train_text_encoder is False
    assert cfg.lora.rank == 64 and cfg.lora.alpha == 32.0 and cfg.optim.lr == 1e-3
    assert cfg.sampling.prompts == ["a cat", "a dog"]
    assert cfg.sampling.scales == [0.0, 1.5]
    assert cfg.data.trigger_word == "  sks  "
    assert cfg.saving.output_name == "my lora"
    assert cfg.model.base == "a=b"
    assert config.apply_overrides(cfg, ["sampling.prompts="]).sampling.prompts == []
    with pytest.raises(ConfigError) as e:
        config.apply_overrides(cfg, ["lora.rank=1.5", "data.flip=maybe", "sampling.scales=a,b"])
    assert len(e.value.problems) == 3
    assert cfg.lora.rank == 64  # the original is not modified


def test_resolve_layers(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text("[lora]\nrank = 12\n[schedule]\nsteps = 77\n", encoding="utf-8")
    cfg = config.resolve(preset="quick-demo", config_file=path, overrides=["schedule.steps=99"])
    assert cfg.model.base == "demo"  # from the preset
    assert cfg.lora.rank == 12  # config file beats preset
    assert cfg.schedule.steps == 99  # override beats config file
    with pytest.raises(ConfigError):
        config.resolve(overrides=["lora.rank=0"])
    assert config.resolve(overrides=["lora.rank=0"], check=False).lora.rank == 0


def test_bad_toml_file_names_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora\nrank = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.toml"):
        config.load_toml(bad)
    with pytest.raises(ConfigError, match="missing.toml"):
        config.load_toml(tmp_path / "missing.toml")


def test_iter_fields_covers_every_field():
    rows = list(config.iter_fields())
    sections = [f.name for f in dataclasses.fields(TrainConfig)]
    assert [s for s, _ in config.iter_sections()] == sections
    expected = [(s, f.name) for s in sections
                for f in dataclasses.fields(getattr(TrainConfig(), s))]
    assert [(s, n) for s, n, _, _ in rows] == expected
    assert len(rows) == len(config.to_metadata(TrainConfig()))
    allowed_types = {bool, int, float, str}
    for section, name, f, tp in rows:
        assert f.metadata.get("help", "").strip(), f"{section}.{name} has no help text"
        assert tp in allowed_types or (get_origin(tp) is list and get_args(tp)[0] in allowed_types)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert default == getattr(getattr(TrainConfig(), section), name)
        if "choices" in f.metadata:
            assert default in f.metadata["choices"]


@pytest.mark.parametrize(("former", "now"), [("true", "add"), ("false", "off")])
def test_a_config_saved_when_low_rank_kernel_was_true_or_false_still_loads(tmp_path, former, now):
    path = tmp_path / "config.toml"
    path.write_text(f"[performance]\nlow_rank_kernel = {former}\n")
    assert config.load_toml(path).performance.low_rank_kernel == now
