"""fastvae's fused operations as ``torch.library`` custom ops.

Each op has a fake (meta) implementation and registered autograd, so
``torch.compile(fullgraph=True)`` traces through it without a graph break and
``torch.library.opcheck`` passes. The implementation of each op asks
``fastvae._dispatch`` which backend runs; both backends expose the same
functions.

The loss ops return, besides their values, the gradients of those values
computed in the same pass (empty tensors when nothing needs them); the
backward only scales them by ``grad_output`` — per sample for
``reduction="none"`` — in place only on their last use, when nothing else can
see them (``fastvae._grad_scaling``). A user's input is never written.

Noise for the reparameterization is drawn from an integer seed, a 1-element
int64 tensor (on the GPU for CUDA tensors, drawn there by a graph-safe
PyTorch call; on the CPU otherwise) that is an op input, so it stays data
under compile and in CUDA graphs; the kernels read it from memory. Its
backward is its own op that regenerates the noise from the same seed tensor,
so no noise-sized tensor is saved (the CPU path keeps its noise outside autograd,
see ``_torch_impl``; a small plain eager CPU call saves it, ``_SmallSampleFunction``).

The backward runs on the backend its forward ran on (stored in ``ctx`` at
setup), whatever the backend setting says by then: the reparameterization's
backward regenerates the forward's noise, which only the same backend can.

Under ``torch.func`` transforms and forward-mode AD the ops run as plain
differentiable torch formulas instead (see the last section).
"""

import contextlib
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvae import _cpu_fusion, _dispatch, _numerics, _torch_impl, _validate
from fastvae._grad_scaling import (
    in_torch_dispatch_mode,
    per_sample_view,
    saved_tensor_hooks_active,
    scale_gradients,
)


def _forward_backend(*tensors: Tensor) -> str:
    """The backend an op's forward runs on for these inputs, asked at setup and kept
    in ``ctx`` for the backward. Meta tensors only ever run the fake implementations;
    the backward's arithmetic on them is PyTorch's."""
    if tensors[0].is_meta:
        return "torch"
    return "torch" if _dispatch.implementation(*tensors) is _torch_impl else "triton"


# Free bits, a prior (in the loss, the KL and the sampling's KL) and several
# samples run on both backends, through their ``*_with_prior`` functions; the
# plain functions serve the calls without them.


def _free_bits_call(free_bits):
    return free_bits != 0.0


def _extended_sampling(prior_mu, prior_logvar, num_samples):
    return num_samples != 0 or _with_prior(prior_mu, prior_logvar)


def _with_prior(prior_mu, prior_logvar):
    return prior_mu is not None or prior_logvar is not None


# ---- fastvae::vae_loss --------------------------------------------------


class LossInputs(NamedTuple):
    """The loss op's positional inputs, in order. Only the first
    ``LOSS_TENSOR_INPUTS`` are tensors that can have gradients; the rest are options."""

    x_hat: Tensor
    x: Tensor
    mu: Tensor
    logvar: Tensor
    beta: Optional[Tensor]  # a 0-dim tensor, or None when beta is the float beta_value
    # gaussian / laplace: log sigma^2 / log b, broadcastable to x; None: obs_logvar_value
    obs_logvar: Optional[Tensor]
    # the KL's diagonal Gaussian prior N(prior_mu, e^prior_logvar), broadcastable to
    # mu; None: 0 (the standard normal)
    prior_mu: Optional[Tensor]
    prior_logvar: Optional[Tensor]
    beta_value: float
    recon: str
    obs_logvar_value: float  # the float obs_logvar (0.0 by default), when the tensor is None
    obs_logvar_optimal: bool  # obs_logvar="optimal": the scale fitted to the batch
    reduction: str
    clamp_lo: Optional[float]
    clamp_hi: Optional[float]
    free_bits: float  # the floor of each latent element's batch-mean KL (0: none)
    grad_recon: bool  # compute d recon / d x_hat in the forward
    grad_kl: bool  # compute d kl / d (mu, logvar) in the forward
    grad_prior: bool  # compute d kl / d (prior_mu, prior_logvar) in the forward


class LossOutputs(NamedTuple):
    """The loss op's outputs, in order: the values, then the gradients computed with
    them (of the reduced recon and kl, beta not applied; empty when not asked for)."""

    loss: Tensor
    recon: Tensor
    kl: Tensor
    grad_x_hat: Tensor
    grad_mu: Tensor
    grad_logvar: Tensor
    # d recon/d obs_logvar per element of x (an obs_logvar of more than one element;
    # empty otherwise: a scalar's is derived from recon in the backward)
    grad_obs_logvar: Tensor
    # d kl/d prior_mu, d kl/d prior_logvar per element of mu (summed to the prior's
    # shape in the backward); empty without that prior or when not asked for
    grad_prior_mu: Tensor
    grad_prior_logvar: Tensor


# the inputs that can have gradients: x_hat ... prior_logvar
LOSS_TENSOR_INPUTS = LossInputs._fields.index("beta_value")
# the backward's answer for the options (beta_value ... grad_kl): no gradient
_NO_GRADS_FOR_LOSS_OPTIONS = (None,) * (len(LossInputs._fields) - LOSS_TENSOR_INPUTS)


