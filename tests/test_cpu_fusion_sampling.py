"""Inductor's fused CPU loop for the reparameterization of half-precision latents
(fastvae/_cpu_fusion.py, ``fused_sample``): z = mu + eps exp(lv / 2) around the
seed's own draw of noise, the kept eps std / 2 and the KL against N(0, I).

Held to the float64 formula (from the same seed's noise) and to the torch ops it
replaces. SAMPLE_MIN_NUMEL and SMALL_NUMEL are lowered so that small latents take it.
"""

import pytest
import torch

import fastvae
from fastvae import _cpu_fusion, _torch_impl
from tests.fusion import count_compilations, record_fused_calls

SHAPE = (6, 2, 150)  # rows of 300 elements
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def fusion(monkeypatch):
    """The fused sampling from 64 latent elements (and the general path, not the small
    one, from 16); yields a list recording each fused_sample outcome."""
    return record_fused_calls(monkeypatch, "fused_sample", SAMPLE_MIN_NUMEL=64, SMALL_NUMEL=16)


def _latents(dtype, lv_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(SHAPE, generator=gen, dtype=torch.float64).to(dtype)
    logvar = (torch.randn(SHAPE, generator=gen, dtype=torch.float64) * 0.8).to(lv_dtype or dtype)
    return mu, logvar


def _noise(seed_generator_seed):
    """The eps every path draws for a call given Generator().manual_seed(that)."""
    seed = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(
        seed_generator_seed))
    return _torch_impl.standard_normal(int(seed), SHAPE, torch.float32,
                                       torch.device("cpu")).double()


def _sample(mu, logvar, with_kl, grad=True, **options):
    """(z, kl or None, grad_mu, grad_logvar) for fixed upstream gradients."""
    mu, logvar = (t.clone().requires_grad_(grad) for t in (mu, logvar))
    generator = torch.Generator().manual_seed(11)
    if with_kl:
        z, kl = fastvae.sample_and_kl(mu, logvar, generator=generator, **options)
    else:
        z, kl = fastvae.reparameterize(mu, logvar, generator=generator), None
    if not grad:
        return z, kl, None, None
    gen = torch.Generator().manual_seed(3)
    grad_z = torch.randn(SHAPE, generator=gen).to(z.dtype)
    outputs, grads = [z], [grad_z]
    if with_kl:
        outputs.append(kl), grads.append(torch.randn(SHAPE[0], generator=gen))
    g_mu, g_lv = torch.autograd.grad(outputs, [mu, logvar], grads)
    return z.detach(), None if kl is None else kl.detach(), g_mu, g_lv


def _reference(mu, logvar, with_kl, logvar_clamp=None):
    """z, the KL and the same upstream gradients' grads, in float64 from the formula."""
    mu64, lv64 = (t.double().requires_grad_() for t in (mu, logvar))
    lv = lv64 if logvar_clamp is None else lv64.clamp(*logvar_clamp)
    z = mu64 + _noise(11) * torch.exp(0.5 * lv)
    kl = 0.5 * (torch.exp(lv) - 1 - lv + mu64**2).flatten(1).sum(1)
    gen = torch.Generator().manual_seed(3)
    grad_z = torch.randn(SHAPE, generator=gen).double()
    outputs, grads = [z], [grad_z]
    if with_kl:
        outputs.append(kl), grads.append(torch.randn(SHAPE[0], generator=gen).double())
    g_mu, g_lv = torch.autograd.grad(outputs, [mu64, lv64], grads)
    return z.detach(), kl.detach(), g_mu, g_lv


