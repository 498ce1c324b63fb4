"""The fused loss kernel (kernels/vae_loss.py), held to the PyTorch path and,
where a scale shared by both could hide, to tests/reference.py (float64, from the math).

Values and gradients through the public API for every recon x reduction x
beta, odd sizes, 4-D shapes, split reductions, non-contiguous and
mixed-precision inputs, logvar_clamp, the KL-only op, determinism, the eval
path and the core's input errors.
"""

import contextlib

import pytest
import reference as ref
import torch

import fastvae
from fastvae import kernels, ops

RECONS = ("mse", "l1", "bce", "bce_logits")
REDUCTIONS = ("sum", "batchmean", "mean", "none")
ULP_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def make_inputs(device, shape=(3, 5, 7), latent=(3, 6), recon="mse", dtype=torch.float32,
                x_dtype=None, mu_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if recon == "bce":  # probabilities, away from 0 and 1
        x_hat = torch.rand(shape, generator=g) * 0.98 + 0.01
    else:
        x_hat = torch.randn(shape, generator=g) * 2
    x = torch.rand(shape, generator=g)  # targets in [0, 1] suit every recon
    mu = torch.randn(latent, generator=g)
    logvar = torch.randn(latent, generator=g)
    mu_dtype = mu_dtype or dtype
    return (x_hat.to(device, dtype), x.to(device, x_dtype or dtype),
            mu.to(device, mu_dtype), logvar.to(device, mu_dtype))


def output_weights(reduction, batch, device, seed=1):
    """Random weights for (loss, recon, kl): scalars, or per sample for "none"."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, batch) if reduction == "none" else (3,)
    return (torch.randn(shape, generator=g) + 2.0).to(device).unbind(0)


def loss_and_grads(x_hat, x, mu, logvar, weights=None, **options):
    """(loss, recon, kl) and the gradients of sum(w_loss loss + w_recon recon + w_kl kl)
    with respect to x_hat, x, mu, logvar (all four require grad)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x_hat, x, mu, logvar)]
    parts = fastvae.vae_loss(*leaves, return_parts=True, **options)
    if weights is None:
        total = parts.loss.sum()
    else:
        total = sum((p * w).sum() for p, w in zip(parts, weights))
    return tuple(p.detach() for p in parts), torch.autograd.grad(total, leaves)


