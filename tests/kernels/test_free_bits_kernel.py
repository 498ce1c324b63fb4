"""Free bits on the kernels (kernels/vae_loss.py: the column-sum pre-pass, the
gradients of held latent elements zeroed in the loss/KL pass, the KL value from
the floored column sums), held to the PyTorch path and to tests/reference.py
(float64, from the math): every reduction, with and without a prior, with a
logvar clamp, bfloat16 inputs, NaN, split tiles, bitwise reruns."""

import contextlib

import pytest
import reference as ref
import torch
from fastvae.kernels import vae_loss as vae_loss_kernels

import fastvae
from fastvae import kernels, ops

REDUCTIONS = ("sum", "batchmean", "mean")
X_SHAPE, Z_SHAPE = (5, 7), (5, 2, 3)  # N = 5 samples, d = 6 latent elements each
BETA = 0.7
# weights of (loss, recon, kl) in the differentiated total: each part's gradient counts
WEIGHTS = (1.3, 0.6, -0.4)
CLAMP = (-1.0, 0.8)


def make(device, dtype=torch.float32, prior="none", seed=0):
    """(x_hat, x, mu, logvar, prior_mu, prior_logvar) on ``device`` in ``dtype``
    (the prior None, a learned (2, 3) one over the trailing dims, or per sample)."""
    g = torch.Generator().manual_seed(seed)
    x_hat, x = torch.randn(X_SHAPE, generator=g), torch.rand(X_SHAPE, generator=g)
    mu, logvar = torch.randn(Z_SHAPE, generator=g), 1.5 * torch.randn(Z_SHAPE, generator=g)
    shape = {"none": None, "learned": Z_SHAPE[1:], "per_sample": Z_SHAPE}[prior]
    pm = plv = None
    if shape is not None:
        pm, plv = torch.randn(shape, generator=g), 0.5 * torch.randn(shape, generator=g)
    return [None if t is None else t.to(device, dtype) for t in (x_hat, x, mu, logvar, pm, plv)]


def batch_means(mu, logvar, pm, plv, clamp):
    """K_k: the float64 batch-mean KL of each latent element."""
    cpu = [None if t is None else t.detach().cpu() for t in (mu, logvar, pm, plv)]
    return ref.kl_elementwise_prior(*cpu, logvar_clamp=clamp).reshape(mu.shape[0], -1).mean(0)


def floor_that_bites(mu, logvar, pm, plv, clamp=None):
    """A free_bits halfway between the two middle K_k: half the latent elements are
    held at it, half are not, and none is within rounding of it."""
    k = batch_means(mu, logvar, pm, plv, clamp).sort().values
    middle = k.numel() // 2
    assert k[middle] - k[middle - 1] > 1e-3 * k[middle]  # a clear gap at these seeds
    return float(k[middle - 1] + k[middle]) / 2


