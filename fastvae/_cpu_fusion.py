"""Fused CPU loops for the large reconstruction terms of the PyTorch path, generated
by Inductor (torch.compile's C++ backend).

Why: a half-precision loss computed exactly (float32 math and accumulation) needs
each element converted, differenced, squared (or logged) and summed in one pass.
Torch ops cannot do that on the CPU: each op is a pass (per 2^19-element chunk a bf16 ->
float32 copy took 25-37 us, a float32 mse_loss ~30 us, a sum ~20 us), and aten's
half-precision kernels round every term to bf16/fp16.
Inductor writes that one pass as a vectorized C++ loop: at 512x12288 bf16 mse forward
+ backward took 2.0 ms, 1.77x eager interleaved (the chunked torch ops: 1.05x); the
continuous Bernoulli's seven passes became one (bf16 0.81x -> 4.9x eager).

What it costs, and so when it is used (``fused_recon``):
- a C++ compiler at run time and a compilation per kernel: 1-2 s each with
  Inductor's on-disk cache warm, ~10 s for the first one in a fresh cache. So only
  tensors of at least MIN_NUMEL elements (where a call takes milliseconds), and only
  from a kernel's COMPILE_AT_CALL-th call: a script that computes one loss never
  waits for a compiler, a training loop compiles once, early;
- per call, ~26 us of guards and wrapper (measured on 2x256 inputs), against the
  chunked ops' ~0.5 ms for a bf16 mse forward of 2^20 elements (3.5 ms at 512x12288).
If compiling fails before any kernel has worked (no compiler, say), fastvae warns
once and keeps the chunked torch ops from then on; a kernel that fails after another
has worked is dropped alone. ``FASTVAE_CPU_FUSION=0`` (read on first use) or
``fastvae.set_cpu_fusion(False)`` turns it off.

The kernels compute what the chunked path (_torch_impl._recon_chunk and
_continuous_bernoulli_recon) computes, the per-row sums of the terms and grad_scale
times their gradient, rounded once into the gradient buffer's dtype; only the
summation differs (_row_sums: float32 blocks, then float64).
"""

import os
import re
import sys
import threading
import types
import warnings

import torch
import torch.nn.functional as F

from fastvae._grad_scaling import in_torch_dispatch_mode
from fastvae._numerics import (
    BCE_GRAD_EPS,
    BCE_LOG_FLOOR,
    CB_SERIES_BELOW,
    cb_log_normalizer_grad_series,
    grad_buffer_dtype,
)

MIN_NUMEL = 1 << 20
COMPILE_AT_CALL = 3
ENV_VAR = "FASTVAE_CPU_FUSION"

# mse and l1 of float32 inputs stay on torch ops (one aten pass each already, and
# their value is bit for bit the same with and without a gradient); a half-precision
# input of theirs, and bce/bce_logits/the continuous Bernoulli in any CPU dtype
# (several passes each on torch ops), gain from one fused pass.
_HALF = (torch.bfloat16, torch.float16)
_DTYPES = (torch.float32, *_HALF)
_ANY_DTYPE_RECONS = ("bce", "bce_logits", "continuous_bernoulli")
_HALF_ONLY_RECONS = ("mse", "l1")


# ---- the kernels' math: (x_hat, x) as (N, M) rows, float32 math ----------------
# Each returns the per-row sums (N,) float32, and with ``scale`` (a 0-dim float32
# tensor: a Python float would be specialized, one compilation per value) the
# gradient of their sum times scale, in ``grad_dtype``.

ROW_BLOCK = 256


def _row_sums(terms):
    """Per-row sums of (N, M) float32 terms: blocks of ROW_BLOCK summed in float32 (a
    few terms per vector lane), the block sums in float64. Inductor's plain float32
    row sum adds 4096 terms per vector lane in sequence before its cascade: 6e-6
    relative error over rows of 2^20 squares, where torch.sum's cascade gives 1e-7 and
    these blocks 6e-8 (the final rounding). A row length that is not a multiple of
    ROW_BLOCK is zero-padded (terms, not inputs: a padded logit's term is not 0), which
    costs a second pass where the gradient is also written (bf16 mse at 512x12289:
    forward + backward 2.4 ms against 1.8 at 512x12288; forward 1.4 against 0.6)."""
    n, m = terms.shape
    if m % ROW_BLOCK:
        terms = F.pad(terms, (0, -m % ROW_BLOCK))
    return terms.view(n, -1, ROW_BLOCK).sum(dim=2).double().sum(dim=1).float()


def _mse(x_hat, x, scale, grad_dtype):
    d = x_hat.float() - x.float()
    rows = _row_sums(d * d)
    return rows if scale is None else (rows, (d * (2.0 * scale)).to(grad_dtype))


