"""Argument checks shared by every public entry point.

Shape, dtype, device and option checks look only at tensor metadata, so they
cost nothing on the device and trace away under ``torch.compile``. Checks that
must read tensor values (BCE ranges, a finite ``beta`` tensor) run inside the
custom ops, on CPU tensors only: on CUDA they would need a host sync.

Their outcome depends only on the tensors' types, shapes, dtypes, devices and
layouts and on the options, so the public functions call the ``*_plan``
functions: a dictionary lookup keyed by exactly those, which runs the checks on
the first call with a new key and remembers what they derived. A failed check
is never remembered. ``beta`` (often annealed, a new float each step) is
checked on every call.
"""

import numbers

import torch

RECONS = ("mse", "l1", "bce", "bce_logits", "gaussian", "laplace", "continuous_bernoulli")
# the recons with an observation scale, set by ``obs_logvar``
OBS_SCALE_RECONS = ("gaussian", "laplace")
# the recons whose targets must lie in [0, 1]
UNIT_TARGET_RECONS = ("bce", "bce_logits", "continuous_bernoulli")
REDUCTIONS = ("sum", "batchmean", "mean", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got a nested tensor")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {t.dtype}"
        )
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension (dim 0), got a 0-dim tensor")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch: shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} has no elements per sample: shape {tuple(t.shape)}")


def check_same_shape(name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got "
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)}"
        )


def check_same_batch(name_a, a, name_b, b):
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same batch size (dim 0), got "
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)}"
        )


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {seen}")


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _finite_float(name, value):
    """``float(value)``; ValueError naming ``name`` if it is not a finite number
    (an int too large for a float raises OverflowError in ``float``)."""
    try:
        value_f = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got {value!r:.40}, too large for a float") from None
    # v - v is 0 exactly for a finite v (NaN for inf and NaN): arithmetic, not
    # math.isfinite, which torch.compile(dynamic=True) cannot trace on a symbolic float
    if not value_f - value_f == 0.0:
        raise ValueError(f"{name} must be finite, got {value_f}")
    return value_f


def check_beta(beta):
    """Return ``(beta_tensor_or_None, beta_float)``."""
    if type(beta) is float and beta - beta == 0.0:  # the usual case: a finite float
        return None, beta
    if isinstance(beta, torch.Tensor):
        if beta.dim() != 0 or not beta.is_floating_point():
            raise TypeError(
                f"beta must be a float or a 0-dim floating-point tensor, got a "
                f"{beta.dtype} tensor of shape {tuple(beta.shape)}"
            )
        if beta.layout != torch.strided:
            raise TypeError(f"beta must be a dense (strided) tensor, got layout {beta.layout}")
        return beta, 0.0
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a float or a 0-dim tensor, got {type(beta).__name__}")
    return None, _finite_float("beta", beta)


def check_obs_logvar(obs_logvar, recon, x):
    """``(tensor_or_None, value, optimal)`` for ``vae_loss``'s ``obs_logvar``: the
    log-variance (gaussian) or log-scale (laplace) of the observation model, as a
    tensor broadcastable to ``x``, a finite number (None: 0.0), or "optimal"."""
    if recon not in OBS_SCALE_RECONS:
        if obs_logvar is not None:
            raise ValueError(f"obs_logvar is only used by recon='gaussian' or 'laplace', got "
                             f"obs_logvar={obs_logvar!r:.60} with recon={recon!r}")
        return None, 0.0, False
    if obs_logvar is None:
        return None, 0.0, False
    if isinstance(obs_logvar, str):
        if obs_logvar != "optimal":
            raise ValueError(f"obs_logvar must be a number, a tensor or the string 'optimal', "
                             f"got {obs_logvar!r:.60}")
        return None, 0.0, True
    if isinstance(obs_logvar, torch.Tensor):
        _check_broadcast_operand("obs_logvar", obs_logvar, x, "x", "the data")
        return obs_logvar, 0.0, False
    if isinstance(obs_logvar, bool) or not isinstance(obs_logvar, numbers.Real):
        raise TypeError(f"obs_logvar must be a float, a tensor or 'optimal', got "
                        f"{type(obs_logvar).__name__}")
    return None, _finite_float("obs_logvar", obs_logvar), False


def check_prior(name, prior, mu):
    """A prior's mean or log-variance (``name``): None, or a floating-point dense tensor
    on mu's device whose shape broadcasts to mu's (a learned (d,) prior, a per-sample
    conditional one of mu's shape, ...). Its dtype may differ: it is computed in the
    KL's dtype and its gradient returned in its own."""
    if prior is None:
        return None
    if not isinstance(prior, torch.Tensor):
        raise TypeError(f"{name} must be a tensor broadcastable to mu or None, got "
                        f"{type(prior).__name__}")
    _check_broadcast_operand(name, prior, mu, "mu", "mu")
    return prior


