"""Set-up for the kernel tests: run fastvae on the Triton kernels or on the
PyTorch path, on every device present.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) and are selected with fastvae.set_backend("triton"); on CUDA the
default dispatch already picks them. The interpreter runs programs one after
another (milliseconds each), so sizes here are small and ``split`` forces tiny
tiles where a test needs the multi-program two-stage reduction.
"""

import os

import pytest
import torch

from fastvae import _dispatch

# Where the kernels can run in this process: on CPU tensors only under the
# interpreter (set by tests/conftest.py when there is no GPU), on CUDA tensors
# only compiled on a GPU. Both cases are always generated; the one that cannot
# run here shows as skipped, with the reason.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not _INTERPRETED, reason="kernels on CPU tensors need TRITON_INTERPRET=1 (here they "
                                 "run compiled on the GPU; CI runs the interpreter)")),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        _INTERPRETED or not torch.cuda.is_available(),
        reason="compiled kernels need a CUDA GPU" if not torch.cuda.is_available()
        else "TRITON_INTERPRET=1: the kernels run interpreted on CPU tensors")]),
]


@pytest.fixture(params=KERNEL_DEVICES)
def device(request):
    """The device the kernels run on here (overrides tests/conftest.py's)."""
    return torch.device(request.param)


class Backends:
    """Runs a callable with fastvae routed to the kernels or to the PyTorch path."""

    def __init__(self, device, monkeypatch):
        self.device = device
        self._monkeypatch = monkeypatch

    def kernels(self, fn, *args, **kwargs):
        # (tests/conftest.py restores the backend after each test)
        _dispatch.set_backend("triton" if self.device.type == "cpu" else None)
        from fastvae import kernels

        probe = torch.zeros(1, device=self.device)
        assert kernels.AVAILABLE and _dispatch.implementation(probe) is kernels
        return fn(*args, **kwargs)

    def torch(self, fn, *args, **kwargs):
        _dispatch.set_backend("torch")
        return fn(*args, **kwargs)


@pytest.fixture
def backends(device, monkeypatch):
    return Backends(device, monkeypatch)


@pytest.fixture
def split():
    """Context manager forcing tiles of at most (block, rows, iterations)."""
    from fastvae.kernels import _shared

    return _shared.force_split