def _z_close(z, want, mu, logvar):
    """z within one rounding into its dtype of the formula, plus float32's roundings of
    the product eps std and the sum (relative to their operands: mu + eps std cancels)."""
    eps_z, eps32 = torch.finfo(z.dtype).eps, torch.finfo(torch.float32).eps
    operands = mu.double().abs() + (want - mu.double()).abs()
    allowed = eps_z * want.abs() + 4 * eps32 * operands
    finite = torch.isfinite(want)
    return bool(((z.double() - want).abs()[finite] <= allowed[finite]).all())


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, None), (torch.float16, None),
                                    (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("with_kl", [False, True], ids=["reparameterize", "sample_and_kl"])
def test_fused_sampling_matches_the_formula_and_the_torch_ops(fusion, dtypes, with_kl):
    mu, logvar = _latents(*dtypes)
    calls = [_sample(mu, logvar, with_kl) for _ in range(_cpu_fusion.COMPILE_AT_CALL)]
    assert fusion == [False] * (_cpu_fusion.COMPILE_AT_CALL - 1) + [True]
    (z0, kl0, g_mu0, g_lv0), (z, kl, g_mu, g_lv) = calls[0], calls[-1]
    want_z, want_kl, want_g_mu, want_g_lv = _reference(mu, logvar, with_kl)
    z_dtype = torch.promote_types(*(t.dtype for t in (mu, logvar)))
    assert z.dtype == z0.dtype == z_dtype and z.is_contiguous()
    # float32 math rounded once into z's dtype (the torch ops' too): within one rounding
    # of the formula; exp's last float32 bit may differ between aten and Inductor
    assert _z_close(z, want_z, mu, logvar) and _z_close(z0, want_z, mu, logvar)
    if z_dtype != torch.float32:  # (in float32 z's last bit shows exp's: differs often)
        assert (z.float() != z0.float()).float().mean() < 1e-2
    if with_kl:
        assert torch.allclose(kl.double(), want_kl, rtol=1e-6, atol=0)
        assert torch.allclose(kl, kl0, rtol=1e-6, atol=0)
    for got, base, want, t in ((g_mu, g_mu0, want_g_mu, mu), (g_lv, g_lv0, want_g_lv, logvar)):
        assert got.dtype == t.dtype
        # rounded once into the input's dtype; with the KL a sum of two terms that may
        # cancel: an absolute term of that dtype's eps on the gradient's scale
        eps = torch.finfo(t.dtype).eps
        atol = 2 * eps * want.abs().max().item()
        assert torch.allclose(got.double(), want, rtol=eps, atol=atol)
        assert torch.allclose(got, base, rtol=eps, atol=atol)


def test_without_a_gradient_and_with_a_clamp(fusion):
    mu, logvar = _latents(torch.bfloat16)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        z, _, _, _ = _sample(mu, logvar, False, grad=False)
    assert fusion[-1]
    assert _z_close(z, _reference(mu, logvar, False)[0], mu, logvar)
    logvar.view(-1)[:4] = torch.tensor([3.0, -3.0, 0.5, float("nan")])
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        z, kl, g_mu, g_lv = _sample(mu, logvar, True, logvar_clamp=(-2.0, 2.0))
    assert fusion[-1]
    flat = g_lv.view(-1)
    assert flat[0] == 0 and flat[1] == 0 and flat[2] != 0 and torch.isnan(flat[3])
    assert torch.isnan(kl[0]) and not torch.isnan(kl[1:]).any()
    want_z, want_kl, _, _ = _reference(mu, logvar, True, logvar_clamp=(-2.0, 2.0))
    assert torch.allclose(kl[1:].double(), want_kl[1:], rtol=1e-6, atol=0)
    assert _z_close(z, want_z, mu, logvar)


def test_the_noise_is_drawn_once_per_call_fused_or_not(fusion, monkeypatch):
    """The loop is handed a draw to call: the calls before it compiles, a float32
    call and one with Dynamo disabled draw once each, not twice."""
    draws = []
    real = _torch_impl.standard_normal

    def counting(*args, **kwargs):
        draws.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_torch_impl, "standard_normal", counting)
    mu, logvar = _latents(torch.float16)
    for call in range(_cpu_fusion.COMPILE_AT_CALL):
        _sample(mu, logvar, True)
        assert len(draws) == call + 1
    assert fusion[-1]
    _sample(mu.float(), logvar.float(), True)
    assert len(draws) == _cpu_fusion.COMPILE_AT_CALL + 1
    with torch._dynamo.config.patch(disable=True):
        _sample(mu, logvar, True)
    assert len(draws) == _cpu_fusion.COMPILE_AT_CALL + 2
    assert fusion[-1] is False


def test_many_shapes_compile_one_graph_each(fusion, monkeypatch, recwarn):
    """A graph specializes on sizes of 1 and equal sizes; both are part of the key, so
    every shape passes its kernel's guards and stays fused (a batch equal to the
    channels, a channel dim of 1, the last smaller batch of an epoch: new kinds, not
    torch ops), and each kind compiles once."""
    compilations = count_compilations(monkeypatch)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    shapes = [(4, 4, 8, 8), (8, 4, 8, 8), (8, 1, 8, 8), (5, 4, 8, 8), (6, 300), (300, 300),
              (7, 3, 100)]
    for shape in shapes:
        gen = torch.Generator().manual_seed(1)
        mu, logvar = (torch.randn(shape, generator=gen).bfloat16() for _ in range(2))
        for _ in range(_cpu_fusion.COMPILE_AT_CALL):
            z = fastvae.reparameterize(mu.requires_grad_(), logvar.requires_grad_())
            z.float().sum().backward()
        assert fusion[-1], shape
    with torch.inference_mode():
        frozen = torch.randn(8, 4, 8, 8).bfloat16()
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):  # an inference mu with an ordinary logvar
        fastvae.reparameterize(frozen, torch.zeros(8, 4, 8, 8, dtype=torch.bfloat16))
    assert fusion[-1]
    assert not [w for w in recwarn if "fastvae" in str(w.message)]
    assert len(compilations) == len(_cpu_fusion._compiled) < len(shapes) + 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before  # (none)


def test_an_error_of_the_draw_is_its_own_not_the_compilers(fusion, monkeypatch):
    """The loop calls the draw it is handed; an error there (memory, say) propagates
    and does not switch the fused loops off as a compiler failure would."""
    mu, logvar = _latents(torch.bfloat16)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL - 1):
        _sample(mu, logvar, False)

    def failing(*args, **kwargs):
        raise MemoryError("no memory for the noise")

    monkeypatch.setattr(_torch_impl, "standard_normal", failing)
    with pytest.raises(MemoryError, match="noise"):
        _sample(mu, logvar, False)
    assert not _cpu_fusion._failed and None not in _cpu_fusion._compiled.values()
