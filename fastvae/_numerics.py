"""The numeric rules both backends share (the PyTorch path in ``_torch_impl``
and the Triton kernels in ``fastvae.kernels``): which dtype the math runs in,
which dtype a saved gradient buffer has, how a sum becomes each reduction, and
the constants that make the BCE terms equal to PyTorch's. Torch only, no
backend: both backends import this module, neither imports the other."""

import torch

BCE_LOG_FLOOR = -100.0  # F.binary_cross_entropy clamps its logs here
BCE_GRAD_EPS = 1e-12  # ...and the denominator of its gradient here


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def reduction_scale(reduction: str, batch: int, numel: int) -> float:
    """Factor that turns a sum over everything into the given reduction."""
    if reduction == "batchmean":
        return 1.0 / batch
    if reduction == "mean":
        return 1.0 / numel
    return 1.0  # "sum", and "none" (per-sample sums)


def grad_buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved gradient buffer of an input of ``dtype``: its own, except
    float16, whose range cannot hold a reduced gradient (1/numel underflows) or its
    product with a loss scale (GradScaler's 65536 overflows); float16 buffers are
    float32 and the backward rounds once, to float16, after scaling."""
    return torch.float32 if dtype == torch.float16 else dtype
