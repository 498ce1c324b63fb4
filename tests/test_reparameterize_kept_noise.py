"""On the CPU the PyTorch path keeps a reparameterization's noise for its backward
instead of drawing it a second time (issue 14); the gradients are the same."""

import pytest
import torch

import fastvae
from fastvae import _torch_impl


def _latents(shape=(16, 40), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen).requires_grad_(True),
            torch.randn(shape, generator=gen).requires_grad_(True))


def _count_draws(monkeypatch):
    draws = []
    real = _torch_impl.standard_normal

    def counting(*args, **kwargs):
        draws.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(_torch_impl, "standard_normal", counting)
    return draws


@pytest.mark.parametrize("with_kl", [False, True])
def test_backward_uses_the_kept_noise_and_draws_none(monkeypatch, with_kl):
    draws = _count_draws(monkeypatch)
    mu, logvar = _latents()
    gen = torch.Generator().manual_seed(5)
    out = fastvae.sample_and_kl(mu, logvar, generator=gen) if with_kl \
        else fastvae.reparameterize(mu, logvar, generator=gen)
    z = out[0] if with_kl else out
    assert len(draws) == 1
    loss = (z * torch.linspace(-1, 1, z.shape[1])).sum() + (out[1].sum() if with_kl else 0)
    loss.backward()
    assert len(draws) == 1  # the backward drew nothing


@pytest.mark.parametrize("with_kl", [False, True])
def test_kept_and_regenerated_noise_give_identical_gradients(monkeypatch, with_kl):
    def grads():
        mu, logvar = _latents()
        gen = torch.Generator().manual_seed(7)
        out = fastvae.sample_and_kl(mu, logvar, generator=gen, logvar_clamp=(-1.0, 1.0)) if with_kl \
            else fastvae.reparameterize(mu, logvar, generator=gen)
        z = out[0] if with_kl else out
        loss = (z * z).sum() + (out[1].sum() if with_kl else 0)
        return torch.autograd.grad(loss, (mu, logvar)), z.detach()

    (kept_mu, kept_lv), z_kept = grads()
    monkeypatch.setattr(_torch_impl, "_take_noise", lambda key: None)  # forces regeneration
    (regen_mu, regen_lv), z_regen = grads()
    assert torch.equal(z_kept, z_regen)
    assert torch.equal(kept_mu, regen_mu) and torch.equal(kept_lv, regen_lv)


def test_second_backward_regenerates_the_noise():
    mu, logvar = _latents()
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(3))
    first = torch.autograd.grad(z.sum(), (mu, logvar), retain_graph=True)
    second = torch.autograd.grad(z.sum(), (mu, logvar))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_kept_noise_is_bounded_and_not_kept_without_grad():
    _torch_impl._kept_noise.clear()
    plain = torch.randn(8, 8), torch.randn(8, 8)
    fastvae.reparameterize(*plain)
    assert not _torch_impl._kept_noise  # nothing can call a backward
    mu, logvar = _latents((8, 8))
    for _ in range(3 * _torch_impl.KEPT_NOISE_SLOTS):
        fastvae.reparameterize(mu, logvar)  # forwards whose backward never runs
    assert len(_torch_impl._kept_noise) == _torch_impl.KEPT_NOISE_SLOTS
    _torch_impl._kept_noise.clear()


@pytest.mark.parametrize("prior", [False, True])
def test_two_draws_from_one_seed_with_other_logvars_keep_their_own_gradients(prior):
    """A reseeded generator gives two calls the same seed, so the same kept slot: the
    backward of the first (run last) must still use its own logvar's std."""
    mu, logvar = _latents()
    other_logvar = (logvar.detach() + 1.5).requires_grad_(True)
    kwargs = dict(prior_mu=torch.zeros(40), prior_logvar=torch.zeros(40)) if prior else {}

    def sample(lv):
        return fastvae.sample_and_kl(mu, lv, generator=torch.Generator().manual_seed(11), **kwargs)[0]

    z_first, z_second = sample(logvar), sample(other_logvar)
    weights = torch.linspace(-1, 1, 40)
    (z_second * weights).sum().backward()
    (z_first * weights).sum().backward()
    # d z / d logvar = eps exp(logvar / 2) / 2, with eps = (z - mu) / exp(logvar / 2)
    eps = ((z_first - mu) / torch.exp(0.5 * logvar)).detach()
    want = weights * eps * torch.exp(0.5 * logvar.detach()) / 2
    torch.testing.assert_close(logvar.grad, want)


def test_one_seed_and_one_logvar_with_two_clamps_keep_their_own_gradients():
    """The kept eps std / 2 depends on the clamp: two calls from one seed on the same
    logvar with different clamps must not take each other's entry (both are kept)."""
    mu, logvar = _latents()
    with torch.no_grad():
        logvar.mul_(3.0)  # some values beyond the clamps
    weights = torch.linspace(-1, 1, 40)
    grads = []
    for clamp in ((-1.0, 1.0), (-2.0, 2.0)):
        z = fastvae.sample_and_kl(mu, logvar, generator=torch.Generator().manual_seed(13),
                                  logvar_clamp=clamp)[0]
        grads.append((clamp, z.detach(), z))
    assert len(_torch_impl._kept_noise) >= 2
    for clamp, z_value, z in grads:  # the first call's backward first: the later entry is not its own
        (g_lv,) = torch.autograd.grad((z * weights).sum(), [logvar])
        inside = (logvar.detach() >= clamp[0]) & (logvar.detach() <= clamp[1])
        # d z / d logvar = (z - mu) / 2 where the clamp passes the gradient, else 0
        want = weights * (z_value - mu.detach()) / 2 * inside
        torch.testing.assert_close(g_lv, want)


def test_the_kept_entry_is_the_gradient_wrt_logvar():
    """What the forward keeps is eps std / 2 = d z / d logvar itself: the backward is one
    multiply by grad_z, equal bit for bit to drawing the noise again."""
    _torch_impl._kept_noise.clear()
    mu, logvar = _latents((4, 6))
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(21))
    (kept,) = _torch_impl._kept_noise.values()
    torch.testing.assert_close(kept, (z.detach() - mu.detach()) / 2)
    _torch_impl._kept_noise.clear()