def _check_broadcast_operand(name, t, like, like_name, like_phrase):
    """``t`` (the tensor argument ``name``): floating point, dense, on ``like``'s device
    and broadcastable to its shape (``like`` None: only the first two; its shape is not
    known yet, as in VAELoss's constructor)."""
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if like is None:
        return
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_phrase} is on {like.device}; put it "
                         f"on {like_phrase}'s device")
    if not _broadcasts_to(t.shape, like.shape):
        raise ValueError(f"{name} must broadcast to {like_name}'s shape {tuple(like.shape)}, got "
                         f"shape {tuple(t.shape)}")


def _broadcasts_to(shape, target):
    """Whether ``shape`` broadcasts to ``target`` itself (torch.broadcast_shapes(shape,
    target) == target): no more dims, and each trailing-aligned size 1 or equal. A loop:
    torch.broadcast_shapes took ~50 us a call, a large part of a small KL's cost."""
    if len(shape) > len(target):
        return False
    for size, want in zip(reversed(shape), reversed(target)):
        if size != 1 and size != want:
            return False
    return True


def check_free_bits(free_bits, reduction):
    """``free_bits`` as a finite float >= 0; a positive one needs a reduction over the
    batch (free bits couple the samples: no per-sample value exists)."""
    if isinstance(free_bits, bool) or not isinstance(free_bits, numbers.Real):
        raise TypeError(f"free_bits must be a float >= 0, got {type(free_bits).__name__}")
    value = _finite_float("free_bits", free_bits)
    if value < 0.0:
        raise ValueError(f"free_bits must be >= 0, got {value}")
    if value > 0.0 and reduction == "none":
        raise ValueError(f"free_bits={value} needs reduction 'sum', 'batchmean' or 'mean', got "
                         f"reduction='none': free bits floor each latent element's KL averaged "
                         f"over the batch, so they have no per-sample value")
    return value


FLOAT32_MAX = 3.4028234663852886e38


def _float64_loss(tensors):
    """Whether these inputs make a float64 loss (any of them is float64)."""
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def check_fits_loss_dtype(name, value, *tensors):
    """A float weight (beta, free_bits) of a float32 loss must be a float32 number: a
    larger one failed inside torch ("cannot be converted to type float without
    overflow"). Float64 inputs make a float64 loss, which holds it."""
    if (value > FLOAT32_MAX or value < -FLOAT32_MAX) and not _float64_loss(tensors):
        # ({value}, not {value:g}: under torch.compile(dynamic=True) value is a symbolic float)
        raise ValueError(f"{name}={value} is beyond float32's range (+-{FLOAT32_MAX:.4g}), the "
                         f"dtype of this loss (float64 inputs make a float64 loss)")


def check_free_bits_floor(free_bits, mu, *tensors):
    """free_bits times the batch size, the floor of each latent element's KL summed over
    the batch (where the KL's column sums meet it), must fit the loss's dtype too: a
    larger one failed inside torch. (Only a huge free_bits can overflow: below 2^-40 of
    float32's maximum no batch reaches it, and the shape is not read.)"""
    if free_bits > FLOAT32_MAX / 2**40 and free_bits * mu.shape[0] > FLOAT32_MAX \
            and not _float64_loss(tensors):
        raise ValueError(f"free_bits={free_bits} times the batch size {mu.shape[0]} (the floor "
                         f"of each latent element's KL summed over the batch) is beyond "
                         f"float32's range (+-{FLOAT32_MAX:.4g}), the dtype of this loss "
                         f"(float64 inputs make a float64 loss)")


def check_num_samples(num_samples):
    """0 for None (one sample, mu's shape), else the int K >= 1."""
    if num_samples is None:
        return 0
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"num_samples must be an int >= 1 or None, got "
                        f"{type(num_samples).__name__} {num_samples!r:.40}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 (or None), got {num_samples}")
    return int(num_samples)


def check_beta_device(beta_t, data):
    """A beta tensor lives on the data's device or on the CPU."""
    if beta_t is not None and beta_t.device != data.device and beta_t.device.type != "cpu":
        raise ValueError(f"beta is on {beta_t.device} but the data is on {data.device}; "
                         f"put it on the data's device (or the CPU)")


