"""GaussianPosterior against the diagonal-Gaussian formulas."""

import math
import types

import pytest
import torch

import fastvae
from fastvae import GaussianPosterior


def params(shape=(3, 8, 4, 4), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def test_split_clamp_and_moments():
    p = params()
    with torch.no_grad():
        p[:, 4:] *= 30  # logvar half, some entries beyond the (-30, 20) clamp
    post = GaussianPosterior(p)
    assert torch.equal(post.mean, p[:, :4])
    assert torch.equal(post.logvar, p[:, 4:].clamp(-30, 20))
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    torch.testing.assert_close(post.var, torch.exp(post.logvar))
    assert torch.equal(post.mode(), post.mean)


def test_kl_against_standard_normal_and_other():
    post = GaussianPosterior(params(seed=1))
    m, lv = post.mean.double(), post.logvar.double()
    want = 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl().double(), want, rtol=1e-5, atol=1e-5)

    other = GaussianPosterior(params(seed=2))
    om, olv = other.mean.double(), other.logvar.double()
    # KL(N(m, v) || N(om, ov)) = 1/2 [(m - om)^2 / ov + v / ov - 1 - log v + log ov]
    want = 0.5 * ((m - om) ** 2 / olv.exp() + lv.exp() / olv.exp() - 1 - lv + olv).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(other).double(), want, rtol=1e-5, atol=1e-5)
    assert post.kl(post).abs().max() < 1e-5


def test_nll_is_gaussian_negative_log_density():
    post = GaussianPosterior(params(seed=3))
    x = torch.randn_like(post.mean)
    m, v = post.mean.double(), post.var.double()
    density = torch.exp(-((x - m) ** 2) / (2 * v)) / torch.sqrt(2 * math.pi * v)
    want = -torch.log(density).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.nll(x).double(), want, rtol=1e-5, atol=1e-4)


def test_sample_distribution_and_gradient():
    post = GaussianPosterior(params((64, 16, 8, 8), seed=4))
    z = post.sample(generator=torch.Generator().manual_seed(0))
    eps = ((z - post.mean) / post.std).detach()
    assert abs(eps.mean().item()) < 5 / math.sqrt(eps.numel())
    assert abs(eps.std().item() - 1) < 0.02
    z.sum().backward()
    assert post.parameters.grad is not None and torch.isfinite(post.parameters.grad).all()


def test_deterministic():
    p = params()
    post = GaussianPosterior(p, deterministic=True)
    assert torch.equal(post.std, torch.zeros_like(post.mean))
    assert torch.equal(post.sample(), post.mean)
    for value in (post.kl(), post.nll(torch.randn_like(post.mean))):
        assert value.shape == (3,) and value.device == p.device and (value == 0).all()


def test_split_along_last_dim_and_bad_input():
    p = torch.randn(5, 6)
    post = GaussianPosterior(p, dim=-1)
    assert post.mean.shape == (5, 3) and post.kl().shape == (5,)
    with pytest.raises(ValueError, match="even size along dim=1"):
        GaussianPosterior(torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match="other must be a GaussianPosterior"):
        post.kl(other=p)
    for dim in (1.5, None, True):
        with pytest.raises(TypeError, match=f"dim must be an int, got {type(dim).__name__}"):
            GaussianPosterior(p, dim=dim)
    with pytest.raises(ValueError, match="sample and mean must have the same shape"):
        post.nll(torch.randn(5, 4))


def test_float64_stays_float64():
    post = GaussianPosterior(torch.randn(3, 8, dtype=torch.float64))
    other = GaussianPosterior(torch.randn(3, 8, dtype=torch.float64))
    assert post.kl().dtype == post.kl(other).dtype == post.nll(post.mean).dtype == torch.float64


# ---- issue 16: fixes ------------------------------------------------------

