"""Argument checks shared by every public entry point.

Shape, dtype, device and option checks look only at tensor metadata, so they
cost nothing on the device and trace away under ``torch.compile``. Checks that
must read tensor values (BCE ranges, a finite ``beta`` tensor) run inside the
custom ops, on CPU tensors only: on CUDA they would need a host sync.
"""

import math
import numbers

import torch

RECONS = ("mse", "l1", "bce", "bce_logits")
REDUCTIONS = ("sum", "batchmean", "mean", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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


def check_beta(beta):
    """Return ``(beta_tensor_or_None, beta_float)``."""
    if isinstance(beta, torch.Tensor):
        if beta.dim() != 0 or not beta.is_floating_point():
            raise TypeError(
                f"beta must be a float or a 0-dim floating-point tensor, got a "
                f"{beta.dtype} tensor of shape {tuple(beta.shape)}"
            )
        return beta, 0.0
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a float or a 0-dim tensor, got {type(beta).__name__}")
    beta = float(beta)
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")
    return None, beta


def check_logvar_clamp(logvar_clamp):
    """Return ``(lo, hi)``, each a float or None."""
    if logvar_clamp is None:
        return None, None
    try:
        lo, hi = logvar_clamp
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise TypeError(
            f"logvar_clamp must be None or a pair of floats (lo, hi), got {logvar_clamp!r}"
        ) from None
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"logvar_clamp must satisfy lo <= hi, got ({lo}, {hi})")
    return lo, hi


def check_loss_args(x_hat, x, mu, logvar, recon, reduction, beta, logvar_clamp):
    for name, t in (("x_hat", x_hat), ("x", x), ("mu", mu), ("logvar", logvar)):
        check_tensor(name, t)
    check_same_shape("x_hat", x_hat, "x", x)
    check_same_shape("mu", mu, "logvar", logvar)
    check_same_batch("x_hat", x_hat, "mu", mu)
    check_same_device(x_hat=x_hat, x=x, mu=mu, logvar=logvar)
    check_choice("recon", recon, RECONS)
    check_choice("reduction", reduction, REDUCTIONS)
    beta_t, beta_v = check_beta(beta)
    if beta_t is not None and beta_t.device != x_hat.device and beta_t.device.type != "cpu":
        raise ValueError(f"beta is on {beta_t.device} but the data is on {x_hat.device}; "
                         f"put it on the data's device (or the CPU)")
    return (beta_t, beta_v), check_logvar_clamp(logvar_clamp)


def check_latent_args(mu, logvar, logvar_clamp):
    check_tensor("mu", mu)
    check_tensor("logvar", logvar)
    check_same_shape("mu", mu, "logvar", logvar)
    check_same_device(mu=mu, logvar=logvar)
    return check_logvar_clamp(logvar_clamp)


# ---- value checks: called by the op implementations, CPU tensors only ----

def _check_unit_interval(name, t, what):
    lo, hi = torch.aminmax(t)
    if not (lo >= 0 and hi <= 1):  # also false for NaN
        raise ValueError(
            f"{name} must hold {what} in [0, 1] for this recon, got values in "
            f"[{lo.item():.6g}, {hi.item():.6g}]"
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


def check_loss_values(x_hat, x, recon, beta):
    """Value checks that PyTorch's own losses also make; skipped for CUDA tensors."""
    if beta is not None and beta.device.type == "cpu" and not torch.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta.item()}")
    if x.device.type != "cpu":
        return
    if recon in ("bce", "bce_logits"):
        _check_unit_interval("x", x, "targets")
    if recon == "bce" and not _torch_path_checks_probabilities(x_hat, x):
        check_probabilities(x_hat)


def check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