def run(x_hat, x, mu, logvar, pm, plv, **options):
    """The loss parts and the KL op's value, and the gradients of
    sum(WEIGHTS . parts) + 0.9 kl_divergence with respect to x_hat, mu, logvar and
    the prior (those present)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_()
              for t in (x_hat, mu, logvar, pm, plv)]
    x_hat, mu, logvar, pm, plv = leaves
    parts = fastvae.vae_loss(x_hat, x, mu, logvar, prior_mu=pm, prior_logvar=plv,
                             return_parts=True, beta=BETA, **options)
    kl_options = {k: v for k, v in options.items() if k not in ("recon", "obs_logvar")}
    kl = fastvae.kl_divergence(mu, logvar, prior_mu=pm, prior_logvar=plv, **kl_options)
    total = sum(w * p for w, p in zip(WEIGHTS, parts)) + 0.9 * kl
    grads = torch.autograd.grad(total, [t for t in leaves if t is not None])
    return [p.detach() for p in (*parts, kl)], list(grads)


def reference(x_hat, x, mu, logvar, pm, plv, free_bits, reduction, logvar_clamp=None):
    """``run`` in float64 from tests/reference.py (gradients by autograd)."""
    leaves = [None if t is None else t.detach().cpu().double().requires_grad_()
              for t in (x_hat, mu, logvar, pm, plv)]
    x_hat, mu, logvar, pm, plv = leaves
    kl = ref.kl_free_bits(ref.kl_elementwise_prior(mu, logvar, pm, plv, logvar_clamp),
                          free_bits, reduction)
    recon = ref.reduce(ref.recon_elementwise(x_hat, x.cpu(), "mse"), reduction)
    parts = (recon + BETA * kl, recon, kl)
    total = sum(w * p for w, p in zip(WEIGHTS, parts)) + 0.9 * kl
    grads = torch.autograd.grad(total, [t for t in leaves if t is not None])
    return [p.detach() for p in (*parts, kl)], list(grads)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        if e.dtype == torch.float64 and a.dtype != torch.float64:
            a = a.double()
        else:
            assert a.dtype == e.dtype
        torch.testing.assert_close(a.cpu(), e.cpu(), rtol=rtol, atol=atol, equal_nan=True)


def held_columns(mu, logvar, pm, plv, free_bits, clamp=None):
    """(N, d)-broadcastable bool: the latent elements held at the floor."""
    return (batch_means(mu, logvar, pm, plv, clamp) < free_bits).to(mu.device)


@pytest.mark.parametrize("clamp", [None, CLAMP])
@pytest.mark.parametrize("prior", ["none", "learned", "per_sample"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_pytorch_path_and_oracle(backends, device, reduction, prior, clamp):
    x_hat, x, mu, logvar, pm, plv = make(device, prior=prior)
    fb = floor_that_bites(mu, logvar, pm, plv, clamp)
    options = dict(reduction=reduction, free_bits=fb, logvar_clamp=clamp)
    k_values, k_grads = backends.kernels(run, x_hat, x, mu, logvar, pm, plv, **options)
    t_values, t_grads = backends.torch(run, x_hat, x, mu, logvar, pm, plv, **options)
    assert all(v.dtype == torch.float32 and v.shape == () for v in k_values)
    assert_close(k_values, t_values)
    assert_close(k_grads, t_grads)
    r_values, r_grads = reference(x_hat, x, mu, logvar, pm, plv, fb, reduction, clamp)
    assert_close(k_values, r_values)
    assert_close(k_grads, r_grads)
    # the held elements pass no KL gradient: mu's is the KL's alone, zero there
    held = held_columns(mu, logvar, pm, plv, fb, clamp).reshape(Z_SHAPE[1:])
    assert held.any() and not held.all()
    grad_mu = k_grads[1]
    assert (grad_mu[:, held] == 0).all() and (grad_mu[:, ~held] != 0).all()


@pytest.mark.parametrize("max_block,max_rows,max_iters", [(4, 1, 2), (2, 2, 1), (8, 4, 1)])
@pytest.mark.parametrize("prior", ["none", "per_sample"])
def test_split_over_many_programs(backends, device, split, prior, max_block, max_rows,
                                  max_iters):
    # several column programs in the pre-pass (d = 6 over blocks of 2, 4 or 8 columns,
    # partial blocks), several row iterations each, and the loss pass split too
    x_hat, x, mu, logvar, pm, plv = make(device, prior=prior, seed=1)
    fb = floor_that_bites(mu, logvar, pm, plv, CLAMP)
    options = dict(reduction="batchmean", free_bits=fb, logvar_clamp=CLAMP)
    with split(max_block, max_rows, max_iters):
        k_values, k_grads = backends.kernels(run, x_hat, x, mu, logvar, pm, plv, **options)
        sums = backends.kernels(vae_loss_kernels._kl_column_sums, mu, logvar,
                                None if pm is None else (pm, plv), *CLAMP)
    t_values, t_grads = backends.torch(run, x_hat, x, mu, logvar, pm, plv, **options)
    assert_close(k_values, t_values)
    assert_close(k_grads, t_grads)
    r_values, r_grads = reference(x_hat, x, mu, logvar, pm, plv, fb, "batchmean", CLAMP)
    assert_close(k_values, r_values)
    assert_close(k_grads, r_grads)
    # the pre-pass itself: C_k = N K_k
    assert sums.dtype == torch.float32
    assert_close([sums], [mu.shape[0] * batch_means(mu, logvar, pm, plv, CLAMP)])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bfloat16_inputs(backends, device, reduction):
    x_hat, x, mu, logvar, pm, plv = make(device, dtype=torch.bfloat16, prior="learned", seed=2)
    fb = floor_that_bites(mu, logvar, pm, plv)
    options = dict(reduction=reduction, free_bits=fb)
    k_values, k_grads = backends.kernels(run, x_hat, x, mu, logvar, pm, plv, **options)
    t_values, t_grads = backends.torch(run, x_hat, x, mu, logvar, pm, plv, **options)
    assert all(v.dtype == torch.float32 for v in k_values)  # float32 math and values
    assert all(g.dtype == torch.bfloat16 for g in k_grads)  # gradients in the inputs' dtype
    # gradients: rounded to bfloat16 twice on both backends (the saved gradient, then its
    # product with grad_output; the prior's also summed over the batch in bfloat16)
    grad_rtol = 2.0**-6
    assert_close(k_values, t_values)
    assert_close(k_grads, t_grads, rtol=grad_rtol, atol=1e-5)
    # against float64 math on the same bfloat16 values: values to float32 rounding
    r_values, r_grads = reference(x_hat, x, mu, logvar, pm, plv, fb, reduction)
    assert_close(k_values, r_values)
    assert_close(k_grads, r_grads, rtol=grad_rtol, atol=1e-5)


def test_fitted_observation_scale_with_free_bits(backends, device):
    """obs_logvar="optimal" takes its own launcher path (per-sample sums, then torch
    ops): its KL must be the free-bits one too."""
    x_hat, x, mu, logvar, pm, plv = make(device, prior="learned", seed=3)
    fb = floor_that_bites(mu, logvar, pm, plv)
    options = dict(reduction="batchmean", free_bits=fb, recon="gaussian", obs_logvar="optimal")
    k_values, k_grads = backends.kernels(run, x_hat, x, mu, logvar, pm, plv, **options)
    t_values, t_grads = backends.torch(run, x_hat, x, mu, logvar, pm, plv, **options)
    assert_close(k_values, t_values)
    assert_close(k_grads, t_grads)
    ref_kl = ref.kl_free_bits(ref.kl_elementwise_prior(
        *(t.cpu().double() for t in (mu, logvar, pm, plv))), fb, "batchmean")
    torch.testing.assert_close(k_values[2].cpu().double(), ref_kl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prior", ["none", "learned"])
def test_nan_logvar_makes_the_kl_nan_and_its_gradient_nan_only_there(backends, device, prior):
    x_hat, x, mu, logvar, pm, plv = make(device, prior=prior, seed=4)
    fb = floor_that_bites(mu, logvar, pm, plv, CLAMP)
    logvar[1, 0, 2] = float("nan")  # clamp(NaN) = NaN: column (0, 2)'s sum is NaN
    options = dict(reduction="sum", free_bits=fb, logvar_clamp=CLAMP)
    k_values, k_grads = backends.kernels(run, x_hat, x, mu, logvar, pm, plv, **options)
    loss, recon, kl, kl_alone = k_values
    assert loss.isnan() and kl.isnan() and kl_alone.isnan() and recon.isfinite()
    # a NaN column counts as not above the floor: its gradients are 0 except the NaN
    # element's logvar gradient, which stays NaN (0 * NaN), as on the PyTorch path
    grad_x_hat, grad_mu, grad_logvar = k_grads[:3]
    assert grad_x_hat.isfinite().all() and grad_mu.isfinite().all()
    assert torch.equal(grad_logvar.isnan(), logvar.isnan())
    assert (grad_mu[:, 0, 2] == 0).all()
    t_values, t_grads = backends.torch(run, x_hat, x, mu, logvar, pm, plv, **options)
    assert_close(k_values, t_values)
    assert_close(k_grads, t_grads)


def test_deterministic_bitwise(backends, device, split):
    x_hat, x, mu, logvar, pm, plv = make(device, prior="per_sample", seed=5)
    fb = floor_that_bites(mu, logvar, pm, plv)
    for forced in ((2, 1, 2), None):
        runs = []
        for _ in range(2):
            with split(*forced) if forced else contextlib.nullcontext():
                runs.append(backends.kernels(run, x_hat, x, mu, logvar, pm, plv,
                                             reduction="sum", free_bits=fb))
        (v1, g1), (v2, g2) = runs
        assert all(torch.equal(a, b) for a, b in zip(v1 + g1, v2 + g2))


def test_free_bits_calls_take_the_kernels(backends, device, monkeypatch):
    calls = []
    for name in ("vae_loss_forward_with_prior", "kl_forward_with_prior"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    x_hat, x, mu, logvar, pm, plv = make(device)
    fb = floor_that_bites(mu, logvar, pm, plv)
    backends.kernels(run, x_hat, x, mu, logvar, pm, plv, free_bits=fb)
    assert calls == ["vae_loss_forward_with_prior", "kl_forward_with_prior"]


@pytest.mark.parametrize("prior", ["none", "learned"])
def test_opcheck_with_free_bits(backends, device, prior):
    """The kernels' free-bits outputs have the dtypes and shapes of the ops' fake
    implementations (so compiled graphs trace them right)."""
    x_hat, x, mu, logvar, pm, plv = make(device, prior=prior, seed=6)
    fb = floor_that_bites(mu, logvar, pm, plv)
    x_hat, mu, logvar = (t.requires_grad_() for t in (x_hat, mu, logvar))
    if pm is not None:
        pm, plv = pm.requires_grad_(), plv.requires_grad_()
    with_prior = pm is not None
    backends.kernels(torch.library.opcheck, ops.vae_loss_op,
                     ops.LossInputs(x_hat, x, mu, logvar, None, None, pm, plv, 1.0, "mse", 0.0,
                                    False, "batchmean", None, None, fb, True, True, with_prior))
    backends.kernels(torch.library.opcheck, ops.kl_divergence_op,
                     (mu, logvar, pm, plv, "sum", *CLAMP, fb, True, with_prior))
