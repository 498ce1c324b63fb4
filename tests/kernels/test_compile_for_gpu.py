"""The kernels compile for a real GPU, not only run under the interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


# Where there is a GPU the suite compiles the kernels for it and runs them: this
# stand-in (358 variants, minutes with a cold cache) would only eat the GPU run's time.
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a GPU is here: the suite compiles and runs the kernels on it")
def test_every_kernel_variant_compiles_for_sm90():
    # A fresh process: this one imported triton with TRITON_INTERPRET=1.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert "0 variants failed" in proc.stdout


def test_the_check_catches_what_the_interpreter_lets_through(tmp_path):
    """A kernel whose variable changes shape across a runtime ``if`` runs under
    the interpreter but must fail the compile-only check."""
    kernel = tmp_path / "bad_kernel.py"
    kernel.write_text(
        "import triton\nimport triton.language as tl\n\n"
        "@triton.jit\n"
        "def bad(out_ptr, n, A: tl.constexpr, B: tl.constexpr):\n"
        "    pid = tl.program_id(0)\n"
        "    if pid < n:\n"
        "        acc = tl.zeros((A,), dtype=tl.float32)\n"
        "    else:\n"
        "        acc = tl.zeros((B,), dtype=tl.float32)\n"
        "    tl.store(out_ptr + pid, tl.sum(acc, axis=0))\n")
    driver = tmp_path / "run_bad.py"
    driver.write_text(
        "import sys, torch\n"
        f"sys.path[:0] = [{str(SCRIPT.parent)!r}, {str(tmp_path)!r}]\n"
        "import compile_for_gpu\n"
        "compile_for_gpu.install()\n"
        "from bad_kernel import bad\n"
        "bad[(2,)](torch.empty(2), 1, A=4, B=8)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(driver)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "CompilationError" in proc.stderr and "acc" in proc.stderr  # names the variable
    # and the interpreter runs the same kernel without complaint
    env["TRITON_INTERPRET"] = "1"
    driver.write_text(
        "import sys, torch\n"
        f"sys.path[:0] = [{str(tmp_path)!r}]\n"
        "from bad_kernel import bad\n"
        "out = torch.full((2,), -1.0)\n"
        "bad[(2,)](out, 1, A=4, B=8)\n"
        "assert out.tolist() == [0.0, 0.0]\n")
    proc = subprocess.run([sys.executable, str(driver)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
