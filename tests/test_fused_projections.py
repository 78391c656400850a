"""Grouped attention projections (lora_core/fused_projections.py, `performance.fused_projections`)."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_core import fused_projections as fp
from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.inject import inject
from lora_core.models import load_model
from lora_core.trainer import train
from lora_core.working_copy import WorkingCopy

CPU = torch.device("cpu")


def _unet_pair(seed: int = 0):
    """A tiny SD1 UNet with trained-looking adapters, and a deep copy of it with grouped projections."""
    model = load_model("tiny:sd1", device=CPU)
    torch.manual_seed(seed)
    modules = inject(model.unet, model.text_encoders, model.family, targets="attn", rank=4)
    for m in modules.values():
        torch.nn.init.normal_(m.lora_up.weight, std=0.05)
    plain = model.unet
    grouped = copy.deepcopy(plain)
    n = fp.fuse_projections(grouped)
    return plain, grouped, n


def _inputs(unet, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, 16, 16, generator=g)
    text = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    return x, torch.tensor([10] * batch), text


def _lora_params(unet):
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def test_grouped_projections_give_the_layer_by_layer_output_and_gradients():
    plain, grouped, n = _unet_pair()
    attns = [m for m in grouped.modules() if isinstance(m, fp.Attention)]
    assert n == len(attns) > 0  # every self- and cross-attention of the transformer blocks
    calls = []
    real = fp.Group.__call__
    fp.Group.__call__ = lambda self, *a: calls.append(1) or real(self, *a)
    try:
        outs = [u(*_inputs(u)).sample for u in (plain, grouped)]
        for out in outs:
            out.square().mean().backward()
    finally:
        fp.Group.__call__ = real
    assert len(calls) == n  # each group ran as one product, none fell back
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(_lora_params(plain), _lora_params(grouped), strict=True):
        assert b.grad is not None and b.grad.abs().sum() > 0
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_grouping_shares_the_base_weights_storage():
    _, grouped, _ = _unet_pair()
    attn = next(m for m in grouped.modules() if isinstance(m, fp.Attention) and not m.is_cross_attention)
    group = attn.fused_groups["qkv"]
    q, k, v = (getattr(attn, n).base.weight for n in ("to_q", "to_k", "to_v"))
    assert q.data_ptr() == group.weight.data_ptr()
    assert torch.equal(torch.cat([q, k, v]), group.weight)
    with torch.no_grad():
        k.add_(1.0)  # a merge writes into the layer's weight: the group sees it
    assert torch.equal(group.weight[q.shape[0]:q.shape[0] + k.shape[0]], k)


@pytest.mark.parametrize("change", ["merged", "per_image", "weights_moved", "unequal_scales"])
def test_a_group_that_cannot_be_grouped_runs_layer_by_layer(change):
    plain, grouped, _ = _unet_pair()
    for unet in (plain, grouped):
        attn = next(m for m in unet.modules() if isinstance(m, fp.Attention) and not m.is_cross_attention)
        if change == "merged":
            attn.to_q.merge()
        elif change == "per_image":
            for m in (attn.to_q, attn.to_k, attn.to_v):
                m.per_image = torch.tensor([0.5, 1.0])
        elif change == "weights_moved":
            attn.to_v.base.weight.data = attn.to_v.base.weight.data.clone()
        else:
            attn.to_k.multiplier = 0.5
    group = attn.fused_groups["qkv"]
    assert group.scale((attn.to_q, attn.to_k, attn.to_v)) is None
    with torch.no_grad():
        want, got = (u(*_inputs(u)).sample for u in (plain, grouped))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_grouped_projections_use_the_working_copy_under_autocast():
    plain, grouped, _ = _unet_pair()
    for unet in (plain, grouped):
        unet.to(torch.bfloat16)
    fp.fuse_projections(grouped)  # the dtype change gave the weights new storage: group them again
    adapters = [m for m in grouped.modules() if isinstance(m, fp.LoRAModule)]
    work = WorkingCopy(adapters, torch.bfloat16)
    outs = []
    for unet, ctx in ((plain, None), (grouped, work)):
        with (ctx.active() if ctx else torch.no_grad()), torch.autocast("cpu", dtype=torch.bfloat16):
            x, t, text = _inputs(unet)
            out = unet(x.bfloat16(), t, text.bfloat16()).sample.float()
            outs.append(out)
            if ctx:
                out.square().mean().backward()
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
    work.gradients_back()
    assert all(m.lora_up.weight.grad is not None for m in adapters)


def test_training_with_grouped_projections_tracks_layer_by_layer(tmp_path):
    write_example_dataset(tmp_path / "d", n=4, size=64)
    common = [f"data.dir={tmp_path / 'd'}", "model.base=tiny:sd1", "data.resolution=64", "schedule.steps=15",
              "optim.lr=1e-3", "sampling.enabled=false", "performance.log_every=1", "performance.mixed_precision=no"]
    runs = []
    for on in ("true", "false"):
        cfg = resolve(overrides=[*common, f"performance.fused_projections={on}"])
        runs.append(torch.tensor([ev.loss for ev in train(cfg, run_dir=tmp_path / on) if ev.kind == "step"]))
    grouped, plain = runs
    assert len(grouped) == len(plain) == 15
    assert ((grouped - plain).abs() / plain.abs()).max() <= 1e-4, (grouped, plain)
