"""Fused reparameterization (+ per-sample KL), forward and backward.

With mu and logvar viewed as (N, d) and lv = clamp(logvar, lo, hi):

    eps[i]   = randn(seed, i)           Philox, i = flat element index (int64)
    z        = mu + exp(lv / 2) eps
    kl[n]    = sum_k 1/2 (mu^2 + exp(lv) - 1 - lv)          (optional, same pass)

Backward, given dL/dz and (when the KL was produced) dL/dkl per sample:

    dL/dmu = dL/dz + dL/dkl[n] mu
    dL/dlv = dL/dz eps exp(lv / 2) / 2 + dL/dkl[n] (exp(lv) - 1) / 2   (0 where clamped)

With a diagonal Gaussian prior N(pm, exp(plv)) the KL (and its gradient) is
``_shared.prior_kl_terms``'s; with K samples, sample s of element i draws
eps = randn(seed, s N d + i) (one read of mu and logvar for all K; the backward
regenerates and sums them).

seed is a 1-element int64 tensor that the kernels load from memory (never an
int passed at launch): on a GPU it is drawn on the device, so a captured CUDA
graph draws a fresh seed and fresh noise on every replay. eps is regenerated
from (seed, i) in the backward, so nothing noise-sized is saved. Since eps
depends only on the element index, z does not depend on the tile sizes. The
per-sample KL uses the two-stage reduction of ``_shared``, both stages in the
one launch.
"""

import torch
import triton
import triton.language as tl

from . import _shared