def test_nll_promotes_to_float64_with_a_float64_sample():
    post = GaussianPosterior(params(seed=5).detach())
    x = torch.randn(post.mean.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m, lv = post.mean.double(), post.logvar.double()
    want = 0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / lv.exp()).sum(dim=(1, 2, 3))
    got = post.nll(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_kl_other_goes_through_the_fused_op(monkeypatch):
    from fastvae import _dispatch

    a, b = params(seed=3), params(seed=4).detach()
    backend = _dispatch.implementation(a, b)  # the one the environment picks for them
    calls = []
    real = backend.kl_forward_with_prior
    monkeypatch.setattr(backend, "kl_forward_with_prior", lambda *a: calls.append(a) or real(*a))
    GaussianPosterior(a).kl(GaussianPosterior(b))
    assert len(calls) == 1


def test_kl_gradient_wrt_logvars_is_accurate_when_they_are_50_apart():
    # v / ov = exp(lv - olv) with lv - olv ~ 50: the float32 difference alone is off by up
    # to 2e-6 relative, which exp(lv - olv) and both logvar gradients inherited
    g = torch.Generator().manual_seed(6)
    shape = (4, 32)
    lv = 19 + torch.rand(shape, generator=g)
    olv = -30 + torch.rand(shape, generator=g)
    m, om = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    a = torch.cat([m, lv], 1).requires_grad_()
    b = torch.cat([om, olv], 1).requires_grad_()
    GaussianPosterior(a).kl(GaussianPosterior(b)).sum().backward()
    # d KL / d lv = (v / ov - 1) / 2; d KL / d olv = (1 - v / ov - (m - om)^2 / ov) / 2, in float64
    ratio = torch.exp(lv.double() - olv.double())
    want_lv = 0.5 * (ratio - 1)
    want_olv = 0.5 * (1 - ratio - (m.double() - om.double()) ** 2 / olv.double().exp())
    for got, want in ((a.grad[:, 32:], want_lv), (b.grad[:, 32:], want_olv)):
        rel = ((got.double() - want).abs() / want.abs()).max().item()
        assert rel < 4e-7, rel  # a few float32 roundings (eps 1.2e-7)


def test_kl_of_the_attribute_formula_overflows_to_inf_not_nan():
    """kl(other) where the fused op does not serve it (diffusers semantics over a 5-dim
    video latent sums dims 1-3 only), without the clamp: a term past float32's range
    (lv = 89 against lv = 0) and an infinite variance of other are inf, with the
    gradients the formula has (inf; and -1/2, 1/2 for the logvars against the infinite
    variance). The correction err * expm1(d) multiplied inf by an error of 0, and
    inf - inf made that error NaN: NaN KL and gradients."""
    a = torch.tensor([0.0, 0.5, 89.0, 0.1]).reshape(1, 4, 1, 1, 1).requires_grad_()
    b = torch.zeros(1, 4, 1, 1, 1)
    b[0, 3] = math.inf  # other's second logvar: infinite variance against a's 0.1
    b.requires_grad_()
    post = GaussianPosterior(a, logvar_clamp=None, semantics="diffusers")
    other = GaussianPosterior(b, logvar_clamp=None, semantics="diffusers")
    kl = post.kl(other)
    kl.sum().backward()
    assert kl.flatten().tolist() == [math.inf]
    assert a.grad[0, 2].item() == math.inf and a.grad[0, 3].item() == -0.5
    assert b.grad[0, 3].item() == 0.5 and b.grad[0, 2].item() == -math.inf
    assert a.grad[0, 1].item() == 0.0  # (mu - omu) / ov with ov = e^inf


# ---- issue 16: what diffusers code relies on, in both semantics ---------------

@pytest.mark.parametrize("semantics", ["fastvae", "diffusers"])
def test_nll_over_given_dims_and_broadcast_sample(semantics):
    post = GaussianPosterior(params(seed=7).detach(), semantics=semantics)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))  # one sample for all rows
    m, lv = post.mean.double(), post.logvar.double()
    terms = math.log(2 * math.pi) + lv + (x.double() - m) ** 2 / lv.exp()
    torch.testing.assert_close(post.nll(x, dims=[1]).double(), 0.5 * terms.sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post.nll(x, dims=(2, 3)).double(), 0.5 * terms.sum((2, 3)), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(post.nll(x).double(), 0.5 * terms.sum((1, 2, 3)), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="dims=.*out of range for a 4-dim sample"):
        post.nll(x, dims=[4])
    with pytest.raises(TypeError, match="dims must be an int or a list"):
        post.nll(x, dims="1")


@pytest.mark.parametrize("semantics", ["fastvae", "diffusers"])
def test_kl_against_a_broadcast_prior_of_any_class(semantics):
    post = GaussianPosterior(params(seed=8), semantics=semantics)
    prior_params = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    prior_mean, prior_logvar = prior_params.chunk(2, dim=1)
    m, lv = post.mean.double(), post.logvar.double()
    om, olv = prior_mean.double(), prior_logvar.double()
    want = 0.5 * ((m - om) ** 2 / olv.exp() + lv.exp() / olv.exp() - 1 - lv + olv).sum(dim=(1, 2, 3))

    class AnyPosterior:  # what diffusers' DiagonalGaussianDistribution offers: mean, logvar
        mean, logvar = prior_mean, prior_logvar

    for prior in (GaussianPosterior(prior_params), AnyPosterior()):
        got = post.kl(prior)
        assert got.shape == (3,)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="self.mean and other.mean must have the same shape or broadcast"):
        post.kl(GaussianPosterior(torch.randn(2, 8, 4, 4)))


