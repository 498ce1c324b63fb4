"""Pieces shared by the fused kernels: the KL terms, the second stage of the
deterministic two-stage reduction, the launch-size heuristics and the device
checks.

Two-stage reduction. A per-sample sum (one row of a (N, D) view) is split over
``chunks`` column chunks; the program for (row block b, chunk c) writes, for each
row n of its block, the float32 sum of its chunk of row n to
``partials[n * chunks + c]`` (no atomics on the sums). The program that finishes
last (``take_ticket``) then adds each row's partials and the rows themselves in
one fixed order (``finish_rows``), in the same launch, so the same inputs and
sizes give bitwise-equal results on every run.
"""

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# ---- NaN-keeping clamps ----------------------------------------------------
#
# tl.maximum / tl.minimum return the other operand when one is NaN (their default
# propagate_nan=NONE), so a clamp written with them turns NaN into a bound: a NaN
# logvar would give a finite KL and a zero gradient. torch.clamp keeps NaN; these do.


@triton.jit
def clamp(x, lo, hi):
    """clamp(x, lo, hi) as torch.clamp computes it: NaN stays NaN.

    x: float32 tile, any shape; lo, hi: float32 scalars, lo <= hi.
    """
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def clamp_min(x, lo):
    """max(x, lo) as torch.clamp_min computes it: NaN stays NaN.

    x: float32 tile, any shape; lo: float32 scalar.
    """
    return tl.where(x < lo, lo, x)


@triton.jit
def clamp_grad(grad, x, lo, hi):
    """The gradient through clamp(x, lo, hi): zero where the clamp was active
    (x < lo or x > hi), whatever the gradient there (a NaN too). A NaN x was not
    clamped: its gradient, NaN, passes. The PyTorch path's rule (_zero_where_clamped).

    grad: float32 tile, the gradient with respect to clamp(x); x: float32 tile
    like grad, the clamp's input; lo, hi: float32 scalars.
    """
    return tl.where((x < lo) | (x > hi), 0.0, grad)


# ---- KL terms ------------------------------------------------------------


@triton.jit
def expm1(x):
    """exp(x) - 1 without the cancellation of the subtraction near 0 (collapsed
    latents have logvar ~ 0): a Taylor polynomial to x^6 for |x| < 0.1 (truncation
    below 2e-9 relative), exp(x) - 1 elsewhere.

    x: float32 tile, any shape.
    """
    small = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0))))))
    return tl.where(tl.abs(x) < 0.1, small, tl.exp(x) - 1.0)


@triton.jit
def kl_terms(mu, logvar, clamp_lo, clamp_hi, HAS_CLAMP: tl.constexpr):
    """Per-element KL(N(mu, exp(lv)) || N(0, 1)) and its derivatives, in float32.

        lv       = clamp(logvar, lo, hi)                (if HAS_CLAMP; NaN stays NaN)
        kl       = 1/2 (mu^2 + exp(lv) - 1 - lv)
        d kl/dmu = mu
        d kl/dlv = 1/2 (exp(lv) - 1)   (0 where the clamp was active; NaN stays NaN)

    Returns (kl, d kl/d logvar); d kl/d mu is ``mu`` itself.

    mu: float32 tile, the means; logvar: float32 tile like mu, the log-variances;
    clamp_lo, clamp_hi: float32 scalars, the clamp (used if HAS_CLAMP);
    HAS_CLAMP: constexpr bool, clamp logvar.
    """
    lv = logvar
    if HAS_CLAMP:
        lv = clamp(logvar, clamp_lo, clamp_hi)
    var_m1 = expm1(lv)
    kl = 0.5 * (mu * mu + (var_m1 - lv))
    grad_lv = 0.5 * var_m1
    if HAS_CLAMP:
        grad_lv = clamp_grad(grad_lv, logvar, clamp_lo, clamp_hi)
    return kl, grad_lv


