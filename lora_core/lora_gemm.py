"""A LoRA layer's base product and its adapter's low-rank product in one Triton matrix product
(`performance.low_rank_kernel=gemm`).

    out = a b + z c (+ bias)      a [m, k], b [k, n], z [m, R], c [R, n]; fp32 accumulator, one rounding

The hand-written LoRA functions (lora_core/lora_fused.py, grouped_lora.py) compute y = x W^T + b +
(s x D^T) U^T in the forward pass and dx = gy W + gz D in the backward pass. With cuBLAS that is the base
product, which writes the whole output, then a rank-16 product that reads and writes it again (addmm_; or
lora_core/low_rank.py's kernel). In an SD1.5 batch-16 step these are memory-bound shapes (65,536 rows by
320 columns, k = 320), so the second pass over the output costs about as much as the product itself. Here
the adapter's product joins the base's in the accumulator before the output is written, and the bias rides
along.

For a group of projections sharing one input (q, k and v), `member_n` is each member's width: the columns of
member i take z's columns i*R .. i*R + R - 1, and c holds every member's up weights side by side ([R, n]),
so one launch covers the group. A tile of columns never straddles two members (`applies` checks).
"""

from __future__ import annotations

import torch

from . import kernel_builds, low_rank
from .kernel_builds import launch
from .nhwc_norm import on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: cuBLAS's products run
    triton = None

# (BLOCK_M, BLOCK_K, warps, stages); BLOCK_N is 128 where the columns (and a member's) allow, else 64
BLOCK_M, BLOCK_K, WARPS, STAGES = 128, 64, 4, 3
GROUP_M = 8  # row tiles swept together, so that b's tiles stay in L2
MAX_RANK = 128
# The longest inner product (k) it takes. Up to 640 the base product is memory-bound and writing the output
# once pays (H100, bench/lora_gemm.py: 63 us against cuBLAS's 100 at 65,536 x 320 x 320); past it cuBLAS's
# main loop is faster than this kernel's and the saving is lost (45 against 34 us at 4,096 x 1,280 x 1,280,
# 136 against 75 at a group's backward, 4,096 x 3,840 x 1,280)
MAX_K = 640

_state = {"failed": False, "worked": False}


def block_n(member_n: int) -> int:
    """The tile's width: 128 where it divides the member's width (the whole output's for one layer), else
    64 (SD's 320 columns: five full tiles, not three with a third of one wasted)."""
    return 128 if member_n % 128 == 0 else 64