@pytest.mark.parametrize("semantics", ["fastvae", "diffusers"])
def test_sample_with_one_generator_per_sample(semantics):
    p = params((3, 8, 4, 4), seed=9).detach()
    post = GaussianPosterior(p, semantics=semantics)
    z = post.sample([torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    # sample i depends on its own generator only: drawn alone from a fresh one, it is the same
    for i, s in enumerate((10, 11, 12)):
        alone = GaussianPosterior(p[i:i + 1], semantics=semantics).sample(torch.Generator().manual_seed(s))
        assert torch.equal(z[i:i + 1], alone)
    assert not torch.equal(z[0], z[1])
    one = post.sample([torch.Generator().manual_seed(4)])
    assert torch.equal(one, post.sample(torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="one generator per sample \\(3\\) or exactly one, got 2"):
        post.sample([torch.Generator(), torch.Generator()])
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        post.sample([1, 2, 3])
    longer = [torch.Generator().manual_seed(s) for s in (10, 11, 12, 13)]
    if semantics == "diffusers":  # diffusers' randn_tensor reads the first N of a longer list
        assert torch.equal(post.sample(longer), z)
    else:
        with pytest.raises(ValueError, match="one generator per sample \\(3\\) or exactly one, got 4"):
            post.sample(longer)


@pytest.mark.parametrize("ndim", [4, 5])
def test_channels_last_parameters_sample_channels_last(ndim):
    shape = (2, 6, 3, 4) if ndim == 4 else (2, 6, 2, 3, 4)
    fmt = torch.channels_last if ndim == 4 else torch.channels_last_3d
    p = torch.randn(shape, generator=torch.Generator().manual_seed(13))
    z_nchw = GaussianPosterior(p).sample(torch.Generator().manual_seed(0))
    z = GaussianPosterior(p.contiguous(memory_format=fmt)).sample(torch.Generator().manual_seed(0))
    assert z.is_contiguous(memory_format=fmt) and not z.is_contiguous()
    assert torch.equal(z, z_nchw)
    assert z_nchw.is_contiguous()


def test_diffusers_semantics_results_in_the_input_dtype():
    p = params(seed=14).detach()
    half = p.half()
    fast, like_diffusers = GaussianPosterior(half), GaussianPosterior(half, semantics="diffusers")
    x = torch.randn(3, 4, 4, 4).half()
    for name, compute in (("kl", lambda q: q.kl()), ("kl_other", lambda q: q.kl(GaussianPosterior(p))),
                          ("nll", lambda q: q.nll(x))):
        f32, f16 = compute(fast), compute(like_diffusers)
        assert f32.dtype == torch.float32, name
        # computed in float32, rounded once: the float32 result rounded to the input dtype
        # (kl against a float32 other promotes to float32, as torch's arithmetic does)
        want_dtype = torch.float32 if name == "kl_other" else torch.float16
        assert f16.dtype == want_dtype and torch.equal(f16, f32.to(want_dtype)), name
    assert like_diffusers.sample().dtype == torch.float16


def test_diffusers_semantics_sums_kl_over_dims_1_to_3_of_a_video_posterior():
    p = torch.randn(2, 6, 3, 4, 5, generator=torch.Generator().manual_seed(15)).requires_grad_()
    video = GaussianPosterior(p, semantics="diffusers")
    m, lv = video.mean.double(), video.logvar.double()
    want = 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))  # (N, W)
    got = video.kl()
    assert got.shape == (2, 5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    want_grad = torch.cat([m, 0.5 * (lv.exp() - 1)], 1)  # d/dmean = mean, d/dlogvar = (var - 1) / 2
    torch.testing.assert_close(p.grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    other = GaussianPosterior(torch.randn(2, 6, 3, 4, 5), semantics="diffusers")
    assert video.kl(other).shape == (2, 5) and video.nll(video.mean).shape == (2, 5)
    assert GaussianPosterior(p).kl().shape == (2,)  # fastvae: every non-batch dim
    # below 4-D diffusers' sum over dims 1-3 fails; here it is every non-batch dim
    flat = GaussianPosterior(torch.randn(3, 8), semantics="diffusers")
    assert flat.kl().shape == flat.nll(flat.mean).shape == (3,)


def test_deterministic_results_in_each_semantics():
    p = params(seed=16)
    fast = GaussianPosterior(p, deterministic=True)
    like_diffusers = GaussianPosterior(p.half(), deterministic=True, semantics="diffusers")
    for value in (like_diffusers.kl(), like_diffusers.nll(like_diffusers.mean)):
        assert value.shape == (1,) and value.dtype == torch.get_default_dtype() and (value == 0).all()
    assert torch.equal(like_diffusers.sample(), like_diffusers.mean)
    assert torch.equal(like_diffusers.std, torch.zeros_like(like_diffusers.mean))
    stochastic = GaussianPosterior(params(seed=17))
    with pytest.raises(ValueError, match="deterministic GaussianPosterior .* is infinite"):
        stochastic.kl(fast)
    diffusers_like = GaussianPosterior(params(seed=17), semantics="diffusers")
    inf = diffusers_like.kl(like_diffusers)
    assert inf.shape == (3,) and torch.isinf(inf).all() and (inf > 0).all()


@pytest.mark.parametrize("semantics", ["fastvae", "diffusers"])
def test_kl_after_sample_is_the_fused_kl_with_its_gradient(semantics):
    p1, p2 = params(seed=18), params(seed=18)
    fused = GaussianPosterior(p1, semantics=semantics)
    z = fused.sample(torch.Generator().manual_seed(0))
    kl = fused.kl()
    separate = GaussianPosterior(p2, semantics=semantics)
    z2 = separate.sample(torch.Generator().manual_seed(0))
    separate._kl_of_sample = None  # forget the fused KL: computed on its own
    kl2 = separate.kl()
    assert torch.equal(z, z2)
    torch.testing.assert_close(kl, kl2, rtol=1e-6, atol=1e-5)
    (z.square().sum() + 0.3 * kl.sum()).backward()
    (z2.square().sum() + 0.3 * kl2.sum()).backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-6, atol=1e-6)


def test_kl_after_a_no_grad_sample_still_has_a_gradient():
    p = params(seed=19)
    post = GaussianPosterior(p)
    with torch.no_grad():
        post.sample()
    kl = post.kl()
    assert kl.requires_grad
    kl.sum().backward()
    torch.testing.assert_close(p.grad[:, :4], p[:, :4].detach())  # d kl / d mean = mean
    post.sample()
    with torch.no_grad():
        assert not post.kl().requires_grad


def test_std_and_var_follow_the_grad_mode_of_construction():
    p = params(seed=20)
    with torch.no_grad():
        built_without_grad = GaussianPosterior(p)
    assert not built_without_grad.std.requires_grad and not built_without_grad.var.requires_grad
    built_with_grad = GaussianPosterior(p)
    with torch.no_grad():
        assert built_with_grad.std.requires_grad and built_with_grad.var.requires_grad


def test_bad_semantics_and_other():
    with pytest.raises(ValueError, match="semantics must be one of 'fastvae', 'diffusers'; got 'torch'"):
        GaussianPosterior(params(), semantics="torch")
    with pytest.raises(TypeError, match="anything with mean and logvar tensors"):
        GaussianPosterior(params()).kl(object())


def test_kl_gradient_stays_accurate_under_torch_compile(one_thread):
    # kl(other) is the fused KL op against a prior (the Triton kernel under
    # FASTVAE_BACKEND=triton, else the PyTorch path here): its rounding-error term
    # must survive the compiler too
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(21)
    lv, olv = 19 + torch.rand(2, 16, generator=g), -30 + torch.rand(2, 16, generator=g)
    m, om = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    a, b = torch.cat([m, lv], 1).requires_grad_(), torch.cat([om, olv], 1).requires_grad_()
    kl = torch.compile(lambda a, b: GaussianPosterior(a).kl(GaussianPosterior(b)), fullgraph=True)(a, b)
    kl.sum().backward()
    ratio = torch.exp(lv.double() - olv.double())
    want_olv = 0.5 * (1 - ratio - (m.double() - om.double()) ** 2 / olv.double().exp())
    for got, want in ((a.grad[:, 16:], 0.5 * (ratio - 1)), (b.grad[:, 16:], want_olv)):
        assert ((got.double() - want).abs() / want.abs()).max().item() < 4e-7


@pytest.mark.parametrize("semantics", ["fastvae", "diffusers"])
def test_without_a_clamp(semantics):
    p = params(seed=22).detach()
    with torch.no_grad():
        p[:, 4:] = 25.0  # beyond the default clamp: only visible without one
    post = GaussianPosterior(p, logvar_clamp=None, semantics=semantics)
    assert torch.equal(post.logvar, p[:, 4:])
    m, lv = post.mean.double(), post.logvar.double()
    want = 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl().double(), want, rtol=1e-5, atol=0)  # not yet sampled
    z = post.sample(torch.Generator().manual_seed(0))
    eps = (z.double() - m) / (0.5 * lv).exp()
    assert eps.abs().max() < 6  # the unclamped std drew z
    torch.testing.assert_close(post.kl().double(), want, rtol=1e-5, atol=0)  # the fused one


def test_deterministic_sample_is_a_new_tensor():
    """As diffusers' mean + 0 * eps: writing the sample (z *= scaling_factor) must leave the
    posterior and its parameters as they were."""
    p = params()
    post = GaussianPosterior(p.detach().clone(), deterministic=True)
    z = post.sample()
    assert torch.equal(z, post.mean)
    z.mul_(0.18215)
    assert torch.equal(post.mean, p.detach()[:, :4]) and torch.equal(post.mode(), p.detach()[:, :4])


@pytest.mark.parametrize("grad", [True, False])
def test_each_kl_after_a_sample_is_a_new_tensor(grad):
    """kl() after sample() reuses the fused KL; each call still returns its own tensor:
    writing one in place leaves the next kl() the KL."""
    with torch.set_grad_enabled(grad):
        post = GaussianPosterior(params(seed=3))
        post.sample()
        first = post.kl()
        want = first.detach().clone()
        first.mul_(1e-3)
        second = post.kl()
    assert second is not first
    torch.testing.assert_close(second.detach(), want, rtol=0, atol=0)


def test_an_assigned_std_is_what_sample_draws_with():
    """diffusers' attributes are plain: `posterior.std = posterior.std * t` samples at
    temperature t there, so here too (it was silently ignored): z = mean + std * eps, the
    noise fastvae's op draws from the generator, gradients through the assigned std."""
    p = params((2, 8, 16, 16), seed=4)
    post = GaussianPosterior(p)
    post.std = post.std * 0.1
    z = post.sample(generator=torch.Generator().manual_seed(5))
    zeros = torch.zeros_like(post.mean)
    eps = fastvae.reparameterize(zeros, zeros, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, post.mean + post.std * eps, rtol=0, atol=0)
    empirical = ((z - post.mean) / torch.exp(0.5 * post.logvar)).std().item()
    assert 0.08 < empirical < 0.12, empirical
    z.sum().backward()
    m, lv = p.detach()[:, :4].double(), p.detach()[:, 4:].double()
    torch.testing.assert_close(p.grad[:, 4:].double(), 0.1 * 0.5 * torch.exp(0.5 * lv) * eps.double(),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.grad[:, :4].double(), torch.ones_like(m))


@pytest.mark.parametrize("semantics", ["fastvae", "diffusers"])
def test_assigned_var_and_logvar_are_what_kl_and_nll_read(semantics):
    """diffusers' kl is 1/2 sum(mean^2 + var - 1 - logvar) and its nll reads var: after an
    assignment each term reads its own attribute (they were ignored: the fused ops read
    the logvar the posterior was built from)."""
    p = params(seed=6).detach()
    post = GaussianPosterior(p, semantics=semantics)
    new_logvar = post.logvar * 0.5 - 0.25
    post.logvar = new_logvar
    post.var = torch.exp(new_logvar) * 1.5  # deliberately not exp(logvar): each term its own
    m, lv, var = post.mean.double(), new_logvar.double(), post.var.double()
    want_kl = 0.5 * (m**2 + var - 1 - lv).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl().double(), want_kl, rtol=1e-6, atol=1e-6)
    other = GaussianPosterior(params(seed=7).detach())
    om, olv = other.mean.double(), other.logvar.double()
    want_other = 0.5 * ((m - om) ** 2 / olv.exp() + var / olv.exp() - 1 - lv + olv).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(other).double(), want_other, rtol=1e-6, atol=1e-6)
    x = torch.randn(p[:, :4].shape, generator=torch.Generator().manual_seed(8))
    want_nll = 0.5 * (math.log(2 * math.pi) + lv + (x.double() - m) ** 2 / var).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.nll(x).double(), want_nll, rtol=1e-6, atol=1e-6)


