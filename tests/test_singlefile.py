"""Single-file checkpoints: our writer, our loader, diffusers' loader, recognition and refusals."""

import pickle

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from lora_core import singlefile
from lora_core.errors import ModelError
from lora_core.export import build_metadata, save_adapter
from lora_core.inject import inject
from lora_core.models import build_pipeline, load_model, save_configs
from lora_core.singlefile import (
    META_CONFIGS,
    checkpoint_tensors,
    pipeline_from_tensors,
    read_checkpoint,
    save_single_file,
)

CASES = [("tiny:sd1", "sd1", "epsilon"), ("tiny:sd2-v", "sd2", "v_prediction"), ("tiny:sdxl", "sdxl", "epsilon")]


def unet_out(unet):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if unet.config.addition_embed_type:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 600]), ctx, **kw).sample


def hidden(te, tokenizer):
    ids = tokenizer(["a red circle on green"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return te(ids).last_hidden_state


def decoded(vae):
    with torch.no_grad():
        return vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))).sample


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each tiny family written by our writer in fp32, with its diffusers config folder."""
    out = {}
    for name, _, _ in CASES:
        d = tmp_path_factory.mktemp(name.replace(":", "-"))
        m = build_pipeline(name, seed=3)
        out[name] = (m, save_single_file(m, d / "model.safetensors", dtype=torch.float32), save_configs(name, d / "cfg"))
    return out


@pytest.mark.parametrize("name,family,pred", CASES)
def test_our_loader_reads_our_file(written, name, family, pred):
    m, path, _ = written[name]
    back = load_model(str(path))
    assert (back.family, back.prediction_type, back.resolution) == (family, pred, 32)
    assert back.pipe.scheduler.config.prediction_type == pred
    assert close(unet_out(back.unet), unet_out(m.unet))
    assert close(decoded(back.pipe.vae), decoded(m.pipe.vae))
    for te, te_back in zip(m.text_encoders, back.text_encoders, strict=True):
        assert close(hidden(te_back, back.tokenizers[0]), hidden(te, m.tokenizers[0]))


@pytest.mark.parametrize("name,family,pred", CASES)
def test_diffusers_from_single_file_reads_our_file(written, name, family, pred):
    m, path, cfg = written[name]
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    ref = cls.from_single_file(str(path), config=str(cfg), local_files_only=True)
    assert close(unet_out(ref.unet), unet_out(m.unet))
    assert close(decoded(ref.vae), decoded(m.pipe.vae))
    # text_encoder_2 of tiny:sdxl is not compared: both tiny encoders are 32 wide, and diffusers then
    # takes embedders.0 (CLIP-L) for it; with real widths (768 vs 1280) it picks embedders.1.
    assert close(hidden(ref.text_encoder, m.tokenizers[0]), hidden(m.text_encoders[0], m.tokenizers[0]))


def test_file_layout_and_default_dtype(tmp_path):
    keys = {}
    for name in ("tiny:sd1", "tiny:sd2-v", "tiny:sdxl"):
        path = save_single_file(build_pipeline(name), tmp_path / f"{name[5:]}.safetensors")
        keys[name] = load_file(path)
    sd1, sd2, xl = keys["tiny:sd1"], keys["tiny:sd2-v"], keys["tiny:sdxl"]
    assert sd1["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd1
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # 1x1 conv in LDM
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd1  # upsampler, no attention before
    assert sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert "v_pred" in sd2 and "v_pred" not in sd1
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in xl
    assert "conditioner.embedders.1.model.text_projection" in xl
    assert "model.diffusion_model.label_emb.0.0.weight" in xl
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight" in xl
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in xl  # upsampler after attention


@pytest.mark.parametrize("name", ["full:sd15", "full:sd21-v", "full:sdxl"])
def test_full_size_layout_matches_diffusers_and_shipped_configs(name):
    """Full architectures on the meta device: keys and shapes only, so it runs in a second on a CPU."""
    m = build_pipeline(name, device="meta")
    tensors = checkpoint_tensors(m)
    unet = convert_ldm_unet_checkpoint(tensors, m.unet.config)
    assert {k: v.shape for k, v in unet.items()} == {k: v.shape for k, v in m.unet.state_dict().items()}
    vae = convert_ldm_vae_checkpoint(tensors, m.pipe.vae.config)
    assert {k: v.shape for k, v in vae.items()} == {k: v.shape for k, v in m.pipe.vae.state_dict().items()}
    back = pipeline_from_tensors(tensors, {}, f"{name}.safetensors")  # no embedded configs: shipped ones
    assert (back.family, back.prediction_type, back.resolution) == (m.family, m.prediction_type, m.resolution)


def test_ckpt_with_state_dict_wrapper_loads(tmp_path, written, monkeypatch):
    m, path, cfg = written["tiny:sd1"]
    monkeypatch.setattr(singlefile, "config_folder", lambda family: cfg)  # a .ckpt has no embedded configs
    torch.save({"state_dict": load_file(path), "global_step": 10}, tmp_path / "model.ckpt")
    back = load_model(str(tmp_path / "model.ckpt"))
    assert back.family == "sd1" and close(unet_out(back.unet), unet_out(m.unet))


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_malicious_ckpt_does_not_run(tmp_path, kind):
    marker, path = tmp_path / "PWNED", tmp_path / "evil.ckpt"
    if kind == "torch-zip":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil(str(marker))}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": Evil(str(marker))}, protocol=2))
    with pytest.raises(ModelError, match="evil.ckpt.*refuses"):
        load_model(str(path))
    assert not marker.exists()


def _variant(tmp_path, written, fn, name="tiny:sd1", meta=None):
    tensors, _ = read_checkpoint(written[name][1])
    path = tmp_path / "variant.safetensors"
    save_file(fn(tensors), path, metadata=meta)
    return path


def test_sd2_without_hints_is_v_prediction_unless_told(tmp_path, written):
    path = _variant(tmp_path, written, lambda t: {k: v for k, v in t.items() if k != "v_pred"}, "tiny:sd2-v",
                    meta={META_CONFIGS: read_checkpoint(written["tiny:sd2-v"][1])[1][META_CONFIGS]})
    assert load_model(str(path)).prediction_type == "v_prediction"
    eps = load_model(str(path), prediction_type="epsilon")
    assert eps.prediction_type == "epsilon" and eps.pipe.scheduler.config.prediction_type == "epsilon"
    m = build_pipeline("tiny:sd2")
    tiny_sd2 = save_single_file(m, tmp_path / "sd2.safetensors")  # epsilon, said in its modelspec
    assert load_model(str(tiny_sd2)).prediction_type == "epsilon"


def test_refusals_name_what_the_file_is(tmp_path, written):
    def refiner(t):
        return {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in t.items()
                if not k.startswith("conditioner.embedders.0.")}

    def inpainting(t):
        w = t["model.diffusion_model.input_blocks.0.0.weight"]
        return dict(t, **{"model.diffusion_model.input_blocks.0.0.weight": torch.cat([w, w, w[:, :1]], 1)})

    def vae_only(t):
        return {k.removeprefix("first_stage_model."): v for k, v in t.items() if k.startswith("first_stage_model.")}

    cases = [(refiner, "tiny:sdxl", "SDXL refiner"), (inpainting, "tiny:sd1", "inpainting model"),
             (vae_only, "tiny:sd1", "VAE on its own")]
    for fn, name, words in cases:
        with pytest.raises(ModelError, match=f"variant.safetensors' is .*{words}"):
            load_model(str(_variant(tmp_path, written, fn, name)))

    m = build_pipeline("tiny:sd1")
    mods = inject(m.unet, m.text_encoders, m.family, rank=2)
    save_adapter(tmp_path / "style.safetensors", mods, build_metadata(m, rank=2, alpha=1.0))
    with pytest.raises(ModelError, match="style.safetensors' is a LoRA adapter.*--lora"):
        load_model(str(tmp_path / "style.safetensors"))
    with pytest.raises(ModelError, match="carries injected LoRA layers"):
        save_single_file(m, tmp_path / "no.safetensors")


def test_file_without_configs_must_match_the_standard_architecture(tmp_path):
    path = save_single_file(build_pipeline("tiny:sd1"), tmp_path / "tiny.safetensors", embed_configs=False)
    with pytest.raises(ModelError, match="tiny.safetensors' does not match"):
        load_model(str(path))


@pytest.mark.gpu
@pytest.mark.parametrize("name,family", [("full:sd15", "sd1"), ("full:sdxl", "sdxl")])
def test_full_size_round_trip_on_gpu(tmp_path, name, family):
    m = build_pipeline(name, device="cuda")
    path = save_single_file(m, tmp_path / "full.safetensors", embed_configs=False)  # shipped configs
    back = load_model(str(path), device="cuda", dtype=torch.float16)
    assert back.family == family and back.prediction_type == "epsilon" and back.resolution == m.resolution
    for ours, theirs in [(m.unet, back.unet), (m.pipe.vae, back.pipe.vae),
                         *zip(m.text_encoders, back.text_encoders, strict=True)]:
        got = theirs.state_dict()
        assert all(torch.equal(v.half(), got[k]) for k, v in ours.state_dict().items())