@triton.jit
def prior_kl_terms(mu, logvar, prior_mu, prior_logvar, clamp_lo, clamp_hi,
                   HAS_CLAMP: tl.constexpr):
    """Per-element KL(N(mu, exp(lv)) || N(pm, exp(plv))) and its derivatives, in float32:

        kl          = 1/2 [expm1(lv - plv) - (lv - plv) + (mu - pm)^2 e^-plv]
        d kl/dmu    = (mu - pm) e^-plv = -d kl/dpm
        d kl/dlv    = 1/2 expm1(lv - plv)      (0 where the clamp was active)
        d kl/dplv   = -1/2 [expm1(lv - plv) + (mu - pm)^2 e^-plv]

    lv - plv = d + err exactly (TwoSum: Triton does not reassociate float adds), and
    expm1(d + err) = expm1(d) + e^d err: the rounded difference alone would be off by
    |err| e^d, ~2e-6 relative when the logvars are 50 apart.
    Returns (kl, d kl/dmu, d kl/dlv, d kl/dplv).

    mu: float32 tile, the means; logvar: float32 tile like mu, the log-variances;
    prior_mu, prior_logvar: float32 tiles like mu, the prior's means and log-variances;
    clamp_lo, clamp_hi: float32 scalars, the clamp of logvar (used if HAS_CLAMP);
    HAS_CLAMP: constexpr bool, clamp logvar.
    """
    lv = logvar
    if HAS_CLAMP:
        lv = clamp(logvar, clamp_lo, clamp_hi)
    neg_plv = -prior_logvar
    d = lv + neg_plv
    lv_part = d - neg_plv
    err = (lv - lv_part) + (neg_plv - (d - lv_part))
    # no error to carry where d is not finite (an infinite logvar or prior logvar:
    # inf - inf made it NaN, so a flat prior gave a NaN KL where the formula's is inf)
    err = tl.where(tl.abs(d) < float("inf"), err, 0.0)
    em1 = expm1(d)
    # expm1(d) capped at float32's largest number in the correction: where it overflowed
    # (err may be 0: inf * 0 = NaN) the correction is finite and the sum stays inf
    half_em1 = 0.5 * (em1 + (tl.minimum(em1, 3.4028234663852886e38) + 1.0) * err)
    diff_scaled = (mu - prior_mu) * tl.exp(neg_plv)
    sq_half = 0.5 * diff_scaled * (mu - prior_mu)
    kl = half_em1 - 0.5 * (d + err) + sq_half
    grad_lv = half_em1
    if HAS_CLAMP:
        grad_lv = clamp_grad(grad_lv, logvar, clamp_lo, clamp_hi)
    return kl, diff_scaled, grad_lv, -(half_em1 + sq_half)


# ---- second stage of the reduction ---------------------------------------
#
# The program that stores its partials last runs the second stage, in the same
# launch: each program, once its partials are stored, takes a ticket from a
# zeroed int32 counter (an atomic add, acquire-release at GPU scope); the one
# that draws ``programs - 1`` knows every other partial is visible to it and
# sums them all in one fixed order. Which program that is does not matter: the
# order of the sums is fixed, so the result is bitwise the same on every run.
# (CUDA's threadFenceReduction sample and CUB's single-pass reductions use this
# pattern.) One launch instead of two: the host time of a call is what a user
# of small and mid-size tensors waits for.


def new_ticket_counter(device):
    """A zeroed int32 counter for ``take_ticket``, one per launch (a CUDA graph
    captures its zeroing with the launch, so every replay starts from 0)."""
    return torch.zeros((), dtype=torch.int32, device=device)


@triton.jit
def take_ticket(counter_ptr):
    """This program's place in the order in which the programs finished their
    partials: 0 for the first, ``tl.num_programs(0) - 1`` for the last. Call it
    once per program, after the program's last store of partials.

    counter_ptr: int32 (), zeroed before the launch.
    """
    # every thread of this program has stored its share of the partials before
    # the one atomic (executed once for the program) releases them
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _row_sums(
    partials_ptr,  # float32: the stage-1 partial sums
    rows,  # int64 (BLOCK_ROWS,): the rows to sum
    row_mask,  # bool (BLOCK_ROWS,): rows < the row count
    base,  # where this sum's partials start in partials_ptr
    chunks,  # partials per row, at base + row * chunks + chunk
    BLOCK_ROWS: tl.constexpr,  # rows per block (a power of two)
    BLOCK_CHUNKS: tl.constexpr,  # chunks read per iteration (a power of two)
):
    """sum_c partials[base + row * chunks + c] for each row, float32 (BLOCK_ROWS,).
    The loads are volatile: the partials were written by other programs of the
    same launch, and must be read from the GPU's L2, never from a stale L1 line."""
    acc = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for c0 in range(0, chunks, BLOCK_CHUNKS):
        cols = c0 + tl.arange(0, BLOCK_CHUNKS)
        offs = base + rows[:, None] * chunks + cols[None, :]
        mask = row_mask[:, None] & (cols[None, :] < chunks)
        acc += tl.sum(tl.load(partials_ptr + offs, mask=mask, other=0.0, volatile=True), axis=1)
    return acc


