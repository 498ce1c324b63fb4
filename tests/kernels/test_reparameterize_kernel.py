"""The fused reparameterization kernels (kernels/reparameterize.py).

The kernels draw their noise with Triton's Philox generator, so z differs
from the PyTorch path's; they are held to the definition instead: eps
recovered as (z - mu) / std must be standard normal, the gradients must be
those of mu + std * eps with that eps (the backward regenerates it), and the
KL must equal the PyTorch path's.
"""

import math

import pytest
import reference as ref
import scipy.stats
import torch

import fastvae
from fastvae import kernels, ops

ULP_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def latents(device, shape=(5, 2, 3, 3), dtype=torch.float32, lv_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g)
    logvar = torch.randn(shape, generator=g)
    return mu.to(device, dtype), logvar.to(device, lv_dtype or dtype)


def seed_tensor(value, device):
    """A seed as the kernels take it: a 1-element int64 tensor on the data's device."""
    return torch.tensor([value], dtype=torch.int64, device=device)


def test_samples_are_normal(backends, device):
    mu, logvar = latents(device, shape=(64, 128))
    z = backends.kernels(fastvae.reparameterize, mu, logvar,
                         generator=torch.Generator().manual_seed(11))
    eps = ((z - mu) / torch.exp(0.5 * logvar)).flatten().double().cpu()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)  # 5 standard errors
    assert abs(eps.std().item() - 1) < 5 * math.sqrt(0.5 / n)
    assert scipy.stats.kstest(eps.numpy(), "norm").pvalue > 1e-3
    # neighbouring elements are independent draws
    assert abs(torch.corrcoef(torch.stack([eps[:-1], eps[1:]]))[0, 1].item()) < 5 / math.sqrt(n)


def test_noise_mean_and_std_on_a_million_draws(backends, device):
    """2^20 draws in four wide rows (four programs under the interpreter): mean 0 and
    std 1 to within 5 standard errors, so a noise scaled by 1.01 (14 of them) fails."""
    mu, logvar = latents(device, shape=(4, 1 << 18))
    z = backends.kernels(fastvae.reparameterize, mu, logvar,
                         generator=torch.Generator().manual_seed(12))
    ref.assert_standard_normal((z - mu).double() / torch.exp(0.5 * logvar.double()))


def test_scale_and_shift(backends, device):
    mu = torch.full((4096, 1), 3.0, device=device)
    logvar = torch.full((4096, 1), math.log(4.0), device=device)
    z = backends.kernels(fastvae.reparameterize, mu, logvar,
                         generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 3.0) < 5 * 2.0 / math.sqrt(4096)
    assert abs(z.std().item() - 2.0) < 5 * 2.0 * math.sqrt(0.5 / 4096)


def test_reproducible_with_generator_and_fresh_without(backends, device):
    mu, logvar = latents(device)

    def draw(seed=None):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return fastvae.reparameterize(mu, logvar, generator=gen)

    a, b, c = (backends.kernels(draw, s) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d, e = backends.kernels(draw), backends.kernels(draw)
    torch.manual_seed(3)
    f = backends.kernels(draw)
    assert torch.equal(d, f) and not torch.equal(d, e)


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5, 2**62 - 1])
def test_any_seed_up_to_2_to_the_62(backends, device, seed):
    mu, logvar = latents(device)
    def draw(value):
        return backends.kernels(kernels.reparameterize_forward, mu, logvar,
                                seed_tensor(value, device), None, None, False)[0]

    z1, z2, other = draw(seed), draw(seed), draw(seed ^ 1)
    assert torch.equal(z1, z2) and not torch.equal(z1, other)
    assert torch.isfinite(z1).all()


