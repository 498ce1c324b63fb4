"""torch.func transforms and forward-mode AD through fastvae's ops.

Every derivative is checked against the same transform applied to the float64
formulas of tests/reference.py (and, for the reparameterization, to
z = mu + exp(logvar / 2) eps written here with the call's own noise), and
against closed forms where they are short. Values under a transform equal
the eager call's.
"""

import math

import pytest
import reference as ref
import torch
from torch.autograd import forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fastvae
from fastvae import GaussianPosterior, _dispatch

TOL = {"rtol": 1e-9, "atol": 1e-9}  # float64 everywhere: only summation order differs


def inputs(shape=(3, 2, 4), latent=(3, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_hat = torch.randn(shape, generator=g, dtype=torch.float64)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    mu = torch.randn(latent, generator=g, dtype=torch.float64)
    logvar = torch.randn(latent, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (x_hat, x, mu, logvar))


def probabilities(x_hat):
    return torch.sigmoid(x_hat)  # inside (0, 1), for recon="bce"


def noise_of(seed, mu):
    """The eps an eager call with a generator seeded ``seed`` draws for mu's shape and
    dtype: its sample at mu = 0, logvar = 0 (0 + exp(0) eps is eps exactly)."""
    zeros = torch.zeros_like(mu)
    return fastvae.reparameterize(zeros, zeros, generator=torch.Generator().manual_seed(seed))


# ---- the functions and their float64 references --------------------------

CLAMP = (-1.0, 1.0)


def kl_cases():
    for reduction in ("sum", "batchmean", "mean", "none"):
        for clamp in (None, CLAMP):
            yield reduction, clamp


@pytest.mark.parametrize("reduction,clamp", list(kl_cases()))
def test_kl_jvp_jacfwd_jacrev_grad_vjp_match_the_reference(reduction, clamp):
    _, _, mu, logvar = inputs()

    def ours(m, lv):
        return fastvae.kl_divergence(m, lv, reduction=reduction, logvar_clamp=clamp)

    def theirs(m, lv):
        return ref.reduce(ref.kl_elementwise(m, lv, clamp), reduction)

    tangents = (torch.randn_like(mu), torch.randn_like(logvar))
    value, tangent = jvp(ours, (mu, logvar), tangents)
    want_value, want_tangent = jvp(theirs, (mu, logvar), tangents)
    torch.testing.assert_close(value, want_value, **TOL)
    torch.testing.assert_close(tangent, want_tangent, **TOL)
    assert tangent.abs().max() > 0
    for transform in (jacfwd, jacrev):
        for a, b in zip(transform(ours, argnums=(0, 1))(mu, logvar),
                        transform(theirs, argnums=(0, 1))(mu, logvar)):
            torch.testing.assert_close(a, b, **TOL)
    cotangent = torch.randn_like(value)
    (_, pullback), (_, want_pullback) = vjp(ours, mu, logvar), vjp(theirs, mu, logvar)
    for a, b in zip(pullback(cotangent), want_pullback(cotangent)):
        torch.testing.assert_close(a, b, **TOL)
    if reduction != "none":
        for a, b in zip(grad(ours, argnums=(0, 1))(mu, logvar), grad(theirs, argnums=(0, 1))(mu, logvar)):
            torch.testing.assert_close(a, b, **TOL)


def test_kl_jvp_in_mu_along_ones_is_the_sum_of_mu():
    """The issue's example: d/dt KL(mu + t, lv) at t = 0 is sum(mu) (was 0)."""
    _, _, mu, logvar = inputs(dtype=torch.float32)
    _, tangent = jvp(lambda m: fastvae.kl_divergence(m, logvar), (mu,), (torch.ones_like(mu),))
    torch.testing.assert_close(tangent, mu.sum())


def test_kl_hessian_is_diagonal_with_the_closed_form():
    """d2 KL / d mu2 = I, d2 KL / d lv2 = diag(exp(lv) / 2), no mixed terms; 0 where clamped."""
    _, _, mu, logvar = inputs(latent=(2, 3))
    logvar = logvar * 2  # some entries outside the clamp
    h = hessian(lambda m, lv: fastvae.kl_divergence(m, lv, logvar_clamp=CLAMP), argnums=(0, 1))(mu, logvar)
    eye = torch.eye(6, dtype=torch.float64)
    inside = ((logvar >= CLAMP[0]) & (logvar <= CLAMP[1])).flatten()
    torch.testing.assert_close(h[0][0].reshape(6, 6), eye)
    torch.testing.assert_close(h[0][1].reshape(6, 6), torch.zeros(6, 6, dtype=torch.float64))
    want = torch.diag(torch.where(inside, 0.5 * logvar.flatten().exp(), torch.zeros(6, dtype=torch.float64)))
    torch.testing.assert_close(h[1][1].reshape(6, 6), want)
    assert inside.any() and not inside.all()


LOSS_CASES = [
    ("mse", "sum", 1.0, None),
    ("l1", "none", 0.3, CLAMP),
    ("bce", "mean", 2.0, None),
    ("bce_logits", "batchmean", "tensor", CLAMP),
]


def loss_functions(recon, reduction, beta, clamp):
    def ours(x_hat, x, mu, logvar, beta_t):
        p = probabilities(x_hat) if recon == "bce" else x_hat
        b = beta_t if beta == "tensor" else beta
        return fastvae.vae_loss(p, x, mu, logvar, recon=recon, reduction=reduction, beta=b,
                                logvar_clamp=clamp)

    def theirs(x_hat, x, mu, logvar, beta_t):
        p = probabilities(x_hat) if recon == "bce" else x_hat
        r = ref.reduce(ref.recon_elementwise(p, x, recon), reduction)
        k = ref.reduce(ref.kl_elementwise(mu, logvar, clamp), reduction)
        return r + (beta_t if beta == "tensor" else beta) * k

    return ours, theirs


@pytest.mark.parametrize("recon,reduction,beta,clamp", LOSS_CASES)
def test_vae_loss_under_every_transform_matches_the_reference(recon, reduction, beta, clamp):
    x_hat, x, mu, logvar = inputs()
    beta_t = torch.tensor(0.7, dtype=torch.float64)
    args = (x_hat, x, mu, logvar, beta_t)
    ours, theirs = loss_functions(recon, reduction, beta, clamp)
    argnums = (0, 1, 2, 3, 4)

    tangents = tuple(torch.randn_like(a) for a in args)
    value, tangent = jvp(ours, args, tangents)
    want_value, want_tangent = jvp(theirs, args, tangents)
    torch.testing.assert_close(value, want_value, **TOL)
    torch.testing.assert_close(tangent, want_tangent, **TOL)
    assert tangent.abs().max() > 0
    for transform in (jacfwd, jacrev):
        for a, b in zip(transform(ours, argnums=argnums)(*args), transform(theirs, argnums=argnums)(*args)):
            torch.testing.assert_close(a, b, **TOL)
    def total(f):
        return lambda *a: f(*a).sum()

    for a, b in zip(grad(total(ours), argnums=argnums)(*args), grad(total(theirs), argnums=argnums)(*args)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("recon", ["mse", "bce", "bce_logits"])
def test_vae_loss_hessian_matches_the_reference(recon):
    """Second derivatives, including the mixed ones (x_hat, x) and (mu, logvar)."""
    x_hat, x, mu, logvar = inputs(shape=(2, 3), latent=(2, 2))
    ours, theirs = loss_functions(recon, "sum", 0.5, None)
    beta_t = torch.tensor(0.5, dtype=torch.float64)
    h = hessian(ours, argnums=(0, 1, 2, 3))(x_hat, x, mu, logvar, beta_t)
    want = hessian(theirs, argnums=(0, 1, 2, 3))(x_hat, x, mu, logvar, beta_t)
    for row, want_row in zip(h, want):
        for a, b in zip(row, want_row):
            torch.testing.assert_close(a, b, **TOL)
    if recon == "mse":  # d2/dx_hat2 of sum (x_hat - x)^2 = 2 I
        torch.testing.assert_close(h[0][0].reshape(6, 6), 2 * torch.eye(6, dtype=torch.float64))


def test_per_sample_gradients_with_vmap_equal_eager_gradients_sample_by_sample():
    """vmap(grad(...)): the per-sample gradients of DP-SGD-style training, against
    eager fastvae (its fused backward) run on one sample at a time, in float32."""
    x_hat, x, mu, logvar = inputs(dtype=torch.float32)

    def loss_of_one(xh, xx, m, lv):
        return fastvae.vae_loss(xh[None], xx[None], m[None], lv[None], recon="bce_logits", beta=0.5)

    per_sample = vmap(grad(loss_of_one, argnums=(0, 2, 3)))(x_hat, x, mu, logvar)
    for i in range(x_hat.shape[0]):
        leaves = [t[i:i + 1].clone().requires_grad_() for t in (x_hat, mu, logvar)]
        loss = fastvae.vae_loss(leaves[0], x[i:i + 1], leaves[1], leaves[2], recon="bce_logits", beta=0.5)
        eager = torch.autograd.grad(loss, leaves)
        for batched, one in zip(per_sample, eager):
            torch.testing.assert_close(batched[i], one[0])


def test_values_under_a_transform_equal_the_eager_values():
    x_hat, x, mu, logvar = inputs(dtype=torch.float32)
    eager = fastvae.vae_loss(x_hat, x, mu, logvar, recon="mse", reduction="none", return_parts=True)
    traced, _ = jvp(lambda m: fastvae.vae_loss(x_hat, x, m, logvar, recon="mse", reduction="none",
                                               return_parts=True), (mu,), (torch.ones_like(mu),))
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b)
        assert a.dtype == b.dtype == torch.float32


def test_half_inputs_keep_the_eager_dtypes_under_a_transform():
    x_hat, x, mu, logvar = inputs(dtype=torch.float16)
    value, tangent = jvp(lambda xh: fastvae.vae_loss(xh, x, mu, logvar), (x_hat,), (torch.ones_like(x_hat),))
    assert value.dtype == tangent.dtype == torch.float32  # the loss dtype for half inputs
    g = grad(lambda xh: fastvae.vae_loss(xh, x, mu, logvar))(x_hat)
    assert g.dtype == torch.float16
    want = 2 * (x_hat.double() - x.double())
    torch.testing.assert_close(g.double(), want, rtol=2e-3, atol=2e-3)


# ---- reparameterization: the call's own noise ---------------------------


def reparameterize_reference(mu, logvar, eps, clamp=None):
    lv = logvar if clamp is None else logvar.clamp(*clamp)
    return mu + torch.exp(0.5 * lv) * eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reparameterize_jvp_uses_the_seeds_noise_and_matches_eager_exactly(dtype):
    _, _, mu, logvar = inputs(dtype=dtype)
    eps = noise_of(11, mu)
    tangents = (torch.randn_like(mu), torch.randn_like(logvar))
    z, dz = jvp(lambda m, lv: fastvae.reparameterize(m, lv, generator=torch.Generator().manual_seed(11)),
                (mu, logvar), tangents)
    eager = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(11))
    if _dispatch.backend_for(mu, logvar) == "torch":
        assert torch.equal(z, eager)  # same noise, same torch arithmetic
    else:  # same noise; the kernels' exp may round differently from torch.exp
        torch.testing.assert_close(z, eager)
    # dz = t_mu + exp(lv / 2) eps t_lv / 2
    want = tangents[0] + 0.5 * torch.exp(0.5 * logvar) * eps * tangents[1]
    torch.testing.assert_close(dz, want)


def test_sample_and_kl_under_transforms_matches_the_reference():
    _, _, mu, logvar = inputs()
    logvar = logvar * 2
    eps = noise_of(3, mu)
    weights = torch.randn_like(mu)

    def ours(m, lv):
        z, kl = fastvae.sample_and_kl(m, lv, generator=torch.Generator().manual_seed(3), logvar_clamp=CLAMP)
        return (z * weights).sum() + kl.square().sum()

    def theirs(m, lv):
        z = reparameterize_reference(m, lv, eps, CLAMP)
        kl = ref.per_sample(ref.kl_elementwise(m, lv, CLAMP))
        return (z * weights).sum() + kl.square().sum()

    for a, b in zip(grad(ours, argnums=(0, 1))(mu, logvar), grad(theirs, argnums=(0, 1))(mu, logvar)):
        torch.testing.assert_close(a, b, **TOL)
    # hessian is jacfwd(jacrev(f)), whose vmap refuses random ops (drawing the seed) unless
    # told randomness="same"; jacrev(jacrev(f)) runs the function once, outside any vmap
    second_orders = (
        lambda f: jacfwd(jacrev(f, argnums=(0, 1)), argnums=(0, 1), randomness="same"),
        lambda f: jacrev(jacrev(f, argnums=(0, 1)), argnums=(0, 1)))
    for second in second_orders:
        for row, want_row in zip(second(ours)(mu, logvar), second(theirs)(mu, logvar)):
            for a, b in zip(row, want_row):
                torch.testing.assert_close(a, b, **TOL)
    tangents = (torch.randn_like(mu), torch.randn_like(logvar))
    torch.testing.assert_close(jvp(ours, (mu, logvar), tangents)[1], jvp(theirs, (mu, logvar), tangents)[1],
                               **TOL)
    z_eager, kl_eager = fastvae.sample_and_kl(mu, logvar, generator=torch.Generator().manual_seed(3),
                                              logvar_clamp=CLAMP)
    z, kl = vjp(lambda m: fastvae.sample_and_kl(m, logvar, generator=torch.Generator().manual_seed(3),
                                                logvar_clamp=CLAMP), mu)[0]
    assert torch.equal(z, z_eager)
    torch.testing.assert_close(kl, kl_eager, **TOL)


def test_reparameterize_gradients_under_grad_equal_the_eager_backward():
    """torch.func.grad through the composite and eager autograd through the fused
    backward (which regenerates the noise) agree."""
    _, _, mu, logvar = inputs(dtype=torch.float32)
    weights = torch.randn_like(mu)

    def f(m, lv):
        return (fastvae.reparameterize(m, lv, generator=torch.Generator().manual_seed(5)) * weights).sum()

    got = grad(f, argnums=(0, 1))(mu, logvar)
    leaves = [mu.clone().requires_grad_(), logvar.clone().requires_grad_()]
    want = torch.autograd.grad(f(*leaves), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_vmap_with_the_same_noise_for_every_sample():
    _, _, mu, logvar = inputs(dtype=torch.float32)

    def one(m, lv):
        return fastvae.reparameterize(m[None], lv[None], generator=torch.Generator().manual_seed(9))[0]

    z = vmap(one, randomness="same")(mu, logvar)
    eps = noise_of(9, mu[:1])[0]  # each sample: the noise of one (1, d) draw
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps)


def test_vmap_with_different_noise_per_sample_and_its_per_sample_gradients():
    """randomness="different": each sample draws its own seed, hence its own noise,
    reproducibly from the generator; per-sample gradients follow each sample's noise."""
    _, _, mu, logvar = inputs(dtype=torch.float32, latent=(4, 3))
    weights = torch.randn_like(mu)

    def sample(m, lv, gen):
        return fastvae.reparameterize(m[None], lv[None], generator=gen)[0]

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return vmap(lambda m, lv: sample(m, lv, gen), randomness="different")(mu, logvar)

    z = draw(1)
    assert torch.equal(z, draw(1)) and not torch.equal(z, draw(2))
    eps = (z - mu) / torch.exp(0.5 * logvar)
    for i in range(4):
        for j in range(i):
            assert not torch.allclose(eps[i], eps[j])

    def weighted(m, lv, w, gen):
        return (sample(m, lv, gen) * w).sum()

    gen = torch.Generator().manual_seed(1)
    grad_mu, grad_lv = vmap(grad(lambda m, lv, w: weighted(m, lv, w, gen), argnums=(0, 1)),
                            randomness="different")(mu, logvar, weights)
    torch.testing.assert_close(grad_mu, weights)
    torch.testing.assert_close(grad_lv, 0.5 * torch.exp(0.5 * logvar) * eps * weights)


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_vmap_of_sampling_has_a_batching_rule(capfd, randomness):
    """fastvae::reparameterize registers its vmap rule (one call per sample, the per-sample
    fallback's semantics): no warning from torch that a batching rule is missing, which
    told users to file an issue with PyTorch; each sample draws its own noise under
    "different", all the same noise under "same"."""
    _, _, mu, logvar = inputs(dtype=torch.float32, latent=(4, 3))
    for sample in (lambda m, lv: fastvae.reparameterize(m, lv),
                   lambda m, lv: fastvae.sample_and_kl(m, lv, num_samples=2)[0][1]):
        z = vmap(sample, randomness=randomness)(mu, logvar)
        eps = (z - mu) / torch.exp(0.5 * logvar)
        assert torch.allclose(eps[0], eps[1], rtol=0, atol=1e-5) == (randomness == "same")
    assert "batching rule" not in capfd.readouterr().err


def test_vmap_of_sampling_over_a_dimension_of_size_0_is_a_clear_error():
    mu = torch.zeros(0, 3, 2)
    with pytest.raises(RuntimeError, match="size 0"):
        vmap(lambda m: fastvae.reparameterize(m, m), randomness="different")(mu)


def test_gaussian_posterior_kl_and_sample_under_transforms():
    params = torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def kl(p):
        return GaussianPosterior(p).kl().sum()

    def kl_reference(p):
        mean, logvar = p.chunk(2, dim=1)
        return ref.kl_elementwise(mean, logvar, (-30.0, 20.0)).sum()

    tangent = torch.randn_like(params)
    torch.testing.assert_close(jvp(kl, (params,), (tangent,))[1], jvp(kl_reference, (params,), (tangent,))[1],
                               **TOL)
    torch.testing.assert_close(grad(kl)(params), grad(kl_reference)(params), **TOL)
    torch.testing.assert_close(hessian(kl)(params), hessian(kl_reference)(params), **TOL)

    def sample(p):
        return GaussianPosterior(p).sample(generator=torch.Generator().manual_seed(4))

    mean, logvar = params.chunk(2, dim=1)
    eps = noise_of(4, mean.contiguous())
    def sample_reference(p):
        return reparameterize_reference(*p.chunk(2, dim=1), eps)

    torch.testing.assert_close(jacrev(sample)(params), jacrev(sample_reference)(params), **TOL)


# ---- eager forward-mode AD (dual tensors) --------------------------------


def test_forward_ad_dual_tensors_in_eager_mode():
    x_hat, x, mu, logvar = inputs()
    t_xhat, t_mu, t_lv = (torch.randn_like(t) for t in (x_hat, mu, logvar))
    with fwAD.dual_level():
        loss = fastvae.vae_loss(fwAD.make_dual(x_hat, t_xhat), x, fwAD.make_dual(mu, t_mu),
                                fwAD.make_dual(logvar, t_lv), recon="l1", beta=0.3, reduction="batchmean")
        kl = fastvae.kl_divergence(mu, fwAD.make_dual(logvar, t_lv), reduction="none")
        z = fastvae.reparameterize(fwAD.make_dual(mu, t_mu), fwAD.make_dual(logvar, t_lv),
                                   generator=torch.Generator().manual_seed(2))
        tangents = [fwAD.unpack_dual(t).tangent for t in (loss, kl, z)]
    n = x_hat.shape[0]
    # d |x_hat - x| = sign(x_hat - x) dx_hat; d kl = mu dmu + (exp(lv) - 1) / 2 dlv
    want_loss = ((x_hat - x).sign() * t_xhat).sum() / n \
        + 0.3 * (mu * t_mu + 0.5 * torch.expm1(logvar) * t_lv).sum() / n
    torch.testing.assert_close(tangents[0], want_loss, **TOL)
    torch.testing.assert_close(tangents[1], ref.per_sample(0.5 * torch.expm1(logvar) * t_lv), **TOL)
    eps = noise_of(2, mu)
    torch.testing.assert_close(tangents[2], t_mu + 0.5 * torch.exp(0.5 * logvar) * eps * t_lv, **TOL)


def test_forward_ad_private_api_is_still_there():
    """fastvae tells a dual_level by torch.autograd.forward_ad._current_level; if a torch
    release drops it, eager forward-mode AD reaches the ops' autograd.Functions, which
    raise PyTorch's "must implement the jvp function" (never a zero), and this fails."""
    assert fwAD._current_level == -1
    with fwAD.dual_level():
        assert fwAD._current_level >= 0


def test_eager_double_backward_is_still_refused_but_hessian_by_torch_func_works():
    _, _, mu, logvar = inputs()
    mu.requires_grad_()
    kl = fastvae.kl_divergence(mu, logvar)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(kl, mu, create_graph=True)
    h = hessian(lambda m: fastvae.kl_divergence(m, logvar))(mu.detach())
    torch.testing.assert_close(h.reshape(15, 15), torch.eye(15, dtype=torch.float64))


# ---- argument checks still run ------------------------------------------


def test_value_checks_run_under_vmap_over_every_sample():
    x_hat, x, mu, logvar = inputs(dtype=torch.float32)
    x = x.clone()
    x[2, 0, 0] = 1.5  # one bad target, in the last sample

    def loss_of_one(xh, xx, m, lv):
        return fastvae.vae_loss(xh[None], xx[None], m[None], lv[None], recon="bce_logits")

    with pytest.raises(ValueError, match="x must hold targets in"):
        vmap(grad(loss_of_one))(x_hat, x, mu, logvar)
    with pytest.raises(ValueError, match="x must hold targets in"):
        jvp(lambda xh: fastvae.vae_loss(xh, x, mu, logvar, recon="bce_logits"), (x_hat,),
            (torch.ones_like(x_hat),))


@pytest.mark.parametrize("bad", [1.5, -0.25, math.nan])
def test_bce_probability_checks_run_under_a_transform(bad):
    """recon="bce" with an x_hat outside [0, 1] (or NaN) is fastvae's ValueError naming
    x_hat under torch.func, as in eager mode: not F.binary_cross_entropy's own error."""
    x_hat, x, mu, logvar = inputs(dtype=torch.float32)
    p = probabilities(x_hat).clone()
    p[1, 0, 2] = bad
    with pytest.raises(ValueError, match="x_hat must hold probabilities in"):
        fastvae.vae_loss(p.clone().requires_grad_(), x, mu, logvar, recon="bce")
    with pytest.raises(ValueError, match="x_hat must hold probabilities in"):
        grad(lambda xh: fastvae.vae_loss(xh, x, mu, logvar, recon="bce"))(p)
    with pytest.raises(ValueError, match="x_hat must hold probabilities in"):
        vmap(grad(lambda xh, xx: fastvae.vae_loss(xh[None], xx[None], mu[:1], logvar[:1],
                                                   recon="bce")))(p, x)


def test_nan_propagates_under_a_transform():
    _, _, mu, logvar = inputs()
    logvar = logvar.clone()
    logvar[1, 2] = math.nan
    def kl(lv):
        return fastvae.kl_divergence(mu, lv, logvar_clamp=CLAMP, reduction="none")

    value, tangent = jvp(kl, (logvar,), (torch.ones_like(logvar),))
    assert torch.isnan(value[1]) and torch.isnan(tangent[1])
    assert torch.isfinite(value[[0, 2]]).all() and torch.isfinite(tangent[[0, 2]]).all()


# ---- inside torch.compile -------------------------------------------------


def test_transforms_inside_torch_compile():
    """A compiled jvp through the custom op gave a zero tangent; the transforms' bodies
    trace the torch formulas instead."""
    torch._dynamo.reset()
    x_hat, x, mu, logvar = inputs(dtype=torch.float32)

    def tangent_of_kl(m):
        return jvp(lambda m: fastvae.kl_divergence(m, logvar), (m,), (torch.ones_like(m),))[1]

    def loss(xh, m):
        return fastvae.vae_loss(xh, x, m, logvar, recon="bce_logits")

    def grad_of_loss(xh, m):
        return grad(loss, argnums=(0, 1))(xh, m)

    torch.testing.assert_close(torch.compile(tangent_of_kl, fullgraph=True)(mu), mu.sum())
    grad_xhat, grad_mu = torch.compile(grad_of_loss, fullgraph=True)(x_hat, mu)
    torch.testing.assert_close(grad_xhat, torch.sigmoid(x_hat) - x)
    torch.testing.assert_close(grad_mu, mu)


def test_the_private_torch_apis_of_the_transform_path_are_still_there():
    """If a torch release moves one, this fails loudly (fastvae still imports and
    errs on the side of an error, never a zero; see fastvae.ops)."""
    from fastvae import ops

    missing = [name for name, api in ops.TRANSFORM_PRIVATE_APIS.items() if api is None]
    assert not missing, f"torch moved: {missing}"


def test_prior_kl_under_a_transform_keeps_its_accuracy_with_far_apart_logvars():
    """lv - plv is rounded; the fused ops (and so the transforms' formula) add its
    rounding error back (TwoSum): with the logvars 50 apart the rounded difference
    alone is ~1e-6 relative off in the value and the logvar gradient."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(4, 8, generator=g)
    logvar = torch.randn(4, 8, generator=g) + 25.0
    prior_mu, prior_logvar = torch.randn(8, generator=g), torch.randn(8, generator=g) - 25.0

    def kl(lv, plv):
        return fastvae.kl_divergence(mu, lv, prior_mu=prior_mu, prior_logvar=plv)

    (g_lv, g_plv), value = torch.func.grad_and_value(kl, argnums=(0, 1))(logvar, prior_logvar)
    lv64, plv64 = logvar.double().requires_grad_(), prior_logvar.double().requires_grad_()
    want = ref.kl_elementwise_prior(mu, lv64, prior_mu, plv64).sum()
    want.backward()
    torch.testing.assert_close(value.double(), want.detach(), rtol=1e-7, atol=0)
    torch.testing.assert_close(g_lv.double(), lv64.grad, rtol=3e-7, atol=0)
    torch.testing.assert_close(g_plv.double(), plv64.grad, rtol=3e-7, atol=0)
