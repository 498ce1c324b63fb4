"""The PyTorch path: implementation for every device the Triton kernels don't
serve, and the reference the kernels are held to.

Each function computes, in the same pass as the value, the gradient of the
reduced value with respect to its inputs (before ``grad_output`` and ``beta``
are applied), so the backward only scales it. Math runs in float32 (float64
for float64 inputs); gradients come back in each input's own dtype. Inputs are
never written; every buffer written in place here was allocated here.

Formulas (per element, summed over each sample's non-batch dims):
  mse         (x_hat - x)^2                         d/dx_hat = 2 (x_hat - x)
  l1          |x_hat - x|                           d/dx_hat = sign(x_hat - x)
  bce         -(x max(log p, -100) + (1 - x) max(log(1 - p), -100)),  p = x_hat
                                                    d/dp = (p - x) / max(p (1 - p), 1e-12)
  bce_logits  softplus(l) - l x,  l = x_hat         d/dl = sigmoid(l) - x
  gaussian    1/2 [(x_hat - x)^2 e^-s + s + log 2pi]  d/dx_hat = (x_hat - x) e^-s
                                                    d/ds = 1/2 [1 - (x_hat - x)^2 e^-s]
  laplace     |x_hat - x| e^-s + s + log 2          d/dx_hat = sign(x_hat - x) e^-s
                                                    d/ds = 1 - |x_hat - x| e^-s
  continuous_bernoulli  softplus(l) - l x - log C(l),  C(l) = l / tanh(l / 2)
                                                    d/dl = sigmoid(l) - x - (1/l - 1/sinh l)
  kl          -1/2 (1 + lv - mu^2 - exp(lv))        d/dmu = mu, d/dlv = (exp(lv) - 1) / 2
with lv = clamp(logvar, lo, hi) and d/dlogvar = 0 where the clamp was active.
"""

import math
import threading

import torch

from fastvae import _cpu_fusion, _numerics, _validate
from fastvae._grad_scaling import saved_tensor_hooks_active
from fastvae._numerics import (
    BCE_LOG_FLOOR,
    compute_dtype,
    grad_buffer_dtype,
    reduction_scale,
    summed_grad_dtype,
)


def reduce_per_sample(per_sample, reduction, scale):
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    return total if scale == 1.0 else total * scale


_as = _numerics.as_dtype


def _empty_like_contiguous(t, dtype):
    # (empty_like: ~1.3 us a call against torch.empty(t.shape, device=t.device)'s ~3 us,
    # its Python arguments parsed; at small sizes a call's cost is its ops)
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)


def _difference(x_hat, x, dtype):
    """x_hat - x in ``dtype``, in a fresh contiguous buffer (it becomes the gradient)."""
    out = _empty_like_contiguous(x_hat, dtype)
    return torch.sub(_as(x_hat, dtype), _as(x, dtype), out=out)


def _rows(t):
    return t.reshape(t.shape[0], -1)


def _row_sum(t):
    return _rows(t).sum(dim=1)


# Rows longer than this are reduced in blocks of this many elements. vector_norm
# accumulates naively on the CPU (relative error ~2e-4 over 2^22 elements); over
# 256 elements its error is eager's (~1e-7 for constant data, where 1024 gave
# 8e-7), and torch.sum then adds the block partials by cascade summation:
# eager's accuracy at any row length, at vector_norm's speed (measured equal).
SUM_BLOCK = 256