def test_an_assigned_logvar_leaves_std_and_var_as_built():
    """diffusers computes std and var in its constructor: assigning logvar later changes
    neither, so sample() keeps the built std and kl() the built var (here too, though
    they are computed lazily)."""
    p = params(seed=9).detach()
    post = GaussianPosterior(p)
    built_lv = post.logvar.clone()
    post.logvar = torch.full_like(built_lv, -20.0)
    torch.testing.assert_close(post.std, torch.exp(0.5 * built_lv))
    torch.testing.assert_close(post.var, torch.exp(built_lv))
    z = post.sample(generator=torch.Generator().manual_seed(1))
    zeros = torch.zeros_like(post.mean)
    eps = fastvae.reparameterize(zeros, zeros, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, post.mean + torch.exp(0.5 * built_lv) * eps, rtol=0, atol=0)
    m = post.mean.double()
    want = 0.5 * (m**2 + built_lv.double().exp() - 1 + 20.0).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl().double(), want, rtol=1e-6, atol=1e-6)


def test_an_assigned_mean_after_a_sample_is_what_kl_reads():
    """The KL kept from the fused sample is of the mean it sampled; after `post.mean = ...`
    kl() reads the new mean, as diffusers' does."""
    p = params(seed=10).detach()
    post = GaussianPosterior(p)
    post.sample()
    post.mean = post.mean + 1.0
    m, lv = post.mean.double(), post.logvar.double()
    want = 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl().double(), want, rtol=1e-6, atol=1e-6)