def _fits(a: torch.Tensor, b: torch.Tensor, z_width: int, c: torch.Tensor, member_n: int | None) -> bool:
    """The switch on and the kernel working, 2-D operands of one dtype with the shapes above (z `z_width`
    wide), k at most MAX_K, R at most MAX_RANK, and the members (if several) a whole number of tiles wide."""
    if not (low_rank.wanted_gemm(a) and not _state["failed"] and a.dim() == b.dim() == c.dim() == 2):
        return False
    k, n, r = a.shape[1], b.shape[1], c.shape[0]
    member_n = member_n or n
    return (
        a.dtype == b.dtype == c.dtype
        and k <= MAX_K
        and tuple(b.shape) == (k, n)
        and tuple(c.shape) == (r, n)
        and r <= MAX_RANK
        and n % member_n == 0
        and z_width == r * (n // member_n)
        and (member_n == n or member_n % block_n(member_n) == 0)
    )


def applies(a: torch.Tensor, b: torch.Tensor, z: torch.Tensor, c: torch.Tensor, member_n: int | None = None) -> bool:
    """Whether `linear` takes the call (`_fits`, with the kernel switched on by `low_rank.wanted`, mode gemm):
    z [m, R] in a's dtype with unit column steps."""
    return (z.dim() == 2 and z.shape[0] == a.shape[0] and z.dtype == a.dtype and z.stride(1) == 1
            and _fits(a, b, z.shape[1], c, member_n))


def applies_down(a: torch.Tensor, b: torch.Tensor, down: torch.Tensor, c: torch.Tensor,
                 member_n: int | None = None) -> bool:
    """Whether `linear_down` takes the call (`_fits`, with down [k, R] in a's dtype in place of z), for ranks
    up to half a tile's width: each tile recomputes its member's z, which adds rank / tile width to the
    product's work (at most half; rank 16 adds a quarter or an eighth), so larger ranks take `linear`."""
    if not (down.dim() == 2 and c.dim() == 2 and 2 * c.shape[0] <= block_n(member_n or b.shape[-1])):
        return False
    return down.shape[0] == a.shape[-1] and down.dtype == a.dtype and _fits(a, b, down.shape[1], c, member_n)


if triton is not None:

    @triton.jit
    def _gemm(
        OUT, A, B, Z, C, BIAS, DOWN,
        m, n, k, r, member_n, scale,
        a_m, a_k, b_k, b_n, z_m, c_r, c_n, d_k, d_r,
        HAS_BIAS: tl.constexpr, MAKE_Z: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # row tiles in groups of GROUP_M, each group swept column tile by column tile
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(m, BLOCK_M), tl.cdiv(n, BLOCK_N)
        first = (pid // (GROUP_M * tiles_n)) * GROUP_M
        rows_here = tl.minimum(tiles_m - first, GROUP_M)
        tile_m = first + (pid % (GROUP_M * tiles_n)) % rows_here
        tile_n = (pid % (GROUP_M * tiles_n)) // rows_here
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, cmask = rows < m, cols < n
        rows64 = rows.to(tl.int64)
        js = tl.arange(0, BLOCK_R)
        jmask = js < r
        first_z = (tile_n * BLOCK_N // member_n) * r  # this member's columns of z
        zmask = rmask[:, None] & jmask[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        z_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            ks = (start + tl.arange(0, BLOCK_K)).to(tl.int64)
            kmask = ks < k
            a = tl.load(A + rows64[:, None] * a_m + ks[None, :] * a_k, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(B + ks[:, None] * b_k + cols[None, :] * b_n, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            if MAKE_Z:  # the member's z = s a D, from the same tiles of a
                d = tl.load(DOWN + ks[:, None] * d_k + (first_z + js)[None, :] * d_r,
                            mask=kmask[:, None] & jmask[None, :], other=0.0)
                z_acc = tl.dot(a, d, z_acc)
        if MAKE_Z:
            z = (z_acc * scale).to(Z.dtype.element_ty)
            if (tile_n * BLOCK_N) % member_n == 0:  # the member's first tile writes its z
                tl.store(Z + rows64[:, None] * z_m + (first_z + js)[None, :], z, mask=zmask)
        else:
            z = tl.load(Z + rows64[:, None] * z_m + (first_z + js)[None, :], mask=zmask, other=0.0)
        c = tl.load(C + js[:, None] * c_r + cols[None, :] * c_n, mask=jmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(z, c, acc)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        out = OUT + rows64[:, None] * n + cols[None, :]
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _launch(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, z: torch.Tensor, c: torch.Tensor,
            bias: torch.Tensor | None, member_n: int, down: torch.Tensor | None = None, scale: float = 1.0) -> None:
    (m, k), n, r = a.shape, b.shape[1], c.shape[0]
    bn = block_n(member_n)
    with on_device(out):
        launch(
            _gemm,
            (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, bn),),
            out, a, b, z, c, bias if bias is not None else out, down if down is not None else out,
            m, n, k, r, member_n, scale,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), z.stride(0), c.stride(0), c.stride(1),
            *(down.stride() if down is not None else (0, 0)),
            HAS_BIAS=bias is not None, MAKE_Z=down is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=BLOCK_K, BLOCK_R=max(16, triton.next_power_of_2(r)),
            GROUP_M=GROUP_M,
            num_warps=WARPS, num_stages=STAGES,
        )


def _ready(like: torch.Tensor) -> bool:
    """Whether the kernel runs on this machine (`kernel_builds.ready`, probing on `like`'s device and dtype)."""

    def probe() -> None:
        t = torch.zeros(16, 16, device=like.device, dtype=like.dtype)
        _launch(torch.empty_like(t), t, t, t, t, t[0], 16)

    return kernel_builds.ready(_state, probe, "the LoRA product kernel does not run here, cuBLAS's products run instead")


def _usable(a: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (bias is None or (bias.dtype == a.dtype and bias.is_contiguous())) and _ready(a)


def linear(a: torch.Tensor, b: torch.Tensor, z: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None,
           member_n: int | None = None, records: list | None = None) -> torch.Tensor | None:
    """a b + z c (+ bias) as a new [m, n] tensor, or None where the kernel does not run here (the caller
    then computes it with cuBLAS); only for calls `applies` takes. `records`: a dry run's list, as in
    `low_rank.add_`."""
    with kernel_builds.noting(records):
        if not _usable(a, bias):
            return None
        out = a.new_empty(a.shape[0], b.shape[1])
        _launch(out, a, b, z, c, bias, member_n or b.shape[1])
    return out


def linear_down(a: torch.Tensor, b: torch.Tensor, down: torch.Tensor, c: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None, member_n: int | None = None, records: list | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a b + z c (+ bias), z) with z = scale a down computed in the same kernel from the same tiles of a
    (rounded to a's dtype before its product with c, as when it comes from its own product), or None where
    the kernel does not run here; only for calls `applies_down` takes."""
    with kernel_builds.noting(records):
        if not _usable(a, bias):
            return None
        out, z = a.new_empty(a.shape[0], b.shape[1]), a.new_empty(a.shape[0], down.shape[1])
        _launch(out, a, b, z, c, bias, member_n or b.shape[1], down, scale)
    return out, z