def _row_sum_of_squares(t, minus=None):
    """Per-row sum of t^2 in one pass over ``t``, without writing t^2: vector_norm over
    blocks of SUM_BLOCK elements (a view of the rows), squared, then the (N, blocks)
    partials summed by torch.sum. (Sums of |t| do not use vector_norm: its ord=1
    reduction is slow on the CPU, see _row_abs_sum.)

    ``minus`` (t's shape and dtype): of (t - minus)^2 instead, the difference made a
    group of rows (RECON_CHUNK elements) at a time in a scratch block, never whole: each
    row's sum is computed as from the whole difference, so the same bits. (A row longer
    than that is one group, in a temporary: a kept scratch block would hold a row's size
    for the thread's lifetime.)"""
    if minus is not None:
        rows, rows_minus = _rows(t), _rows(minus)
        n, m = rows.shape
        height = max(1, RECON_CHUNK // max(m, 1))
        if height >= n:
            return _row_sum_of_squares(torch.sub(rows, rows_minus))
        scratch = _Scratch(height * m, t.dtype, t.device) if m <= RECON_CHUNK else None
        total = torch.empty(n, dtype=t.dtype, device=t.device)
        for r0 in range(0, n, height):
            r1 = min(n, r0 + height)
            into = None if scratch is None else scratch.get("diff", (r1 - r0, m))
            total[r0:r1] = _row_sum_of_squares(torch.sub(rows[r0:r1], rows_minus[r0:r1], out=into))
        return total
    rows = _rows(t)
    length = rows.shape[1]
    blocks = length // SUM_BLOCK
    if blocks <= 1:
        return torch.linalg.vector_norm(rows, 2, dim=1).square_()
    split = blocks * SUM_BLOCK
    partials = torch.linalg.vector_norm(
        rows[:, :split].reshape(rows.shape[0], blocks, SUM_BLOCK), 2, dim=2).square_()
    total = partials.sum(dim=1)
    if split < length:
        total.add_(torch.linalg.vector_norm(rows[:, split:], 2, dim=1).square_())
    return total


# Elements of |t| written at a time by _row_abs_sum: a cached scratch block (1 MiB in float32).
ABS_BLOCK = 1 << 18


def _row_abs_sum(t, minus=None):
    """Per-row sums of |t|, t (N, ...) read only: |t| written block by block into a
    cached scratch block and summed by torch.sum (cascade summation: eager's
    accuracy at any row length) while in cache. Not vector_norm(ord=1): its CPU
    reduction is not vectorized (at 128x784 111 us against 16 us for abs + sum, at
    512x12288 5.0 ms against 0.7 ms, one process, quiet 2-core machine).

    ``minus`` (t's shape and dtype): of |t - minus| instead, the difference made in the
    scratch block: the same blocks, so the same bits as of the whole difference."""
    rows = _rows(t)
    rows_minus = None if minus is None else _rows(minus)
    n, m = rows.shape
    if n * m <= ABS_BLOCK:
        return torch.abs(rows if minus is None else rows - rows_minus).sum(dim=1)
    width = min(m, ABS_BLOCK)
    height = max(1, ABS_BLOCK // width)
    scratch = _Scratch(height * width, t.dtype, t.device)
    total = torch.empty(n, dtype=t.dtype, device=t.device)
    for r0 in range(0, n, height):
        r1 = min(n, r0 + height)
        for c0 in range(0, m, width):
            block = rows[r0:r1, c0:c0 + width]
            into = scratch.get("abs", block.shape)
            if rows_minus is not None:
                block = torch.sub(block, rows_minus[r0:r1, c0:c0 + width], out=into)
            part = torch.abs(block, out=into).sum(dim=1)
            if c0 == 0:
                total[r0:r1] = part
            else:
                total[r0:r1] += part
    return total


_NONE, _SUM = 0, 2  # at::Reduction::None, ::Sum, for the aten loss ops


def _scaled_mse_grad(scale, p, target, out=None):
    """(p - target) * scale, ``scale`` a tensor (twice the weight of the squared error:
    the gradient's 2 folded in, exactly), in one pass: aten's Huber-loss gradient with an
    infinite delta is that product. Not mse_loss_backward, which doubles the difference
    first: past half of float32's range that overflowed where the scaled gradient (of a
    mean, say) is finite. The same bits otherwise (both products exact but the last)."""
    # (the overloads named: the op's packet resolves them per call, ~5 us)
    if out is None:
        return torch.ops.aten.huber_loss_backward.default(scale, p, target, _SUM, math.inf)
    return torch.ops.aten.huber_loss_backward.out(scale, p, target, _SUM, math.inf,
                                                  grad_input=out)


def _mse_grad_unscaled(x_hat, x, dtype):
    """2 (x_hat - x) in one pass over x_hat and x, in a fresh buffer: exactly twice
    the difference (a power of two), so its squares are exactly 4 (x_hat - x)^2."""
    # torch.ones, not torch.tensor: on CUDA a fill kernel, not a blocking host-to-device copy
    one = torch.ones((), dtype=dtype, device=x_hat.device)
    out = _empty_like_contiguous(x_hat, dtype)
    return torch.ops.aten.mse_loss_backward.grad_input(
        one, _as(x_hat, dtype), _as(x, dtype), _SUM, grad_input=out)


# Elements per chunk of the chunked recon path: its four float32 scratch chunks
# (8 MiB) stay in the CPU's last-level cache while a chunk is converted, computed
# on and reduced. Per-op overhead (~10 us an op on the 2-core machine) decides
# the size: 512×12288 bf16 mse fwd+bwd took 8.9 / 5.9 / 4.3 / 3.9 ms with chunks
# of 2^16 / 2^17 / 2^18 / 2^19 elements (measured side by side, contended).
RECON_CHUNK = 1 << 19


# From this many elements (float32) an mse or l1 without a gradient makes the difference
# a block at a time in cache (_row_sum_of_squares / _row_abs_sum with ``minus``) rather
# than writing it whole, or calling aten's mse_loss / l1_loss with reduction="sum",
# which write the terms whole: the inputs no longer fit in cache, and that buffer's
# traffic costs more than the blocks' Python. Old / new time, interleaved on the 2-core
# machine: 1.2x (mse) and 1.5x (l1) at 512x12288 per sample, 1.5-2.7x summed; below
# this size it lost (0.7x mse at 8x3x256x256 and 64x3x64x64).
CHUNKED_NO_GRAD_NUMEL = 1 << 21


def _blocked_without_gradient(x_hat, x):
    """An mse/l1 without a gradient that CHUNKED_NO_GRAD_NUMEL's blocks serve: CPU tensors
    (the cache argument; on a GPU the blocks would be many launches for one op's work),
    contiguous (the rows of others, channels_last say, would be copied whole), large."""
    return x_hat.device.type == "cpu" and x_hat.numel() >= CHUNKED_NO_GRAD_NUMEL \
        and x_hat.is_contiguous() and x.is_contiguous()


def _chunks(rows_shape):
    """(row slice, column slice) blocks of at most RECON_CHUNK elements covering
    an (N, M) array, each contiguous in a contiguous (N, M) array: whole rows
    when they fit, else column pieces of one row. Column index k of each block."""
    n, m = rows_shape
    width = min(m, RECON_CHUNK)
    height = max(1, RECON_CHUNK // width)
    for r0 in range(0, n, height):
        for k, c0 in enumerate(range(0, m, width)):
            yield slice(r0, min(r0 + height, n)), slice(c0, min(c0 + width, m)), k


def _in_dtype(block, scratch, dtype):
    """``block`` in ``dtype``: itself if it has it (read only), else converted into ``scratch``."""
    if block.dtype == dtype:
        return block
    return scratch[:block.numel()].view(block.shape).copy_(block)


def _store_scaled(scratch, scale, out):
    """out = scratch * scale, ``scratch`` (in the compute dtype) used up. An op with
    an ``out`` of another dtype computes into a temporary first (a fresh buffer:
    page faults on the CPU), so a half-precision ``out`` gets a plain copy."""
    if out.dtype == scratch.dtype:
        torch.mul(scratch, scale, out=out)
    else:
        out.copy_(scratch if scale == 1.0 else scratch.mul_(scale))


def _recon_chunk(p, target, recon, grad_scale, work, spare, grad_out, value_out):
    """Per-row sums of one chunk's recon terms, written into ``value_out``, and
    grad_scale times their gradient written into ``grad_out`` (None: no
    gradient). ``p`` and ``target`` are in the compute dtype and only read;
    ``work`` and ``spare`` are scratch."""
    if recon == "mse":
        # (x_hat - x)^2 in one pass (the same values as the difference, then its square),
        # summed by torch.sum (cascade) while in cache
        torch.sum(torch._C._nn.mse_loss(p, target, _NONE, out=spare), dim=1, out=value_out)
        if grad_out is not None:
            # (x_hat - x) * (2 grad_scale) in one pass (no overflow of a doubled difference);
            # rounded once on the store into grad_out
            into = grad_out if grad_out.dtype == p.dtype else work
            _scaled_mse_grad(torch.full((), 2.0 * grad_scale, dtype=p.dtype, device=p.device), p,
                             target, out=into)
            if into is not grad_out:
                grad_out.copy_(into)
        return
    if recon == "l1":
        diff = torch.sub(p, target, out=work)
        # the terms written to cache and summed by torch.sum (cascade): faster here
        # than a blocked vector_norm, as accurate
        torch.sum(torch.abs(diff, out=spare), dim=1, out=value_out)
        if grad_out is not None:
            # computed in the compute dtype, rounded once on the store into grad_out
            _store_scaled(diff.sign_(), grad_scale, grad_out)
        return
    if recon == "bce_logits":
        # softplus(l) - l x, then the gradient sigmoid(l) - x
        torch.ops.aten.softplus.out(p, 1, 20, out=work)  # F.softplus's beta, threshold
        torch.sum(work.addcmul_(p, target, value=-1.0), dim=1, out=value_out)
        if grad_out is not None:
            _store_scaled(torch.sigmoid(p, out=work).sub_(target), grad_scale, grad_out)
        return
    # bce: -(x log p + (1 - x) log(1 - p)), each log clamped at -100
    torch.log(p, out=work).clamp_min_(BCE_LOG_FLOOR).mul_(target)
    torch.sum(work, dim=1, out=value_out)
    torch.neg(p, out=work).log1p_().clamp_min_(BCE_LOG_FLOOR)
    value_out.add_(_row_sum(work.addcmul_(work, target, value=-1.0))).neg_()
    if grad_out is not None:
        # (p - x) / max(p (1 - p), 1e-12): the gradient F.binary_cross_entropy uses
        into = grad_out if grad_out.dtype == p.dtype else work
        torch.ops.aten.binary_cross_entropy_backward.grad_input(
            torch.full((), grad_scale, dtype=p.dtype, device=p.device), p, target, None, _SUM,
            grad_input=into)
        if into is not grad_out:
            grad_out.copy_(into)


def _chunked_recon_per_sample(x_hat, x, recon, dtype, grad_scale):
    """recon_per_sample in chunks of RECON_CHUNK elements: each chunk of x_hat
    and x is converted to ``dtype`` if it is not in it, computed on and reduced
    while in cache, and its gradient written once, in the gradient buffer's
    dtype. So the memory traffic is that of the inputs and the gradient in their
    own dtypes (no float32 copies of half-precision inputs), and the several
    passes of a recon's formula run over cached chunks, not over the whole input."""
    rows_h, rows_x = _rows(x_hat), _rows(x)
    n, m = rows_h.shape
    grad = None
    if grad_scale is not None:
        grad = torch.empty(x_hat.shape, dtype=grad_buffer_dtype(x_hat.dtype), device=x_hat.device)
    grad_rows = None if grad is None else grad.view(n, m)
    width = min(m, RECON_CHUNK)
    chunk = width * max(1, RECON_CHUNK // width)
    size = min(chunk, n * m)

    def scratch_if(needed):  # (a fresh buffer costs page faults on the CPU: only those used)
        return torch.empty(size if needed else 0, dtype=dtype, device=x_hat.device)

    p_buf, x_buf = scratch_if(x_hat.dtype != dtype), scratch_if(x.dtype != dtype)
    # the recon's two scratch chunks: an mse without a gradient uses one
    work, spare = scratch_if(recon != "mse" or grad is not None), scratch_if(True)
    partials = torch.empty((-(-m // width), n), dtype=dtype, device=x_hat.device)
    for rows, cols, k in _chunks((n, m)):
        p = _in_dtype(rows_h[rows, cols], p_buf, dtype)
        # converted by a copy: mixed-dtype elementwise ops are ~10x slower than a copy
        target = _in_dtype(rows_x[rows, cols], x_buf, dtype)
        scratch, scratch2 = (b[:p.numel()].view(p.shape) if b.numel() else None
                             for b in (work, spare))
        grad_out = None if grad_rows is None else grad_rows[rows, cols]
        _recon_chunk(p, target, recon, grad_scale, scratch, scratch2, grad_out, partials[k, rows])
    per_sample = partials[0] if partials.shape[0] == 1 else partials.sum(dim=0)
    if recon == "bce" and x_hat.device.type == "cpu" and torch.isnan(per_sample).any():
        # a probability outside [0, 1] (or NaN) made a log NaN: the value check
        # fastvae._validate leaves to this pass (the targets were checked before)
        _validate.check_probabilities(x_hat)
    return per_sample, grad


def host_reads_are_free(t):
    """Whether reading a value of a tensor on ``t``'s device on the host (``.any()``,
    ``int()``) is free: on the CPU. Elsewhere (CUDA) it is a device sync, which also
    breaks CUDA-graph capture: the PyTorch path then decides on the device."""
    return t.device.type == "cpu"


def recon_per_sample(x_hat, x, recon, dtype, grad_scale):
    """Per-sample reconstruction sums (N,) and, if ``grad_scale`` is not None,
    ``grad_scale`` times the gradient of their sum with respect to ``x_hat``."""
    want_grad = grad_scale is not None
    # large half-precision mse/l1 and large bce/bce_logits: one fused loop (Inductor's
    # C++), from a kernel's third call on (it compiles then; see _cpu_fusion)
    if _cpu_fusion.applies(x_hat, x, recon, dtype):
        fused = _cpu_fusion.fused_recon(x_hat, x, recon, grad_scale)  # (checks x)
        if fused is not None:
            if recon == "bce" and torch.isnan(fused[0]).any():
                _validate.check_probabilities(x_hat)  # as the chunked path checks
            return fused
    # the [0, 1] targets (bce, bce_logits), which the caller leaves to this path: the fused
    # loop above reads their range while it computes the loss; here a pass of its own
    _validate.check_targets(x, recon)
    # half-precision inputs: converted chunk by chunk, never copied whole to float32;
    # bce: its many passes (two logs, clamps, products, sums, the gradient) over cached chunks
    if dtype != x_hat.dtype or dtype != x.dtype or recon == "bce":
        return _chunked_recon_per_sample(x_hat, x, recon, dtype, grad_scale)
    if not want_grad and recon in SMALL_RECONS and _blocked_without_gradient(x_hat, x):
        # the difference made and summed a block at a time in cache, never written whole;
        # the same sums, bit for bit, as below (the value does not depend on a gradient)
        sums = _row_sum_of_squares if recon == "mse" else _row_abs_sum
        return sums(x_hat, x), None
    if recon == "mse" and want_grad and host_reads_are_free(x_hat):
        # g = 2 (x_hat - x) first, in the pass that reads the inputs; sum(g^2) / 4 is
        # then bit for bit the sum of (x_hat - x)^2 (scaling by 4 is exact), unless
        # g^2 overflowed (where (x_hat - x)^2 may not have, and where 2 (x_hat - x)
        # itself may have though grad_scale times it does not): then both come from
        # the difference below. That needs a host read of the sums: the CPU only (on
        # CUDA the difference below, no sync). The value never depends on grad_scale.
        grad = _mse_grad_unscaled(x_hat, x, dtype)
        per_sample = _row_sum_of_squares(grad).mul_(0.25)
        if not torch.isinf(per_sample).any():
            return per_sample, grad if grad_scale == 1.0 else grad.mul_(grad_scale)
    if recon in ("mse", "l1"):
        diff = _difference(x_hat, x, dtype)
        if recon == "mse":
            per_sample = _row_sum_of_squares(diff)
            grad = diff.mul_(2.0 * grad_scale) if want_grad else None
        else:
            per_sample = _row_abs_sum(diff)
            grad = diff.sign_().mul_(grad_scale) if want_grad else None
        return per_sample, grad

    p, target = _as(x_hat, dtype), _as(x, dtype)
    if recon == "bce_logits":
        # softplus(l) - l x, then the gradient sigmoid(l) - x, in one buffer
        buf = _empty_like_contiguous(p, dtype)
        torch.ops.aten.softplus.out(p, 1, 20, out=buf)  # F.softplus's beta, threshold
        per_sample = _row_sum(buf.addcmul_(p, target, value=-1.0))
        if not want_grad:
            return per_sample, None
        grad = torch.sigmoid(p, out=buf).sub_(target)
        return per_sample, grad if grad_scale == 1.0 else grad.mul_(grad_scale)

    # bce: -(x log p + (1 - x) log(1 - p)), each log clamped at -100. One
    # buffer holds x log p, then (1 - x) log(1 - p), then the gradient: fresh
    # large buffers cost page faults on the CPU, extra passes over one cost less.
    buf = _empty_like_contiguous(p, dtype)
    torch.log(p, out=buf).clamp_min_(BCE_LOG_FLOOR).mul_(target)
    per_sample = _row_sum(buf)
    torch.neg(p, out=buf).log1p_().clamp_min_(BCE_LOG_FLOOR)
    per_sample = per_sample.add_(_row_sum(buf.addcmul_(buf, target, value=-1.0))).neg_()
    if not want_grad:
        return per_sample, None
    # grad_scale (p - x) / max(p (1 - p), 1e-12) in one pass: the gradient
    # F.binary_cross_entropy uses (BCE_GRAD_EPS is its epsilon)
    grad = torch.ops.aten.binary_cross_entropy_backward.grad_input(
        torch.full((), grad_scale, dtype=dtype, device=p.device), p, target, None, _SUM,
        grad_input=buf)
    return per_sample, grad


def _scalar_scale_recon(x_hat, x, recon, obs_logvar, obs_value, optimal, dtype, grad_scale):
    """gaussian / laplace with one scale for every element (a float, a 1-element
    tensor, or "optimal"), from the mse / l1 pass: per-sample HALF [S_n e^-s + D s
    + D LOG_NORM] with S_n its per-sample sums, and its gradient (2 (x_hat - x) or
    sign(x_hat - x)) times e^-s / 2 (gaussian) or e^-s (laplace). A float scale
    folds into the mse / l1 pass's own gradient scaling; a tensor or the fitted
    scale (known only after the sums) costs one more pass over the gradient."""
    half, log_norm = _numerics.OBS_SCALE[recon]
    base = "mse" if recon == "gaussian" else "l1"
    cols = x_hat.numel() // x_hat.shape[0]
    want_grad = grad_scale is not None
    if obs_logvar is not None and obs_logvar.device.type == "cpu":
        # a CPU tensor's value is read for free (no device to wait for): it folds
        # into the gradient's scaling like a float, saving the pass over the gradient
        obs_value, obs_logvar = float(obs_logvar), None
    # mse's gradient is 2 (x_hat - x): gaussian's (x_hat - x) e^-s is HALF of it times e^-s
    if obs_logvar is None and not optimal:
        inv_scale = _numerics.exp_of_float(-obs_value)
        rows, grad = recon_per_sample(x_hat, x, base, dtype,
                                      grad_scale * half * inv_scale if want_grad else None)
        return rows.mul_(half * inv_scale).add_(half * cols * (obs_value + log_norm)), grad
    rows, grad = recon_per_sample(x_hat, x, base, dtype, 1.0 if want_grad else None)
    if optimal:
        rows, inv_scale = _numerics.fitted_recon_rows(rows, recon, x_hat.numel())
    else:
        log_scale = obs_logvar.reshape(()).to(dtype)
        inv_scale = torch.exp(-log_scale)
        rows = (rows * inv_scale + cols * (log_scale + log_norm)) * half
    if want_grad:
        grad.mul_(inv_scale * (half * grad_scale))
    return rows, grad


def _sum_rows_of(t, like):
    """Per-sample sums of ``t`` broadcast to ``like``'s shape, without materializing it."""
    expanded = t.expand(like.shape)
    if like.dim() == 1:
        return expanded.clone()
    return expanded.sum(dim=tuple(range(1, like.dim())))


def _elementwise_scale_recon(x_hat, x, recon, obs_logvar, dtype, grad_scale):
    """gaussian / laplace with a tensor scale of more than one element (per element,
    per channel, ...): per-sample sums, d/dx_hat and d/ds for every element of x
    (the backward sums d/ds over obs_logvar's broadcast dims)."""
    half, log_norm = _numerics.OBS_SCALE[recon]
    cols = x_hat.numel() // x_hat.shape[0]
    diff = _difference(x_hat, x, dtype)
    s = _as(obs_logvar, dtype)
    inv_scale = torch.neg(s).exp_().expand(x_hat.shape)
    err = torch.mul(diff, diff) if recon == "gaussian" else torch.abs(diff)
    err.mul_(inv_scale)  # the scaled error, (x_hat - x)^2 e^-s or |x_hat - x| e^-s
    rows = (_row_sum(err) + _sum_rows_of(s, x_hat) + cols * log_norm) * half
    if grad_scale is None:
        return rows, None, None
    if recon == "laplace":
        diff.sign_()
    grad_x_hat = diff.mul_(inv_scale).mul_(grad_scale)
    grad_obs = err.neg_().add_(1.0).mul_(half * grad_scale)  # HALF (1 - scaled error)
    return rows, grad_x_hat, grad_obs


def _continuous_bernoulli_recon(x_hat, x, dtype, grad_scale):
    """-log CB(x | l) per sample, and its gradient E_CB(l)[x] - x, from a = |l| and
    m = 1 - e^-a (one expm1 and one log per element):

        -log CB(x | l) = softplus(l) - l x - log C(l),  C(l) = l / tanh(l / 2) = a (1 + e^-a) / m
                       = max(l, 0) - l x - log(a / m)        (the log1p(e^-a) terms cancel)
        E_CB(l)[x]     = sigmoid(l) - (1/l - 1/sinh l) = 1/2 + sign(l) (w - 1/2),
        w = sigmoid(a) - (1/a - 1/sinh a) = p - 1/a + 2 e^-a p / m,  p = 1 / (1 + e^-a),

    with 1/a - 1/sinh a by its series below _numerics.CB_SERIES_BELOW (where the
    closed form cancels). a / m -> 1 as a -> 0 (a is floored at the smallest
    normal number, so l = 0 gives log 1 = 0: CB(1/2) is uniform); NaN stays NaN."""
    if _cpu_fusion.applies(x_hat, x, "continuous_bernoulli", dtype):  # one fused loop
        fused = _cpu_fusion.fused_recon(x_hat, x, "continuous_bernoulli", grad_scale)
        if fused is not None:  # (it checked the targets)
            return fused
    _validate.check_targets(x, "continuous_bernoulli")  # (recon_per_sample's why)
    logit, target = _as(x_hat, dtype), _as(x, dtype)
    a = torch.abs(logit, out=_empty_like_contiguous(logit, dtype)).clamp_(min=torch.finfo(dtype).tiny)
    m = torch.neg(a).expm1_().neg_()
    buf = torch.div(a, m).log_()
    # max(l, 0) - l x first: for a saturated logit they cancel (exactly at x = 1), and
    # log C(l) ~ log |l| is not rounded at the scale of l
    buf = torch.clamp_min(logit, 0.0, out=_empty_like_contiguous(logit, dtype)) \
        .addcmul_(logit, target, value=-1.0).sub_(buf)
    rows = _row_sum(buf)
    if grad_scale is None:
        return rows, None
    below = _numerics.CB_SERIES_BELOW.get(dtype, 0.5)
    near = a < below
    e_over = torch.neg(m, out=buf).add_(1.0)  # e^-a
    p = torch.add(e_over, 1.0).reciprocal_()
    e_over.mul_(p).mul_(2.0).div_(m)  # 2 e^-a p / m = 1 / sinh(a)
    g = torch.reciprocal(a, out=m).sub_(e_over)  # 1/a - 1/sinh(a), closed form
    t = torch.mul(a, a, out=e_over)
    series = torch.mul(t, 73 / 3421440).add_(-127 / 604800).mul_(t).add_(31 / 15120) \
        .mul_(t).add_(-7 / 360).mul_(t).add_(1 / 6).mul_(a)
    g = torch.where(near, series, g)
    # the CB mean, then minus the target, scaled
    grad = p.sub_(g).sub_(0.5).mul_(torch.sign(logit)).add_(0.5).sub_(target)
    return rows, grad if grad_scale == 1.0 else grad.mul_(grad_scale)


def recon_with_options(x_hat, x, recon, obs_logvar, obs_value, optimal, dtype, grad_scale):
    """(per-sample recon, grad_x_hat or None, grad_obs_logvar or None) for every recon:
    ``recon_per_sample`` and the observation models with a scale."""
    if recon in _numerics.OBS_SCALE:
        if obs_logvar is not None and obs_logvar.numel() > 1:
            return _elementwise_scale_recon(x_hat, x, recon, obs_logvar, dtype, grad_scale)
        rows, grad = _scalar_scale_recon(x_hat, x, recon, obs_logvar, obs_value, optimal,
                                         dtype, grad_scale)
        return rows, grad, None
    if recon == "continuous_bernoulli":
        return (*_continuous_bernoulli_recon(x_hat, x, dtype, grad_scale), None)
    return (*recon_per_sample(x_hat, x, recon, dtype, grad_scale), None)


def recon_grad_wrt_target(x_hat, recon, dtype):
    """Gradient of the per-element recon term with respect to the target ``x``,
    for the losses where it is not simply -d/dx_hat (bce, bce_logits,
    continuous_bernoulli)."""
    p = _as(x_hat, dtype)
    if recon in ("bce_logits", "continuous_bernoulli"):
        return -p
    log_p = torch.log(p).clamp_min_(BCE_LOG_FLOOR)
    log_1mp = torch.neg(p).log1p_().clamp_min_(BCE_LOG_FLOOR)
    return log_1mp.sub_(log_p)


def _clamped(logvar, lo, hi):
    if lo is None:
        return logvar
    return logvar.clamp(lo, hi)


def _zero_where_clamped(grad, logvar, lo, hi):
    """``grad`` (written) through clamp(logvar, lo, hi): zero where the clamp was active
    (logvar < lo or > hi), whatever the gradient there (a NaN from a NaN prior too), as
    torch.clamp's backward and the kernels' clamp_grad; a NaN logvar was not clamped and
    its gradient passes."""
    return grad.masked_fill_((logvar < lo) | (logvar > hi), 0.0)


def _fused_kl(mu, logvar, prior_mu, prior_logvar, lo, hi, dtype, reduction, scale, want_grad,
              want_prior_grad):
    """(kl reduced, g_mu, g_lv, g_pm, g_plv) from Inductor's fused CPU loop
    (fastvae._cpu_fusion.fused_kl: one pass where the torch ops make a dozen), or None
    where it does not serve this call."""
    if not _cpu_fusion.applies_kl(mu, logvar, prior_mu, prior_logvar, dtype):
        return None
    return _fused_kl_applied(mu, logvar, prior_mu, prior_logvar, lo, hi, reduction, scale,
                             want_grad, want_prior_grad)


def _fused_kl_applied(mu, logvar, prior_mu, prior_logvar, lo, hi, reduction, scale, want_grad,
                      want_prior_grad):
    """``_fused_kl`` where ``applies_kl`` held."""
    fused = _cpu_fusion.fused_kl(mu, logvar, prior_mu, prior_logvar, lo, hi, scale, want_grad,
                                 want_prior_grad)
    if fused is None:
        return None
    rows, *grads = fused
    return (reduce_per_sample(rows, reduction, scale), *grads)


def kl_per_sample(mu, logvar, lo, hi, dtype, grad_scale):
    """Per-sample KL(N(mu, exp(logvar)) || N(0, I)) sums (N,) and, if
    ``grad_scale`` is not None, ``grad_scale`` times the gradients of their sum
    with respect to mu and logvar."""
    if mu.dtype != dtype or logvar.dtype != dtype:
        # half-precision latents: converted block by block (never copied whole to
        # float32), gradients written once in their buffers' dtypes
        rows, grad_mu, grad_logvar, _, _ = _prior_kl_blocked(
            mu, logvar, None, None, lo, hi, dtype, 1.0 if grad_scale is None else grad_scale,
            grad_scale is not None, False, "rows")
        return rows, grad_mu, grad_logvar
    mu_c, lv = _as(mu, dtype), _clamped(_as(logvar, dtype), lo, hi)
    # exp(lv) - 1, reused as the logvar gradient: contiguous like every gradient
    # buffer (the fake implementations promise it, whatever logvar's layout)
    var_m1 = torch.expm1(lv, out=_empty_like_contiguous(lv, dtype))
    # mu^2 summed by vector_norm as it reads mu: an addcmul_ into the buffer would be
    # one more read-write pass (measured 25% slower at 4096x512)
    per_sample = 0.5 * (_row_sum_of_squares(mu_c) + _row_sum(torch.sub(var_m1, lv)))
    if grad_scale is None:
        return per_sample, None, None
    grad_mu = torch.mul(mu_c, grad_scale, out=_empty_like_contiguous(mu_c, dtype))
    grad_logvar = var_m1.mul_(0.5 * grad_scale)
    if lo is not None:
        _zero_where_clamped(grad_logvar, _as(logvar, dtype), lo, hi)
    return per_sample, grad_mu, grad_logvar


# ---- small inputs: whole-tensor ops ----------------------------------------
#
# At most SMALL_NUMEL elements (an MNIST batch is 2^17 / 1.3), a call's cost is
# its number of ops (each a few us of dispatch on the CPU), not memory traffic:
# the chunked and blocked machinery above exists for cache and long-row accuracy
# at large sizes. Here the recon and KL are a handful of whole-tensor ops, and
# only the totals are computed when no per-sample sums are asked for. Every sum
# is torch.sum's (cascade summation, eager's accuracy; aten's mse_loss / l1_loss
# reduce with it too), never a running float32 sum.
SMALL_NUMEL = 1 << 17
SMALL_RECONS = ("mse", "l1")

# Except the KL alone of half-precision latents from SMALL_HALF_KL_NUMEL elements: the
# general path's fused loop (_cpu_fusion.fused_kl) reads them as they are, where the
# whole-tensor ops convert both to float32 and run aten's scalar expm1. bf16 forward +
# backward against eager, interleaved, 2 cores (2026-12-08): 8x4x64x64 0.78x -> 1.13x,
# 4x4x64x64 0.87x -> 1.00x; at 8x4x32x32 (2^15, rows of 4096, summed in a second loop)
# no gain (0.82x either way).
SMALL_HALF_KL_NUMEL = 1 << 16

_constants = {}
MAX_CONSTANTS = 64  # then the cache starts again


def constant(value, dtype, device):
    """A cached 0-dim tensor holding ``value`` (a finite float), for reading only:
    an op given a Python number wraps it in a fresh tensor on every call."""
    key = (value, dtype, device)
    t = _constants.get(key)
    if t is None:
        if len(_constants) >= MAX_CONSTANTS:
            _constants.clear()
        with torch.inference_mode(False):  # usable outside inference mode too
            t = _constants[key] = torch.full((), value, dtype=dtype, device=device)
    return t


def _contiguous_result(op, t, dtype, *args, **kwargs):
    """``op(t, *args)`` in a contiguous buffer (gradient buffers are contiguous: the
    fake implementations promise it), allocated only if ``t`` is not contiguous."""
    if t.is_contiguous():
        return op(t, *args, **kwargs)
    return op(t, *args, **kwargs, out=_empty_like_contiguous(t, dtype))


def _small_recon(x_hat, x, recon, dtype, reduction, scale, want_grad):
    """mse / l1 of at most SMALL_NUMEL elements: (the reduced recon, scale times
    the gradient of the reduced sum with respect to x_hat, or None)."""
    p, target = _as(x_hat, dtype), _as(x, dtype)
    if reduction == "none":
        terms = torch._C._nn.mse_loss(p, target, _NONE) if recon == "mse" \
            else torch._C._nn.l1_loss(p, target, _NONE)
        value = _row_sum(terms)
    else:
        value = torch._C._nn.mse_loss(p, target, _SUM) if recon == "mse" \
            else torch._C._nn.l1_loss(p, target, _SUM)
        if scale != 1.0:
            value = value.mul_(constant(scale, dtype, p.device))
    if not want_grad:
        return value, None
    out = _empty_like_contiguous(p, dtype)
    if recon == "mse":  # (x_hat - x) (2 scale) in one pass
        grad = _scaled_mse_grad(constant(2.0 * scale, dtype, p.device), p, target, out=out)
    else:
        grad = torch.sub(p, target, out=out).sign_()
        if scale != 1.0:
            grad.mul_(constant(scale, dtype, p.device))
    return value, grad


def _small_kl(mu, logvar, lo, hi, dtype, reduction, scale, want_grad):
    """The KL of at most SMALL_NUMEL elements: (the reduced KL, then scale times
    its gradients with respect to mu and logvar, or None, None)."""
    if not want_grad:
        return small_kl_value(mu, logvar, lo, hi, dtype, reduction)[0], None, None
    mu_c, lv = _as(mu, dtype), _clamped(_as(logvar, dtype), lo, hi)
    var_m1 = _contiguous_result(torch.expm1, lv, dtype)  # exp(lv) - 1, exact near 0
    # the terms halved as they are built (exact: a power of two)
    half_var_m1 = var_m1.mul_(constant(0.5, dtype, lv.device))  # d kl / d lv, unscaled
    terms = torch.sub(half_var_m1, lv, alpha=0.5).addcmul_(mu_c, mu_c, value=0.5)
    value = _row_sum(terms) if reduction == "none" else terms.sum()
    if scale != 1.0:
        scale_t = constant(scale, dtype, mu_c.device)
        value = value.mul_(scale_t)
        grad_mu = _contiguous_result(torch.mul, mu_c, dtype, scale_t)
        half_var_m1.mul_(scale_t)
    elif mu_c is not mu and mu_c.is_contiguous():
        grad_mu = mu_c  # a fresh converted copy: the gradient itself
    else:
        grad_mu = mu_c.clone(memory_format=torch.contiguous_format)
    if lo is not None:
        _zero_where_clamped(half_var_m1, _as(logvar, dtype), lo, hi)
    return value, grad_mu, half_var_m1


# ---- small inputs in plain eager mode: the gradients in the backward ------
#
# The ops' contract is gradients computed in the forward pass (one pass over
# large inputs), scaled by grad_output in the backward. At most SMALL_NUMEL
# elements a call costs its number of ops instead, so fastvae.ops runs plain
# eager calls there as eager PyTorch would: the values alone in the forward, and
# in the backward each gradient by one op with grad_output already folded in (no
# gradient op in a forward whose backward never runs, no scaling op after).
# Traced graphs (torch.compile, export) keep the custom ops and their contract.


# Not bce: aten's binary_cross_entropy (and its backward) took twice the time of the
# chunked path at MNIST size (1.03 against 0.53 ms per forward + backward, 2026-12-06).
SMALL_EAGER_RECONS = ("mse", "l1", "bce_logits")


def small_eager_applies(x_hat, mu, recon):
    """Whether this loss (mse, l1 or bce_logits against N(0, I), no obs_logvar or free
    bits, checked by the caller) is small enough for the backward-computed gradients."""
    return recon in SMALL_EAGER_RECONS and x_hat.numel() <= SMALL_NUMEL \
        and mu.numel() <= SMALL_NUMEL


# ---- large float16 losses: the small losses' two loops -------------------
#
# A float16 x_hat's gradient buffer is float32 (grad_buffer_dtype: float16's range
# cannot hold a reduced gradient times a loss scale), written in the forward and
# rounded to float16 in the backward: 14 bytes moved per element where bfloat16's
# buffer moves 6, and at 512x12288 mse forward + backward took 3.6 ms against
# bfloat16's 1.5 (eager: 2.8). The small losses' split computes the float16 gradient
# in the backward instead, grad_output folded in and rounded once (the same bits
# where grad_output is 1, one rounding fewer where it is not): 10 bytes an element,
# no float32 buffer. Fused loops only (``_cpu_fusion.warm_large_half``): the small
# path's torch ops would copy the whole inputs to float32.


def large_half_applies(x_hat, x, mu, logvar, recon, reduction, lo):
    """Whether this loss (mse, l1 or bce_logits against N(0, I), no obs_logvar or free
    bits, checked by the caller) is a large float16 one that the small losses' fused
    loops serve (this call counted towards their warm-up)."""
    if x_hat.dtype != torch.float16 or recon not in SMALL_EAGER_RECONS \
            or x_hat.numel() <= SMALL_NUMEL:
        return False
    # (not under saved-tensor hooks, where the small path takes its torch ops, nor for a
    # target with a gradient, which they compute, nor for an inference-mode target, which
    # the split would copy to save it)
    return not saved_tensor_hooks_active() and not (x.requires_grad and torch.is_grad_enabled()) \
        and not x.is_inference() \
        and _cpu_fusion.applies_small(x_hat, x, mu, logvar, compute_dtype(x_hat, x, mu, logvar)) \
        and _cpu_fusion.warm_large_half(recon, x_hat, x, mu, logvar, reduction == "none",
                                        lo is not None)


def _compile_at(x_hat):
    """When a small loss's loops compile: at once for a large float16 one (warmed up)."""
    return 1 if x_hat.numel() > SMALL_NUMEL else _cpu_fusion.COMPILE_AT_CALL


def _small_bce_logits_value(x_hat, x, dtype, reduction, scale):
    """bce_logits of at most SMALL_NUMEL elements, reduced (no gradient): softplus(l) -
    l x, as the larger path computes it (F.softplus's threshold 20)."""
    p, target = _as(x_hat, dtype), _as(x, dtype)
    terms = torch._C._nn.softplus(p, 1, 20).addcmul_(p, target, value=-1.0)
    value = _row_sum(terms) if reduction == "none" else terms.sum()
    return value if scale == 1.0 else value.mul_(constant(scale, dtype, p.device))


def small_kl_value(mu, logvar, lo, hi, dtype, reduction):
    """(the reduced KL, exp(lv) - 1, mu and logvar in ``dtype``) of at most
    SMALL_NUMEL elements: the last three for a backward (half-precision latents
    converted once, not again there)."""
    mu_c, logvar_c = _as(mu, dtype), _as(logvar, dtype)
    lv = _clamped(logvar_c, lo, hi)
    var_m1 = torch.expm1(lv)  # exp(lv) - 1, exact near 0
    terms = torch.sub(var_m1, lv).addcmul_(mu_c, mu_c)
    value = _row_sum(terms) if reduction == "none" else terms.sum()
    scale = 0.5 * reduction_scale(reduction, mu.shape[0], mu.numel())
    return value.mul_(constant(scale, dtype, mu.device)), var_m1, mu_c, logvar_c


def small_loss_values(x_hat, x, mu, logvar, beta, beta_value, recon, reduction, lo, hi,
                      fuse=True):
    """((loss, recon, kl), (x_hat, x, mu, logvar, exp(lv) - 1) in the compute dtype):
    the values of ``vae_loss_forward`` for the inputs ``small_eager_applies`` to, no
    gradient, and what the backward needs (half-precision inputs converted once). From
    the fused loop (_cpu_fusion.fused_small_values) the inputs as given and None for
    exp(lv) - 1: the backward's own loop reads them (``small_fused_grads``); not
    without ``fuse``."""
    dtype = compute_dtype(x_hat, x, mu, logvar)
    recon_scale = reduction_scale(reduction, x_hat.shape[0], x_hat.numel())
    if fuse and _cpu_fusion.applies_small(x_hat, x, mu, logvar, dtype):
        # one fused loop (from its third call): the inputs kept as they are, no exp(lv) - 1
        fused = _cpu_fusion.fused_small_values(
            x_hat, x, mu, logvar, recon, reduction == "none", recon_scale,
            reduction_scale(reduction, mu.shape[0], mu.numel()), lo, hi, _compile_at(x_hat))
        if fused is not None:  # (it checked the targets)
            recon_out, kl_out = fused
            return (_weighted_sum(recon_out, kl_out, beta, beta_value, dtype), recon_out,
                    kl_out), (x_hat, x, mu, logvar, None)
    _validate.check_targets(x, recon)  # (recon_per_sample's why)
    p, target = _as(x_hat, dtype), _as(x, dtype)
    if recon in SMALL_RECONS:
        recon_out, _ = _small_recon(p, target, recon, dtype, reduction, recon_scale, False)
    else:
        recon_out = _small_bce_logits_value(p, target, dtype, reduction, recon_scale)
    kl_out, var_m1, mu_c, logvar_c = small_kl_value(mu, logvar, lo, hi, dtype, reduction)
    return (_weighted_sum(recon_out, kl_out, beta, beta_value, dtype), recon_out, kl_out), \
        (p, target, mu_c, logvar_c, var_m1)


def _weighted_sum(recon_out, kl_out, beta, beta_value, dtype):
    """recon + beta kl, rounded the same for a float and a tensor beta: add's alpha for a
    float or a CPU tensor (its value read for free; addcmul would refuse a CPU scalar with
    CUDA data), else addcmul, which rounds as alpha does (a multiply and an add round
    twice: an ulp off in 247 of 1920 losses)."""
    if beta is None or beta.device.type == "cpu":
        return torch.add(recon_out, kl_out, alpha=beta_value if beta is None else float(beta))
    return torch.addcmul(recon_out, _as(beta, dtype), kl_out)


def _weight(w, reduction, batch, numel, like_dim):
    """w times the reduction's scale, shaped to broadcast over a (N, ...) tensor of
    ``like_dim`` dims (w is 0-dim, or (N,) for reduction="none")."""
    scale = reduction_scale(reduction, batch, numel)
    if scale != 1.0:
        w = w * scale
    return w.reshape((-1,) + (1,) * (like_dim - 1)) if w.dim() == 1 else w


def small_recon_grad(x_hat, x, recon, reduction, dtype, w):
    """d/dx_hat of ``w`` times the reduced recon (``SMALL_EAGER_RECONS``), in ``dtype``
    (the forward's compute dtype; w: the recon's output gradient)."""
    p, target = _as(x_hat, dtype), _as(x, dtype)
    w = _weight(w, reduction, x_hat.shape[0], x_hat.numel(), x_hat.dim())
    if recon == "mse":
        # ((x_hat - x) w) 2: the bits of (x_hat - x) (2 w) (doubling is exact), and no
        # overflow of a doubled difference; cheaper at these sizes than one fused op
        return torch.sub(p, target).mul_(w).mul_(constant(2.0, dtype, p.device))
    if recon == "bce_logits":
        return torch.sigmoid(p).sub_(target).mul_(w)
    return torch.sub(p, target).sign_().mul_(w)


def small_target_grad(x_hat, recon, reduction, dtype, w, grad_x_hat):
    """d/dx of ``w`` times the reduced recon: -d/dx_hat for mse and l1 (given as
    ``grad_x_hat``), else from x_hat alone (``recon_grad_wrt_target``)."""
    if recon in SMALL_RECONS:
        return grad_x_hat.neg()
    w = _weight(w, reduction, x_hat.shape[0], x_hat.numel(), x_hat.dim())
    return recon_grad_wrt_target(x_hat, recon, dtype).mul_(w)


def small_kl_grads(mu, logvar, var_m1, lo, hi, reduction, dtype, w, need_mu, need_lv):
    """(d/dmu, d/dlogvar) of ``w`` times the reduced KL, in ``dtype``, from the
    forward's exp(lv) - 1 (None where not needed; ``mu`` and ``var_m1`` may be None where
    their gradient is not, ``logvar`` without a clamp)."""
    like = mu if need_mu else var_m1  # (the latents' shape)
    w = _weight(w, reduction, like.shape[0], like.numel(), like.dim())
    grad_mu = torch.mul(_as(mu, dtype), w) if need_mu else None
    grad_lv = None
    if need_lv:
        grad_lv = torch.mul(var_m1, w).mul_(constant(0.5, dtype, like.device))
        if lo is not None:
            _zero_where_clamped(grad_lv, _as(logvar, dtype), lo, hi)
    return grad_mu, grad_lv


def small_var_m1(logvar, lo, hi, dtype):
    """exp(lv) - 1 of the clamped logvar in ``dtype`` (for small_kl_grads, where the
    forward's fused loop did not keep it)."""
    return torch.expm1(_clamped(_as(logvar, dtype), lo, hi))


def small_fused_grads(x_hat, x, mu, logvar, recon, reduction, lo, hi, w_recon, w_kl, dtypes):
    """(d/dx_hat, d/dmu, d/dlogvar) in ``dtypes`` (None: not wanted) of w_recon times the
    reduced recon and w_kl times the reduced KL (each grad_output, 0-dim or (N,); None
    where no gradient flows) from one fused loop, or None where the torch ops are to run
    (not yet its third call). The forward's fused loop ran (``applies_small`` held)."""
    batch = x_hat.shape[0]
    w_recon = None if w_recon is None else _scaled_weight(
        w_recon, reduction_scale(reduction, batch, x_hat.numel()))
    w_kl = None if w_kl is None else _scaled_weight(
        w_kl, reduction_scale(reduction, batch, mu.numel()))
    return _cpu_fusion.fused_small_grads(x_hat, x, mu, logvar, recon, w_recon, w_kl, lo, hi,
                                         dtypes, _compile_at(x_hat))


def _scaled_weight(w, scale):
    """grad_output w times a reduction's scale, float32 and contiguous for a fused loop."""
    w = w if scale == 1.0 else w * scale
    return w.float().contiguous()


def _grad_or_empty(grad, like):
    """The gradient buffer (see grad_buffer_dtype), or a fresh empty tensor when none
    was computed (custom-op outputs may not alias each other)."""
    return like.new_empty(0) if grad is None else _as(grad, grad_buffer_dtype(like.dtype))


def _summed_grad_or_empty(grad, like, full):
    """``_grad_or_empty`` for the ``full``-shaped gradient of ``like`` (a prior, an
    obs_logvar), in ``summed_grad_dtype``: float32 where a half-precision ``like``
    broadcasts, so that the backward's sum over its broadcast dims rounds once."""
    return like.new_empty(0) if grad is None else _as(grad, summed_grad_dtype(like, full))


def vae_loss_forward(x_hat, x, mu, logvar, beta, obs_logvar, beta_value, recon,
                     obs_logvar_value, obs_logvar_optimal, reduction,
                     clamp_lo, clamp_hi, grad_recon, grad_kl):
    """Returns (loss, recon, kl, grad_x_hat, grad_mu, grad_logvar, grad_obs_logvar);
    the gradients are of the *reduced* recon and kl (beta not applied), or empty
    tensors when not asked for. grad_obs_logvar is x-shaped for an obs_logvar of
    more than one element, empty otherwise (ops derives a scalar's from recon)."""
    dtype = compute_dtype(x_hat, x, mu, logvar)
    batch = x_hat.shape[0]
    recon_scale = reduction_scale(reduction, batch, x_hat.numel())
    kl_scale = reduction_scale(reduction, batch, mu.numel())

    # small inputs; or, without a gradient, a total of inputs already in the compute
    # dtype that fit in cache: aten's own mse_loss / l1_loss sum in one call (eager's
    # op and accuracy) beats the per-sample blocked sums there (CHUNKED_NO_GRAD_NUMEL)
    if recon in SMALL_RECONS and (x_hat.numel() <= SMALL_NUMEL or (
            not grad_recon and reduction != "none" and x_hat.dtype == dtype == x.dtype
            and not _blocked_without_gradient(x_hat, x))):
        recon_out, g_xhat = _small_recon(x_hat, x, recon, dtype, reduction, recon_scale,
                                         grad_recon)
        g_obs = None
    else:
        recon_rows, g_xhat, g_obs = recon_with_options(
            x_hat, x, recon, obs_logvar, obs_logvar_value, obs_logvar_optimal, dtype,
            recon_scale if grad_recon else None)
        recon_out = reduce_per_sample(recon_rows, reduction, recon_scale)
    fused = _fused_kl(mu, logvar, None, None, clamp_lo, clamp_hi, dtype, reduction, kl_scale,
                      grad_kl, False)
    if fused is not None:
        kl_out, g_mu, g_lv, _, _ = fused
    elif mu.numel() <= SMALL_NUMEL:
        kl_out, g_mu, g_lv = _small_kl(mu, logvar, clamp_lo, clamp_hi, dtype, reduction,
                                       kl_scale, grad_kl)
    else:
        kl_rows, g_mu, g_lv = kl_per_sample(
            mu, logvar, clamp_lo, clamp_hi, dtype, kl_scale if grad_kl else None)
        kl_out = reduce_per_sample(kl_rows, reduction, kl_scale)
    loss = _weighted_sum(recon_out, kl_out, beta, beta_value, dtype)  # one op
    return (loss, recon_out, kl_out, _grad_or_empty(g_xhat, x_hat),
            _grad_or_empty(g_mu, mu), _grad_or_empty(g_lv, logvar),
            _summed_grad_or_empty(g_obs, x_hat if obs_logvar is None else obs_logvar, x_hat))


def kl_forward(mu, logvar, reduction, clamp_lo, clamp_hi, want_grad):
    """Returns (kl, grad_mu, grad_logvar) for the reduced KL; gradients empty if not asked for."""
    dtype = compute_dtype(mu, logvar)
    scale = reduction_scale(reduction, mu.shape[0], mu.numel())
    fused = _fused_kl(mu, logvar, None, None, clamp_lo, clamp_hi, dtype, reduction, scale,
                      want_grad, False)
    if fused is not None:
        kl, g_mu, g_lv, _, _ = fused
        return kl, _grad_or_empty(g_mu, mu), _grad_or_empty(g_lv, logvar)
    if mu.numel() <= SMALL_NUMEL:
        kl, g_mu, g_lv = _small_kl(mu, logvar, clamp_lo, clamp_hi, dtype, reduction, scale,
                                   want_grad)
        return kl, _grad_or_empty(g_mu, mu), _grad_or_empty(g_lv, logvar)
    rows, g_mu, g_lv = kl_per_sample(mu, logvar, clamp_lo, clamp_hi, dtype,
                                     scale if want_grad else None)
    return (reduce_per_sample(rows, reduction, scale),
            _grad_or_empty(g_mu, mu), _grad_or_empty(g_lv, logvar))


# ---- reparameterization -------------------------------------------------

# Elements drawn from one CPU generator. Fixed (not the thread count), so the
# noise of a seed is the same however many threads draw it.
NOISE_CHUNK = 1 << 18
_MASK64 = (1 << 64) - 1


def _chunk_seed(seed, index):
    """Seed of chunk ``index`` of a draw: splitmix64 of (seed, index), so every
    bit, including the low 32 that the CPU generator (mt19937) keeps, depends on both."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_noise_pool_state = {}


def _noise_pool(workers):
    """A thread pool for drawing CPU noise chunks (one per process: pools do not survive fork)."""
    import concurrent.futures
    import os

    key = (os.getpid(), workers)
    pool = _noise_pool_state.get(key)
    if pool is None:
        for old_key in [k for k in _noise_pool_state if k[0] != key[0]]:
            del _noise_pool_state[old_key]  # inherited through fork: its threads are gone
        pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fastvae-noise")
        _noise_pool_state[key] = pool
    return pool


_thread_generators = threading.local()  # standard_normal's CPU generator, per thread


def _cpu_generator():
    """This thread's CPU generator for draws that reseed it first: one object will do."""
    gen = getattr(_thread_generators, "cpu", None)
    if gen is None:
        gen = _thread_generators.cpu = torch.Generator()
    return gen


def _reseeded_normal(gen, seed, shape, dtype, device, std, like=None):
    """N(0, std^2) noise of ``shape`` drawn by ``gen`` reseeded from ``seed``: the draw of
    a call of at most NOISE_CHUNK elements (normal_ scales as it writes: for a power of
    two ``std``, bit for bit ``randn * std`` in float32 and float64, the compute dtypes,
    without a second pass). ``like``: a tensor of that shape on that device, to allocate
    from (cheaper)."""
    gen.manual_seed(_chunk_seed(seed, -1))  # mt19937 keeps only 32 bits: mix all 62 in
    out = torch.empty(shape, dtype=dtype, device=device) if like is None \
        else _empty_like_contiguous(like, dtype)
    return out.normal_(0.0, std, generator=gen)


def standard_normal(seed, shape, dtype, device, std=1.0):
    """The noise eps ~ N(0, I) of one reparameterize call (times ``std``, a power
    of two keeps it exact), reproducible from ``seed`` so that the backward can
    regenerate it instead of saving it.

    PyTorch's CPU generator is sequential (one core whatever the thread count),
    and drawing the noise is most of a reparameterization on the CPU: large CPU
    draws are split into chunks of NOISE_CHUNK elements, each from its own
    generator seeded from (seed, chunk index), drawn on torch.get_num_threads()
    threads (the ops release the GIL).

    ``seed``: an int or a 1-element int64 tensor, read on the host (free for a CPU
    tensor; a device sync for a CUDA one, which only this path on CUDA meets)."""
    seed = int(seed)
    if type(device) is not torch.device:
        device = torch.device(device)
    numel = math.prod(shape)
    if device.type != "cpu" or numel <= NOISE_CHUNK:
        gen = _cpu_generator() if device.type == "cpu" else torch.Generator(device=device)
        return _reseeded_normal(gen, seed, shape, dtype, device, std)
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    starts = range(0, numel, NOISE_CHUNK)

    def draw(index):
        gen = torch.Generator()
        gen.manual_seed(_chunk_seed(seed, index))
        flat[starts[index]:starts[index] + NOISE_CHUNK].normal_(0.0, std, generator=gen)

    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1:
        list(_noise_pool(workers).map(draw, range(len(starts))))
    else:
        for index in range(len(starts)):
            draw(index)
    return out


# On the CPU the forward keeps its noise for the backward instead of the backward
# drawing it again: the CPU generator is the bottleneck (a 4096x512 draw took 4 ms
# of a 6.5 ms backward), and latents are small next to the data. At most
# KEPT_NOISE_SLOTS draws are held (a forward whose backward never runs is evicted
# by later ones); a backward that finds none (a second backward, an evicted slot)
# regenerates it from the seed, bit for bit the same noise. GPU kernels regenerate.
KEPT_NOISE_SLOTS = 4
_kept_noise = {}
_kept_noise_lock = threading.Lock()


def _noise_key(seed, shape, dtype, device):
    # the seed's value (a CPU int64 tensor or an int): tensors hash by identity, and the
    # backward's saved seed need not be the forward's Python object
    return (int(seed), tuple(shape), dtype, device)


def _scaled_noise_key(seed, shape, dtype, logvar, clamp_lo, clamp_hi):
    """The slot of eps std / 2, which depends on logvar too: its storage, place, layout
    and version counter name its values (autograd refuses a backward whose saved
    logvar was written since), and the clamp. Two calls share a slot only if they drew
    from one seed (a reseeded generator) with the same logvar: then they kept the same
    values. A key the backward does not find (another tensor object under compile, an
    evicted slot) means the noise is drawn again, never a wrong one. An inference tensor
    has no version counter: -1 (the forward keeps nothing for one: its backward reads a
    copy of it, another storage; a direct call of the backward op may still pass one)."""
    version = -1 if logvar.is_inference() else logvar._version
    return (_noise_key(seed, shape, dtype, logvar.device), logvar.untyped_storage().data_ptr(),
            logvar.storage_offset(), tuple(logvar.stride()), version, clamp_lo, clamp_hi)


def _keep_noise(key, eps):
    with _kept_noise_lock:
        _kept_noise.pop(key, None)
        _kept_noise[key] = eps
        while len(_kept_noise) > KEPT_NOISE_SLOTS:
            del _kept_noise[next(iter(_kept_noise))]  # the oldest


def _take_noise(key):
    with _kept_noise_lock:
        return _kept_noise.pop(key, None)


def reparameterize_forward(mu, logvar, seed, clamp_lo, clamp_hi, with_kl):
    """z = mu + exp(lv / 2) * eps and, if ``with_kl``, the per-sample KL (N,)."""
    dtype = compute_dtype(mu, logvar)
    if dtype == torch.float32 and _cpu_fusion.applies_sample(mu, logvar):
        fused = _fused_sample(mu, logvar, seed, clamp_lo, clamp_hi, with_kl)
        if fused is not None:
            return fused
    lv = _clamped(_as(logvar, dtype), clamp_lo, clamp_hi)
    half_c = constant(0.5, dtype, lv.device)
    # a converted or clamped logvar is this call's buffer: std is written over it (the
    # KL still reads lv)
    std = lv.mul_(half_c).exp_() if lv is not logvar and not with_kl \
        else torch.mul(lv, half_c).exp_()
    seed = int(seed)  # read once (a CPU tensor: no sync; the kernels serve CUDA)
    mu_c = _as(mu, dtype)
    if mu.device.type == "cpu" and (mu.requires_grad or logvar.requires_grad):
        # eps / 2 drawn (exactly half of the seed's eps: a power of two), so that
        # z = mu + 2 (eps / 2) std is bit for bit mu + eps std and the kept
        # eps std / 2 = d z / d logvar takes one pass. z is contiguous like the noise
        # (the fake implementation promises it): written over a converted mu (this
        # call's buffer) when the KL does not read it
        half_eps = standard_normal(seed, mu.shape, dtype, mu.device, std=0.5)
        own_mu = mu_c is not mu and not with_kl and mu_c.is_contiguous()
        z = torch.addcmul(mu_c, half_eps, std, value=2.0,
                          out=mu_c if own_mu else _empty_like_contiguous(half_eps, dtype))
        if not logvar.is_inference():  # (its backward reads a copy, another key: it draws again)
            _keep_noise(_scaled_noise_key(seed, mu.shape, dtype, logvar, clamp_lo, clamp_hi),
                        half_eps.mul_(std))
    else:
        eps = standard_normal(seed, mu.shape, dtype, mu.device)
        z = torch.addcmul(mu_c, eps, std, out=eps)  # written over eps
    z = _as(z, _sample_dtype(mu, logvar))
    if not with_kl:
        return z, mu.new_empty(0, dtype=dtype)
    if mu.numel() <= SMALL_NUMEL:
        return z, _small_sample_kl_rows(mu_c, lv, std, dtype)
    # exp(lv) - 1 - lv elementwise, as in _small_sample_kl_rows
    kl = 0.5 * (_row_sum_of_squares(mu_c) + _row_sum(std.square_().sub_(1.0).sub_(lv)))
    return z, kl


def _fused_sample(mu, logvar, seed, clamp_lo, clamp_hi, with_kl):
    """reparameterize_forward's (z, kl or empty) for half-precision latents from
    Inductor's fused CPU loop (fastvae._cpu_fusion.fused_sample) around the same draw of
    noise, keeping eps std / 2 as that path does; None where the loop does not serve."""
    seed = int(seed)
    keep = mu.requires_grad or logvar.requires_grad
    # with a gradient, eps / 2 drawn and eps std / 2 kept (why: reparameterize_forward's
    # torch ops above); else eps
    fused = _cpu_fusion.fused_sample(
        mu, logvar,
        lambda: standard_normal(seed, mu.shape, torch.float32, mu.device, 0.5 if keep else 1.0),
        clamp_lo, clamp_hi, keep, keep, with_kl)
    if fused is None:
        return None
    z, kept, rows = fused
    if keep and not logvar.is_inference():
        _keep_noise(_scaled_noise_key(seed, mu.shape, torch.float32, logvar, clamp_lo, clamp_hi),
                    kept)
    return z, (rows if with_kl else mu.new_empty(0, dtype=torch.float32))


def _sample_dtype(mu, logvar):
    """z's dtype: mu's and logvar's, promoted."""
    return mu.dtype if mu.dtype == logvar.dtype else torch.promote_types(mu.dtype, logvar.dtype)


def _small_sample_kl_rows(mu_c, lv, std, dtype):
    """The per-sample KL of at most SMALL_NUMEL latent elements, by whole-tensor ops (see
    SMALL_NUMEL), ``std`` = exp(lv / 2) used up: exp(lv) - 1 - lv elementwise (no
    cancellation between sums), exp(lv) as std^2 (an exp pass saved on the
    reparameterization's hot path, at eager's accuracy: about 1e-7 absolute per
    element near lv = 0, where expm1 would be exact), mu^2 added elementwise."""
    one, half = constant(1.0, dtype, lv.device), constant(0.5, dtype, lv.device)
    terms = std.square_().sub_(one).sub_(lv).addcmul_(mu_c, mu_c)
    return _row_sum(terms).mul_(half)


def reparameterize_backward(grad_z, grad_kl, mu, logvar, seed, clamp_lo, clamp_hi):
    """Gradients of reparameterize(+KL) with respect to mu and logvar.

    dz/dmu = 1, dz/dlv = eps * exp(lv / 2) / 2; dkl/dmu = mu, dkl/dlv = (exp(lv) - 1) / 2.
    """
    dtype = compute_dtype(mu, logvar)
    # eps std / 2: the forward's, kept (this call's to write), or drawn again from the
    # seed and formed as the forward formed it (the same bits)
    scaled = None
    if mu.device.type == "cpu":
        scaled = _take_noise(_scaled_noise_key(seed, mu.shape, dtype, logvar, clamp_lo, clamp_hi))
    if scaled is None:
        lv = _clamped(_as(logvar, dtype), clamp_lo, clamp_hi)
        scaled = standard_normal(seed, mu.shape, dtype, mu.device, std=0.5) \
            .mul_(torch.mul(lv, constant(0.5, dtype, lv.device)).exp_())
    return _sampling_grads(grad_z, grad_kl, mu, logvar, scaled, clamp_lo, clamp_hi, True,
                           mu.dtype, logvar.dtype)


def _sampling_grads(grad_z, grad_kl, mu, logvar, scaled, clamp_lo, clamp_hi, owned, mu_dtype,
                    lv_dtype):
    """(d/dmu, d/dlogvar) of reparameterize(+KL), in ``mu_dtype`` and ``lv_dtype``, from
    ``scaled`` = eps std / 2 = d z / d logvar (mu-shaped, in the compute dtype). ``mu``
    is read only with the KL, ``logvar`` only with the KL or a clamp (else they may be
    None). ``owned``: ``scaled`` is this call's to write and the gradients may not alias
    grad_z (the custom op's backward); else ``scaled`` is read only (a saved tensor that
    a second backward reads again) and d z / d mu is grad_z itself, passed on as
    eager's add passes it."""
    dtype = scaled.dtype
    # eps std g_z / 2; a half-precision grad_z is widened exactly by the op (as fast as
    # converting it first, without the float32 copy)
    g_z = grad_z if grad_z.dtype.itemsize <= scaled.dtype.itemsize else _as(grad_z, dtype)
    if not owned and grad_kl is None and clamp_lo is None and lv_dtype != dtype:
        # the product is the gradient: rounded once on the store into logvar's dtype
        # (one op, not a product and a conversion; the same bits)
        return (_as(grad_z, mu_dtype),
                torch.mul(scaled, g_z, out=_empty_like_contiguous(scaled, lv_dtype)))
    grad_logvar = scaled.mul_(g_z) if owned else torch.mul(scaled, g_z)
    if grad_kl is not None or clamp_lo is not None:
        logvar_c = _as(logvar, dtype)
    if grad_kl is not None:
        g_kl = _as(grad_kl, dtype).reshape((-1,) + (1,) * (scaled.dim() - 1))
        # exp(lv) - 1 by expm1: one pass, exact near lv = 0
        grad_logvar.addcmul_(torch.expm1(_clamped(logvar_c, clamp_lo, clamp_hi)), g_kl, value=0.5)
        # (owned: a fresh contiguous buffer, as the backward op's fake implementation promises)
        grad_mu = torch.addcmul(_as(grad_z, dtype), _as(mu, dtype), g_kl,
                                out=torch.empty_like(grad_logvar) if owned else None)
    elif owned:
        # exactly grad_z, in mu's dtype, in a fresh contiguous buffer
        grad_mu = grad_z.to(mu_dtype, copy=True, memory_format=torch.contiguous_format)
    else:
        grad_mu = grad_z
    if clamp_lo is not None:
        _zero_where_clamped(grad_logvar, logvar_c, clamp_lo, clamp_hi)
    return _as(grad_mu, mu_dtype), _as(grad_logvar, lv_dtype)


# ---- small CPU sampling: the noise saved, not kept in the table ----------
#
# A plain eager reparameterize / sample_and_kl with gradients, against N(0, I), of at
# most SMALL_NUMEL latent elements on the CPU (ops._SmallSampleFunction): the
# arithmetic of reparameterize_forward / _backward above (the same bits), with eps
# std / 2 returned to the caller to save with its autograd node instead of kept in the
# table: nothing to key or look up, and a second backward reads it again. It is at
# most SMALL_NUMEL elements in the compute dtype (float32 for half-precision latents).


def small_sample_forward(mu, logvar, seed, clamp_lo, clamp_hi, with_kl, keep=True):
    """(z, the per-sample KL (N,) or None without ``with_kl``, eps std / 2 or None without
    ``keep``: a call without gradients)."""
    dtype = compute_dtype(mu, logvar)
    half_c = constant(0.5, dtype, mu.device)
    # Half-precision latents without the KL (which reads lv) or a clamp: the converted
    # copy is this call's, std is written over it (at these sizes a call's cost is its
    # ops: a conversion and two in-place ops took ~3.7 us, a mixed-dtype mul into a
    # float32 buffer ~5.6; the same bits, lv / 2 is exact in float32)
    if logvar.dtype != dtype and not with_kl and clamp_lo is None:
        std = _as(logvar, dtype).mul_(half_c).exp_()
    else:
        lv = _clamped(_as(logvar, dtype), clamp_lo, clamp_hi)
        std = torch.mul(lv, half_c).exp_()
    half_eps = _reseeded_normal(_cpu_generator(), int(seed), mu.shape, dtype, mu.device, 0.5,
                                like=mu)
    z_dtype = _sample_dtype(mu, logvar)
    # bit for bit mu + eps std, computed in the compute dtype and rounded once to z's;
    # contiguous like the noise whatever mu's layout (as the general path's z and the
    # fake implementation's)
    if mu.dtype == z_dtype != dtype and not with_kl:
        # (mu widened inside the op, z rounded on the store into a half-precision z)
        z = torch.addcmul(mu, half_eps, std, value=2.0, out=_empty_like_contiguous(mu, z_dtype))
    else:
        mu_c = _as(mu, dtype)
        z = torch.addcmul(mu_c, half_eps, std, value=2.0,
                          out=None if mu_c.is_contiguous() and std.is_contiguous()
                          else _empty_like_contiguous(half_eps, dtype))
        z = _as(z, z_dtype)
    kept = half_eps.mul_(std) if keep else None
    if not with_kl:
        return z, None, kept
    return z, _small_sample_kl_rows(mu_c, lv, std, dtype), kept


def small_sample_backward(grad_z, grad_kl, mu, logvar, kept, clamp_lo, clamp_hi, mu_dtype,
                          lv_dtype):
    """The gradients from the saved eps std / 2 (read, not written); ``mu`` is read only
    with the KL, ``logvar`` only with the KL or a clamp (None otherwise)."""
    return _sampling_grads(grad_z, grad_kl, mu, logvar, kept, clamp_lo, clamp_hi, False,
                           mu_dtype, lv_dtype)


# ---- KL against a diagonal Gaussian prior, free bits, several samples ----
#
# KL(N(mu, e^lv) || N(pm, e^plv)) per element, with d = lv - plv:
#     1/2 [plv - lv + (e^lv + (mu - pm)^2) e^-plv - 1] = 1/2 [expm1(d) - d + (mu - pm)^2 e^-plv]
# (the standard-normal KL at pm = 0, plv = 0). e^lv e^-plv is formed as e^d, so a
# prior and a posterior whose logvars are far apart (|d| ~ 50) neither overflow nor
# lose the gradient to cancellation. Gradients:
#     d/dmu = (mu - pm) e^-plv = -d/dpm,   d/dlv = 1/2 expm1(d),
#     d/dplv = -1/2 [expm1(d) + (mu - pm)^2 e^-plv].
# Free bits (Kingma et al. 2016): with K_k the batch mean of the KL of latent
# element k, the KL term is sum_k max(K_k, free_bits) (per sample: "batchmean";
# times N: "sum"; divided by the elements per sample: "mean"); the gradient is
# zero for the elements held at the floor (torch.clamp_min's rule: K_k < free_bits).


# Elements per block of the blocked latent path (the KL against a prior, free bits,
# half-precision latents): whole rows of mu, at least one. Its dozen float32 scratch
# blocks are reused from block to block, so no latent-sized temporary is allocated
# (a fresh 8 MiB buffer cost more than the arithmetic it held: an out-of-place mul
# over 4096x512 took 1.7 ms, in place 0.13 ms), and a pass over a block runs in
# cache (an add over 2^21 float32 elements: ~65 ps per element in blocks of
# 2^18-2^19, ~95 in blocks of 2^16, ~130 whole; contended 2-core machine).
LATENT_CHUNK = 1 << 18


def _latent_row_blocks(rows, cols):
    """Row slices covering ``rows`` rows of ``cols`` elements, LATENT_CHUNK elements
    per block (at least one row); None alone when one block holds every row (then the
    tensors are used whole: at the latent-diffusion size a call's ~20 slicing views
    cost as much as a fifth of its arithmetic)."""
    height = max(1, LATENT_CHUNK // max(cols, 1))
    if height >= rows:
        yield None
        return
    for r0 in range(0, rows, height):
        yield slice(r0, min(r0 + height, rows))


def _rows_of(t, rows):
    return t if rows is None else t[rows]


_kept_scratch = threading.local()  # .blocks: {(dtype, name): buffer}, this thread's


class _Scratch:
    """Float scratch blocks of up to ``size`` elements in ``dtype``, handed out by
    name and reused by every block of one call. On the CPU they are also kept for
    this thread's later calls: fresh buffers came back from the allocator as new
    pages each call, and first-touching them cost more than the arithmetic in them
    (a 4x32x32x8 prior KL took 1.1 ms with fresh scratch, ~0.3 ms with kept). At
    most a dozen names (LATENT_CHUNK elements each: 1 MiB in float32) per dtype."""

    def __init__(self, size, dtype, device):
        self.size, self.dtype, self.device, self.bufs = size, dtype, device, {}
        self.kept = None
        if device.type == "cpu":
            self.kept = getattr(_kept_scratch, "blocks", None)
            if self.kept is None:
                self.kept = _kept_scratch.blocks = {}

    def get(self, name, shape):
        buf = self.bufs.get(name)
        if buf is None:
            key = (self.dtype, name)
            buf = None if self.kept is None else self.kept.get(key)
            if buf is None or buf.numel() < self.size:
                with torch.inference_mode(False):  # writable outside inference mode too
                    buf = torch.empty(self.size, dtype=self.dtype, device=self.device)
                if self.kept is not None:
                    self.kept[key] = buf
            self.bufs[name] = buf
        numel = math.prod(shape)
        return (buf if numel == buf.numel() else buf[:numel]).view(shape)


def _block_in(src, scratch, name, shape, dtype):
    """``src`` (a block of an input, any layout) in ``dtype``: itself (read only) or a
    converted copy in a scratch block."""
    if src.dtype == dtype:
        return src
    return scratch.get(name, shape).copy_(src)


class _PriorSource:
    """A prior tensor (None: 0) as blocks of mu's rows in the compute dtype. One that
    broadcasts over much of mu (a learned (d,) prior, say) is converted once and
    ``small`` holds it; one as large as mu (``per_block``) is converted block by
    block, never copied whole."""

    def __init__(self, prior, mu, dtype, one_block):
        self.per_block = prior is not None and prior.numel() * 2 > mu.numel()
        self.small = None
        if prior is not None and not self.per_block:
            prior = self.small = _as(prior, dtype)
        # expanded to mu's shape to be sliced by rows; in one block the ops broadcast a
        # small one (a per-block one is read into mu-shaped scratch and out= buffers: a
        # (d,) prior of a batch of 1 would make them resize, a deprecated torch behaviour)
        self.view = prior if prior is None or (one_block and not self.per_block) \
            else prior.expand(mu.shape)

    def block(self, rows, scratch, name, shape, dtype):
        if self.view is None:
            return None
        return _block_in(_rows_of(self.view, rows), scratch, name, shape, dtype)


def _prior_kl_block(mu, lv, pm, npl, enp, scratch, shape, homes, want_p):
    """The KL against N(pm, e^-npl) of one block (pm, npl None: 0), in the compute
    dtype. ``lv`` is the clamped logvar (a scratch block, or a read-only view);
    ``enp`` = e^npl. Returns (terms, gm, h, p): the per-element KL, gm = (mu - pm)
    e^-plv = d/dmu, h = 1/2 expm1(lv - plv) = d/dlv, and p = h + 1/2 (mu - pm)^2 e^-plv
    = -d/dplv (None unless ``want_p``). ``homes`` (name: buffer or None) are output
    blocks in the compute dtype that take gm, h, p directly; the rest is scratch.

    e^(lv - plv) - 1 is formed as expm1 of d = fl(lv - plv) corrected by d's rounding
    error err, found exactly (Knuth's TwoSum): expm1(d + err) = expm1(d) + e^d err to
    first order. The rounded difference alone is off by |err| e^d, ~2e-6 relative in
    float32 when the logvars are 50 apart, and both logvar gradients would inherit it."""
    h = homes.get("h")
    h = scratch.get("h", shape) if h is None else h
    if npl is None:  # d = lv exactly
        torch.expm1(lv, out=h)
        d_total = lv
    else:
        d = torch.add(lv, npl, out=scratch.get("d", shape))
        a = torch.sub(d, npl, out=scratch.get("a", shape))  # the part of d that came from lv
        err = torch.sub(lv, a, out=scratch.get("err", shape))
        a.sub_(d).add_(npl)  # npl - (d - lv part), rounded the same way
        # no error to carry where d is not finite (an infinite logvar or prior logvar:
        # inf - inf made it NaN, so a flat prior gave a NaN KL where the formula's is inf)
        err.add_(a).nan_to_num_(0.0, 0.0, 0.0)
        torch.expm1(d, out=h)
        # e^d err = err + expm1(d) err, expm1(d) capped at the dtype's largest number: where
        # it overflowed (err may be 0: inf * 0 = NaN) the correction is finite, h stays inf
        torch.clamp_max(h, torch.finfo(h.dtype).max, out=a)
        torch.addcmul(err, a, err, out=a)
        h.add_(a)
        d_total = d.add_(err)  # lv - plv = d + err
    h.mul_(0.5)
    if pm is None and npl is None:  # the standard normal: gm = mu
        gm, diff = mu, mu
    else:
        # (scratch names reused: a and err are free by now, d is read last, by the terms)
        diff = mu if pm is None else torch.sub(mu, pm, out=scratch.get("a", shape))
        if enp is None:
            gm = diff
        else:
            gm = homes.get("gm")
            gm = torch.mul(diff, enp, out=scratch.get("err", shape) if gm is None else gm)
    # p = h + 1/2 (mu - pm)^2 e^-plv; the KL is p - 1/2 (lv - plv)
    p = homes.get("p") if want_p else None
    p = torch.addcmul(h, gm, diff, value=0.5, out=scratch.get("p", shape) if p is None else p)
    terms = torch.sub(p, d_total, alpha=0.5, out=scratch.get("d", shape))
    return terms, gm, h, (p if want_p else None)


def _is_one(scale):
    return isinstance(scale, float) and scale == 1.0


def _store_block(src, scale, out):
    """out = src * scale, rounded once into out's dtype; ``src`` (scratch in the compute
    dtype, or out itself) may be used up. ``scale`` a float or a per-row tensor."""
    if src is out:
        if not _is_one(scale):
            out.mul_(scale)
    elif out.dtype == src.dtype:
        torch.mul(src, scale, out=out)
    else:
        # an op whose out has another dtype computes into a fresh temporary first: scale
        # in the compute dtype, then one rounding copy
        out.copy_(src if _is_one(scale) else src.mul_(scale))


def _home(out, dtype):
    return out if out is not None and out.dtype == dtype else None


def _prior_kl_blocked(mu, logvar, prior_mu, prior_logvar, lo, hi, dtype, scale, want_grad,
                      want_prior_grad, sums, grad_dtype=None):
    """One pass over mu's rows in blocks of LATENT_CHUNK elements: half-precision
    blocks converted into float scratch, the KL's terms reduced and its gradients
    (times ``scale``) written once, in their buffers' dtypes, while the block is in
    cache. Returns (sums, g_mu, g_lv, g_pm, g_plv): per-sample sums (N,) for
    ``sums="rows"``, sums over the batch (mu.shape[1:]) for ``sums="columns"`` (None for
    None), and contiguous mu-shaped gradient buffers, in ``grad_dtype`` if given, None
    where not asked for (a prior's only where it exists). ``scale``: a float, or a
    per-sample (N,) tensor in the compute dtype."""
    batch = mu.shape[0]
    cols = mu.numel() // batch if batch else 0
    device = mu.device
    height = max(1, LATENT_CHUNK // max(cols, 1))
    scratch = _Scratch(min(height, batch) * cols, dtype, device)

    def buffer(like, wanted):  # (a prior's: summed_grad_dtype, float32 where it broadcasts)
        if not wanted:
            return None
        return torch.empty(mu.shape, device=device,
                           dtype=grad_dtype or summed_grad_dtype(like, mu))

    g_mu, g_lv = buffer(mu, want_grad), buffer(logvar, want_grad)
    g_pm = buffer(prior_mu, want_prior_grad and prior_mu is not None)
    g_plv = buffer(prior_logvar, want_prior_grad and prior_logvar is not None)
    blocks = list(_latent_row_blocks(batch, cols))
    one_block = blocks[0] is None
    pm_src = _PriorSource(prior_mu, mu, dtype, one_block)
    plv_src = _PriorSource(prior_logvar, mu, dtype, one_block)
    npl = enp = None
    if plv_src.small is not None:  # broadcast over the batch: e^-plv computed once
        npl = torch.neg(plv_src.small)
        enp = torch.exp(npl)
        if not one_block:  # (in one block the ops broadcast them)
            npl, enp = npl.expand(mu.shape), enp.expand(mu.shape)
    out_sums = None
    if sums == "rows":
        out_sums = torch.empty(batch, dtype=dtype, device=device)
    elif sums == "columns" and not one_block:
        out_sums = torch.zeros(mu.shape[1:], dtype=dtype, device=device)
    per_row = (-1,) + (1,) * (mu.dim() - 1)
    for rows in blocks:
        shape = mu.shape if rows is None else (rows.stop - rows.start, *mu.shape[1:])
        block_scale = scale if isinstance(scale, float) \
            else _rows_of(scale, rows).reshape(per_row)
        mu_b = _block_in(_rows_of(mu, rows), scratch, "mu", shape, dtype)
        lv_raw = _block_in(_rows_of(logvar, rows), scratch, "lv", shape, dtype)
        lv_b = lv_raw if lo is None else torch.clamp(lv_raw, lo, hi,
                                                     out=scratch.get("lv_clamped", shape))
        pm_b = pm_src.block(rows, scratch, "pm", shape, dtype)
        if plv_src.per_block:  # a prior as large as mu: e^-plv per block
            npl_b = torch.neg(plv_src.block(rows, scratch, "plv", shape, dtype),
                              out=scratch.get("npl", shape))
            enp_b = torch.exp(npl_b, out=scratch.get("enp", shape))
        else:
            npl_b = None if npl is None else _rows_of(npl, rows)
            enp_b = None if enp is None else _rows_of(enp, rows)
        outs = [None if g is None else _rows_of(g, rows) for g in (g_mu, g_lv, g_pm, g_plv)]
        homes = {"gm": _home(outs[0], dtype), "h": _home(outs[1], dtype),
                 "p": _home(outs[3], dtype)}
        terms, gm, h, p = _prior_kl_block(mu_b, lv_b, pm_b, npl_b, enp_b, scratch, shape, homes,
                                          want_p=g_plv is not None)
        if sums == "rows":
            torch.sum(terms.view(shape[0], -1), dim=1, out=_rows_of(out_sums, rows))
        elif sums == "columns":
            if one_block:
                out_sums = terms.sum(dim=0)
            else:
                out_sums.add_(terms.sum(dim=0))
        b_mu, b_lv, b_pm, b_plv = outs
        if b_plv is not None:
            _store_block(p, -block_scale, b_plv)
        # d/dpm = -d/dmu: negated from g_mu's block where the dtypes agree (exact)
        pm_from_mu = b_pm is not None and b_mu is not None and b_pm.dtype == b_mu.dtype
        if b_pm is not None and not pm_from_mu:  # (gm is not used up here)
            if b_pm.dtype == dtype:
                torch.mul(gm, -block_scale, out=b_pm)
            else:
                b_pm.copy_(torch.mul(gm, -block_scale))
        if b_mu is not None:
            if gm is mu_b:  # the standard normal: d/dmu = mu, which is never written
                if b_mu.dtype == dtype:
                    torch.mul(mu_b, block_scale, out=b_mu)
                else:
                    b_mu.copy_(mu_b if _is_one(block_scale) else
                               torch.mul(mu_b, block_scale, out=scratch.get("err", shape)))
            else:
                _store_block(gm, block_scale, b_mu)
            if pm_from_mu:
                torch.neg(b_mu, out=b_pm)
        if b_lv is not None:
            if lo is not None:
                _zero_where_clamped(h, lv_raw, lo, hi)
            _store_block(h, block_scale, b_lv)
    return out_sums, g_mu, g_lv, g_pm, g_plv


def _whole_prior_kl_terms(mu, logvar, prior_mu, prior_logvar, lo, hi, dtype):
    """For small latents (_whole_kl_with_prior): (terms, diff_scaled, half_em1,
    sq_half): the per-element KL, (mu - pm) e^-plv, 1/2 expm1(lv - plv) and
    1/2 (mu - pm)^2 e^-plv, each a fresh mu-shaped buffer in ``dtype`` (the callers
    write them), e^(lv - plv) - 1 with the TwoSum correction as in _prior_kl_block."""
    lv = _clamped(_as(logvar, dtype), lo, hi)
    mu_c = _as(mu, dtype)
    diff = mu_c if prior_mu is None else mu_c - _as(prior_mu, dtype)
    if prior_logvar is None:
        d = lv.expand(mu.shape)
        diff_scaled = diff.expand(mu.shape).clone()
        half_em1 = torch.expm1(d).mul_(0.5)
        # 1/2 [expm1(d) - d]
        terms = torch.sub(half_em1, d, alpha=0.5)
    else:
        neg_plv = torch.neg(_as(prior_logvar, dtype))
        # d = fl(lv - plv) and its rounding error, exactly (Knuth's TwoSum): e^(lv - plv)
        # - 1 = expm1(d + err) = expm1(d) + e^d err to first order. The rounded
        # difference alone is off by |err| e^d, ~2e-6 relative in float32 when the
        # logvars are 50 apart, and both logvar gradients would inherit it.
        d = torch.add(lv, neg_plv).expand(mu.shape).contiguous()
        scratch = torch.sub(d, neg_plv)  # the part of d that came from lv
        err = torch.sub(lv, scratch).expand(mu.shape).contiguous()
        scratch.sub_(d).add_(neg_plv)  # neg_plv - (d - lv part), rounded the same way
        err.add_(scratch).nan_to_num_(0.0, 0.0, 0.0)  # none where d is not finite, as above
        half_em1 = torch.expm1(d)
        # e^d err = (expm1(d) + 1) err, expm1(d) capped as in _prior_kl_block (inf * 0 = NaN)
        torch.clamp_max(half_em1, torch.finfo(dtype).max, out=scratch).mul_(err).add_(err)
        half_em1.add_(scratch).mul_(0.5)
        # 1/2 [e^(lv - plv) - 1 - (lv - plv)], lv - plv = d + err: into d's buffer
        terms = d.add_(err).mul_(-0.5).add_(half_em1)
        diff_scaled = torch.mul(diff, torch.exp(neg_plv))
        if diff_scaled.shape != mu.shape:
            diff_scaled = diff_scaled.expand(mu.shape).contiguous()
    sq_half = torch.mul(diff_scaled, diff).mul_(0.5)
    terms.add_(sq_half)
    return terms, diff_scaled, half_em1, sq_half


def _whole_kl_with_prior(mu, logvar, prior_mu, prior_logvar, reduction, lo, hi, free_bits, dtype,
                  want_grad, want_prior_grad):
    """kl_with_prior for latents of at most SMALL_NUMEL elements, by whole-tensor ops
    (the previous implementation): at that size a call's cost is its ops and Python,
    and the blocked pass's bookkeeping made it 3-14% slower (8x4x32x32, one thread,
    same process). Gradients in the compute dtype, contiguous."""
    batch = mu.shape[0]
    scale = reduction_scale(reduction, batch, mu.numel())
    terms, diff_scaled, half_em1, sq_half = _whole_prior_kl_terms(
        mu, logvar, prior_mu, prior_logvar, lo, hi, dtype)
    mask = None
    if free_bits > 0.0:  # (validation refused it with reduction="none")
        columns = terms.sum(dim=0)  # N K_k: the batch's KL of each latent element
        floor = batch * free_bits
        kl = torch.clamp_min(columns, floor).sum() * scale
        mask = (columns >= floor).to(dtype)  # also 0 where columns is NaN (NaN is in kl)
    else:
        kl = reduce_per_sample(_row_sum(terms), reduction, scale)
    g_mu = g_lv = g_pm = g_plv = None
    factor = scale if mask is None else mask * scale
    if want_grad or want_prior_grad:
        g_mu = diff_scaled.mul_(factor)  # (the terms' buffers are this call's to write)
    if want_prior_grad:
        if prior_mu is not None:
            g_pm = torch.neg(g_mu)
        if prior_logvar is not None:
            g_plv = sq_half.add_(half_em1).mul_(factor).neg_()
    if want_grad:
        g_lv = half_em1.mul_(factor)
        if lo is not None:
            _zero_where_clamped(g_lv, _as(logvar, dtype), lo, hi)
    else:
        g_mu = None
    # contiguous whatever mu's layout (channels_last, transposed): the fake implementations
    # promise it, and compiled graphs are built on their strides
    return kl, _dense(g_mu), _dense(g_lv), _dense(g_pm), _dense(g_plv)


def kl_with_prior(mu, logvar, prior_mu, prior_logvar, reduction, lo, hi, free_bits, dtype,
                  want_grad, want_prior_grad):
    """(kl reduced (or per sample for "none"), grad_mu, grad_logvar, grad_prior_mu,
    grad_prior_logvar): the KL against N(prior_mu, e^prior_logvar) (None: 0) with
    free bits, and the gradients of the reduced value, contiguous, mu-shaped (the
    prior's are summed to its shape in the backward) and in their buffers' dtypes,
    None where not asked for."""
    batch = mu.shape[0]
    scale = reduction_scale(reduction, batch, mu.numel())
    fused = None
    if _cpu_fusion.applies_kl(mu, logvar, prior_mu, prior_logvar, dtype):
        if free_bits > 0.0:  # the columns' sums N K_k (free bits, below) from the loop
            fused = _cpu_fusion.fused_kl(mu, logvar, prior_mu, prior_logvar, lo, hi, scale,
                                         want_grad, want_prior_grad, columns=True)
        else:
            fused = _fused_kl_applied(mu, logvar, prior_mu, prior_logvar, lo, hi, reduction,
                                      scale, want_grad, want_prior_grad)
            if fused is not None:
                return fused
    if fused is None and mu.numel() <= SMALL_NUMEL:
        return _whole_kl_with_prior(mu, logvar, prior_mu, prior_logvar, reduction, lo, hi,
                                    free_bits, dtype, want_grad, want_prior_grad)
    if free_bits > 0.0:  # (validation refused it with reduction="none")
        # N K_k: the batch's KL of each latent element
        columns, *grads = fused if fused is not None else _prior_kl_blocked(
            mu, logvar, prior_mu, prior_logvar, lo, hi, dtype, scale,
            want_grad or want_prior_grad, want_prior_grad, "columns")
        floor = batch * free_bits
        kl = torch.clamp_min(columns, floor).sum() * scale
        # the gradient is zero for the elements held at the floor; the mask is also 0
        # where columns is NaN (NaN is in kl)
        mask = columns >= floor
        masks = {}  # the mask in each gradient's dtype, converted once (a bool operand is slower)
        for g in grads:
            if g is not None:
                if g.dtype not in masks:
                    masks[g.dtype] = mask.to(g.dtype)
                g.mul_(masks[g.dtype])
    else:
        rows, *grads = _prior_kl_blocked(mu, logvar, prior_mu, prior_logvar, lo, hi, dtype,
                                         scale, want_grad or want_prior_grad, want_prior_grad,
                                         "rows")
        kl = reduce_per_sample(rows, reduction, scale)
    g_mu, g_lv, g_pm, g_plv = grads
    if not want_grad:
        g_mu = g_lv = None
    return kl, g_mu, g_lv, g_pm, g_plv


def _dense(t):
    return None if t is None else t.contiguous()


def vae_loss_forward_with_prior(x_hat, x, mu, logvar, beta, obs_logvar, prior_mu, prior_logvar,
                                beta_value, recon, obs_logvar_value, obs_logvar_optimal,
                                reduction, clamp_lo, clamp_hi, free_bits, grad_recon, grad_kl,
                                grad_prior):
    """``vae_loss_forward`` with the KL against a diagonal Gaussian prior and free
    bits; returns its seven outputs plus (grad_prior_mu, grad_prior_logvar), mu-shaped
    (or empty: no such prior, or not asked for)."""
    dtype = compute_dtype(x_hat, x, mu, logvar)
    batch = x_hat.shape[0]
    recon_scale = reduction_scale(reduction, batch, x_hat.numel())
    recon_rows, g_xhat, g_obs = recon_with_options(
        x_hat, x, recon, obs_logvar, obs_logvar_value, obs_logvar_optimal, dtype,
        recon_scale if grad_recon else None)
    kl_out, g_mu, g_lv, g_pm, g_plv = kl_with_prior(
        mu, logvar, prior_mu, prior_logvar, reduction, clamp_lo, clamp_hi, free_bits, dtype,
        grad_kl, grad_prior)
    recon_out = reduce_per_sample(recon_rows, reduction, recon_scale)
    beta_c = beta_value if beta is None else _as(beta, dtype)
    loss = recon_out + beta_c * kl_out
    return (loss, recon_out, kl_out, _grad_or_empty(g_xhat, x_hat),
            _grad_or_empty(g_mu, mu), _grad_or_empty(g_lv, logvar),
            _summed_grad_or_empty(g_obs, x_hat if obs_logvar is None else obs_logvar, x_hat),
            _summed_grad_or_empty(g_pm, mu if prior_mu is None else prior_mu, mu),
            _summed_grad_or_empty(g_plv, mu if prior_logvar is None else prior_logvar, mu))


def kl_forward_with_prior(mu, logvar, prior_mu, prior_logvar, reduction, clamp_lo, clamp_hi,
                          free_bits, want_grad, want_prior_grad):
    """``kl_forward`` with a prior and free bits: (kl, grad_mu, grad_logvar,
    grad_prior_mu, grad_prior_logvar), the prior's mu-shaped or empty."""
    dtype = compute_dtype(mu, logvar)
    kl, g_mu, g_lv, g_pm, g_plv = kl_with_prior(
        mu, logvar, prior_mu, prior_logvar, reduction, clamp_lo, clamp_hi, free_bits, dtype,
        want_grad, want_prior_grad)
    return (kl, _grad_or_empty(g_mu, mu), _grad_or_empty(g_lv, logvar),
            _summed_grad_or_empty(g_pm, mu if prior_mu is None else prior_mu, mu),
            _summed_grad_or_empty(g_plv, mu if prior_logvar is None else prior_logvar, mu))


def _noise_shape(mu, num_samples):
    return tuple(mu.shape) if not num_samples else (num_samples, *mu.shape)


def reparameterize_forward_with_prior(mu, logvar, prior_mu, prior_logvar, seed, clamp_lo,
                                      clamp_hi, with_kl, num_samples):
    """``reparameterize_forward`` with ``num_samples`` (0: one sample, mu's shape;
    K: K independent samples, shape (K, *mu.shape), from one read of mu and logvar)
    and the per-sample KL against a diagonal Gaussian prior."""
    dtype = compute_dtype(mu, logvar)
    lv = _clamped(_as(logvar, dtype), clamp_lo, clamp_hi)
    std = torch.mul(lv, 0.5).exp_()
    shape = _noise_shape(mu, num_samples)
    eps = standard_normal(seed, shape, dtype, mu.device)
    if mu.device.type == "cpu" and (mu.requires_grad or logvar.requires_grad):
        _keep_noise(_noise_key(seed, shape, dtype, mu.device), eps)
        z = torch.addcmul(_as(mu, dtype), eps, std)
    else:
        z = torch.addcmul(_as(mu, dtype), eps, std, out=eps)
    z = _dense(_as(z, torch.promote_types(mu.dtype, logvar.dtype)))  # (as the fake promises)
    if not with_kl:
        return z, mu.new_empty(0, dtype=dtype)
    if mu.numel() <= SMALL_NUMEL:  # whole-tensor ops (see _whole_kl_with_prior)
        terms = _whole_prior_kl_terms(mu, logvar, prior_mu, prior_logvar, clamp_lo, clamp_hi,
                                      dtype)[0]
        return z, _row_sum(terms)
    return z, _prior_kl_blocked(mu, logvar, prior_mu, prior_logvar, clamp_lo, clamp_hi, dtype,
                                1.0, False, False, "rows")[0]


def reparameterize_backward_with_prior(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed,
                                       clamp_lo, clamp_hi, num_samples):
    """(grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar), the prior's summed to
    its shape and dtype (empty where there is no such prior), the noise taken from
    the forward or regenerated from ``seed``."""
    dtype = compute_dtype(mu, logvar)
    logvar_c = _as(logvar, dtype)
    lv = _clamped(logvar_c, clamp_lo, clamp_hi)
    std = torch.mul(lv, 0.5).exp_()
    shape = _noise_shape(mu, num_samples)
    eps = None
    if mu.device.type == "cpu":
        eps = _take_noise(_noise_key(seed, shape, dtype, mu.device))
    if eps is None:
        eps = standard_normal(seed, shape, dtype, mu.device)
    g_z = _as(grad_z, dtype)
    grad_logvar = eps.mul_(g_z)  # (the kept noise is this call's to write)
    grad_mu = g_z
    if num_samples:
        grad_logvar, grad_mu = grad_logvar.sum(dim=0), g_z.sum(dim=0)
    grad_logvar = grad_logvar.mul_(std).mul_(0.5)
    grad_mu = grad_mu.clone() if grad_mu is g_z else grad_mu
    g_pm = g_plv = None
    if grad_kl is not None and mu.numel() <= SMALL_NUMEL and prior_mu is None \
            and prior_logvar is None:
        # against N(0, I) (several samples): d/dmu = mu, d/dlv = expm1(lv) / 2, each times
        # grad_kl, without the KL's other terms
        g_kl = _as(grad_kl, dtype).reshape((-1,) + (1,) * (mu.dim() - 1))
        grad_mu.addcmul_(_as(mu, dtype), g_kl)
        grad_logvar.addcmul_(torch.expm1(lv), g_kl, value=0.5)
    elif grad_kl is not None and mu.numel() <= SMALL_NUMEL:  # (see _whole_kl_with_prior)
        g_kl = _as(grad_kl, dtype).reshape((-1,) + (1,) * (mu.dim() - 1))
        _, diff_scaled, half_em1, sq_half = _whole_prior_kl_terms(
            mu, logvar, prior_mu, prior_logvar, clamp_lo, clamp_hi, dtype)
        kl_mu = diff_scaled * g_kl
        grad_mu.add_(kl_mu)
        grad_logvar.addcmul_(half_em1, g_kl)
        if prior_mu is not None:
            g_pm = kl_mu.neg().sum_to_size(prior_mu.shape).to(prior_mu.dtype)
        if prior_logvar is not None:
            g_plv = (half_em1 + sq_half).mul_(g_kl).neg_().sum_to_size(prior_logvar.shape) \
                .to(prior_logvar.dtype)
    elif grad_kl is not None:
        # the KL's gradients times grad_kl per sample, in the compute dtype (added to the
        # noise's, then rounded once)
        _, kl_mu, kl_lv, g_pm, g_plv = _prior_kl_blocked(
            mu, logvar, prior_mu, prior_logvar, clamp_lo, clamp_hi, dtype,
            _as(grad_kl, dtype).reshape(-1), True, True, None, grad_dtype=dtype)
        grad_mu.add_(kl_mu)
        grad_logvar.add_(kl_lv)
        if g_pm is not None:
            g_pm = g_pm.sum_to_size(prior_mu.shape).to(prior_mu.dtype)
        if g_plv is not None:
            g_plv = g_plv.sum_to_size(prior_logvar.shape).to(prior_logvar.dtype)
    if clamp_lo is not None:
        _zero_where_clamped(grad_logvar, logvar_c, clamp_lo, clamp_hi)
    if g_pm is None:
        g_pm = (mu if prior_mu is None else prior_mu).new_zeros(
            0 if prior_mu is None else prior_mu.shape)
    if g_plv is None:
        g_plv = (mu if prior_logvar is None else prior_logvar).new_zeros(
            0 if prior_logvar is None else prior_logvar.shape)
    return (_dense(_as(grad_mu, mu.dtype)), _dense(_as(grad_logvar, logvar.dtype)), _dense(g_pm),
            _dense(g_plv))