def _vae_loss_impl(
    x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor,
    beta: Optional[Tensor], obs_logvar: Optional[Tensor],
    prior_mu: Optional[Tensor], prior_logvar: Optional[Tensor], beta_value: float,
    recon: str, obs_logvar_value: float, obs_logvar_optimal: bool, reduction: str,
    clamp_lo: Optional[float], clamp_hi: Optional[float], free_bits: float,
    grad_recon: bool, grad_kl: bool, grad_prior: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """LossOutputs: (loss, recon, kl, d recon/d x_hat, d kl/d mu, d kl/d logvar,
    d recon/d obs_logvar, d kl/d prior_mu, d kl/d prior_logvar)."""
    impl = _dispatch.implementation(x_hat, x, mu, logvar)
    # (the PyTorch path checks the targets itself: in the pass that computes the loss
    # where a fused loop serves it)
    _validate.check_loss_values(x_hat, x, recon, beta, check_x=impl is not _torch_impl)
    if _free_bits_call(free_bits) or _with_prior(prior_mu, prior_logvar):
        return impl.vae_loss_forward_with_prior(
            x_hat, x, mu, logvar, beta, obs_logvar, prior_mu, prior_logvar, beta_value, recon,
            obs_logvar_value, obs_logvar_optimal, reduction, clamp_lo, clamp_hi, free_bits,
            grad_recon, grad_kl, grad_prior)
    out = impl.vae_loss_forward(x_hat, x, mu, logvar, beta, obs_logvar, beta_value, recon,
                                obs_logvar_value, obs_logvar_optimal, reduction,
                                clamp_lo, clamp_hi, grad_recon, grad_kl)
    return (*out, mu.new_empty(0), mu.new_empty(0))


vae_loss_op = torch.library.custom_op("fastvae::vae_loss", mutates_args=())(_vae_loss_impl)


_out_dtype = _numerics.compute_dtype  # float32, or float64 for float64 inputs


def _grad_buffer(t, wanted):
    dtype = _numerics.grad_buffer_dtype(t.dtype)
    return torch.empty(t.shape, dtype=dtype, device=t.device) if wanted else t.new_empty(0)


def _elementwise_obs_logvar(obs_logvar):
    """An obs_logvar with a gradient per element of x (more than one element)."""
    return obs_logvar is not None and obs_logvar.numel() > 1


def _prior_grad_buffer(prior, mu, wanted):
    """The fake of a prior's gradient buffer: mu-shaped in the prior's buffer dtype
    (``_numerics.summed_grad_dtype``)."""
    if prior is None or not wanted:
        return (mu if prior is None else prior).new_empty(0)
    return torch.empty(mu.shape, dtype=_numerics.summed_grad_dtype(prior, mu), device=mu.device)


@vae_loss_op.register_fake
def _(x_hat, x, mu, logvar, beta, obs_logvar, prior_mu, prior_logvar, beta_value, recon,
      obs_logvar_value, obs_logvar_optimal, reduction, clamp_lo, clamp_hi, free_bits,
      grad_recon, grad_kl, grad_prior):
    dtype = _out_dtype(x_hat, x, mu, logvar)
    shape = (x_hat.shape[0],) if reduction == "none" else ()
    values = [x_hat.new_empty(shape, dtype=dtype) for _ in range(3)]
    if grad_recon and _elementwise_obs_logvar(obs_logvar):
        grad_obs = torch.empty(x_hat.shape, dtype=_numerics.summed_grad_dtype(obs_logvar, x_hat),
                               device=x_hat.device)
    else:
        grad_obs = (x_hat if obs_logvar is None else obs_logvar).new_empty(0)
    return (*values, _grad_buffer(x_hat, grad_recon),
            _grad_buffer(mu, grad_kl), _grad_buffer(logvar, grad_kl), grad_obs,
            _prior_grad_buffer(prior_mu, mu, grad_prior),
            _prior_grad_buffer(prior_logvar, mu, grad_prior))


_SAMPLING = "reparameterize / fastvae.sample_and_kl"
_WHY_NO_DOUBLE_BACKWARD = {
    _SAMPLING: "the backward reads the noise back (kept or regenerated) outside autograd, so "
               "the gradient has no gradient of its own",
}


def _refuse_double_backward(op):
    """The saved gradients (sampling: the kept or regenerated noise) are constants to
    autograd, so a second derivative through them would silently be zero: refuse it."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() \
            and not in_torch_dispatch_mode():
        why = _WHY_NO_DOUBLE_BACKWARD.get(
            op, "its gradient is computed in the forward pass and has no gradient of its own")
        raise RuntimeError(
            f"fastvae.{op} does not support double backward (create_graph=True): {why}")


def _saveable(t):
    """``t`` for save_for_backward; a copy of it if it is an inference tensor (made under
    torch.inference_mode, e.g. latents of a frozen encoder), which autograd refuses to
    save: a copy made here, outside inference mode, is an ordinary tensor."""
    return t.clone() if t is not None and t.is_inference() else t


def _vae_loss_setup(ctx, inputs, output):
    (x_hat, x, mu, logvar, beta, obs_logvar, prior_mu, prior_logvar, beta_value, recon, _, _,
     reduction, clamp_lo, clamp_hi, _, grad_recon, grad_kl, grad_prior) = inputs
    _, recon_out, kl, g_xhat, g_mu, g_lv, g_obs, g_pm, g_plv = output  # LossOutputs
    ctx.mark_non_differentiable(g_xhat, g_mu, g_lv, g_obs, g_pm, g_plv)
    # the backend that scales the gradient buffers, when there are any
    ctx.backend = _forward_backend(x_hat, x, mu, logvar) \
        if grad_recon or grad_kl or grad_prior else None
    # unused outputs (the gradient buffers; recon/kl when only the loss is used)
    # get None, not a zero-filled tensor as large as the input
    ctx.set_materialize_grads(False)
    ctx.recon, ctx.reduction, ctx.beta_value = recon, reduction, beta_value
    ctx.hooked = saved_tensor_hooks_active()
    ctx.dtypes = (x_hat.dtype, x.dtype, mu.dtype, logvar.dtype)
    ctx.batch, ctx.numel = x_hat.shape[0], x_hat.numel()
    # x_hat only where the rare bce target gradient needs it: saving it otherwise
    # would keep the decoder's output alive until the backward; the gradient
    # buffers as detached aliases, so the backward can tell whether the outputs
    # themselves are still held
    target_grad_needs_x_hat = x.requires_grad and recon in _TARGET_GRAD_FROM_X_HAT
    # a scalar obs_logvar's gradient is derived from the recon value (its own value
    # is needed for that); a larger one's is the g_obs buffer
    scalar_obs = obs_logvar if obs_logvar is not None and obs_logvar.requires_grad \
        and not _elementwise_obs_logvar(obs_logvar) else None
    ctx.save_for_backward(_saveable(x_hat) if target_grad_needs_x_hat else None, _saveable(beta), kl,
                          g_xhat.detach(), g_mu.detach(), g_lv.detach(),
                          g_obs.detach() if g_obs.numel() else None,  # (read only when filled)
                          scalar_obs, recon_out if scalar_obs is not None else None,
                          g_pm.detach(), g_plv.detach())
    ctx.obs_shape_dtype = None if obs_logvar is None else (obs_logvar.shape, obs_logvar.dtype)
    ctx.prior_shapes_dtypes = tuple(None if p is None else (p.shape, p.dtype)
                                    for p in (prior_mu, prior_logvar))


def _sum_present(*grads):
    """Sum of the output gradients autograd passed; None (output unused) counts as zero."""
    present = [g for g in grads if g is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else sum(present[1:], present[0])


def _kl_weight_and_beta_grad(g_loss, g_kl, beta, beta_value, kl, need_beta):
    """(the KL's output gradient: beta g_loss + g_kl, None when neither flows;
    d loss/d beta for a tensor beta that needs it, else None)."""
    g_loss_kl = grad_beta = None
    if g_loss is not None:
        if beta is None:  # a float beta; 1.0 (the default) costs no op
            g_loss_kl = g_loss if beta_value == 1.0 else g_loss * beta_value
        else:
            g_loss_kl = g_loss * beta.to(g_loss.dtype)
            if need_beta:
                grad_beta = (g_loss * kl).sum().to(device=beta.device, dtype=beta.dtype)
    return _sum_present(g_loss_kl, g_kl), grad_beta


def _vae_loss_backward(ctx, g_loss, g_recon, g_kl, *_grad_buffers):
    """Gradients for LossInputs (the options get None) from those of LossOutputs
    (the gradient buffers are non-differentiable outputs)."""
    _refuse_double_backward("vae_loss")
    (x_hat, beta, kl, g_xhat, g_mu, g_lv, g_obs, scalar_obs, recon_out, g_pm,
     g_plv) = ctx.saved_tensors
    xhat_dtype, x_dtype, mu_dtype, lv_dtype = ctx.dtypes
    need_xhat, need_x, need_mu, need_lv, need_beta, need_obs, need_pm, need_plv = \
        ctx.needs_input_grad[:LOSS_TENSOR_INPUTS]
    w_recon = _sum_present(g_loss, g_recon)
    w_kl, grad_beta = _kl_weight_and_beta_grad(g_loss, g_kl, beta, ctx.beta_value, kl, need_beta)
    grad_x = grad_xhat = grad_mu = grad_lv = grad_obs = None
    if w_recon is None:
        need_xhat = need_x = need_obs = False
    if need_obs and scalar_obs is not None:
        grad_obs = _scalar_obs_logvar_grad(ctx, scalar_obs, recon_out, w_recon)
    need_obs_buffer = need_obs and grad_obs is None
    if w_kl is None:
        need_mu = need_lv = need_pm = need_plv = False
    grad_pm, grad_plv = _prior_grads(ctx, w_kl, (g_pm, g_plv), (need_pm, need_plv))
    if need_x and ctx.recon in _TARGET_GRAD_FROM_X_HAT:
        grad_x = _target_grad(ctx, x_hat, per_sample_view(w_recon, g_xhat)).to(x_dtype)
    x_from_xhat = need_x and grad_x is None  # mse, l1, gaussian, laplace: d/dx = -d/dx_hat
    scaled_xhat, scaled_mu, scaled_lv = scale_gradients(ctx, [
        (g_xhat, w_recon) if need_xhat or x_from_xhat else None,
        (g_mu, w_kl) if need_mu else None,
        (g_lv, w_kl) if need_lv else None])
    if need_obs_buffer:  # (the kernels' scaling takes three buffers per launch)
        obs_shape, obs_dtype = ctx.obs_shape_dtype
        scaled_obs, = scale_gradients(ctx, [(g_obs, w_recon)])
        # summed over obs_logvar's broadcast dims
        grad_obs = scaled_obs.sum_to_size(obs_shape).to(obs_dtype)
    if x_from_xhat:
        grad_x = _numerics.as_dtype(scaled_xhat.neg(), x_dtype)
    if need_xhat:
        grad_xhat = _numerics.as_dtype(scaled_xhat, xhat_dtype)
    if need_mu:
        grad_mu = _numerics.as_dtype(scaled_mu, mu_dtype)
    if need_lv:
        grad_lv = _numerics.as_dtype(scaled_lv, lv_dtype)
    return (grad_xhat, grad_x, grad_mu, grad_lv, grad_beta, grad_obs, grad_pm,
            grad_plv) + _NO_GRADS_FOR_LOSS_OPTIONS


def _prior_grads(ctx, w_kl, buffers, needed):
    """The prior's gradients: its mu-shaped buffers scaled by the KL's output
    gradient, summed over the prior's broadcast dims, in its dtype."""
    wanted = [(buf, w_kl) if need and buf.numel() else None for buf, need in zip(buffers, needed)]
    if not any(wanted):
        return None, None
    scaled = scale_gradients(ctx, wanted)
    return tuple(None if s is None or shape_dtype is None
                 else _numerics.as_dtype(s.sum_to_size(shape_dtype[0]), shape_dtype[1])
                 for s, shape_dtype in zip(scaled, ctx.prior_shapes_dtypes))


# the recons whose target gradient is not -d/dx_hat: computed from x_hat
_TARGET_GRAD_FROM_X_HAT = ("bce", "bce_logits", "continuous_bernoulli")


def _scalar_obs_logvar_grad(ctx, obs_logvar, recon_out, w):
    """d loss/d s for a scalar s = obs_logvar, from the recon value alone: per sample
    recon_n = HALF [e^-s S_n + D s + D LOG_NORM], so d recon_n/ds = HALF D (1 + s +
    LOG_NORM) - recon_n; the reduced recon is scale * sum_n recon_n. Tensor ops, no
    host sync, no gradient buffer."""
    half, log_norm = _numerics.OBS_SCALE[ctx.recon]
    cols = ctx.numel // ctx.batch
    count = cols if ctx.reduction == "none" else cols * ctx.batch * _numerics.reduction_scale(
        ctx.reduction, ctx.batch, ctx.numel)
    s = obs_logvar.reshape(()).to(recon_out.dtype)
    grad = (w * ((half * count) * (1.0 + log_norm + s) - recon_out)).sum()
    return grad.reshape(obs_logvar.shape).to(obs_logvar.dtype)


def _target_grad(ctx, x_hat, w):
    """d loss / d x for bce, bce_logits and continuous_bernoulli (rarely needed:
    targets seldom require grad)."""
    dtype = _out_dtype(x_hat)
    scale = _numerics.reduction_scale(ctx.reduction, x_hat.shape[0], x_hat.numel())
    return _torch_impl.recon_grad_wrt_target(x_hat, ctx.recon, dtype) * (w * scale)


vae_loss_op.register_autograd(_vae_loss_backward, setup_context=_vae_loss_setup)


# ---- fastvae::kl_divergence ---------------------------------------------


def _kl_divergence_impl(
    mu: Tensor, logvar: Tensor, prior_mu: Optional[Tensor], prior_logvar: Optional[Tensor],
    reduction: str, clamp_lo: Optional[float], clamp_hi: Optional[float], free_bits: float,
    want_grad: bool, want_prior_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(kl, d kl/d mu, d kl/d logvar, d kl/d prior_mu, d kl/d prior_logvar), the
    prior's per element of mu (empty without that prior or when not asked for)."""
    impl = _dispatch.implementation(mu, logvar)
    if _free_bits_call(free_bits) or _with_prior(prior_mu, prior_logvar):
        return impl.kl_forward_with_prior(mu, logvar, prior_mu, prior_logvar, reduction,
                                          clamp_lo, clamp_hi, free_bits, want_grad,
                                          want_prior_grad)
    return (*impl.kl_forward(mu, logvar, reduction, clamp_lo, clamp_hi, want_grad),
            mu.new_empty(0), mu.new_empty(0))


kl_divergence_op = torch.library.custom_op("fastvae::kl_divergence", mutates_args=())(
    _kl_divergence_impl)


@kl_divergence_op.register_fake
def _(mu, logvar, prior_mu, prior_logvar, reduction, clamp_lo, clamp_hi, free_bits, want_grad,
      want_prior_grad):
    shape = (mu.shape[0],) if reduction == "none" else ()
    return (mu.new_empty(shape, dtype=_out_dtype(mu, logvar)),
            _grad_buffer(mu, want_grad), _grad_buffer(logvar, want_grad),
            _prior_grad_buffer(prior_mu, mu, want_prior_grad),
            _prior_grad_buffer(prior_logvar, mu, want_prior_grad))


def _kl_setup(ctx, inputs, output):
    (mu, logvar, prior_mu, prior_logvar, _, _, _, _, want_grad, want_prior_grad) = inputs
    _, g_mu, g_lv, g_pm, g_plv = output
    ctx.mark_non_differentiable(g_mu, g_lv, g_pm, g_plv)
    ctx.set_materialize_grads(False)
    ctx.dtypes = (mu.dtype, logvar.dtype)
    # the backend that scales the buffers
    ctx.backend = _forward_backend(mu, logvar) if want_grad or want_prior_grad else None
    ctx.hooked = saved_tensor_hooks_active()
    ctx.prior_shapes_dtypes = tuple(None if p is None else (p.shape, p.dtype)
                                    for p in (prior_mu, prior_logvar))
    ctx.save_for_backward(g_mu.detach(), g_lv.detach(), g_pm.detach(), g_plv.detach())


# reduction, clamp_lo, clamp_hi, free_bits, want_grad, want_prior_grad
_NO_GRADS_FOR_KL_OPTIONS = (None,) * 6


def _kl_backward(ctx, g_kl, *_grad_buffers):
    _refuse_double_backward("kl_divergence")
    if g_kl is None:
        return (None,) * 4 + _NO_GRADS_FOR_KL_OPTIONS
    g_mu, g_lv, g_pm, g_plv = ctx.saved_tensors
    need_mu, need_lv, need_pm, need_plv = ctx.needs_input_grad[:4]
    mu_dtype, lv_dtype = ctx.dtypes
    grad_pm, grad_plv = _prior_grads(ctx, g_kl, (g_pm, g_plv), (need_pm, need_plv))
    scaled_mu, scaled_lv = scale_gradients(ctx, [(g_mu, g_kl) if need_mu else None,
                                                 (g_lv, g_kl) if need_lv else None])
    return (_numerics.as_dtype(scaled_mu, mu_dtype) if need_mu else None,
            _numerics.as_dtype(scaled_lv, lv_dtype) if need_lv else None,
            grad_pm, grad_plv) + _NO_GRADS_FOR_KL_OPTIONS


kl_divergence_op.register_autograd(_kl_backward, setup_context=_kl_setup)


# ---- fastvae::reparameterize --------------------------------------------


def _reparameterize_impl(
    mu: Tensor, logvar: Tensor, prior_mu: Optional[Tensor], prior_logvar: Optional[Tensor],
    seed: Tensor, clamp_lo: Optional[float], clamp_hi: Optional[float], with_kl: bool,
    num_samples: int, backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """(z, per-sample kl (against the prior) or an empty tensor); z has mu's shape, or
    (num_samples, *mu.shape) for num_samples > 0. ``backend``: the one a traced graph
    was traced for (its backward regenerates that backend's noise); None: dispatch's
    choice now (an eager call records it at setup)."""
    impl = _dispatch.implementation(mu, logvar) if backend is None \
        else _dispatch.implementation_named(backend)
    if _extended_sampling(prior_mu, prior_logvar, num_samples):
        return impl.reparameterize_forward_with_prior(
            mu, logvar, prior_mu, prior_logvar, seed, clamp_lo, clamp_hi, with_kl, num_samples)
    return impl.reparameterize_forward(mu, logvar, seed, clamp_lo, clamp_hi, with_kl)


reparameterize_op = torch.library.custom_op("fastvae::reparameterize", mutates_args=())(
    _reparameterize_impl)


def _sample_shape(mu, num_samples):
    return tuple(mu.shape) if num_samples == 0 else (num_samples, *mu.shape)


@reparameterize_op.register_fake
def _(mu, logvar, prior_mu, prior_logvar, seed, clamp_lo, clamp_hi, with_kl, num_samples,
      backend=None):
    z = torch.empty(_sample_shape(mu, num_samples),
                    dtype=torch.promote_types(mu.dtype, logvar.dtype), device=mu.device)
    dtype = _out_dtype(mu, logvar)
    kl = mu.new_empty((mu.shape[0],) if with_kl else (0,), dtype=dtype)
    return z, kl


def _reparameterize_backward_impl(
    grad_z: Tensor, grad_kl: Optional[Tensor], mu: Tensor, logvar: Tensor,
    prior_mu: Optional[Tensor], prior_logvar: Optional[Tensor], seed: Tensor,
    clamp_lo: Optional[float], clamp_hi: Optional[float], num_samples: int = 0,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar) (the prior's in its
    shape, empty without it), with the noise regenerated from ``seed`` by
    ``backend``, the one whose forward drew it (None: the one dispatch picks now)."""
    if backend is None:
        impl = _dispatch.implementation(mu, logvar)
    else:
        impl = _dispatch.implementation_named(backend)
    if _extended_sampling(prior_mu, prior_logvar, num_samples):
        return impl.reparameterize_backward_with_prior(
            grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed, clamp_lo, clamp_hi,
            num_samples)
    return (*impl.reparameterize_backward(grad_z, grad_kl, mu, logvar, seed, clamp_lo, clamp_hi),
            mu.new_empty(0), mu.new_empty(0))


reparameterize_backward_op = torch.library.custom_op(
    "fastvae::reparameterize_backward", mutates_args=())(_reparameterize_backward_impl)


@reparameterize_backward_op.register_fake
def _(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed, clamp_lo, clamp_hi,
      num_samples=0, backend=None):
    extended = _extended_sampling(prior_mu, prior_logvar, num_samples)

    def prior_grad(prior):
        if prior is None or not extended:
            return mu.new_empty(0)
        return torch.empty(prior.shape, dtype=prior.dtype, device=prior.device)

    return (torch.empty(mu.shape, dtype=mu.dtype, device=mu.device),
            torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device),
            prior_grad(prior_mu), prior_grad(prior_logvar))


def _reparameterize_setup(ctx, inputs, output):
    mu, logvar, prior_mu, prior_logvar, seed, clamp_lo, clamp_hi, with_kl, num_samples = inputs[:9]
    backend = inputs[9] if len(inputs) > 9 else None  # (the eager Function passes none)
    ctx.clamp, ctx.with_kl, ctx.num_samples = (clamp_lo, clamp_hi), with_kl, num_samples
    ctx.set_materialize_grads(False)  # an unused output (the empty kl) gets None, not zeros
    # the backend whose noise the backward regenerates: a traced graph's, fixed at trace
    # time for its forward op too (so a graph run later, under another setting, in another
    # thread, or loaded from the on-disk compile cache, still differentiates the noise its
    # forward drew); else the one this forward ran on (None: no backward will run)
    if backend is None and any(ctx.needs_input_grad[:4]):
        backend = _forward_backend(mu, logvar)
    ctx.backend = backend
    ctx.save_for_backward(*map(_saveable, (mu, logvar, prior_mu, prior_logvar)), seed)


def _reparameterize_grads(ctx, grad_z, grad_kl, run_backward):
    mu, logvar, prior_mu, prior_logvar, seed = ctx.saved_tensors
    if grad_z is None:  # only the kl is used
        grad_z = torch.zeros(_sample_shape(mu, ctx.num_samples),
                             dtype=torch.promote_types(mu.dtype, logvar.dtype), device=mu.device)
    grads = run_backward(grad_z, grad_kl if ctx.with_kl else None, mu, logvar, prior_mu,
                         prior_logvar, seed, *ctx.clamp, ctx.num_samples, ctx.backend)
    # no gradients for seed, clamp_lo, clamp_hi, with_kl, num_samples (, backend)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])) \
        + (None,) * (len(ctx.needs_input_grad) - 4)


def _reparameterize_backward(ctx, grad_z, grad_kl):
    _refuse_double_backward(_SAMPLING)
    # the backward is its own op, so that compile traces it with a symbolic seed
    return _reparameterize_grads(ctx, grad_z, grad_kl, reparameterize_backward_op)


reparameterize_op.register_autograd(_reparameterize_backward, setup_context=_reparameterize_setup)


def _reparameterize_vmap(info, in_dims, mu, logvar, prior_mu, prior_logvar, seed, clamp_lo,
                         clamp_hi, with_kl, num_samples, backend=None):
    """vmap's rule: one call per vmapped sample, as torch's per-sample fallback would
    run it (so each sample's own seed under randomness="different", the same seed and
    noise under "same"), without the fallback's warning that a batching rule is
    missing. torch.func reaches the op only for the noise (the composite path)."""
    if info.batch_size == 0:  # (no sample to call the op on, nor to take the shapes from)
        raise RuntimeError("fastvae's sampling does not support vmap over a dimension of size 0")
    tensors = (mu, logvar, prior_mu, prior_logvar, seed)
    outputs = []
    for index in range(info.batch_size):
        sample = [t if dim is None else t.select(dim, index)
                  for t, dim in zip(tensors, in_dims[:len(tensors)])]
        outputs.append(reparameterize_op(*sample, clamp_lo, clamp_hi, with_kl, num_samples,
                                         backend))
    return tuple(torch.stack(parts) for parts in zip(*outputs)), (0, 0)


reparameterize_op.register_vmap(_reparameterize_vmap)


# ---- under torch.func transforms and forward-mode AD -------------------
#
# The ops compute their gradients in the forward pass and scale them in the
# backward: first-order reverse mode only. torch.func cannot run them (the
# autograd.Functions behind the custom ops have no setup_context), forward-mode
# AD has no rule for them, and a jvp through a custom op would silently be zero.
# So under a torch.func transform (grad, vjp, jacrev, jacfwd, jvp, hessian,
# vmap) or inside torch.autograd.forward_ad.dual_level the ops run as the plain
# differentiable torch formulas below: the same math in the same dtypes, the
# same argument checks and, for the reparameterization, the same noise (drawn
# by the backend the eager call would use), so every transform, and any order
# of derivative, differentiates exactly the function the eager ops compute.
#
# One difference is PyTorch's own: for recon="bce" the gradient with respect
# to the *target* at p exactly 0 or 1 is -logit(p) = +-inf here (F.binary_cross_entropy),
# where the fused op gives +-100 (the derivative of the clamped loss).

# The private torch APIs this path relies on, each checked by tests/test_functorch.py.
# Without the first, eager forward-mode AD reaches the autograd.Functions, which
# raise PyTorch's "must implement the jvp function" (an error, never a zero);
# without the others the value checks read the wrapped tensors (under vmap:
# PyTorch's data-dependent control flow error).
_FORWARD_AD = torch.autograd.forward_ad  # its _current_level is >= 0 inside a dual_level
_IS_FUNCTORCH_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
_FUNCTORCH_UNWRAP = getattr(torch._C._functorch, "get_unwrapped", None)
# disables the torch.func layers while the value checks read the real tensors
_DisableFuncTorch = getattr(torch._C, "_DisableFuncTorch", contextlib.nullcontext)

TRANSFORM_PRIVATE_APIS = {
    "torch._C._are_functorch_transforms_active": getattr(torch._C, "_are_functorch_transforms_active", None),
    "torch.autograd.forward_ad._current_level": getattr(_FORWARD_AD, "_current_level", None),
    "torch._C._functorch.is_functorch_wrapped_tensor": _IS_FUNCTORCH_WRAPPED,
    "torch._C._functorch.get_unwrapped": _FUNCTORCH_UNWRAP,
    "torch._C._DisableFuncTorch": getattr(torch._C, "_DisableFuncTorch", None),
}


def _forward_ad_active():
    """Inside a torch.autograd.forward_ad.dual_level (the only place dual tensors exist)."""
    return getattr(_FORWARD_AD, "_current_level", -1) >= 0


def _differentiated_by_a_transform():
    return _functorch_active() or _forward_ad_active()


def _unwrapped(t):
    """The real tensor inside torch.func's wrappers (of a vmap: all its samples at once)."""
    if _IS_FUNCTORCH_WRAPPED is None or _FUNCTORCH_UNWRAP is None:
        return t
    while _IS_FUNCTORCH_WRAPPED(t):
        t = _FUNCTORCH_UNWRAP(t)
    return t


def _rows(t):
    return t.reshape(t.shape[0], -1)


def _reduced(rows, reduction, scale):
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if scale == 1.0 else total * scale


def _recon_terms(x_hat, x, recon, obs_logvar=None, obs_logvar_value=0.0,
                 obs_logvar_optimal=False):
    if recon in _numerics.OBS_SCALE:
        diff = x_hat - x
        err = diff.square() if recon == "gaussian" else diff.abs()
        if obs_logvar_optimal:  # the fitted scale, a constant to the gradient
            log_scale = err.detach().mean().log()
        elif obs_logvar is not None:
            log_scale = obs_logvar.to(err.dtype)
        else:
            log_scale = obs_logvar_value
        return _numerics.obs_scale_terms(err, log_scale, recon)
    if recon == "continuous_bernoulli":
        return F.softplus(x_hat) - x_hat * x - _numerics.cb_log_normalizer(x_hat)
    if recon == "mse":
        return (x_hat - x).square()
    if recon == "l1":
        return (x_hat - x).abs()
    if recon == "bce":  # each log clamped at -100; its gradient (p - x) / max(p (1 - p), 1e-12)
        return F.binary_cross_entropy(x_hat, x, reduction="none")
    # bce_logits: softplus(l) - l x, as the fused op computes it (F.softplus's threshold 20)
    return F.softplus(x_hat) - x_hat * x


def _kl_terms(mu, logvar, clamp_lo, clamp_hi, dtype, prior_mu=None, prior_logvar=None):
    """Per-element KL(N(mu, e^lv) || N(pm, e^plv)) = 1/2 [expm1(d) - d + (mu - pm)^2 e^-plv],
    d = lv - plv (pm, plv None: 0)."""
    lv = logvar.to(dtype)
    if clamp_lo is not None:
        lv = lv.clamp(clamp_lo, clamp_hi)
    diff = mu.to(dtype)
    if prior_mu is not None:
        diff = diff - prior_mu.to(dtype)
    sq = diff.square()
    if prior_logvar is None:
        return (0.5 * (sq + torch.expm1(lv) - lv)).expand(mu.shape)
    plv = prior_logvar.to(dtype)
    # e^(lv - plv) - 1 and lv - plv with the difference's rounding error carried, as the
    # fused ops compute them (its derivative is 0, so the transforms see the same math)
    em1, lv_minus_plv = _numerics.expm1_of_difference(lv, plv)
    return (0.5 * (sq * torch.exp(-plv) + em1 - lv_minus_plv)).expand(mu.shape)


def _kl_rows(mu, logvar, clamp_lo, clamp_hi, dtype, prior_mu=None, prior_logvar=None):
    return _rows(_kl_terms(mu, logvar, clamp_lo, clamp_hi, dtype, prior_mu, prior_logvar)).sum(1)


def _kl_reduced(mu, logvar, prior_mu, prior_logvar, reduction, clamp_lo, clamp_hi, free_bits,
                dtype):
    """The reduced KL, free bits applied: scale * sum_k max(N K_k, N free_bits)."""
    scale = _numerics.reduction_scale(reduction, mu.shape[0], mu.numel())
    terms = _kl_terms(mu, logvar, clamp_lo, clamp_hi, dtype, prior_mu, prior_logvar)
    if free_bits > 0.0:
        return torch.clamp_min(terms.sum(0), mu.shape[0] * free_bits).sum() * scale
    return _reduced(_rows(terms).sum(1), reduction, scale)


def _composite_vae_loss(x_hat, x, mu, logvar, beta, obs_logvar, prior_mu, prior_logvar,
                        beta_value, recon, obs_logvar_value, obs_logvar_optimal, reduction,
                        clamp_lo, clamp_hi, free_bits, grad_recon, grad_kl, grad_prior):
    """LossOutputs, differentiable by any transform; the gradient buffers are empty."""
    if not torch.compiler.is_compiling():  # (compiled, they would break the graph)
        with _DisableFuncTorch():  # the value checks read all samples of a vmap at once
            # (F.binary_cross_entropy below would raise its own error, naming nothing)
            _validate.check_loss_values(_unwrapped(x_hat), _unwrapped(x), recon,
                                        None if beta is None else _unwrapped(beta),
                                        loss_pass_checks_x_hat=False)
    dtype = _out_dtype(x_hat, x, mu, logvar)
    batch = x_hat.shape[0]
    recon_rows = _rows(_recon_terms(x_hat.to(dtype), x.to(dtype), recon, obs_logvar,
                                    obs_logvar_value, obs_logvar_optimal)).sum(1)
    recon_out = _reduced(recon_rows, reduction,
                         _numerics.reduction_scale(reduction, batch, x_hat.numel()))
    kl_out = _kl_reduced(mu, logvar, prior_mu, prior_logvar, reduction, clamp_lo, clamp_hi,
                         free_bits, dtype)
    loss = recon_out + (beta_value if beta is None else beta.to(dtype)) * kl_out
    return LossOutputs(loss, recon_out, kl_out, x_hat.new_empty(0), mu.new_empty(0),
                       logvar.new_empty(0),
                       (x_hat if obs_logvar is None else obs_logvar).new_empty(0),
                       mu.new_empty(0), mu.new_empty(0))


def _composite_kl_divergence(mu, logvar, prior_mu, prior_logvar, reduction, clamp_lo, clamp_hi,
                             free_bits, want_grad, want_prior_grad):
    dtype = _out_dtype(mu, logvar)
    kl = _kl_reduced(mu, logvar, prior_mu, prior_logvar, reduction, clamp_lo, clamp_hi,
                     free_bits, dtype)
    return kl, mu.new_empty(0), logvar.new_empty(0), mu.new_empty(0), mu.new_empty(0)


def _noise(seed, shape, dtype, device, num_samples=0):
    """The eps ~ N(0, I) that the eager op draws from ``seed`` for a (mu, logvar) of
    ``shape`` computed in ``dtype``: the backend's reparameterization of mu = 0,
    logvar = 0 is exactly its noise (0 + exp(0) eps), a constant to every transform.
    Under vmap(randomness="different") the seed is batched and each sample gets the
    noise of its own seed (torch's per-sample fallback for the custom op)."""
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    return reparameterize_op(zeros, zeros, None, None, seed, None, None, False, num_samples)[0]


def _composite_reparameterize(mu, logvar, prior_mu, prior_logvar, seed, clamp_lo, clamp_hi,
                              with_kl, num_samples):
    """(z, per-sample kl or an empty tensor), as the eager op computes them:
    z = mu + exp(lv / 2) * eps in the compute dtype, then in mu's and logvar's."""
    dtype = _out_dtype(mu, logvar)
    eps = _noise(seed, mu.shape, dtype, mu.device, num_samples)
    lv = logvar.to(dtype)
    if clamp_lo is not None:
        lv = lv.clamp(clamp_lo, clamp_hi)
    std = torch.exp(lv * 0.5)
    z = torch.addcmul(mu.to(dtype), eps, std).to(torch.promote_types(mu.dtype, logvar.dtype))
    if not with_kl:
        return z, mu.new_empty(0, dtype=dtype)
    return z, _kl_rows(mu, logvar, clamp_lo, clamp_hi, dtype, prior_mu, prior_logvar)


# ---- eager calls ---------------------------------------------------------
#
# Going through the dispatcher costs a custom op written in Python about
# 0.15 ms per forward+backward, as much as the whole loss of an MNIST-size
# batch. In plain eager mode the same implementation, setup and backward run
# from an autograd.Function instead; under torch.compile, export, fake
# tensors or any other tracing (a dispatch mode, a tensor subclass) the custom
# ops above run, so graphs hold fastvae::* nodes.

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _functorch_active():
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return active is not None and active()


def _eager(*tensors):
    """Plain eager mode on real tensors: no compile, export, dispatch mode, functorch
    transform, forward-mode AD, tensor subclass or meta tensor (those need the custom
    ops' fake impls)."""
    if torch.compiler.is_compiling() or in_torch_dispatch_mode() or _functorch_active() \
            or _forward_ad_active():
        return False
    for t in tensors:  # (a loop: a generator expression costs a measurable us per call)
        if t is not None and (type(t) not in _PLAIN_TENSORS or t.is_meta):
            return False
    return True


def _function(name, impl, setup, backward):
    """An autograd.Function running ``impl`` with the custom op's setup and backward.
    (Old-style ``forward(ctx, ...)``: a separate ``setup_context`` makes every apply
    bind default arguments through ``inspect.signature``, ~0.1 ms.)"""
    def forward(ctx, *args):
        output = impl(*args)
        setup(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_UNWRAP_IF_DEAD = getattr(torch._C._functorch, "unwrap_if_dead", None)


def _apply(function, tensor_count, *args):
    """``function.apply(*args)`` for a plain eager call (``_eager`` held, so no
    functorch transform is active), without torch's Python wrapper: all that does
    then is unwrap dead functorch wrappers from every argument, done here on the
    first ``tensor_count`` only (the tensors; the rest are options), ~3 us less."""
    if _UNWRAP_IF_DEAD is None or not isinstance(function, type):  # (a test's stand-in)
        return function.apply(*args)
    tensors = tuple(a if a is None else _UNWRAP_IF_DEAD(a) for a in args[:tensor_count])
    return super(torch.autograd.Function, function).apply(*tensors, *args[tensor_count:])


def _reparameterize_eager_backward(ctx, grad_z, grad_kl):
    # the Triton backward is not differentiable: refuse, as the custom op does
    _refuse_double_backward(_SAMPLING)
    return _reparameterize_grads(ctx, grad_z, grad_kl, _reparameterize_backward_impl)


_VAELossFunction = _function("_VAELossFunction", _vae_loss_impl, _vae_loss_setup,
                             _vae_loss_backward)
_KLDivergenceFunction = _function("_KLDivergenceFunction", _kl_divergence_impl, _kl_setup,
                                  _kl_backward)
_ReparameterizeFunction = _function("_ReparameterizeFunction", _reparameterize_impl,
                                    _reparameterize_setup, _reparameterize_eager_backward)


# ---- small inputs on the PyTorch path: the gradients in the backward ----------
#
# See fastvae._torch_impl (small_eager_applies): at most SMALL_NUMEL elements,
# plain eager calls of the mse, l1 and bce_logits losses against N(0, I) and of the KL compute
# the values in the forward and each gradient in the backward, grad_output
# folded in. They save the inputs (small) instead of gradient buffers.


def _small_eager(backend_tensors):
    """The PyTorch path runs these tensors (not the kernels)."""
    return _dispatch.backend_for(*backend_tensors) == "torch"


class _SmallLossFunction(torch.autograd.Function):
    """(loss, recon, kl) of a loss that ``_torch_impl.small_eager_applies`` or
    ``large_half_applies`` to; the loss alone unless ``parts`` (autograd's cost per output
    is measurable here)."""

    @staticmethod
    def forward(ctx, x_hat, x, mu, logvar, beta, beta_value, recon, reduction, lo, hi, parts):
        _validate.check_loss_values(x_hat, x, recon, beta, check_x=False)  # (as below)
        # not the fused loops under saved-tensor hooks (checkpointing, offloading): what is
        # saved (float32 copies or the inputs as given) would then depend on whether a
        # loop had compiled yet, and a recomputed forward must save what the first did
        (loss, recon_out, kl), converted = _torch_impl.small_loss_values(
            x_hat, x, mu, logvar, beta, beta_value, recon, reduction, lo, hi,
            fuse=not saved_tensor_hooks_active())
        ctx.set_materialize_grads(False)
        ctx.options = (beta_value, recon, reduction, lo, hi, kl.dtype)
        ctx.dtypes = (x_hat.dtype, x.dtype, mu.dtype, logvar.dtype)
        # the inputs in the compute dtype (converted once) and exp(lv) - 1, each only
        # where a gradient the backward computes reads it (as eager saves nothing for
        # an input no gradient flows to: latents without one may be inference tensors).
        # After the fused loop (no exp(lv) - 1) the inputs as given, all four: the
        # backward's own loop reads them (the torch ops convert them until it runs)
        p, target, mu_c, logvar_c, var_m1 = converted
        need_xhat, need_x, need_mu, need_lv, need_beta = ctx.needs_input_grad[:5]
        ctx.fused = var_m1 is None
        every = ctx.fused and (need_xhat or need_x or need_mu or need_lv)
        recon_grad = need_xhat or need_x or every
        ctx.save_for_backward(_saveable(p) if recon_grad else None,
                              _saveable(target) if recon_grad else None,
                              _saveable(mu_c) if need_mu or every else None,
                              _saveable(logvar_c) if (need_lv and lo is not None) or every
                              else None,
                              var_m1 if need_lv else None, _saveable(beta),
                              kl if need_beta else None)
        return (loss, recon_out, kl) if parts else loss

    @staticmethod
    def backward(ctx, g_loss, g_recon=None, g_kl=None):
        _refuse_double_backward("vae_loss")
        # (in the compute dtype; as given after the forward's fused loop, ctx.fused)
        x_hat, x, mu, logvar, var_m1, beta, kl = ctx.saved_tensors
        beta_value, recon, reduction, lo, hi, dtype = ctx.options
        xhat_dtype, x_dtype, mu_dtype, lv_dtype = ctx.dtypes
        need_xhat, need_x, need_mu, need_lv, need_beta = ctx.needs_input_grad[:5]
        grad_xhat = grad_x = grad_mu = grad_lv = None
        w_recon = _sum_present(g_loss, g_recon)
        w_kl, grad_beta = _kl_weight_and_beta_grad(g_loss, g_kl, beta, beta_value, kl, need_beta)
        want_recon = w_recon is not None and need_xhat
        want_kl = w_kl is not None and (need_mu or need_lv)
        # (a target's gradient: the torch ops below; the loop's conditions asked again, as
        # fusion may have been switched off since the forward)
        if ctx.fused and not need_x and (want_recon or want_kl) \
                and _cpu_fusion.applies_small(x_hat, x, mu, logvar, dtype):
            fused = _torch_impl.small_fused_grads(
                x_hat, x, mu, logvar, recon, reduction, lo, hi,
                w_recon if want_recon else None, w_kl if want_kl else None,
                (xhat_dtype if want_recon else None,
                 mu_dtype if want_kl and need_mu else None,
                 lv_dtype if want_kl and need_lv else None))
            if fused is not None:
                grad_xhat, grad_mu, grad_lv = fused
                return grad_xhat, None, grad_mu, grad_lv, grad_beta, None, None, None, None, \
                    None, None
        if ctx.fused and need_lv and w_kl is not None:
            var_m1 = _torch_impl.small_var_m1(logvar, lo, hi, dtype)
        if w_recon is not None and (need_xhat or need_x):
            g = _torch_impl.small_recon_grad(x_hat, x, recon, reduction, dtype, w_recon) \
                if need_xhat or recon in _torch_impl.SMALL_RECONS else None
            if need_x:
                grad_x = _numerics.as_dtype(_torch_impl.small_target_grad(
                    x_hat, recon, reduction, dtype, w_recon, g), x_dtype)
            if need_xhat:
                grad_xhat = _numerics.as_dtype(g, xhat_dtype)
        if w_kl is not None and (need_mu or need_lv):
            grad_mu, grad_lv = _torch_impl.small_kl_grads(mu, logvar, var_m1, lo, hi, reduction,
                                                           dtype, w_kl, need_mu, need_lv)
            grad_mu = None if grad_mu is None else _numerics.as_dtype(grad_mu, mu_dtype)
            grad_lv = None if grad_lv is None else _numerics.as_dtype(grad_lv, lv_dtype)
        return grad_xhat, grad_x, grad_mu, grad_lv, grad_beta, None, None, None, None, None, None


class _SmallKLFunction(torch.autograd.Function):
    """The reduced KL against N(0, I) of at most SMALL_NUMEL latent elements."""

    @staticmethod
    def forward(ctx, mu, logvar, reduction, lo, hi):
        dtype = _numerics.compute_dtype(mu, logvar)
        kl, var_m1, mu_c, logvar_c = _torch_impl.small_kl_value(mu, logvar, lo, hi, dtype,
                                                                reduction)
        ctx.options = (reduction, lo, hi, dtype, mu.dtype, logvar.dtype)
        need_mu, need_lv = ctx.needs_input_grad[:2]
        # (compute dtype) each only where its gradient reads it, as in _SmallLossFunction
        ctx.save_for_backward(_saveable(mu_c) if need_mu else None,
                              _saveable(logvar_c) if need_lv and lo is not None else None,
                              var_m1 if need_lv else None)
        return kl

    @staticmethod
    def backward(ctx, g_kl):
        _refuse_double_backward("kl_divergence")
        mu, logvar, var_m1 = ctx.saved_tensors
        reduction, lo, hi, dtype, mu_dtype, lv_dtype = ctx.options
        need_mu, need_lv = ctx.needs_input_grad[:2]
        grad_mu, grad_lv = _torch_impl.small_kl_grads(mu, logvar, var_m1, lo, hi, reduction,
                                                       dtype, g_kl, need_mu, need_lv)
        return (None if grad_mu is None else _numerics.as_dtype(grad_mu, mu_dtype),
                None if grad_lv is None else _numerics.as_dtype(grad_lv, lv_dtype),
                None, None, None)


class _SmallSampleFunction(torch.autograd.Function):
    """reparameterize / sample_and_kl of at most SMALL_NUMEL latent elements on the
    CPU against N(0, I), one sample (``_small_sample``): the PyTorch path's arithmetic
    without the dispatch and bookkeeping of the general op's Function. Returns z alone
    without the KL (one output: autograd's cost per output is measurable at these
    sizes), else (z, kl). The forward's eps std / 2 (d z / d logvar) is saved like any
    saved tensor, not kept in the table the general path bounds; mu and logvar are
    saved only where the backward reads them (the KL, a clamp)."""

    @staticmethod
    def forward(ctx, mu, logvar, seed, lo, hi, with_kl):
        ctx.set_materialize_grads(False)
        ctx.options = (lo, hi, mu.shape, _torch_impl._sample_dtype(mu, logvar), mu.dtype,
                       logvar.dtype)
        z, kl, kept = _torch_impl.small_sample_forward(mu, logvar, seed, lo, hi, with_kl)
        ctx.save_for_backward(_saveable(mu) if with_kl else None,
                              _saveable(logvar) if with_kl or lo is not None else None, kept)
        return (z, kl) if with_kl else z

    @staticmethod
    def backward(ctx, grad_z, grad_kl=None):
        _refuse_double_backward(_SAMPLING)
        mu, logvar, kept = ctx.saved_tensors
        lo, hi, shape, z_dtype, mu_dtype, lv_dtype = ctx.options
        if grad_z is None:  # only the kl is used
            grad_z = torch.zeros(shape, dtype=z_dtype, device=kept.device)
        grad_mu, grad_lv = _torch_impl.small_sample_backward(
            grad_z, grad_kl, mu, logvar, kept, lo, hi, mu_dtype, lv_dtype)
        need_mu, need_lv = ctx.needs_input_grad[:2]
        return (grad_mu if need_mu else None, grad_lv if need_lv else None) + (None,) * 4


# An eager call that no gradient can flow through (no input requires grad, or grad
# mode is off) runs the implementation alone: what autograd.Function.apply and the
# setup would add (~20 us) builds nothing that is used.


def vae_loss(x_hat, x, mu, logvar, *args):
    """``vae_loss_op`` (same arguments), from the cheapest entry point that is correct here."""
    beta, obs_logvar, prior_mu, prior_logvar = args[:4]
    if _eager(x_hat, x, mu, logvar, beta, obs_logvar, prior_mu, prior_logvar):
        # args[-3:]: grad_recon, grad_kl, grad_prior (grad mode and requires_grad folded in)
        if not (args[-3] or args[-2] or args[-1] or (beta is not None and beta.requires_grad
                                                     and torch.is_grad_enabled())):
            return _vae_loss_impl(x_hat, x, mu, logvar, *args)
        return _apply(_VAELossFunction, LOSS_TENSOR_INPUTS, x_hat, x, mu, logvar, *args)
    if _differentiated_by_a_transform():  # torch.func, also inside torch.compile
        return _composite_vae_loss(x_hat, x, mu, logvar, *args)
    if beta is None and torch.compiler.is_compiling():
        # a float beta goes in as a tensor made in the graph: the op's float argument is
        # specialized by Dynamo, one graph per value of a beta schedule until torch.compile's
        # recompile limit (fullgraph: an error); a product of a float is not (2 graphs, as
        # for eager torch code). In the loss's dtype, to which both backends round a float
        # or tensor beta alike (the same values, checked)
        beta = torch.ones((), dtype=_numerics.compute_dtype(x_hat, x, mu, logvar),
                          device=x_hat.device) * args[4]
        args = (beta, *args[1:4], 0.0, *args[5:])
    return vae_loss_op(x_hat, x, mu, logvar, *args)


def kl_divergence(mu, logvar, *args):
    """``kl_divergence_op`` (same arguments), from the cheapest correct entry point."""
    if _eager(mu, logvar, args[0], args[1]):  # mu, logvar, prior_mu, prior_logvar
        if not (args[-2] or args[-1]):  # want_grad, want_prior_grad
            return _kl_divergence_impl(mu, logvar, *args)
        return _apply(_KLDivergenceFunction, 4, mu, logvar, *args)
    if _differentiated_by_a_transform():  # torch.func, also inside torch.compile
        return _composite_kl_divergence(mu, logvar, *args)
    return kl_divergence_op(mu, logvar, *args)


def reparameterize(mu, logvar, *args):
    """``reparameterize_op`` (same arguments), from the cheapest correct entry point."""
    prior_mu, prior_logvar, seed = args[:3]
    if _eager(mu, logvar, prior_mu, prior_logvar, seed):
        # (prior_mu, prior_logvar, seed, clamp_lo, clamp_hi, with_kl, num_samples) = args
        if not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (mu, logvar, prior_mu, prior_logvar))):
            if _small_sample(mu, logvar, prior_mu, prior_logvar, args[6]):
                return _small_sample_value(mu, logvar, seed, *args[3:6])
            return _reparameterize_impl(mu, logvar, *args)
        if _small_sample(mu, logvar, prior_mu, prior_logvar, args[6]):
            out = _apply(_SmallSampleFunction, 3, mu, logvar, seed, *args[3:6])
            return out if args[5] else (out, mu.new_empty(0, dtype=out.dtype))
        return _apply(_ReparameterizeFunction, 5, mu, logvar, *args)
    if _differentiated_by_a_transform():  # torch.func, also inside torch.compile
        return _composite_reparameterize(mu, logvar, *args)
    # traced (compile, export, make_fx): the backend is fixed in the graph, for its
    # forward and its backward alike
    return reparameterize_op(mu, logvar, *args, _dispatch.traced_backend(
        mu.device.type, mu.dtype.itemsize > 4 or logvar.dtype.itemsize > 4, mu.is_meta))


def _small_sample(mu, logvar, prior_mu, prior_logvar, num_samples):
    """A plain eager sampling call with gradients (checked by the caller) that
    ``_SmallSampleFunction`` serves: against N(0, I), one sample, at most SMALL_NUMEL
    latent elements, on the CPU's PyTorch path."""
    return prior_mu is None and prior_logvar is None and not num_samples \
        and mu.numel() <= _torch_impl.SMALL_NUMEL and mu.device.type == "cpu" \
        and _small_eager((mu, logvar))


def _small_sample_value(mu, logvar, seed, lo, hi, with_kl):
    """``_reparameterize_impl``'s (z, kl or empty) for a call without gradients that
    ``_small_sample`` serves: ``_torch_impl.small_sample_forward``'s arithmetic (the same
    bits as the general path's), without the general op's layers (a 2x2 call took ~43 us
    there, eager's three ops ~14)."""
    z, kl, _ = _torch_impl.small_sample_forward(mu, logvar, seed, lo, hi, with_kl, keep=False)
    return z, kl if with_kl else mu.new_empty(0, dtype=_out_dtype(mu, logvar))


def reparameterize_value(mu, logvar, seed, num_samples):
    """z: the first output of ``reparameterize`` against N(0, I) without a clamp or the
    KL, for the public API; where ``_small_sample`` holds, ``_SmallSampleFunction``'s
    one output, or without gradients the forward's arithmetic alone (no empty KL made)."""
    if _eager(mu, logvar, seed) and _small_sample(mu, logvar, None, None, num_samples):
        if torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad):
            return _apply(_SmallSampleFunction, 3, mu, logvar, seed, None, None, False)
        return _torch_impl.small_sample_forward(mu, logvar, seed, None, None, False,
                                                keep=False)[0]
    return reparameterize(mu, logvar, None, None, seed, None, None, False, num_samples)[0]


def vae_loss_values(x_hat, x, mu, logvar, *args, parts=True):
    """(loss, recon, kl): the first three outputs of ``vae_loss`` (same arguments),
    for the public API. A plain eager mse, l1 or bce_logits loss against N(0, I) of at most
    SMALL_NUMEL elements on the PyTorch path, or a larger float16 one that the fused CPU
    loops serve, computes its gradients in the backward instead (``_SmallLossFunction``):
    the gradient buffers are never made. Without
    ``parts`` only the loss is wanted: recon and kl may be None."""
    beta, obs_logvar, prior_mu, prior_logvar = args[:4]
    # (beta_value, recon, obs_logvar_value, obs_logvar_optimal, reduction, lo, hi,
    # free_bits, grad_recon, grad_kl, grad_prior) = args[4:]
    # _eager first: under tracing the size comparisons would become guards on the
    # symbolic shapes (a dynamic batch could not cross SMALL_NUMEL in an export)
    if obs_logvar is None and prior_mu is None and prior_logvar is None and not args[11] \
            and _eager(x_hat, x, mu, logvar, beta) and _small_eager((x_hat, x, mu, logvar)) \
            and (_torch_impl.small_eager_applies(x_hat, mu, args[5])
                 # a large float16 loss: its float16 gradient in the backward too, from its
                 # warm-up's last call
                 or _torch_impl.large_half_applies(x_hat, x, mu, logvar, args[5], args[8],
                                                   args[9])):
        small_args = (x_hat, x, mu, logvar, beta, args[4], args[5], args[8], args[9], args[10])
        if args[-3] or args[-2]:  # grad_recon, grad_kl
            out = _apply(_SmallLossFunction, 5, *small_args, parts)
            return out if parts else (out, None, None)
        if beta is None or not (beta.requires_grad and torch.is_grad_enabled()):
            # nothing to differentiate: the values alone, no gradient buffers
            # (small_loss_values checks the targets: in its fused loop where one serves)
            _validate.check_loss_values(x_hat, x, args[5], beta, check_x=False)
            return _torch_impl.small_loss_values(*small_args)[0]
    return vae_loss(x_hat, x, mu, logvar, *args)[:3]


def _half_kl_fused(mu, logvar):
    """Half-precision latents of SMALL_HALF_KL_NUMEL elements or more that the general
    path's fused KL loop serves: faster there than the small path's float32 ops."""
    return mu.numel() >= _torch_impl.SMALL_HALF_KL_NUMEL \
        and (mu.dtype in _numerics.HALF_DTYPES or logvar.dtype in _numerics.HALF_DTYPES) \
        and _cpu_fusion.applies_kl(mu, logvar, None, None, torch.float32)


def kl_divergence_value(mu, logvar, *args):
    """The KL: the first output of ``kl_divergence`` (same arguments), for the public
    API; at most SMALL_NUMEL latent elements against N(0, I), plain eager, on the
    PyTorch path, with its gradients computed in the backward (``_SmallKLFunction``)."""
    # (prior_mu, prior_logvar, reduction, lo, hi, free_bits, want_grad, want_prior_grad)
    if args[0] is None and args[1] is None and not args[5] and _eager(mu, logvar) \
            and mu.numel() <= _torch_impl.SMALL_NUMEL and _small_eager((mu, logvar)) \
            and not _half_kl_fused(mu, logvar):
        if args[6]:
            return _apply(_SmallKLFunction, 2, mu, logvar, *args[2:5])
        return _torch_impl.small_kl_value(mu, logvar, args[3], args[4],
                                          _numerics.compute_dtype(mu, logvar), args[2])[0]
    return kl_divergence(mu, logvar, *args)[0]
