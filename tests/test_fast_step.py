"""The graphed training step (lora_core/fast_step.py): when it is used, and that it trains the same model
as the eager step. The equality tests need a CUDA GPU (marker `gpu`); the policy tests run anywhere."""

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from lora_core.attention import attention_kernels, kernel_order
from lora_core.checkpoints import _portable
from lora_core.config import resolve
from lora_core.dataset import write_example_dataset
from lora_core.fast_step import (
    compile_blocks,
    compiles,
    conv_autotune,
    graph_blockers,
    has_compiled_blocks,
    use_graphs,
    wants_channels_last,
)
from lora_core.models import load_model
from lora_core.trainer import train

CUDA = torch.device("cuda")


def cfg_with(*overrides):
    return resolve(overrides=["data.dir=.", *overrides])


def test_graphs_only_on_cuda_and_only_for_graph_safe_runs():
    plain = cfg_with("lora.train_text_encoder=false", "schedule.batch_size=1")
    assert not use_graphs(plain, 1, torch.device("cpu"))
    assert use_graphs(plain, 1, CUDA)
    assert use_graphs(cfg_with("lora.train_text_encoder=false", "schedule.batch_size=16"), 1, CUDA)
    assert not use_graphs(cfg_with("lora.train_text_encoder=false", "performance.cuda_graphs=off"), 1, CUDA)
    assert use_graphs(cfg_with("lora.train_text_encoder=true"), 1, CUDA)  # the encoder runs inside the graph
    for extra, words in (("optim.grad_accum=2", "grad_accum"),
                         ("performance.gradient_checkpointing=true", "checkpointing"),
                         ("lora.dropout=0.1", "dropout")):
        cfg = cfg_with("lora.train_text_encoder=false", extra)
        assert any(words in why for why in graph_blockers(cfg, 1)), extra
        assert not use_graphs(cfg, 1, CUDA)
    assert graph_blockers(plain, 2) and not use_graphs(plain, 2, CUDA)


def test_auto_compiles_only_runs_long_enough_to_win_the_compile_back():
    """A graphed step gains little from the compiler (it pays after ~300k samples at batch 1, ~1M at batch
    16); an eager one a lot."""
    def auto(steps, *extra, device=CUDA, processes=1):
        cfg = cfg_with("lora.train_text_encoder=false", *extra)
        return compiles(cfg, device, steps, use_graphs(cfg, processes, device))

    assert not auto(3000, "schedule.batch_size=1")  # a typical run: the compile would cost more than it saves
    assert not auto(62_000, "schedule.batch_size=16")
    assert auto(62_500, "schedule.batch_size=16")
    assert not auto(62_000, "schedule.batch_size=4") and auto(250_000, "schedule.batch_size=4")
    assert not auto(250_000, "schedule.batch_size=1") and auto(300_000, "schedule.batch_size=1")
    assert not auto(10**6, "schedule.batch_size=16", device=torch.device("cpu"))
    assert not auto(1999, "performance.cuda_graphs=off") and auto(2000, "performance.cuda_graphs=off")
    assert auto(1000, "optim.grad_accum=2") and not auto(999, "optim.grad_accum=2")  # counted in batches
    assert auto(2000, processes=2) and not auto(1999, processes=2)
    assert not auto(10**6, "performance.gradient_checkpointing=true")  # not measured under the compiler
    assert auto(1, "performance.gradient_checkpointing=true", "performance.compile=on")
    assert not auto(2000) and not auto(10**6, "performance.compile=off") and auto(1, "performance.compile=on")


