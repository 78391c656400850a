"""The adapters' weight gradients from a side stream (lora_core/weight_grads.py): the same `.grad` as the
autograd path's, for single layers and grouped projections, accumulated, with at most LAG layers' inputs
held; the switch (`performance.weight_grad_stream`). On the CPU the side work runs in line; on a GPU on its
own stream, eager and inside a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_core import weight_grads as wg
from lora_core.fast_step import weight_grad_stream
from lora_core.grouped_lora import grouped_lora
from lora_core.lora import LoRALinear


def _layers(device: str = "cpu", width: int = 24, seed: int = 0) -> list[LoRALinear]:
    """A single layer (with a bias) and a group of three projections of one input, base frozen."""
    torch.manual_seed(seed)
    layers = [LoRALinear(nn.Linear(width, 16), rank=4, alpha=2.0)] + [
        LoRALinear(nn.Linear(width, width, bias=False), rank=4, alpha=4.0) for _ in range(3)]
    for m in layers:
        m.to(device)
        m.base.requires_grad_(False)
        with torch.no_grad():
            m.lora_up.weight.normal_(0, 0.3)
    return layers


def _loss(layers: list[LoRALinear], x: torch.Tensor) -> torch.Tensor:
    group = tuple(layers[1:])
    weight = torch.cat([m.base.weight for m in group])
    y = grouped_lora(x, weight, group, group[0].scale)
    return (layers[0](x) ** 2).mean() + (y.tanh() * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum()


def _params(layers: list[LoRALinear]) -> list[torch.Tensor]:
    return [p for m in layers for p in (m.lora_down.weight, m.lora_up.weight)]


def _grads(layers: list[LoRALinear], xs: list[torch.Tensor], side: bool, autocast: bool = False):
    """The adapters' `.grad` and the inputs' gradients after one backward pass per input (accumulated)."""
    device = xs[0].device
    for p in _params(layers):
        p.grad = None
    out = []
    for x in xs:
        x = x.detach().clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = _loss(layers, x)
        with wg.on_side_stream(device, side):
            loss.backward()
        out.append(x.grad)
    return [p.grad.clone() for p in _params(layers)], out


def test_side_gradients_equal_autograds_and_accumulate():
    layers = _layers()
    xs = [torch.randn(5, 7, 24) for _ in range(2)]
    want, want_x = _grads(layers, xs, side=False)
    got, got_x = _grads(layers, xs, side=True)
    for g, w in zip(got + got_x, want + want_x, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in got)


def test_under_autocast_the_side_gradients_are_fp32_and_equal_autograds():
    layers = _layers()
    xs = [torch.randn(3, 6, 24)]
    want, _ = _grads(layers, xs, side=False, autocast=True)
    got, _ = _grads(layers, xs, side=True, autocast=True)
    assert [g.dtype for g in got] == [torch.float32] * len(got)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_the_layers_hand_their_products_over_and_at_most_lag_stay_held(monkeypatch):
    monkeypatch.setattr(wg, "LAG", 2)
    layers = [_layers(seed=i)[0] for i in range(5)]
    x = torch.randn(4, 24, requires_grad=True)
    seen, held = [], []
    real_done = wg._Side.done

    def done(self, keep):
        real_done(self, keep)
        seen.append(len(self.pending))
        held.append(keep)

    monkeypatch.setattr(wg._Side, "done", done)
    loss = sum((m(x) ** 2).sum() for m in layers)
    with wg.on_side_stream(torch.device("cpu")):
        assert wg.active(torch.device("cpu")) and not wg.active(torch.device("meta"))
        loss.backward()
    assert seen == [1, 2, 2, 2, 2]  # one hand-over per layer, the oldest retired beyond LAG
    assert not wg.active(torch.device("cpu")) and not wg._SIDES[("cpu", 0)].pending  # joined and released
    storage = x.untyped_storage().data_ptr()  # each hand-over holds what its products read, the input among them
    assert all(any(t.untyped_storage().data_ptr() == storage for t in keep) for keep in held)


def _count_handovers(monkeypatch) -> list[int]:
    """The number of products in each hand-over to the side stream, as a list filled in as they come."""
    counts = []
    real = wg.accumulate

    def counting(device, jobs, product, keep):
        counts.append(len(jobs))
        real(device, jobs, product, keep)

    monkeypatch.setattr(wg, "accumulate", counting)
    return counts


def test_single_layers_and_groups_hand_over_every_weights_product_and_only_inside_the_block(monkeypatch):
    counts = _count_handovers(monkeypatch)
    layers = _layers()
    x = torch.randn(2, 24, requires_grad=True)
    _loss(layers, x).backward()
    assert counts == []  # outside the block: returned to autograd
    for p in _params(layers):
        p.grad = None
    with wg.on_side_stream(torch.device("cpu"), enabled=False):
        assert not wg.active(torch.device("cpu"))
        _loss(layers, x).backward()
    assert counts == []
    with wg.on_side_stream(torch.device("cpu")):
        _loss(layers, x).backward()
    assert sorted(counts) == [2, 4]  # a layer's down and up; a group's downs (one product) and its three ups
    layers[0].lora_down.weight.requires_grad_(False)  # a weight without a gradient: the layer returns its own
    counts.clear()
    with wg.on_side_stream(torch.device("cpu")):
        _loss(layers, x).backward()
    assert sorted(counts) == [1, 4]


def test_a_device_without_an_index_is_the_current_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert wg._key(torch.device("cuda")) == wg._key(torch.device("cuda:1")) == ("cuda", 1)
    assert wg._key(torch.device("cpu")) == ("cpu", 0)


def test_a_training_run_with_the_stream_trains_the_same_model(tmp_path, monkeypatch):
    """The trainer's wiring (the block around each backward pass, joined before the gradients are read): CPU
    steps with gradient accumulation, the side work in line, against the same run without it."""
    from lora_core import trainer
    from lora_core.config import resolve
    from lora_core.dataset import write_example_dataset

    write_example_dataset(tmp_path / "d", n=4, size=64)
    cfg = resolve(overrides=[f"data.dir={tmp_path / 'd'}", "model.base=tiny:sd1", "data.resolution=64",
                             "schedule.steps=4", "optim.grad_accum=2", "optim.lr=1e-3", "sampling.enabled=false",
                             "performance.mixed_precision=no"])
    plain = [ev.loss for ev in trainer.train(cfg, run_dir=tmp_path / "a") if ev.kind == "step"]
    counts = _count_handovers(monkeypatch)
    monkeypatch.setattr(trainer, "weight_grad_stream", lambda mode, device, graphs: True)
    side = [ev.loss for ev in trainer.train(cfg, run_dir=tmp_path / "b") if ev.kind == "step"]
    assert len(counts) >= 4 * 2 * 16  # every adapted layer (or group) of every micro-batch
    assert len(side) == len(plain) == 4
    torch.testing.assert_close(torch.tensor(side), torch.tensor(plain), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,device,graphs,on", [
    ("auto", "cuda", True, True), ("auto", "cuda", False, False), ("auto", "cpu", False, False),
    ("on", "cuda", False, True), ("on", "cpu", False, False), ("off", "cuda", True, False)])
def test_the_switch(mode, device, graphs, on):
    assert weight_grad_stream(mode, torch.device(device), graphs) is on


def test_auto_is_the_default():
    from lora_core.config import resolve

    assert resolve(overrides=[]).performance.weight_grad_stream == "auto"


@pytest.mark.gpu
def test_on_the_gpu_eager_and_captured_the_side_gradients_equal_autograds():
    layers = _layers("cuda", width=320)
    xs = [torch.randn(4, 1024, 320, device="cuda")]
    want, want_x = _grads(layers, xs, side=False, autocast=True)
    got, got_x = _grads(layers, xs, side=True, autocast=True)
    for g, w in zip(got + got_x, want + want_x, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    static = xs[0].clone()
    for p in _params(layers):
        p.grad = None
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # one eager pass on the capture's stream first, as the graphed step does
        _grads(layers, [static], side=True, autocast=True)
        for p in _params(layers):
            p.grad = None
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = _loss(layers, static)
        with wg.on_side_stream(static.device):
            loss.backward()
    grads = [p.grad for p in _params(layers)]
    for x in (torch.randn_like(static), xs[0]):
        static.copy_(x)
        graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(grads, want, strict=True):  # the last replay's input is the eager passes'
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