@triton.jit
def _tile(
    pid,  # int64 scalar: the program's index
    chunks,  # column chunks per row block
    n_rows,  # N, the batch size
    n_cols,  # d, latent elements per sample
    i,  # which of the tile's ITERS column blocks
    BLOCK: tl.constexpr,  # columns per iteration (a power of two)
    ROWS: tl.constexpr,  # rows per tile (a power of two)
    ITERS: tl.constexpr,  # column blocks per tile
):
    """Rows (ROWS,), flat element offsets n * d + k (ROWS, BLOCK) and their mask
    for iteration ``i`` of program ``pid``'s tile, all int64."""
    rows = (pid // chunks) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = (pid % chunks) * (BLOCK * ITERS) + i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows, rows[:, None] * n_cols + cols[None, :], mask


@triton.jit
def _load_latents(
    mu_ptr,  # (N, d) contiguous: the means
    logvar_ptr,  # (N, d) contiguous: the log-variances
    offs,  # int64 (ROWS, BLOCK): flat element offsets
    mask,  # bool like offs: elements inside the tensors
    clamp_lo,  # float32: lower logvar clamp (HAS_CLAMP)
    clamp_hi,  # float32: upper logvar clamp (HAS_CLAMP)
    HAS_CLAMP: tl.constexpr,  # clamp logvar
):
    """mu, logvar and lv = clamp(logvar, lo, hi) (logvar itself without a clamp;
    NaN stays NaN), float32."""
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lv = logvar
    if HAS_CLAMP:
        lv = _shared.clamp(logvar, clamp_lo, clamp_hi)
    return mu, logvar, lv


@triton.jit
def _reparameterize_kernel(
    mu_ptr,  # (N, d) contiguous: the means
    logvar_ptr,  # (N, d) contiguous: the log-variances
    z_ptr,  # (K, N, d) contiguous, out: the samples, in the promoted dtype of mu and logvar
    partials_ptr,  # float32 (N * chunks,), out: per-(row, chunk) KL sums (WITH_KL)
    seed_ptr,  # int64 (1,) on the device: the Philox seed of this draw, read at run time
    prior_mu_ptr,  # (N, d) contiguous: the KL prior's means (HAS_PRIOR)
    prior_logvar_ptr,  # (N, d) contiguous: the KL prior's log-variances (HAS_PRIOR)
    n_rows,  # N, the batch size
    n_cols,  # d, latent elements per sample
    numel,  # N d: the distance between two samples' noise offsets and z's
    n_samples,  # K, samples per element
    chunks,  # column chunks per row block
    clamp_lo,  # float32: lower logvar clamp (HAS_CLAMP)
    clamp_hi,  # float32: upper logvar clamp (HAS_CLAMP)
    counter_ptr,  # int32 (), zeroed: the ticket counter that elects the finishing program (WITH_KL)
    kl_ptr,  # float32 (N,), out: the per-sample KL (WITH_KL)
    HAS_CLAMP: tl.constexpr,  # clamp logvar to [clamp_lo, clamp_hi]
    WITH_KL: tl.constexpr,  # also the per-sample KL
    HAS_PRIOR: tl.constexpr,  # the KL against N(prior_mu, exp(prior_logvar))
    BLOCK: tl.constexpr,  # columns per iteration (a power of two)
    ROWS: tl.constexpr,  # rows per tile (a power of two)
    ITERS: tl.constexpr,  # column blocks per tile
    FINISH_ROWS: tl.constexpr,  # the KL's second stage: rows per iteration (WITH_KL)
    FINISH_KL: tl.constexpr,  # the KL's second stage: partials per row read at once (WITH_KL)
):
    """The forward, one tile per program, i = n * d + k the flat element index:

        seed   = seed_ptr[0]                    (from memory: a CUDA graph replays the launch
                                                 while the captured draw refills the seed)
        eps[s, i] = randn(seed, s N d + i)      (Philox; s < K)
        z[s, i]   = mu[i] + exp(lv[i] / 2) eps[s, i],  lv = clamp(logvar, lo, hi)
        partials[n * chunks + c] = sum_{k in chunk c} 1/2 (mu^2 + exp(lv) - 1 - lv)   (WITH_KL)
                                   (against the prior: _shared.prior_kl_terms)
        kl[n] = sum_c partials[n * chunks + c]  (WITH_KL; by the program that finishes last)
    """
    seed = tl.load(seed_ptr)
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for i in range(ITERS):
        rows, offs, mask = _tile(pid, chunks, n_rows, n_cols, i, BLOCK, ROWS, ITERS)
        mu, logvar, lv = _load_latents(mu_ptr, logvar_ptr, offs, mask, clamp_lo, clamp_hi,
                                       HAS_CLAMP)
        std = tl.exp(0.5 * lv)
        sample_offs = offs  # int64: s N d + i, advanced by an add (no int32 product)
        for _ in range(n_samples):
            eps = tl.randn(seed, sample_offs)
            z = mu + std * eps
            tl.store(z_ptr + sample_offs, z.to(z_ptr.dtype.element_ty), mask=mask)
            sample_offs += numel
        if WITH_KL:
            if HAS_PRIOR:
                prior_mu = tl.load(prior_mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                prior_logvar = tl.load(prior_logvar_ptr + offs, mask=mask,
                                       other=0.0).to(tl.float32)
                value, _, _, _ = _shared.prior_kl_terms(mu, logvar, prior_mu, prior_logvar,
                                                        clamp_lo, clamp_hi, HAS_CLAMP)
            else:
                value, _ = _shared.kl_terms(mu, logvar, clamp_lo, clamp_hi, HAS_CLAMP)
            acc += tl.where(mask, value, 0.0)
    if WITH_KL:
        rows = (pid // chunks) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        tl.store(partials_ptr + rows * chunks + pid % chunks, tl.sum(acc, axis=1),
                 mask=rows < n_rows)
        if _shared.take_ticket(counter_ptr) == tl.num_programs(0) - 1:
            _shared.finish_rows(
                partials_ptr, kl_ptr, kl_ptr, kl_ptr, kl_ptr, 0.0, n_rows, 0, chunks, 0,
                1.0, 1.0, kl_ptr, 0, 0.0,
                False, False, True, False,  # HAS_RECON, BETA_FROM_PTR, PER_SAMPLE, FREE_BITS
                FINISH_ROWS, 1, FINISH_KL, 1)


@triton.jit
def _reparameterize_backward_kernel(
    grad_z_ptr,  # (K, N, d) contiguous: dL/dz
    grad_kl_ptr,  # (N,): dL/dkl per sample (WITH_KL)
    mu_ptr,  # (N, d) contiguous: the means
    logvar_ptr,  # (N, d) contiguous: the log-variances
    grad_mu_ptr,  # (N, d) contiguous, out: dL/dmu, in mu's dtype
    grad_logvar_ptr,  # (N, d) contiguous, out: dL/dlogvar, in logvar's dtype
    seed_ptr,  # int64 (1,) on the device: the forward's Philox seed (eps is regenerated)
    prior_mu_ptr,  # (N, d) contiguous: the KL prior's means (HAS_PRIOR)
    prior_logvar_ptr,  # (N, d) contiguous: the KL prior's log-variances (HAS_PRIOR)
    grad_prior_mu_ptr,  # (N, d) contiguous, out: dL/dprior_mu per element (HAS_PRIOR and WITH_KL)
    grad_prior_logvar_ptr,  # (N, d) contiguous, out: dL/dprior_logvar per element (likewise)
    n_rows,  # N, the batch size
    n_cols,  # d, latent elements per sample
    numel,  # N d: the distance between two samples' noise offsets and grad_z's
    n_samples,  # K, samples per element
    chunks,  # column chunks per row block
    clamp_lo,  # float32: lower logvar clamp (HAS_CLAMP)
    clamp_hi,  # float32: upper logvar clamp (HAS_CLAMP)
    HAS_CLAMP: tl.constexpr,  # logvar was clamped to [clamp_lo, clamp_hi]
    WITH_KL: tl.constexpr,  # the forward produced the KL: add its gradient
    HAS_PRIOR: tl.constexpr,  # the KL was against N(prior_mu, exp(prior_logvar))
    BLOCK: tl.constexpr,  # columns per iteration (a power of two)
    ROWS: tl.constexpr,  # rows per tile (a power of two)
    ITERS: tl.constexpr,  # column blocks per tile
):
    """The backward, eps regenerated from (seed_ptr[0], s N d + i):

        dL/dmu[i] = sum_s dL/dz[s, i] + dL/dkl[n] mu[i]
        dL/dlv[i] = sum_s dL/dz[s, i] eps[s, i] exp(lv[i] / 2) / 2 + dL/dkl[n] (exp(lv[i]) - 1) / 2
                    (0 where the clamp was active; NaN stays NaN)
        (against the prior, the KL's gradients are _shared.prior_kl_terms')
    """
    seed = tl.load(seed_ptr)
    pid = tl.program_id(0).to(tl.int64)
    for i in range(ITERS):
        rows, offs, mask = _tile(pid, chunks, n_rows, n_cols, i, BLOCK, ROWS, ITERS)
        mu, logvar, lv = _load_latents(mu_ptr, logvar_ptr, offs, mask, clamp_lo, clamp_hi,
                                       HAS_CLAMP)
        grad_mu = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        g_z_eps = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        sample_offs = offs  # int64: s N d + i
        for _ in range(n_samples):
            g_z = tl.load(grad_z_ptr + sample_offs, mask=mask, other=0.0).to(tl.float32)
            grad_mu += g_z
            g_z_eps += g_z * tl.randn(seed, sample_offs)
            sample_offs += numel
        grad_lv = 0.5 * g_z_eps * tl.exp(0.5 * lv)
        if WITH_KL:
            g_kl = tl.load(grad_kl_ptr + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
            if HAS_PRIOR:
                prior_mu = tl.load(prior_mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                prior_logvar = tl.load(prior_logvar_ptr + offs, mask=mask,
                                       other=0.0).to(tl.float32)
                _, kl_mu, kl_lv, kl_plv = _shared.prior_kl_terms(
                    mu, lv, prior_mu, prior_logvar, clamp_lo, clamp_hi, False)
                grad_mu += g_kl[:, None] * kl_mu
                grad_lv += g_kl[:, None] * kl_lv
                tl.store(grad_prior_mu_ptr + offs,
                         (-g_kl[:, None] * kl_mu).to(grad_prior_mu_ptr.dtype.element_ty),
                         mask=mask)
                tl.store(grad_prior_logvar_ptr + offs,
                         (g_kl[:, None] * kl_plv).to(grad_prior_logvar_ptr.dtype.element_ty),
                         mask=mask)
            else:
                grad_mu += g_kl[:, None] * mu
                grad_lv += g_kl[:, None] * (0.5 * _shared.expm1(lv))
        if HAS_CLAMP:
            grad_lv = _shared.clamp_grad(grad_lv, logvar, clamp_lo, clamp_hi)
        tl.store(grad_mu_ptr + offs, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_logvar_ptr + offs, grad_lv.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


def _seed_on(seed, device):
    """The seed as the kernels read it: a 1-element int64 tensor on ``device``.
    One on ``device`` is used as it is, so nothing reads it on the host (no sync;
    a CUDA graph replay reads the value its captured draw wrote). One drawn on
    the host (a CPU generator with CUDA tensors) is copied from pinned memory:
    a copy from pageable memory would wait for the stream first. One on another
    GPU is copied over."""
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("seed must be a 1-element int64 tensor, got "
                        + (f"{seed.dtype} of shape {tuple(seed.shape)}"
                           if isinstance(seed, torch.Tensor) else type(seed).__name__))
    if seed.device == device:
        return seed
    if seed.device.type == "cpu" and device.type == "cuda" and not seed.is_pinned():
        seed = seed.pin_memory()
    return seed.to(device, non_blocking=True)


def _clamp_arguments(clamp_lo, clamp_hi):
    has_clamp = clamp_lo is not None
    return (float(clamp_lo) if has_clamp else 0.0, float(clamp_hi) if has_clamp else 0.0,
            has_clamp)


def reparameterize_forward(mu, logvar, seed, clamp_lo, clamp_hi, with_kl):
    """z = mu + exp(lv / 2) * eps and, if ``with_kl``, the per-sample KL (N,) in
    float32 (an empty float32 tensor otherwise), like
    ``fastvae._torch_impl.reparameterize_forward``; z has the promoted dtype of
    mu and logvar."""
    return reparameterize_forward_with_prior(mu, logvar, None, None, seed, clamp_lo, clamp_hi,
                                             with_kl, 0)


def _prior_tiles(mu, prior_mu, prior_logvar):
    """The prior as the kernels read it: mu's shape, contiguous; None is 0."""
    return tuple(torch.zeros(mu.shape, dtype=mu.dtype, device=mu.device) if p is None
                 else p.expand(mu.shape).contiguous() for p in (prior_mu, prior_logvar))


def reparameterize_forward_with_prior(mu, logvar, prior_mu, prior_logvar, seed, clamp_lo,
                                      clamp_hi, with_kl, num_samples):
    """``reparameterize_forward`` with ``num_samples`` (0: one sample of mu's shape; K:
    shape (K, *mu.shape)) and the KL against N(prior_mu, exp(prior_logvar)) (None: 0),
    like ``fastvae._torch_impl.reparameterize_forward_with_prior``."""
    with _shared.device_guard(mu):
        batch, device = mu.shape[0], mu.device
        mu, logvar = mu.contiguous(), logvar.contiguous()
        cols = mu.numel() // batch
        split = _shared.row_split(batch, cols, device)
        shape = tuple(mu.shape) if not num_samples else (num_samples, *mu.shape)
        z = torch.empty(shape, dtype=torch.promote_types(mu.dtype, logvar.dtype), device=device)
        partials = torch.empty(batch * split.chunks if with_kl else 0, dtype=torch.float32,
                               device=device)
        lo, hi, has_clamp = _clamp_arguments(clamp_lo, clamp_hi)
        has_prior = with_kl and (prior_mu is not None or prior_logvar is not None)
        prior = _prior_tiles(mu, prior_mu, prior_logvar) if has_prior else (mu, mu)
        kl = torch.empty((batch,) if with_kl else (0,), dtype=torch.float32, device=device)
        finish = _shared.finish_blocks(batch, 0, split.chunks, 0, split.num_warps)
        _reparameterize_kernel[(split.programs,)](
            mu, logvar, z, partials, _seed_on(seed, device), *prior, batch, cols, mu.numel(),
            max(1, num_samples), split.chunks, lo, hi,
            _shared.new_ticket_counter(device) if with_kl else partials, kl,
            HAS_CLAMP=has_clamp, WITH_KL=bool(with_kl), HAS_PRIOR=has_prior,
            BLOCK=split.block, ROWS=split.rows, ITERS=split.iters,
            FINISH_ROWS=finish.rows, FINISH_KL=finish.kl, num_warps=split.num_warps,
        )
    return z, kl


def reparameterize_backward(grad_z, grad_kl, mu, logvar, seed, clamp_lo, clamp_hi):
    """(grad_mu, grad_logvar) in mu's and logvar's dtypes, with eps regenerated
    from ``seed``; ``grad_kl`` is None when the forward produced no KL."""
    return reparameterize_backward_with_prior(grad_z, grad_kl, mu, logvar, None, None, seed,
                                              clamp_lo, clamp_hi, 0)[:2]


def reparameterize_backward_with_prior(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed,
                                       clamp_lo, clamp_hi, num_samples):
    """(grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar) like
    ``fastvae._torch_impl.reparameterize_backward_with_prior``: the prior's summed to
    its shape and dtype (empty without it), eps regenerated from ``seed``."""
    with _shared.device_guard(mu):
        batch, device = mu.shape[0], mu.device
        mu, logvar, grad_z = mu.contiguous(), logvar.contiguous(), grad_z.contiguous()
        with_kl = grad_kl is not None
        if with_kl:
            grad_kl = grad_kl.contiguous()
        cols = mu.numel() // batch
        split = _shared.row_split(batch, cols, device)
        grad_mu = torch.empty(mu.shape, dtype=mu.dtype, device=device)
        grad_logvar = torch.empty(logvar.shape, dtype=logvar.dtype, device=device)
        lo, hi, has_clamp = _clamp_arguments(clamp_lo, clamp_hi)
        has_prior = with_kl and (prior_mu is not None or prior_logvar is not None)
        prior = _prior_tiles(mu, prior_mu, prior_logvar) if has_prior else (mu, mu)
        grad_prior = tuple(torch.empty(mu.shape, dtype=torch.float32, device=device)
                           for _ in range(2)) if has_prior else (grad_mu, grad_mu)
        _reparameterize_backward_kernel[(split.programs,)](
            grad_z, grad_kl if with_kl else grad_z, mu, logvar, grad_mu, grad_logvar,
            _seed_on(seed, device), *prior, *grad_prior, batch, cols, mu.numel(),
            max(1, num_samples), split.chunks, lo, hi,
            HAS_CLAMP=has_clamp, WITH_KL=with_kl, HAS_PRIOR=has_prior,
            BLOCK=split.block, ROWS=split.rows, ITERS=split.iters, num_warps=split.num_warps,
        )
    outs = []
    for grad, prior_t in zip(grad_prior, (prior_mu, prior_logvar)):
        if prior_t is None:
            outs.append(mu.new_empty(0))
        elif has_prior:
            outs.append(grad.sum_to_size(prior_t.shape).to(prior_t.dtype))
        else:
            outs.append(torch.zeros(prior_t.shape, dtype=prior_t.dtype, device=prior_t.device))
    return (grad_mu, grad_logvar, *outs)