def _l1(x_hat, x, scale, grad_dtype):
    d = x_hat.float() - x.float()
    rows = _row_sums(d.abs())
    return rows if scale is None else (rows, (d.sign() * scale).to(grad_dtype))


def _bce_logits(x_hat, x, scale, grad_dtype):
    logit, target = x_hat.float(), x.float()
    rows = _row_sums(F.softplus(logit) - logit * target)  # beta 1, threshold 20 as aten's
    if scale is None:
        return rows
    return rows, ((torch.sigmoid(logit) - target) * scale).to(grad_dtype)


def _bce(x_hat, x, scale, grad_dtype):
    p, target = x_hat.float(), x.float()
    log_p = torch.log(p).clamp_min(BCE_LOG_FLOOR)
    log_q = torch.log1p(-p).clamp_min(BCE_LOG_FLOOR)
    rows = -_row_sums(target * log_p + (log_q - log_q * target))
    if scale is None:
        return rows
    # F.binary_cross_entropy's gradient: (p - x) / max(p (1 - p), 1e-12)
    grad = (p - target) / torch.clamp_min((1.0 - p) * p, BCE_GRAD_EPS) * scale
    return rows, grad.to(grad_dtype)


def _continuous_bernoulli(x_hat, x, scale, grad_dtype):
    # _torch_impl._continuous_bernoulli_recon's formulas (derivation there), but for
    # log(a / m) below CB_SERIES_BELOW: Inductor's CPU expm1 loses its digits near 0
    # (expm1(-1e-8) gave 0: m = 0 and a NaN term for a logit of 0 or 1e-8), so there
    # log(a / m) = a/2 - log(sinh(u) / u), u = a/2, by the series of the latter
    logit, target = x_hat.float(), x.float()
    a = logit.abs().clamp_min(torch.finfo(torch.float32).tiny)
    near = a < CB_SERIES_BELOW[torch.float32]
    m = -torch.expm1(-a)
    t = (a * 0.5) * (a * 0.5)
    log_ratio_near = a * 0.5 - t * (1 / 6 + t * (-1 / 180 + t * (1 / 2835 + t * (
        -1 / 37800 + t * (1 / 467775)))))
    log_ratio = torch.where(near, log_ratio_near, torch.log(a / m))
    rows = _row_sums((logit.clamp_min(0.0) - logit * target) - log_ratio)
    if scale is None:
        return rows
    e = 1.0 - m  # e^-a (near 0 m's lost digits move p = 1 / (1 + e) by an ulp at most)
    p = 1.0 / (e + 1.0)
    g = 1.0 / a - e * p * 2.0 / m  # 1/a - 1/sinh(a), closed form
    g = torch.where(near, cb_log_normalizer_grad_series(a), g)
    grad = ((p - g) - 0.5) * torch.sign(logit) + 0.5 - target
    return rows, (grad * scale).to(grad_dtype)


# ---- the KL of the latents: (mu, logvar) as (N, M) rows, a prior as (1, M) or (N, M) ----
#
# _torch_impl's formulas (derivation above _prior_kl_blocked), per element with
# d = lv - plv (plv = 0 without a prior logvar, pm = 0 without a prior mean):
#     kl = 1/2 expm1(d) - 1/2 d + 1/2 (mu - pm)^2 e^-plv
#     d/dmu = (mu - pm) e^-plv = -d/dpm,  d/dlv = 1/2 expm1(d),
#     d/dplv = -(1/2 expm1(d) + 1/2 (mu - pm)^2 e^-plv)
# d is lv - plv rounded to float32 plus its rounding error, found exactly (Knuth's
# TwoSum; Inductor keeps float arithmetic as written): e^d - 1 of the rounded d alone
# is off by |err| e^d, 2e-6 relative when the logvars are 50 apart. Inductor's CPU
# expm1 is exp(x) - 1 (expm1(1e-8) gave 0, 1e-6 4% off), so below |x| = 1/2 a Taylor
# polynomial takes its place (its remainder < 0.5^10 / 10! ~ 3e-10 of x). Exp and
# this arithmetic bound the loop (~0.75 ns per element on 2 cores), not memory.

KL_MIN_NUMEL = 1 << 16
_EXPM1_SERIES_BELOW = 0.5
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _expm1(x):
    series = x * (1 + x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (
        1 / 720 + x * (1 / 5040 + x * (1 / 40320 + x * (1 / 362880)))))))))
    return torch.where(x.abs() < _EXPM1_SERIES_BELOW, series, torch.exp(x) - 1)