def test_kl_of_assigned_moments_reads_the_others_var():
    p = params(seed=11).detach()
    post, other = GaussianPosterior(p), GaussianPosterior(params(seed=12).detach())
    post.std = post.std  # assigned (unchanged): the formula path
    other.var = other.var * 2.0  # diffusers' kl(other) divides by other.var
    m, lv, var = post.mean.double(), post.logvar.double(), post.var.double()
    om, olv, ovar = other.mean.double(), other.logvar.double(), other.var.double()
    want = 0.5 * ((m - om) ** 2 / ovar + var / ovar - 1 - lv + olv).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(other).double(), want, rtol=1e-6, atol=1e-6)


def _kl_by_diffusers_formula(post, other):
    m, lv, var = post.mean.double(), post.logvar.double(), post.var.double()
    om, olv, ovar = other.mean.double(), other.logvar.double(), other.var.double()
    return 0.5 * ((m - om) ** 2 / ovar + var / ovar - 1 - lv + olv).sum(dim=(1, 2, 3))


@pytest.mark.parametrize("semantics", ["fastvae", "diffusers"])
def test_kl_reads_the_others_assigned_var_when_self_has_none_assigned(semantics):
    """diffusers' kl(other) divides by other.var as it stands: a var assigned to the other
    posterior counts even when this one's moments are its own (the fused op would use
    e^other.logvar instead)."""
    post = GaussianPosterior(params(seed=14).detach(), semantics=semantics)
    other = GaussianPosterior(params(seed=15).detach(), semantics=semantics)
    other.var = other.var * 4.0
    torch.testing.assert_close(post.kl(other).double(), _kl_by_diffusers_formula(post, other),
                               rtol=1e-6, atol=1e-6)