def assert_all_close(actual, expected, rtol=1e-5, atol=1e-5):
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def reference_loss_and_grads(x_hat, x, mu, logvar, weights=None, recon="mse", reduction="sum",
                             beta=1.0, logvar_clamp=None):
    """``loss_and_grads`` from tests/reference.py in float64 (gradients by autograd of the
    textbook formulas), independent of both backends and their shared reduction scales."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x_hat, x, mu, logvar)]
    parts = ref.vae_loss(*leaves, recon, float(beta), reduction, logvar_clamp)
    total = parts[0].sum() if weights is None else sum(
        (p * w.cpu().double()).sum() for p, w in zip(parts, weights))
    return tuple(p.detach() for p in parts), torch.autograd.grad(total, leaves)


def assert_matches_reference(actual, expected, rtol=1e-5, atol=1e-5):
    """Kernel results (any dtype and device) against float64 reference values."""
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a.detach().cpu().double(), e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("beta_kind", ["float", "tensor"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("recon", RECONS)
def test_matches_pytorch_path(backends, device, recon, reduction, beta_kind):
    inputs = make_inputs(device, recon=recon)
    beta = 0.7 if beta_kind == "float" else torch.tensor(0.7, device=device)
    weights = output_weights(reduction, 3, device)
    options = dict(recon=recon, reduction=reduction, beta=beta)
    k_parts, k_grads = backends.kernels(loss_and_grads, *inputs, weights, **options)
    t_parts, t_grads = backends.torch(loss_and_grads, *inputs, weights, **options)
    assert k_parts[0].dtype == torch.float32
    assert k_parts[0].shape == ((3,) if reduction == "none" else ())
    assert_all_close(k_parts, t_parts)
    assert_all_close(k_grads, t_grads)
    r_parts, r_grads = reference_loss_and_grads(*inputs, weights, **options)
    assert_matches_reference(k_parts, r_parts)
    assert_matches_reference(k_grads, r_grads)


@pytest.mark.parametrize("max_block,max_rows,max_iters", [(4, 1, 2), (8, 2, 1), (64, 4, 1)])
@pytest.mark.parametrize("recon,reduction", [("mse", "none"), ("bce_logits", "sum"),
                                             ("bce", "mean")])
def test_reduction_split_over_many_programs(backends, device, split, recon, reduction,
                                            max_block, max_rows, max_iters):
    # 4-D images and latents with odd sizes: partial blocks, partial row tiles,
    # several column chunks per row combined by the second stage
    inputs = make_inputs(device, shape=(3, 3, 5, 7), latent=(3, 4, 3, 3), recon=recon)
    weights = output_weights(reduction, 3, device)
    options = dict(recon=recon, reduction=reduction, beta=0.3)
    with split(max_block, max_rows, max_iters):
        k_parts, k_grads = backends.kernels(loss_and_grads, *inputs, weights, **options)
    t_parts, t_grads = backends.torch(loss_and_grads, *inputs, weights, **options)
    assert_all_close(k_parts, t_parts)
    assert_all_close(k_grads, t_grads)
    r_parts, r_grads = reference_loss_and_grads(*inputs, weights, **options)
    assert_matches_reference(k_parts, r_parts)
    assert_matches_reference(k_grads, r_grads)


def test_one_element_per_sample(backends, device):
    inputs = make_inputs(device, shape=(1, 1), latent=(1, 1))
    k = backends.kernels(loss_and_grads, *inputs, recon="l1", reduction="mean")
    t = backends.torch(loss_and_grads, *inputs, recon="l1", reduction="mean")
    assert_all_close(k[0], t[0])
    assert_all_close(k[1], t[1])


def test_non_contiguous_inputs_equal_contiguous(backends, device):
    g = torch.Generator().manual_seed(3)
    x_hat = torch.randn(4, 7, 5, generator=g).to(device).transpose(1, 2)  # (4, 5, 7)
    x = torch.rand(4, 5, 1, generator=g).to(device).expand(4, 5, 7)  # stride 0
    mu = torch.randn(4, 12, generator=g).to(device)[:, ::2]  # (4, 6), stride 2
    logvar = torch.randn(6, 4, generator=g).to(device).t()  # (4, 6)
    images = torch.randn(2, 3, 4, 5, generator=g).to(device)
    assert not any(t.is_contiguous() for t in (x_hat, x, mu, logvar))
    for recon in ("mse", "bce_logits"):
        weights = output_weights("none", 4, device)
        options = dict(recon=recon, reduction="none", beta=0.5)
        strided = backends.kernels(loss_and_grads, x_hat, x, mu, logvar, weights, **options)
        dense = backends.kernels(loss_and_grads, *(t.contiguous() for t in (x_hat, x, mu, logvar)),
                                 weights, **options)
        for a, b in zip(strided[0] + strided[1], dense[0] + dense[1]):
            assert torch.equal(a, b)
    # channels_last images
    cl = images.to(memory_format=torch.channels_last)
    latents = make_inputs(device, latent=(2, 3))[2:]
    a = backends.kernels(loss_and_grads, cl, cl.sigmoid(), *latents, recon="bce_logits")
    b = backends.kernels(loss_and_grads, images, images.sigmoid(), *latents, recon="bce_logits")
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(u, v)


@pytest.mark.parametrize("recon", RECONS)
@pytest.mark.parametrize("dtypes", [
    (torch.float16, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.bfloat16),  # autocast: model output bf16, data fp32
    (torch.float16, torch.bfloat16, torch.float32),
], ids=["fp16", "bf16", "bf16-x-fp32", "fp16-x-bf16-latents-fp32"])
def test_half_precision_and_mixed_dtypes(backends, device, recon, dtypes):
    x_hat_dtype, x_dtype, latent_dtype = dtypes
    inputs = make_inputs(device, shape=(3, 2, 4, 5), latent=(3, 2, 3, 3), recon=recon,
                         dtype=x_hat_dtype, x_dtype=x_dtype, mu_dtype=latent_dtype)
    for reduction in ("sum", "none"):
        options = dict(recon=recon, reduction=reduction, beta=0.5)
        k_parts, k_grads = backends.kernels(loss_and_grads, *inputs, **options)
        t_parts, t_grads = backends.torch(loss_and_grads, *inputs, **options)
        assert all(p.dtype == torch.float32 for p in k_parts)
        assert_all_close(k_parts, t_parts)
        # the half inputs, exactly as given, through the float64 formulas
        assert_matches_reference(k_parts, reference_loss_and_grads(*inputs, **options)[0])
        # Gradients are computed in float32 and rounded once to the input's dtype:
        # at most one unit in the last place apart (the interpreter truncates).
        # x's gradient for mse/l1 is -(x_hat's), so it carries x_hat's precision.
        rtols = [ULP_RTOL[t.dtype] for t in inputs]
        rtols[1] = max(rtols[0], rtols[1])
        for grad, want, t, rtol in zip(k_grads, t_grads, inputs, rtols):
            assert grad.dtype == t.dtype
            torch.testing.assert_close(grad.float(), want.float(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_logvar_clamp(backends, device, reduction):
    x_hat, x, mu, _ = make_inputs(device)
    logvar = torch.linspace(-6, 6, 18, device=device).reshape(3, 6)
    weights = output_weights(reduction, 3, device)
    options = dict(recon="mse", reduction=reduction, logvar_clamp=(-2.0, 3.0))
    k_parts, k_grads = backends.kernels(loss_and_grads, x_hat, x, mu, logvar, weights, **options)
    t_parts, t_grads = backends.torch(loss_and_grads, x_hat, x, mu, logvar, weights, **options)
    assert_all_close(k_parts, t_parts)
    assert_all_close(k_grads, t_grads)
    r_parts, r_grads = reference_loss_and_grads(x_hat, x, mu, logvar, weights, **options)
    assert_matches_reference(k_parts, r_parts)
    assert_matches_reference(k_grads, r_grads)
    clamped = (logvar < -2.0) | (logvar > 3.0)
    assert clamped.any() and (k_grads[3][clamped] == 0).all() and (k_grads[3][~clamped] != 0).all()


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf, floored
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # masked-out 0/0 in the interpreter
def test_extreme_values_stay_finite_and_match(backends, device):
    # bce at exactly 0 and 1 (logs floored at -100), bce_logits at +-60
    p = torch.tensor([[0.0, 1.0, 0.5, 1e-30], [1.0, 0.0, 0.25, 1 - 1e-7]], device=device)
    target = torch.tensor([[1.0, 0.0, 0.5, 1.0], [1.0, 0.0, 0.0, 0.0]], device=device)
    logits = torch.tensor([[60.0, -60.0, 0.0, 20.0], [-60.0, 60.0, 1e-3, -20.0]], device=device)
    latents = make_inputs(device, latent=(2, 3))[2:]
    for recon, x_hat in (("bce", p), ("bce_logits", logits)):
        k = backends.kernels(loss_and_grads, x_hat, target, *latents, recon=recon, reduction="none")
        t = backends.torch(loss_and_grads, x_hat, target, *latents, recon=recon, reduction="none")
        assert all(torch.isfinite(v).all() for v in k[0] + k[1])
        assert_all_close(k[0], t[0])
        assert_all_close(k[1], t[1])


def test_beta_tensor_forms(backends, device):
    inputs = make_inputs(device, recon="bce_logits")
    expected, _ = backends.torch(loss_and_grads, *inputs, recon="bce_logits", beta=0.25)
    # a beta on the data's device (float64 or float32) is read by the kernel; a CPU beta
    # is read on the host when the data is on CUDA (the cuda case; without a GPU,
    # test_cpu_beta_with_cuda_data_is_read_on_the_host checks that choice)
    for beta in (torch.tensor(0.25, dtype=torch.float64, device=device), torch.tensor(0.25)):
        parts, _ = backends.kernels(loss_and_grads, *inputs, recon="bce_logits", beta=beta)
        assert_all_close(parts, expected)
    # a learnable beta gets d loss / d beta = kl
    beta = torch.tensor(0.25, device=device, requires_grad=True)
    loss, _, kl = backends.kernels(fastvae.vae_loss, *inputs, recon="bce_logits", beta=beta,
                                   return_parts=True)
    (grad_beta,) = torch.autograd.grad(loss, beta)
    torch.testing.assert_close(grad_beta, kl.detach())


def test_cpu_beta_with_cuda_data_is_read_on_the_host():
    """Which beta the kernel reads (a pointer or a float), decided without a GPU."""
    from fastvae.kernels.vae_loss import _beta_arguments

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert _beta_arguments(torch.tensor(0.25, dtype=torch.float64), 0.0, cuda) == (None, 0.25)
    on_data = torch.tensor(0.5)
    assert _beta_arguments(on_data, 0.0, cpu) == (on_data, 0.0)
    assert _beta_arguments(None, 0.75, cuda) == (None, 0.75)


@pytest.mark.parametrize("clamp", [None, (-1.0, 0.5)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_divergence_matches_pytorch_path(backends, device, reduction, clamp):
    _, _, mu, logvar = make_inputs(device, latent=(5, 3, 3))
    w = output_weights(reduction, 5, device)[0]

    def kl_and_grads(mu, logvar):
        mu, logvar = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        kl = fastvae.kl_divergence(mu, logvar, reduction=reduction, logvar_clamp=clamp)
        return (kl.detach(), *torch.autograd.grad((kl * w).sum(), (mu, logvar)))

    k = backends.kernels(kl_and_grads, mu, logvar)
    assert_all_close(k, backends.torch(kl_and_grads, mu, logvar))
    mu64, logvar64 = (t.cpu().double().requires_grad_() for t in (mu, logvar))
    kl64 = ref.reduce(ref.kl_elementwise(mu64, logvar64, clamp), reduction)
    grads64 = torch.autograd.grad((kl64 * w.cpu().double()).sum(), (mu64, logvar64))
    assert_matches_reference(k, (kl64.detach(), *grads64))


def test_gaussian_posterior_kl_uses_the_kernels(backends, device, monkeypatch):
    params = torch.randn(2, 4, 3, 3, device=device)
    calls = []
    real = kernels.kl_forward
    monkeypatch.setattr(kernels, "kl_forward", lambda *a: calls.append(a) or real(*a))
    k = backends.kernels(lambda: fastvae.GaussianPosterior(params).kl())
    assert len(calls) == 1
    t = backends.torch(lambda: fastvae.GaussianPosterior(params).kl())
    torch.testing.assert_close(k, t)


def test_deterministic_bitwise(backends, device, split):
    inputs = make_inputs(device, shape=(3, 3, 5, 7), latent=(3, 4, 3, 3), recon="bce_logits")
    weights = output_weights("sum", 3, device)
    for forced in ((4, 1, 2), None):
        runs = []
        for _ in range(2):
            if forced is None:
                runs.append(backends.kernels(loss_and_grads, *inputs, weights, recon="bce_logits"))
            else:
                with split(*forced):
                    runs.append(backends.kernels(loss_and_grads, *inputs, weights,
                                                 recon="bce_logits"))
        (p1, g1), (p2, g2) = runs
        assert all(torch.equal(a, b) for a, b in zip(p1 + g1, p2 + g2))


def test_eval_path_writes_no_gradient(backends, device, monkeypatch):
    inputs = [t.requires_grad_() for t in make_inputs(device)]
    seen = []
    real = kernels.vae_loss_forward

    def spy(*args):
        out = real(*args)
        seen.append((args[-2:], [g.numel() for g in out[3:6]]))  # x_hat, mu, logvar
        return out

    monkeypatch.setattr(kernels, "vae_loss_forward", spy)
    with torch.no_grad():
        evaluated = backends.kernels(fastvae.vae_loss, *inputs, recon="mse")
    trained = backends.kernels(fastvae.vae_loss, *inputs, recon="mse")
    assert seen[0] == ((False, False), [0, 0, 0])
    assert seen[1] == ((True, True), [t.numel() for t in (inputs[0], inputs[2], inputs[3])])
    assert torch.equal(evaluated, trained.detach())


@pytest.mark.parametrize("case", ["last_use", "retain_graph", "output_held"])
def test_backward_reuses_the_gradient_buffer_only_when_nothing_else_sees_it(backends, device,
                                                                            case):
    """The op's saved gradient buffer is scaled in place and handed on as the
    gradient (no second full-size buffer) on its last use; kept intact when the
    graph is retained or a caller still holds the op's output."""
    x_hat, x, mu, logvar = (t.requires_grad_() for t in make_inputs(device))
    out = backends.kernels(ops.vae_loss_op, x_hat, x.detach(), mu, logvar, None, None, None,
                           None, 1.0, "mse", 0.0, False, "sum", None, None, 0.0, True, True,
                           False)
    loss, buffer_ptr, buffer_before = out[0], out[3].data_ptr(), out[3].clone()
    if case != "output_held":
        del out  # like vae_loss, which keeps no reference to the gradient buffers
    x_before = x_hat.detach().clone()
    (3.0 * loss).backward(retain_graph=case == "retain_graph")
    assert (x_hat.grad.data_ptr() == buffer_ptr) == (case == "last_use")
    torch.testing.assert_close(x_hat.grad, 3.0 * buffer_before)
    assert torch.equal(x_hat.detach(), x_before)  # inputs are never written
    if case == "output_held":
        assert torch.equal(out[3], buffer_before)
    if case == "retain_graph":  # the second backward still sees the unscaled buffer
        x_hat.grad = None
        (2.0 * loss).backward()
        torch.testing.assert_close(x_hat.grad, 2.0 * buffer_before)


