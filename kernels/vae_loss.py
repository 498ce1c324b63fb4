"""Fused VAE loss: reconstruction + beta * KL, with its gradients, in one pass.

For a batch of N samples, x_hat and x viewed as (N, D), mu and logvar as (N, d):

    recon[n] = sum_j r(x_hat[n, j], x[n, j])
    kl[n]    = sum_k 1/2 (mu[n, k]^2 + exp(lv[n, k]) - 1 - lv[n, k]),  lv = clamp(logvar, lo, hi)

    r (per element)                                      dr/dx_hat
    mse         (x_hat - x)^2                            2 (x_hat - x)
    l1          |x_hat - x|                              sign(x_hat - x)
    bce         -(x max(log p, -100)                     (p - x) / max(p (1 - p), 1e-12),  p = x_hat
                  + (1 - x) max(log(1 - p), -100))       (constants from fastvae._numerics)
    bce_logits  max(l, 0) + log(1 + exp(-|l|)) - l x     sigmoid(l) - x,  l = x_hat
    gaussian    1/2 [(x_hat - x)^2 e^-s + s + log 2pi]   (x_hat - x) e^-s
    laplace     |x_hat - x| e^-s + s + log 2             sign(x_hat - x) e^-s
    continuous_bernoulli  bce_logits - log C(l),         sigmoid(l) - x - (1/l - 1/sinh l)
                C(l) = l / tanh(l / 2)
with s = obs_logvar (a float, one element read from memory, or one per element:
then d r/d s = 1/2 [1 - (x_hat - x)^2 e^-s] (gaussian), 1 - |x_hat - x| e^-s
(laplace) is written too),

reduced as  sum: S = sum_n;  batchmean: S / N;  mean: recon S / (N D), kl S / (N d);
none: per sample; and loss = recon + beta kl.

The forward kernel reads each of x_hat, x, mu, logvar once and, when asked,
writes in the same pass the gradients of the *reduced* recon and kl (beta not
applied; d kl/d mu = scale mu, d kl/d logvar = scale (exp(lv) - 1) / 2, zero
where the clamp was active), so the backward only scales them by grad_output.
All math and accumulation is float32; offsets are int64.

Free bits (free_bits = f > 0, never with "none"): with C_k = sum_n kl[n, k] the batch
sum of latent element k's KL (against N(0, I) or the prior), the KL term is

    kl = scale sum_k max(C_k, N f)       (scale: 1, 1/N or 1/(N d), as above)

and the KL gradients of column k are multiplied by [C_k >= N f] (zero for the
columns held at the floor, torch.clamp_min's rule). A pre-pass
(``_kl_column_sums_kernel``) writes C (d,) before the pass above, which then masks
the gradients it writes; the second stage takes the KL from C.

Programs: the recon view is cut into tiles (a few rows when rows are short,
column chunks when they are long), then the KL view; all in one 1-D grid.
Each program writes one float32 partial sum per row it covers; the program
that finishes last adds them in a fixed order (``_shared.finish_rows``: two
stages in one launch, deterministic, no atomic adds of values).
"""

import torch
import triton
import triton.language as tl

from fastvae import _numerics

from . import _shared

# The reconstruction terms the kernel knows, by the names the public API uses. The
# kernel takes the name itself as a tl.constexpr argument (RECON="bce"): each name
# compiles its own specialization, and no number stands for a loss. (Not a
# module-level tl.constexpr global: those broke torch.compile for other kernel
# libraries.)
RECON_KINDS = ("mse", "l1", "bce", "bce_logits", "gaussian", "laplace", "continuous_bernoulli")
# Where a gaussian / laplace kernel finds s = obs_logvar: "value" (a float argument),
# "scalar" (one element read from memory: a learned scalar, no host sync),
# "elementwise" (one per element of x, its d r/d s written too). Other recons: "value".
OBS_LOGVAR_LAYOUTS = ("value", "scalar", "elementwise")


@triton.jit
def _log1p(v):
    """log(1 + v) accurate for small |v| (Goldberg's trick: the rounding error of
    1 + v cancels in log(u) * v / (u - 1)).

    v: float32 tile, any shape.
    """
    u = 1.0 + v
    return tl.where(u == 1.0, v, tl.log(u) * (v / (u - 1.0)))


@triton.jit
def _cb_log_normalizer(logit):
    """log C(l) and d log C/dl of the continuous Bernoulli, C(l) = l / tanh(l / 2):

        |l| < 1/2:  log 2 + l^2/12 - 7 l^4/1440 + 31 l^6/90720 - 127 l^8/4838400 + ...
                    l/6 - 7 l^3/360 + 31 l^5/15120 - 127 l^7/604800 + 73 l^9/3421440
        otherwise:  log a - log1p(-e) + log1p(e),  a = |l|, e = e^-a
                    sign(l) (1/a - 2 e / (1 - e^2))          (= 1/l - 1/sinh l)

    (fastvae._numerics.cb_log_normalizer's branches for float32; NaN stays NaN.)

    logit: float32 tile, any shape.
    """
    a = tl.abs(logit)
    near = a < 0.5
    far_a = tl.where(near, 0.5, a)  # NaN: not near, stays NaN
    e = tl.exp(-far_a)
    far_log = tl.log(far_a) - _log1p(-e) + _log1p(e)
    far_grad = 1.0 / far_a - 2.0 * e / (1.0 - e * e)
    far_grad = tl.where(logit < 0, -far_grad, far_grad)
    t = logit * logit
    near_log = 0.6931471805599453 + t * (1.0 / 12.0 + t * (-7.0 / 1440.0 + t * (
        31.0 / 90720.0 + t * (-127.0 / 4838400.0 + t * (73.0 / 34214400.0)))))
    near_grad = logit * (1.0 / 6.0 + t * (-7.0 / 360.0 + t * (31.0 / 15120.0 + t * (
        -127.0 / 604800.0 + t * (73.0 / 3421440.0)))))
    return tl.where(near, near_log, far_log), tl.where(near, near_grad, far_grad)


