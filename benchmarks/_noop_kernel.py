"""A Triton kernel that does next to nothing, to time what one launch costs
the host (imported by gpu_check on a CUDA machine only)."""

import triton
import triton.language as tl


@triton.jit
def noop_kernel(
    ptr,  # float32 (BLOCK,), out: set to 1
    BLOCK: tl.constexpr,  # elements written (a power of two)
):
    """ptr[0:BLOCK] = 1: a launch whose device work is negligible."""
    offs = tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.full((BLOCK,), 1.0, tl.float32))
