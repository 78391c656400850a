"""The Triton kernels build for the GPUs they run on, at the shapes the trainer gives them, checked on a
machine without one. The interpreter tests (test_nhwc_norm, test_layer_norm, test_geglu) run the kernels'
logic but never compile them, and compiling is where type errors show, and the constants Triton makes of
integer arguments equal to 1 (a GroupNorm over [N, C, 1, 1] has one row). Here the real launch code runs
on meta tensors with each launch recorded instead of made; every distinct launch is then compiled for a
Hopper GPU (sm_90) by Triton's own compiler and assembler, and must fit its shared memory."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from lora_core import geglu, layer_norm, nhwc_norm  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED = 227 * 1024  # the most shared memory one block may have on an H100
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constants, attributes) as Triton's launcher makes them: constexpr parameters and integers
    equal to 1 become constants; tensors pointers to their dtype; other integers 32-bit where they fit;
    pointers (the allocator's, aligned) and integers divisible by 16 marked so, which is what lets the
    compiler vectorise and pipeline loads."""
    values = dict(zip(fn.arg_names, args, strict=False)) | {k: v for k, v in kwargs.items() if k not in OPTIONS}
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        v = values[name]
        if param.is_constexpr or v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[name], consts[name] = "constexpr", v
            continue
        if isinstance(v, torch.Tensor):
            sig[name] = POINTER[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: no signature for {name}={v!r}")
        if isinstance(v, torch.Tensor) or (type(v) is int and v % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _structure(consts: dict) -> tuple:
    """What a launch's build depends on besides its sizes: its flags and None arguments, which arguments
    are the constant 1, and which sizes are 1 or not powers of two (masks on every load)."""
    return tuple(sorted((k, v if type(v) is not int else "one" if v == 1 else "pow2" if v & (v - 1) == 0 else "odd")
                        for k, v in consts.items()))


@pytest.fixture
def launches(monkeypatch):
    """Record the kernel launches (kernel, signature, constants, attributes, options) instead of making them: for each
    structure of launch, the one with the largest blocks."""
    seen = {}

    def record(self, *args, grid, warmup, **kwargs):
        sig, consts, attrs = _signature(self, args, kwargs)
        options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
        key = (self.__name__, tuple(sig.items()), _structure(consts), tuple(attrs), tuple(options.items()))
        size = sum(v for v in consts.values() if type(v) is int)
        if key not in seen or size > seen[key][0]:  # per structure, the launch with the largest blocks
            seen[key] = (size, self, sig, consts, attrs, options)

    monkeypatch.setattr(JITFunction, "run", record)
    return seen


def _build_all(seen: dict, built: list | None = None) -> list[str]:
    """Compile each recorded launch for Hopper; the failures, described. `built` collects (name, constants,
    compiled kernel) for further checks."""
    failures = []
    for _, fn, sig, consts, attrs, options in seen.values():
        try:
            kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=HOPPER, options=options)
        except Exception as e:  # the message names the kernel and the specialisation that failed
            failures.append(f"{fn.__name__} {consts}: {type(e).__name__}: {str(e)[-400:]}")
            continue
        if kernel.metadata.shared > HOPPER_SHARED:  # would fail to load: out of resources
            failures.append(f"{fn.__name__} {consts}: {kernel.metadata.shared} bytes of shared memory")
        if built is not None:
            built.append((fn.__name__, consts, kernel))
    return failures


def _unet_norm_shapes() -> tuple[list[tuple], list[tuple]]:
    from bench.norms import shapes  # the UNet's norm calls, found on the meta device

    gn, ln = [], []
    for model, batch in (("full:sd15", 1), ("full:sd15", 16), ("full:sdxl", 4)):
        g, n = shapes(model, batch)
        gn += g
        ln += n
    return sorted(set(gn)), sorted(set(ln))


def _meta(shape: tuple, channels_last: bool = True) -> torch.Tensor:
    t = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def test_group_norm_kernels_build_at_the_unets_and_vaes_shapes(launches):
    gn, _ = _unet_norm_shapes()
    calls = [(shape, groups, silu, True, True) for shape, groups, silu in gn]  # training: channels-last, affine
    vae = [(1, 512, 64, 64), (1, 512, 128, 128), (1, 512, 256, 256), (1, 256, 256, 256), (1, 256, 512, 512),
           (1, 128, 512, 512)]
    calls += [(shape, 32, False, False, False) for shape in vae]  # the VAE decodes in NCHW, forward only
    calls += [((2, 320, 1, 1), 32, True, True, True), ((2, 64, 5, 3), 32, False, True, True)]  # one row; odd
    for i, (shape, groups, silu, channels_last, backward) in enumerate(calls):
        for params in ((True, True), (False, False)) if i >= len(calls) - 2 else ((True, True),):
            x = _meta(shape, channels_last).requires_grad_(backward)
            w, b = (torch.empty(shape[1], device="meta", dtype=x.dtype).requires_grad_(backward) if p else None
                    for p in params)
            y = nhwc_norm._GroupNormNHWC.apply(x, groups, w, b, 1e-5, silu)
            if backward:
                torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], torch.empty_like(y))
    nhwc_norm._probe(_meta((1,)))
    assert {key[0] for key in launches} == {"_stats", "_normalise", "_grad_sums", "_grad_input"}
    assert any(dict(key[2]).get("rows") == "one" for key in launches), "no launch with a single row"
    failures = _build_all(launches)
    assert not failures, "\n".join(failures)


