"""The split-head flash-attention kernels (bench/attention_split.py) against plain attention,
softmax(q k^T / sqrt(d)) v in fp32 with autograd: output, logsumexp and dQ, dK, dV, at head sizes 40
(32 + a 16-wide tail, 8 of it masked), 80 (64 + 16) and 64 (no tail), with several blocks of queries and
keys, in strided layouts, and a test that the tail block is used at all.

On the CPU the kernels run in Triton's interpreter, in a subprocess (the interpreter is chosen when Triton
is imported). Inputs are fp32 (tight tolerance: any logic error shows) and fp16, not bf16: the
interpreter's dot multiplies bf16 tensors' raw 16-bit storage (Triton 3.9: garbage of order 1e10), while
fp16 takes the same path through the kernels (16-bit dots, P and dS rounded to 16 bits, fp32 accumulation)
with a rounding error of the same kind. The bf16 kernels are compiled for an H100 (sm_90) below, and
checked against PyTorch on a GPU by `python3 bench/attention_split.py --check`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import json, math
    import torch
    from bench import attention_split as A
    torch.manual_seed(0)
    SMALL = A.Config(32, 32, 4, 1)  # 128 tokens: 4 query blocks, each streaming 4 key blocks

    def reference(q, k, v, g):
        r = [t.detach().float().requires_grad_() for t in (q, k, v)]
        s = r[0] @ r[1].transpose(-1, -2) / math.sqrt(q.shape[-1])
        o = s.softmax(-1) @ r[2]
        return [o.detach(), s.logsumexp(-1).detach(), *torch.autograd.grad(o, r, g.float())]

    def errors(got, want):
        return {name: ((a.float() - b).abs().max() / b.abs().max()).item()
                for name, a, b in zip(["o", "lse", "dq", "dk", "dv"], got, want, strict=True)}

    def run(q, k, v, g, config=SMALL):
        o, lse = A.attention_forward(q, k, v, config)
        return [o, lse, *A.attention_backward(q, k, v, o, lse, g, config, config)]

    def layout(shape, dtype, kind, scale_tail=1.0):
        b, h, n, d = shape
        if kind == "tokens_heads":  # [B, N, H, d] seen as [B, H, N, d], as diffusers' attention has it
            t = torch.randn(b, n, h, d).transpose(1, 2)
        elif kind == "odd_rows":  # rows 41 elements apart: strides not multiples of 8 (ALIGN 1)
            t = torch.randn(b, h, n, d + 1)[..., :d]
        else:
            t = torch.randn(shape)
        if scale_tail != 1.0:
            t[..., 32:] *= scale_tail
        return t.to(dtype)

    out = {}
    cases = [(d, dtype, "contiguous") for dtype in (torch.float32, torch.float16) for d in (40, 64, 80)]
    cases += [(40, torch.float32, "tokens_heads"), (80, torch.float32, "odd_rows")]
    for d, dtype, kind in cases:
        q, k, v, g = (layout((1, 2, 128, d), dtype, kind) for _ in range(4))
        got = run(q, k, v, g)
        assert got[0].dtype == dtype and got[2].shape == q.shape
        out[f"{d} {str(dtype)[6:]} {kind}"] = errors(got, reference(q, k, v, g))

    # the default configs fitted to 64 tokens: one block of queries and keys
    q, k, v, g = (torch.randn(2, 1, 64, 40, dtype=torch.float16) for _ in range(4))
    out["40 float16 default blocks at 64 tokens"] = errors(run(q, k, v, g, None), reference(q, k, v, g))

    # head 40 with its last 8 dimensions (the tail block's used part) 4 times larger than the rest
    q, k, v, g = (layout((1, 2, 128, 40), torch.float16, "contiguous", 4.0) for _ in range(4))
    want = reference(q, k, v, g)
    out["tail"] = errors(run(q, k, v, g), want)
    cut = [t.clone() for t in (q, k, v)]
    for t in cut:
        t[..., 32:] = 0
    out["tail dropped from the inputs"] = errors(reference(*cut, g), want)
    A.split_head = lambda d: (32, 0)  # the mutant: no tail block
    out["tail block dropped from the kernels"] = errors(run(q, k, v, g), want)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """{case: {"o" | "lse" | "dq" | "dk" | "dv": max abs error / max abs reference}} from the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU: bench/attention_split.py --check tests the compiled kernels")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300,
                         cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("RESULT")[-1])


def _worst(errors: dict) -> float:
    return max(errors.values())


@pytest.mark.parametrize("d", [40, 64, 80])
def test_fp32_matches_reference_attention(interpreted, d):
    errors = interpreted[f"{d} float32 contiguous"]
    assert _worst(errors) < 1e-5, errors  # fp32 dots in the interpreter: only summation order differs


@pytest.mark.parametrize("d", [40, 64, 80])
def test_half_precision_matches_reference_attention(interpreted, d):
    errors = interpreted[f"{d} float16 contiguous"]
    assert _worst(errors) < 3e-3, errors  # 16-bit O, P and dS round: ~4e-4 here


