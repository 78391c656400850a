"""Sampling from a graphed UNet draws what the eager UNet draws, and sees adapter changes made since
the capture. The equality tests need a CUDA GPU (marker `gpu`); the fallback test runs anywhere."""

import logging

import numpy as np
import pytest
import torch

from lora_core.graphed_unet import graphed
from lora_core.inject import inject, set_multiplier
from lora_core.models import load_model
from lora_core.sampling import draw, previews

PROMPTS = ["a red circle on a white background"]


def _model(device: str):
    model = load_model("tiny:sd1", device=device)
    model.pipe.set_progress_bar_config(disable=True)
    modules = inject(model.unet, model.text_encoders, model.family, targets="attn", rank=4, alpha=4,
                     text_encoder=False)
    torch.manual_seed(0)
    for m in modules.values():
        torch.nn.init.normal_(m.lora_up.weight, std=0.05)
    model.unet.eval()
    return model, modules


def _pixels(model, graphs: bool) -> np.ndarray:
    return np.asarray(draw(model, PROMPTS, steps=6, guidance=5.0, graphs=graphs)[0]).astype(int)


def test_off_the_gpu_the_unet_runs_as_it_is_and_is_left_unpatched():
    model, _ = _model("cpu")
    x, t, emb = torch.randn(1, 4, 32, 32), torch.tensor(10), torch.randn(1, 77, 32)
    with torch.no_grad():
        plain = model.unet(x, t, emb).sample
        with graphed(model.unet):
            inside = model.unet(x, t, emb).sample
    assert torch.equal(plain, inside)
    assert "forward" not in model.unet.__dict__


@pytest.mark.gpu
def test_graphed_sampling_draws_the_eager_image_at_every_weight():
    model, modules = _model("cuda")
    for weight in (0.0, 1.0, 0.5):
        set_multiplier(modules, weight)
        eager, replayed = _pixels(model, False), _pixels(model, True)
        assert np.abs(eager - replayed).max() <= 2, weight
    set_multiplier(modules, 1.0)
    before = _pixels(model, True)
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.weight.mul_(10.0)  # what an optimizer step does: in place, same storage
    after, eager_after = _pixels(model, True), _pixels(model, False)
    assert np.abs(after - before).max() > 6  # the replay saw the new weights (a stale graph: 0)...
    assert np.abs(after - eager_after).max() <= 2  # ...exactly as the eager UNet does


@pytest.mark.gpu
def test_compiled_graphed_sampling_draws_the_eager_image(caplog):
    """`sampling.compile`: the sampling graph is recorded from a torch.compile of the UNet."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, modules = _model("cuda")
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.weight.mul_(4.0)
    eager = _pixels(model, False)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = np.asarray(draw(model, PROMPTS, steps=6, guidance=5.0, compiled=True)[0]).astype(int)
    assert counters["stats"]["unique_graphs"] > graphs_before  # the compiler made code for the capture
    assert np.abs(eager - compiled).max() <= 2
    model.unet.to(memory_format=torch.channels_last)  # weights moved: the compiled code no longer fits them
    with caplog.at_level(logging.WARNING):
        moved = np.asarray(draw(model, PROMPTS, steps=6, guidance=5.0, compiled=True)[0]).astype(int)
    assert "uncompiled" in caplog.text
    assert np.abs(eager - moved).max() <= 2
    set_multiplier(modules, 0.0)
    assert np.abs(_pixels(model, False) - eager).max() > 6  # the adapter shows in what was compared
    torch._dynamo.reset()


@pytest.mark.gpu
def test_a_sampling_compile_that_fails_records_the_eager_forward(caplog, monkeypatch):
    import lora_core.graphed_unet as graphed_unet

    def broken(fn, **kw):
        def run(*args, **kwargs):
            raise RuntimeError("inductor could not compile this")
        return run

    monkeypatch.setattr(graphed_unet.torch, "compile", broken)
    model, _ = _model("cuda")
    eager = _pixels(model, False)
    with caplog.at_level(logging.WARNING):
        drawn = np.asarray(draw(model, PROMPTS, steps=6, guidance=5.0, compiled=True)[0]).astype(int)
    assert "compiling the sampling UNet failed" in caplog.text
    assert np.abs(eager - drawn).max() <= 2
    caplog.clear()
    with caplog.at_level(logging.INFO):
        draw(model, PROMPTS * 2, steps=2, guidance=5.0, compiled=True, batch=2)  # a new shape: a new capture
    assert "capturing the sampling UNet for (4," in caplog.text
    assert "failed" not in caplog.text  # the compile is not tried again at every capture


def _preview_pixels(model, modules, batch: int) -> list[np.ndarray]:
    pics = previews(model, modules, PROMPTS * 2, [0.0, 1.0, 0.5], seed=3, steps=4, guidance=5.0, batch=batch)
    assert [(p, s) for p, s, _ in pics] == [(PROMPTS[0], s) for s in (0.0, 0.0, 1.0, 1.0, 0.5, 0.5)]
    return [np.asarray(img).astype(int) for _, _, img in pics]


def _batched_previews_match_one_by_one(device: str, tolerance: int) -> None:
    model, modules = _model(device)
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.weight.mul_(4.0)  # an adapter that shows well above the tolerance
    one = _preview_pixels(model, modules, 1)
    together = _preview_pixels(model, modules, 4)  # a batch of 4 (weights 0, 0, 1, 1) and one of 2 (0.5)
    assert all(m.per_image is None and m.multiplier == 1.0 for m in modules.values())  # restored
    assert np.abs(one[0] - one[2]).max() > 12, np.abs(one[0] - one[2]).max()  # the adapter shows at weight 1...
    assert np.abs(one[0] - one[1]).max() > 6  # ...and the two prompts' seeds differ
    diffs = [int(np.abs(a - b).max()) for a, b in zip(one, together, strict=True)]
    assert max(diffs) <= tolerance, diffs
    assert int(np.abs(one[0] - one[4]).max()) > 2 * tolerance  # weight 0.5 differs from 0 beyond it


def test_batched_previews_draw_what_one_image_per_call_draws():
    _batched_previews_match_one_by_one("cpu", 1)


@pytest.mark.gpu
def test_graphed_batched_previews_draw_what_one_image_per_call_draws():
    _batched_previews_match_one_by_one("cuda", 2)


def test_previews_between_compiled_training_steps_recompile_nothing():
    """A compiled run's previews replay the sampling graphs (on a GPU) or run the plain module, then
    training goes on: neither the eval/train switch nor the graphed forward's patch may trip the compiled
    UNet's guards, or each preview would cost a recompile (minutes on a GPU)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()  # compiles of earlier tests in this process must not count against the limit
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the GPU machine the graphs are captured too
    model, modules = _model(device)
    model.unet.train()
    counter = CompileCounter()
    compiled = torch.compile(model.unet, backend=counter, dynamic=False)
    x, t, emb = (torch.randn(1, 4, 32, 32, device=device), torch.tensor([10], device=device),
                 torch.randn(1, 77, 32, device=device))
    compiled(x, t, emb).sample.sum().backward()
    assert counter.frame_count == 1
    previews(model, modules, PROMPTS, [0.0, 1.0], steps=2, guidance=5.0, graphs=True)
    model.unet.eval()
    with torch.no_grad(), graphed(model.unet):
        model.unet(x, t, emb)
    model.unet.train()
    compiled(x, t, emb).sample.sum().backward()
    assert counter.frame_count == 1
    assert model.unet.training and "forward" not in model.unet.__dict__