def test_core_input_errors_still_raised():
    fastvae.set_backend("triton")  # restored after the test by tests/conftest.py
    x_hat, x, mu, logvar = make_inputs(torch.device("cpu"), recon="bce")
    with pytest.raises(ValueError, match="x_hat and x must have the same shape"):
        fastvae.vae_loss(x_hat, x[:, :4], mu, logvar)
    with pytest.raises(ValueError, match=r"x must hold targets in \[0, 1\]"):
        fastvae.vae_loss(x_hat, x + 1.0, mu, logvar, recon="bce")
    with pytest.raises(ValueError, match=r"x_hat must hold probabilities in \[0, 1\]"):
        fastvae.vae_loss(x_hat - 2.0, x, mu, logvar, recon="bce")
    with pytest.raises(ValueError, match="beta must be finite"):
        fastvae.vae_loss(x_hat, x, mu, logvar, beta=torch.tensor(float("nan")))
    with pytest.raises(TypeError, match="mu must be a float16, bfloat16, float32 or float64"):
        fastvae.vae_loss(x_hat, x, mu.long(), logvar)


def test_kernels_refuse_tensors_they_cannot_run_on():
    from fastvae.kernels import _shared

    with pytest.raises(RuntimeError, match="cannot run on meta tensors"):
        _shared.device_guard(torch.empty(2, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_gradient_in_place(backends, device, split, dtype):
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(3, 2, 5, 7, generator=g).to(device, dtype)
    cases = [torch.tensor(1.0), torch.tensor(2.5), torch.tensor([1.0, -0.3, 1.0]),
             torch.tensor([1.0, 1.0, 1.0])]
    for weight in cases:
        weight = weight.to(device)
        # multiplied in float32, rounded once to the gradient's dtype
        expected = (grad.float() * weight.reshape((-1, 1, 1, 1) if weight.dim() else ())).to(dtype)
        for forced in (None, (8, 2, 2)):
            buffer = grad.clone()
            if forced is None:
                out = backends.kernels(kernels.scale_gradient_, buffer, weight)
            else:
                with split(*forced):
                    out = backends.kernels(kernels.scale_gradient_, buffer, weight)
            assert out is buffer
            # one rounding to bf16, which the interpreter truncates: one unit in the last place
            torch.testing.assert_close(buffer, expected, rtol=ULP_RTOL[dtype], atol=0)


def test_scale_gradients_three_buffers_in_one_launch(backends, device, split, monkeypatch):
    """The loss backward's x_hat, mu and logvar gradients: different shapes, dtypes
    and weights (per sample and scalar), scaled in place by one launch."""
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(3, 2, 5, 7, generator=g).to(device, torch.bfloat16),
             torch.randn(3, 6, generator=g).to(device),
             torch.randn(3, 6, generator=g).to(device, torch.float16)]
    weights = [torch.tensor([1.0, -0.3, 2.0]), torch.tensor(1.0), torch.tensor(0.25)]
    weights = [w.to(device) for w in weights]
    expected = [(gr.float() * (w.reshape((-1,) + (1,) * (gr.dim() - 1)) if w.dim() else w)).to(gr.dtype)
                for gr, w in zip(grads, weights)]
    launches = []
    from fastvae.kernels import scale_gradients as module

    original = module._scale_gradients_kernel

    class Counting:  # counts grid launches of the scaling kernel
        def __getitem__(self, grid):
            launches.append(grid)
            return original[grid]

    monkeypatch.setattr(module, "_scale_gradients_kernel", Counting())
    for forced in (None, (8, 2, 2)):
        buffers = [gr.clone() for gr in grads]
        with split(*forced) if forced else contextlib.nullcontext():
            out = backends.kernels(kernels.scale_gradients_, list(zip(buffers, weights)))
        assert all(o is b for o, b in zip(out, buffers))
        for b, e in zip(buffers, expected):
            torch.testing.assert_close(b, e, rtol=ULP_RTOL[b.dtype], atol=0)
    assert len(launches) == 2  # one per call, not one per buffer
    with pytest.raises(ValueError, match="1 to 3 .* pairs, got 4"):
        kernels.scale_gradients_([(grads[1], weights[1])] * 4)
    with pytest.raises(ValueError, match=r"batch size 3 .* got grad \(2, 6\)"):
        kernels.scale_gradients_([(grads[1], weights[1]), (grads[2][:2], weights[2])])
    with pytest.raises(ValueError, match=r"weight \(2,\)"):
        kernels.scale_gradients_([(grads[1], weights[0][:2])])


def test_loss_backward_scales_all_gradients_in_one_launch(backends, device, monkeypatch):
    from fastvae.kernels import scale_gradients as module

    calls = []
    original = module.scale_gradients_
    monkeypatch.setattr(module, "scale_gradients_",
                        lambda pairs: calls.append(len(pairs)) or original(pairs))
    monkeypatch.setattr(kernels, "scale_gradients_", module.scale_gradients_)
    inputs = [t.requires_grad_() for t in make_inputs(device)]

    def fwd_bwd():
        loss = fastvae.vae_loss(*inputs, recon="mse", reduction="none")
        loss.backward(torch.full_like(loss, 0.5))

    backends.kernels(fwd_bwd)
    assert calls == [3]  # x_hat, mu and logvar gradients together
    x_hat, x, mu, logvar = (t.detach() for t in inputs)
    torch.testing.assert_close(inputs[0].grad, 0.5 * 2 * (x_hat - x))
    torch.testing.assert_close(inputs[2].grad, 0.5 * mu)
    torch.testing.assert_close(inputs[3].grad, 0.5 * 0.5 * torch.expm1(logvar))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_mixed_precision_backward_keeps_float64_gradients_exact(backends, device, reduction):
    """float32 x_hat with float64 latents: the latents' gradients are scaled in
    float64 (the PyTorch path), the x_hat gradient by the kernels, and a weight
    other than 1 must not round the float64 ones through float32."""
    x_hat, x, mu, logvar = make_inputs(device)
    mu, logvar = mu.double().requires_grad_(), logvar.double().requires_grad_()
    x_hat.requires_grad_()

    def fwd_bwd():
        loss = fastvae.vae_loss(x_hat, x, mu, logvar, recon="mse", reduction=reduction)
        loss.backward(torch.full_like(loss, 1.0 / 3.0))

    backends.kernels(fwd_bwd)
    torch.testing.assert_close(mu.grad, mu.detach() / 3.0, rtol=1e-12, atol=0)
    torch.testing.assert_close(logvar.grad, torch.expm1(logvar.detach()) / 6.0, rtol=1e-12, atol=0)
    torch.testing.assert_close(x_hat.grad, 2.0 * (x_hat.detach() - x) / 3.0, rtol=1e-6, atol=1e-6)


# ---- NaN propagates (issue 11, item 2) ---------------------------------------
#
# tl.maximum / tl.minimum return the other operand when one is NaN, so a clamp or
# a log floor written with them turns a NaN into a bound. torch.clamp keeps NaN:
# the kernels must give NaN where the PyTorch path does, in values and gradients.

NAN = float("nan")


def assert_same_with_nan(actual, expected):
    for a, e in zip(actual, expected):
        assert torch.equal(a.isnan(), e.isnan())
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_nan_logvar_under_the_clamp_gives_nan_loss_and_gradient(backends, device, reduction):
    x_hat, x, mu, logvar = make_inputs(device)
    logvar[1, 2] = NAN  # clamp(NaN) = NaN: KL, loss and d/dlogvar NaN there, nowhere else
    options = dict(recon="mse", reduction=reduction, logvar_clamp=(-30.0, 20.0))
    k_parts, k_grads = backends.kernels(loss_and_grads, x_hat, x, mu, logvar, **options)
    t_parts, t_grads = backends.torch(loss_and_grads, x_hat, x, mu, logvar, **options)
    loss, recon, kl = k_parts
    nan_rows = torch.tensor([False, True, False], device=device)
    if reduction == "none":
        assert torch.equal(kl.isnan(), nan_rows) and torch.equal(loss.isnan(), nan_rows)
    else:
        assert kl.isnan() and loss.isnan()
    assert torch.isfinite(recon).all()
    nan_at = torch.zeros_like(logvar, dtype=torch.bool)
    nan_at[1, 2] = True
    assert torch.equal(k_grads[3].isnan(), nan_at)
    assert torch.isfinite(k_grads[0]).all() and torch.isfinite(k_grads[2]).all()
    assert_same_with_nan(k_parts + k_grads, t_parts + t_grads)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_nan_logvar_under_the_clamp_gives_nan_kl(backends, device, reduction):
    _, _, mu, logvar = make_inputs(device, latent=(3, 4, 3))
    logvar[2, 1, 0] = NAN

    def kl_and_grads(mu, logvar):
        mu, logvar = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        kl = fastvae.kl_divergence(mu, logvar, reduction=reduction, logvar_clamp=(-30.0, 20.0))
        return (kl.detach(), *torch.autograd.grad(kl.sum(), (mu, logvar)))

    kl, grad_mu, grad_logvar = backends.kernels(kl_and_grads, mu, logvar)
    assert kl.isnan().any() and (not kl.isnan().all() if reduction == "none" else True)
    assert torch.equal(grad_logvar.isnan(), logvar.isnan())
    assert torch.isfinite(grad_mu).all()
    assert_same_with_nan((kl, grad_mu, grad_logvar), backends.torch(kl_and_grads, mu, logvar))


@pytest.mark.parametrize("recon", RECONS)
def test_nan_prediction_gives_nan_loss_and_gradient(backends, device, recon):
    """A NaN probability (or logit, or value) makes its sample's reconstruction
    and its gradient NaN. Called below the public API: on the CPU the value
    check would refuse a NaN probability first, on CUDA nothing does."""
    from fastvae import _torch_impl

    x_hat, x, mu, logvar = make_inputs(device, recon=recon)
    x_hat[0, 1, 3] = NAN
    for reduction in ("none", "sum"):
        args = (x_hat, x, mu, logvar, None, None, 1.0, recon, 0.0, False, reduction,
                None, None, True, True)
        loss, recon_value, kl, grad_x_hat, _, _, _ = backends.kernels(kernels.vae_loss_forward, *args)
        if reduction == "none":
            assert loss.isnan().tolist() == recon_value.isnan().tolist() == [True, False, False]
        else:
            assert loss.isnan() and recon_value.isnan()
        assert torch.isfinite(kl).all()
        # d/dx_hat: NaN at the NaN prediction (l1: sign(NaN) is 0, as torch.sign gives)
        assert torch.equal(grad_x_hat.isnan(), x_hat.isnan() if recon != "l1" else
                           torch.zeros_like(x_hat, dtype=torch.bool))
        if recon == "bce" and x_hat.device.type == "cpu":
            # the PyTorch path checks probabilities inside its loss pass on the CPU
            with pytest.raises(ValueError, match="x_hat must hold probabilities"):
                _torch_impl.vae_loss_forward(*args)
            continue
        expected = _torch_impl.vae_loss_forward(*args)
        assert_same_with_nan((loss, recon_value, kl, grad_x_hat), expected[:4])


@pytest.mark.parametrize("obs", ["none", "optimal", "scalar"])
def test_opcheck_with_the_kernels_and_mixed_dtypes(backends, device, obs):
    """The kernels' outputs have the dtypes and shapes of the op's fake implementation (a
    bfloat16 prediction with float32 latents included), so compiled graphs trace them right."""
    g = torch.Generator().manual_seed(3)
    x_hat = torch.randn(3, 8, generator=g).to(device, torch.bfloat16).requires_grad_()
    x = torch.randn(3, 8, generator=g).to(device)
    mu = torch.randn(3, 4, generator=g).to(device).requires_grad_()
    logvar = torch.randn(3, 4, generator=g).to(device).requires_grad_()
    recon = "mse" if obs == "none" else "gaussian"
    obs_logvar = torch.tensor([0.3], device=device, requires_grad=True) if obs == "scalar" else None
    backends.kernels(torch.library.opcheck, ops.vae_loss_op,
                     ops.LossInputs(x_hat, x, mu, logvar, None, obs_logvar, None, None, 1.0, recon, 0.0,
                                    obs == "optimal", "sum", None, None, 0.0, True, True, False))


@pytest.mark.parametrize("part", ["prior", "obs_logvar"])
def test_broadcast_bfloat16_gradients_are_summed_in_float32(backends, device, part):
    """A (d,) prior's and a per-channel obs_logvar's gradient buffers are float32 for
    bfloat16 inputs (the kernel writes what the backward sums over the broadcast dims):
    the sum is rounded once, within half a bfloat16 ulp of the exact one (bfloat16
    buffers put each term's rounding into it: 196 ulps off where the terms cancel)."""
    g = torch.Generator().manual_seed(0)
    if part == "prior":
        mu = torch.randn(64, 8, generator=g).to(device, torch.bfloat16)
        lv = torch.randn(64, 8, generator=g).to(device, torch.bfloat16)
        pm = torch.zeros(8, device=device, dtype=torch.bfloat16, requires_grad=True)
        plv = torch.full((8,), -3.0, device=device, dtype=torch.bfloat16, requires_grad=True)
        got = backends.kernels(lambda: torch.autograd.grad(
            fastvae.kl_divergence(mu, lv, prior_mu=pm, prior_logvar=plv), (pm,))[0])
        exact = (-mu.double() * torch.exp(-plv.detach().double())).sum(0)
    else:
        s = torch.tensor([-0.5, 0.5], device=device).reshape(1, 2, 1).to(torch.bfloat16)
        s.requires_grad_()
        x_hat = torch.randn(32, 2, 8, generator=g).to(device)
        x = x_hat + torch.exp(0.5 * s.detach().float()) * torch.randn(32, 2, 8, generator=g).to(device)
        x_hat, x = x_hat.to(torch.bfloat16), x.to(torch.bfloat16)
        zeros = torch.zeros(32, 2, device=device, dtype=torch.bfloat16)
        got = backends.kernels(lambda: torch.autograd.grad(fastvae.vae_loss(
            x_hat, x, zeros, zeros, recon="gaussian", obs_logvar=s), (s,))[0])
        err = (x_hat.double() - x.double()) ** 2
        exact = (0.5 * (1 - err * torch.exp(-s.detach().double()))).sum(dim=(0, 2), keepdim=True)
    spacing = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(exact.abs())))
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() / spacing).max().item() <= 0.6
