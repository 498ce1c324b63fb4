"""The public functions: ``vae_loss``, ``kl_divergence``, ``reparameterize``,
``sample_and_kl``.

Each checks its arguments (``fastvae._validate``'s plans: the metadata checks
run once per shapes/dtypes/devices/options), then calls the op of ``fastvae.ops``.
During ONNX export the ops are replaced by the plain torch formulas below, so a
module that uses fastvae exports with ``torch.onnx.export(..., dynamo=True)``
and no extra arguments.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvae import _numerics, _validate, ops


class LossParts(NamedTuple):
    """What ``vae_loss(..., return_parts=True)`` returns, each reduced the same way."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


_ONNX_FLAGS = []  # [(GLOBALS, _flags)] or [None], resolved on the first call


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()`` without its two imports on every call (~1 us of
    a ~25 us small loss): the two flags it reads, found once. Used only where that
    function reads exactly those names (checked on its code); otherwise it is called."""
    if torch.compiler.is_compiling():
        # traced (a dynamo export too): torch's function, which Dynamo knows; the
        # cache below is filled by an eager call only (Dynamo cannot trace its setup)
        return torch.onnx.is_in_onnx_export()
    if not _ONNX_FLAGS:
        flags = None
        reads = set(torch.onnx.is_in_onnx_export.__code__.co_names)
        if reads == {"torch.onnx._internal.exporter", "_flags", "GLOBALS", "in_onnx_export",
                     "torch.onnx._internal.torchscript_exporter._globals",
                     "_is_onnx_exporting"}:
            try:
                from torch.onnx._internal.exporter import _flags
                from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
                flags = (GLOBALS, _flags)
            except ImportError:
                pass
        _ONNX_FLAGS.append(flags)
    flags = _ONNX_FLAGS[0]
    if flags is None:
        return torch.onnx.is_in_onnx_export()
    return flags[0].in_onnx_export or flags[1]._is_onnx_exporting


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def vae_loss(x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, *, recon: str = "mse",
             beta: float | Tensor = 1.0, reduction: str = "sum",
             logvar_clamp: tuple[float, float] | None = None,
             return_parts: bool = False,
             obs_logvar: float | Tensor | str | None = None,
             free_bits: float = 0.0, prior_mu: Tensor | None = None,
             prior_logvar: Tensor | None = None) -> Tensor | LossParts:
    """Reconstruction loss + beta * KL(N(mu, exp(logvar)) || prior), the prior
    N(0, I) or N(prior_mu, exp(prior_logvar)).

    Args:
        x_hat: decoder output; probabilities for ``recon="bce"``, logits for
            ``"bce_logits"`` and ``"continuous_bernoulli"``, the mean (gaussian) or
            location (laplace) otherwise. Dim 0 is the batch.
        x: the data, same shape as ``x_hat`` (any float dtype); in [0, 1] for
            bce, bce_logits and continuous_bernoulli.
        mu, logvar: the encoder's Gaussian, one shape, same batch size.
        recon: ``"mse"``, ``"l1"``, ``"bce"``, ``"bce_logits"``, ``"gaussian"``
            (1/2 [(x_hat - x)^2 e^-s + s + log 2 pi] per element),
            ``"laplace"`` (|x_hat - x| e^-s + s + log 2) or
            ``"continuous_bernoulli"`` (-log CB(x | logits x_hat)).
        beta: weight of the KL term, a float or a 0-dim tensor.
        reduction: ``"sum"`` (sum over everything), ``"batchmean"`` (that / N),
            ``"mean"`` (recon mean over N*D elements + beta * KL mean over N*d
            elements) or ``"none"`` (per-sample sums, shape (N,)).
        logvar_clamp: None or (lo, hi): logvar is clamped before use.
        return_parts: return ``LossParts(loss, recon, kl)`` instead of the loss.
        obs_logvar: gaussian and laplace only: s = log sigma^2 (gaussian) or log b
            (laplace). A float (None: 0.0, unit variance / scale), a tensor
            broadcastable to ``x`` (a learned scalar, per channel, or per element
            from the decoder; its gradient is summed over the broadcast dims), or
            ``"optimal"``: sigma^2 (b) is the batch's mean squared (absolute)
            error, a constant to the gradient (sigma-VAE; the Laplace MLE).
        free_bits: a float >= 0 (default 0: none). With K_k the batch-mean KL of
            latent element k, the KL term is sum_k max(K_k, free_bits) ("batchmean";
            N times that for "sum", divided by the latent elements per sample for
            "mean"); zero gradient for the elements held at the floor. Not with
            reduction="none" (ValueError).
        prior_mu, prior_logvar: the KL's diagonal Gaussian prior, tensors
            broadcastable to ``mu`` (a learned (d,) prior, a per-sample conditional
            one); None: 0. KL per element: 1/2 [plv - lv + (e^lv + (mu - pm)^2) e^-plv - 1].
            Gradients flow to them (summed over their broadcast dims).

    The loss is float32 for half-precision inputs, float64 for float64 inputs
    (obs_logvar is computed in that dtype too).
    """
    lo, hi = _validate.loss_plan(x_hat, x, mu, logvar, recon, reduction, logvar_clamp)
    obs_t, obs_v, obs_optimal = _validate.check_obs_logvar(obs_logvar, recon, x)
    beta_t, beta_v = _validate.check_beta(beta)
    if beta_t is not None:
        _validate.check_beta_device(beta_t, x_hat)
    free_bits = _validate.check_free_bits(free_bits, reduction)
    _validate.check_fits_loss_dtype("beta", beta_v, x_hat, x, mu, logvar)
    _validate.check_fits_loss_dtype("free_bits", free_bits, x_hat, x, mu, logvar)
    _validate.check_free_bits_floor(free_bits, mu, x_hat, x, mu, logvar)
    prior_mu = _validate.check_prior("prior_mu", prior_mu, mu)
    prior_logvar = _validate.check_prior("prior_logvar", prior_logvar, mu)
    if _in_onnx_export():
        parts = _vae_loss_formula(x_hat, x, mu, logvar, recon, beta, reduction, lo, hi,
                                  obs_logvar, prior_mu, prior_logvar, free_bits)
        return parts if return_parts else parts.loss
    # (requires_grad read inline, not through _needs_grad: a measurable us per call)
    grad_enabled = torch.is_grad_enabled()
    grad_recon = grad_enabled and (x_hat.requires_grad or x.requires_grad
                                   or (obs_t is not None and obs_t.requires_grad))
    if grad_recon and x.requires_grad and x.dtype != x_hat.dtype \
            and recon not in ops._TARGET_GRAD_FROM_X_HAT:  # (d/dx = -d/dx_hat: from its buffer)
        x_hat = _widened_for_the_target(x_hat, x)
    outputs = ops.vae_loss_values(
        x_hat, x, mu, logvar, beta_t, obs_t, prior_mu, prior_logvar, beta_v, recon, obs_v,
        obs_optimal, reduction, lo, hi, free_bits, grad_recon,
        grad_enabled and (mu.requires_grad or logvar.requires_grad),
        _prior_needs_grad(prior_mu, prior_logvar), parts=return_parts)
    return LossParts(*outputs) if return_parts else outputs[0]


def _widened_for_the_target(x_hat, x):
    """``x_hat`` in a dtype whose gradient buffer is as precise as ``x``, where a target
    requiring grad is more precise than x_hat's buffer (a float32 x with a bfloat16 x_hat):
    its gradient, minus x_hat's, would otherwise be rounded to x_hat's precision. The
    values do not change (both are computed in float32 or better); x_hat's gradient is
    rounded once, by the conversion's backward. (Rare: targets seldom require grad.)"""
    buffer = _numerics.grad_buffer_dtype(x_hat.dtype)
    if torch.finfo(buffer).eps <= torch.finfo(x.dtype).eps:
        return x_hat
    return x_hat.to(torch.promote_types(buffer, x.dtype))


