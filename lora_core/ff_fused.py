"""The transformer blocks' frozen feed-forward (GEGLU projection, then the output projection), with GEGLU's
backward in the epilogue of the output projection's input-gradient product (`performance.geglu_in_product`).

    h = x W1^T + b1 = [a | g],   y = a * gelu(g),   out = y W2^T + b2        (W1, b1, W2, b2 frozen)

Backward, autograd writes the output projection's input gradient dy = d_out W2 to memory (cuBLAS), and the
GEGLU kernel (lora_core/geglu.py) reads it back with h to write dh = [dy * gelu(g) | dy * a * gelu'(g)].
Here one Triton product computes each tile of dy in its fp32 accumulator and, in the same program, reads
that tile's a and g and writes dh: dy never reaches memory, two of the five passes over the [tokens, inner]
activation are saved and one kernel is gone. It takes layers whose model width (the product's inner
dimension) is at most lora_gemm.MAX_K, 320 and 640 in SD1.5, where this kind of kernel keeps up with
cuBLAS's; the forward is unchanged (cuBLAS, the GEGLU kernel, cuBLAS) and saves the same h. The same maths
as the separate kernels, with one rounding fewer (dy is not rounded to the half type).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn
from torch.autograd.function import once_differentiable

from . import geglu, kernel_builds, lora_gemm, low_rank
from .kernel_builds import launch
from .lora_fused import compute_dtype
from .nhwc_norm import on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the separate kernels' path runs
    triton = None

BLOCK_M, BLOCK_N, BLOCK_K, WARPS, STAGES, GROUP_M = 128, 64, 64, 4, 3, 8

_state = {"failed": False, "worked": False}

if triton is not None:

    @triton.jit
    def _dgeglu(DH, G, W, H, m, n, d, g_m, w_k, w_n,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # G [m, n] (unit column step), W [n, d], H and DH [m, 2d] contiguous; a tile of dy = G W, then of dh
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(m, BLOCK_M), tl.cdiv(d, BLOCK_N)
        first = (pid // (GROUP_M * tiles_n)) * GROUP_M
        rows_here = tl.minimum(tiles_m - first, GROUP_M)
        tile_m = first + (pid % (GROUP_M * tiles_n)) % rows_here
        tile_n = (pid % (GROUP_M * tiles_n)) // rows_here
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, cmask = rows < m, cols < d
        rows64 = rows.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, n, BLOCK_K):
            ks = (start + tl.arange(0, BLOCK_K)).to(tl.int64)
            kmask = ks < n
            a = tl.load(G + rows64[:, None] * g_m + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(W + ks[:, None] * w_k + cols[None, :] * w_n, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
        mask = rmask[:, None] & cmask[None, :]
        off = rows64[:, None] * (2 * d) + cols[None, :]
        value = tl.load(H + off, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(H + off + d, mask=mask, other=0.0).to(tl.float32)
        gelu, slope = geglu._gelu_parts(gate)
        tl.store(DH + off, (acc * gelu).to(DH.dtype.element_ty), mask=mask)
        tl.store(DH + off + d, (acc * value * slope).to(DH.dtype.element_ty), mask=mask)


def _launch(dh: torch.Tensor, g: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> None:
    (m, n), d = g.shape, w.shape[1]
    with on_device(h):
        launch(_dgeglu, (triton.cdiv(m, BLOCK_M) * triton.cdiv(d, BLOCK_N),), dh, g, w, h, m, n, d,
               g.stride(0), w.stride(0), w.stride(1),
               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, num_warps=WARPS, num_stages=STAGES)


def _ready(like: torch.Tensor) -> bool:
    def probe() -> None:
        t = torch.zeros(16, 16, device=like.device, dtype=like.dtype)
        _launch(torch.empty(16, 32, device=like.device, dtype=like.dtype), t, t, torch.zeros_like(t).repeat(1, 2))

    return kernel_builds.ready(_state, probe, "the GEGLU-in-product kernel does not run here, the separate "
                                              "kernels run instead")


def dgeglu(g: torch.Tensor, w: torch.Tensor, h: torch.Tensor, records: list | None = None) -> torch.Tensor | None:
    """dh for GEGLU's input h [m, 2d] from the output projection's output gradient g [m, n] and weight
    w [n, d] (W2 as nn.Linear keeps it), in one kernel; None where it does not run here."""
    with kernel_builds.noting(records):
        if not _ready(g):
            return None
        dh = torch.empty_like(h)
        _launch(dh, g, w, h)
    return dh


class _FeedForwardFn(torch.autograd.Function):
    """x [m, k] -> out [m, n], all in one half dtype, the four frozen tensors given no gradient."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)
        out = F.linear(geglu.forward_kernel(h), w2, b2)
        ctx.save_for_backward(h, w1, w2)
        ctx.records = kernel_builds.current()  # a dry run's: the backward's launches are noted there too
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, w1, w2 = ctx.saved_tensors
        g = grad.contiguous()
        dh = dgeglu(g, w2, h, ctx.records)
        if dh is None:  # Triton failed here: the separate kernels
            dh = geglu.backward_kernel(h, torch.mm(g, w2), ctx.records)
        return torch.mm(dh, w1), None, None, None, None


def _frozen_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and not any(p.requires_grad for p in m.parameters())


class FusedFeedForward(FeedForward):
    """diffusers' FeedForward taking `_FeedForwardFn` where `takes` says so; the parent's otherwise."""

    def takes(self, x: torch.Tensor) -> bool:
        """A training forward (gradients on, input needing one) of a GEGLU feed-forward with the fused GEGLU
        kernels (checked here: the parent's call checks them first), both projections plain and frozen, no
        active dropout, the one-kernel products switched on for `x` (low_rank_kernel gemm, a half-precision
        CUDA tensor in the compute dtype) and a model width of at most MAX_K."""
        net = self.net
        if not (torch.is_grad_enabled() and x.requires_grad and len(net) in (3, 4)):
            return False
        drops = [m for m in net if isinstance(m, nn.Dropout)]
        if len(drops) != len(net) - 2 or any(m.p > 0 and m.training for m in drops):
            return False
        act, out = net[0], net[2]
        return (type(act) is geglu.FusedGEGLU and _frozen_linear(act.proj) and _frozen_linear(out)
                and x.dtype == compute_dtype(x) and low_rank.wanted_gemm(x) and out.in_features % BLOCK_N == 0
                and out.out_features <= lora_gemm.MAX_K and geglu.available() and geglu.checked())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not self.takes(hidden_states):
            return super().forward(hidden_states, *args, **kwargs)
        dt = hidden_states.dtype
        proj, out = self.net[0].proj, self.net[2]
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights = [t if t is None else t.to(dt) for t in (proj.weight, proj.bias, out.weight, out.bias)]
        with torch.autocast(x.device.type, enabled=False):
            y = _FeedForwardFn.apply(x, *weights)
        return y.view(*hidden_states.shape[:-1], y.shape[-1])


def use_fused_feed_forward(model: nn.Module) -> int:
    """Give every diffusers FeedForward of `model` the fused GEGLU backward (FusedFeedForward); returns how
    many. Which calls take it is decided at each call (`FusedFeedForward.takes`)."""
    layers = [m for m in model.modules() if type(m) is FeedForward]
    for m in layers:
        m.__class__ = FusedFeedForward
    return len(layers)
