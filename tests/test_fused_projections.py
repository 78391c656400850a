"""Grouped attention projections (lora_core/fused_projections.py, `performance.fused_projections`)."""

from __future__ import annotations

import contextlib
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


@pytest.mark.parametrize("change", ["merged", "per_image", "unequal_scales", "hooked", "trainable_base"])
def test_a_group_that_cannot_be_grouped_runs_layer_by_layer(change):
    plain, grouped, _ = _unet_pair()
    for unet in (plain, grouped):
        attn = next(m for m in unet.modules() if isinstance(m, fp.Attention) and not m.is_cross_attention)
        if change == "merged":
            attn.to_q.merge()
        elif change == "per_image":
            for m in (attn.to_q, attn.to_k, attn.to_v):
                m.per_image = torch.tensor([0.5, 1.0])
        elif change == "unequal_scales":
            attn.to_k.multiplier = 0.5
        elif change == "hooked":
            attn.to_v.register_forward_hook(lambda mod, args, out: out * 2)
        else:
            attn.to_q.base.weight.requires_grad_(True)
    group = attn.fused_groups["qkv"]
    assert group.scale((attn.to_q, attn.to_k, attn.to_v)) is None
    want, got = (u(*_inputs(u)).sample for u in (plain, grouped))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weights_moved_after_grouping_ungroup_the_layers_with_a_warning(caplog):
    plain, grouped, _ = _unet_pair()
    for unet in (plain, grouped):
        attn = next(m for m in unet.modules() if isinstance(m, fp.Attention) and not m.is_cross_attention)
        with torch.no_grad():
            attn.to_v.base.weight.data = attn.to_v.base.weight.data.clone().mul_(1.5)  # new storage, new values
    assert not attn.fused_groups["qkv"].still_shared((attn.to_q, attn.to_k, attn.to_v))
    with torch.no_grad():
        want, got = (u(*_inputs(u)).sample for u in (plain, grouped))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the new weights, not the group's stale copy
    assert "qkv" not in attn.fused_groups
    assert any("have moved since they were grouped" in r.message for r in caplog.records)