KL_SHORT_ROW = 1024


def _kl_row_sums(terms):
    """Per-row sums: Inductor's float32 row sum up to KL_SHORT_ROW elements (a few dozen
    terms per vector lane, then its cascade; fused with the gradients' loop), longer
    rows in _row_sums' blocks (a second loop: ~40% more time at 4096x512)."""
    if terms.shape[1] <= KL_SHORT_ROW:
        return terms.sum(dim=1)
    return _row_sums(terms)


def _kl(mu, logvar, prior_mu, prior_logvar, bounds, scale, grad_dtypes):
    """Per-row KL sums (N,) float32 and, with ``scale``, scale times the gradients
    (mu, logvar, prior_mu, prior_logvar: (N, M) each, in ``grad_dtypes``, None where
    that dtype is None). ``bounds``: None or the logvar clamp (lo, hi), float32 (2,)."""
    m, lv_raw = mu.float(), logvar.float()
    lv = lv_raw if bounds is None else torch.clamp(lv_raw, bounds[0], bounds[1])
    if prior_logvar is None:
        d = lv
        em1 = _expm1(d)
        enp = None
    else:
        npl = -prior_logvar.float()
        d = lv + npl
        from_lv = d - npl
        err = (lv - from_lv) + ((from_lv - d) + npl)
        # (none where it is not finite: an infinite logvar made it inf - inf, no error)
        err = torch.where(torch.isfinite(err), err, 0.0)
        em1 = _expm1(d)
        # expm1(d + err) = expm1(d) + e^d err; expm1 capped where it overflowed (0 * inf)
        em1 = em1 + (err + torch.clamp_max(em1, _FLOAT32_MAX) * err)
        d = d + err
        enp = torch.exp(npl)
    h = em1 * 0.5
    diff = m if prior_mu is None else m - prior_mu.float()
    gm = diff if enp is None else diff * enp
    p = h + gm * diff * 0.5
    rows = _kl_row_sums(p - d * 0.5)
    if scale is None:
        return rows
    dt_mu, dt_lv, dt_pm, dt_plv = grad_dtypes
    g_mu = None if dt_mu is None else (gm * scale).to(dt_mu)
    g_lv = None
    if dt_lv is not None:
        g_lv = h * scale
        if bounds is not None:  # zero where the clamp was active (a NaN logvar passes)
            g_lv = torch.where((lv_raw < bounds[0]) | (lv_raw > bounds[1]), 0.0, g_lv)
        g_lv = g_lv.to(dt_lv)
    g_pm = None if dt_pm is None else (gm * -scale).to(dt_pm)
    g_plv = None if dt_plv is None else (p * -scale).to(dt_plv)
    return rows, g_mu, g_lv, g_pm, g_plv


_MATH = {"mse": _mse, "l1": _l1, "bce_logits": _bce_logits, "bce": _bce,
         "continuous_bernoulli": _continuous_bernoulli}


# ---- the switch, the counters and the compiled kernels -------------------------

_NOT_READ = object()
_enabled = _NOT_READ
_failed = False  # compiling failed before any kernel worked: the toolchain, off for good
_lock = threading.Lock()
_calls = {}  # kernel key -> calls so far, until compiled
_compiled = {}  # kernel key -> the torch.compile'd function, or None where it failed
_worked = set()  # kernel keys that have run


