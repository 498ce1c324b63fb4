"""The PyTorch path's blocked latent pass (_torch_impl._prior_kl_blocked): the KL
against a prior, free bits and half-precision latents, computed over blocks of
LATENT_CHUNK elements of mu's rows. LATENT_CHUNK is made tiny here so that a few
rows span several blocks; every result is held to tests/reference.py (float64,
from the math) and to the same call in one block."""

import warnings

import pytest
import reference as ref
import torch

import fastvae
from fastvae import _torch_impl

BATCH, TRAILING = 5, (2, 3)  # 6 elements per row
SHAPE = (BATCH, *TRAILING)

# prior layouts: a learned one over the trailing dims, per sample, broadcast over
# the batch from a leading 1, one value per sample, one value in all
PRIORS = {
    "none": lambda g: (None, None),
    "learned": lambda g: (torch.randn(TRAILING, generator=g), torch.randn(TRAILING, generator=g)),
    "per_sample": lambda g: (torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)),
    "leading_one": lambda g: (torch.randn(1, *TRAILING, generator=g),
                              torch.randn(1, 1, 3, generator=g)),
    "per_sample_scalar": lambda g: (torch.randn(BATCH, 1, 1, generator=g),
                                    torch.randn(BATCH, 1, 1, generator=g)),
    "logvar_only": lambda g: (None, torch.randn(3, generator=g)),
    "mean_only": lambda g: (torch.randn(TRAILING, generator=g), None),
}

# elements per block: rows of 6 elements in blocks of 2 rows (the last block 1 row),
# just below and above one row, one block for everything
CHUNKS = {"two_rows": 12, "below_a_row": 5, "one_row": 6, "above_a_row": 7, "whole": 1 << 18}


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    # latents of at most SMALL_NUMEL elements take whole-tensor ops: none here
    monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 0)
    with fastvae.use_backend("torch"):
        yield


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("free_bits", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_latents_whole_and_blocked_agree(monkeypatch, prior, free_bits, dtype):
    """The whole-tensor path (at most SMALL_NUMEL elements) and the blocked pass give
    the same values and gradients, to a float32 rounding or two (a half-precision
    one for bf16 gradients)."""
    leaves = make(prior, dtype=dtype)
    blocked = value_and_grads(leaves, reduction="batchmean", free_bits=free_bits)
    monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 1 << 17)
    whole = value_and_grads(leaves, reduction="batchmean", free_bits=free_bits)
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-6, atol=1e-6)
    for b, w in zip(blocked[1], whole[1]):
        assert b.dtype == w.dtype == dtype
        torch.testing.assert_close(b, w, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


def make(prior, dtype=torch.float32, seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    logvar = torch.randn(shape, generator=g, dtype=torch.float64)
    pm, plv = PRIORS[prior](g)
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in (mu, logvar, pm, plv)]
    return leaves


def present(*tensors):
    return [t for t in tensors if t is not None]


def kl_call(mu, logvar, pm, plv, reduction="sum", free_bits=0.0, clamp=None):
    return fastvae.kl_divergence(mu, logvar, reduction=reduction, free_bits=free_bits,
                                 prior_mu=pm, prior_logvar=plv, logvar_clamp=clamp)


def reference(mu, logvar, pm, plv, reduction, free_bits, clamp=None):
    leaves = [None if t is None else t.detach().double().requires_grad_()
              for t in (mu, logvar, pm, plv)]
    elementwise = ref.kl_elementwise_prior(*leaves, logvar_clamp=clamp)
    if free_bits > 0:
        value = ref.kl_free_bits(elementwise, free_bits, reduction)
    else:
        value = ref.reduce(elementwise, reduction)
    grads = torch.autograd.grad(value.sum(), present(*leaves))
    return value.detach(), grads


def value_and_grads(leaves, **kwargs):
    kl = kl_call(*leaves, **kwargs)
    return kl.detach(), torch.autograd.grad(kl.sum(), present(*leaves))


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("reduction,free_bits", [("sum", 0.0), ("batchmean", 0.0),
                                                 ("mean", 0.0), ("none", 0.0),
                                                 ("batchmean", 1.0), ("sum", 1.0)])
def test_blocks_match_the_oracle_and_one_block(monkeypatch, chunk, prior, reduction, free_bits):
    leaves = make(prior)
    whole = value_and_grads(leaves, reduction=reduction, free_bits=free_bits)
    monkeypatch.setattr(_torch_impl, "LATENT_CHUNK", CHUNKS[chunk])
    got, grads = value_and_grads(leaves, reduction=reduction, free_bits=free_bits)
    want, want_grads = reference(*leaves, reduction, free_bits)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)
    # the gradients are elementwise and each row is summed within one block: the
    # same bits whatever the blocks (free bits add the blocks' column sums in turn)
    if free_bits == 0.0:
        assert torch.equal(got, whole[0])
        for g, w in zip(grads, whole[1]):
            assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prior", ["none", "learned", "per_sample", "leading_one"])
