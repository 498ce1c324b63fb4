"""Triton kernels for fastvae (installed as ``fastvae.kernels``).

Each fused operation lives in its own module with its math, its kernels and
the launcher that picks block sizes. This package exposes the same functions
as ``fastvae._torch_impl``; ``fastvae._dispatch`` decides which one runs.
The kernels themselves arrive with the kernels issue; until then the PyTorch
path serves every device.
"""

AVAILABLE = False