@pytest.mark.parametrize("case", ["40 float32 tokens_heads", "80 float32 odd_rows"])
def test_strided_inputs(interpreted, case):
    """q, k, v as diffusers gives them ([B, N, H, d] transposed), and rows whose strides are not multiples of
    8 (the kernels then take strides as they are, ALIGN 1)."""
    assert _worst(interpreted[case]) < 1e-5, interpreted[case]


def test_default_blocks_fit_64_tokens(interpreted):
    errors = interpreted["40 float16 default blocks at 64 tokens"]
    assert _worst(errors) < 3e-3, errors


def test_the_tail_block_is_used(interpreted):
    """Head 40 with large values in dimensions 32-39: right with the tail block, far off without it, whether
    the tail is dropped from the inputs or from the kernels (a mutant with no tail block)."""
    assert _worst(interpreted["tail"]) < 3e-3, interpreted["tail"]
    assert min(interpreted["tail dropped from the inputs"].values()) > 0.1, interpreted
    mutant = interpreted["tail block dropped from the kernels"]
    assert not max(mutant["o"], mutant["dq"], mutant["dk"], mutant["dv"]) < 0.1, mutant  # NaN counts as off


def test_head_split_and_blocks():
    from bench import attention_split as A

    assert [A.split_head(d) for d in (40, 48, 64, 80, 96, 120, 160)] == [
        (32, 16), (32, 16), (64, 0), (64, 16), (64, 32), (64, 64), (128, 32)]
    with pytest.raises(ValueError, match="head size 8"):
        A.split_head(8)
    assert A.fit(A.Config(128, 128, 8, 3), 64, 40, "forward") == A.Config(64, 64, 8, 3)
    assert A.fit(A.Config(128, 128, 8, 3), 256, 160, "forward") == A.Config(128, 128, 8, 2)  # smem
    assert A.candidates("forward", 64, 40) == [A.Config(64, 64, 4, 3), A.Config(64, 64, 8, 3)]
    q = torch.empty(1, 2, 100, 40)
    with pytest.raises(ValueError, match="100 tokens: must be a multiple of 64"):
        A.check_inputs(q, q, q)
    with pytest.raises(ValueError, match="dtypes"):
        A.check_inputs(q, q, q.double())


# ---- the bf16 kernels compiled for an H100 (sm_90), without one ----

HOPPER_SHARED = 227 * 1024  # the most shared memory one block may have on an H100
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
OPTIONS = ("num_warps", "num_stages")


def _build(fn, args: tuple, kwargs: dict):
    """Compile one recorded launch as Triton's launcher would: constexprs and integers equal to 1 as
    constants, pointers and integers divisible by 16 marked so (the kernels' vectorised loads)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    values = dict(zip(fn.arg_names, args, strict=False)) | {k: v for k, v in kwargs.items() if k not in OPTIONS}
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        v = values[name]
        if param.is_constexpr or (type(v) is int and v == 1):
            sig[name], consts[name] = "constexpr", v
            continue
        if isinstance(v, torch.Tensor):
            sig[name] = POINTER[v.dtype]
        elif type(v) is int:
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            sig[name] = "fp32"
        if isinstance(v, torch.Tensor) or (type(v) is int and v % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def test_bf16_kernels_build_for_hopper_at_sd15_shapes(monkeypatch):
    """Every config each kernel may be tuned to, at the benchmark's SD1.5 shapes (batch 1: the launches do not
    depend on it), compiles for sm_90 and fits its shared memory. The smallest (head 40) and the largest
    (head 160: 128 + 32) heads; head 80 builds the same blocks as 40 with a wider main part."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        pytest.skip(f"this Triton lacks the ahead-of-time build API: {e}")
    from bench import attention_split as A

    seen = {}

    def record(self, *args, grid, warmup, **kwargs):
        key = (self.__name__, tuple(sorted((k, v) for k, v in kwargs.items())))
        seen.setdefault(key, (self, args, kwargs))

    monkeypatch.setattr(JITFunction, "run", record)
    for n, d in ((4096, 40), (256, 160)):
        q = torch.empty(1, 8, n, d, device="meta", dtype=torch.bfloat16)
        lse = torch.empty(1, 8, n, device="meta", dtype=torch.float32)
        for c in A.candidates("forward", n, d):
            A.attention_forward(q, q, q, c)
        for keys, queries in zip(A.candidates("dkdv", n, d), A.candidates("dq", n, d), strict=False):
            A.attention_backward(q, q, q, q, lse, q, keys, queries)
    assert {key[0] for key in seen} == {"_forward", "_delta", "_dkdv", "_dq"}
    failures = []
    for (name, kw), (fn, args, kwargs) in seen.items():
        try:
            kernel = _build(fn, args, kwargs)
        except Exception as e:  # the message names the kernel and the configuration that failed
            failures.append(f"{name} {dict(kw)}: {type(e).__name__}: {str(e)[-400:]}")
            continue
        if kernel.metadata.shared > HOPPER_SHARED:
            failures.append(f"{name} {dict(kw)}: {kernel.metadata.shared} bytes of shared memory")
    assert not failures, "\n".join(failures)
