"""The one place that decides which implementation runs, and what every
implementation provides.

CUDA tensors go to the Triton kernels when Triton imports; everything else
(CPU, MPS, float64, no Triton) takes the PyTorch path. A choice can be forced:
``torch`` or ``triton`` (Triton on CPU tensors needs ``TRITON_INTERPRET=1`` set
before Triton is first imported; that is how CI runs the kernels without a GPU).

The forced choice comes from the environment variable ``FASTVAE_BACKEND``, read
once, on first use (not on every call: an environment read per call was a
measurable part of a small loss's cost), and can be changed at run time with
``fastvae.set_backend(name)`` or, for a block of code, ``with
fastvae.use_backend(name):``. ``set_backend`` is process-wide (all threads);
``use_backend`` overrides it in the calling thread only, so blocks in different
threads neither see nor undo each other's choice.

Both backends (``fastvae._torch_impl`` and ``fastvae.kernels``) implement the
functions of :class:`Backend`, with the same signatures.
"""

import contextlib
import functools
import importlib.util
import os
import threading
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from torch import Tensor

from fastvae import _torch_impl

BACKENDS = ("torch", "triton")
ENV_VAR = "FASTVAE_BACKEND"


@runtime_checkable
class Backend(Protocol):
    """The functions a backend module implements (as module-level functions: the
    ``self`` of each method here stands for the module). The gradients a loss
    function returns are those of the *reduced* values, before ``grad_output``
    and ``beta`` are applied; an empty tensor stands for a gradient not asked for."""

    def vae_loss_forward(
        self, x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor,
        beta: Tensor | None, obs_logvar: Tensor | None, beta_value: float, recon: str,
        obs_logvar_value: float, obs_logvar_optimal: bool, reduction: str,
        clamp_lo: float | None, clamp_hi: float | None,
        grad_recon: bool, grad_kl: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(loss, recon, kl, d recon/d x_hat, d kl/d mu, d kl/d logvar, d recon/d obs_logvar)."""
        ...

    def vae_loss_forward_with_prior(
        self, x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor,
        beta: Tensor | None, obs_logvar: Tensor | None,
        prior_mu: Tensor | None, prior_logvar: Tensor | None, beta_value: float, recon: str,
        obs_logvar_value: float, obs_logvar_optimal: bool, reduction: str,
        clamp_lo: float | None, clamp_hi: float | None, free_bits: float,
        grad_recon: bool, grad_kl: bool, grad_prior: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``vae_loss_forward``'s outputs with the KL against N(prior_mu, e^prior_logvar),
        then (d kl/d prior_mu, d kl/d prior_logvar), mu-shaped or empty; with
        ``free_bits`` > 0 the KL is the free-bits one (not with reduction="none")."""
        ...

    def kl_forward_with_prior(
        self, mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None,
        reduction: str, clamp_lo: float | None, clamp_hi: float | None, free_bits: float,
        want_grad: bool, want_prior_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(kl, d kl/d mu, d kl/d logvar, d kl/d prior_mu, d kl/d prior_logvar)."""
        ...

    def kl_forward(
        self, mu: Tensor, logvar: Tensor, reduction: str,
        clamp_lo: float | None, clamp_hi: float | None, want_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(kl, d kl/d mu, d kl/d logvar)."""
        ...

    def reparameterize_forward(
        self, mu: Tensor, logvar: Tensor, seed: Tensor,
        clamp_lo: float | None, clamp_hi: float | None, with_kl: bool,
    ) -> tuple[Tensor, Tensor]:
        """(z = mu + exp(clamp(logvar) / 2) * eps with eps drawn from ``seed`` (a 1-element int64
        tensor, on the CPU or on mu's device), the per-sample KL (N,) or an empty tensor)."""
        ...

    def reparameterize_forward_with_prior(
        self, mu: Tensor, logvar: Tensor, prior_mu: Tensor | None, prior_logvar: Tensor | None,
        seed: int, clamp_lo: float | None, clamp_hi: float | None, with_kl: bool,
        num_samples: int,
    ) -> tuple[Tensor, Tensor]:
        """``reparameterize_forward`` with ``num_samples`` (0: mu's shape; K: (K, *mu.shape))
        and the KL against N(prior_mu, exp(prior_logvar))."""
        ...

    def reparameterize_backward_with_prior(
        self, grad_z: Tensor, grad_kl: Tensor | None, mu: Tensor, logvar: Tensor,
        prior_mu: Tensor | None, prior_logvar: Tensor | None, seed: int,
        clamp_lo: float | None, clamp_hi: float | None, num_samples: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar), the prior's in its
        shape and dtype (empty without it), the noise regenerated from ``seed``."""
        ...

    def reparameterize_backward(
        self, grad_z: Tensor, grad_kl: Tensor | None, mu: Tensor, logvar: Tensor,
        seed: Tensor, clamp_lo: float | None, clamp_hi: float | None,
    ) -> tuple[Tensor, Tensor]:
        """(grad_mu, grad_logvar), the noise regenerated from ``seed``."""
        ...


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _parse(name, source):
    """None (automatic), 'torch' or 'triton' from a user's spelling."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{source} must be 'torch', 'triton' or None, got {type(name).__name__}")
    name = name.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source} must be 'torch' or 'triton', got {name!r}")
    return name


_NOT_READ = object()
_forced = _NOT_READ  # None (automatic), "torch" or "triton"; FASTVAE_BACKEND until set_backend
_kernels = None  # fastvae.kernels once imported


_in_thread = threading.local()  # .backend: this thread's use_backend block, if any


def forced_backend() -> str | None:
    """The forced backend, or None for the automatic choice: the innermost
    ``use_backend`` block of this thread, else ``set_backend``'s / the
    environment's setting (the environment is read on the first call only)."""
    in_block = getattr(_in_thread, "backend", _NOT_READ)
    if in_block is not _NOT_READ:
        return in_block
    return _process_backend()


def _process_backend():
    """set_backend's setting, or the environment's until set_backend is called."""
    global _forced
    if _forced is _NOT_READ:
        _forced = _parse(os.environ.get(ENV_VAR, ""), ENV_VAR)
    return _forced


def set_backend(name: str | None) -> str | None:
    """Force fastvae's ops onto one backend from now on, in the whole process:
    ``"torch"`` (the PyTorch path), ``"triton"`` (the Triton kernels; on CPU
    tensors they need ``TRITON_INTERPRET=1`` set before Triton is imported), or
    ``None`` / ``"auto"`` (CUDA tensors on the kernels, the rest on the PyTorch
    path). Overrides ``FASTVAE_BACKEND``. float64 tensors always take the PyTorch
    path. Returns the previous setting. Inside a ``use_backend`` block the
    block's choice holds in its thread until the block ends. A backward runs on the backend its
    forward used only where the ops record it, so change the backend between
    steps, not between a forward and its backward."""
    global _forced
    name = _parse(name, "backend")
    if name == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' needs triton, which is not installed")
    previous = _process_backend()
    _forced = name
    return previous


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` (as ``set_backend`` takes it) for the body of a ``with`` block,
    in this thread only; blocks nest. Other threads keep their own setting."""
    name = _parse(name, "backend")
    if name == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' needs triton, which is not installed")
    previous = getattr(_in_thread, "backend", _NOT_READ)
    _in_thread.backend = name
    try:
        yield
    finally:
        if previous is _NOT_READ:
            del _in_thread.backend
        else:
            _in_thread.backend = previous


def backend_for(*tensors: Tensor) -> str:
    """'triton' or 'torch' for an op on these tensors."""
    return _choose(forced_backend(), tensors)


def _choose(forced, tensors):
    for t in tensors:
        if t.dtype.itemsize > 4:  # float64: the PyTorch path only
            return "torch"
    if forced is not None:
        if forced == "triton" and not triton_available():
            raise RuntimeError(f"backend 'triton' forced ({ENV_VAR} or fastvae.set_backend) "
                               f"but triton is not installed")
        return forced
    if tensors[0].device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def implementation(*tensors: Tensor) -> Backend:
    """The module whose functions implement the ops for these tensors: the
    PyTorch path (``fastvae._torch_impl``) or the kernels (``fastvae.kernels``),
    both implementing :class:`Backend`."""
    global _kernels
    if _choose(forced_backend(), tensors) == "triton":
        if _kernels is None:
            from fastvae import kernels

            _kernels = kernels
        if _kernels.AVAILABLE:
            return _kernels
        if forced_backend() == "triton":
            raise RuntimeError(f"backend 'triton' forced ({ENV_VAR} or fastvae.set_backend) "
                               f"but fastvae.kernels could not import triton")
    return _torch_impl


def traced_backend(device_type: str, wide: bool, meta: bool = False) -> str:
    """The backend (its name) for an op traced into a graph on ``device_type`` tensors
    (``wide``: one of them float64; ``meta``: meta tensors, whose backward arithmetic is
    PyTorch's): what ``implementation`` would pick for them now. A constant to
    torch.compile, so the graph holds it and both its forward and backward use it."""
    if wide or meta:
        return "torch"
    forced = forced_backend()
    name = forced if forced is not None else (
        "triton" if device_type == "cuda" and triton_available() else "torch")
    if name == "triton":
        if forced == "triton" and not triton_available():
            raise RuntimeError(f"backend 'triton' forced ({ENV_VAR} or fastvae.set_backend) "
                               f"but triton is not installed")
        from fastvae import kernels

        if not kernels.AVAILABLE:
            if forced == "triton":
                raise RuntimeError(f"backend 'triton' forced ({ENV_VAR} or fastvae.set_backend) "
                                   f"but fastvae.kernels could not import triton")
            return "torch"
    return name


# torch.compiler.assume_constant_result's mark, set without it: that function imports
# torch._dynamo (and Triton), which `import fastvae` must not (tests/test_package.py;
# tests/test_dispatch.py checks the mark is still the decorator's)
traced_backend._dynamo_marked_constant = True


def implementation_named(backend):
    """The module of the backend named ``backend`` ('torch' or 'triton'), for a backward
    that must run where its forward ran (whatever ``FASTVAE_BACKEND`` says by then)."""
    if backend == "triton":
        from fastvae import kernels

        return kernels
    return _torch_impl