def test_grouped_projections_compute_with_the_working_copy_under_autocast():
    """A bf16 base with fp32 adapters, as in mixed-precision training: the grouped layers take the working
    copy's weights (checked by planting different values in it) and give the per-layer casts' gradients."""
    model = load_model("tiny:sd1", device=CPU)
    model.unet.to(torch.bfloat16)  # the frozen base in the compute dtype, as the trainer has it
    torch.manual_seed(0)
    modules = inject(model.unet, model.text_encoders, model.family, targets="attn", rank=4)
    for m in modules.values():
        torch.nn.init.normal_(m.lora_up.weight, std=0.05)
    grouped = model.unet
    fp.fuse_projections(grouped)
    adapters = [m for m in grouped.modules() if isinstance(m, fp.LoRAModule)]
    assert adapters[0].lora_up.weight.dtype == torch.float32
    attns = [a for a in grouped.modules() if isinstance(a, fp.Attention)]
    grouped_layers = {getattr(a, n) for a in attns for n in ("to_k", "to_v") + (() if a.is_cross_attention else ("to_q",))}
    x, t, text = _inputs(grouped)

    def grads(work: WorkingCopy | None, plant: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for m in adapters:
            m.lora_down.weight.grad = m.lora_up.weight.grad = None
        ctx = work.active() if work else contextlib.nullcontext()
        with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
            if plant:  # only the grouped layers' copies: the other layers read theirs on their own path
                for m in adapters:
                    if m in grouped_layers:
                        m.work[1].data.mul_(plant)
            out = grouped(x.bfloat16(), t, text.bfloat16()).sample.float()
            out.square().mean().backward()
        if work:
            work.gradients_back()
        return out.detach(), [p.grad.clone() for m in adapters for p in (m.lora_down.weight, m.lora_up.weight)]

    want_out, want = grads(None)
    got_out, got = grads(WorkingCopy(adapters, torch.bfloat16))
    assert torch.equal(got_out, want_out)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    planted, _ = grads(WorkingCopy(adapters, torch.bfloat16), plant=3.0)
    assert not torch.allclose(planted, want_out)  # the layers really read the working copy


def test_training_with_grouped_projections_tracks_layer_by_layer(tmp_path, monkeypatch):
    write_example_dataset(tmp_path / "d", n=4, size=64)
    common = [f"data.dir={tmp_path / 'd'}", "model.base=tiny:sd1", "data.resolution=64", "schedule.steps=15",
              "optim.lr=1e-3", "sampling.enabled=false", "performance.log_every=1", "performance.mixed_precision=no"]
    runs, calls = [], []
    real = fp.Group.__call__
    monkeypatch.setattr(fp.Group, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    for on in ("true", "false"):
        cfg = resolve(overrides=[*common, f"performance.fused_projections={on}"])
        runs.append(torch.tensor([ev.loss for ev in train(cfg, run_dir=tmp_path / on) if ev.kind == "step"]))
        runs[-1] = (runs[-1], len(calls))
        calls.clear()
    (grouped, grouped_calls), (plain, plain_calls) = runs
    assert grouped_calls >= 15 * 2 and plain_calls == 0  # the run grouped its projections; off means off
    assert len(grouped) == len(plain) == 15
    assert ((grouped - plain).abs() / plain.abs()).max() <= 1e-4, (grouped, plain)


class _CountCats(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.cats = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.cats += func is torch.ops.aten.block_diag.default  # only the grouped adapters make one
        return func(*args, **(kwargs or {}))


def test_assembled_adapters_are_made_once_per_block_and_follow_the_weights():
    """`assembled` (previews): inside the block the groups compute with the working copy's concatenation
    and block-diagonal made at its start, giving the per-call output; each new block sees weights changed
    since the last; with gradients on, or after the block, the groups compute member by member again."""
    plain, grouped, n = _unet_pair()
    adapters = [m for m in grouped.modules() if isinstance(m, fp.LoRALinear)]
    work = WorkingCopy(adapters, torch.float32)  # the CPU's compute dtype stands in for bf16
    x, t, text = _inputs(grouped)
    for round_ in range(2):
        with torch.no_grad():
            want = plain(x, t, text).sample
            with work.active(), fp.assembled(grouped) as made, _CountCats() as count:
                got = grouped(x, t, text).sample
        assert made == n and count.cats == 0, (made, count.cats)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # what a training step does between previews, to both copies of the UNet
            for unet in (plain, grouped):
                for m in unet.modules():
                    if isinstance(m, fp.LoRALinear):
                        m.lora_up.weight.mul_(-2.0 if round_ == 0 else 1.0)
    assert all(g.assembled is None for a in grouped.modules() for g in getattr(a, "fused_groups", {}).values())
    with torch.no_grad(), work.active(), _CountCats() as count:
        after = grouped(x, t, text).sample
        want = plain(x, t, text).sample
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)
    assert count.cats == 0  # outside the block: member by member (lora_core/grouped_lora.py), nothing assembled
    with work.active(), fp.assembled(grouped), _CountCats() as count:
        grouped(x, t, text).sample.sum().backward()  # training: the copies are computed with, and the
    assert count.cats == 0  # gradients go to the fp32 weights (as in the single layers' function)
    in_groups = [getattr(a, name) for a in grouped.modules() for key in getattr(a, "fused_groups", {})
                 for name in fp.NAMES[key]]
    assert all(m.work is None for m in adapters)
    copies = {id(m): work.copies[2 * i:2 * i + 2] for i, m in enumerate(work.modules)}
    assert in_groups and all(c.grad is None for m in in_groups for c in copies[id(m)])
    assert all(p.grad is not None for m in in_groups for p in (m.lora_down.weight, m.lora_up.weight))
