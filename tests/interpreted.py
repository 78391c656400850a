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
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [float(v) for v in out.stdout.split("worst")[-1].split()]