@triton.jit
def _recon_terms(x_hat, x, obs_logvar, RECON: tl.constexpr, BCE_LOG_FLOOR: tl.constexpr,
                 BCE_GRAD_EPS: tl.constexpr):
    """Per-element reconstruction term r and its derivatives dr/dx_hat and dr/ds
    (s = obs_logvar; zero for the recons without it), float32:

        mse         r = (x_hat - x)^2                     dr = 2 (x_hat - x), returned
                                                          halved (_recon_partials doubles it)
        l1          r = |x_hat - x|                       dr = sign(x_hat - x)
        bce         r = -(x max(log p, F) + (1 - x) max(log(1 - p), F)),  p = x_hat
                                                          dr = (p - x) / max(p (1 - p), E)
        bce_logits  r = max(l, 0) + log(1 + exp(-|l|)) - l x,  l = x_hat
                                                          dr = sigmoid(l) - x
        gaussian    r = 1/2 [(x_hat - x)^2 e^-s + s + log 2pi]
                                  dr = (x_hat - x) e^-s,  dr/ds = 1/2 [1 - (x_hat - x)^2 e^-s]
        laplace     r = |x_hat - x| e^-s + s + log 2
                                  dr = sign(x_hat - x) e^-s,  dr/ds = 1 - |x_hat - x| e^-s
        continuous_bernoulli  r = bce_logits' r - log C(l),  C(l) = l / tanh(l / 2)
                                                          dr = sigmoid(l) - x - d log C/dl

    with F = BCE_LOG_FLOOR (-100) and E = BCE_GRAD_EPS (1e-12), the constants of
    F.binary_cross_entropy (fastvae._numerics). Every max keeps NaN.

    x_hat: float32 tile (rows, cols), the prediction (probability, logit or value)
    x: float32 tile like x_hat, the target
    obs_logvar: float32 scalar or tile like x_hat, s (gaussian, laplace; else unused)
    RECON: constexpr str, one of RECON_KINDS
    BCE_LOG_FLOOR: constexpr float, the floor of bce's logs
    BCE_GRAD_EPS: constexpr float, the floor of bce's gradient denominator
    """
    grad_s = 0.0
    if RECON == "mse":
        diff = x_hat - x
        value = diff * diff
        grad = diff  # doubled by _recon_partials, with its scale
    elif RECON == "gaussian":
        diff = x_hat - x
        inv_var = tl.exp(-obs_logvar)
        scaled = diff * diff * inv_var
        value = 0.5 * (scaled + obs_logvar + 1.8378770664093453)  # log(2 pi)
        grad = diff * inv_var
        grad_s = 0.5 * (1.0 - scaled)
    elif RECON == "laplace":
        diff = x_hat - x
        inv_b = tl.exp(-obs_logvar)
        scaled = tl.abs(diff) * inv_b
        value = scaled + obs_logvar + 0.6931471805599453  # log(2)
        grad = (tl.where(diff > 0, 1.0, 0.0) - tl.where(diff < 0, 1.0, 0.0)) * inv_b
        grad_s = 1.0 - scaled
    elif RECON == "continuous_bernoulli":
        log_c, grad_log_c = _cb_log_normalizer(x_hat)
        value = (_shared.clamp_min(x_hat, 0.0) + _log1p(tl.exp(-tl.abs(x_hat))) - x_hat * x
                 - log_c)
        grad = tl.sigmoid(x_hat) - x - grad_log_c
    elif RECON == "l1":
        diff = x_hat - x
        value = tl.abs(diff)
        grad = tl.where(diff > 0, 1.0, 0.0) - tl.where(diff < 0, 1.0, 0.0)
    elif RECON == "bce":
        log_p = _shared.clamp_min(tl.log(x_hat), BCE_LOG_FLOOR)
        log_1mp = _shared.clamp_min(_log1p(-x_hat), BCE_LOG_FLOOR)
        value = -(x * log_p + (1.0 - x) * log_1mp)
        grad = (x_hat - x) / _shared.clamp_min(x_hat * (1.0 - x_hat), BCE_GRAD_EPS)
    else:
        tl.static_assert(RECON == "bce_logits", "RECON must be one of RECON_KINDS")
        value = _shared.clamp_min(x_hat, 0.0) + _log1p(tl.exp(-tl.abs(x_hat))) - x_hat * x
        grad = tl.sigmoid(x_hat) - x
    return value, grad, grad_s