@pytest.mark.parametrize("free_bits", [0.0, 1.0])
def test_half_precision_latents_in_blocks(monkeypatch, dtype, prior, free_bits):
    """Half-precision blocks are converted to float32, computed and accumulated there,
    and each gradient is rounded once, into the input's dtype."""
    monkeypatch.setattr(_torch_impl, "LATENT_CHUNK", CHUNKS["two_rows"])
    leaves = make(prior, dtype=dtype)
    got, grads = value_and_grads(leaves, reduction="batchmean", free_bits=free_bits)
    assert got.dtype == torch.float32
    want, want_grads = reference(*leaves, "batchmean", free_bits)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, want_grads):
        assert g.dtype == dtype
        # the float64 gradient rounded once to the input's dtype (one half-precision ulp)
        torch.testing.assert_close(g, w.to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_half_precision_latents_take_the_blocked_pass(monkeypatch, dtype):
    """Past SMALL_NUMEL the plain KL of half-precision latents runs in blocks too."""
    monkeypatch.setattr(_torch_impl, "LATENT_CHUNK", CHUNKS["above_a_row"])
    calls = []
    real = _torch_impl._prior_kl_blocked
    monkeypatch.setattr(_torch_impl, "_prior_kl_blocked", lambda *a, **k: calls.append(1) or real(*a, **k))
    mu, logvar, _, _ = make("none", dtype=dtype)
    got, grads = value_and_grads([mu, logvar, None, None], reduction="none")
    assert calls
    want, want_grads = reference(mu, logvar, None, None, "none", 0.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, want_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w.to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("free_bits", [0.0, 1.0])
def test_nan_in_one_block_stays_in_its_rows(monkeypatch, free_bits):
    monkeypatch.setattr(_torch_impl, "LATENT_CHUNK", CHUNKS["two_rows"])
    mu, logvar, pm, plv = make("learned")
    with torch.no_grad():
        mu[3, 1, 2] = float("nan")  # the second block
    per_sample = kl_call(mu, logvar, pm, plv, reduction="none")
    assert torch.isnan(per_sample[3]) and torch.isfinite(per_sample[[0, 1, 2, 4]]).all()
    kl = kl_call(mu, logvar, pm, plv, free_bits=free_bits)
    assert torch.isnan(kl)
    g_mu, g_lv = torch.autograd.grad(kl, [mu, logvar])
    if free_bits == 0.0:
        assert torch.isnan(g_mu[3, 1, 2]) and torch.isfinite(g_mu[[0, 1, 2, 4]]).all()
        assert torch.isfinite(g_lv).all()  # the logvar gradient does not involve mu


def test_a_row_longer_than_a_block_and_a_clamped_logvar(monkeypatch):
    monkeypatch.setattr(_torch_impl, "LATENT_CHUNK", 4)
    mu, logvar, pm, plv = make("learned")
    with torch.no_grad():
        logvar[0, 0] = torch.tensor([-30.0, 0.5, 30.0])
    clamp = (-5.0, 5.0)
    got, grads = value_and_grads([mu, logvar, pm, plv], clamp=clamp)
    want, want_grads = reference(mu, logvar, pm, plv, "sum", 0.0, clamp=clamp)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)
    assert grads[1][0, 0, 0] == 0 and grads[1][0, 0, 2] == 0  # clamped: no gradient


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_latents_give_contiguous_gradients(monkeypatch, layout, dtype):
    monkeypatch.setattr(_torch_impl, "LATENT_CHUNK", 12)
    g = torch.Generator().manual_seed(3)
    if layout == "channels_last":
        base = [torch.randn(4, 3, 2, 2, generator=g) for _ in range(2)]
        mu, logvar = (t.to(dtype).contiguous(memory_format=torch.channels_last) for t in base)
        prior_shape = (3, 2, 2)
    else:
        mu, logvar = (torch.randn(6, 4, generator=g).to(dtype).t() for _ in range(2))
        prior_shape = (6,)
    pm, plv = (torch.randn(prior_shape, generator=g).to(dtype) for _ in range(2))
    leaves = [t.requires_grad_() for t in (mu, logvar, pm, plv)]
    assert not mu.is_contiguous()
    got, grads = value_and_grads(leaves)
    dense = [t.detach().contiguous().requires_grad_() for t in leaves]
    want, want_grads = value_and_grads(dense)
    assert torch.equal(got, want)
    for g_, w in zip(grads, want_grads):
        assert torch.equal(g_, w)
    # the buffers the op itself returns are contiguous, as its fake implementation promises
    _, *buffers = fastvae.ops.kl_divergence_op(mu.detach(), logvar.detach(), pm.detach(),
                                               plv.detach(), "sum", None, None, 0.0, True, True)
    assert all(b.is_contiguous() and b.shape == mu.shape for b in buffers)


@pytest.mark.parametrize("num_samples", [None, 3])
def test_sample_and_kl_with_a_prior_in_blocks(monkeypatch, num_samples):
    """The sampling's KL and its backward take the blocked pass: each block's KL
    gradients times that block's grad_kl rows."""
    mu, logvar, pm, plv = make("learned")
    grad_kl = torch.randn(BATCH, generator=torch.Generator().manual_seed(9))

    def run():
        z, kl = fastvae.sample_and_kl(mu, logvar, prior_mu=pm, prior_logvar=plv,
                                      num_samples=num_samples,
                                      generator=torch.Generator().manual_seed(4))
        grads = torch.autograd.grad([z, kl], [mu, logvar, pm, plv],
                                    [torch.ones_like(z), grad_kl])
        return z.detach(), kl.detach(), grads

    whole = run()
    monkeypatch.setattr(_torch_impl, "LATENT_CHUNK", CHUNKS["two_rows"])
    z, kl, grads = run()
    assert torch.equal(z, whole[0]) and torch.equal(kl, whole[1])
    for g, w in zip(grads, whole[2]):
        assert torch.equal(g, w)
    # the KL part against the oracle: z = mu + std eps adds sum_k 1 to d/dmu and
    # sum_k eps_k std / 2 = (z - mu).sum(0) / 2 to d/dlogvar
    leaves = [t.detach().double().requires_grad_() for t in (mu, logvar, pm, plv)]
    elementwise = ref.kl_elementwise_prior(*leaves)
    want_kl = ref.per_sample(elementwise)
    torch.testing.assert_close(kl.double(), want_kl.detach(), rtol=1e-6, atol=1e-6)
    kl_grads = torch.autograd.grad((want_kl * grad_kl.double()).sum(), leaves)
    samples = 1 if num_samples is None else num_samples
    noise = (z - mu.detach()) if num_samples is None else (z - mu.detach()).sum(0)
    want = [kl_grads[0] + samples, kl_grads[1] + 0.5 * noise.double(), kl_grads[2], kl_grads[3]]
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_scratch_is_kept_per_thread_and_never_returned(monkeypatch):
    """The outputs never share storage with the kept scratch blocks."""
    monkeypatch.setattr(_torch_impl, "LATENT_CHUNK", 12)
    mu, logvar, pm, plv = (t.detach() for t in make("per_sample", dtype=torch.bfloat16))
    first = _torch_impl.kl_forward_with_prior(mu, logvar, pm, plv, "none", None, None, 0.0,
                                              True, True)
    kept = {b.untyped_storage().data_ptr() for b in _torch_impl._kept_scratch.blocks.values()}
    assert kept
    second = _torch_impl.kl_forward_with_prior(mu, logvar, pm, plv, "none", None, None, 0.0,
                                               True, True)
    for a, b in zip(first, second):
        assert a.untyped_storage().data_ptr() not in kept
        assert torch.equal(a, b)  # the second call's scratch did not write the first's outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prior", ["learned", "logvar_only", "mean_only", "per_sample"])
@pytest.mark.parametrize("free_bits", [0.0, 1.0])
def test_a_batch_of_one_with_a_prior_as_large_as_mu(prior, dtype, free_bits):
    """A batch of one with a learned (d,) prior: the prior is as large as mu, read block
    by block, in one block. Its float32 blocks were (d,)-shaped where the scratch and the
    out= buffers are (1, d), and torch warned that it resized them (deprecated)."""
    leaves = make(prior, dtype=dtype, shape=(1, *TRAILING))
    if prior == "per_sample":  # (the batch of one's own prior)
        leaves[2:] = [t[:1].detach().clone().requires_grad_() for t in leaves[2:]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, grads = value_and_grads(leaves, reduction="batchmean", free_bits=free_bits)
    want, want_grads = reference(*leaves, "batchmean", free_bits)
    # the value is float32 either way; gradients come back in mu's dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    eps = torch.finfo(dtype).eps
    for g, w in zip(grads, want_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=max(eps, 1e-6), atol=1e-6)
