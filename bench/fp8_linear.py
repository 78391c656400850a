"""Would fp8 products for the frozen base's linear layers shorten the SD1.5 batch-16 step? A bound, not a path
the trainer takes.

For each linear layer of the step (SD1.5 at 512 px, batch 16: the attention projections, the feed-forward
and the transformer's linear projections, with how many of each there are), it times the base's two
products that training runs, the forward (x W^T) and the input gradient (dy W; the weight is frozen, so
no weight gradient), in bf16, and in fp8 with what fp8 costs around them: each activation and gradient
scaled by its own absolute maximum and cast (e4m3 forward, e5m2 backward), the weight cast once ahead. It
prints one JSON line per shape (milliseconds, and the bf16 and fp8 results' errors relative to fp32
products of the same inputs) and the step's totals.

    python3 bench/fp8_linear.py            # on a GPU with fp8 products (sm_89 or newer)
    python3 bench/fp8_linear.py --check    # small shapes, errors only (runs on the CPU too)
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.attention import timed

# (tokens, in features, out features, layers of this shape in the step)
SD15_B16 = []
for tokens, c, n in ((16 * 4096, 320, 5), (16 * 1024, 640, 5), (16 * 256, 1280, 5), (16 * 64, 1280, 1)):
    # self-attention's q, k and v; to_out of both attentions, cross-attention's q, proj_in and proj_out;
    # the feed-forward's GEGLU projection and its output
    SD15_B16 += [(tokens, c, 3 * c, n), (tokens, c, c, 5 * n), (tokens, c, 8 * c, n), (tokens, 4 * c, c, n)]
    SD15_B16 += [(16 * 77, 768, 2 * c, n)]  # cross-attention's k and v of the text
F8_FWD, F8_BWD = torch.float8_e4m3fn, torch.float8_e5m2


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x scaled so that its largest magnitude is the format's largest, cast; and the scale to undo it."""
    scale = (x.abs().amax().float().clamp(min=1e-12) / torch.finfo(dtype).max)
    return (x / scale).to(dtype), scale


class Fp8Weight:
    """A frozen weight cast once, in the two layouts the products need (the second operand column-major)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.forward, self.scale = quantize(w, F8_FWD)  # (out, in): .t() is column-major (in, out)
        self.backward = self.forward.t().contiguous()  # (in, out): .t() is column-major (out, in)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x8, sx = quantize(x, F8_FWD)
        return torch._scaled_mm(x8, self.forward.t(), scale_a=sx, scale_b=self.scale, out_dtype=torch.bfloat16)

    def input_grad(self, dy: torch.Tensor) -> torch.Tensor:
        dy8, sdy = quantize(dy, F8_BWD)
        return torch._scaled_mm(dy8, self.backward.t(), scale_a=sdy, scale_b=self.scale, out_dtype=torch.bfloat16)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(((got.float() - want.float()).norm() / want.float().norm()).item(), 5)


def measure(tokens: int, k: int, n: int, device: str, timing: bool) -> dict:
    x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
    dy = torch.randn(tokens, n, device=device, dtype=torch.bfloat16) * 1e-3
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * k ** -0.5
    w8 = Fp8Weight(w)
    exact, exact_grad = F.linear(x.float(), w.float()), dy.float() @ w.float()
    row = {"shape": [tokens, k, n],  # errors relative to fp32 products of the same bf16 inputs
           "bf16_error": rel_error(F.linear(x, w), exact), "fp8_error": rel_error(w8.apply(x), exact),
           "bf16_grad_error": rel_error(dy @ w, exact_grad), "fp8_grad_error": rel_error(w8.input_grad(dy), exact_grad)}
    if timing:
        row["bf16_ms"] = round(timed(lambda: F.linear(x, w)) + timed(lambda: dy @ w), 4)
        row["fp8_ms"] = round(timed(lambda: w8.apply(x)) + timed(lambda: w8.input_grad(dy)), 4)
        row["fp8_products_only_ms"] = round(
            timed(lambda: torch._scaled_mm(x.to(F8_FWD), w8.forward.t(), scale_a=w8.scale, scale_b=w8.scale,
                                           out_dtype=torch.bfloat16))
            + timed(lambda: torch._scaled_mm(dy.to(F8_BWD), w8.backward.t(), scale_a=w8.scale, scale_b=w8.scale,
                                             out_dtype=torch.bfloat16)), 4)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="small shapes, errors only")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.check:
        for tokens, k, n in ((64, 32, 96), (48, 128, 32), (256, 320, 960), (256, 1280, 320)):
            print(json.dumps(measure(tokens, k, n, device, timing=False)), flush=True)
        return
    totals = {"bf16_ms": 0.0, "fp8_ms": 0.0, "fp8_products_only_ms": 0.0}
    for tokens, k, n, count in SD15_B16:
        row = measure(tokens, k, n, device, timing=True) | {"count": count, "device": torch.cuda.get_device_name()}
        for key in totals:
            totals[key] += count * row[key]
        print(json.dumps(row), flush=True)
    print(json.dumps({"step_totals_ms": {k: round(v, 3) for k, v in totals.items()}}), flush=True)


if __name__ == "__main__":
    main()