def test_auto_channels_last_at_any_batch_only_where_groupnorm_keeps_the_layout(monkeypatch):
    """PyTorch's GroupNorm copies channels-last tensors to NCHW and back, which lost at large batches;
    the layout-keeping norms (nhwc_norms on a half base, not compiled) make it pay at any graphed batch."""
    from lora_core import nhwc_norm
    monkeypatch.setattr(nhwc_norm, "runs_on", lambda device: device.type == "cuda")
    bf16 = torch.bfloat16

    def auto(*extra, dtype=bf16, graphs=True, compiled=False):
        return wants_channels_last(cfg_with(*extra), dtype, CUDA, graphs, compiled)

    assert auto("schedule.batch_size=16")
    assert not auto("schedule.batch_size=16", "performance.nhwc_norms=false")
    assert not auto("schedule.batch_size=16", "performance.half_norms=false")
    assert not auto("schedule.batch_size=16", dtype=torch.float32)
    assert not auto("schedule.batch_size=16", compiled=True)  # the compiler fuses its own norms
    assert auto("schedule.batch_size=4", "performance.nhwc_norms=false")  # small batches win either way
    assert not auto("schedule.batch_size=1", graphs=False)  # eager steps wait on the host
    assert auto("schedule.batch_size=1", "performance.channels_last=on", graphs=False)
    assert not auto("schedule.batch_size=1", "performance.channels_last=off")
    monkeypatch.setattr(nhwc_norm, "runs_on", lambda device: False)  # no Triton, or a GPU it can't use
    assert not auto("schedule.batch_size=16")


def test_saved_optimizer_state_resumes_without_a_gpu():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    opt.param_groups[0]["lr"], opt.param_groups[0]["capturable"] = torch.tensor(2e-3), True
    state = _portable(opt.state_dict())
    assert state["param_groups"][0]["lr"] == pytest.approx(2e-3) and not state["param_groups"][0]["capturable"]
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, foreach=True)
    fresh.load_state_dict(state)
    fresh.param_groups[0]["params"][0].grad = torch.ones(3)
    fresh.step()  # a CPU optimizer takes the state of a graphed GPU run


def _two_shape_dataset(root: Path, size: int) -> Path:
    """Square and wide images, so the run has two bucket shapes and captures two graphs."""
    write_example_dataset(root, n=6, size=size)
    for path in sorted(root.glob("*.png"))[:3]:
        Image.open(path).resize((size * 2, size)).save(path)
    return root


def _losses(cfg, run: Path) -> tuple[list[float], str]:
    out, digest = [], ""
    for ev in train(cfg, run_dir=run):
        assert ev.kind != "failed", ev.message
        if ev.kind == "step":
            out.append(ev.loss)
        if ev.kind == "finished":
            digest = ev.digest
    return out, digest


@pytest.mark.gpu
@pytest.mark.parametrize(("base", "te"), [("tiny:sd1", "false"), ("tiny:sd1", "true"), ("tiny:sdxl", "true")])
def test_graphed_step_equals_eager_step_fp32(tmp_path, caplog, base, te):
    data = _two_shape_dataset(tmp_path / "data", 64)
    common = [f"data.dir={data}", f"model.base={base}", "data.resolution=64", "data.min_bucket=32",
              "data.max_bucket=96", "data.bucket_step=32", f"lora.train_text_encoder={te}",
              "data.caption_dropout=0.2", "optim.uncond_preservation=0.2",
              "performance.mixed_precision=no", "schedule.steps=30", "schedule.batch_size=1", "optim.lr=1e-3",
              "sampling.enabled=false", "performance.log_every=1", "data.flip=true", "optim.min_snr_gamma=5",
              "schedule.scheduler=cosine", "schedule.warmup_steps=5"]
    eager, _ = _losses(resolve(overrides=common + ["performance.cuda_graphs=off"]), tmp_path / "eager")
    with caplog.at_level(logging.INFO, logger="lora_core.fast_step"):
        graphed, _ = _losses(resolve(overrides=common + ["performance.cuda_graphs=on"]), tmp_path / "graphed")
    assert sum("capturing the training step" in r.message for r in caplog.records) == 2  # one per shape
    assert len(eager) == len(graphed) == 30
    # the same kernels in the same order: equal to fp32 rounding (cuBLAS may pick another algorithm on the
    # graph's stream), which 30 updates of every adapter grow to about 1e-4. Steps with the caption dropped
    # under uncond_preservation have losses near 1e-6 (the adapter against the base's own prediction), so
    # the bound is |graphed - eager| <= 1e-3 * |eager| + 1e-6.
    g, e = torch.tensor(graphed), torch.tensor(eager)
    rel = (g - e).abs() / (e.abs() + 1e-3)
    i = int(rel.argmax())
    assert rel[i] <= 1e-3, (f"step {i}: eager {e[i]:.9g}, graphed {g[i]:.9g}", eager, graphed)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["cudnn", "tuned"])
