"""Inputs made under torch.inference_mode (e.g. the latents of a frozen encoder, or a
dataset prepared there) next to inputs that need gradients: autograd refuses to save
an inference tensor, so fastvae saves none of the inputs no gradient flows to (as
eager saves nothing for them) and a copy of those its backward must read. The
gradients equal those of the same call on ordinary tensors."""

import pytest
import torch

import fastvae
from fastvae import _torch_impl

# (rows, x columns, latent columns): the small-input path and the general one
SIZES = {"small": (4, 10, 3), "general": (4, _torch_impl.SMALL_NUMEL // 4 + 8,
                                          _torch_impl.SMALL_NUMEL // 4 + 8)}


def _inputs(size, recon):
    rows, cols, latent = SIZES[size]
    g = torch.Generator().manual_seed(0)
    x_hat = torch.randn(rows, cols, generator=g)
    x = torch.rand(rows, cols, generator=g)
    mu, logvar = torch.randn(rows, latent, generator=g), torch.randn(rows, latent, generator=g)
    return {"x_hat": x_hat if recon != "bce" else torch.sigmoid(x_hat), "x": x, "mu": mu,
            "logvar": logvar}


def _call_twice(inputs, frozen, fn, grad_x=False):
    """fn's output and gradients with the ``frozen`` inputs as inference tensors and
    the rest requiring grad (the target x only with ``grad_x``), then the same with
    ordinary tensors throughout."""
    results = []
    for inference in (True, False):
        args = {}
        for name, t in inputs.items():
            if name in frozen:
                if inference:
                    with torch.inference_mode():
                        t = t.clone()
                    assert t.is_inference()
                args[name] = t
            else:
                args[name] = t.clone().requires_grad_(name != "x" or grad_x)
        torch.manual_seed(3)  # the same noise for both calls
        out = fn(**args)
        leaves = [t for t in args.values() if t.requires_grad]
        results.append((out, torch.autograd.grad(out, leaves)))
    return results


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("frozen", [("mu", "logvar"), ("mu",), ("logvar",), ("x",)])
@pytest.mark.parametrize("recon", ["mse", "bce_logits", "bce"])
def test_loss_with_inference_tensor_inputs(size, frozen, recon):
    (got, got_grads), (want, want_grads) = _call_twice(
        _inputs(size, recon), frozen,
        lambda x_hat, x, mu, logvar: fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("prior", [False, True], ids=["standard", "prior"])
@pytest.mark.parametrize("recon", ["mse", "bce_logits", "bce", "continuous_bernoulli"])
def test_loss_with_an_inference_tensor_x_hat_and_a_target_needing_grad(size, prior, recon):
    """The target's gradient of bce, bce_logits and continuous_bernoulli reads x_hat:
    a frozen (inference) x_hat is saved as a copy (it raised "Inference tensors cannot
    be saved for backward")."""
    inputs = {k: v.clamp(0.05, 0.95) if k == "x_hat" and recon == "bce" else v
              for k, v in _inputs(size, recon).items()}
    options = {"prior_mu": torch.zeros(inputs["mu"].shape[1])} if prior else {}
    (got, got_grads), (want, want_grads) = _call_twice(
        inputs, ("x_hat",),
        lambda x_hat, x, mu, logvar: fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon,
                                                      **options), grad_x=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(got_grads) == 3  # x, mu, logvar
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


SAMPLING = {
    "kl_divergence": lambda mu, logvar: fastvae.kl_divergence(mu, logvar),
    "kl_clamped": lambda mu, logvar: fastvae.kl_divergence(mu, logvar, logvar_clamp=(-1.0, 1.0)),
    "reparameterize": lambda mu, logvar: fastvae.reparameterize(mu, logvar).sum(),
    "sample_and_kl": lambda mu, logvar: sum(
        o.sum() for o in fastvae.sample_and_kl(mu, logvar, logvar_clamp=(-1.0, 1.0))),
    "num_samples": lambda mu, logvar: fastvae.reparameterize(mu, logvar, num_samples=2).sum(),
    "prior": lambda mu, logvar: fastvae.kl_divergence(
        mu, logvar, prior_mu=torch.ones(mu.shape[1]), prior_logvar=torch.zeros(mu.shape[1])),
}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("frozen", ["mu", "logvar"])
@pytest.mark.parametrize("name", list(SAMPLING))
def test_latent_ops_with_one_inference_tensor_input(size, frozen, name):
    inputs = {k: v for k, v in _inputs(size, "mse").items() if k in ("mu", "logvar")}
    (got, got_grads), (want, want_grads) = _call_twice(inputs, (frozen,), SAMPLING[name])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("size", list(SIZES))
def test_loss_with_an_inference_tensor_beta(size):
    """A KL weight made under inference mode (a schedule's tensor) weighs the KL's gradients."""
    inputs = dict(_inputs(size, "mse"), beta=torch.tensor(0.25))
    (got, got_grads), (want, want_grads) = _call_twice(
        inputs, ("beta",),
        lambda x_hat, x, mu, logvar, beta: fastvae.vae_loss(x_hat, x, mu, logvar, beta=beta))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_large_sampling_keeps_no_noise_for_an_inference_logvar():
    """Its backward reads a copy of logvar (another key), so noise kept for it would sit
    unused in the table until evicted: none is kept, and the backward draws it again."""
    inputs = _inputs("general", "mse")
    with torch.inference_mode():
        logvar = inputs["logvar"].clone()
    _torch_impl._kept_noise.clear()
    fastvae.reparameterize(inputs["mu"].clone().requires_grad_(), logvar)
    assert len(_torch_impl._kept_noise) == 0
    fastvae.reparameterize(inputs["mu"].clone().requires_grad_(), inputs["logvar"].clone())
    assert len(_torch_impl._kept_noise) == 1  # (an ordinary logvar's is kept)
