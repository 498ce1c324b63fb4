"""The numeric rules both backends share (the PyTorch path in ``_torch_impl``
and the Triton kernels in ``fastvae.kernels``): which dtype the math runs in,
which dtype a saved gradient buffer has, how a sum becomes each reduction, and
the constants that make the BCE terms equal to PyTorch's. Torch only, no
backend: both backends import this module, neither imports the other."""

import math

import torch

BCE_LOG_FLOOR = -100.0  # F.binary_cross_entropy clamps its logs here
BCE_GRAD_EPS = 1e-12  # ...and the denominator of its gradient here


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in float32)."""
    for t in tensors:  # (a loop: a generator expression costs a measurable us per call)
        if t.dtype == torch.float64:
            return torch.float64
    return torch.float32


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


HALF_DTYPES = (torch.bfloat16, torch.float16)


def summed_grad_dtype(t: torch.Tensor, full: torch.Tensor) -> torch.dtype:
    """dtype of the ``full``-shaped gradient buffer of ``t`` (a prior, an obs_logvar),
    which the backward sums to ``t``'s shape where ``t`` broadcasts: float32 then for
    a half-precision ``t``, so that the sum of the per-element gradients is rounded
    once into its dtype, not each of its terms first (bfloat16 terms that cancel lost
    up to 87% of a prior's gradient); else ``grad_buffer_dtype``. (Shapes compared, not
    sizes: under tracing a broadcast prior's differing dims decide it without a guard.)"""
    if t.dtype in HALF_DTYPES and tuple(t.shape) != tuple(full.shape):
        return torch.float32
    return grad_buffer_dtype(t.dtype)


# ---- the observation models with a scale, and the continuous Bernoulli ----

LOG_2PI = math.log(2.0 * math.pi)  # gaussian: 1/2 log(2 pi sigma^2) per element
LOG_2 = math.log(2.0)  # laplace: log(2 b) per element

# gaussian: -log N(x | x_hat, e^s) = 1/2 [(x_hat - x)^2 e^-s + s + log 2 pi]
# laplace:  -log Laplace(x | x_hat, e^s) = |x_hat - x| e^-s + s + log 2
# Both are HALF [err e^-s + s + LOG_NORM] with err the squared / absolute error.
OBS_SCALE = {"gaussian": (0.5, LOG_2PI), "laplace": (1.0, LOG_2)}  # recon: (HALF, LOG_NORM)


# ---- the KL against a prior: e^(lv - plv) - 1 without the rounding of lv - plv


def expm1_of_difference(lv: torch.Tensor, plv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e^(lv - plv) - 1, lv - plv) by differentiable torch ops, for the KL's formula
    paths (the fused paths form the same in their own buffers and kernels).

    d = fl(lv - plv) and its rounding error err, found exactly (Knuth's TwoSum): lv - plv
    = d + err and e^(lv - plv) - 1 = expm1(d) + e^d err to first order; the rounded
    difference alone is off by |err| e^d, ~2e-6 relative in float32 when the logvars are
    50 apart. err's derivative is exactly 0 to autograd. err is 0 where d is not finite
    (an infinite logvar or prior logvar: inf - inf made it NaN, so a flat prior gave a NaN
    KL where the formula's is inf), and e^d in the correction is taken at d capped 0.01
    under log of the dtype's largest number (which rounds up in float32): where e^d
    overflows (expm1(d) is inf anyway) inf times an error of 0 would be NaN, in the value
    and in the gradient."""
    d = lv - plv
    lv_part = d + plv  # the part of d that came from lv
    err = (lv - lv_part) + ((d - lv_part) + plv).neg()
    err = torch.where(torch.isfinite(d), err, 0.0)  # (a where: its zero derivative stays 0)
    log_max = math.log(torch.finfo(d.dtype).max) - 0.01
    return torch.expm1(d) + torch.exp(d.clamp_max(log_max)) * err, d + err


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a call when it has it already (a few us on a small tensor)."""
    if t.dtype == dtype:
        return t
    # .float() parses no arguments: ~1 us less than .to(torch.float32) on a small tensor
    return t.float() if dtype == torch.float32 else t.to(dtype)


def exp_of_float(value: float) -> float:
    """math.exp that overflows to inf, as torch.exp does, instead of raising."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def obs_scale_terms(err: torch.Tensor, log_scale, recon: str) -> torch.Tensor:
    """Per-element -log p(x) of a gaussian (``err`` the squared error, ``log_scale`` =
    log sigma^2) or laplace (``err`` the absolute error, ``log_scale`` = log b)
    observation model; ``log_scale`` a float or a tensor broadcastable to ``err``.
    Differentiable torch formula (the composite and ONNX paths)."""
    half, log_norm = OBS_SCALE[recon]
    if isinstance(log_scale, torch.Tensor):
        scaled = err * torch.exp(-log_scale)
    else:
        scaled = err * exp_of_float(-log_scale)
    return half * (scaled + log_scale + log_norm)


def fitted_recon_rows(err_rows: torch.Tensor, recon: str, numel: int):
    """obs_logvar="optimal": from the per-sample sums S_n of squared (gaussian) or
    absolute (laplace) errors, the scale fitted to the batch, sigma^2 (or b) =
    sum_n S_n / (N D), and the per-sample -log p with it,
        HALF [S_n / sigma^2 + D log sigma^2 + D LOG_NORM];
    returns (rows, 1 / sigma^2). The fitted scale is a constant to the gradient."""
    half, log_norm = OBS_SCALE[recon]
    cols = numel // err_rows.shape[0]
    scale = err_rows.sum() / numel
    inv_scale = scale.reciprocal()
    rows = (err_rows * inv_scale + cols * (torch.log(scale) + log_norm)) * half
    return rows, inv_scale


# log C(l) of the continuous Bernoulli, C(l) = l / tanh(l / 2), and its derivative
# 1/l - 1/sinh(l), by their Taylor series below this |l| (float32 / float64) and
# in log1p forms above: log C = log|l| - log1p(-e^-|l|) + log1p(e^-|l|). Below the
# threshold the series' first omitted term is < 1e-10 (float32) / 1e-22 (float64);
# above it the closed forms lose < 3e-7 / 1e-15 to cancellation.
CB_SERIES_BELOW = {torch.float32: 0.5, torch.float64: 0.05}


def _cb_threshold(dtype):
    return CB_SERIES_BELOW.get(dtype, 0.5)


def cb_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """log C(l), C(l) = l / tanh(l / 2) (= 2 at l = 0); differentiable (both branches
    see clamped inputs, so neither gives a NaN gradient), NaN stays NaN."""
    below = _cb_threshold(logits.dtype)
    far_l = logits.abs().clamp(min=below)
    e = torch.exp(-far_l)
    far = torch.log(far_l) - torch.log1p(-e) + torch.log1p(e)
    t = logits.clamp(-below, below).square()
    near = LOG_2 + t * (1 / 12 + t * (-7 / 1440 + t * (31 / 90720 + t * (
        -127 / 4838400 + t * (73 / 34214400)))))
    return torch.where(logits.abs() < below, near, far)


def cb_log_normalizer_grad(logits: torch.Tensor) -> torch.Tensor:
    """d/dl log C(l) = 1/l - 1/sinh(l) (~ l/6 near 0), NaN stays NaN."""
    below = _cb_threshold(logits.dtype)
    far_l = logits.abs().clamp(min=below)
    # 1/sinh(a) = 2 e^-a / (1 - e^-2a): no overflow for large a
    far = torch.sign(logits) * (far_l.reciprocal()
                                - 2.0 * torch.exp(-far_l) / -torch.expm1(-2.0 * far_l))
    near = cb_log_normalizer_grad_series(logits.clamp(-below, below))
    return torch.where(logits.abs() < below, near, far)


def cb_log_normalizer_grad_series(logits: torch.Tensor) -> torch.Tensor:
    """1/l - 1/sinh(l) by its Taylor series, for |l| below CB_SERIES_BELOW."""
    t = logits.square()
    return logits * (1 / 6 + t * (-7 / 360 + t * (31 / 15120 + t * (
        -127 / 604800 + t * (73 / 3421440)))))
