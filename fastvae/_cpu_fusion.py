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


def _kernel(key, recon):
    """A torch.compile'd copy of recon's math for one key. Each key gets a code object
    of its own: Dynamo keeps its compiled graphs per code object and stops compiling
    one past its recompile limit (8). So the key holds what Dynamo would specialize on
    (the dtypes, the input's rank: its guards see the reshaped view's base, a batch of
    1, rows a whole number of blocks or not): one graph per code object."""
    math_fn = _MATH[recon]
    name = f"{math_fn.__name__}_{'_'.join(str(k).removeprefix('torch.') for k in key[1:])}"
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


def fused_recon(x_hat, x, recon, grad_scale):
    """recon_per_sample's (per-row sums float32 (N,), gradient or None) from one fused
    loop, or None where the chunked torch ops are to run: not yet the kernel's
    COMPILE_AT_CALL-th call, or compiling failed. ``applies`` held."""
    global _failed
    grad_dtype = None if grad_scale is None else grad_buffer_dtype(x_hat.dtype)
    batch = x_hat.shape[0]
    row = x_hat.numel() // batch
    key = (recon, x_hat.dtype, x.dtype, grad_dtype, x_hat.dim(), batch == 1,
           row % ROW_BLOCK == 0)
    compiled = _compiled.get(key, _NOT_READ)
    if compiled is None:  # this kernel failed before
        return None
    if compiled is _NOT_READ:
        with _lock:
            calls = _calls[key] = _calls.get(key, 0) + 1
            if calls < COMPILE_AT_CALL:
                return None
    rows_h = x_hat.detach().reshape(batch, row)
    rows_x = x.detach().reshape(batch, row)
    scale = None if grad_scale is None else torch.tensor(grad_scale, dtype=torch.float32)
    try:
        if compiled is _NOT_READ:
            with _lock:  # (torch.compile itself raises where Dynamo cannot run)
                compiled = _compiled.get(key, _NOT_READ)
                if compiled is _NOT_READ:
                    compiled = _compiled[key] = _kernel(key, recon)
        if compiled is None or _dynamo_disabled():
            # with Dynamo off the "compiled" function would run as torch ops on whole
            # float32 copies: the chunked path is better then
            return None
        with torch.no_grad():
            out = compiled(rows_h, rows_x, scale, grad_dtype)
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
                      RuntimeWarning, stacklevel=2)
        return None
    _worked.add(key)
    if grad_scale is None:
        return out, None
    rows, grad = out
    return rows, grad.view(x_hat.shape)