def set_cpu_fusion(enabled: bool) -> bool:
    """Turn Inductor's fused CPU loops for large reconstruction terms on or off, in
    the whole process (overrides ``FASTVAE_CPU_FUSION``); returns the previous setting.
    Off, the PyTorch path uses its chunked torch ops (same math, more passes)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous = _is_enabled()
    _enabled = enabled
    return previous


def _is_enabled():
    global _enabled
    if _enabled is _NOT_READ:
        value = os.environ.get(ENV_VAR, "1").strip().lower()
        if value not in ("0", "1", "", "off", "on", "false", "true"):
            raise ValueError(f"{ENV_VAR} must be 0 or 1, got {value!r}")
        _enabled = value not in ("0", "off", "false")
    return _enabled


def applies(x_hat, x, recon, dtype):
    """Whether ``fused_recon`` may serve this recon_per_sample call (before counting)."""
    if recon in _HALF_ONLY_RECONS:
        if x_hat.dtype not in _HALF and x.dtype not in _HALF:
            return False
    elif recon not in _ANY_DTYPE_RECONS:
        return False
    return (dtype == torch.float32 and x_hat.device.type == "cpu"
            and x_hat.numel() >= MIN_NUMEL and x_hat.dim() >= 1
            # rows narrower than a block would be padded to one (3x slower at 2^17 rows of 8)
            and x_hat.numel() // x_hat.shape[0] >= ROW_BLOCK
            and x_hat.is_contiguous() and x.is_contiguous() and x.shape == x_hat.shape
            and x.dtype in _DTYPES and x_hat.dtype in _DTYPES
            # (Inductor warns about a loop that mixes bf16 and fp16 loads)
            and {x.dtype, x_hat.dtype} != set(_HALF)
            and not _failed and _is_enabled()
            and not torch.compiler.is_compiling() and not in_torch_dispatch_mode())


def _kernel(key, math_fn):
    """A torch.compile'd copy of ``math_fn`` for one key. Each key gets a code object
    of its own: Dynamo keeps its compiled graphs per code object and stops compiling
    one past its recompile limit (8). So the key holds what Dynamo would specialize on
    (the dtypes, the input's rank: its guards see the reshaped view's base, a batch of
    1, rows a whole number of blocks or not): one graph per code object."""
    name = re.sub(r"\W+", "_", "_".join(str(k).removeprefix("torch.") for k in key))
    fn = types.FunctionType(math_fn.__code__.replace(co_name=name), math_fn.__globals__, name)
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _dynamo_disabled():
    """Dynamo switched off, or told to run compiled functions eagerly
    (``torch.compiler.set_stance("force_eager")``, read where torch keeps it)."""
    dynamo = sys.modules.get("torch._dynamo")  # (torch.compile imports it)
    if dynamo is None:
        return False
    stance = getattr(getattr(dynamo.eval_frame, "_stance", None), "stance", None)
    return getattr(dynamo.config, "disable", False) or stance == "force_eager"


def _run(key, math_fn, *args):
    """``key``'s compiled copy of ``math_fn`` run on ``args`` (without grad), or None
    where the torch ops are to run: not yet the key's COMPILE_AT_CALL-th call, its
    compilation failed, or Dynamo is off."""
    global _failed
    compiled = _compiled.get(key, _NOT_READ)
    if compiled is None:  # this kernel failed before
        return None
    if compiled is _NOT_READ:
        with _lock:
            calls = _calls[key] = _calls.get(key, 0) + 1
            if calls < COMPILE_AT_CALL:
                return None
    try:
        if compiled is _NOT_READ:
            with _lock:  # (torch.compile itself raises where Dynamo cannot run)
                compiled = _compiled.get(key, _NOT_READ)
                if compiled is _NOT_READ:
                    compiled = _compiled[key] = _kernel(key, math_fn)
        if compiled is None or _dynamo_disabled():
            # with Dynamo off the "compiled" function would run as torch ops on whole
            # float32 copies: the chunked path is better then
            return None
        with torch.no_grad():
            out = compiled(*args)
    except Exception as error:  # noqa: BLE001 - any failure of the compiler toolchain
        with _lock:
            _compiled[key] = None
            # no kernel has ever run: the toolchain (no compiler, say), off for good;
            # else this kernel alone (a recompile refused by a torch.compiler stance)
            toolchain = not _worked
            if toolchain:
                _failed = True
        what = "the fused CPU loss loops" if toolchain else f"the fused CPU loop {key}"
        warnings.warn(f"fastvae: Inductor could not build {what} ({type(error).__name__}: "
                      f"{error}); the PyTorch path's unfused torch ops are used there from "
                      "now on (FASTVAE_CPU_FUSION=0 skips the attempt)",
                      RuntimeWarning, stacklevel=3)
        return None
    _worked.add(key)
    return out


def _global_state(*tensors):
    """The state outside the arguments that Dynamo's guards check (each change is a
    recompile): inference mode, inference tensors, the thread count."""
    return (torch.is_inference_mode_enabled(),
            any(t is not None and t.is_inference() for t in tensors), torch.get_num_threads())


def fused_recon(x_hat, x, recon, grad_scale):
    """recon_per_sample's (per-row sums float32 (N,), gradient or None) from one fused
    loop, or None where the chunked torch ops are to run: not yet the kernel's
    COMPILE_AT_CALL-th call, or compiling failed. ``applies`` held."""
    grad_dtype = None if grad_scale is None else grad_buffer_dtype(x_hat.dtype)
    batch = x_hat.shape[0]
    row = x_hat.numel() // batch
    key = (recon, x_hat.dtype, x.dtype, grad_dtype, x_hat.dim(), batch == 1,
           row % ROW_BLOCK == 0, batch == row, *_global_state(x_hat, x))
    scale = None if grad_scale is None else torch.tensor(grad_scale, dtype=torch.float32)
    out = _run(key, _MATH[recon], x_hat.detach().reshape(batch, row),
               x.detach().reshape(batch, row), scale, grad_dtype)
    if out is None or grad_scale is None:
        return None if out is None else (out, None)
    rows, grad = out
    return rows, grad.view(x_hat.shape)


def _prior_rows(prior, mu, rows, cols):
    """``prior`` (None, mu-shaped, or mu's shape without the batch dim, leading 1s
    allowed) as (rows, cols) or (1, cols) rows; False if it is another broadcast."""
    if prior is None:
        return None
    if prior.shape == mu.shape:
        return prior.detach().reshape(rows, cols)
    if prior.numel() == cols and tuple(prior.shape[prior.dim() - mu.dim() + 1:]) \
            == tuple(mu.shape[1:]) and prior.dim() >= mu.dim() - 1:
        return prior.detach().reshape(1, cols)
    return False


def applies_kl(mu, logvar, prior_mu, prior_logvar, dtype):
    """Whether ``fused_kl`` may serve this KL (before counting): against a prior in any
    CPU dtype (a dozen torch passes), against N(0, I) for half-precision latents (the
    float32 torch ops, aten's expm1 and a norm, were faster than the loop: 3.3 against
    5.6 ms at 4096x512 forward + backward)."""
    if mu.numel() < KL_MIN_NUMEL or dtype != torch.float32:  # (the common small call: first)
        return False
    tensors = [t for t in (mu, logvar, prior_mu, prior_logvar) if t is not None]
    dtypes = {t.dtype for t in tensors}
    if len(tensors) == 2 and dtypes == {torch.float32}:
        return False
    return (mu.device.type == "cpu" and mu.dim() >= 1
            and logvar.shape == mu.shape
            and all(t.is_contiguous() and t.device.type == "cpu" for t in tensors)
            and dtypes <= set(_DTYPES) and not set(_HALF) <= dtypes
            and not _failed and _is_enabled()
            and not torch.compiler.is_compiling() and not in_torch_dispatch_mode())


def fused_kl(mu, logvar, prior_mu, prior_logvar, lo, hi, scale, want_grad, want_prior_grad):
    """The KL of mu and logvar against N(prior_mu, e^prior_logvar) (None: 0, 1) from
    one fused loop: (per-row sums float32 (N,), g_mu, g_lv, g_pm, g_plv), the gradients
    of their sum times ``scale`` (a float) mu-shaped and contiguous in their buffers'
    dtypes, None where not wanted (a prior's: where it is None); or None where the torch
    ops are to run (not yet compiled, a failure, a prior of another broadcast).
    ``applies_kl`` held."""
    batch = mu.shape[0]
    cols = mu.numel() // batch
    pm, plv = _prior_rows(prior_mu, mu, batch, cols), _prior_rows(prior_logvar, mu, batch, cols)
    if pm is False or plv is False:
        return None

    def grad_dtype(t, wanted):
        return grad_buffer_dtype(t.dtype) if wanted and t is not None else None

    dtypes = None
    if want_grad or want_prior_grad:
        dtypes = (grad_dtype(mu, want_grad), grad_dtype(logvar, want_grad),
                  grad_dtype(prior_mu, want_prior_grad), grad_dtype(prior_logvar, want_prior_grad))
    if lo is not None and max(abs(lo), abs(hi)) > _FLOAT32_MAX:
        return None  # (torch.clamp refuses a bound past float32's range: the torch ops say so)
    long_rows = cols > KL_SHORT_ROW
    # what the compiled function specializes on: which inputs are None, the dtypes, the
    # ranks of the tensors viewed as rows (Dynamo guards on them), a prior's broadcast,
    # the row sum's branch, sizes of 1 and equal sizes (one symbol), the global state
    key = ("kl", mu.dtype, logvar.dtype, mu.dim(),
           *(None if t is None else (t.dtype, t.dim(), r.shape[0] == 1)
             for t, r in ((prior_mu, pm), (prior_logvar, plv))),
           lo is not None, dtypes, batch == 1, cols == 1, batch == cols, long_rows,
           long_rows and cols % ROW_BLOCK == 0, *_global_state(mu, logvar, prior_mu, prior_logvar))
    bounds = None if lo is None else torch.tensor([lo, hi], dtype=torch.float32)
    grad_scale = None if dtypes is None else torch.tensor(scale, dtype=torch.float32)
    out = _run(key, _kl, mu.detach().reshape(batch, cols), logvar.detach().reshape(batch, cols),
               pm, plv, bounds, grad_scale, dtypes)
    if out is None:
        return None
    if dtypes is None:
        return out, None, None, None, None
    rows, *grads = out
    return (rows, *(None if g is None else g.view(mu.shape) for g in grads))
