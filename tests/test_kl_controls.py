"""Issue 15 items 4-6: free bits, a diagonal Gaussian prior and several samples per
reparameterization, on both backend settings, against tests/reference.py (float64,
from the math) and torch.distributions."""

import math

import pytest
import reference as ref
import torch
from backends import CPU_BACKENDS, NEEDS_INTERPRETER
from torch.distributions import Normal
from torch.distributions import kl_divergence as dist_kl

import fastvae
from fastvae import ops

BACKENDS = CPU_BACKENDS  # triton: the kernels where they serve the call
REDUCTIONS = ("sum", "batchmean", "mean")
X_SHAPE, Z_SHAPE = (4, 6), (4, 2, 3)

# prior layouts: none, mean only, log-variance only, a learned (d,) prior over the
# trailing latent dims, a per-sample conditional prior, one broadcast over the batch
PRIORS = {
    "none": lambda g: (None, None),
    "mean_only": lambda g: (torch.randn(3, generator=g), None),
    "logvar_only": lambda g: (None, torch.randn(3, generator=g)),
    "learned": lambda g: (torch.randn(3, generator=g), torch.randn(3, generator=g)),
    "per_sample": lambda g: (torch.randn(Z_SHAPE, generator=g), torch.randn(Z_SHAPE, generator=g)),
    "batch_broadcast": lambda g: (torch.randn(1, 2, 3, generator=g),
                                  torch.randn(2, 1, generator=g)),
}