def _prior_needs_grad(prior_mu, prior_logvar):
    return torch.is_grad_enabled() and (
        (prior_mu is not None and prior_mu.requires_grad)
        or (prior_logvar is not None and prior_logvar.requires_grad))


def kl_divergence(mu: Tensor, logvar: Tensor, *, reduction: str = "sum",
                  logvar_clamp: tuple[float, float] | None = None, free_bits: float = 0.0,
                  prior_mu: Tensor | None = None,
                  prior_logvar: Tensor | None = None) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) = -1/2 sum(1 + logvar - mu^2 - exp(logvar)),
    or against N(prior_mu, exp(prior_logvar)) (tensors broadcastable to mu; None: 0),
    1/2 sum[plv - lv + (e^lv + (mu - pm)^2) e^-plv - 1], reduced like ``vae_loss``
    ("mean" divides by the number of latent elements), with its ``free_bits``."""
    lo, hi = _validate.latent_plan(mu, logvar, logvar_clamp, reduction)
    free_bits = _validate.check_free_bits(free_bits, reduction)
    _validate.check_fits_loss_dtype("free_bits", free_bits, mu, logvar)
    _validate.check_free_bits_floor(free_bits, mu, mu, logvar)
    prior_mu = _validate.check_prior("prior_mu", prior_mu, mu)
    prior_logvar = _validate.check_prior("prior_logvar", prior_logvar, mu)
    if _in_onnx_export():
        return _kl_formula(mu, logvar, lo, hi, prior_mu, prior_logvar, free_bits, reduction)
    return ops.kl_divergence_value(mu, logvar, prior_mu, prior_logvar, reduction, lo, hi,
                                   free_bits, _needs_grad(mu, logvar),
                                   _prior_needs_grad(prior_mu, prior_logvar))


def reparameterize(mu: Tensor, logvar: Tensor, *, generator: torch.Generator | None = None,
                   num_samples: int | None = None) -> Tensor:
    """z = mu + exp(logvar / 2) * eps with eps ~ N(0, I), differentiable in mu
    and logvar. The noise comes from a seed drawn from ``generator`` (or PyTorch's
    default generator); the GPU kernels regenerate it in the backward, the CPU path
    keeps it until the backward (see the README). ``num_samples=K``: K independent
    samples, shape (K, *mu.shape) (None: one, mu's shape)."""
    _validate.latent_plan(mu, logvar, None)
    num_samples = _validate.check_num_samples(num_samples)
    if generator is not None:
        _validate.check_generator(generator, mu.device)
    if _in_onnx_export():
        return mu + torch.exp(0.5 * logvar) * _export_noise(mu, num_samples)
    return ops.reparameterize_value(mu, logvar, _draw_seed(generator, mu), num_samples)


def sample_and_kl(mu: Tensor, logvar: Tensor, *, generator: torch.Generator | None = None,
                  logvar_clamp: tuple[float, float] | None = None,
                  prior_mu: Tensor | None = None, prior_logvar: Tensor | None = None,
                  num_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """``(z, kl)``: a reparameterized sample (``num_samples=K``: K of them, shape
    (K, *mu.shape)) and the per-sample KL (shape (N,)) against N(0, I) or the
    diagonal Gaussian N(prior_mu, exp(prior_logvar)), in one pass."""
    lo, hi = _validate.latent_plan(mu, logvar, logvar_clamp)
    num_samples = _validate.check_num_samples(num_samples)
    prior_mu = _validate.check_prior("prior_mu", prior_mu, mu)
    prior_logvar = _validate.check_prior("prior_logvar", prior_logvar, mu)
    if generator is not None:
        _validate.check_generator(generator, mu.device)
    if _in_onnx_export():
        lv = logvar if lo is None else logvar.clamp(lo, hi)
        z = mu + torch.exp(0.5 * lv) * _export_noise(mu, num_samples)
        return z, _kl_rows(mu, logvar, lo, hi, prior_mu, prior_logvar)
    return ops.reparameterize(mu, logvar, prior_mu, prior_logvar, _draw_seed(generator, mu),
                              lo, hi, True, num_samples)


def _export_noise(mu, num_samples):
    if not num_samples:
        return torch.randn_like(mu)
    return torch.randn_like(mu.unsqueeze(0).expand(num_samples, *mu.shape))


def _draw_seed(generator, like):
    """The seed of one draw of noise for tensors like ``like``: a 1-element int64
    tensor, drawn without a host sync.

    CUDA tensors (with ``generator`` None or a CUDA generator): drawn on the device
    by ``torch.randint`` from ``generator`` or the default CUDA generator. That
    call is graph-safe (PyTorch registers its Philox offset with a CUDA graph
    being captured, so every replay draws a fresh seed, as ``torch.randn_like``
    does), ``torch.manual_seed`` / a seeded generator reproduce it, and the kernels
    read it from memory. Everything else keeps a host seed: a CPU tensor drawn
    from ``generator`` (a CPU one) or the default CPU generator, the same value
    as before seeds became tensors; a generator of another accelerator (MPS, say,
    with tensors on it: check_generator refuses mismatched device types) has its
    Philox state (seed, offset) read and advanced on the host."""
    # the common CPU call first (the same call as the last line: traced, a generator=None
    # keeps aten.randint in the graph, so compiled and eager draw the same seed)
    if generator is None and like.device.type != "cuda":
        # (device="cpu": a host seed whatever torch's default device is, e.g. inside a
        # `with torch.device("meta")` block, where a seed on it would hold no value)
        return torch.randint(0, 2**62, (1,), generator=None, device="cpu")
    _validate.check_generator(generator)
    gen_device = None if generator is None else generator.device
    if like.device.type == "cuda" and gen_device is not None and gen_device.type == "cpu" \
            and torch.cuda.is_current_stream_capturing():
        # a host draw happens once, at capture: every replay would reuse its noise
        raise ValueError("generator: a CPU generator cannot seed sampling of CUDA tensors inside "
                         "a CUDA graph capture (every replay would draw the same noise); pass a "
                         "CUDA generator or None")
    if like.device.type == "cuda" and (gen_device is None or gen_device.type == "cuda"):
        # a generator's own device (it may be another GPU than the data's; the
        # kernels' launcher copies the seed over, device to device)
        return torch.randint(0, 2**62, (1,), generator=generator,
                             device=like.device if gen_device is None else gen_device)
    if gen_device is not None and gen_device.type != "cpu":
        seed, offset = generator.initial_seed(), generator.get_offset()
        generator.set_offset(offset + 4)
        return torch.tensor([hash((seed, offset)) & (2**62 - 1)], device="cpu")
    return torch.randint(0, 2**62, (1,), generator=generator, device="cpu")


# ---- the plain formulas, used while exporting to ONNX -------------------

_RECON_FORMULAS = {
    "mse": lambda x_hat, x: F.mse_loss(x_hat, x, reduction="none"),
    "l1": lambda x_hat, x: F.l1_loss(x_hat, x, reduction="none"),
    "bce": lambda x_hat, x: F.binary_cross_entropy(x_hat, x, reduction="none"),
    # written out rather than F.binary_cross_entropy_with_logits: that exports as
    # Log(Sigmoid(x)), and onnxruntime's approximate Sigmoid is exactly 0 below about
    # -17, which turns the loss of a confidently dark pixel into inf.
    "bce_logits": lambda logit, x: (logit.clamp(min=0) - logit * x
                                    + torch.log1p(torch.exp(-logit.abs()))),
    # bce_logits' terms (same onnxruntime caveat) minus log C(l)
    "continuous_bernoulli": lambda logit, x: (logit.clamp(min=0) - logit * x
                                              + torch.log1p(torch.exp(-logit.abs()))
                                              - _numerics.cb_log_normalizer(logit)),
}


def _kl_terms(mu, logvar, lo, hi, prior_mu=None, prior_logvar=None):
    """Per element 1/2 [plv - lv + (e^lv + (mu - pm)^2) e^-plv - 1] (pm, plv None: 0)."""
    lv = logvar.float() if lo is None else logvar.float().clamp(lo, hi)
    diff = mu.float() if prior_mu is None else mu.float() - prior_mu.float()
    if prior_logvar is None:
        return (-0.5 * (1 + lv - diff * diff - lv.exp())).expand(mu.shape)
    plv = prior_logvar.float()
    return (0.5 * (plv - lv + (lv.exp() + diff * diff) * torch.exp(-plv) - 1)).expand(mu.shape)


def _kl_rows(mu, logvar, lo, hi, prior_mu=None, prior_logvar=None):
    return _kl_terms(mu, logvar, lo, hi, prior_mu, prior_logvar).flatten(1).sum(1)


def _kl_formula(mu, logvar, lo, hi, prior_mu, prior_logvar, free_bits, reduction):
    """The reduced KL with free bits: sum_k max(K_k, free_bits), K_k the batch mean."""
    if free_bits > 0.0:
        terms = _kl_terms(mu, logvar, lo, hi, prior_mu, prior_logvar)
        per_sample = terms.mean(0).clamp_min(free_bits).sum()
        batch = mu.shape[0]
        return {"sum": per_sample * batch, "batchmean": per_sample,
                "mean": per_sample / mu[0].numel()}[reduction]
    return _reduce(_kl_rows(mu, logvar, lo, hi, prior_mu, prior_logvar), reduction,
                   mu[0].numel())


def _reduce(rows, reduction, per_sample_numel):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.mean()
    return rows.mean() / per_sample_numel


def _obs_scale_formula(x_hat, x, recon, obs_logvar):
    """gaussian / laplace: the per-element -log p with s = obs_logvar."""
    err = (x_hat - x).square() if recon == "gaussian" else (x_hat - x).abs()
    if isinstance(obs_logvar, str):  # "optimal": the fitted scale, a constant
        log_scale = err.detach().mean().log()
    elif isinstance(obs_logvar, torch.Tensor):
        log_scale = obs_logvar.float()
    else:
        log_scale = 0.0 if obs_logvar is None else float(obs_logvar)
    return _numerics.obs_scale_terms(err, log_scale, recon)


def _vae_loss_formula(x_hat, x, mu, logvar, recon, beta, reduction, lo, hi, obs_logvar=None,
                      prior_mu=None, prior_logvar=None, free_bits=0.0):
    if recon in _numerics.OBS_SCALE:
        terms = _obs_scale_formula(x_hat.float(), x.float(), recon, obs_logvar)
    else:
        terms = _RECON_FORMULAS[recon](x_hat.float(), x.float())
    recon_rows = terms.flatten(1).sum(1)
    recon_out = _reduce(recon_rows, reduction, x_hat[0].numel())
    kl_out = _kl_formula(mu, logvar, lo, hi, prior_mu, prior_logvar, free_bits, reduction)
    return LossParts(recon_out + beta * kl_out, recon_out, kl_out)
