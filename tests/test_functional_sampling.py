"""reparameterize and sample_and_kl: distribution, reproducibility, gradients."""

import math

import pytest
import reference as ref
import torch

import fastvae
from fastvae import _dispatch


def latents(shape=(64, 32), dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    logvar = torch.randn(shape, generator=g, dtype=torch.float64)
    return (mu.to(device, dtype).requires_grad_(), logvar.to(device, dtype).requires_grad_())


def ks_statistic(samples):
    """Kolmogorov-Smirnov distance of samples from N(0, 1), from the definition."""
    xs = sorted(samples.double().tolist())
    n = len(xs)
    return max(max((i + 1) / n - ref.normal_cdf(v), ref.normal_cdf(v) - i / n)
               for i, v in enumerate(xs))


def test_samples_are_standard_normal_after_standardizing(device):
    mu, logvar = latents((200, 100), device=device)
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(1))
    eps = ((z - mu) / torch.exp(0.5 * logvar)).detach().flatten().cpu()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)  # 5 standard errors
    assert abs(eps.std().item() - 1) < 5 * math.sqrt(0.5 / n)
    # KS critical value at alpha = 0.001 is about 1.95 / sqrt(n)
    assert ks_statistic(eps) < 1.95 / math.sqrt(n)


@pytest.mark.parametrize("path", ["one_generator_per_draw", "chunks_on_two_threads"])
def test_noise_mean_and_std_on_a_million_draws(monkeypatch, path):
    """The PyTorch path's noise, recovered as (z - mu) / std from 2^20 draws: mean 0 and
    std 1 to within 5 standard errors (a noise scaled by 1.01 is 14 of them off). Draws
    of at most NOISE_CHUNK elements come from one generator; larger ones are drawn
    chunk by chunk, on several threads."""
    from fastvae._torch_impl import NOISE_CHUNK

    fastvae.set_backend("torch")  # this path, also in the kernels' run of this file
    if path == "one_generator_per_draw":
        shape, draws = (NOISE_CHUNK // 1024, 1024), 4
    else:
        shape, draws = (4, NOISE_CHUNK + 3), 1
    mu, logvar = (t.detach() for t in latents(shape))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        eps = [(fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(seed))
                - mu).double() / torch.exp(0.5 * logvar.double()) for seed in range(draws)]
    finally:
        torch.set_num_threads(threads)
    assert (mu.numel() <= NOISE_CHUNK) == (path == "one_generator_per_draw")
    ref.assert_standard_normal(torch.cat([e.flatten() for e in eps]))


def test_scale_and_shift():
    mu = torch.full((20000, 1), 3.0)
    logvar = torch.full((20000, 1), math.log(4.0))
    z = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 3.0) < 5 * 2.0 / math.sqrt(20000)  # 5 standard errors
    assert abs(z.std().item() - 2.0) < 5 * 2.0 * math.sqrt(0.5 / 20000)


def test_reproducible_with_generator_and_manual_seed(device):
    mu, logvar = latents(device=device)
    a = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(7))
    b = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(7))
    c = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = fastvae.reparameterize(mu, logvar)
    e = fastvae.reparameterize(mu, logvar)  # no generator: fresh noise every call
    torch.manual_seed(3)
    f = fastvae.reparameterize(mu, logvar)
    assert torch.equal(d, f) and not torch.equal(d, e)


def test_gradients_and_sample_and_kl(device):
    mu, logvar = latents((6, 5, 2), device=device)
    gen_state = torch.Generator().manual_seed(11)
    z, kl = fastvae.sample_and_kl(mu, logvar, generator=gen_state)
    z_only = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(11))
    assert torch.equal(z, z_only)  # same seed, same noise, with or without the KL
    torch.testing.assert_close(kl.double().cpu(), ref.per_sample(ref.kl_elementwise(mu.cpu(), logvar.cpu())),
                               rtol=1e-5, atol=1e-6)
    w_z, w_kl = torch.randn_like(z), torch.randn_like(kl)
    g_mu, g_lv = torch.autograd.grad((z * w_z).sum() + (kl * w_kl).sum(), (mu, logvar))
    # from the math: dz/dmu = 1, dz/dlogvar = (z - mu) / 2; dkl/dmu = mu, dkl/dlogvar = (exp(lv) - 1) / 2
    w = w_kl.reshape(-1, 1, 1)
    want_mu = w_z + w * mu
    want_lv = w_z * (z - mu) / 2 + w * (torch.exp(logvar) - 1) / 2
    torch.testing.assert_close(g_mu, want_mu.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_lv, want_lv.detach(), rtol=1e-4, atol=1e-5)


