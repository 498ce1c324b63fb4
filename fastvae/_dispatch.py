"""The one place that decides which implementation runs.

CUDA tensors go to the Triton kernels when Triton imports; everything else
(CPU, MPS, float64, no Triton) takes the PyTorch path. ``FASTVAE_BACKEND``
forces a choice: ``torch`` or ``triton`` (Triton on CPU tensors needs
``TRITON_INTERPRET=1`` set before Triton is first imported; that is how CI runs
the kernels without a GPU).
"""

import functools
import importlib.util
import os

from fastvae import _torch_impl

BACKENDS = ("torch", "triton")


@functools.cache
def triton_available():
    return importlib.util.find_spec("triton") is not None


def _forced_backend():
    forced = os.environ.get("FASTVAE_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"FASTVAE_BACKEND must be 'torch' or 'triton', got {forced!r}")
    return forced or None


def backend_for(*tensors):
    """'triton' or 'torch' for an op on these tensors."""
    return _choose(_forced_backend(), tensors)


def backend_for_each(tensors):
    """``backend_for(t)`` for each tensor, reading the environment once."""
    forced = _forced_backend()
    return [_choose(forced, (t,)) for t in tensors]


def _choose(forced, tensors):
    if any(t.dtype.itemsize > 4 for t in tensors):  # float64: the PyTorch path only
        return "torch"
    if forced is not None:
        if forced == "triton" and not triton_available():
            raise RuntimeError("FASTVAE_BACKEND=triton but triton is not installed")
        return forced
    if tensors[0].device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def implementation(*tensors):
    """The module whose functions implement the ops for these tensors: the
    PyTorch path (``fastvae._torch_impl``) or the kernels (``fastvae.kernels``),
    which expose the same function names and signatures."""
    if backend_for(*tensors) == "triton":
        from fastvae import kernels

        if kernels.AVAILABLE:
            return kernels
        if _forced_backend() == "triton":
            raise RuntimeError("FASTVAE_BACKEND=triton but fastvae.kernels could not import triton")
    return _torch_impl


def implementation_named(backend):
    """The module of the backend named ``backend`` ('torch' or 'triton'), for a backward
    that must run where its forward ran (whatever ``FASTVAE_BACKEND`` says by then)."""
    if backend == "triton":
        from fastvae import kernels

        return kernels
    return _torch_impl