def make(prior="learned", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_hat = torch.randn(X_SHAPE, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    x = torch.randn(X_SHAPE, generator=g, dtype=torch.float64).to(dtype)
    mu = torch.randn(Z_SHAPE, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    logvar = torch.randn(Z_SHAPE, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    pm, plv = PRIORS[prior](g)
    pm, plv = (None if p is None else p.to(dtype).requires_grad_() for p in (pm, plv))
    return x_hat, x, mu, logvar, pm, plv


def present(*tensors):
    return [t for t in tensors if t is not None]


def reference_kl(mu, logvar, pm, plv, free_bits, reduction, clamp=None):
    elementwise = ref.kl_elementwise_prior(mu, logvar, pm, plv, clamp)
    if free_bits > 0:
        return ref.kl_free_bits(elementwise, free_bits, reduction)
    return ref.reduce(elementwise, reduction)


def float64_leaves(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def free_bits_that_bite(mu, logvar, pm, plv):
    """A floor between the smallest and largest batch-mean KL of the latent elements,
    so some are held at it and some are not."""
    k = ref.kl_elementwise_prior(mu.detach(), logvar.detach(), pm, plv).reshape(
        mu.shape[0], -1).mean(0)
    lo, hi = k.min().item(), k.max().item()
    return lo + 0.5 * (hi - lo)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("with_free_bits", [False, True])
def test_loss_and_kl_match_the_oracle(backend, prior, with_free_bits):
    fastvae.set_backend(backend)
    for reduction in REDUCTIONS + (() if with_free_bits else ("none",)):
        x_hat, x, mu, logvar, pm, plv = make(prior)
        fb = free_bits_that_bite(mu, logvar, pm, plv) if with_free_bits else 0.0
        parts = fastvae.vae_loss(x_hat, x, mu, logvar, beta=0.7, reduction=reduction,
                                 free_bits=fb, prior_mu=pm, prior_logvar=plv, return_parts=True)
        kl_alone = fastvae.kl_divergence(mu, logvar, reduction=reduction, free_bits=fb,
                                         prior_mu=pm, prior_logvar=plv)
        grad_out = torch.rand(parts.loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
        inputs = present(x_hat, mu, logvar, pm, plv)
        grads = torch.autograd.grad((parts.loss * grad_out).sum(), inputs)
        kl_grads = torch.autograd.grad((kl_alone * grad_out).sum(), present(mu, logvar, pm, plv))

        leaves = float64_leaves(x_hat, mu, logvar, pm, plv)
        ref_kl = reference_kl(leaves[1], leaves[2], leaves[3], leaves[4], fb, reduction)
        ref_recon = ref.reduce(ref.recon_elementwise(leaves[0], x, "mse"), reduction)
        ref_loss = ref_recon + 0.7 * ref_kl
        ref_grads = torch.autograd.grad((ref_loss * grad_out.double()).sum(), present(*leaves),
                                        retain_graph=True)
        ref_kl_grads = torch.autograd.grad((ref_kl * grad_out.double()).sum(),
                                           present(*leaves[1:]))
        check = dict(rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(parts.kl.double(), ref_kl.detach(), **check)
        torch.testing.assert_close(kl_alone.double(), ref_kl.detach(), **check)
        torch.testing.assert_close(parts.loss.double(), ref_loss.detach(), **check)
        for got, want in zip(grads + kl_grads, ref_grads + ref_kl_grads):
            assert got.shape == want.shape
            torch.testing.assert_close(got.double(), want, **check)


@pytest.mark.parametrize("prior", ["learned", "per_sample"])
def test_kl_matches_torch_distributions(prior):
    _, _, mu, logvar, pm, plv = make(prior)
    got = fastvae.kl_divergence(mu, logvar, prior_mu=pm, prior_logvar=plv, reduction="none")
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(pm, torch.exp(0.5 * plv))
    want = dist_kl(q, p).reshape(mu.shape[0], -1).sum(1)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.sum(), [mu, logvar, pm, plv])
    g_want = torch.autograd.grad(want.sum(), [mu, logvar, pm, plv])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_free_bits_hold_elements_at_the_floor_with_zero_gradient():
    mu = torch.randn(5, 4, dtype=torch.float64)
    logvar = torch.randn(5, 4, dtype=torch.float64)
    mu[:, 0], logvar[:, 0] = 0.01, 0.0  # element 0: KL ~ 5e-5, far below the floor
    mu[:, 1] = 3.0  # element 1: KL > 4.5, far above it
    mu.requires_grad_()
    logvar.requires_grad_()
    kl = fastvae.kl_divergence(mu, logvar, free_bits=1.0, reduction="batchmean")
    g_mu, g_lv = torch.autograd.grad(kl, [mu, logvar])
    assert (g_mu[:, 0] == 0).all() and (g_lv[:, 0] == 0).all()
    assert (g_mu[:, 1] != 0).all()
    # element 0 contributes exactly the floor
    per_element = ref.kl_elementwise_prior(mu.detach(), logvar.detach()).mean(0)
    want = torch.clamp_min(per_element, 1.0).sum()
    torch.testing.assert_close(kl, want)
    assert kl > per_element.sum()


def test_free_bits_zero_and_the_default_prior_are_todays_loss():
    x_hat, x, mu, logvar, _, _ = make("none")
    for reduction in REDUCTIONS + ("none",):
        plain = fastvae.vae_loss(x_hat, x, mu, logvar, reduction=reduction)
        zeros = torch.zeros(3)
        with_zero_prior = fastvae.vae_loss(x_hat, x, mu, logvar, reduction=reduction,
                                           free_bits=0.0, prior_mu=zeros, prior_logvar=zeros)
        torch.testing.assert_close(with_zero_prior, plain)


def test_gradcheck_float64():
    _, _, mu, logvar, pm, plv = make("batch_broadcast", dtype=torch.float64)
    x_hat, x = (t.double() for t in make("none", dtype=torch.float64)[:2])
    x_hat.requires_grad_()
    for fb in (0.0, 0.4):
        def loss(x_hat, mu, logvar, pm, plv, fb=fb):
            return fastvae.vae_loss(x_hat, x, mu, logvar, reduction="batchmean", free_bits=fb,
                                    prior_mu=pm, prior_logvar=plv, logvar_clamp=(-1.5, 1.5))
        assert torch.autograd.gradcheck(loss, (x_hat, mu, logvar, pm, plv))

        def kl(mu, logvar, pm, plv, fb=fb):
            return fastvae.kl_divergence(mu, logvar, reduction="sum", free_bits=fb,
                                         prior_mu=pm, prior_logvar=plv)
        assert torch.autograd.gradcheck(kl, (mu, logvar, pm, plv))

    def sampled(mu, logvar, pm, plv):
        z, kl = fastvae.sample_and_kl(mu, logvar, prior_mu=pm, prior_logvar=plv, num_samples=3,
                                      generator=torch.Generator().manual_seed(3))
        return z, kl
    assert torch.autograd.gradcheck(sampled, (mu, logvar, pm, plv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_samples_shapes_noise_and_gradients(backend):
    fastvae.set_backend(backend)
    _, _, mu, logvar, pm, plv = make("learned")
    z = fastvae.reparameterize(mu, logvar, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, *mu.shape)
    z1 = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert z1.shape == mu.shape  # the default keeps today's shape
    std = torch.exp(0.5 * logvar.detach())
    eps = (z.detach() - mu.detach()) / std
    assert not torch.allclose(eps[0], eps[1])  # independent samples
    g_mu, g_lv = torch.autograd.grad(z.sum(), [mu, logvar])
    torch.testing.assert_close(g_mu, torch.full_like(mu, 4.0))
    torch.testing.assert_close(g_lv, 0.5 * (z.detach() - mu.detach()).sum(0))
    # sample_and_kl: the kl stays per sample (N,), against the prior
    zk, kl = fastvae.sample_and_kl(mu, logvar, prior_mu=pm, prior_logvar=plv, num_samples=3)
    assert zk.shape == (3, *mu.shape) and kl.shape == (mu.shape[0],)
    want = ref.per_sample(ref.kl_elementwise_prior(mu.detach(), logvar.detach(), pm.detach(),
                                                   plv.detach()))
    torch.testing.assert_close(kl.double(), want)


def test_num_samples_draws_standard_normal_noise():
    mu = torch.randn(250, 500)  # 8 samples: 10^6 draws
    logvar = torch.randn(250, 500)
    z = fastvae.reparameterize(mu, logvar, num_samples=8, generator=torch.Generator().manual_seed(1))
    eps = (z - mu) / torch.exp(0.5 * logvar)
    ref.assert_standard_normal(eps.flatten().double())
    # the samples are uncorrelated with each other
    corr = torch.corrcoef(eps.reshape(8, -1))
    off_diagonal = corr[~torch.eye(8, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 5 / math.sqrt(mu.numel())


def test_multi_sample_backward_regenerates_the_forwards_noise():
    """A backward that finds no kept noise (evicted) draws the same noise again."""
    from fastvae import _torch_impl

    mu = torch.randn(3, 4, requires_grad=True)
    logvar = torch.randn(3, 4, requires_grad=True)
    z = fastvae.reparameterize(mu, logvar, num_samples=2)
    _torch_impl._kept_noise.clear()
    (g_lv,) = torch.autograd.grad(z.sum(), [logvar])
    torch.testing.assert_close(g_lv, 0.5 * (z.detach() - mu.detach()).sum(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    x_hat, x, mu, logvar, pm, plv = make("learned", dtype=dtype)
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, reduction="batchmean", free_bits=0.2,
                            prior_mu=pm, prior_logvar=plv)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, [mu, logvar, pm, plv])
    assert all(g.dtype == dtype for g in grads)
    leaves = float64_leaves(x_hat, mu, logvar, pm, plv)
    want = ref.reduce(ref.recon_elementwise(leaves[0], x, "mse"), "batchmean") \
        + reference_kl(*leaves[1:], 0.2, "batchmean")
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)


def test_nan_propagates():
    _, _, mu, logvar, pm, plv = make("learned")
    with torch.no_grad():
        pm[1] = float("nan")
    for fb in (0.0, 0.3):
        kl = fastvae.kl_divergence(mu, logvar, free_bits=fb, prior_mu=pm, prior_logvar=plv)
        assert torch.isnan(kl)


def test_bad_inputs_are_refused_by_name():
    x_hat, x, mu, logvar, pm, plv = make("learned")
    loss = fastvae.vae_loss
    with pytest.raises(ValueError, match="free_bits must be >= 0, got -0.1"):
        loss(x_hat, x, mu, logvar, free_bits=-0.1)
    with pytest.raises(ValueError, match="free_bits must be finite, got nan"):
        fastvae.kl_divergence(mu, logvar, free_bits=float("nan"))
    with pytest.raises(TypeError, match="free_bits must be a float"):
        loss(x_hat, x, mu, logvar, free_bits="1")
    with pytest.raises(ValueError, match="reduction='none'"):
        loss(x_hat, x, mu, logvar, free_bits=0.5, reduction="none")
    with pytest.raises(ValueError, match="reduction='none'"):
        fastvae.kl_divergence(mu, logvar, free_bits=0.5, reduction="none")
    with pytest.raises(ValueError, match=r"prior_mu must broadcast to mu's shape \(4, 2, 3\), "
                                         r"got shape \(2,\)"):
        loss(x_hat, x, mu, logvar, prior_mu=torch.zeros(2))
    with pytest.raises(ValueError, match="prior_logvar must broadcast"):
        fastvae.sample_and_kl(mu, logvar, prior_logvar=torch.zeros(5, 2, 3))
    with pytest.raises(ValueError, match="prior_logvar is on meta but mu is on cpu"):
        fastvae.kl_divergence(mu, logvar, prior_logvar=torch.zeros(3, device="meta"))
    with pytest.raises(TypeError, match="prior_mu must be a floating-point tensor, got torch.int64"):
        fastvae.kl_divergence(mu, logvar, prior_mu=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="prior_mu must be a tensor"):
        fastvae.kl_divergence(mu, logvar, prior_mu=0.5)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        fastvae.reparameterize(mu, logvar, num_samples=0)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        fastvae.sample_and_kl(mu, logvar, num_samples=2.0)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        fastvae.reparameterize(mu, logvar, num_samples=True)


def test_a_prior_of_another_dtype_keeps_its_dtype_in_the_gradient():
    _, _, mu, logvar, _, _ = make("none")
    pm = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    plv = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    kl = fastvae.kl_divergence(mu, logvar, prior_mu=pm, prior_logvar=plv)
    assert kl.dtype == torch.float32  # computed in the KL's dtype (mu's and logvar's)
    g_pm, g_plv = torch.autograd.grad(kl, [pm, plv])
    assert g_pm.dtype == torch.float64 and g_plv.dtype == torch.bfloat16


def test_opcheck():
    _, _, mu, logvar, pm, plv = make("batch_broadcast")
    x_hat, x = make("none")[:2]
    for reduction, fb in (("sum", 0.0), ("batchmean", 0.3), ("none", 0.0)):
        torch.library.opcheck(ops.vae_loss_op, (x_hat, x, mu, logvar, None, None, pm, plv, 0.5,
                                                "mse", 0.0, False, reduction, None, None, fb,
                                                True, True, True))
        torch.library.opcheck(ops.kl_divergence_op, (mu, logvar, pm, plv, reduction, -2.0, 2.0,
                                                     fb, True, True))
    seed = torch.tensor([17])
    for num_samples in (0, 3):
        torch.library.opcheck(ops.reparameterize_op, (mu, logvar, pm, plv, seed, None, None,
                                                      True, num_samples))
        grad_z = torch.randn((num_samples,) * bool(num_samples) + Z_SHAPE)
        torch.library.opcheck(ops.reparameterize_backward_op, (
            grad_z, torch.randn(4), mu.detach(), logvar.detach(), pm.detach(), plv.detach(),
            seed, None, None, num_samples))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x_hat, x, mu, logvar, pm, plv = make("learned")

    def step(x_hat, mu, logvar, pm, plv):
        z, kl = fastvae.sample_and_kl(mu, logvar, prior_mu=pm, prior_logvar=plv, num_samples=2)
        loss = fastvae.vae_loss(x_hat, x, mu, logvar, reduction="batchmean", free_bits=0.3,
                                prior_mu=pm, prior_logvar=plv)
        return loss + z.square().mean() + kl.sum() \
            + fastvae.kl_divergence(mu, logvar, prior_mu=pm, free_bits=0.1)

    inputs = (x_hat, mu, logvar, pm, plv)
    torch.manual_seed(0)
    compiled = torch.compile(step, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(compiled, inputs)
    torch.manual_seed(0)
    eager = step(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_torch_func_grad_matches_eager():
    x_hat, x, mu, logvar, pm, plv = make("learned")

    def loss(mu, logvar, pm, plv):
        return fastvae.vae_loss(x_hat.detach(), x, mu, logvar, reduction="sum", free_bits=0.3,
                                prior_mu=pm, prior_logvar=plv)

    grads = torch.func.grad(loss, argnums=(0, 1, 2, 3))(mu, logvar, pm, plv)
    eager = torch.autograd.grad(loss(mu, logvar, pm, plv), [mu, logvar, pm, plv])
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)

    def sampled(mu, logvar, pm, plv):
        z, kl = fastvae.sample_and_kl(mu, logvar, prior_mu=pm, prior_logvar=plv, num_samples=2,
                                      generator=torch.Generator().manual_seed(4))
        return z.square().sum() + kl.sum()

    grads = torch.func.grad(sampled, argnums=(0, 1, 2, 3))(mu, logvar, pm, plv)
    eager = torch.autograd.grad(sampled(mu, logvar, pm, plv), [mu, logvar, pm, plv])
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)


@NEEDS_INTERPRETER
def test_a_prior_samples_and_free_bits_run_in_the_kernels(monkeypatch):
    from fastvae import _torch_impl, kernels

    calls = []
    for module, name in ((kernels, "vae_loss_forward_with_prior"),
                         (kernels, "kl_forward_with_prior"),
                         (kernels, "reparameterize_forward_with_prior"),
                         (_torch_impl, "vae_loss_forward_with_prior"),
                         (_torch_impl, "kl_forward_with_prior"),
                         (_torch_impl, "reparameterize_forward_with_prior")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _r=real, _n=f"{module.__name__}.{name}": calls.append(_n)
                            or _r(*a))
    fastvae.set_backend("triton")
    x_hat, x, mu, logvar, pm, plv = make("learned")
    fastvae.vae_loss(x_hat, x, mu, logvar, prior_mu=pm, prior_logvar=plv).backward()
    fastvae.kl_divergence(mu, logvar, prior_mu=pm)
    fastvae.sample_and_kl(mu, logvar, prior_mu=pm)
    fastvae.reparameterize(mu, logvar, num_samples=2)
    assert calls == ["fastvae.kernels.vae_loss_forward_with_prior",
                     "fastvae.kernels.kl_forward_with_prior",
                     "fastvae.kernels.reparameterize_forward_with_prior",
                     "fastvae.kernels.reparameterize_forward_with_prior"]
    calls.clear()
    fastvae.vae_loss(x_hat, x, mu, logvar, prior_mu=pm, free_bits=0.1).backward()
    fastvae.kl_divergence(mu, logvar, free_bits=0.1).backward()
    assert calls == ["fastvae.kernels.vae_loss_forward_with_prior",
                     "fastvae.kernels.kl_forward_with_prior"]
    calls.clear()  # float64 stays on the PyTorch path, free bits or not
    fastvae.kl_divergence(mu.double(), logvar.double(), free_bits=0.1)
    assert calls == ["fastvae._torch_impl.kl_forward_with_prior"]


@NEEDS_INTERPRETER
@pytest.mark.parametrize("prior", ["none", "learned", "batch_broadcast"])
def test_sample_and_kl_with_a_prior_and_samples_on_the_kernels(prior):
    """Against the float64 oracle, the noise read back from z (the kernels draw their own)."""
    fastvae.set_backend("triton")
    _, _, mu, logvar, pm, plv = make(prior)
    z, kl = fastvae.sample_and_kl(mu, logvar, prior_mu=pm, prior_logvar=plv, num_samples=3,
                                  logvar_clamp=(-1.0, 1.0))
    assert z.shape == (3, *Z_SHAPE)
    g = torch.Generator().manual_seed(2)
    grad_z, grad_kl = torch.randn(z.shape, generator=g), torch.randn(kl.shape, generator=g)
    leaves = present(mu, logvar, pm, plv)
    grads = torch.autograd.grad([z, kl], leaves, [grad_z, grad_kl])
    ref_leaves = float64_leaves(mu, logvar, pm, plv)
    ref_kl = ref.per_sample(ref.kl_elementwise_prior(*ref_leaves, logvar_clamp=(-1.0, 1.0)))
    lv_c = ref_leaves[1].clamp(-1.0, 1.0)
    eps = ((z.detach().double() - mu.detach().double()) / torch.exp(0.5 * lv_c)).detach()
    ref_z = ref_leaves[0] + torch.exp(0.5 * lv_c) * eps
    ref_grads = torch.autograd.grad([ref_z, ref_kl], present(*ref_leaves),
                                    [grad_z.double(), grad_kl.double()])
    torch.testing.assert_close(kl.double(), ref_kl.detach(), rtol=2e-5, atol=2e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-5)


@NEEDS_INTERPRETER
def test_the_kernels_keep_the_gradient_accurate_when_the_logvars_are_50_apart():
    fastvae.set_backend("triton")
    g = torch.Generator().manual_seed(6)
    lv = (19 + torch.rand(4, 32, generator=g)).requires_grad_()
    plv = (-30 + torch.rand(32, generator=g)).requires_grad_()
    mu, pm = torch.randn(4, 32, generator=g), torch.randn(32, generator=g)
    kl = fastvae.kl_divergence(mu, lv, prior_mu=pm, prior_logvar=plv)
    g_lv, g_plv = torch.autograd.grad(kl, [lv, plv])
    ratio = torch.exp(lv.double() - plv.double())
    want_lv = 0.5 * (ratio - 1)
    want_plv = (0.5 * (1 - ratio - (mu.double() - pm.double()) ** 2 / plv.double().exp())).sum(0)
    for got, want in ((g_lv, want_lv), (g_plv, want_plv)):
        assert ((got.double() - want).abs() / want.abs()).max() < 4e-7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["kl_divergence", "vae_loss", "sample_and_kl"])
def test_a_clamped_logvar_passes_no_gradient_not_even_a_nan_from_the_prior(backend, op):
    """Where logvar_clamp is active the logvar gets a zero gradient whatever the KL's
    derivative there, a NaN from a NaN prior_logvar included, as through torch.clamp
    (the kernels' rule; the PyTorch path multiplied by the mask: NaN * 0 = NaN); a NaN
    logvar was not clamped and its NaN passes. Both backends."""
    fastvae.set_backend(backend)
    logvar = torch.tensor([[5.0, 0.3, -5.0], [0.2, float("nan"), -0.4]], requires_grad=True)
    mu = torch.zeros(2, 3, requires_grad=True)
    options = dict(logvar_clamp=(-1.0, 1.0), prior_logvar=torch.tensor([float("nan"), 0.0, 0.0]))
    if op == "kl_divergence":
        out = fastvae.kl_divergence(mu, logvar, reduction="none", **options)
    elif op == "vae_loss":
        x = torch.rand(2, 4)
        out = fastvae.vae_loss(x.clone().requires_grad_(), x, mu, logvar, reduction="none",
                               **options)
    else:
        out = fastvae.sample_and_kl(mu, logvar, **options)[1]
    out.sum().backward()
    grad = logvar.grad
    assert grad[0, 0] == 0 and grad[0, 2] == 0  # clamped (5 and -5 against [-1, 1])
    # NaN: the free element under the NaN prior logvar, and the NaN logvar; finite elsewhere
    assert torch.equal(torch.isnan(grad), torch.tensor([[False, False, False], [True, True, False]]))


@pytest.mark.parametrize("backend,rows", [
    ("torch", 3), ("torch", "blocked"),  # (the PyTorch path's blocked latents: > SMALL_NUMEL)
    pytest.param("triton", 3, marks=NEEDS_INTERPRETER)])
def test_a_kl_past_float32s_range_is_inf_not_nan(backend, rows):
    """A KL term that overflows float32 is inf with a prior as without one: the
    rounding-error correction of e^(lv - plv) multiplied an infinite expm1 by an error
    of 0 (inf * 0 = NaN), so lv = 89 against N(0, 1) given explicitly was NaN, value and
    gradient. Also where the exact KL (6.1e38 for lv = 45 against plv = -45) is past
    float32's largest number. Every finite element keeps its value."""
    if rows == "blocked":
        rows = ops._torch_impl.SMALL_NUMEL // 4 + 1
    fastvae.set_backend(backend)
    g = torch.Generator().manual_seed(7)
    mu = torch.randn(rows, 4, generator=g)
    logvar = torch.randn(rows, 4, generator=g)
    mu[0, 0], logvar[0, 0] = 0.0, 89.0  # e^89 - 1 > float32's max
    mu[1, 1], logvar[1, 1] = 1.0, 45.0  # against plv = -45 below: e^90 - 1
    plv = torch.tensor([0.0, -45.0, 0.0, 0.0])
    mu, logvar = mu.requires_grad_(), logvar.requires_grad_()
    kl = fastvae.kl_divergence(mu, logvar, prior_mu=torch.zeros(4), prior_logvar=plv,
                               reduction="none")
    g_mu, g_lv = torch.autograd.grad(kl.sum(), [mu, logvar])
    assert kl[0] == math.inf and kl[1] == math.inf and g_lv[0, 0] == math.inf
    assert g_lv[1, 1] == math.inf
    # the float64 formula on the other rows and elements
    m, lv = mu.detach().double(), logvar.detach().double()
    p = plv.double()
    want = 0.5 * (p - lv + (lv.exp() + m ** 2) * torch.exp(-p) - 1)
    torch.testing.assert_close(kl[2:].double(), want[2:].sum(1), rtol=2e-6, atol=1e-6)
    finite = torch.ones(rows, 4, dtype=torch.bool)
    finite[0, 0] = finite[1, 1] = False
    torch.testing.assert_close(g_lv[finite].double(), (0.5 * torch.expm1(lv - p))[finite],
                               rtol=2e-6, atol=1e-6)
    assert not torch.isnan(g_mu).any()


@pytest.mark.parametrize("op", ["kl_divergence", "sample_and_kl"])
@pytest.mark.parametrize("backend,rows", [
    ("torch", 3), ("torch", "blocked"),
    pytest.param("triton", 3, marks=NEEDS_INTERPRETER)])
def test_an_infinite_prior_variance_gives_an_infinite_kl_and_finite_gradients(backend, rows, op):
    """plv = +inf: KL = 1/2 [plv - lv + (e^lv + (mu - pm)^2) e^-plv - 1] = inf, with
    d/dlv = 1/2 (e^lv e^-plv - 1) = -1/2, d/dplv = 1/2 (1 - (e^lv + (mu - pm)^2) e^-plv)
    = 1/2 and d/dmu = (mu - pm) e^-plv = 0. The rounding-error correction of lv - plv
    subtracted inf from inf: NaN value and gradients. Every other element keeps the
    formula's value. Both backends, the PyTorch path's small and blocked latents."""
    if rows == "blocked":
        rows = ops._torch_impl.SMALL_NUMEL // 4 + 1
    fastvae.set_backend(backend)
    g = torch.Generator().manual_seed(11)
    mu = torch.randn(rows, 4, generator=g, requires_grad=True)
    logvar = torch.randn(rows, 4, generator=g, requires_grad=True)
    pm = torch.randn(rows, 4, generator=g)
    plv = torch.randn(rows, 4, generator=g)
    plv[0, 2] = math.inf
    plv.requires_grad_()
    if op == "kl_divergence":
        kl = fastvae.kl_divergence(mu, logvar, prior_mu=pm, prior_logvar=plv, reduction="none")
    else:
        kl = fastvae.sample_and_kl(mu, logvar, prior_mu=pm, prior_logvar=plv)[1]
    g_mu, g_lv, g_plv = torch.autograd.grad(kl.sum(), [mu, logvar, plv])
    assert kl[0] == math.inf
    assert g_lv[0, 2] == -0.5 and g_plv[0, 2] == 0.5 and g_mu[0, 2] == 0.0
    m, lv, p, q = (t.detach().double() for t in (mu, logvar, pm, plv))
    want = 0.5 * (q - lv + (lv.exp() + (m - p) ** 2) * torch.exp(-q) - 1)
    torch.testing.assert_close(kl[1:].double(), want[1:].sum(1), rtol=2e-6, atol=1e-6)
    finite = torch.isfinite(q)
    torch.testing.assert_close(g_lv[finite].double(), (0.5 * torch.expm1(lv - q))[finite],
                               rtol=2e-6, atol=1e-6)
    want_plv = -0.5 * (torch.expm1(lv - q) + (m - p) ** 2 * torch.exp(-q))
    torch.testing.assert_close(g_plv[finite].double(), want_plv[finite], rtol=2e-6, atol=1e-6)


def test_under_torch_func_an_overflowing_or_infinite_term_is_as_in_eager():
    """torch.func runs the KL's composite formula: its correction e^d err took e^d
    uncapped, so lv = 89 against N(0, 1) (e^89 overflows float32) gave a NaN gradient
    where eager gives inf; an infinite prior variance gave NaN. Now the same as eager."""
    mu = torch.tensor([[0.0, 0.5, -0.3]])
    logvar = torch.tensor([[89.0, 0.1, 0.2]])
    pm = torch.zeros(3)
    plv = torch.tensor([0.0, 0.0, math.inf])

    def kl(lv, q):
        return fastvae.kl_divergence(mu, lv, prior_mu=pm, prior_logvar=q)

    g_lv, g_plv = torch.func.grad(kl, argnums=(0, 1))(logvar, plv)
    lv_eager, plv_eager = logvar.clone().requires_grad_(), plv.clone().requires_grad_()
    value = kl(lv_eager, plv_eager)
    value.backward()
    assert value == math.inf and kl(logvar, plv) == math.inf
    assert g_lv[0, 0] == math.inf and g_lv[0, 2] == -0.5 and g_plv[2] == 0.5
    torch.testing.assert_close(g_lv, lv_eager.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_plv, plv_eager.grad, rtol=1e-6, atol=0)