def test_layer_norm_and_geglu_kernels_build_at_the_unets_shapes(launches):
    _, ln = _unet_norm_shapes()
    for shape in ln + [(1, 1, 320), (3, 5, 8192)]:
        for with_params in (True, False):
            x = _meta(shape).requires_grad_()
            w = torch.empty(shape[-1], device="meta", dtype=x.dtype).requires_grad_() if with_params else None
            y = layer_norm._LayerNorm.apply(x, w, w, 1e-5)
            torch.autograd.grad(y, [t for t in (x, w) if t is not None], torch.empty_like(y))
        h = _meta((*shape[:-1], 8 * shape[-1])).requires_grad_()  # the feed-forward's projection: 2 x 4 C
        y = geglu._GEGLU.apply(h)
        torch.autograd.grad(y, h, torch.empty_like(y))
    layer_norm._probe(_meta((1,)))
    geglu._probe(_meta((1,)))
    assert {key[0] for key in launches} == {"_forward", "_backward"}
    failures = _build_all(launches)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("mode", ["gemm", "add"])
def test_lora_product_kernels_build_at_the_unets_shapes(launches, monkeypatch, mode):
    """lora_core/lora_gemm.py's and low_rank.py's kernels, through the LoRA functions' forward and backward
    at SD1.5 batch-16 shapes (self-attention's q, k, v as a group, its output alone, cross-attention's k, v)."""
    from lora_core import lora_gemm, low_rank
    from lora_core.grouped_lora import _GroupedLoRAFn
    from lora_core.lora_fused import _LoRALinearFn

    monkeypatch.setattr(low_rank, "wanted", lambda t: low_rank._state["mode"] != "off")  # meta tensors
    monkeypatch.setitem(lora_gemm._state, "worked", False)
    monkeypatch.setitem(low_rank._state, "worked", False)
    low_rank.enable(mode)
    try:
        for tokens, width in ((65536, 320), (16384, 640), (4096, 1280)):
            x = _meta((tokens, width)).requires_grad_()
            w, b = _meta((width, width)), _meta((width,))
            d = torch.empty(16, width, device="meta").requires_grad_()
            u = torch.empty(width, 16, device="meta").requires_grad_()
            y = _LoRALinearFn.apply(x, w, b, d, u, 1.0, None, None)
            torch.autograd.grad(y, [x, d, u], torch.empty_like(y))
            for inputs, members, rows in ((width, 3, tokens), (768, 2, 1232)):
                xg = _meta((rows, inputs)).requires_grad_()
                ps = [torch.empty(16, inputs, device="meta").requires_grad_() for _ in range(members)]
                ps += [torch.empty(width, 16, device="meta").requires_grad_() for _ in range(members)]
                yg = _GroupedLoRAFn.apply(xg, _meta((members * width, inputs)), 1.0, [p.detach() for p in ps], *ps)
                torch.autograd.grad(yg, [xg, *ps], torch.empty_like(yg))
    finally:
        low_rank.enable("off")
    assert {key[0] for key in launches} == ({"_gemm"} if mode == "gemm" else {"_add"})
    built = []
    failures = _build_all(launches, built)
    assert not failures, "\n".join(failures)
    if mode == "gemm":  # the product's loads are pipelined: copied ahead into shared memory while it computes
        for _, consts, kernel in built:
            assert "ttg.async_copy_global_to_local" in kernel.asm["ttgir"], consts