def check_logvar_clamp(logvar_clamp):
    """Return ``(lo, hi)``, each a finite float, or ``(None, None)``."""
    if logvar_clamp is None:
        return None, None

    def shape_error():  # made only when raised: torch.compile cannot repr a symbolic bound
        return TypeError(f"logvar_clamp must be None or a pair of numbers (lo, hi), got "
                         f"{logvar_clamp!r:.80}")
    # a string unpacks into characters: "12" would read as (1.0, 2.0)
    if isinstance(logvar_clamp, (str, bytes, bytearray)):
        raise shape_error()
    try:
        lo, hi = logvar_clamp
    except (TypeError, ValueError):
        raise shape_error() from None
    for bound in (lo, hi):
        is_number = isinstance(bound, numbers.Real) and not isinstance(bound, bool)
        is_scalar_tensor = (isinstance(bound, torch.Tensor) and bound.dim() == 0
                            and bound.is_floating_point() and not bound.is_meta)
        if not (is_number or is_scalar_tensor):
            raise shape_error()
        if is_scalar_tensor and torch.compiler.is_compiling():
            # its value is read on the host (the ops take the bounds as numbers), which a
            # compiled graph cannot do: it would fail on the bounds' comparison below
            raise TypeError("logvar_clamp: under torch.compile the bounds must be Python "
                            "numbers, got a tensor; pass float(lo), float(hi)")
    lo, hi = _bound(lo), _bound(hi)
    # (NaN != NaN; an infinite bound less itself is NaN: arithmetic, as in _finite_float)
    if lo != lo or hi != hi or lo > hi:
        raise ValueError(f"logvar_clamp must satisfy lo <= hi, got ({lo}, {hi})")
    if not (lo - lo == 0.0 and hi - hi == 0.0):
        # clamping to +-inf makes exp(logvar) inf or 0 and the KL inf - inf = nan
        raise ValueError(f"logvar_clamp bounds must be finite, got ({lo}, {hi}); "
                         f"use None for no clamp")
    return lo, hi


def _bound(value):
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"logvar_clamp bounds must be finite, got {value!r:.40}, "
                         f"too large for a float") from None


def _derive_loss_plan(x_hat, x, mu, logvar, recon, reduction, logvar_clamp):
    """Every metadata and option check of ``vae_loss``; returns (clamp_lo, clamp_hi)."""
    for name, t in (("x_hat", x_hat), ("x", x), ("mu", mu), ("logvar", logvar)):
        check_tensor(name, t)
    check_same_shape("x_hat", x_hat, "x", x)
    check_same_shape("mu", mu, "logvar", logvar)
    check_same_batch("x_hat", x_hat, "mu", mu)
    check_same_device(x_hat=x_hat, x=x, mu=mu, logvar=logvar)
    check_choice("recon", recon, RECONS)
    check_choice("reduction", reduction, REDUCTIONS)
    return check_logvar_clamp(logvar_clamp)


def check_latent_args(mu, logvar, logvar_clamp):
    check_tensor("mu", mu)
    check_tensor("logvar", logvar)
    check_same_shape("mu", mu, "logvar", logvar)
    check_same_device(mu=mu, logvar=logvar)
    return check_logvar_clamp(logvar_clamp)


def _derive_latent_plan(mu, logvar, logvar_clamp, reduction):
    """Every metadata and option check of the latent functions (and, unless
    SAMPLING, of kl_divergence's ``reduction``); returns (clamp_lo, clamp_hi)."""
    clamp = check_latent_args(mu, logvar, logvar_clamp)
    if reduction is not SAMPLING:
        check_choice("reduction", reduction, REDUCTIONS)
    return clamp


# ---- the plans: checks run once per (tensor metadata, options) -----------------

_PLANS = {}
MAX_PLANS = 1024  # then the cache starts again: new shapes every call must not grow it forever
_UNCACHED = object()  # an option that is not a plain value: no cache key


def _clamp_key(logvar_clamp):
    """``logvar_clamp`` as part of a cache key: None or a tuple of two Python
    numbers; anything else (lists, tensors, strings) is checked on every call."""
    if logvar_clamp is None:
        return None
    if type(logvar_clamp) is tuple and len(logvar_clamp) == 2 \
            and type(logvar_clamp[0]) in (float, int) and type(logvar_clamp[1]) in (float, int):
        return logvar_clamp
    return _UNCACHED


def _remember(key, plan):
    if len(_PLANS) >= MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def loss_plan(x_hat, x, mu, logvar, recon, reduction, logvar_clamp):
    """``(clamp_lo, clamp_hi)`` after every metadata and option check of
    ``vae_loss`` (beta aside); the checks run once per key."""
    if torch.compiler.is_compiling():  # traced once per graph anyway; a cache would be guarded on
        return _derive_loss_plan(x_hat, x, mu, logvar, recon, reduction, logvar_clamp)
    try:
        clamp = _clamp_key(logvar_clamp)
        key = ("loss", recon, reduction, clamp,
               type(x_hat), x_hat.shape, x_hat.dtype, x_hat.device, x_hat.layout,
               type(x), x.shape, x.dtype, x.device, x.layout,
               type(mu), mu.shape, mu.dtype, mu.device, mu.layout,
               type(logvar), logvar.shape, logvar.dtype, logvar.device, logvar.layout)
        plan = _PLANS.get(key)
    except Exception:  # not tensors, unhashable options, nested tensors: the checks say why
        clamp, plan = _UNCACHED, None
    if plan is not None:
        return plan
    plan = _derive_loss_plan(x_hat, x, mu, logvar, recon, reduction, logvar_clamp)
    return plan if clamp is _UNCACHED else _remember(key, plan)


