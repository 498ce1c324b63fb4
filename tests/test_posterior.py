"""GaussianPosterior against the diagonal-Gaussian formulas."""

import math

import pytest
import torch

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
    with pytest.raises(ValueError, match="sample and mean must have the same shape"):
        post.nll(torch.randn(5, 4))


def test_float64_stays_float64():
    post = GaussianPosterior(torch.randn(3, 8, dtype=torch.float64))
    other = GaussianPosterior(torch.randn(3, 8, dtype=torch.float64))
    assert post.kl().dtype == post.kl(other).dtype == post.nll(post.mean).dtype == torch.float64