def test_sample_and_kl_clamp():
    mu, logvar = latents((4, 8))
    with torch.no_grad():
        logvar.mul_(5)
    z, kl = fastvae.sample_and_kl(mu, logvar, logvar_clamp=(-1.0, 1.0),
                                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kl.double(), ref.per_sample(ref.kl_elementwise(mu, logvar, (-1.0, 1.0))),
                               rtol=1e-5, atol=1e-5)
    # the clamped std scales the noise: the same draw as reparameterize on the clamped logvar
    same_draw = fastvae.reparameterize(mu, logvar.detach().clamp(-1.0, 1.0),
                                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, same_draw)
    (z.sum() + kl.sum()).backward()
    clamped = (logvar < -1) | (logvar > 1)
    assert clamped.any() and (logvar.grad[clamped] == 0).all()


@pytest.mark.parametrize("with_kl", [False, True])
def test_gradcheck_float64(with_kl):
    mu, logvar = latents((3, 4), dtype=torch.float64)

    def fn(mu, logvar):  # a fresh generator each call: gradcheck needs a deterministic function
        gen = torch.Generator().manual_seed(5)
        if with_kl:
            return fastvae.sample_and_kl(mu, logvar, generator=gen, logvar_clamp=(-2.5, 2.5))
        return fastvae.reparameterize(mu, logvar, generator=gen)

    assert torch.autograd.gradcheck(fn, (mu, logvar))


@pytest.mark.parametrize("small", [True, False])
def test_what_is_saved_for_backward(small):
    """Past SMALL_NUMEL latent elements no noise-sized tensor is saved (the CPU path keeps
    its noise in a bounded table, the kernels draw it again); a small CPU call saves one,
    eps std / 2 (eager saves two: eps and std)."""
    from fastvae._torch_impl import SMALL_NUMEL

    mu, logvar = latents((32, 16) if small else (2, SMALL_NUMEL // 2 + 1))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z, kl = fastvae.sample_and_kl(mu, logvar)
    big = [t for t in saved if t.numel() == mu.numel()]
    inputs = [t for t in big if any(t is s for s in (mu, logvar))]
    assert len(inputs) == 2  # mu and logvar themselves
    if small and mu.device.type == "cpu" and _dispatch.backend_for(mu, logvar) == "torch":
        assert len(big) == 3  # and eps std / 2
    else:
        assert len(big) == 2  # no eps, std or z
    (z.sum() + kl.sum()).backward()


def test_activation_checkpointing_recomputes_the_same_sample():
    """torch.utils.checkpoint drops what the forward saved and runs it again for the
    backward: the seed is drawn again from the restored generator state, so the
    recomputed noise is the forward's and the gradients are those of no checkpointing."""
    import torch.utils.checkpoint as checkpoint

    mu, logvar = latents((32, 16))
    weights = torch.linspace(-1, 1, 16)

    def step(m, lv):
        z, kl = fastvae.sample_and_kl(m, lv)
        return (z * weights).sum() + kl.sum()

    torch.manual_seed(4)
    want = torch.autograd.grad(step(mu, logvar), (mu, logvar))
    torch.manual_seed(4)
    loss = checkpoint.checkpoint(step, mu, logvar, use_reentrant=False)
    got = torch.autograd.grad(loss, (mu, logvar))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    mu, logvar = latents((8, 16), dtype=dtype)
    z, kl = fastvae.sample_and_kl(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert z.dtype == dtype and kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), ref.per_sample(ref.kl_elementwise(mu, logvar)),
                               rtol=1e-5, atol=1e-5)
    (z.float().sum() + kl.sum()).backward()
    assert mu.grad.dtype == dtype and logvar.grad.dtype == dtype


def test_large_draws_do_not_depend_on_thread_count_and_regenerate_exactly():
    """Past one noise chunk the CPU noise is drawn chunk by chunk on several threads."""
    from fastvae._torch_impl import NOISE_CHUNK

    mu, logvar = latents((3, NOISE_CHUNK // 2 + 7))  # spans two chunks and a partial one
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(2))
        torch.set_num_threads(2)
        two = fastvae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    eps = ((one - mu) / torch.exp(0.5 * logvar)).detach().flatten()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n) and abs(eps.std().item() - 1) < 5 * math.sqrt(0.5 / n)
    # the second chunk must not repeat the first
    starts = torch.stack([eps[:10000], eps[NOISE_CHUNK:NOISE_CHUNK + 10000]])
    assert abs(torch.corrcoef(starts)[0, 1].item()) < 0.05
    g_lv, = torch.autograd.grad(one.sum(), logvar)
    torch.testing.assert_close(g_lv, ((one - mu) / 2).detach(), rtol=1e-4, atol=1e-5)
