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

Noise for the reparameterization is drawn from an integer seed (a 0-dim int64
CPU tensor, an op input so that it may be symbolic under compile); its
backward is its own op that regenerates the noise from the same seed, so no
noise-sized tensor is saved.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastvae import _dispatch, _numerics, _torch_impl, _validate
from fastvae._grad_scaling import (
    in_torch_dispatch_mode,
    per_sample_view,
    saved_tensor_hooks_active,
    scale_gradients,
)

# ---- fastvae::vae_loss --------------------------------------------------


def _vae_loss_impl(
    x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor,
    beta: Optional[Tensor], beta_value: float,
    recon: str, reduction: str,
    clamp_lo: Optional[float], clamp_hi: Optional[float],
    grad_recon: bool, grad_kl: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, recon, kl, d recon/d x_hat, d kl/d mu, d kl/d logvar)."""
    _validate.check_loss_values(x_hat, x, recon, beta)
    impl = _dispatch.implementation(x_hat, x, mu, logvar)
    return impl.vae_loss_forward(x_hat, x, mu, logvar, beta, beta_value, recon, reduction,
                                 clamp_lo, clamp_hi, grad_recon, grad_kl)


vae_loss_op = torch.library.custom_op("fastvae::vae_loss", mutates_args=())(_vae_loss_impl)


_out_dtype = _numerics.compute_dtype  # float32, or float64 for float64 inputs


def _grad_buffer(t, wanted):
    dtype = _numerics.grad_buffer_dtype(t.dtype)
    return torch.empty(t.shape, dtype=dtype, device=t.device) if wanted else t.new_empty(0)


@vae_loss_op.register_fake
def _(x_hat, x, mu, logvar, beta, beta_value, recon, reduction, clamp_lo, clamp_hi,
      grad_recon, grad_kl):
    dtype = _out_dtype(x_hat, x, mu, logvar)
    shape = (x_hat.shape[0],) if reduction == "none" else ()
    values = [x_hat.new_empty(shape, dtype=dtype) for _ in range(3)]
    return (*values, _grad_buffer(x_hat, grad_recon),
            _grad_buffer(mu, grad_kl), _grad_buffer(logvar, grad_kl))


def _refuse_double_backward(op):
    """The saved gradients are constants to autograd, so a second derivative
    through them would silently be zero: refuse it instead."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() \
            and not in_torch_dispatch_mode():
        raise RuntimeError(
            f"fastvae.{op} does not support double backward (create_graph=True): its "
            f"gradient is computed in the forward pass and has no gradient of its own")


def _vae_loss_setup(ctx, inputs, output):
    x_hat, x, mu, logvar, beta, beta_value, recon, reduction, clamp_lo, clamp_hi, _, _ = inputs
    _, _, kl, g_xhat, g_mu, g_lv = output
    ctx.mark_non_differentiable(g_xhat, g_mu, g_lv)
    # unused outputs (the gradient buffers; recon/kl when only the loss is used)
    # get None, not a zero-filled tensor as large as the input
    ctx.set_materialize_grads(False)
    ctx.recon, ctx.reduction, ctx.beta_value = recon, reduction, beta_value
    ctx.hooked = saved_tensor_hooks_active()
    ctx.dtypes = (x_hat.dtype, x.dtype, mu.dtype, logvar.dtype)
    # x_hat only where the rare bce target gradient needs it: saving it otherwise
    # would keep the decoder's output alive until the backward; the gradient
    # buffers as detached aliases, so the backward can tell whether the outputs
    # themselves are still held
    target_grad_needs_x_hat = x.requires_grad and recon in ("bce", "bce_logits")
    ctx.save_for_backward(x_hat if target_grad_needs_x_hat else None, beta, kl,
                          g_xhat.detach(), g_mu.detach(), g_lv.detach())


