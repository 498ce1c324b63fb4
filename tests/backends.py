"""The backends a test on CPU tensors can run on in this process.

The Triton kernels take CPU tensors only under Triton's interpreter, which
tests/conftest.py turns on where there is no GPU (here and in CI). On a GPU
machine they run compiled, on CUDA tensors only: there the "triton" case of a
CPU-tensor test is skipped (with this reason), and the kernels' CUDA cases
(tests/kernels, device-parametrized) cover them.
"""

import os

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

NEEDS_INTERPRETER = pytest.mark.skipif(
    not INTERPRETED, reason="the kernels take CPU tensors only under Triton's interpreter (CI "
                            "runs it); on a GPU, tests/kernels runs them on CUDA tensors")

# for @pytest.mark.parametrize("backend", CPU_BACKENDS)
CPU_BACKENDS = ("torch", pytest.param("triton", marks=NEEDS_INTERPRETER))
