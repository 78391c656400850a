"""Does a flash attention that pads SD1.5's head size 40 only to 48 beat cuDNN's, which pads it to 64?

SD1.5's UNet attention at 64x64 latents is 8 heads of size 40 over 4096 tokens; cuDNN's fused kernels
(64x64x64 tiles) pad the head to 64, so ~37% of their arithmetic is zeros. Triton's blocks are powers of
2, so here the head is split into a "main" block (the largest power of 2 <= d) and a "tail" block (a
power of 2 >= 16 covering the rest, its extra columns masked to zero): 40 = 32 + 16 (8 of 16 used),
80 = 64 + 16, 160 = 128 + 32, 64 = 64 + none. Every product over the head dimension is two dots,

    S = q[:, :32] k[:, :32]^T + q[:, 32:48] k[:, 32:48]^T

and everything with a head dimension (O, dQ, dK, dV and their accumulators) is kept as a main and a
tail part. Non-causal, unmasked, softmax scale 1/sqrt(d), inputs [batch, heads, tokens, head] in any
strides (head dimension contiguous, else copied), bf16/fp16 (fp32 too, for tests: on a GPU its dots
are TF32), fp32 accumulation; tokens a multiple of 64 (SD1.5: 4096, 1024, 256, 64).

Kernels (flash attention 2's structure):
- `_forward`: one program per (query block, batch x head); an online softmax over key blocks in base 2
  (the scale times log2(e) folded into one multiply); writes O and each row's natural-log logsumexp.
- `_delta`: delta = rowsum(dO * O) in fp32, the softmax backward's row term.
- `_dkdv`: one program per key block, streaming the query blocks: recomputes P^T from q, k and the
  logsumexp, dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T q.
- `_dq`: one program per query block, streaming the key blocks: recomputes P, dQ += dS k.
dQ gets its own kernel rather than fp32 atomic adds from `_dkdv`: deterministic, no fp32 dQ buffer to
zero and convert, and no contention (at 4096 tokens and 64-key blocks, 64 programs would add into every
dQ row). The price is recomputing S and dP there (7 matrix products instead of 5); which is the better
trade at head size 40 is part of what this measures.

Block sizes are tuned at the first call of each (kernel, tokens, head size, batch x heads) on a GPU over
the small lists FORWARD, KEYS and QUERIES (each config costs a compile); elsewhere the first is used.
Pointer-based loads: the batch, head and token strides are passed divided by ALIGN (8 where they all
allow it) and multiplied back in the kernel, so Triton knows rows start 16-byte aligned (it only
specialises integers divisible by 16, and a row of 40 bf16 is 80 bytes) and vectorises the loads.

    python3 bench/attention_split.py [--check] [--shapes 16x8x4096x40 ...] [--no-tune]

First checks O, dQ, dK, dV against PyTorch's fp32 math attention (on the same bf16 inputs, batch 2) for
each head size, this kernel's and cuDNN's errors side by side (with --check: only that). Then times
forward and forward + backward of cuDNN, flash and this kernel per shape, and cuDNN at head sizes 40,
48 and 64 (does 40 cost what 64 costs?). One JSON line per row; TFLOP/s counted on the unpadded head
size (forward 4*B*H*N*N*d, backward 2.5 times that).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from bench.attention import timed  # milliseconds per call by CUDA events, after a warm-up

log = logging.getLogger("bench.attention_split")

LOG2E = tl.constexpr(1.4426950408889634)  # kernels read only constexpr globals
LN2 = tl.constexpr(0.6931471805599453)
TOKEN_MULTIPLE = 64
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Config(NamedTuple):
    block_m: int  # query rows per block
    block_n: int  # key rows per block
    warps: int
    stages: int


# _forward and _dq: a program holds BLOCK_M queries and streams keys; _dkdv holds BLOCK_N keys and streams
# queries. The first of each list is the untuned default.
FORWARD = [Config(128, 64, 4, 3), Config(128, 128, 8, 3), Config(64, 64, 4, 3)]
KEYS = [Config(64, 128, 8, 3), Config(32, 128, 4, 3), Config(64, 64, 4, 3)]
QUERIES = [Config(128, 64, 8, 3), Config(128, 32, 4, 3), Config(64, 64, 4, 3)]
CONFIGS = {"forward": FORWARD, "dkdv": KEYS, "dq": QUERIES}
SHARED_BUDGET = 200 * 1024  # bytes of tiles a block may keep in shared memory (an H100 has 227 KiB)
DELTA_BLOCK = 128
TUNE = True  # on a GPU, time each list's configs at a new shape's first call and keep the fastest
TUNE_MS = (5, 25)  # do_bench's warm-up and timing per config, milliseconds

_best: dict[tuple, Config] = {}  # (kernel, tokens, head, batch x heads) -> tuned config


def split_head(d: int) -> tuple[int, int]:
    """(main, tail) block widths for head size `d`: main the largest power of 2 <= d, tail the smallest
    power of 2 >= 16 covering the rest (0: none). 40 -> (32, 16); 80 -> (64, 16); 64 -> (64, 0)."""
    if d < 16:
        raise ValueError(f"head size {d} < 16: too small for the dot products' blocks")
    main = 1 << (d.bit_length() - 1)
    rest = d - main
    return main, 0 if rest == 0 else max(16, triton.next_power_of_2(rest))


def fit(c: Config, n: int, d: int, kernel: str) -> Config:
    """`c` for `n` tokens of head size `d` in `kernel` ("forward", "dkdv" or "dq"): each block halved until it
    divides `n` (a multiple of 64: 64 tokens take 64-row blocks), and the pipeline's stages cut until the
    tiles fit SHARED_BUDGET (a 128 x 160 key and value tile at 3 stages does not fit an H100's 227 KiB)."""
    bm, bn = c.block_m, c.block_n
    while n % bm:
        bm //= 2
    while n % bn:
        bn //= 2
    main, tail = split_head(d)
    row = 2 * (main + tail)  # bytes of a 16-bit row, padded
    held, streamed = (bn, bm) if kernel == "dkdv" else (bm, bn)
    resident = held * row * (1 if kernel == "forward" else 2)  # q; k and v; q and dO
    stages = c.stages
    while stages > 1 and resident + stages * 2 * streamed * row > SHARED_BUDGET:  # two tiles a stage
        stages -= 1
    return Config(bm, bn, c.warps, stages)


def candidates(kernel: str, n: int, d: int) -> list[Config]:
    """The distinct configs `kernel` may take at `n` tokens of head size `d` (its list, fitted), in order."""
    return list(dict.fromkeys(fit(c, n, d, kernel) for c in CONFIGS[kernel]))


@triton.jit
def _head(bh, H, s_b, s_h, ALIGN: tl.constexpr):
    """Offset of batch x head `bh`'s [tokens, head] matrix (strides in units of ALIGN elements)."""
    return (bh // H).to(tl.int64) * s_b * ALIGN + (bh % H).to(tl.int64) * s_h * ALIGN


@triton.jit
def _load(base, rows, s_n, COL0: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr):
    """The [rows, WIDTH] block of columns COL0.. of the [tokens, D] matrix at `base`; zero past column D."""
    cols = COL0 + tl.arange(0, WIDTH)
    ptrs = base + rows[:, None] * s_n + cols[None, :]
    if COL0 + WIDTH > D:
        x = tl.load(ptrs, mask=cols[None, :] < D, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store(base, rows, s_n, x, COL0: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr):
    """Store `x` [rows, WIDTH] as columns COL0.. of the [tokens, D] matrix at `base`, none past column D."""
    cols = COL0 + tl.arange(0, WIDTH)
    ptrs = base + rows[:, None] * s_n + cols[None, :]
    x = x.to(base.dtype.element_ty)
    if COL0 + WIDTH > D:
        tl.store(ptrs, x, mask=cols[None, :] < D)
    else:
        tl.store(ptrs, x)


@triton.jit
def _forward(Q, K, V, OUT, LSE, sm_scale, H, N, q_b, q_h, q_n, k_b, k_h, k_n, v_b, v_h, v_n, o_b, o_h, o_n,
             D: tl.constexpr, DM: tl.constexpr, DT: tl.constexpr, HAS_TAIL: tl.constexpr,
             ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q, k, v = Q + _head(bh, H, q_b, q_h, ALIGN), K + _head(bh, H, k_b, k_h, ALIGN), V + _head(bh, H, v_b, v_h, ALIGN)
    q_n, k_n, v_n = q_n * ALIGN, k_n * ALIGN, v_n * ALIGN
    qk_scale = sm_scale * LOG2E  # scores in base 2: exp(x * scale) = exp2(x * qk_scale)
    q_m = _load(q, rows, q_n, 0, DM, D)
    if HAS_TAIL:
        q_t = _load(q, rows, q_n, DM, DT, D)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)  # running row max of the base-2 scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(score - m_i)
    acc_m = tl.zeros([BLOCK_M, DM], tl.float32)
    acc_t = tl.zeros([BLOCK_M, DT], tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        s = tl.dot(q_m, tl.trans(_load(k, keys, k_n, 0, DM, D)))
        if HAS_TAIL:
            s = tl.dot(q_t, tl.trans(_load(k, keys, k_n, DM, DT, D)), s)
        s = s * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max (0 at the first block)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(Q.dtype.element_ty)
        acc_m = tl.dot(p, _load(v, keys, v_n, 0, DM, D), acc_m * alpha[:, None])
        if HAS_TAIL:
            acc_t = tl.dot(p, _load(v, keys, v_n, DM, DT, D), acc_t * alpha[:, None])
        m_i = m_new
    o = OUT + _head(bh, H, o_b, o_h, ALIGN)
    _store(o, rows, o_n * ALIGN, acc_m / l_i[:, None], 0, DM, D)
    if HAS_TAIL:
        _store(o, rows, o_n * ALIGN, acc_t / l_i[:, None], DM, DT, D)
    tl.store(LSE + bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) * LN2)


@triton.jit
def _delta(OUT, DO, DELTA, H, N, o_b, o_h, o_n, g_b, g_h, g_n, D: tl.constexpr, DM: tl.constexpr,
           DT: tl.constexpr, HAS_TAIL: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o, g = OUT + _head(bh, H, o_b, o_h, ALIGN), DO + _head(bh, H, g_b, g_h, ALIGN)
    o_n, g_n = o_n * ALIGN, g_n * ALIGN
    d = tl.sum(_load(o, rows, o_n, 0, DM, D).to(tl.float32) * _load(g, rows, g_n, 0, DM, D).to(tl.float32), 1)
    if HAS_TAIL:
        d += tl.sum(_load(o, rows, o_n, DM, DT, D).to(tl.float32) * _load(g, rows, g_n, DM, DT, D).to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, d)


@triton.jit
def _dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, H, N, q_b, q_h, q_n, k_b, k_h, k_n, v_b, v_h, v_n,
          g_b, g_h, g_n, dk_b, dk_h, dk_n, dv_b, dv_h, dv_n, D: tl.constexpr, DM: tl.constexpr,
          DT: tl.constexpr, HAS_TAIL: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    q, g = Q + _head(bh, H, q_b, q_h, ALIGN), DO + _head(bh, H, g_b, g_h, ALIGN)
    k, v = K + _head(bh, H, k_b, k_h, ALIGN), V + _head(bh, H, v_b, v_h, ALIGN)
    q_n, g_n = q_n * ALIGN, g_n * ALIGN
    stats = bh.to(tl.int64) * N
    qk_scale = sm_scale * LOG2E
    k_m, v_m = _load(k, keys, k_n * ALIGN, 0, DM, D), _load(v, keys, v_n * ALIGN, 0, DM, D)
    if HAS_TAIL:
        k_t, v_t = _load(k, keys, k_n * ALIGN, DM, DT, D), _load(v, keys, v_n * ALIGN, DM, DT, D)
    dk_m = tl.zeros([BLOCK_N, DM], tl.float32)
    dv_m = tl.zeros([BLOCK_N, DM], tl.float32)
    dk_t = tl.zeros([BLOCK_N, DT], tl.float32)
    dv_t = tl.zeros([BLOCK_N, DT], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q_m, g_m = _load(q, rows, q_n, 0, DM, D), _load(g, rows, g_n, 0, DM, D)
        s_t = tl.dot(k_m, tl.trans(q_m))  # [keys, queries]: S transposed, so no P transpose is needed
        dp_t = tl.dot(v_m, tl.trans(g_m))
        if HAS_TAIL:
            q_t, g_t = _load(q, rows, q_n, DM, DT, D), _load(g, rows, g_n, DM, DT, D)
            s_t = tl.dot(k_t, tl.trans(q_t), s_t)
            dp_t = tl.dot(v_t, tl.trans(g_t), dp_t)
        lse = tl.load(LSE + stats + rows) * LOG2E
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        ds_t = (p_t * (dp_t - tl.load(DELTA + stats + rows)[None, :])).to(Q.dtype.element_ty)
        p_t = p_t.to(Q.dtype.element_ty)
        dv_m = tl.dot(p_t, g_m, dv_m)
        dk_m = tl.dot(ds_t, q_m, dk_m)
        if HAS_TAIL:
            dv_t = tl.dot(p_t, g_t, dv_t)
            dk_t = tl.dot(ds_t, q_t, dk_t)
    dk, dv = DK + _head(bh, H, dk_b, dk_h, ALIGN), DV + _head(bh, H, dv_b, dv_h, ALIGN)
    _store(dk, keys, dk_n * ALIGN, dk_m * sm_scale, 0, DM, D)
    _store(dv, keys, dv_n * ALIGN, dv_m, 0, DM, D)
    if HAS_TAIL:
        _store(dk, keys, dk_n * ALIGN, dk_t * sm_scale, DM, DT, D)
        _store(dv, keys, dv_n * ALIGN, dv_t, DM, DT, D)


@triton.jit
def _dq(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, H, N, q_b, q_h, q_n, k_b, k_h, k_n, v_b, v_h, v_n,
        g_b, g_h, g_n, dq_b, dq_h, dq_n, D: tl.constexpr, DM: tl.constexpr, DT: tl.constexpr,
        HAS_TAIL: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q, g = Q + _head(bh, H, q_b, q_h, ALIGN), DO + _head(bh, H, g_b, g_h, ALIGN)
    k, v = K + _head(bh, H, k_b, k_h, ALIGN), V + _head(bh, H, v_b, v_h, ALIGN)
    k_n, v_n = k_n * ALIGN, v_n * ALIGN
    qk_scale = sm_scale * LOG2E
    q_m, g_m = _load(q, rows, q_n * ALIGN, 0, DM, D), _load(g, rows, g_n * ALIGN, 0, DM, D)
    if HAS_TAIL:
        q_t, g_t = _load(q, rows, q_n * ALIGN, DM, DT, D), _load(g, rows, g_n * ALIGN, DM, DT, D)
    lse = tl.load(LSE + bh.to(tl.int64) * N + rows) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * N + rows)
    dq_m = tl.zeros([BLOCK_M, DM], tl.float32)
    dq_t = tl.zeros([BLOCK_M, DT], tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_m = _load(k, keys, k_n, 0, DM, D)
        s = tl.dot(q_m, tl.trans(k_m))
        dp = tl.dot(g_m, tl.trans(_load(v, keys, v_n, 0, DM, D)))
        if HAS_TAIL:
            k_t = _load(k, keys, k_n, DM, DT, D)
            s = tl.dot(q_t, tl.trans(k_t), s)
            dp = tl.dot(g_t, tl.trans(_load(v, keys, v_n, DM, DT, D)), dp)
        p = tl.exp2(s * qk_scale - lse[:, None])
        ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
        dq_m = tl.dot(ds, k_m, dq_m)
        if HAS_TAIL:
            dq_t = tl.dot(ds, k_t, dq_t)
    dq = DQ + _head(bh, H, dq_b, dq_h, ALIGN)
    _store(dq, rows, dq_n * ALIGN, dq_m * sm_scale, 0, DM, D)
    if HAS_TAIL:
        _store(dq, rows, dq_n * ALIGN, dq_t * sm_scale, DM, DT, D)


def _align(*tensors: torch.Tensor) -> int:
    """8 if every batch, head and token stride is a multiple of 8 elements (rows 16-byte aligned in bf16)."""
    return 8 if all(s % 8 == 0 for t in tensors for s in t.stride()[:3]) else 1


def _strides(align: int, *tensors: torch.Tensor) -> list[int]:
    return [s // align for t in tensors for s in t.stride()[:3]]


def _sizes(q: torch.Tensor, align: int) -> dict:
    d = q.shape[-1]
    main, tail = split_head(d)
    return dict(D=d, DM=main, DT=tail or 16, HAS_TAIL=tail > 0, ALIGN=align)


def _on_device(t: torch.Tensor) -> torch.cuda.device:
    """Triton launches on the current device: make it `t`'s (a no-op off CUDA)."""
    return torch.cuda.device(t.device.index if t.is_cuda else -1)


def _choose(kernel: str, q: torch.Tensor, run: Callable[[Config], None]) -> Config:
    """The config `run` takes at `q`'s shape: the fastest of `kernel`'s candidates on a GPU with TUNE, timed
    once per shape; else the first."""
    b, h, n, d = q.shape
    fitted = candidates(kernel, n, d)
    if not (TUNE and q.is_cuda and len(fitted) > 1):
        return fitted[0]
    key = (kernel, n, d, b * h)
    if key not in _best:
        ms = {}
        for c in fitted:
            try:
                ms[c] = do_bench(lambda c=c: run(c), warmup=TUNE_MS[0], rep=TUNE_MS[1])
            except OutOfResources as e:
                log.warning("%s %s does not fit: %s", kernel, c, e)
        _best[key] = min(ms, key=ms.get)
        log.info("%s at %s: %s", kernel, key[1:], {tuple(c): round(t, 3) for c, t in ms.items()})
    return _best[key]


def chosen() -> dict[str, str]:
    """The tuned configs so far, for the record: {"kernel tokens head bh": "block_m x block_n, w warps, s"}."""
    return {" ".join(map(str, k)): f"{c.block_m}x{c.block_n} w{c.warps} s{c.stages}" for k, c in _best.items()}


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q, k, v are alike [batch, heads, tokens, head] of a supported dtype."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [batch, heads, tokens, head] shape: {q.shape}, {k.shape}, {v.shape}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: one of {DTYPES} for all three")
    if q.shape[2] % TOKEN_MULTIPLE:
        raise ValueError(f"{q.shape[2]} tokens: must be a multiple of {TOKEN_MULTIPLE} (no row masking)")
    split_head(q.shape[3])


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """`t` with a contiguous head dimension (the kernels' loads assume it)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, logsumexp [batch, heads, tokens] fp32) of softmax(q k^T / sqrt(d)) v; `config` or the tuned one."""
    check_inputs(q, k, v)
    q, k, v = (_unit_last(t) for t in (q, k, v))
    b, h, n, d = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    align = _align(q, k, v, o)

    def run(c: Config) -> None:
        _forward[(n // c.block_m, b * h)](
            q, k, v, o, lse, 1 / math.sqrt(d), h, n, *_strides(align, q, k, v, o), **_sizes(q, align),
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.warps, num_stages=c.stages)

    with _on_device(q):
        run(fit(config, n, d, "forward") if config else _choose("forward", q, run))
    return o, lse


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                       do: torch.Tensor, keys: Config | None = None,
                       queries: Config | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) given the forward's O and logsumexp and the output's gradient `do`; `keys` (the dK/dV
    kernel's) and `queries` (the dQ kernel's) configs, or the tuned ones."""
    q, k, v, o, do = (_unit_last(t) for t in (q, k, v, o, do))
    b, h, n, d = q.shape
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    delta = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    align = _align(q, k, v, o, do, dq, dk, dv)
    sizes, scale = _sizes(q, align), 1 / math.sqrt(d)

    def run_dkdv(c: Config) -> None:
        _dkdv[(n // c.block_n, b * h)](
            q, k, v, do, lse, delta, dk, dv, scale, h, n, *_strides(align, q, k, v, do, dk, dv), **sizes,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.warps, num_stages=c.stages)

    def run_dq(c: Config) -> None:
        _dq[(n // c.block_m, b * h)](
            q, k, v, do, lse, delta, dq, scale, h, n, *_strides(align, q, k, v, do, dq), **sizes,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.warps, num_stages=c.stages)

    with _on_device(q):
        block = min(DELTA_BLOCK, n)
        _delta[(n // block, b * h)](o, do, delta, h, n, *_strides(align, o, do), **sizes, BLOCK_M=block,
                                    num_warps=4)
        run_dkdv(fit(keys, n, d, "dkdv") if keys else _choose("dkdv", q, run_dkdv))
        run_dq(fit(queries, n, d, "dq") if queries else _choose("dq", q, run_dq))
    return dq, dk, dv


class SplitAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v by the split-head kernels, forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = attention_forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        return attention_backward(*ctx.saved_tensors, do)


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v) (no mask, not causal, default scale) by these kernels."""
    return SplitAttention.apply(q, k, v)


# ---- the benchmark ----

SD15_SHAPES = ["16x8x4096x40", "16x8x1024x80", "16x8x256x160", "1x8x4096x40"]
PADDING_HEADS = [40, 48, 64]  # cuDNN alone at (16, 8, 4096): does head 40 cost what 64 does?
CHECK_BATCH = 2


def _sdpa(backend: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return call


IMPLS = {"cudnn": _sdpa("CUDNN_ATTENTION"), "flash": _sdpa("FLASH_ATTENTION"), "split": split_attention}


def _inputs(shape: tuple[int, ...], grad: bool) -> tuple[torch.Tensor, ...]:
    q, k, v, g = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    return q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad), g


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(((got.float() - want).abs().max() / want.abs().max()).item(), 5)


def check(shape: tuple[int, ...]) -> dict:
    """Max abs error relative to the reference's magnitude of O, dQ, dK, dV, this kernel's and cuDNN's, against
    PyTorch's fp32 math attention on the same bf16 inputs (batch CHECK_BATCH of `shape`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, g = _inputs((CHECK_BATCH, *shape[1:]), True)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.nn.functional.scaled_dot_product_attention(*ref_in)
    want = [ref, *torch.autograd.grad(ref, ref_in, g.float())]
    row = {}
    for impl in ("split", "cudnn"):
        try:
            out = IMPLS[impl](q, k, v)
            got = [out, *torch.autograd.grad(out, (q, k, v), g)]
        except RuntimeError as e:  # cuDNN refusing a shape is a finding; our kernel failing is not
            if impl == "split":
                raise
            log.warning("%s at %s: %s", impl, shape, e)
            continue
        row[impl] = dict(zip(["o", "dq", "dk", "dv"], map(_error, got, want), strict=True))
    return dict(shape=[CHECK_BATCH, *shape[1:]], check=row)


def measure(shape: tuple[int, ...], impl: str) -> dict:
    """One JSON row: forward (no grad) and forward + backward milliseconds and TFLOP/s of `impl`."""
    b, h, n, d = shape
    fn = IMPLS[impl]
    q, k, v, g = _inputs(shape, True)
    try:
        with torch.no_grad():
            fwd = timed(lambda: fn(q, k, v))
        both = timed(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), g))
    except RuntimeError as e:  # a backend that refuses the shape
        log.warning("%s at %s: %s", impl, shape, e)
        return dict(shape=list(shape), impl=impl, refused=str(e)[:120])
    flops = 4 * b * h * n * n * d
    return dict(shape=list(shape), impl=impl, fwd_ms=round(fwd, 4), fwd_bwd_ms=round(both, 4),
                fwd_tflops=round(flops / fwd / 1e9, 1), fwd_bwd_tflops=round(3.5 * flops / both / 1e9, 1))


def _shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(x) for x in text.lower().split("x"))
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: want BATCHxHEADSxTOKENSxHEAD, e.g. 16x8x4096x40")
    return shape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check correctness, no timings")
    p.add_argument("--shapes", nargs="+", type=_shape, default=[_shape(s) for s in SD15_SHAPES])
    p.add_argument("--no-tune", action="store_true", help="each kernel's first config, no tuning")
    a = p.parse_args()
    global TUNE
    TUNE = not a.no_tune
    torch.set_float32_matmul_precision("highest")  # the fp32 reference: no TF32
    device = torch.cuda.get_device_name()
    failed = False
    for d in dict.fromkeys(s[3] for s in a.shapes):
        row = check(next(s for s in a.shapes if s[3] == d))
        print(json.dumps(dict(row, device=device)), flush=True)
        cudnn = max(row["check"].get("cudnn", {}).values(), default=0.0)
        if not max(row["check"]["split"].values()) <= 2 * max(cudnn, 1e-2):  # NaN fails too
            log.error("head %d: the split kernel is off by more than twice cuDNN's error", d)
            failed = True
    if not a.check:
        for shape in a.shapes:
            for impl in IMPLS:
                print(json.dumps(dict(measure(shape, impl), device=device)), flush=True)
        for d in PADDING_HEADS:
            print(json.dumps(dict(measure((16, 8, 4096, d), "cudnn"), device=device, padding_test=True)), flush=True)
        log.info("configs chosen: %s", chosen())
    if failed:
        raise SystemExit("the split kernel's results are wrong: see the check rows")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
