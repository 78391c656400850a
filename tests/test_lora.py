import pytest
import torch
from torch import nn

from lora_core.errors import AdapterError
from lora_core.lora import LoRAConv2d, LoRALinear, delta_weight


def _nonzero(lora):
    """A trained-looking adapter: `up` is random, so merge tests cannot pass trivially."""
    with torch.no_grad():
        lora.lora_up.weight.normal_(0, 0.5)
    return lora


def _layers():
    lin = LoRALinear(nn.Linear(12, 10), rank=4, alpha=2.0)
    conv = LoRAConv2d(nn.Conv2d(6, 8, 3, padding=1), rank=3, alpha=1.5)
    conv1 = LoRAConv2d(nn.Conv2d(6, 8, 1), rank=2, alpha=4.0)
    return [(lin, torch.randn(5, 12)), (conv, torch.randn(2, 6, 7, 7)), (conv1, torch.randn(2, 6, 5, 5))]


@pytest.mark.parametrize("i", range(3))
def test_fresh_adapter_equals_base(i):
    lora, x = _layers()[i]
    assert torch.equal(lora(x), lora.base(x))


@pytest.mark.parametrize("i", range(3))
def test_merged_equals_unmerged_and_unmerge_restores_exactly(i):
    lora, x = _layers()[i]
    _nonzero(lora)
    lora.multiplier = 0.8
    original = lora.base.weight.detach().clone()
    unmerged = lora(x)
    assert not torch.allclose(unmerged, lora.base(x))  # the adapter does something
    lora.merge()
    assert lora.merged and not torch.equal(lora.base.weight, original)
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge()
    assert torch.equal(lora.base.weight, original)  # bit for bit
    assert torch.equal(lora(x), unmerged)


@pytest.mark.parametrize("i", range(3))
def test_output_linear_in_multiplier(i):
    lora, x = _layers()[i]
    _nonzero(lora)
    outs = {}
    for m in (0.0, 0.5, 1.0, 2.0, -1.0):
        lora.multiplier = m
        outs[m] = lora(x)
    base = lora.base(x)
    assert torch.equal(outs[0.0], base)
    d1 = outs[1.0] - base
    for m in (0.5, 2.0, -1.0):
        torch.testing.assert_close(outs[m] - base, m * d1, atol=1e-5, rtol=1e-4)


def test_delta_matches_functional_forward():
    lora, x = _layers()[1]
    _nonzero(lora)
    expected = nn.functional.conv2d(x, lora.delta_weight(), padding=1)
    torch.testing.assert_close(lora.lora_forward(x), expected, atol=1e-5, rtol=1e-4)


def test_scale_is_alpha_over_rank_and_default_alpha():
    assert LoRALinear(nn.Linear(4, 4), rank=8, alpha=4).scale == 0.5
    assert LoRALinear(nn.Linear(4, 4), rank=8, alpha=None).scale == 1.0  # kohya: no alpha means alpha = rank
    d = delta_weight(torch.ones(2, 3), torch.ones(5, 2), 0.25)
    assert d.shape == (5, 3) and torch.all(d == 0.5)


def test_merge_refuses_non_finite_and_leaves_base():
    lora = LoRALinear(nn.Linear(4, 4), rank=2, alpha=2)
    with torch.no_grad():
        lora.lora_up.weight.fill_(float("inf"))
    before = lora.base.weight.detach().clone()
    with pytest.raises(AdapterError, match="NaN or infinite"):
        lora.merge()
    assert torch.equal(lora.base.weight, before) and not lora.merged


def test_bf16_base_fp32_lora_and_frozen_base():
    lora = LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), rank=2, alpha=2)
    assert lora.lora_down.weight.dtype == torch.float32
    assert not lora.base.weight.requires_grad and lora.lora_up.weight.requires_grad
    _nonzero(lora)
    original = lora.base.weight.detach().clone()
    lora.merge()
    lora.unmerge()
    assert torch.equal(lora.base.weight, original)
    assert lora(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.gpu
def test_half_precision_base_computes_the_adapter_in_its_own_dtype():
    """Sampling on a GPU: a bf16 base with fp32 adapter weights, no autocast; the adapter computes in bf16
    (no fp32 copies of the activations) and matches the fp32 adapter to bf16 precision."""
    for lora, x in _layers():
        _nonzero(lora).cuda()
        x = x.cuda()
        expected = lora(x)
        lora.base.to(torch.bfloat16)
        out = lora(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("i", range(3))
def test_per_image_multipliers_match_one_multiplier_per_call(i):
    lora, x = _layers()[i]
    _nonzero(lora)
    x = torch.cat([x[:1], x[:1], x[:1]])  # three images of one input
    weights = [0.0, 1.0, 0.5]
    alone = []
    for w in weights:
        lora.multiplier = w
        alone.append(lora(x[:1]))
    lora.multiplier = 7.0  # ignored while per-image multipliers are set
    lora.per_image = torch.tensor(weights)
    torch.testing.assert_close(lora(x), torch.cat(alone), atol=1e-5, rtol=1e-5)
    # classifier-free guidance doubles the batch as [negatives..., prompts...]: the weights repeat
    doubled = torch.cat([x, x])
    torch.testing.assert_close(lora(doubled), torch.cat(alone + alone), atol=1e-5, rtol=1e-5)
    assert torch.equal(lora(x)[:1], lora.base(x)[:1])  # weight 0 in a batch: exactly the base
