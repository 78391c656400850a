import pytest
import torch

from lora_core.inject import find_targets, inject, remove, sgm_path
from lora_core.lora import LoRAModule
from lora_core.models import build_pipeline

# (model, target set) -> (UNet modules, text-encoder modules), from the architectures:
# SD1 16 transformer blocks, SD2 the same with a 23-layer text encoder, SDXL 70 blocks + 11 proj pairs.
EXPECTED = {
    ("full:sd15", "attn"): (128, 48),
    ("full:sd15", "attn-mlp"): (192, 72),
    ("full:sd15", "conv"): (242, 72),  # + 22 ResNets x 2 convs + 3 down- and 3 up-samplers
    ("full:sd21-v", "attn"): (128, 92),
    ("full:sd21-v", "attn-mlp"): (192, 138),
    ("full:sdxl", "attn"): (560, 48 + 128),
    ("full:sdxl", "attn-mlp"): (722, 72 + 192),
    ("full:sdxl", "conv"): (760, 264),  # + 17 ResNets x 2 convs + 2 down- and 2 up-samplers
}


@pytest.fixture(scope="module")
def full_models():
    # the real architectures on the meta device: shapes and names only, no memory
    return {n: build_pipeline(n, device="meta") for n in ("full:sd15", "full:sd21-v", "full:sdxl")}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_module_counts_match_architecture(full_models, key):
    name, targets = key
    m = full_models[name]
    found = find_targets(m.unet, m.text_encoders, m.family, targets)
    unet = sum(k.startswith("lora_unet_") for k in found)
    assert (unet, len(found) - unet) == EXPECTED[key]


def test_text_encoder_off(full_models):
    m = full_models["full:sd15"]
    found = find_targets(m.unet, m.text_encoders, m.family, "attn", text_encoder=False)
    assert len(found) == 128 and all(k.startswith("lora_unet_") for k in found)


def test_kohya_names(full_models):
    sd1 = find_targets(*_parts(full_models["full:sd15"]), "attn-mlp")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in sd1
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2" in sd1
    assert "lora_unet_up_blocks_3_attentions_2_proj_out" in sd1
    assert "lora_te_text_model_encoder_layers_11_mlp_fc1" in sd1
    xl = find_targets(*_parts(full_models["full:sdxl"]), "conv")
    for k in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
              "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k",
              "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
              "lora_unet_output_blocks_0_1_proj_in", "lora_unet_input_blocks_1_0_in_layers_2",
              "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv",
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
              "lora_te2_text_model_encoder_layers_31_mlp_fc2"):
        assert k in xl, k
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in xl)
    # shapes follow the real targets: SD1 proj_in is a 1x1 conv, SDXL's a Linear
    assert sd1["lora_unet_up_blocks_3_attentions_2_proj_out"].module.weight.dim() == 4
    assert xl["lora_unet_output_blocks_0_1_proj_in"].module.weight.dim() == 2


def _parts(m):
    return m.unet, m.text_encoders, m.family


def test_sgm_path_examples():
    up = [True, True, False]
    assert sgm_path("down_blocks.1.attentions.0.proj_in", 2, up) == "input_blocks.4.1.proj_in"
    assert sgm_path("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", 2, up) == \
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k"
    assert sgm_path("down_blocks.0.resnets.0.conv1", 2, up) == "input_blocks.1.0.in_layers.2"
    assert sgm_path("down_blocks.1.downsamplers.0.conv", 2, up) == "input_blocks.6.0.op"
    assert sgm_path("mid_block.resnets.1.conv2", 2, up) == "middle_block.2.out_layers.3"
    assert sgm_path("up_blocks.0.attentions.2.proj_out", 2, up) == "output_blocks.2.1.proj_out"
    assert sgm_path("up_blocks.1.upsamplers.0.conv", 2, up) == "output_blocks.5.2.conv"


@pytest.mark.parametrize("name", ["tiny:sd1", "tiny:sdxl"])
def test_inject_then_remove_restores_model(name):
    m = build_pipeline(name)
    before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    types = {k: type(v) for k, v in m.unet.named_modules()}
    mods = inject(m.unet, m.text_encoders, m.family, targets="conv", rank=2, alpha=1, conv_rank=3)
    assert all(isinstance(v, LoRAModule) for v in mods.values())
    assert any(v.rank == 3 for v in mods.values()) and any(v.rank == 2 for v in mods.values())
    assert sum(p.requires_grad for p in m.unet.parameters()) == sum(k.startswith("lora_unet") for k in mods) * 2
    with pytest.raises(ValueError, match="already has an adapter"):
        inject(m.unet, m.text_encoders, m.family, rank=2)
    assert remove(m.unet, *m.text_encoders) == len(mods)
    assert {k: type(v) for k, v in m.unet.named_modules()} == types
    after = m.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
