"""The step's half-precision working copy of the adapter weights (lora_core/working_copy.py)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lora_core.lora import LoRAModule, wrap
from lora_core.working_copy import WorkingCopy, working_copy


class _Net(nn.Module):
    """Two adapted linears (fused and plain path) and an adapted conv on a frozen bf16 base."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = wrap(nn.Conv2d(4, 8, 3, padding=1), rank=2)
        self.fc1 = wrap(nn.Linear(8, 16), rank=4)
        self.fc2 = wrap(nn.Linear(16, 8), rank=4)
        for m in self.adapters():
            nn.init.normal_(m.lora_up.weight, std=0.1)  # a trained adapter, not the zero start
            m.base.to(torch.bfloat16)

    def adapters(self) -> list[LoRAModule]:
        return [self.conv, self.fc1, self.fc2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


class _CountCasts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def _grads(net: _Net, x: torch.Tensor, work: WorkingCopy | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ctx = work.active() if work else contextlib.nullcontext()
    with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(x).float().square().mean()
        loss.backward()
    if work:
        work.gradients_back()
    return loss.detach(), [p.grad.clone() for m in net.adapters() for p in (m.lora_down.weight, m.lora_up.weight)]


@pytest.mark.parametrize("fused", [True, False])
def test_working_copy_gives_the_per_layer_casts_values_and_gradients(fused):
    torch.manual_seed(0)
    net = _Net()
    for m in net.adapters():
        m.fused = fused
    twin = copy.deepcopy(net)
    x = torch.randn(3, 4, 6, 6, dtype=torch.bfloat16)
    want_loss, want = _grads(net, x, None)
    work = WorkingCopy(twin.adapters(), torch.bfloat16)
    got_loss, got = _grads(twin, x, work)
    assert torch.equal(got_loss, want_loss)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32 and torch.equal(g, w)
    assert all(m.work is None for m in twin.adapters())  # the copies are only used inside the block
    assert all(c.grad is None for c in work.copies)


def test_working_copy_under_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointed layers recompute their forward inside the backward, still within `active()`."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(_Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(super().forward, x, use_reentrant=False)

    torch.manual_seed(0)
    net = Checkpointed()
    twin = copy.deepcopy(net)
    x = torch.randn(3, 4, 6, 6, dtype=torch.bfloat16)
    want_loss, want = _grads(net, x, None)
    got_loss, got = _grads(twin, x, WorkingCopy(twin.adapters(), torch.bfloat16))
    assert torch.equal(got_loss, want_loss)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_working_copy_removes_the_per_layer_weight_casts():
    torch.manual_seed(0)
    net = _Net()
    for m in net.adapters():
        m.fused = False
    x = torch.randn(3, 4, 6, 6, dtype=torch.bfloat16)
    counts = []
    for work in (None, WorkingCopy(net.adapters(), torch.bfloat16)):
        with _CountCasts() as mode:
            _grads(net, x, work)
        counts.append(mode.casts)
    # without the copy each of the 6 weights is cast to bf16 in the forward; with it, none is (the inputs'
    # casts are the same in both)
    assert counts[0] - counts[1] == 6, counts


def test_working_copy_follows_the_fp32_weights_and_accumulates():
    torch.manual_seed(0)
    net = _Net()
    work = WorkingCopy(net.adapters(), torch.bfloat16)
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        net.fc1.lora_up.weight.add_(1.0)  # an optimizer step between two steps
    with work.active():
        assert torch.equal(net.fc1.work[1], net.fc1.lora_up.weight.to(torch.bfloat16))
    _, once = _grads(net, x, work)
    _, twice = _grads(net, x, work)  # .grad not cleared: a second micro-batch adds to it
    for a, b in zip(once, twice, strict=True):
        torch.testing.assert_close(b, 2 * a)


def test_working_copy_only_under_half_mixed_precision():
    adapters = _Net().adapters()
    assert working_copy(adapters, "bf16", True).copies[0].dtype == torch.bfloat16
    assert working_copy(adapters, "fp16", True).copies[0].dtype == torch.float16
    assert working_copy(adapters, "no", True) is None
    assert working_copy(adapters, "bf16", False) is None
    frozen = _Net().adapters()
    frozen[0].requires_grad_(False)
    assert len(WorkingCopy(frozen, torch.bfloat16).params) == 4


@pytest.mark.gpu
def test_the_copies_are_made_by_a_few_kernels_not_one_per_weight():
    params = [torch.randn(16, 320 + i, device="cuda") for i in range(256)]
    copies = [torch.empty_like(p, dtype=torch.bfloat16) for p in params]
    torch._foreach_copy_(copies, params)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch._foreach_copy_(copies, params)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 0 < len(kernels) <= 16, [e.name for e in kernels][:5]
    assert all(torch.equal(c, p.to(torch.bfloat16)) for c, p in zip(copies, params, strict=True))


@pytest.mark.gpu
def test_graphed_bf16_training_is_the_same_with_the_working_copy(tmp_path):
    """The graphed bf16 step with and without the working copy, fused and plain adapters, the text encoder
    trained: 30 steps whose losses agree within the issue's 2% for bf16, and adapters that end close. (Not
    bit for bit: the GPU's attention backward adds in a varying order, and Adam turns near-zero gradient
    differences into full-size steps.)"""
    from safetensors.torch import load_file

    from lora_core.config import resolve
    from lora_core.dataset import write_example_dataset
    from lora_core.trainer import train

    write_example_dataset(tmp_path / "data", n=4, size=64)
    common = [f"data.dir={tmp_path / 'data'}", "model.base=tiny:sd1", "data.resolution=64", "data.buckets=false",
              "schedule.steps=30", "optim.lr=1e-4", "sampling.enabled=false", "performance.log_every=1",
              "performance.mixed_precision=bf16", "performance.cuda_graphs=on", "performance.compile=off",
              "lora.train_text_encoder=true"]
    for fused in ("true", "false"):
        runs = {}
        for copy_on in ("false", "true"):
            run = tmp_path / f"{fused}-{copy_on}"
            cfg = resolve(overrides=[*common, f"performance.fused_lora={fused}", f"performance.adapter_copy={copy_on}"])
            losses = torch.tensor([ev.loss for ev in train(cfg, run_dir=run) if ev.kind == "step"])
            weights = load_file(str(run / "adapter.safetensors"))
            runs[copy_on] = losses, torch.cat([weights[k].flatten().float() for k in sorted(weights)
                                                if k.endswith("lora_up.weight")])
        (a, wa), (b, wb) = runs["false"], runs["true"]
        assert len(a) == len(b) == 30
        assert ((a - b).abs() / a.abs()).max() <= 0.02, (fused, a, b)
        assert wa.norm() > 0  # the adapters trained
        assert (wb - wa).norm() / wa.norm() <= 0.05, (fused, float((wb - wa).norm() / wa.norm()))