def _sum_present(*grads):
    """Sum of the output gradients autograd passed; None (output unused) counts as zero."""
    present = [g for g in grads if g is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else sum(present[1:], present[0])


def _vae_loss_backward(ctx, g_loss, g_recon, g_kl, *_):
    _refuse_double_backward("vae_loss")
    x_hat, beta, kl, g_xhat, g_mu, g_lv = ctx.saved_tensors
    xhat_dtype, x_dtype, mu_dtype, lv_dtype = ctx.dtypes
    need = ctx.needs_input_grad
    grads = [None] * 12
    w_recon = _sum_present(g_loss, g_recon)
    if g_loss is not None:
        beta_c = ctx.beta_value if beta is None else beta.to(g_loss.dtype)
        g_loss_kl = g_loss * beta_c
    w_kl = _sum_present(None if g_loss is None else g_loss_kl, g_kl)

    if need[4] and g_loss is not None:
        grads[4] = (g_loss * kl).sum().to(device=beta.device, dtype=beta.dtype)
    if w_recon is None:
        need = (False, False) + tuple(need[2:])
    if w_kl is None:
        need = tuple(need[:2]) + (False, False)
    if need[1] and ctx.recon not in ("mse", "l1"):
        grads[1] = _target_grad(ctx, x_hat, per_sample_view(w_recon, g_xhat)).to(x_dtype)
    want_xhat = need[0] or (need[1] and grads[1] is None)
    grad_xhat, grad_mu, grad_lv = scale_gradients(ctx, [
        (g_xhat, w_recon) if want_xhat else None,
        (g_mu, w_kl) if need[2] else None,
        (g_lv, w_kl) if need[3] else None])
    if want_xhat:
        if need[1] and grads[1] is None:  # mse, l1: d/dx = -d/dx_hat
            grads[1] = grad_xhat.neg().to(x_dtype)
        if need[0]:
            grads[0] = grad_xhat.to(xhat_dtype)
    if need[2]:
        grads[2] = grad_mu.to(mu_dtype)
    if need[3]:
        grads[3] = grad_lv.to(lv_dtype)
    return tuple(grads)


def _target_grad(ctx, x_hat, w):
    """d loss / d x for bce and bce_logits (rarely needed: targets seldom require grad)."""
    dtype = _out_dtype(x_hat)
    scale = _numerics.reduction_scale(ctx.reduction, x_hat.shape[0], x_hat.numel())
    return _torch_impl.recon_grad_wrt_target(x_hat, ctx.recon, dtype) * (w * scale)


vae_loss_op.register_autograd(_vae_loss_backward, setup_context=_vae_loss_setup)


# ---- fastvae::kl_divergence ---------------------------------------------


def _kl_divergence_impl(
    mu: Tensor, logvar: Tensor, reduction: str,
    clamp_lo: Optional[float], clamp_hi: Optional[float], want_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(kl, d kl/d mu, d kl/d logvar)."""
    impl = _dispatch.implementation(mu, logvar)
    return impl.kl_forward(mu, logvar, reduction, clamp_lo, clamp_hi, want_grad)


kl_divergence_op = torch.library.custom_op("fastvae::kl_divergence", mutates_args=())(
    _kl_divergence_impl)


@kl_divergence_op.register_fake
def _(mu, logvar, reduction, clamp_lo, clamp_hi, want_grad):
    shape = (mu.shape[0],) if reduction == "none" else ()
    return (mu.new_empty(shape, dtype=_out_dtype(mu, logvar)),
            _grad_buffer(mu, want_grad), _grad_buffer(logvar, want_grad))


def _kl_setup(ctx, inputs, output):
    _, g_mu, g_lv = output
    ctx.mark_non_differentiable(g_mu, g_lv)
    ctx.set_materialize_grads(False)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.hooked = saved_tensor_hooks_active()
    ctx.save_for_backward(g_mu.detach(), g_lv.detach())


def _kl_backward(ctx, g_kl, *_):
    _refuse_double_backward("kl_divergence")
    g_mu, g_lv = ctx.saved_tensors
    grads = [None] * 6
    if g_kl is None:
        return tuple(grads)
    need = ctx.needs_input_grad
    scaled = scale_gradients(ctx, [(g, g_kl) if need[i] else None
                                for i, g in enumerate((g_mu, g_lv))])
    for i, (g, dtype) in enumerate(zip(scaled, ctx.dtypes)):
        if g is not None:
            grads[i] = g.to(dtype)
    return tuple(grads)


kl_divergence_op.register_autograd(_kl_backward, setup_context=_kl_setup)


# ---- fastvae::reparameterize --------------------------------------------


def _reparameterize_impl(
    mu: Tensor, logvar: Tensor, seed: Tensor,
    clamp_lo: Optional[float], clamp_hi: Optional[float], with_kl: bool,
) -> Tuple[Tensor, Tensor]:
    """(z, per-sample kl or an empty tensor)."""
    impl = _dispatch.implementation(mu, logvar)
    return impl.reparameterize_forward(mu, logvar, int(seed), clamp_lo, clamp_hi, with_kl)


reparameterize_op = torch.library.custom_op("fastvae::reparameterize", mutates_args=())(
    _reparameterize_impl)


@reparameterize_op.register_fake
def _(mu, logvar, seed, clamp_lo, clamp_hi, with_kl):
    z = torch.empty(mu.shape, dtype=torch.promote_types(mu.dtype, logvar.dtype), device=mu.device)
    dtype = _out_dtype(mu, logvar)
    kl = mu.new_empty((mu.shape[0],) if with_kl else (0,), dtype=dtype)
    return z, kl


def _reparameterize_backward_impl(
    grad_z: Tensor, grad_kl: Optional[Tensor], mu: Tensor, logvar: Tensor, seed: Tensor,
    clamp_lo: Optional[float], clamp_hi: Optional[float],
) -> Tuple[Tensor, Tensor]:
    """(grad_mu, grad_logvar), with the noise regenerated from ``seed``."""
    impl = _dispatch.implementation(mu, logvar)
    return impl.reparameterize_backward(grad_z, grad_kl, mu, logvar, int(seed), clamp_lo, clamp_hi)


reparameterize_backward_op = torch.library.custom_op(
    "fastvae::reparameterize_backward", mutates_args=())(_reparameterize_backward_impl)


@reparameterize_backward_op.register_fake
def _(grad_z, grad_kl, mu, logvar, seed, clamp_lo, clamp_hi):
    return (torch.empty(mu.shape, dtype=mu.dtype, device=mu.device),
            torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device))


def _reparameterize_setup(ctx, inputs, output):
    mu, logvar, seed, clamp_lo, clamp_hi, with_kl = inputs
    ctx.clamp, ctx.with_kl = (clamp_lo, clamp_hi), with_kl
    ctx.save_for_backward(mu, logvar, seed)


def _reparameterize_grads(ctx, grad_z, grad_kl, run_backward):
    mu, logvar, seed = ctx.saved_tensors
    grad_mu, grad_logvar = run_backward(
        grad_z, grad_kl if ctx.with_kl else None, mu, logvar, seed, *ctx.clamp)
    need = ctx.needs_input_grad
    return (grad_mu if need[0] else None, grad_logvar if need[1] else None,
            None, None, None, None)


def _reparameterize_backward(ctx, grad_z, grad_kl):
    # the backward is its own op, so that compile traces it with a symbolic seed
    return _reparameterize_grads(ctx, grad_z, grad_kl, reparameterize_backward_op)


reparameterize_op.register_autograd(_reparameterize_backward, setup_context=_reparameterize_setup)


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
    transform, tensor subclass or meta tensor (those need the custom ops' fake impls)."""
    return not (torch.compiler.is_compiling() or in_torch_dispatch_mode() or _functorch_active()
                or any(type(t) not in _PLAIN_TENSORS or t.is_meta for t in tensors if t is not None))


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


def _reparameterize_eager_backward(ctx, grad_z, grad_kl):
    # the Triton backward is not differentiable: refuse, as the custom op does
    _refuse_double_backward("reparameterize")
    return _reparameterize_grads(ctx, grad_z, grad_kl, _reparameterize_backward_impl)


_VAELossFunction = _function("_VAELossFunction", _vae_loss_impl, _vae_loss_setup,
                             _vae_loss_backward)
_KLDivergenceFunction = _function("_KLDivergenceFunction", _kl_divergence_impl, _kl_setup,
                                  _kl_backward)
_ReparameterizeFunction = _function("_ReparameterizeFunction", _reparameterize_impl,
                                    _reparameterize_setup, _reparameterize_eager_backward)


# An eager call that no gradient can flow through (no input requires grad, or grad
# mode is off) runs the implementation alone: what autograd.Function.apply and the
# setup would add (~20 us) builds nothing that is used.


def vae_loss(x_hat, x, mu, logvar, *args):
    """``vae_loss_op`` (same arguments), from the cheapest entry point that is correct here."""
    beta = args[0]
    if _eager(x_hat, x, mu, logvar, beta):
        # args[-2:]: grad_recon, grad_kl (grad mode and requires_grad already folded in)
        if not (args[-2] or args[-1] or (beta is not None and beta.requires_grad
                                         and torch.is_grad_enabled())):
            return _vae_loss_impl(x_hat, x, mu, logvar, *args)
        return _VAELossFunction.apply(x_hat, x, mu, logvar, *args)
    return vae_loss_op(x_hat, x, mu, logvar, *args)


def kl_divergence(mu, logvar, *args):
    """``kl_divergence_op`` (same arguments), from the cheapest correct entry point."""
    if _eager(mu, logvar):
        if not args[-1]:  # want_grad
            return _kl_divergence_impl(mu, logvar, *args)
        return _KLDivergenceFunction.apply(mu, logvar, *args)
    return kl_divergence_op(mu, logvar, *args)


def reparameterize(mu, logvar, seed, *args):
    """``reparameterize_op`` (same arguments), from the cheapest correct entry point."""
    if _eager(mu, logvar, seed):
        if not (torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad)):
            return _reparameterize_impl(mu, logvar, seed, *args)
        return _ReparameterizeFunction.apply(mu, logvar, seed, *args)
    return reparameterize_op(mu, logvar, seed, *args)
