"""Property tests (hypothesis): identities that hold for any shapes and values."""

import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastvae

shapes = st.tuples(st.integers(1, 5), st.lists(st.integers(1, 6), min_size=1, max_size=3),
                   st.lists(st.integers(1, 6), min_size=1, max_size=3))


def draw_inputs(recon, shape, seed):
    n, x_dims, z_dims = shape
    g = torch.Generator().manual_seed(seed)
    x_shape, z_shape = (n, *x_dims), (n, *z_dims)
    x_hat = torch.randn(x_shape, generator=g) * 3
    if recon == "bce":
        x_hat = torch.sigmoid(x_hat)
    x = torch.rand(x_shape, generator=g)
    return x_hat, x, torch.randn(z_shape, generator=g) * 2, torch.randn(z_shape, generator=g) * 2


@settings(max_examples=60, deadline=None, derandomize=True)  # the same examples on every run
@given(recon=st.sampled_from(["mse", "l1", "bce", "bce_logits"]), shape=shapes,
       beta=st.floats(0, 10), seed=st.integers(0, 2**31))
def test_reductions_agree_and_match_formula(recon, shape, beta, seed):
    x_hat, x, mu, logvar = draw_inputs(recon, shape, seed)
    per = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, beta=beta, reduction="none",
                           return_parts=True)
    total = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, beta=beta, return_parts=True)
    mean = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, beta=beta, reduction="mean",
                            return_parts=True)
    n = x.shape[0]
    torch.testing.assert_close(per.loss.sum(), total.loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mean.recon * x.numel(), total.recon, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mean.kl * mu.numel(), total.kl, rtol=1e-5, atol=1e-4)
    batchmean = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, beta=beta, reduction="batchmean")
    torch.testing.assert_close(batchmean * n, total.loss, rtol=1e-5, atol=1e-4)
    assert (per.kl >= -1e-4).all()  # KL divergence is non-negative
    want = ref.vae_loss(x_hat, x, mu, logvar, recon, beta, "none")[0]
    torch.testing.assert_close(per.loss.double(), want, rtol=1e-5, atol=1e-4)