def test_fast_step_tracks_plain_eager_step_bf16_sd15(tmp_path, attention):
    """Graphs, channels-last, cuDNN (or per-shape tuned) attention, the fused LoRA kernel, half-precision and channels-last norms,
    the working copy, grouped projections, the fused GEGLU, the LayerNorm kernels, the lean ResNet and transformer blocks, the one-kernel LoRA product, the weight gradients on a second stream against none of them: 50 steps within 2%."""
    data = tmp_path / "data"
    write_example_dataset(data, n=8, size=512)
    common = [f"data.dir={data}", "model.base=full:sd15", "data.resolution=512", "data.buckets=false",
              "lora.train_text_encoder=false", "lora.rank=16", "lora.alpha=16", "lora.targets=attn",
              "schedule.steps=50", "schedule.batch_size=1", "optim.lr=1e-4", "sampling.enabled=false",
              "performance.log_every=10", "performance.compile=off"]
    plain = ["performance.cuda_graphs=off", "performance.channels_last=off", "performance.attention=flash",
             "performance.fused_lora=false", "performance.half_norms=false", "performance.adapter_copy=false",
             "performance.fused_projections=false", "performance.fused_geglu=false", "performance.nhwc_norms=false",
             "performance.fast_layer_norm=false",
             "performance.lean_resnets=false", "performance.lean_transformers=false", "performance.low_rank_kernel=off",
             "performance.weight_grad_stream=off"]
    eager, _ = _losses(resolve(overrides=common + plain), tmp_path / "eager")
    fast = ["performance.cuda_graphs=on", "performance.channels_last=on", f"performance.attention={attention}",
            "performance.fused_lora=true", "performance.half_norms=true", "performance.adapter_copy=true",
            "performance.fused_projections=true", "performance.fused_geglu=true", "performance.nhwc_norms=true",
            "performance.fast_layer_norm=true",
            "performance.lean_resnets=true", "performance.lean_transformers=true", "performance.low_rank_kernel=gemm",
            "performance.weight_grad_stream=on"]
    from lora_core import attention as attention_module

    attention_module._chosen.clear()
    graphed, _ = _losses(resolve(overrides=common + fast), tmp_path / "graphed")
    assert bool(attention_module._chosen) == (attention == "tuned")  # each shape timed before its graph
    e, g = torch.tensor(eager), torch.tensor(graphed)
    assert len(e) == len(g) == 50
    assert ((g - e).abs() / e.abs()).max() <= 0.02, (eager, graphed)


def test_attention_kernel_policy():
    assert kernel_order("auto", torch.device("cpu")) == "torch"
    assert kernel_order("cudnn", torch.device("cpu")) == "torch"
    assert kernel_order("torch", CUDA) == "torch"
    assert kernel_order("cudnn", CUDA) == "cudnn"
    assert kernel_order("flash", CUDA) == "flash"
    assert kernel_order("tuned", CUDA) == "tuned"
    assert kernel_order("tuned", torch.device("cpu")) == "torch"