@pytest.mark.parametrize("with_kl,clamp", [(False, None), (True, None), (True, (-0.5, 0.8))])
def test_gradients_follow_the_regenerated_noise(backends, device, with_kl, clamp):
    mu, logvar = latents(device)
    mu.requires_grad_()
    logvar.requires_grad_()
    g = torch.Generator().manual_seed(5)
    grad_z = torch.randn(mu.shape, generator=g).to(device)
    grad_kl = torch.randn(mu.shape[0], generator=g).to(device)

    def run():
        gen = torch.Generator().manual_seed(1)
        if with_kl:
            z, kl = fastvae.sample_and_kl(mu, logvar, generator=gen, logvar_clamp=clamp)
            total = (z * grad_z).sum() + (kl * grad_kl).sum()
        else:
            z, kl = fastvae.reparameterize(mu, logvar, generator=gen), None
            total = (z * grad_z).sum()
        return z, kl, torch.autograd.grad(total, (mu, logvar))

    z, kl, (grad_mu, grad_logvar) = backends.kernels(run)
    lv = logvar.detach() if clamp is None else logvar.detach().clamp(*clamp)
    std_eps = z.detach() - mu.detach()  # = exp(lv / 2) * eps, up to rounding
    expected_mu = grad_z.clone()
    expected_lv = 0.5 * grad_z * std_eps
    if with_kl:
        per_sample = grad_kl.reshape(-1, 1, 1, 1)
        expected_mu += per_sample * mu.detach()
        expected_lv += per_sample * 0.5 * (torch.exp(lv) - 1)
        kl_ref = backends.torch(fastvae.kl_divergence, mu.detach(), logvar.detach(),
                                reduction="none", logvar_clamp=clamp)
        torch.testing.assert_close(kl, kl_ref)
        kl64 = ref.per_sample(ref.kl_elementwise(mu.detach().cpu(), logvar.detach().cpu(), clamp))
        torch.testing.assert_close(kl.cpu().double(), kl64, rtol=1e-5, atol=1e-5)
    if clamp is not None:
        clamped = (logvar.detach() < clamp[0]) | (logvar.detach() > clamp[1])
        assert clamped.any() and (grad_logvar[clamped] == 0).all()
        expected_lv[clamped] = 0.0
    torch.testing.assert_close(grad_mu, expected_mu)
    torch.testing.assert_close(grad_logvar, expected_lv, rtol=1e-5, atol=1e-5)


def test_noise_does_not_depend_on_tile_sizes(backends, device, split):
    mu, logvar = latents(device, shape=(3, 5, 7))
    grad_z, grad_kl = torch.randn_like(mu), torch.randn(3, device=device)

    seed = seed_tensor(99, device)

    def run():
        z, kl = kernels.reparameterize_forward(mu, logvar, seed, -1.0, 1.0, True)
        grads = kernels.reparameterize_backward(grad_z, grad_kl, mu, logvar, seed, -1.0, 1.0)
        return z, kl, *grads

    default = backends.kernels(run)
    with split(4, 2, 2):  # several programs per row, two rows per tile, partial tiles
        tiny = backends.kernels(run)
    for name, a, b in zip(("z", "kl", "grad_mu", "grad_logvar"), default, tiny):
        if name == "kl":  # a sum: same terms, other order
            torch.testing.assert_close(a, b)
        else:  # elementwise: bitwise
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtypes", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
], ids=["fp16", "bf16", "bf16-fp32", "fp16-bf16"])
def test_half_precision(backends, device, dtypes):
    mu, logvar = latents(device, dtype=dtypes[0], lv_dtype=dtypes[1])
    z_dtype = torch.promote_types(*dtypes)
    # eps depends only on (seed, element index): recover it from a float32 run
    seed = seed_tensor(42, device)
    z32, _ = backends.kernels(kernels.reparameterize_forward, mu.float(), logvar.float(), seed,
                              None, None, False)
    std = torch.exp(0.5 * logvar.float())
    eps = (z32 - mu.float()) / std
    z, kl = backends.kernels(kernels.reparameterize_forward, mu, logvar, seed, None, None, True)
    assert z.dtype == z_dtype and kl.dtype == torch.float32
    # math in float32, one rounding to z's dtype (the interpreter truncates: 1 ulp)
    torch.testing.assert_close(z.float(), mu.float() + std * eps, rtol=ULP_RTOL[z_dtype],
                               atol=1e-5)
    kl_ref = backends.torch(fastvae.kl_divergence, mu, logvar, reduction="none")
    torch.testing.assert_close(kl, kl_ref)
    torch.testing.assert_close(kl.cpu().double(), ref.per_sample(ref.kl_elementwise(mu.cpu(), logvar.cpu())),
                               rtol=1e-5, atol=1e-5)
    grad_z = torch.randn(mu.shape, device=device).to(z_dtype)
    grad_mu, grad_logvar = backends.kernels(kernels.reparameterize_backward, grad_z, None, mu,
                                            logvar, seed, None, None)
    assert grad_mu.dtype == mu.dtype and grad_logvar.dtype == logvar.dtype
    torch.testing.assert_close(grad_mu.float(), grad_z.float(), rtol=ULP_RTOL[mu.dtype], atol=0)
    torch.testing.assert_close(grad_logvar.float(), 0.5 * grad_z.float() * std * eps,
                               rtol=ULP_RTOL[logvar.dtype], atol=1e-5)


def test_non_contiguous_inputs_equal_contiguous(backends, device):
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(4, 14, generator=g).to(device)[:, ::2]  # stride 2
    logvar = torch.randn(7, 4, generator=g).to(device).t()  # transposed
    grad_z = torch.randn(7, 4, generator=g).to(device).t()
    assert not any(t.is_contiguous() for t in (mu, logvar, grad_z))

    def run(mu, logvar, grad_z):
        seed = seed_tensor(5, device)
        z, kl = kernels.reparameterize_forward(mu, logvar, seed, None, None, True)
        return (z, kl, *kernels.reparameterize_backward(grad_z, kl * 0 + 1, mu, logvar, seed,
                                                        None, None))

    strided = backends.kernels(run, mu, logvar, grad_z)
    dense = backends.kernels(run, mu.contiguous(), logvar.contiguous(), grad_z.contiguous())
    assert all(torch.equal(a, b) for a, b in zip(strided, dense))


