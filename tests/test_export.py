import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_core.errors import AdapterError
from lora_core.export import apply_adapter, build_metadata, inspect_file, load_adapter, save_adapter
from lora_core.inject import inject, remove, set_multiplier
from lora_core.models import build_pipeline

SCALES = (0.5, 1.0, 1.7)


def trained_like(name, targets="attn-mlp", rank=4, alpha=2.0, seed=1):
    """A model with an injected adapter whose up AND down weights are random (not a fresh adapter)."""
    m = build_pipeline(name)
    mods = inject(m.unet, m.text_encoders, m.family, targets=targets, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in mods.values():
            mod.lora_up.weight.copy_(torch.randn(mod.lora_up.weight.shape, generator=g) * 0.5)
            mod.lora_down.weight.copy_(torch.randn(mod.lora_down.weight.shape, generator=g) * 0.2)
    return m, mods


def probe(m):
    """UNet output and every text encoder's hidden states on fixed inputs."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ids = m.tokenizers[0](["a red circle", "a blue square on green"], padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = [te(ids).last_hidden_state for te in m.text_encoders]
        kw = {}
        if m.family == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
        out = m.unet(x, torch.tensor([10, 600]), torch.cat(hidden, -1), **kw).sample
    return out, hidden


def peft_layer_count(m):
    modules = [*m.unet.modules(), *(x for te in m.text_encoders for x in te.modules())]
    return sum(1 for x in modules if hasattr(x, "lora_A") and "ours" in x.lora_A)


@pytest.mark.parametrize("name", ["tiny:sd1", "tiny:sd2", "tiny:sdxl"])
def test_diffusers_load_lora_weights_matches_our_injection(tmp_path, name):
    m, mods = trained_like(name)
    path = tmp_path / "a.safetensors"
    save_adapter(path, mods, build_metadata(m, rank=4, alpha=2.0), dtype=torch.float32)
    ours = {}
    for s in SCALES:
        set_multiplier(mods, s)
        ours[s] = probe(m)
    remove(m.unet, *m.text_encoders)
    base_out, base_hidden = probe(m)

    ref = build_pipeline(name)
    ref.pipe.load_lora_weights(str(path), adapter_name="ours")
    assert peft_layer_count(ref) == len(mods)  # no key left unloaded
    for s in SCALES:
        ref.pipe.set_adapters(["ours"], adapter_weights=[s])
        out, hidden = probe(ref)
        assert (out - ours[s][0]).abs().max() <= 1e-4
        for h, h_ours in zip(hidden, ours[s][1], strict=True):
            assert (h - h_ours).abs().max() <= 1e-4
    # and the adapter really acts on both the UNet and the text encoders
    assert (ours[1.0][0] - base_out).abs().max() > 1e-2
    assert all((h - b).abs().max() > 1e-3 for h, b in zip(ours[1.0][1], base_hidden, strict=True))


@pytest.mark.parametrize("name", ["tiny:sd1", "tiny:sdxl"])
def test_round_trip_and_apply(tmp_path, name):
    m, mods = trained_like(name, targets="conv")
    meta = build_metadata(m, rank=4, alpha=2.0, output_name="round", extra={"ss_steps": "30"})
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_adapter(a, mods, meta, dtype=torch.float32)
    loaded = load_adapter(a)
    save_adapter(b, loaded.layers, loaded.metadata, dtype=torch.float32)
    ta, ma = _read(a)
    tb, mb = _read(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert ma == mb
    # keys: exactly down, up, 0-d alpha per module
    assert len(ta) == 3 * len(mods)
    assert all(ta[f"{n}.alpha"].dim() == 0 for n in mods)
    # applying the file to a fresh model reproduces the outputs of the in-process adapter
    expected = probe(m)
    fresh = build_pipeline(name)
    apply_adapter(fresh, load_adapter(b, fresh), 1.0)
    got = probe(fresh)
    assert (got[0] - expected[0]).abs().max() <= 1e-5


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_metadata_and_hash_recomputed_independently(tmp_path):
    m, mods = trained_like("tiny:sdxl", targets="attn")
    path = tmp_path / "x.safetensors"
    save_adapter(path, mods, build_metadata(m, rank=4, alpha=2.0, output_name="x", trigger_phrase="sks"))
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header["__metadata__"]
    digest = hashlib.sha256(blob[8 + n:]).hexdigest()
    assert meta["sshs_model_hash"] == digest and meta["modelspec.hash_sha256"] == "0x" + digest
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["modelspec.trigger_phrase"] == "sks"
    assert all(isinstance(v, str) for v in meta.values())
    assert {v["dtype"] for k, v in header.items() if k.endswith("weight")} == {"F16"}
    info = inspect_file(path)
    assert (info["format"], info["family"], info["rank"], info["alpha"]) == ("kohya", "SDXL", 4, 2.0)
    assert info["modules"] == len(mods)


def test_peft_format_is_read_and_applies_like_kohya(tmp_path):
    m, mods = trained_like("tiny:sd1", targets="attn")
    kohya = tmp_path / "k.safetensors"
    save_adapter(kohya, mods, build_metadata(m, rank=4, alpha=2.0), dtype=torch.float32)
    expected = probe(m)
    # the same weights in diffusers/PEFT naming (lora_A/lora_B, alphas given as scale 1 after folding)
    peft = {}
    for name, mod in mods.items():
        root = "unet" if name.startswith("lora_unet") else "text_encoder"
        path = _diffusers_path(m, name, mod)
        scale = mod.alpha / mod.rank
        peft[f"{root}.{path}.lora_A.weight"] = mod.lora_down.weight.detach() * scale
        peft[f"{root}.{path}.lora_B.weight"] = mod.lora_up.weight.detach()
    save_file(peft, str(tmp_path / "p.safetensors"))
    fresh = build_pipeline("tiny:sd1")
    adapter = load_adapter(tmp_path / "p.safetensors", fresh)
    assert adapter.format == "peft" and set(adapter.layers) == set(mods)
    apply_adapter(fresh, adapter, 1.0)
    got = probe(fresh)
    assert (got[0] - expected[0]).abs().max() <= 1e-4


def _diffusers_path(m, kohya_name, module):
    for root in (m.unet, *m.text_encoders):
        for path, mod in root.named_modules():
            if mod is module:
                return ("text_model." + path) if root is not m.unet and not path.startswith("text_model.") \
                    else path
    raise KeyError(kohya_name)


def test_refuses_other_family_and_other_shape(tmp_path):
    xl, mods = trained_like("tiny:sdxl", targets="attn")
    path = tmp_path / "xl.safetensors"
    save_adapter(path, mods, build_metadata(xl, rank=4, alpha=2.0))
    sd1 = build_pipeline("tiny:sd1")
    with pytest.raises(AdapterError, match="is a SDXL LoRA, but the base model 'tiny:sd1' is Stable Diffusion 1.x"):
        apply_adapter(sd1, load_adapter(path))
    # an SD1-named file whose shapes belong to another model size
    sd1_other, mods2 = trained_like("tiny:sd2", targets="attn")
    p2 = tmp_path / "sd2.safetensors"
    save_adapter(p2, mods2, {"ss_network_module": "networks.lora"})
    with pytest.raises(AdapterError, match="does not fit the base model 'tiny:sd1'"):
        apply_adapter(sd1, load_adapter(p2))


def test_unreadable_files_get_clear_errors(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterError, match="not a readable .safetensors"):
        load_adapter(bad)
    other = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        load_adapter(other)
