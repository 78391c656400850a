"""Running a Triton kernel check in Triton's interpreter, on the CPU, in a subprocess (the interpreter is
chosen when Triton is imported). The script prints "worst" and its error figures last."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# on a GPU the compiled kernels are tested instead (older Triton interpreters fail on NumPy 2)
cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the compiled kernels are tested instead"
)


def worst_errors(script: str) -> list[float]:
    """Run `script` with the kernels interpreted; the figures it printed after "worst"."""
    pytest.importorskip("triton")
    here = os.path.dirname(os.path.abspath(__file__))  # this module, for the scripts' shared checks
    path = os.pathsep.join(filter(None, [os.getcwd(), here, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [float(v) for v in out.stdout.split("worst")[-1].split()]


def lora_functions_worst_error(mode: str, width: int = 16, rank: int = 4, rows: int = 30, inputs: int = 24,
                               device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """The single and grouped LoRA functions' outputs and every gradient with `performance.low_rank_kernel =
    mode` against cuBLAS's path, as the largest relative error (in a script run by `worst_errors`, or on a
    GPU). `width`: a layer's output width (the single layer's is twice it, a group has three such members);
    `rank`: the adapters'; activations and frozen weights in `dtype`, the adapters' weights in fp32."""
    from lora_core import low_rank
    from lora_core.grouped_lora import _GroupedLoRAFn
    from lora_core.lora_fused import _LoRALinearFn

    def randn(*shape: int, grad: bool = False, half: bool = True) -> torch.Tensor:
        t = torch.randn(*shape, device=device, dtype=dtype if half else torch.float32)
        return t.requires_grad_(grad)

    x = randn(rows, inputs, grad=True)
    w, b, ws = randn(2 * width, inputs) / inputs**0.5, randn(2 * width), randn(3 * width, inputs) / inputs**0.5
    d, u = randn(rank, inputs, grad=True, half=False), randn(2 * width, rank, grad=True, half=False)
    ps = [randn(rank, inputs, grad=True, half=False) for _ in range(3)]
    ps += [randn(width, rank, grad=True, half=False) for _ in range(3)]
    g, gg = randn(rows, 2 * width), randn(rows, 3 * width)
    results = []
    for m in (mode, "off"):
        low_rank.enable(m)
        y = _LoRALinearFn.apply(x, w, b, d, u, 0.5, None, None)
        yg = _GroupedLoRAFn.apply(x, ws, 0.5, [p.detach() for p in ps], *ps)
        results.append([y, *torch.autograd.grad(y, [x, d, u], g), yg, *torch.autograd.grad(yg, [x, *ps], gg)])
    low_rank.enable("off")
    return max(((a.double() - r.double()).abs().max() / r.double().abs().max()).item()
               for a, r in zip(*results, strict=True))