@pytest.mark.gpu
def test_cudnn_attention_is_used_and_agrees_with_flash_attention():
    q, k, v = (torch.randn(2, 8, 1024, 40, device=CUDA, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with attention_kernels("cudnn", CUDA):
        fast = F.scaled_dot_product_attention(q, k, v)
    assert "Cudnn" in fast.grad_fn.name()
    with attention_kernels("flash", CUDA):
        plain = F.scaled_dot_product_attention(q, k, v)
    assert "Flash" in plain.grad_fn.name()
    torch.testing.assert_close(fast, plain, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(fast, (q, k, v), grad)
    plain_grads = torch.autograd.grad(plain, (q, k, v), grad)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_cudnn_benchmark_policy_is_scoped_to_the_block():
    before = torch.backends.cudnn.benchmark
    for on in (True, False):
        with conv_autotune(on):
            assert torch.backends.cudnn.benchmark is on
        assert torch.backends.cudnn.benchmark is before


def test_compile_blocks_compiles_each_transformer_and_resnet_block_in_place():
    unet = load_model("tiny:sd1", device=torch.device("cpu")).unet
    assert not has_compiled_blocks(unet)
    n = compile_blocks(unet)
    blocks = [m for m in unet.modules() if type(m).__name__ in ("Transformer2DModel", "ResnetBlock2D")]
    assert n == len(blocks) > 0
    assert all(m._compiled_call_impl is not None for m in blocks)  # compiled lazily, on the first call
    assert torch._dynamo.config.recompile_limit >= 64
    assert has_compiled_blocks(unet)  # so previews sample it without graphs


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["unet", "blocks"])
def test_compiled_step_tracks_the_plain_step_bf16(tmp_path, scope):
    """torch.compile (whole UNet or its blocks) inside the graphed step with every other switch at its default,
    against the plain eager path: 50 bf16 steps within 2%, the issue's bound for the GPU; previews between
    the compiled steps."""
    write_example_dataset(tmp_path / "data", n=4, size=64)
    common = [f"data.dir={tmp_path / 'data'}", "model.base=tiny:sd1", "data.resolution=64", "data.buckets=false",
              "schedule.steps=50", "optim.lr=1e-4", "sampling.enabled=false", "performance.log_every=10",
              "performance.mixed_precision=bf16"]
    plain = ["performance.cuda_graphs=off", "performance.attention=flash", "performance.fused_lora=false",
             "performance.half_norms=false", "performance.compile=off", "performance.adapter_copy=false",
             "performance.fused_projections=false"]
    e, _ = _losses(resolve(overrides=common + plain), tmp_path / "plain")
    # the compiled run also draws previews between its steps (graphed for `unet`, eager for `blocks`): they
    # must neither fail nor disturb training (each step's randomness has its own generator)
    previews = ["sampling.enabled=true", "sampling.every=25", "sampling.steps=2", "sampling.scales=[0.0, 1.0]"]
    c, _ = _losses(resolve(overrides=[*common, "performance.compile=on", f"performance.compile_scope={scope}",
                                      *previews]), tmp_path / "compiled")
    assert len(list((tmp_path / "compiled" / "samples").glob("step-000025-*.png"))) == 2
    e, c = torch.tensor(e), torch.tensor(c)
    assert len(e) == len(c) == 50
    assert ((c - e).abs() / e.abs()).max() <= 0.02, (e, c)
    # at this learning rate the losses alone can't tell an adapter that trained from one that did not: the
    # up projections start at zero, so each must have moved as far as the plain run's
    want, got = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("plain", "compiled"))
    for key in (k for k in want if "lora_up" in k):
        assert got[key].norm() >= 0.5 * want[key].norm() > 0, key


@pytest.mark.parametrize("compiled", [False, True])
def test_a_compiled_unet_takes_the_plain_adapter_path(tmp_path, monkeypatch, compiled):
    """Under torch.compile on a GPU the fused kernel left every adapter untrained (bench/RESULTS.md), so a
    run whose UNet is compiled must not call it; an uncompiled run does. torch.compile is replaced by the
    identity here: the decision is under test, not the compiler."""
    import lora_core.fast_step as fast_step
    import lora_core.lora as lora

    calls = []
    fused = lora.lora_linear
    monkeypatch.setattr(lora, "lora_linear", lambda *a: calls.append(1) or fused(*a))
    monkeypatch.setattr(fast_step, "compiles", lambda *a, **k: compiled)
    monkeypatch.setattr(torch, "compile", lambda model, **k: model)
    write_example_dataset(tmp_path / "d", n=2, size=64)
    _losses(resolve(overrides=[f"data.dir={tmp_path / 'd'}", "model.base=tiny:sd1", "data.resolution=64",
                               "schedule.steps=2", "sampling.enabled=false", "lora.train_text_encoder=false"]),
            tmp_path / "run")  # the text encoder is never compiled: its adapters keep the kernel
    assert bool(calls) is not compiled, len(calls)


@pytest.mark.gpu
@pytest.mark.parametrize("base", ["tiny:sd1", "tiny:sdxl"])
def test_graphed_steps_never_wait_for_the_gpu(tmp_path, monkeypatch, base):
    """Once captured, a step only queues work on the GPU: nothing in it synchronises host and device (a
    blocking copy, a read-back), so the host prepares the next step while the GPU runs this one."""
    from lora_core import trainer

    real, checked = trainer.Stepper.step, []

    def step(self, i):
        if i < 6:  # two eager steps, the capture, then replays
            return real(self, i)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = real(self, i)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        checked.append(i)
        return out

    monkeypatch.setattr(trainer.Stepper, "step", step)
    write_example_dataset(tmp_path / "data", n=4, size=64)
    cfg = resolve(overrides=[f"data.dir={tmp_path / 'data'}", f"model.base={base}", "data.resolution=64",
                             "data.buckets=false", "schedule.steps=10", "sampling.enabled=false",
                             "performance.mixed_precision=bf16", "performance.cuda_graphs=on",
                             "performance.compile=off", "performance.log_every=100", "optim.min_snr_gamma=5"])
    events = list(train(cfg, run_dir=tmp_path / "run"))
    assert events[-1].kind == "finished", events[-1]
    assert checked == [6, 7, 8, 9]


def test_the_fastest_kernel_is_the_quickest_of_those_that_take_the_shape():
    from torch.nn.attention import SDPBackend

    from lora_core.attention import fastest_kernel

    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    timed = []

    def timer(call):  # on the CPU only flash takes it; the others refuse, as a GPU kernel refuses a shape
        call()
        timed.append(True)
        return 1.0

    state = torch.get_rng_state()
    assert fastest_kernel(q, k, v, backward=True, timer=timer) is SDPBackend.FLASH_ATTENTION
    assert len(timed) == 1
    assert q.grad is None  # timed on tensors of its own, not the caller's
    assert torch.equal(torch.get_rng_state(), state)  # the run's random stream is untouched

    def failing(call):
        raise RuntimeError("CUDA error: an illegal instruction")

    assert fastest_kernel(q, k, v, backward=False, timer=failing) is None

    def out_of_memory(call):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        fastest_kernel(q, k, v, backward=False, timer=out_of_memory)


def test_attend_is_plain_attention_outside_a_tuned_block_and_on_the_cpu(monkeypatch):
    from lora_core import attention

    monkeypatch.setattr(attention, "_chosen", {})
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    torch.testing.assert_close(attention.attend(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with attention._tuned_block("tuned"):
        assert attention._tuning
        torch.testing.assert_close(attention.attend(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert not attention._tuning
    assert not attention._chosen  # nothing timed for CPU tensors


def _pretend_gpu(monkeypatch, attention, capturing=False):
    """`attend`'s logic on the CPU: tensors count as a GPU's, and the kernel chosen is flash (the CPU's)."""
    from torch.nn.attention import SDPBackend

    timed = []
    monkeypatch.setattr(attention, "_chosen", {})
    monkeypatch.setattr(attention, "_on_gpu", lambda q: True)
    monkeypatch.setattr(attention, "_capturing", lambda: capturing)
    monkeypatch.setattr(attention, "fastest_kernel",
                        lambda q, k, v, backward: timed.append((tuple(q.shape), backward)) or SDPBackend.FLASH_ATTENTION)
    return timed


def test_attend_times_each_new_shape_once_and_never_while_a_graph_is_captured(monkeypatch):
    from lora_core import attention

    timed = _pretend_gpu(monkeypatch, attention)
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    with attention._tuned_block("tuned"):
        outs = [attention.attend(q, k, v) for _ in range(3)]
        with torch.no_grad():
            attention.attend(q, k, v)  # forward only: a shape of its own
        attention.attend(q[:1], k[:1], v[:1])
    assert timed == [((2, 4, 16, 8), True), ((2, 4, 16, 8), False), ((1, 4, 16, 8), True)]
    assert len(attention._chosen) == 3
    for out in outs:
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    outs[0].sum().backward()
    assert q.grad is not None

    timed = _pretend_gpu(monkeypatch, attention, capturing=True)
    with attention._tuned_block("tuned"):
        attention.attend(q, k, v)
    assert timed == [] and attention._chosen == {}


def test_timing_inside_a_checkpointed_forward_leaves_the_checkpoint_alone():
    from torch.utils.checkpoint import checkpoint

    from lora_core.attention import fastest_kernel

    runs = []

    def block(x):
        runs.append(1)
        q, k, v = (x * (i + 1) for i in range(3))
        fastest_kernel(q, k, v, backward=True, timer=lambda call: call() or 1.0)
        return F.scaled_dot_product_attention(q, k, v)

    x = torch.randn(2, 4, 16, 8, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert len(runs) == 2  # the forward and its one recomputation, not one more for the timing's own tensors
    assert x.grad is not None


def test_tuned_blocks_of_two_threads_may_close_in_any_order():
    from lora_core import attention

    first, second = attention._tuned_block("tuned"), attention._tuned_block("tuned")
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert attention._tuning
    second.__exit__(None, None, None)
    assert not attention._tuning
    with pytest.raises(ValueError), attention._tuned_block("tuned"):
        raise ValueError("a failed step")
    assert not attention._tuning


@pytest.mark.gpu
def test_attend_times_each_shape_once_and_agrees_with_plain_attention(monkeypatch):
    from lora_core import attention

    monkeypatch.setattr(attention, "_chosen", {})
    timed = []
    real = attention.fastest_kernel
    monkeypatch.setattr(attention, "fastest_kernel", lambda *a, **kw: timed.append(a[0].shape) or real(*a, **kw))
    x = torch.randn(2, 256, 3 * 8 * 160, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (t.view(2, 256, 8, 160).transpose(1, 2) for t in x.split(8 * 160, dim=-1))
    with attention_kernels("tuned", CUDA):
        outs = [attention.attend(q, k, v) for _ in range(2)]
    assert len(timed) == 1 and len(attention._chosen) == 1
    assert list(attention._chosen.values())[0] is not None
    plain = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(outs[1].float(), plain, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(outs[1])
    (got,) = torch.autograd.grad(outs[1], x, grad)
    (want,) = torch.autograd.grad(plain, x, grad.float())
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_attend_runs_the_kernel_chosen(monkeypatch):
    from torch.nn.attention import SDPBackend

    from lora_core import attention

    monkeypatch.setattr(attention, "_chosen", {})
    monkeypatch.setattr(attention, "fastest_kernel", lambda *a: SDPBackend.EFFICIENT_ATTENTION)
    q, k, v = (torch.randn(2, 8, 256, 160, device=CUDA, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with attention_kernels("tuned", CUDA):
        assert "Efficient" in attention.attend(q, k, v).grad_fn.name()
