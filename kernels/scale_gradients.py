"""In-place scaling of saved gradient buffers by ``grad_output``: the backward
of the loss and KL ops.

    grad_k <- grad_k * w_k,   w_k a scalar or one weight per sample (row)

for up to three buffers (the x_hat, mu and logvar gradients) in one launch.
A tile whose weights are all exactly 1 (the usual ``loss.backward()``) is left
untouched, decided on the device: no host sync, no memory traffic.
"""

import functools

import triton
import triton.language as tl

from . import _shared


@triton.jit
def _scale_tile(
    pid,  # int64 scalar: this tile's index among the buffer's tiles
    grad_ptr,  # (N, D) contiguous, in and out: the gradient buffer
    weight_ptr,  # 0-dim, or (N,) when PER_SAMPLE: the weights
    n_rows,  # N, the batch size
    n_cols,  # D, elements per sample
    chunks,  # column chunks per row block
    PER_SAMPLE: tl.constexpr,  # one weight per row (reduction="none")
    BLOCK: tl.constexpr,  # columns per iteration (a power of two)
    ROWS: tl.constexpr,  # rows per tile (a power of two)
    ITERS: tl.constexpr,  # column blocks per tile
):
    """grad[n, j] *= w (or w[n]) over one tile of ROWS rows x (ITERS x BLOCK) columns.
    A tile whose weights are all exactly 1 (the usual ``loss.backward()``) is
    left untouched: decided on the device, so no host sync and no memory
    traffic for the common case."""
    rows = (pid // chunks) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_mask = rows < n_rows
    if PER_SAMPLE:
        weight = tl.load(weight_ptr + rows, mask=row_mask, other=1.0)
    else:
        weight = tl.load(weight_ptr + rows * 0)
    weight = weight.to(tl.float32)
    if tl.sum((weight != 1.0).to(tl.int32), axis=0) > 0:
        col0 = (pid % chunks) * (BLOCK * ITERS)
        for i in range(ITERS):
            cols = col0 + i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            offs = rows[:, None] * n_cols + cols[None, :]
            grad = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
            tl.store(grad_ptr + offs, (grad * weight[:, None]).to(grad_ptr.dtype.element_ty),
                     mask=mask)


@triton.jit
def _scale_gradients_kernel(
    grad0_ptr,  # (N, D0) contiguous, in and out: gradient buffer 0 (e.g. x_hat's)
    weight0_ptr,  # 0-dim or (N,): its weight
    grad1_ptr,  # (N, D1) contiguous, in and out: gradient buffer 1 (e.g. mu's)
    weight1_ptr,  # 0-dim or (N,): its weight
    grad2_ptr,  # (N, D2) contiguous, in and out: gradient buffer 2 (e.g. logvar's)
    weight2_ptr,  # 0-dim or (N,): its weight
    n_rows,  # N, the batch size (shared)
    cols0,  # D0, elements per sample of buffer 0
    cols1,  # D1, elements per sample of buffer 1
    cols2,  # D2, elements per sample of buffer 2
    chunks0,  # column chunks per row block of buffer 0
    chunks1,  # column chunks per row block of buffer 1
    chunks2,  # column chunks per row block of buffer 2
    programs0,  # programs [0, programs0) scale buffer 0
    programs01,  # programs [programs0, programs01) buffer 1, the rest buffer 2
    PER_SAMPLE0: tl.constexpr,  # weight0 is per row
    BLOCK0: tl.constexpr,  # buffer 0: columns per iteration
    ROWS0: tl.constexpr,  # buffer 0: rows per tile
    ITERS0: tl.constexpr,  # buffer 0: column blocks per tile
    PER_SAMPLE1: tl.constexpr,  # weight1 is per row
    BLOCK1: tl.constexpr,  # buffer 1: columns per iteration
    ROWS1: tl.constexpr,  # buffer 1: rows per tile
    ITERS1: tl.constexpr,  # buffer 1: column blocks per tile
    PER_SAMPLE2: tl.constexpr,  # weight2 is per row
    BLOCK2: tl.constexpr,  # buffer 2: columns per iteration
    ROWS2: tl.constexpr,  # buffer 2: rows per tile
    ITERS2: tl.constexpr,  # buffer 2: column blocks per tile
):
    """grad_k *= weight_k in place for up to three gradient buffers in one
    launch (the loss backward's x_hat, mu and logvar gradients: one launch
    instead of three). Programs [0, programs0) take buffer 0, [programs0,
    programs01) buffer 1, the rest buffer 2; weight a scalar or one per row,
    multiplied in float32 and rounded once to the buffer's dtype."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < programs0:
        _scale_tile(pid, grad0_ptr, weight0_ptr, n_rows, cols0, chunks0,
                    PER_SAMPLE0, BLOCK0, ROWS0, ITERS0)
    elif pid < programs01:
        _scale_tile(pid - programs0, grad1_ptr, weight1_ptr, n_rows, cols1, chunks1,
                    PER_SAMPLE1, BLOCK1, ROWS1, ITERS1)
    else:
        _scale_tile(pid - programs01, grad2_ptr, weight2_ptr, n_rows, cols2, chunks2,
                    PER_SAMPLE2, BLOCK2, ROWS2, ITERS2)


def cols_padded(cols):
    """The three segments' columns per row (1 for the unused ones)."""
    return cols + (1,) * (3 - len(cols))


@functools.lru_cache(maxsize=256)
def _plan(batch, cols, per_sample, device, forced_split):
    """(constexpr arguments, programs per segment, chunks per segment) for
    ``_scale_gradients_kernel``: cached per shapes and layout, so a repeated call
    derives nothing. ``forced_split``: part of the key (a test's tile caps)."""
    meta, programs, chunks = {"num_warps": 1}, [], []
    for k in range(3):
        if k < len(cols):
            split = _shared.row_split(batch, cols[k], device)
            flag = per_sample[k]
        else:  # an empty segment
            split = _shared.Split(block=1, rows=1, iters=1, chunks=1, programs=0, num_warps=1)
            flag = False
        programs.append(split.programs)
        chunks.append(split.chunks)
        meta.update({f"PER_SAMPLE{k}": flag, f"BLOCK{k}": split.block,
                     f"ROWS{k}": split.rows, f"ITERS{k}": split.iters})
        meta["num_warps"] = max(meta["num_warps"], split.num_warps)
    return meta, tuple(programs), tuple(chunks)


def scale_gradients_(pairs):
    """Scale up to three gradient buffers that the loss op allocated, in place,
    each by its weight (0-dim, or (N,) for reduction="none"), in one launch.
    ``pairs``: [(grad, weight), ...], every grad with the same batch size N on
    one device; returns the grads."""
    if not 1 <= len(pairs) <= 3:
        raise ValueError(f"scale_gradients_ takes 1 to 3 (grad, weight) pairs, got {len(pairs)}")
    grads = [g for g, _ in pairs]
    batch = grads[0].shape[0]
    for g, w in pairs:
        if g.shape[0] != batch or w.dim() > 1 or (w.dim() == 1 and w.shape[0] != batch):
            raise ValueError(f"scale_gradients_: every grad needs batch size {batch} and a 0-dim "
                             f"or ({batch},) weight; got grad {tuple(g.shape)}, "
                             f"weight {tuple(w.shape)}")
    with _shared.device_guard(grads[0]):
        device = grads[0].device
        cols = tuple(g.numel() // batch if batch else 0 for g in grads)
        per_sample = tuple(w.dim() == 1 for _, w in pairs)
        meta, programs, chunks = _plan(batch, cols, per_sample, device, _shared._forced_split)
        args = [(g, w.contiguous()) for g, w in pairs]
        while len(args) < 3:  # an empty segment: no programs, any valid pointer
            args.append(args[0])
        (g0, w0), (g1, w1), (g2, w2) = args
        _scale_gradients_kernel[(programs[0] + programs[1] + programs[2],)](
            g0, w0, g1, w1, g2, w2, batch, *cols_padded(cols), *chunks,
            programs[0], programs[0] + programs[1], **meta)
    return grads


def scale_gradient_(grad, weight):
    """Scale one gradient buffer that the loss op allocated, in place, by
    ``weight`` (0-dim, or (N,) for reduction="none"); returns ``grad``."""
    return scale_gradients_([(grad, weight)])[0]