SAMPLING = object()  # latent_plan's reduction for the sampling functions, which take none


def latent_plan(mu, logvar, logvar_clamp, reduction=SAMPLING):
    """``(clamp_lo, clamp_hi)`` after every check of ``kl_divergence`` (with its
    ``reduction``) or of the sampling functions (without); once per key."""
    if torch.compiler.is_compiling():
        return _derive_latent_plan(mu, logvar, logvar_clamp, reduction)
    try:
        clamp = _clamp_key(logvar_clamp)
        key = ("latent", reduction, clamp,
               type(mu), mu.shape, mu.dtype, mu.device, mu.layout,
               type(logvar), logvar.shape, logvar.dtype, logvar.device, logvar.layout)
        plan = _PLANS.get(key)
    except Exception:
        clamp, plan = _UNCACHED, None
    if plan is not None:
        return plan
    plan = _derive_latent_plan(mu, logvar, logvar_clamp, reduction)
    return plan if clamp is _UNCACHED else _remember(key, plan)


# ---- value checks: called by the op implementations, CPU tensors only ----

def _check_unit_interval(name, t, what):
    lo, hi = (v.item() for v in torch.aminmax(t))  # (two reads: cheaper than two compare ops)
    if not (lo >= 0 and hi <= 1):  # also false for NaN
        raise ValueError(
            f"{name} must hold {what} in [0, 1] for this recon, got values in "
            f"[{lo:.6g}, {hi:.6g}]"
        )


def check_probabilities(x_hat):
    """ValueError unless x_hat holds probabilities in [0, 1] (NaN is not one)."""
    _check_unit_interval("x_hat", x_hat, "probabilities")


def _torch_path_checks_probabilities(x_hat, x):
    """True where the PyTorch path computes this bce: it checks x_hat itself, for
    free, in the pass that computes the loss (a probability outside [0, 1], or
    NaN, makes a log NaN, so the loss is NaN exactly when x_hat is out of range;
    it then calls check_probabilities for the error). Saves a pass over x_hat."""
    from fastvae import _dispatch  # not at import time: _dispatch imports the backends

    return _dispatch.backend_for(x_hat, x) == "torch"


def check_loss_values(x_hat, x, recon, beta, loss_pass_checks_x_hat=True, check_x=True):
    """Value checks that PyTorch's own losses also make; skipped for CUDA tensors.
    ``loss_pass_checks_x_hat=False``: the caller's bce is not the PyTorch path's pass,
    which checks x_hat itself (the composite formula for torch.func is not).
    ``check_x=False``: the caller's PyTorch path checks the targets itself (``check_targets``
    before its torch ops, or ``check_target_range`` on the range its fused loop read)."""
    if beta is not None and beta.device.type == "cpu" and not torch.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta.item()}")
    if x.device.type != "cpu":
        return
    if check_x:
        check_targets(x, recon)
    if recon == "bce" and not (loss_pass_checks_x_hat and _torch_path_checks_probabilities(x_hat, x)):
        check_probabilities(x_hat)


def check_targets(x, recon):
    """ValueError unless a CPU ``x`` holds targets in [0, 1] where ``recon`` needs them
    (NaN is not one): one pass over x (``aminmax``)."""
    if recon in UNIT_TARGET_RECONS and x.device.type == "cpu":
        _check_unit_interval("x", x, "targets")


def check_target_range(x, excess):
    """``check_targets`` from how far x reaches below 0 and above 1, (max(-x), max(x - 1))
    (a (2,) tensor; NaN where x holds one), read by a fused loop while it computed the
    loss: no pass of its own. Out of range (an excess above 0, or NaN), ``check_targets``
    makes the error, a second pass on the error's path only, so that it names x's own
    range."""
    below, above = excess.tolist()
    if not (below <= 0 and above <= 0):  # also true for NaN
        _check_unit_interval("x", x, "targets")


def check_generator(generator, data_device=None):
    """A torch.Generator or None; one on the CPU or (given ``data_device``) on the
    data's device type, the only generators a seed can be drawn from."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device
    if data_device is not None and device.type not in ("cpu", data_device.type):
        raise ValueError(f"generator is on {device} but the data is on {data_device}; "
                         f"pass a CPU generator or one on the data's device")
