"""VAELoss is vae_loss with its options fixed in the constructor."""

import torch

import fastvae


def test_vae_loss_module_equals_function():
    g = torch.Generator().manual_seed(0)
    x_hat, x = torch.randn(4, 10, generator=g), torch.rand(4, 10, generator=g)
    mu, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    options = dict(recon="bce_logits", beta=0.3, reduction="none", logvar_clamp=(-2.0, 2.0))
    module = fastvae.VAELoss(**options, return_parts=True)
    got = module(x_hat, x, mu, logvar)
    want = fastvae.vae_loss(x_hat, x, mu, logvar, **options, return_parts=True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert "bce_logits" in repr(module)
    module.beta = torch.tensor(0.9)  # a schedule changes beta between steps
    torch.testing.assert_close(module(x_hat, x, mu, logvar).loss, got.recon + 0.9 * got.kl)
