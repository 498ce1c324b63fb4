"""On the CPU the PyTorch path keeps a reparameterization's noise for its backward
instead of drawing it a second time (issue 14); the gradients are the same.

Two places keep it: calls of at most SMALL_NUMEL latent elements (``SMALL``) save
eps std / 2 with their autograd node; larger ones (``GENERAL``) keep it in a
bounded table, keyed by seed and logvar, and draw it again if it is gone."""

import pytest
import torch

import fastvae
from fastvae import _torch_impl

SMALL = (16, 40)
GENERAL = (4, 40000)  # above SMALL_NUMEL (asserted below), one noise chunk
SHAPES = pytest.mark.parametrize("shape", [SMALL, GENERAL], ids=["small", "general"])


def test_the_two_shapes_take_the_two_paths():
    assert SMALL[0] * SMALL[1] <= _torch_impl.SMALL_NUMEL < GENERAL[0] * GENERAL[1]
    for shape, name in ((SMALL, "_SmallSampleFunction"), (GENERAL, "_ReparameterizeFunction")):
        z = fastvae.reparameterize(*_latents(shape))
        assert name in type(z.grad_fn).__name__


def _latents(shape=GENERAL, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen).requires_grad_(True),
            torch.randn(shape, generator=gen).requires_grad_(True))


def _count_draws(monkeypatch):
    """Every draw of noise (of at most one chunk) reseeds this thread's generator."""
    draws = []
    real = _torch_impl._cpu_generator

    def counting():
        draws.append(1)
        return real()

    monkeypatch.setattr(_torch_impl, "_cpu_generator", counting)
    return draws


@SHAPES
@pytest.mark.parametrize("with_kl", [False, True])
def test_backward_uses_the_kept_noise_and_draws_none(monkeypatch, with_kl, shape):
    draws = _count_draws(monkeypatch)
    mu, logvar = _latents(shape)
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
    """(The table's path: a small call's saved noise cannot go missing.)"""
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


@SHAPES
def test_second_backward_gives_the_same_gradients(shape):
    """The table's path draws the noise again; the small path reads its saved noise
    again (the first backward must not have written over it)."""
    mu, logvar = _latents(shape)
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(3))
    first = torch.autograd.grad(z.sum(), (mu, logvar), retain_graph=True)
    second = torch.autograd.grad(z.sum(), (mu, logvar))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_kept_noise_is_bounded_and_not_kept_without_grad():
    _torch_impl._kept_noise.clear()
    plain = torch.randn(GENERAL), torch.randn(GENERAL)
    fastvae.reparameterize(*plain)
    assert not _torch_impl._kept_noise  # nothing can call a backward
    mu, logvar = _latents()
    for _ in range(3 * _torch_impl.KEPT_NOISE_SLOTS):
        fastvae.reparameterize(mu, logvar)  # forwards whose backward never runs
    assert len(_torch_impl._kept_noise) == _torch_impl.KEPT_NOISE_SLOTS
    _torch_impl._kept_noise.clear()
    z = fastvae.reparameterize(*_latents(SMALL))  # saved with its node, not in the table
    assert not _torch_impl._kept_noise
    del z


@SHAPES
@pytest.mark.parametrize("prior", [False, True])
def test_two_draws_from_one_seed_with_other_logvars_keep_their_own_gradients(prior, shape):
    """A reseeded generator gives two calls the same seed, so the same kept slot: the
    backward of the first (run last) must still use its own logvar's std."""
    mu, logvar = _latents(shape)
    width = shape[1]
    other_logvar = (logvar.detach() + 1.5).requires_grad_(True)
    kwargs = dict(prior_mu=torch.zeros(width), prior_logvar=torch.zeros(width)) if prior else {}

    def sample(lv):
        return fastvae.sample_and_kl(mu, lv, generator=torch.Generator().manual_seed(11), **kwargs)[0]

    z_first, z_second = sample(logvar), sample(other_logvar)
    weights = torch.linspace(-1, 1, width)
    (z_second * weights).sum().backward()
    (z_first * weights).sum().backward()
    # d z / d logvar = eps exp(logvar / 2) / 2, with eps = (z - mu) / exp(logvar / 2)
    eps = ((z_first - mu) / torch.exp(0.5 * logvar)).detach()
    want = weights * eps * torch.exp(0.5 * logvar.detach()) / 2
    torch.testing.assert_close(logvar.grad, want)


@SHAPES
def test_one_seed_and_one_logvar_with_two_clamps_keep_their_own_gradients(shape):
    """The kept eps std / 2 depends on the clamp: two calls from one seed on the same
    logvar with different clamps must not take each other's entry (both are kept)."""
    mu, logvar = _latents(shape)
    with torch.no_grad():
        logvar.mul_(3.0)  # some values beyond the clamps
    weights = torch.linspace(-1, 1, shape[1])
    grads = []
    for clamp in ((-1.0, 1.0), (-2.0, 2.0)):
        z = fastvae.sample_and_kl(mu, logvar, generator=torch.Generator().manual_seed(13),
                                  logvar_clamp=clamp)[0]
        grads.append((clamp, z.detach(), z))
    if shape == GENERAL:
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
    mu, logvar = _latents()
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(21))
    (kept,) = _torch_impl._kept_noise.values()
    torch.testing.assert_close(kept, (z.detach() - mu.detach()) / 2)
    _torch_impl._kept_noise.clear()


def test_the_small_path_saves_the_gradient_wrt_logvar_with_its_node():
    """What it saves: eps std / 2, and mu and logvar only where the backward reads them
    (the KL reads both, a clamp logvar)."""
    mu, logvar = _latents(SMALL)
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(21))
    saved = z.grad_fn.saved_tensors
    assert saved[0] is None and saved[1] is None
    torch.testing.assert_close(saved[2], (z.detach() - mu.detach()) / 2)
    z, _ = fastvae.sample_and_kl(mu, logvar)
    assert z.grad_fn.saved_tensors[0] is mu and z.grad_fn.saved_tensors[1] is logvar
    z, _ = fastvae.sample_and_kl(mu, logvar, logvar_clamp=(-1.0, 1.0))
    assert z.grad_fn.saved_tensors[1] is logvar


def test_the_small_path_allows_writing_mu_before_the_backward_as_eager_does():
    """Eager's mu + eps std saves neither mu nor anything computed from it, so mu may be
    updated in place (an optimizer step on it) before the backward: so may fastvae's."""
    mu, logvar = _latents(SMALL)
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(5))
    eps_std = (z - mu).detach()
    with torch.no_grad():
        mu.add_(1.0)
    weights = torch.linspace(-1, 1, SMALL[1])
    g_mu, g_lv = torch.autograd.grad((z * weights).sum(), (mu, logvar))
    torch.testing.assert_close(g_mu, weights.expand(SMALL))
    torch.testing.assert_close(g_lv, weights * eps_std / 2)
