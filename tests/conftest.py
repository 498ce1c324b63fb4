"""Shared test set-up.

Without a GPU the Triton kernels run under Triton's interpreter on CPU
tensors; TRITON_INTERPRET must be set before triton is first imported.
"""

import os
import sys

assert "triton" not in sys.modules, "triton was imported before tests/conftest.py"

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the kernels can only run under the interpreter (whatever the environment
# said); FASTVAE_BACKEND=triton routes CPU tensors to the kernels on a GPU machine too
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
elif os.environ.get("FASTVAE_BACKEND") == "triton":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_index_from_one_element_arrays():
    """Triton 3.6's interpreter converts a scalar kernel argument (a 1-element numpy
    array) to a Python int with int(array), which NumPy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars", triton-lang/triton#9171):
    every ``range(runtime_scalar)`` in a kernel then fails. Later Triton squeezes the
    array first; do the same here. Test set-up only, the compiled kernels never see it."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_fastvae_squeezes", False):
        return

    def patched(tensor, scope, _patch_tensor=patch_tensor):
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._fastvae_squeezes = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_index_from_one_element_arrays()

# CUDA cases are generated everywhere: without a GPU they show as skipped, with the reason.
# Marked "cuda": benchmarks/gpu_check.py runs them alone (-m cuda; the CPU cases run in CI)
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NEEDS_CUDA])]


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device: CPU always, CUDA where there is one (skipped elsewhere)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _backend_restored():
    """A test may force a backend (fastvae.set_backend); the next one starts from
    the setting this one found (FASTVAE_BACKEND's, unless a test changed it)."""
    from fastvae import _dispatch

    previous = _dispatch.forced_backend()
    yield
    _dispatch.set_backend(previous)


@pytest.fixture
def one_thread():
    """Tiny models: on shared cores, extra intra-op threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