def _spy_on_draw(monkeypatch, modules) -> list[int]:
    """Records, for each draw, how many adapters were merged while it drew."""
    import lora_core.sampling as sampling

    seen, draw_as_is = [], sampling.draw

    def spy(*args, **kw):
        seen.append(sum(m.merged for m in modules.values()))
        return draw_as_is(*args, **kw)

    monkeypatch.setattr(sampling, "draw", spy)
    return seen


def _lone_preview(model, modules, monkeypatch, **kw) -> tuple[np.ndarray, list[int]]:
    seen = _spy_on_draw(monkeypatch, modules)
    pics = previews(model, modules, PROMPTS, [1.0], seed=3, steps=4, guidance=5.0, **kw)
    return np.asarray(pics[0][2]).astype(int), seen


def test_merged_previews_draw_the_unmerged_image_and_restore_the_base_exactly(monkeypatch):
    model, modules = _model("cpu")
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.weight.mul_(4.0)
    base = {k: v.clone() for k, v in model.unet.state_dict().items() if "lora_" not in k}
    unmerged, seen = _lone_preview(model, modules, monkeypatch)
    assert seen == [0]  # not merged unless asked: bf16 weights would round small adapter changes away
    merged, seen = _lone_preview(model, modules, monkeypatch, merge=True)
    assert seen == [len(modules)]
    at_zero = np.asarray(previews(model, modules, PROMPTS, [0.0], seed=3, steps=4, guidance=5.0)[0][2]).astype(int)
    assert np.abs(unmerged - at_zero).max() > 12  # the adapter shows...
    assert np.abs(unmerged - merged).max() <= 1  # ...and merging draws the same image
    assert not any(m.merged for m in modules.values())
    after = model.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # bit for bit


def test_a_preview_of_an_adapter_that_will_not_merge_is_drawn_unmerged(caplog, monkeypatch):
    model, modules = _model("cpu")
    last = list(modules.values())[-1]
    with torch.no_grad():
        last.lora_up.weight.fill_(float("inf"))  # merging would write infinite weights: refused
    base = {k: v.clone() for k, v in model.unet.state_dict().items() if "lora_" not in k}
    _, seen = _lone_preview(model, modules, monkeypatch, merge=True)
    assert seen == [0]
    assert not any(m.merged for m in modules.values())  # while drawing (above) and after
    assert "unmerged" in caplog.text
    after = model.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())


@pytest.mark.gpu
def test_bf16_previews_compute_with_a_working_copy_refreshed_at_each_preview():
    """A bf16 channels-last UNet (a training run's, GroupNorm kernels included): the preview, replayed from
    graphs that read the adapters' half-precision working copy, draws the plain eager image; after the
    fp32 weights change in place (as a training step changes them) the next preview draws the new image."""
    from lora_core.half_norms import use_half_norms

    model, modules = _model("cuda")
    model.pipe.to(dtype=torch.bfloat16)
    model.unet.to(memory_format=torch.channels_last)
    use_half_norms(model.unet, nhwc=True)

    def preview() -> np.ndarray:
        return np.asarray(previews(model, modules, PROMPTS, [1.0], steps=6, guidance=5.0)[0][2]).astype(int)

    first = preview()
    assert model.unet.__dict__["_sampling_copy"].modules, "previews computed without the working copy"
    assert all(m.work is None for m in modules.values()), "the copy stayed active after the preview"
    assert np.abs(first - _pixels(model, graphs=False)).max() <= 8
    with torch.no_grad():
        for m in modules.values():
            m.lora_up.weight.mul_(-4)
    second = preview()
    assert np.abs(second - _pixels(model, graphs=False)).max() <= 8
    assert np.abs(second - first).mean() > 1, "the second preview did not see the changed weights"
