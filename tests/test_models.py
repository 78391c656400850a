"""Resolving MODEL strings: built-ins, demo, diffusers folders, the hub cache, VAE and clip-skip options."""

import json
import time

import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from lora_core import models
from lora_core.errors import ModelError
from lora_core.models import BUILTIN, build_pipeline, load_model, save_configs
from lora_core.singlefile import checkpoint_tensors, save_single_file


def unet_out(m):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, m.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if m.family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        return m.unet(x.to(m.unet.dtype), torch.tensor([500]), ctx.to(m.unet.dtype), **kw).sample.float()


def test_builtins_keep_their_behaviour():
    m = load_model("tiny:sd2-v", seed=1)
    ref = build_pipeline("tiny:sd2-v", seed=1)
    assert (m.family, m.prediction_type, m.name, m.resolution, m.clip_skip) == ("sd2", "v_prediction",
                                                                                "tiny:sd2-v", 32, 1)
    assert torch.equal(unet_out(m), unet_out(ref))
    assert ref.clip_skip == 1  # LoadedModel's new field has a default


def test_options_dtype_clip_skip_prediction_type():
    m = load_model("tiny:sd1", dtype=torch.float16, clip_skip=2)
    assert m.unet.dtype == torch.float16 and m.text_encoders[0].dtype == torch.float16 and m.clip_skip == 2
    with pytest.raises(ModelError, match="clip_skip must be between 1 .* and 2"):
        load_model("tiny:sd1", clip_skip=3)
    v = load_model("tiny:sd2", prediction_type="v_prediction")
    assert v.prediction_type == "v_prediction" and v.noise_scheduler().config.prediction_type == "v_prediction"
    assert v.base_model_version == "sd_v2_v"


def test_demo_is_tiny_sd1_until_a_bundled_base_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "ASSETS", tmp_path)
    assert load_model("demo").family == "sd1"
    build_pipeline("tiny:sd1", seed=5).pipe.save_pretrained(tmp_path / "demo-base")
    demo = load_model("demo")
    assert demo.name == "demo" and demo.family == "sd1"
    assert (unet_out(demo) - unet_out(build_pipeline("tiny:sd1", seed=5))).abs().max() <= 1e-5


@pytest.mark.parametrize("name,family,pred", [("tiny:sd1", "sd1", "epsilon"), ("tiny:sd2-v", "sd2", "v_prediction"),
                                              ("tiny:sdxl", "sdxl", "epsilon")])
def test_diffusers_folder(tmp_path, name, family, pred):
    ref = build_pipeline(name, seed=2)
    ref.pipe.save_pretrained(tmp_path / "model")
    m = load_model(str(tmp_path / "model"))
    assert (m.family, m.prediction_type, m.resolution) == (family, pred, 32)
    assert (unet_out(m) - unet_out(ref)).abs().max() <= 1e-5  # same weights; kernels may differ slightly


def test_folder_errors(tmp_path):
    with pytest.raises(ModelError, match="no model_index.json"):
        load_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(ModelError, match="holds a StableDiffusionXLImg2ImgPipeline"):
        load_model(str(tmp_path))


def test_uncached_hub_id_fails_fast_with_one_paragraph(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        load_model("lora-studio-tests/not-a-cached-model")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "\n" not in msg and "not in the local Hugging Face cache" in msg
    assert "diffusers folder" in msg and ".safetensors" in msg


def test_cached_hub_id_loads_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    build_pipeline("tiny:sd1", seed=4).pipe.save_pretrained(repo / "snapshots" / ("0" * 40))
    m = load_model("someone/tiny-sd")
    assert m.name == "someone/tiny-sd" and m.family == "sd1"
    assert (unet_out(m) - unet_out(build_pipeline("tiny:sd1", seed=4))).abs().max() <= 1e-5


def test_unrecognised_strings(tmp_path):
    with pytest.raises(ModelError, match="not a built-in name"):
        load_model("no such model")
    with pytest.raises(ModelError, match="missing.safetensors' does not exist"):
        load_model(str(tmp_path / "missing.safetensors"))


def test_separate_vae_file_or_folder(tmp_path):
    other = build_pipeline("tiny:sd1", seed=9)
    ldm = {k.removeprefix("first_stage_model."): v for k, v in checkpoint_tensors(other).items()
           if k.startswith("first_stage_model.")}
    save_file(ldm, tmp_path / "vae-ldm.safetensors")
    save_file(other.pipe.vae.state_dict(), tmp_path / "vae-diffusers.safetensors")
    other.pipe.vae.save_pretrained(tmp_path / "vae-folder")
    want = other.pipe.vae.state_dict()
    for source in ("vae-ldm.safetensors", "vae-diffusers.safetensors", "vae-folder"):
        m = load_model("tiny:sd1", vae=str(tmp_path / source))
        got = m.pipe.vae.state_dict()
        assert all(torch.equal(v, got[k]) for k, v in want.items()), source
    whole = save_single_file(other, tmp_path / "whole.safetensors")
    with pytest.raises(ModelError, match="whole.safetensors' is a whole model, not a VAE"):
        load_model("tiny:sd1", vae=str(whole))


@pytest.mark.parametrize("folder,name", [("sd15", "full:sd15"), ("sd21-v", "full:sd21-v"), ("sdxl", "full:sdxl")])
def test_shipped_configs_match_the_builtin_architectures(tmp_path, folder, name):
    """assets/configs/ is what save_configs writes for the full:* specs (library version fields aside)."""
    fresh = save_configs(name, tmp_path)
    shipped = models.ASSETS / "configs" / folder
    files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
    for rel in files:
        a, b = json.loads((fresh / rel).read_text()), json.loads((shipped / rel).read_text())
        drop = ("_diffusers_version", "transformers_version")
        assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}, rel


def test_builtin_names_are_listed_in_errors():
    with pytest.raises(ModelError) as err:
        load_model("nope")
    assert all(name in str(err.value) for name in BUILTIN)