def test_nothing_noise_sized_is_saved_for_backward(backends, device):
    mu, logvar = latents(device)
    mu.requires_grad_()
    logvar.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z, kl = backends.kernels(fastvae.sample_and_kl, mu, logvar)
    assert sorted(t.numel() for t in saved) == [1, mu.numel(), logvar.numel()]  # mu, logvar, seed
    (seed,) = [t for t in saved if t.dtype == torch.int64]
    # the seed: a tiny tensor on the data's device (no host copy to keep in sync)
    assert seed.shape == (1,) and seed.device == mu.device


def test_gaussian_posterior_samples_through_the_kernels(backends, device, monkeypatch):
    params = torch.randn(2, 6, 3, 3, device=device)
    calls = []
    real = kernels.reparameterize_forward
    monkeypatch.setattr(kernels, "reparameterize_forward", lambda *a: calls.append(a) or real(*a))
    posterior = fastvae.GaussianPosterior(params)
    z = backends.kernels(posterior.sample, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    # the posterior's own mean and logvar, drawn with the same seed
    direct = backends.kernels(fastvae.reparameterize, posterior.mean, posterior.logvar,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, direct)


def test_opcheck_with_the_kernels(backends, device):
    mu, logvar = latents(device, shape=(3, 5))
    mu.requires_grad_()
    logvar.requires_grad_()
    seed = seed_tensor(1234, device)
    backends.kernels(torch.library.opcheck, ops.reparameterize_op,
                     (mu, logvar, None, None, seed, -1.0, 1.0, True, 0))
    backends.kernels(torch.library.opcheck, ops.reparameterize_backward_op,
                     (torch.randn(3, 5, device=device), torch.randn(3, device=device),
                      mu.detach(), logvar.detach(), None, None, seed, -1.0, 1.0))


def test_core_input_errors_still_raised():
    fastvae.set_backend("triton")  # restored after the test by tests/conftest.py
    mu, logvar = latents(torch.device("cpu"))
    with pytest.raises(ValueError, match="mu and logvar must have the same shape"):
        fastvae.sample_and_kl(mu, logvar[:, :1])
    with pytest.raises(ValueError, match="logvar_clamp must satisfy lo <= hi"):
        fastvae.sample_and_kl(mu, logvar, logvar_clamp=(1.0, -1.0))
    with pytest.raises(TypeError, match="logvar must be a float16, bfloat16, float32 or float64"):
        fastvae.reparameterize(mu, logvar.to(torch.complex64))


def test_nan_logvar_under_the_clamp_gives_nan_sample_kl_and_gradient(backends, device):
    """torch.clamp keeps NaN (tl.maximum / tl.minimum would return the bound): z,
    the KL and d/dlogvar are NaN exactly where the PyTorch path has them."""
    mu, logvar = latents(device, shape=(3, 4))
    logvar[1, 2] = float("nan")
    mu.requires_grad_()
    logvar.requires_grad_()
    g = torch.Generator().manual_seed(5)
    grad_z = torch.randn(mu.shape, generator=g).to(device)
    grad_kl = torch.randn(mu.shape[0], generator=g).to(device)

    def run():
        z, kl = fastvae.sample_and_kl(mu, logvar, generator=torch.Generator().manual_seed(1),
                                      logvar_clamp=(-30.0, 20.0))
        total = (z * grad_z).sum() + (kl * grad_kl).sum()
        return (z.detach(), kl.detach(), *torch.autograd.grad(total, (mu, logvar)))

    z, kl, grad_mu, grad_logvar = backends.kernels(run)
    nan_at = logvar.detach().isnan()
    assert torch.equal(z.isnan(), nan_at)
    assert kl.isnan().tolist() == [False, True, False]
    assert torch.equal(grad_logvar.isnan(), nan_at) and torch.isfinite(grad_mu).all()
    for a, b in zip((z, kl, grad_mu, grad_logvar), backends.torch(run)):
        assert torch.equal(a.isnan(), b.isnan())
    # the values that are not NaN do not depend on the NaN (the noise differs between
    # the backends, so z and d/dlogvar are not compared)
    t_kl, t_grad_mu = backends.torch(run)[1:3]
    torch.testing.assert_close(kl, t_kl, equal_nan=True)
    torch.testing.assert_close(grad_mu, t_grad_mu)