@triton.jit
def finish_rows(
    partials_ptr,  # float32: stage 1's per-(row, chunk) sums, recon's then the KL's
    loss_ptr,  # float32 (N,) or (), out: the loss (HAS_RECON)
    recon_ptr,  # float32 (N,) or (), out: the reconstruction term (HAS_RECON)
    kl_ptr,  # float32 (N,) or (), out: the KL
    beta_ptr,  # 0-dim beta on the device, read when BETA_FROM_PTR
    beta_value,  # float32: beta when it is not read from beta_ptr
    rows_total,  # N, the batch size
    recon_chunks,  # recon partials per row
    kl_chunks,  # KL partials per row
    kl_base,  # where the KL partials start
    recon_scale,  # float32: the recon reduction's scale (1, 1/N or 1/(N D))
    kl_scale,  # float32: the KL reduction's scale (1, 1/N or 1/(N d))
    col_sums_ptr,  # float32 (d,): C_k, the KL of latent element k summed over the batch (FREE_BITS)
    kl_cols,  # d, latent elements per sample (FREE_BITS)
    free_bits_floor,  # float32: N * free_bits, the floor of each C_k (FREE_BITS)
    HAS_RECON: tl.constexpr,  # a loss (recon + beta kl), not the KL alone
    BETA_FROM_PTR: tl.constexpr,  # read beta from beta_ptr (a tensor beta)
    PER_SAMPLE: tl.constexpr,  # reduction="none": write (N,) outputs
    FREE_BITS: tl.constexpr,  # the KL from the floored column sums, not from the KL partials
    BLOCK_ROWS: tl.constexpr,  # rows per iteration (a power of two)
    BLOCK_RECON: tl.constexpr,  # recon chunks read per iteration (a power of two)
    BLOCK_KL: tl.constexpr,  # KL chunks read per iteration (a power of two)
    BLOCK_COLS: tl.constexpr,  # column sums read per iteration (FREE_BITS; a power of two)
):
    """Stage 2, run by the last program of stage 1's launch, in a fixed order
    (bitwise reproducible):

        recon[n] = sum_c partials[n * recon_chunks + c]
        kl[n]    = sum_c partials[kl_base + n * kl_chunks + c]

    then either per-sample outputs (PER_SAMPLE: recon[n], kl[n],
    loss[n] = recon[n] + beta kl[n]) or the scaled totals
    (recon = recon_scale sum_n recon[n], kl = kl_scale sum_n kl[n],
    loss = recon + beta kl). Without HAS_RECON only ``kl`` is written.
    FREE_BITS (never with PER_SAMPLE): kl = kl_scale sum_k max(C_k, free_bits_floor)
    instead (NaN stays NaN), the KL partials unread."""
    tl.static_assert(not (PER_SAMPLE and FREE_BITS), "free bits have no per-sample KL")
    if BETA_FROM_PTR:
        beta = tl.load(beta_ptr).to(tl.float32)
    else:
        beta = beta_value
    recon_total = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    kl_total = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for r0 in range(0, rows_total, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        row_mask = rows < rows_total
        if not FREE_BITS:
            kl_rows = _row_sums(partials_ptr, rows, row_mask, kl_base, kl_chunks,
                                BLOCK_ROWS, BLOCK_KL)
        if HAS_RECON:
            recon_rows = _row_sums(partials_ptr, rows, row_mask, 0, recon_chunks,
                                   BLOCK_ROWS, BLOCK_RECON)
        if PER_SAMPLE:
            tl.store(kl_ptr + rows, kl_rows, mask=row_mask)
            if HAS_RECON:
                tl.store(recon_ptr + rows, recon_rows, mask=row_mask)
                tl.store(loss_ptr + rows, recon_rows + beta * kl_rows, mask=row_mask)
        else:
            if not FREE_BITS:
                kl_total += kl_rows
            if HAS_RECON:
                recon_total += recon_rows
    if not PER_SAMPLE:
        if FREE_BITS:
            # (written by the pre-pass, an earlier launch: plain loads)
            floored = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
            for c0 in range(0, kl_cols, BLOCK_COLS):
                cols = c0 + tl.arange(0, BLOCK_COLS)
                col_mask = cols < kl_cols
                sums = tl.load(col_sums_ptr + cols, mask=col_mask, other=0.0)
                floored += tl.where(col_mask, clamp_min(sums, free_bits_floor), 0.0)
            kl_out = tl.sum(floored, axis=0) * kl_scale
        else:
            kl_out = tl.sum(kl_total, axis=0) * kl_scale
        tl.store(kl_ptr, kl_out)
        if HAS_RECON:
            recon_out = tl.sum(recon_total, axis=0) * recon_scale
            tl.store(recon_ptr, recon_out)
            tl.store(loss_ptr, recon_out + beta * kl_out)


class FinishBlocks(NamedTuple):
    """``finish_rows``'s block sizes. Inlined in the stage-1 kernel, the second stage
    holds about 16 partials per thread per iteration (so it does not raise the
    kernel's register count much), with as many rows per iteration as that allows:
    the iterations run one after another in one program, each waiting on its loads."""

    rows: int
    recon: int
    kl: int
    cols: int


FINISH_PER_THREAD = 16  # partials a thread holds per iteration of the second stage


@functools.lru_cache(maxsize=256)
def finish_blocks(rows, recon_chunks, kl_chunks, kl_cols=0, num_warps=4):
    """The FinishBlocks for N = ``rows`` and the given partials per row (and
    ``kl_cols`` column sums, with free bits), for a program of ``num_warps`` warps;
    cached (triton.next_power_of_2 costs microseconds a call)."""
    recon = min(triton.next_power_of_2(max(recon_chunks, 1)), 32)
    kl = min(triton.next_power_of_2(max(kl_chunks, 1)), 32)
    budget = FINISH_PER_THREAD * 32 * num_warps
    row_cap = max(16, min(256, budget // max(recon, kl)))
    return FinishBlocks(rows=min(triton.next_power_of_2(max(rows, 1)), row_cap), recon=recon,
                        kl=kl, cols=min(triton.next_power_of_2(max(kl_cols, 1)), 1024))


# ---- launch sizes --------------------------------------------------------


class Split(NamedTuple):
    """How a (rows, cols) view is cut into programs. Each program reduces a tile
    of ROWS rows by ITERS blocks of BLOCK columns; ``chunks`` programs cover one
    row block; ``programs`` = cdiv(rows, ROWS) * chunks."""

    block: int
    rows: int
    iters: int
    chunks: int
    programs: int
    num_warps: int


# Forced sizes for tests: (max block, max rows per program, max iterations); None = heuristics.
_forced_split = None


@contextlib.contextmanager
def force_split(max_block, max_rows, max_iters):
    """Test helper: cap the tile sizes so that even tiny tensors are split over
    several programs (exercising the two-stage reduction)."""
    global _forced_split
    previous, _forced_split = _forced_split, (max_block, max_rows, max_iters)
    try:
        yield
    finally:
        _forced_split = previous


def _make_split(rows, cols, block, tile_rows, iters, num_warps):
    chunks = triton.cdiv(cols, block * iters)
    return Split(block, tile_rows, iters, chunks, triton.cdiv(rows, tile_rows) * chunks, num_warps)


@functools.lru_cache(maxsize=256)
def _heuristic_split(rows, cols, interpreted, sm_count):
    if interpreted:
        # Programs run one after another on the CPU: as few and as large as possible.
        block = min(triton.next_power_of_2(cols), 1 << 15)
        tile_rows = min(triton.next_power_of_2(rows), max(1, (1 << 15) // block))
        return _make_split(rows, cols, block, tile_rows, min(triton.cdiv(cols, block), 64), 1)
    # GPU: 2048-element tiles (8 warps x 32 threads x 8 elements); short rows
    # share a tile. Enough programs to fill every SM several times over, each
    # streaming up to 8 tiles so that its partial sum is worth writing.
    block = min(triton.next_power_of_2(cols), 2048)
    tile_rows = min(triton.next_power_of_2(rows), max(1, 2048 // block))
    row_blocks = triton.cdiv(rows, tile_rows)
    chunks_wanted = max(1, (8 * sm_count) // row_blocks)
    iters = max(1, min(8, triton.cdiv(cols, block) // chunks_wanted))
    tile = block * tile_rows
    num_warps = 8 if tile >= 2048 else 4 if tile >= 512 else 2 if tile >= 128 else 1
    return _make_split(rows, cols, block, tile_rows, iters, num_warps)


def row_split(rows, cols, device):
    """The Split for per-row sums over a (rows, cols) view on ``device`` (cached)."""
    if _forced_split is not None:
        max_block, max_rows, max_iters = _forced_split
        block = min(triton.next_power_of_2(cols), max_block)
        tile_rows = min(triton.next_power_of_2(rows), max_rows)
        return _make_split(rows, cols, block, tile_rows,
                           min(triton.cdiv(cols, block), max_iters), 1)
    return _heuristic_split(rows, cols, is_interpreted(), _sm_count(device))


class ColumnSplit(NamedTuple):
    """How the free-bits pre-pass cuts a (rows, cols) view: each of ``programs``
    programs sums COLS adjacent columns down all rows, ROWS rows per iteration."""

    cols: int
    rows: int
    programs: int
    num_warps: int


def column_split(rows, cols, device):
    """The ColumnSplit for per-column sums over a (rows, cols) view on ``device``."""
    if _forced_split is not None:
        max_block, max_rows, _ = _forced_split
        block_cols = min(triton.next_power_of_2(cols), max_block)
        block_rows = min(triton.next_power_of_2(rows), max_rows)
        return ColumnSplit(block_cols, block_rows, triton.cdiv(cols, block_cols), 1)
    if is_interpreted():  # programs run one after another: as few as possible
        block_cols = min(triton.next_power_of_2(cols), 1 << 12)
        block_rows = min(triton.next_power_of_2(rows), max(1, (1 << 15) // block_cols))
        return ColumnSplit(block_cols, block_rows, triton.cdiv(cols, block_cols), 1)
    # GPU: one program per COLS columns, so that all SMs get one where d allows
    # (16 columns at least: 64-byte rows of float32 per load), 2048-element tiles.
    block_cols = min(max(triton.next_power_of_2(triton.cdiv(cols, _sm_count(device))), 16), 128)
    block_cols = min(block_cols, triton.next_power_of_2(cols))
    block_rows = min(triton.next_power_of_2(rows), max(1, 2048 // block_cols))
    tile = block_cols * block_rows
    num_warps = 8 if tile >= 2048 else 4 if tile >= 512 else 2 if tile >= 128 else 1
    return ColumnSplit(block_cols, block_rows, triton.cdiv(cols, block_cols), num_warps)


@functools.cache
def _sm_count_of(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device):
    if device.type != "cuda":
        return 1
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


# ---- devices ---------------------------------------------------------------


@functools.cache
def is_interpreted():
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels run on CPU tensors)."""
    return type(kl_terms).__name__ == "InterpretedFunction"


def device_guard(t):
    """Launch on ``t``'s device (Triton launches on the current CUDA device);
    checks that the kernels can run on it at all."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    if t.device.type == "cpu" and is_interpreted():
        return contextlib.nullcontext()
    raise RuntimeError(
        f"fastvae's Triton kernels cannot run on {t.device} tensors"
        + (" unless TRITON_INTERPRET=1 is set before triton is first imported"
           if t.device.type == "cpu" else "")
        + "; to use the PyTorch path, unset FASTVAE_BACKEND=triton or leave the "
          "set_backend('triton') / use_backend('triton') that chose the kernels"
    )