@triton.jit
def _recon_partials(
    pid,  # int64 scalar: this tile's index among the recon tiles
    x_hat_ptr,  # (N, D) contiguous: the predictions
    x_ptr,  # (N, D) contiguous: the targets
    grad_x_hat_ptr,  # (N, D) contiguous, out: recon_grad_scale * dr/dx_hat (WRITE_RECON_GRAD)
    obs_logvar_ptr,  # s: 1 element (OBS_LOGVAR="scalar") or (N, D) contiguous ("elementwise")
    grad_obs_logvar_ptr,  # (N, D) contiguous, out: recon_grad_scale * dr/ds (WRITE_OBS_GRAD)
    partials_ptr,  # float32, out: one partial sum per (row, chunk) at row * recon_chunks + chunk
    n_rows,  # N, the batch size
    recon_cols,  # D, elements per sample
    recon_chunks,  # column chunks per row block
    recon_grad_scale,  # float32: the reduction's scale (1, 1/N or 1/(N D))
    obs_logvar_value,  # float32: s when OBS_LOGVAR="value"
    RECON: tl.constexpr,  # the reconstruction term's name (RECON_KINDS)
    OBS_LOGVAR: tl.constexpr,  # where s is (OBS_LOGVAR_LAYOUTS)
    WRITE_OBS_GRAD: tl.constexpr,  # write grad_obs_logvar (OBS_LOGVAR="elementwise")
    BCE_LOG_FLOOR: tl.constexpr,  # bce: floor of the logs (fastvae._numerics)
    BCE_GRAD_EPS: tl.constexpr,  # bce: floor of the gradient's denominator (fastvae._numerics)
    WRITE_RECON_GRAD: tl.constexpr,  # write grad_x_hat
    RECON_BLOCK: tl.constexpr,  # columns per iteration (a power of two)
    RECON_ROWS: tl.constexpr,  # rows per tile (a power of two)
    RECON_ITERS: tl.constexpr,  # column blocks per tile
):
    """One recon tile, RECON_ROWS rows x (RECON_ITERS x RECON_BLOCK) columns:

        partials[n * recon_chunks + c] = sum_{j in chunk c} r(x_hat[n, j], x[n, j])
        grad_x_hat[n, j]               = recon_grad_scale * dr/dx_hat(x_hat[n, j], x[n, j])
        grad_obs_logvar[n, j]          = recon_grad_scale * dr/ds(x_hat[n, j], x[n, j])
    """
    if OBS_LOGVAR == "scalar":
        s = tl.load(obs_logvar_ptr).to(tl.float32)
    else:
        s = obs_logvar_value
    chunk = pid % recon_chunks
    rows = (pid // recon_chunks) * RECON_ROWS + tl.arange(0, RECON_ROWS).to(tl.int64)
    row_mask = rows < n_rows
    col0 = chunk * (RECON_BLOCK * RECON_ITERS)
    acc = tl.zeros((RECON_ROWS, RECON_BLOCK), dtype=tl.float32)
    for i in range(RECON_ITERS):
        cols = col0 + i * RECON_BLOCK + tl.arange(0, RECON_BLOCK).to(tl.int64)
        mask = row_mask[:, None] & (cols < recon_cols)[None, :]
        offs = rows[:, None] * recon_cols + cols[None, :]
        # 0.5 keeps the logs of masked-out bce lanes finite; they are zeroed below anyway
        x_hat = tl.load(x_hat_ptr + offs, mask=mask, other=0.5).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.5).to(tl.float32)
        if OBS_LOGVAR == "elementwise":
            value, grad, grad_s = _recon_terms(
                x_hat, x, tl.load(obs_logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32),
                RECON, BCE_LOG_FLOOR, BCE_GRAD_EPS)
        else:
            value, grad, grad_s = _recon_terms(x_hat, x, s, RECON, BCE_LOG_FLOOR, BCE_GRAD_EPS)
        acc += tl.where(mask, value, 0.0)
        if WRITE_RECON_GRAD:
            if RECON == "mse":
                # dr = 2 (x_hat - x) as (x_hat - x) (2 scale): the same bits, but a
                # difference past half of float32's range doubled first overflowed,
                # where its gradient of a mean does not
                grad = grad * (2.0 * recon_grad_scale)
            else:
                grad = grad * recon_grad_scale
            tl.store(grad_x_hat_ptr + offs,
                     grad.to(grad_x_hat_ptr.dtype.element_ty), mask=mask)
        if WRITE_OBS_GRAD:
            tl.store(grad_obs_logvar_ptr + offs,
                     (grad_s * recon_grad_scale).to(grad_obs_logvar_ptr.dtype.element_ty),
                     mask=mask)
    tl.store(partials_ptr + rows * recon_chunks + chunk, tl.sum(acc, axis=1), mask=row_mask)


