"""Half-precision GroupNorm/LayerNorm under autocast (lora_core/half_norms.py, `performance.half_norms`)."""

import copy
import logging

import pytest
import torch
from torch import nn

from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.half_norms import HalfGroupNorm, HalfLayerNorm, use_half_norms
from lora_core.models import load_model
from lora_core.trainer import train


def _pairs():
    torch.manual_seed(0)
    gn, ln = nn.GroupNorm(4, 16), nn.LayerNorm(16)
    for m in (gn, ln):
        nn.init.normal_(m.weight, 1.0, 0.2), nn.init.normal_(m.bias, 0.0, 0.2)
    return [(gn, torch.randn(2, 16, 5, 5) * 3 + 1), (ln, torch.randn(2, 7, 16) * 3 + 1)]


def _compare(device: str) -> None:
    for ref, x in _pairs():
        ref, x = ref.to(device), x.to(device)
        half = copy.deepcopy(ref).to(torch.bfloat16)
        assert use_half_norms(half) == 1 and isinstance(half, (HalfGroupNorm, HalfLayerNorm))
        x16 = x.to(torch.bfloat16)
        a = x16.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            out = half(a)
        assert out.dtype == torch.bfloat16
        # what CUDA autocast does with the plain norm: the same bf16 input and weights, computed in fp32
        b = x16.clone().requires_grad_()
        ref32 = copy.deepcopy(half).float()
        ref32.__class__ = type(ref)
        want = ref32(b.float())
        torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=2e-2)
        grad = torch.randn_like(want)
        out.backward(grad.to(out.dtype))
        want.backward(grad)
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(half.weight.grad.float(), ref32.weight.grad, atol=0.1, rtol=5e-2)


def test_half_norms_agree_with_fp32_norms_cpu():
    _compare("cpu")


@pytest.mark.gpu
def test_half_norms_skip_the_fp32_round_trip_on_the_gpu():
    _compare("cuda")
    norm, x = nn.GroupNorm(4, 16).cuda().to(torch.bfloat16), torch.randn(2, 16, 8, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert norm(x.to(torch.bfloat16)).dtype == torch.float32  # the round trip this module removes


def test_swap_keeps_parameters_and_changes_nothing_outside_autocast():
    model = load_model("tiny:sd1", device=torch.device("cpu"))
    unet = model.unet
    x = torch.randn(1, unet.config.in_channels, 8, 8)
    ctx = torch.randn(1, 4, unet.config.cross_attention_dim)
    before_keys = list(unet.state_dict())
    with torch.no_grad():
        before = unet(x, 10, ctx).sample
    n = use_half_norms(unet)
    assert n >= 4
    assert sum(isinstance(m, (HalfGroupNorm, HalfLayerNorm)) for m in unet.modules()) == n
    assert list(unet.state_dict()) == before_keys
    with torch.no_grad():
        assert torch.equal(unet(x, 10, ctx).sample, before)  # fp32, no autocast: the plain forward


@pytest.mark.gpu  # on the CPU the trainer runs in fp32, where the norms are the plain ones
def test_training_with_half_norms_in_bf16_tracks_fp32_norms(tmp_path, caplog):
    write_example_dataset(tmp_path / "d", n=4, size=64)
    common = [f"data.dir={tmp_path / 'd'}", "model.base=tiny:sd1", "data.resolution=64", "schedule.steps=10",
              "optim.lr=1e-3", "sampling.enabled=false", "performance.mixed_precision=bf16"]

    def losses(extra, run):
        return [ev.loss for ev in train(resolve(overrides=common + extra), run_dir=run) if ev.kind == "step"]

    plain = torch.tensor(losses(["performance.half_norms=false"], tmp_path / "a"))
    with caplog.at_level(logging.INFO, logger="lora_core.fast_step"):
        half = torch.tensor(losses(["performance.half_norms=true"], tmp_path / "b"))
    assert any("normalisations run in the compute dtype" in r.message for r in caplog.records)
    assert len(plain) == len(half) == 10
    assert ((half - plain).abs() / plain.abs()).max() <= 0.05, (half, plain)


def test_an_fp32_run_keeps_the_plain_norms(tmp_path, caplog):
    write_example_dataset(tmp_path / "d", n=2, size=64)
    cfg = resolve(overrides=[f"data.dir={tmp_path / 'd'}", "model.base=tiny:sd1", "data.resolution=64",
                             "schedule.steps=1", "sampling.enabled=false", "performance.half_norms=true",
                             "performance.mixed_precision=no"])  # fp32 on a GPU too
    with caplog.at_level(logging.INFO, logger="lora_core.fast_step"):
        kinds = [ev.kind for ev in train(cfg, run_dir=tmp_path / "run")]
    assert kinds[-1] == "finished"
    assert not any("normalisations run in the compute dtype" in r.message for r in caplog.records)