def test_kl_against_another_object_reads_its_var():
    """Another object with mean, logvar and var tensors (diffusers' own
    DiagonalGaussianDistribution, whose attributes are plain): its var is read as
    diffusers' kl(other) reads it, assigned or not."""
    post = GaussianPosterior(params(seed=16).detach())
    source = GaussianPosterior(params(seed=17).detach())
    other = types.SimpleNamespace(mean=source.mean, logvar=source.logvar, var=source.var * 0.5)
    torch.testing.assert_close(post.kl(other).double(), _kl_by_diffusers_formula(post, other),
                               rtol=1e-6, atol=1e-6)
    other.var = source.logvar.exp()  # its own e^logvar: the same KL as the other posterior's
    torch.testing.assert_close(post.kl(other), post.kl(source), rtol=1e-5, atol=1e-5)


def test_a_deterministic_posterior_samples_with_an_assigned_std():
    """diffusers' deterministic posterior has std = 0 and samples mean + std * eps: an
    assigned std is sampled with there, and here."""
    p = params(seed=13).detach()
    post = GaussianPosterior(p, deterministic=True)
    post.std = torch.ones_like(post.mean)
    z = post.sample(generator=torch.Generator().manual_seed(2))
    assert not torch.equal(z, post.mean)
    zeros = torch.zeros_like(post.mean)
    eps = fastvae.reparameterize(zeros, zeros, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(z, post.mean + eps, rtol=0, atol=0)


@pytest.mark.parametrize("semantics", ["fastvae", "diffusers"])
def test_std_and_var_first_read_in_compiled_code_of_a_posterior_built_outside(semantics):
    """The logvar std and var are made from is checked for in-place writes by its version
    counter, which compiled code cannot read: a posterior built eagerly whose std is first
    read inside torch.compile(fullgraph=True) failed ("data-dependent expression")."""
    p = params((2, 8, 4, 4), seed=13).detach()
    post = GaussianPosterior(p, semantics=semantics)
    got = torch.compile(lambda post: post.mean + post.std * post.var, fullgraph=True,
                        backend="aot_eager")(post)
    lv = p[:, 4:].clamp(-30.0, 20.0)
    torch.testing.assert_close(got, p[:, :4] + torch.exp(0.5 * lv) * torch.exp(lv))