@triton.jit
def _kl_partials(
    kl_pid,  # int64 scalar: this tile's index among the KL tiles
    mu_ptr,  # (N, d) contiguous: the posterior means
    logvar_ptr,  # (N, d) contiguous: the posterior log-variances
    grad_mu_ptr,  # (N, d) contiguous, out: kl_grad_scale * mu (WRITE_KL_GRAD)
    grad_logvar_ptr,  # (N, d) contiguous, out: kl_grad_scale * d kl/d logvar (WRITE_KL_GRAD)
    partials_ptr,  # float32, out: one partial per (row, chunk) at kl_base + row * kl_chunks + chunk
    n_rows,  # N, the batch size
    kl_cols,  # d, latent elements per sample
    kl_chunks,  # column chunks per row block
    kl_base,  # where the KL partials start in partials_ptr (after the recon ones)
    kl_grad_scale,  # float32: the reduction's scale (1, 1/N or 1/(N d))
    clamp_lo,  # float32: lower logvar clamp (HAS_CLAMP)
    clamp_hi,  # float32: upper logvar clamp (HAS_CLAMP)
    prior_mu_ptr,  # (N, d) contiguous: the prior's means (HAS_PRIOR)
    prior_logvar_ptr,  # (N, d) contiguous: the prior's log-variances (HAS_PRIOR)
    grad_prior_mu_ptr,  # (N, d), out: kl_grad_scale * d kl/d prior_mu (WRITE_PRIOR_GRAD)
    grad_prior_logvar_ptr,  # (N, d), out: kl_grad_scale * d kl/d prior_logvar (WRITE_PRIOR_GRAD)
    col_sums_ptr,  # float32 (d,): C_k, latent element k's KL summed over the batch (FREE_BITS)
    free_bits_floor,  # float32: N * free_bits (FREE_BITS)
    HAS_CLAMP: tl.constexpr,  # clamp logvar to [clamp_lo, clamp_hi]
    WRITE_KL_GRAD: tl.constexpr,  # write grad_mu and grad_logvar
    HAS_PRIOR: tl.constexpr,  # the KL against N(prior_mu, exp(prior_logvar)), not N(0, I)
    WRITE_PRIOR_GRAD: tl.constexpr,  # write grad_prior_mu and grad_prior_logvar
    FREE_BITS: tl.constexpr,  # zero the gradients of the columns held at the floor
    KL_BLOCK: tl.constexpr,  # columns per iteration (a power of two)
    KL_ROWS: tl.constexpr,  # rows per tile (a power of two)
    KL_ITERS: tl.constexpr,  # column blocks per tile
):
    """One KL tile (terms in ``_shared.kl_terms``), lv = clamp(logvar, lo, hi):

        partials[kl_base + n * kl_chunks + c] = sum_{k in chunk c} 1/2 (mu^2 + exp(lv) - 1 - lv)
        grad_mu     = kl_grad_scale * mu
        grad_logvar = kl_grad_scale * (exp(lv) - 1) / 2     (0 where the clamp was active)

    With FREE_BITS the gradients of column k are multiplied by
    [C_k >= free_bits_floor] (0 for a held column, and for a NaN C_k, whose NaN is
    in the KL value: torch.clamp_min's gradient rule, as the PyTorch path's mask);
    the product keeps a NaN gradient NaN, as the PyTorch path's does.
    """
    chunk = kl_pid % kl_chunks
    rows = (kl_pid // kl_chunks) * KL_ROWS + tl.arange(0, KL_ROWS).to(tl.int64)
    row_mask = rows < n_rows
    col0 = chunk * (KL_BLOCK * KL_ITERS)
    acc = tl.zeros((KL_ROWS, KL_BLOCK), dtype=tl.float32)
    for i in range(KL_ITERS):
        cols = col0 + i * KL_BLOCK + tl.arange(0, KL_BLOCK).to(tl.int64)
        col_mask = cols < kl_cols
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None] * kl_cols + cols[None, :]
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if FREE_BITS:
            col_sums = tl.load(col_sums_ptr + cols, mask=col_mask, other=0.0)
            grad_scale = tl.where(col_sums >= free_bits_floor, kl_grad_scale, 0.0)[None, :]
        else:
            grad_scale = kl_grad_scale
        if HAS_PRIOR:
            prior_mu = tl.load(prior_mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            prior_logvar = tl.load(prior_logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            value, grad_mu, grad_lv, grad_plv = _shared.prior_kl_terms(
                mu, logvar, prior_mu, prior_logvar, clamp_lo, clamp_hi, HAS_CLAMP)
            if WRITE_PRIOR_GRAD:
                tl.store(grad_prior_mu_ptr + offs,
                         (-grad_mu * grad_scale).to(grad_prior_mu_ptr.dtype.element_ty),
                         mask=mask)
                tl.store(grad_prior_logvar_ptr + offs,
                         (grad_plv * grad_scale).to(grad_prior_logvar_ptr.dtype.element_ty),
                         mask=mask)
        else:
            value, grad_lv = _shared.kl_terms(mu, logvar, clamp_lo, clamp_hi, HAS_CLAMP)
            grad_mu = mu
        acc += tl.where(mask, value, 0.0)
        if WRITE_KL_GRAD:
            tl.store(grad_mu_ptr + offs,
                     (grad_mu * grad_scale).to(grad_mu_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_logvar_ptr + offs,
                     (grad_lv * grad_scale).to(grad_logvar_ptr.dtype.element_ty),
                     mask=mask)
    tl.store(partials_ptr + kl_base + rows * kl_chunks + chunk, tl.sum(acc, axis=1),
             mask=row_mask)


@triton.jit
def _vae_loss_partials_kernel(
    x_hat_ptr,  # (N, D) contiguous: the predictions (any float dtype)
    x_ptr,  # (N, D) contiguous: the targets (any float dtype)
    mu_ptr,  # (N, d) contiguous: the posterior means
    logvar_ptr,  # (N, d) contiguous: the posterior log-variances
    grad_x_hat_ptr,  # (N, D), out: d recon/d x_hat of the reduced recon (WRITE_RECON_GRAD)
    grad_mu_ptr,  # (N, d), out: d kl/d mu of the reduced KL (WRITE_KL_GRAD)
    grad_logvar_ptr,  # (N, d), out: d kl/d logvar of the reduced KL (WRITE_KL_GRAD)
    obs_logvar_ptr,  # s = obs_logvar: 1 element ("scalar") or (N, D) ("elementwise")
    grad_obs_logvar_ptr,  # (N, D), out: d recon/d s of the reduced recon (WRITE_OBS_GRAD)
    partials_ptr,  # float32 (N * recon_chunks + N * kl_chunks,), out: per-(row, chunk) sums
    n_rows,  # N, the batch size
    recon_cols,  # D, recon elements per sample
    kl_cols,  # d, latent elements per sample
    recon_chunks,  # column chunks per recon row block
    kl_chunks,  # column chunks per KL row block
    recon_programs,  # programs [0, recon_programs) do recon tiles, the rest KL tiles
    kl_base,  # N * recon_chunks: where the KL partials start
    recon_grad_scale,  # float32: reduction scale of the recon (1, 1/N or 1/(N D))
    kl_grad_scale,  # float32: reduction scale of the KL (1, 1/N or 1/(N d))
    clamp_lo,  # float32: lower logvar clamp (HAS_CLAMP)
    clamp_hi,  # float32: upper logvar clamp (HAS_CLAMP)
    obs_logvar_value,  # float32: s when OBS_LOGVAR="value"
    prior_mu_ptr,  # (N, d): the KL prior's means (HAS_PRIOR)
    prior_logvar_ptr,  # (N, d): the KL prior's log-variances (HAS_PRIOR)
    grad_prior_mu_ptr,  # (N, d), out: d kl/d prior_mu of the reduced KL (WRITE_PRIOR_GRAD)
    grad_prior_logvar_ptr,  # (N, d), out: d kl/d prior_logvar (WRITE_PRIOR_GRAD)
    col_sums_ptr,  # float32 (d,): the KL of each latent element summed over the batch (FREE_BITS)
    free_bits_floor,  # float32: N * free_bits, below which a column's gradient is 0 (FREE_BITS)
    counter_ptr,  # int32 (), zeroed: the ticket counter that elects the finishing program
    loss_ptr,  # float32 (N,) or (), out: the loss (HAS_RECON)
    recon_ptr,  # float32 (N,) or (), out: the reconstruction term (HAS_RECON)
    kl_ptr,  # float32 (N,) or (), out: the KL
    beta_ptr,  # 0-dim beta on the device, read when BETA_FROM_PTR
    beta_value,  # float32: beta when it is not read from beta_ptr
    RECON: tl.constexpr,  # the reconstruction term's name (RECON_KINDS)
    OBS_LOGVAR: tl.constexpr,  # where s is (OBS_LOGVAR_LAYOUTS)
    WRITE_OBS_GRAD: tl.constexpr,  # write grad_obs_logvar
    BCE_LOG_FLOOR: tl.constexpr,  # bce: floor of the logs (fastvae._numerics, -100)
    BCE_GRAD_EPS: tl.constexpr,  # bce: floor of the gradient's denominator (fastvae._numerics)
    HAS_CLAMP: tl.constexpr,  # clamp logvar to [clamp_lo, clamp_hi]
    WRITE_RECON_GRAD: tl.constexpr,  # write grad_x_hat
    WRITE_KL_GRAD: tl.constexpr,  # write grad_mu and grad_logvar
    HAS_PRIOR: tl.constexpr,  # the KL against N(prior_mu, exp(prior_logvar))
    WRITE_PRIOR_GRAD: tl.constexpr,  # write grad_prior_mu and grad_prior_logvar
    FREE_BITS: tl.constexpr,  # zero the KL gradients of the latent elements held at the floor
    RECON_BLOCK: tl.constexpr,  # recon columns per iteration
    RECON_ROWS: tl.constexpr,  # recon rows per tile
    RECON_ITERS: tl.constexpr,  # recon column blocks per tile
    KL_BLOCK: tl.constexpr,  # KL columns per iteration
    KL_ROWS: tl.constexpr,  # KL rows per tile
    KL_ITERS: tl.constexpr,  # KL column blocks per tile
    HAS_RECON: tl.constexpr,  # a loss; False: the KL alone (recon_programs = 0)
    BETA_FROM_PTR: tl.constexpr,  # read beta from beta_ptr (a tensor beta)
    PER_SAMPLE: tl.constexpr,  # write (N,) values (reduction "none", or asked for)
    FINISH_ROWS: tl.constexpr,  # the second stage: rows per iteration (_shared.FinishBlocks)
    FINISH_RECON: tl.constexpr,  # the second stage: recon partials per row read at once
    FINISH_KL: tl.constexpr,  # the second stage: KL partials per row read at once
    FINISH_COLS: tl.constexpr,  # the second stage: column sums read at once (FREE_BITS)
):
    """Both stages of the loss, one launch. Stage 1: per-(row, chunk) partial sums of

        recon[n] = sum_j r(x_hat[n, j], x[n, j])        (``_recon_terms``)
        kl[n]    = sum_k 1/2 (mu^2 + exp(lv) - 1 - lv),  lv = clamp(logvar, lo, hi)

    and, in the same pass, the gradients of the reduced recon and KL.
    Programs [0, recon_programs) each reduce one recon tile, the others one KL
    tile. (The two tiles live in separate functions: a variable assigned in both
    branches of a runtime ``if`` must have one type in compiled Triton, which the
    interpreter does not check.) Stage 2: the program that stores its partials
    last sums them in a fixed order into the values (``_shared.finish_rows``)."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < recon_programs:  # never true for the KL-only op (recon_programs = 0)
        _recon_partials(pid, x_hat_ptr, x_ptr, grad_x_hat_ptr, obs_logvar_ptr,
                        grad_obs_logvar_ptr, partials_ptr, n_rows,
                        recon_cols, recon_chunks, recon_grad_scale, obs_logvar_value,
                        RECON, OBS_LOGVAR, WRITE_OBS_GRAD,
                        BCE_LOG_FLOOR, BCE_GRAD_EPS, WRITE_RECON_GRAD,
                        RECON_BLOCK, RECON_ROWS, RECON_ITERS)
    else:
        _kl_partials(pid - recon_programs, mu_ptr, logvar_ptr, grad_mu_ptr, grad_logvar_ptr,
                     partials_ptr, n_rows, kl_cols, kl_chunks, kl_base, kl_grad_scale,
                     clamp_lo, clamp_hi, prior_mu_ptr, prior_logvar_ptr, grad_prior_mu_ptr,
                     grad_prior_logvar_ptr, col_sums_ptr, free_bits_floor, HAS_CLAMP,
                     WRITE_KL_GRAD, HAS_PRIOR, WRITE_PRIOR_GRAD, FREE_BITS,
                     KL_BLOCK, KL_ROWS, KL_ITERS)
    if _shared.take_ticket(counter_ptr) == tl.num_programs(0) - 1:
        _shared.finish_rows(
            partials_ptr, loss_ptr, recon_ptr, kl_ptr, beta_ptr, beta_value, n_rows,
            recon_chunks, kl_chunks, kl_base, recon_grad_scale, kl_grad_scale,
            col_sums_ptr, kl_cols, free_bits_floor,
            HAS_RECON, BETA_FROM_PTR, PER_SAMPLE, FREE_BITS and not PER_SAMPLE,
            FINISH_ROWS, FINISH_RECON, FINISH_KL, FINISH_COLS)


@triton.jit
def _kl_column_sums_kernel(
    mu_ptr,  # (N, d) contiguous: the posterior means
    logvar_ptr,  # (N, d) contiguous: the posterior log-variances
    prior_mu_ptr,  # (N, d) contiguous: the prior's means (HAS_PRIOR)
    prior_logvar_ptr,  # (N, d) contiguous: the prior's log-variances (HAS_PRIOR)
    col_sums_ptr,  # float32 (d,), out: C_k, the KL of latent element k summed over the batch
    n_rows,  # N, the batch size
    kl_cols,  # d, latent elements per sample
    clamp_lo,  # float32: lower logvar clamp (HAS_CLAMP)
    clamp_hi,  # float32: upper logvar clamp (HAS_CLAMP)
    HAS_CLAMP: tl.constexpr,  # clamp logvar to [clamp_lo, clamp_hi]
    HAS_PRIOR: tl.constexpr,  # the KL against N(prior_mu, exp(prior_logvar)), not N(0, I)
    COLS: tl.constexpr,  # columns per program (a power of two)
    ROWS: tl.constexpr,  # rows per iteration (a power of two)
):
    """The free-bits pre-pass: for the COLS columns k of this program,

        C_k = sum_n kl(mu[n, k], logvar[n, k] (, prior_mu[n, k], prior_logvar[n, k]))

    with the per-element KL of ``_shared.kl_terms`` / ``_shared.prior_kl_terms``
    (lv clamped if HAS_CLAMP), N K_k in the math of free bits. The rows are added
    ROWS at a time in float32, each lane down its own column, and the ROWS lanes
    of a column summed at the end: a fixed order for given sizes (no atomics), so
    reruns are bitwise equal. NaN stays NaN.
    """
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * COLS + tl.arange(0, COLS).to(tl.int64)
    col_mask = cols < kl_cols
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    for r0 in range(0, n_rows, ROWS):
        rows = r0 + tl.arange(0, ROWS).to(tl.int64)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        offs = rows[:, None] * kl_cols + cols[None, :]
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_PRIOR:
            prior_mu = tl.load(prior_mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            prior_logvar = tl.load(prior_logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            value, _, _, _ = _shared.prior_kl_terms(mu, logvar, prior_mu, prior_logvar,
                                                    clamp_lo, clamp_hi, HAS_CLAMP)
        else:
            value, _ = _shared.kl_terms(mu, logvar, clamp_lo, clamp_hi, HAS_CLAMP)
        acc += tl.where(mask, value, 0.0)
    tl.store(col_sums_ptr + cols, tl.sum(acc, axis=0), mask=col_mask)


# ---- launchers --------------------------------------------------------------


def _kl_column_sums(mu, logvar, prior, clamp_lo, clamp_hi):
    """C (d,) float32: each latent element's KL summed over the batch (the free-bits
    pre-pass, ``_kl_column_sums_kernel``). ``mu``, ``logvar`` contiguous; ``prior``
    None or (prior_mu, prior_logvar) of mu's shape, contiguous."""
    batch = mu.shape[0]
    kl_cols = mu.numel() // batch
    split = _shared.column_split(batch, kl_cols, mu.device)
    col_sums = torch.empty(kl_cols, dtype=torch.float32, device=mu.device)
    has_clamp = clamp_lo is not None
    _kl_column_sums_kernel[(split.programs,)](
        mu, logvar, prior[0] if prior is not None else mu, prior[1] if prior is not None else mu,
        col_sums, batch, kl_cols,
        float(clamp_lo) if has_clamp else 0.0, float(clamp_hi) if has_clamp else 0.0,
        HAS_CLAMP=has_clamp, HAS_PRIOR=prior is not None, COLS=split.cols, ROWS=split.rows,
        num_warps=split.num_warps,
    )
    return col_sums


def _grad_buffer(t, wanted):
    """A fresh contiguous gradient buffer (never an input), or an empty one; its dtype
    is ``_numerics.grad_buffer_dtype``'s (float32 for float16 inputs)."""
    dtype = _numerics.grad_buffer_dtype(t.dtype)
    return torch.empty(t.shape, dtype=dtype, device=t.device) if wanted else t.new_empty(0)


def _beta_arguments(beta, beta_value, device):
    """(tensor for the kernel to read or None, float). A CPU beta with CUDA data
    is read on the host: a CPU tensor's value needs no device sync."""
    if beta is None:
        return None, beta_value
    if beta.device == device:
        return beta, 0.0
    if beta.device.type == "cpu":
        return None, float(beta)
    return beta.to(device, non_blocking=True), 0.0


def _launch(x_hat, x, mu, logvar, recon, reduction, clamp_lo, clamp_hi,
            grad_recon, grad_kl, beta, beta_value, obs_layout="value", obs_logvar=None,
            obs_logvar_value=0.0, per_sample_values=False, prior=None, grad_prior=False,
            free_bits=0.0, obs_grad_dtype=None, prior_grad_dtypes=None):
    """Run both stages; returns (loss, recon, kl, grad_x_hat, grad_mu, grad_logvar,
    grad_obs_logvar, grad_prior_mu, grad_prior_logvar, col_sums) (loss, recon and
    grad_x_hat are None without x_hat; the prior's gradients None unless ``grad_prior``;
    col_sums, the (d,) batch sums of the KL per latent element, None without free bits).
    ``prior``: None, or (prior_mu, prior_logvar) each of mu's shape, contiguous.
    ``obs_logvar``: s for obs_layout "scalar" (1 element) or "elementwise" (x's
    shape, contiguous). ``per_sample_values``: (N,) values, unscaled, whatever the
    reduction (whose scale the gradients still carry; with free bits the kl rows are
    not the free-bits KL). ``free_bits`` > 0: first the column sums (a pre-pass over
    the latents), then the KL gradients zeroed where a column is held at the floor,
    and the KL value sum_k max(C_k, N free_bits), scaled. ``obs_grad_dtype``,
    ``prior_grad_dtypes``: the dtypes of those gradient buffers (the inputs here are
    materialized to x's / mu's shape: the caller knows whether they broadcast,
    ``_numerics.summed_grad_dtype``); None: ``grad_buffer_dtype`` of theirs."""
    has_recon = x_hat is not None
    if has_recon and recon not in RECON_KINDS:
        raise ValueError(f"recon must be one of {RECON_KINDS}, got {recon!r}")
    batch, device = mu.shape[0], mu.device
    mu, logvar = mu.contiguous(), logvar.contiguous()
    kl_cols = mu.numel() // batch
    kl_split = _shared.row_split(batch, kl_cols, device)
    if has_recon:
        x_hat, x = x_hat.contiguous(), x.contiguous()
        recon_cols = x_hat.numel() // batch
        r_split = _shared.row_split(batch, recon_cols, device)
        recon_scale = _numerics.reduction_scale(reduction, batch, x_hat.numel())
    else:  # no recon programs at all
        recon_cols, recon_scale = 1, 1.0
        r_split = _shared.Split(block=1, rows=1, iters=1, chunks=1, programs=0, num_warps=1)
    kl_scale = _numerics.reduction_scale(reduction, batch, mu.numel())

    kl_base = batch * r_split.chunks if has_recon else 0
    partials = torch.empty(kl_base + batch * kl_split.chunks, dtype=torch.float32, device=device)
    grad_x_hat = _grad_buffer(x_hat, grad_recon) if has_recon else None
    grad_mu, grad_logvar = _grad_buffer(mu, grad_kl), _grad_buffer(logvar, grad_kl)
    write_obs_grad = bool(has_recon and grad_recon and obs_layout == "elementwise")
    if write_obs_grad:
        grad_obs = torch.empty(x_hat.shape, device=device,
                               dtype=obs_grad_dtype or _numerics.grad_buffer_dtype(obs_logvar.dtype))
    else:
        # empty, in the dtype the op's fake implementation gives it (x_hat's, or obs_logvar's)
        like = obs_logvar if obs_logvar is not None else (x_hat if has_recon else mu)
        grad_obs = like.new_empty(0)
    has_clamp = clamp_lo is not None
    has_prior = prior is not None
    # free bits: C_k first, so that the pass below can zero the held columns' gradients
    col_sums = _kl_column_sums(mu, logvar, prior, clamp_lo, clamp_hi) if free_bits else None
    free_bits_floor = float(batch * free_bits)
    grad_pm = grad_plv = None
    if has_prior and grad_prior:
        grad_pm, grad_plv = (torch.empty(mu.shape, device=device,
                                         dtype=_numerics.grad_buffer_dtype(p.dtype)
                                         if prior_grad_dtypes is None else prior_grad_dtypes[i])
                             for i, p in enumerate(prior))
    per_sample = reduction == "none" or per_sample_values
    out_shape = (batch,) if per_sample else ()
    new_value = lambda: torch.empty(out_shape, dtype=torch.float32, device=device)  # noqa: E731
    kl_out = new_value()
    loss_out = recon_out = beta_ptr = None
    if has_recon:
        loss_out, recon_out = new_value(), new_value()
        beta_ptr, beta_value = _beta_arguments(beta, beta_value, device)
    num_warps = max(r_split.num_warps, kl_split.num_warps)
    finish = _shared.finish_blocks(batch, r_split.chunks if has_recon else 0, kl_split.chunks,
                                   kl_cols if col_sums is not None else 0, num_warps)
    _vae_loss_partials_kernel[(r_split.programs + kl_split.programs,)](
        x_hat if has_recon else mu, x if has_recon else mu, mu, logvar,
        grad_x_hat if grad_recon else partials, grad_mu if grad_kl else partials,
        grad_logvar if grad_kl else partials,
        partials if obs_logvar is None else obs_logvar, grad_obs if write_obs_grad else partials,
        partials,
        batch, recon_cols, kl_cols, r_split.chunks, kl_split.chunks, r_split.programs, kl_base,
        float(recon_scale), float(kl_scale),
        float(clamp_lo) if has_clamp else 0.0, float(clamp_hi) if has_clamp else 0.0,
        float(obs_logvar_value),
        prior[0] if has_prior else partials, prior[1] if has_prior else partials,
        grad_pm if grad_pm is not None else partials,
        grad_plv if grad_plv is not None else partials,
        col_sums if col_sums is not None else partials, free_bits_floor,
        _shared.new_ticket_counter(device),
        loss_out if has_recon else kl_out, recon_out if has_recon else kl_out, kl_out,
        beta_ptr if beta_ptr is not None else kl_out, float(beta_value),
        RECON=recon if has_recon else "mse",  # the KL-only op runs no recon tile
        OBS_LOGVAR=obs_layout, WRITE_OBS_GRAD=write_obs_grad,
        BCE_LOG_FLOOR=_numerics.BCE_LOG_FLOOR, BCE_GRAD_EPS=_numerics.BCE_GRAD_EPS,
        HAS_CLAMP=has_clamp,
        WRITE_RECON_GRAD=bool(has_recon and grad_recon), WRITE_KL_GRAD=bool(grad_kl),
        HAS_PRIOR=has_prior, WRITE_PRIOR_GRAD=grad_pm is not None,
        FREE_BITS=col_sums is not None,
        RECON_BLOCK=r_split.block, RECON_ROWS=r_split.rows, RECON_ITERS=r_split.iters,
        KL_BLOCK=kl_split.block, KL_ROWS=kl_split.rows, KL_ITERS=kl_split.iters,
        HAS_RECON=has_recon, BETA_FROM_PTR=beta_ptr is not None, PER_SAMPLE=per_sample,
        FINISH_ROWS=finish.rows, FINISH_RECON=finish.recon, FINISH_KL=finish.kl,
        FINISH_COLS=finish.cols,
        num_warps=num_warps,
    )
    return (loss_out, recon_out, kl_out, grad_x_hat, grad_mu, grad_logvar, grad_obs, grad_pm,
            grad_plv, col_sums)


def _fitted_scale_loss(x_hat, x, mu, logvar, beta, beta_value, recon, reduction,
                       clamp_lo, clamp_hi, grad_recon, grad_kl, prior=None, grad_prior=False,
                       free_bits=0.0, prior_grad_dtypes=None):
    """obs_logvar="optimal": the mse / l1 kernel's per-sample sums S_n and gradient,
    then (N,)-sized torch ops (no host sync) for sigma^2 = sum S_n / (N D) and the
    values, and one more pass over the gradient for its factor 1/sigma^2, known
    only after the sums. With free bits the KL is sum_k max(C_k, N free_bits),
    scaled, from the kernel's (d,) column sums (torch ops, no host sync)."""
    base = "mse" if recon == "gaussian" else "l1"
    (_, err_rows, kl_rows, grad_x_hat, grad_mu, grad_logvar, grad_obs, grad_pm, grad_plv,
     col_sums) = _launch(x_hat, x, mu, logvar, base, reduction, clamp_lo, clamp_hi, grad_recon,
                         grad_kl, None, 0.0, per_sample_values=True, prior=prior,
                         grad_prior=grad_prior, free_bits=free_bits,
                         prior_grad_dtypes=prior_grad_dtypes)
    rows, inv_scale = _numerics.fitted_recon_rows(err_rows, recon, x_hat.numel())
    if grad_recon:  # mse's gradient is 2 (x_hat - x): the gaussian's is HALF of it / sigma^2
        grad_x_hat.mul_(inv_scale * _numerics.OBS_SCALE[recon][0])
    batch = x_hat.shape[0]
    if reduction == "none":
        recon_out, kl_out = rows, kl_rows
    else:
        recon_out = rows.sum() * _numerics.reduction_scale(reduction, batch, x_hat.numel())
        kl_scale = _numerics.reduction_scale(reduction, batch, mu.numel())
        if col_sums is not None:
            kl_out = torch.clamp_min(col_sums, batch * free_bits).sum() * kl_scale
        else:
            kl_out = kl_rows.sum() * kl_scale
    loss = recon_out + (beta_value if beta is None else beta.to(recon_out.dtype)) * kl_out
    return (loss, recon_out, kl_out, grad_x_hat, grad_mu, grad_logvar, grad_obs, grad_pm,
            grad_plv, col_sums)


def vae_loss_forward(x_hat, x, mu, logvar, beta, obs_logvar, beta_value, recon,
                     obs_logvar_value, obs_logvar_optimal, reduction,
                     clamp_lo, clamp_hi, grad_recon, grad_kl):
    """``_vae_loss`` against N(0, I): its first seven outputs."""
    return _vae_loss(x_hat, x, mu, logvar, beta, obs_logvar, beta_value, recon,
                     obs_logvar_value, obs_logvar_optimal, reduction, clamp_lo, clamp_hi,
                     grad_recon, grad_kl)[:7]


def _prior_tiles(mu, prior_mu, prior_logvar):
    """(prior_mu, prior_logvar) as the kernel reads them: mu's shape, contiguous (a
    broadcast prior is materialized: one latent-sized write and read each, and its
    gradient is latent-sized until the backward's sum_to_size); None is 0."""
    return tuple(torch.zeros(mu.shape, dtype=mu.dtype, device=mu.device) if p is None
                 else p.expand(mu.shape).contiguous() for p in (prior_mu, prior_logvar))


def _prior_tiles_or_none(mu, prior_mu, prior_logvar):
    """``_prior_tiles``, or None without a prior (a free-bits call against N(0, I))."""
    if prior_mu is None and prior_logvar is None:
        return None
    return _prior_tiles(mu, prior_mu, prior_logvar)


def _prior_grad_dtypes(mu, prior_mu, prior_logvar):
    """The dtypes of the prior's mu-shaped gradient buffers (``_numerics.summed_grad_dtype``:
    float32 for a broadcast half-precision prior); mu's for an absent one (not returned)."""
    return tuple(mu.dtype if p is None else _numerics.summed_grad_dtype(p, mu)
                 for p in (prior_mu, prior_logvar))


def _prior_grads_or_empty(grad_pm, grad_plv, prior_mu, prior_logvar, mu):
    return tuple(g if g is not None and p is not None else (mu if p is None else p).new_empty(0)
                 for g, p in ((grad_pm, prior_mu), (grad_plv, prior_logvar)))


def vae_loss_forward_with_prior(x_hat, x, mu, logvar, beta, obs_logvar, prior_mu, prior_logvar,
                                beta_value, recon, obs_logvar_value, obs_logvar_optimal,
                                reduction, clamp_lo, clamp_hi, free_bits, grad_recon, grad_kl,
                                grad_prior):
    """``vae_loss_forward`` with the KL against N(prior_mu, exp(prior_logvar)) (both
    None: N(0, I)) and free bits, like ``fastvae._torch_impl.vae_loss_forward_with_prior``:
    nine outputs, the prior's gradients mu-shaped (or empty). One pass, as without a
    prior; free bits add a pre-pass over the latents (their per-element batch sums)."""
    out = _vae_loss(x_hat, x, mu, logvar, beta, obs_logvar, beta_value, recon,
                    obs_logvar_value, obs_logvar_optimal, reduction, clamp_lo, clamp_hi,
                    grad_recon, grad_kl, _prior_tiles_or_none(mu, prior_mu, prior_logvar),
                    grad_prior, free_bits, _prior_grad_dtypes(mu, prior_mu, prior_logvar))
    return (*out[:7], *_prior_grads_or_empty(out[7], out[8], prior_mu, prior_logvar, mu))


def _vae_loss(x_hat, x, mu, logvar, beta, obs_logvar, beta_value, recon,
              obs_logvar_value, obs_logvar_optimal, reduction,
              clamp_lo, clamp_hi, grad_recon, grad_kl, prior=None, grad_prior=False,
              free_bits=0.0, prior_grad_dtypes=None):
    """Returns (loss, recon, kl, grad_x_hat, grad_mu, grad_logvar, grad_obs_logvar)
    like ``fastvae._torch_impl.vae_loss_forward``: values in float32, gradients of
    the reduced recon and kl (beta not applied), each in the
    _numerics.grad_buffer_dtype of its input's dtype, or empty tensors when not
    asked for (grad_obs_logvar: x-shaped for an obs_logvar of several elements)."""
    with _shared.device_guard(x_hat):
        if obs_logvar_optimal:
            return _fitted_scale_loss(x_hat, x, mu, logvar, beta, beta_value, recon, reduction,
                                      clamp_lo, clamp_hi, grad_recon, grad_kl, prior, grad_prior,
                                      free_bits, prior_grad_dtypes)
        layout, obs_grad_dtype = "value", None
        if obs_logvar is not None and obs_logvar.numel() == 1:
            layout = "scalar"  # read by the kernel: a learned scalar costs no host sync
        elif obs_logvar is not None:
            # Other broadcasts (per channel, per sample...) are materialized to x's
            # shape here: one extra x-sized write and read (a per-element obs_logvar
            # of x's shape is used as it is), and their gradient is x-sized until
            # the backward's sum_to_size reduces it.
            layout = "elementwise"
            obs_grad_dtype = _numerics.summed_grad_dtype(obs_logvar, x_hat)  # (before expanding)
            obs_logvar = obs_logvar.expand(x_hat.shape).contiguous()
        return _launch(x_hat, x, mu, logvar, recon, reduction, clamp_lo, clamp_hi,
                       grad_recon, grad_kl, beta, beta_value, layout, obs_logvar,
                       obs_logvar_value, prior=prior, grad_prior=grad_prior,
                       free_bits=free_bits, obs_grad_dtype=obs_grad_dtype,
                       prior_grad_dtypes=prior_grad_dtypes)


def kl_forward(mu, logvar, reduction, clamp_lo, clamp_hi, want_grad):
    """Returns (kl, grad_mu, grad_logvar) like ``fastvae._torch_impl.kl_forward``,
    with the loss kernel's KL programs alone."""
    with _shared.device_guard(mu):
        _, _, kl, _, grad_mu, grad_logvar = _launch(
            None, None, mu, logvar, "mse", reduction, clamp_lo, clamp_hi,
            False, want_grad, None, 0.0)[:6]
    return kl, grad_mu, grad_logvar


def kl_forward_with_prior(mu, logvar, prior_mu, prior_logvar, reduction, clamp_lo, clamp_hi,
                          free_bits, want_grad, want_prior_grad):
    """(kl, grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar) like
    ``fastvae._torch_impl.kl_forward_with_prior``, with the loss kernel's KL programs
    alone (after the column-sum pre-pass, with free bits)."""
    with _shared.device_guard(mu):
        out = _launch(None, None, mu, logvar, "mse", reduction, clamp_lo, clamp_hi, False,
                      want_grad, None, 0.0,
                      prior=_prior_tiles_or_none(mu, prior_mu, prior_logvar),
                      grad_prior=want_prior_grad, free_bits=free_bits,
                      prior_grad_dtypes=_prior_grad_dtypes(mu, prior_mu, prior_logvar))
    return (out[2], out[4], out[5],
            *_prior_grads_or_empty(out[7], out[8], prior_mu, prior_logvar, mu))
