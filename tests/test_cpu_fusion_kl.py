"""Inductor's fused CPU loop for the KL of the latents (fastvae/_cpu_fusion.py,
``fused_kl``): against a diagonal Gaussian prior in any CPU dtype, against N(0, I)
for half-precision latents.

Held to the float64 textbook formula of tests/reference.py and to the torch ops it
replaces (the first calls of a kind, before the kernel compiles). KL_MIN_NUMEL is
lowered so that small latents take the fused path.
"""

import math

import pytest
import torch

import fastvae
from fastvae import _cpu_fusion, _torch_impl
from tests import reference
from tests.fusion import count_compilations, record_fused_calls

SHAPE = (6, 4, 8, 9)  # rows of 288 elements: Inductor's own row sum
LONG_ROWS = (3, 2, 40, 40)  # rows of 3200, past KL_SHORT_ROW: summed in blocks
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def fusion(monkeypatch):
    """The fused KL from 64 latent elements, state restored afterwards; yields a list
    recording each fused_kl call's outcome (True: the loop served it)."""
    return record_fused_calls(monkeypatch, "fused_kl", KL_MIN_NUMEL=64)


def _latents(shape, dtype, prior, seed=0):
    """mu, logvar and the prior's (prior_mu, prior_logvar): "learned" the shape of a
    sample (broadcast over the batch), "per_sample" mu's shape, "mean_only" a learned
    mean with unit variance, "none" the standard normal."""
    gen = torch.Generator().manual_seed(seed)

    def draw(shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    mu, logvar = draw(shape), draw(shape, 0.7)
    prior_shape = shape[1:] if prior in ("learned", "mean_only") else shape
    prior_mu = None if prior == "none" else draw(prior_shape, 0.5)
    prior_logvar = None if prior in ("none", "mean_only") else draw(prior_shape, 0.5)
    return mu, logvar, prior_mu, prior_logvar


def _kl_and_grads(tensors, **options):
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    mu, logvar, prior_mu, prior_logvar = leaves
    kl = fastvae.kl_divergence(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                               **options)
    present = [t for t in leaves if t is not None]
    return kl.detach(), torch.autograd.grad(kl.sum(), present)


def _reference(tensors, reduction="sum", logvar_clamp=None):
    leaves = [None if t is None else t.double().requires_grad_() for t in tensors]
    terms = reference.kl_elementwise_prior(*leaves, logvar_clamp=logvar_clamp)
    want = reference.reduce(terms, reduction)
    present = [t for t in leaves if t is not None]
    return want.detach(), torch.autograd.grad(want.sum(), present)


def _assert_grads_close(got, want, dtype, numel):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        eps = torch.finfo(dtype).eps
        # float32 math rounded once into the gradient's dtype; differences (mu - pm)
        # and expm1 cancel, so an absolute term on the scale of the largest gradient.
        # A prior broadcast over the batch sums its per-sample gradients, each rounded
        # into its dtype (as the torch ops do): their count times its eps
        summed = numel // g.numel()
        # (plus the spacing of dtype's subnormals, which a float16 batch mean reaches)
        atol = 8 * torch.finfo(torch.float32).eps * w.abs().max().item() \
            + torch.finfo(dtype).tiny * eps
        if summed > 1:
            atol += summed * eps * w.abs().max().item()
        assert torch.allclose(g.double(), w, rtol=eps, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prior", ["learned", "per_sample", "mean_only", "none"])
@pytest.mark.parametrize("shape", [SHAPE, LONG_ROWS], ids=str)
def test_fused_kl_matches_the_formula_and_the_torch_ops(fusion, monkeypatch, dtype, prior,
                                                       shape):
    if prior == "none":  # (up to SMALL_NUMEL elements its gradients come in the backward)
        monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 16)
    tensors = _latents(shape, dtype, prior)
    calls = [_kl_and_grads(tensors) for _ in range(_cpu_fusion.COMPILE_AT_CALL)]
    fused_here = not (prior == "none" and dtype == torch.float32)
    assert fusion == ([False] * (_cpu_fusion.COMPILE_AT_CALL - 1) + [True] if fused_here else [])
    (unfused, unfused_grads), (fused, fused_grads) = calls[0], calls[-1]
    want, want_grads = _reference(tensors)
    # float32 terms summed in float32 rows (short) or blocks then float64 (long)
    assert torch.allclose(fused.double(), want, rtol=1e-6, atol=0)
    assert torch.allclose(fused, unfused, rtol=2e-6, atol=0)
    _assert_grads_close(fused_grads, want_grads, dtype, math.prod(shape))
    _assert_grads_close(unfused_grads, want_grads, dtype, math.prod(shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_half_precision_latents_from_small_half_kl_numel_take_the_loop(fusion, monkeypatch,
                                                                       dtype):
    """Below SMALL_NUMEL, the KL alone of half-precision latents of SMALL_HALF_KL_NUMEL
    elements or more goes to the general path (its fused loop from the third call);
    fewer elements, and float32 latents, stay on the small path (no fused_kl call)."""
    numel = math.prod(SHAPE)
    assert numel < _torch_impl.SMALL_NUMEL
    monkeypatch.setattr(_torch_impl, "SMALL_HALF_KL_NUMEL", numel)
    fewer = _latents((SHAPE[0] - 1, *SHAPE[1:]), dtype, "none")
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        _kl_and_grads(fewer)
    assert fusion == []
    tensors = _latents(SHAPE, dtype, "none")
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        got, grads = _kl_and_grads(tensors)
    if dtype == torch.float32:
        assert fusion == []
    else:
        assert fusion == [False] * (_cpu_fusion.COMPILE_AT_CALL - 1) + [True]
    want, want_grads = _reference(tensors)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)
    _assert_grads_close(grads, want_grads, dtype, numel)


@pytest.mark.parametrize("reduction", ["none", "mean", "batchmean"])
def test_every_reduction_and_the_loss(fusion, reduction):
    tensors = _latents(SHAPE, torch.bfloat16, "learned")
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        got, grads = _kl_and_grads(tensors, reduction=reduction)
    assert fusion[-1]
    want, want_grads = _reference(tensors, reduction)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)
    _assert_grads_close(grads, want_grads, torch.bfloat16, math.prod(SHAPE))
    # vae_loss's KL term takes the same loop (another key: compiled at its own third call)
    mu, logvar, prior_mu, prior_logvar = tensors
    x = torch.rand(SHAPE[0], 5)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        loss = fastvae.vae_loss(x, x, mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                reduction=reduction)
    assert fusion[-1] and len(fusion) == 2 * _cpu_fusion.COMPILE_AT_CALL
    assert torch.allclose(loss.double(), want, rtol=1e-6, atol=0)


def test_logvars_50_apart_keep_an_accurate_gradient(fusion):
    """lv - plv is rounded in float32; the loop carries the rounding error into expm1
    (TwoSum), else both logvar gradients would be ~2e-6 off (|err| e^d)."""
    gen = torch.Generator().manual_seed(6)
    logvar = 19 + torch.rand(8, 32, generator=gen)
    prior_logvar = -30 + torch.rand(32, generator=gen)
    mu, prior_mu = torch.randn(8, 32, generator=gen), torch.randn(32, generator=gen)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        _, (g_mu, g_lv, g_pm, g_plv) = _kl_and_grads((mu, logvar, prior_mu, prior_logvar))
    assert fusion[-1]
    ratio = torch.exp(logvar.double() - prior_logvar.double())
    want_lv = 0.5 * (ratio - 1)
    want_plv = (0.5 * (1 - ratio - (mu.double() - prior_mu.double()) ** 2
                       / prior_logvar.double().exp())).sum(0)
    for got, want in ((g_lv, want_lv), (g_plv, want_plv)):
        assert ((got.double() - want).abs() / want.abs()).max() < 4e-7


def test_logvars_close_to_the_prior_keep_an_accurate_gradient(fusion):
    """d/dlv = expm1(lv - plv) / 2, Inductor's expm1 is exp - 1 (1e-8 gave 0): the
    loop's series below 1/2. Differences from 0 to 0.6, exactly 0 included."""
    offsets = torch.tensor([0.0, 1e-30, -1e-12, 1e-8, -1e-7, 3e-6, 1e-4, -1e-3, 0.01, 0.2,
                            0.4999, -0.5, 0.5001, 0.6])
    prior_logvar = torch.full((offsets.numel(),), 0.3)
    logvar = (prior_logvar + offsets).expand(8, -1).contiguous()
    mu = torch.zeros(8, offsets.numel())
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        kl, (g_mu, g_lv, g_plv) = _kl_and_grads((mu, logvar, None, prior_logvar))
    assert fusion[-1]
    d = logvar[0].double() - prior_logvar.double()  # the float32 difference, exactly
    want = 0.5 * torch.expm1(d)
    assert g_lv[0, 0] == 0.0 and g_plv[0] == 0.0
    nonzero = d != 0
    rel = ((g_lv[0].double() - want).abs() / want.abs())[nonzero]
    assert rel.max() < 2 * torch.finfo(torch.float32).eps
    assert torch.allclose(kl.double(), _reference((mu, logvar, None, prior_logvar))[0],
                          rtol=1e-6, atol=1e-30)


def test_a_clamped_logvar_and_nan_rows(fusion):
    """logvar_clamp zeroes the logvar's gradient where it is active; a NaN logvar makes
    its sample's KL NaN and passes its NaN gradient, other rows stay finite."""
    mu, logvar, prior_mu, prior_logvar = _latents(SHAPE, torch.float32, "learned")
    logvar.view(SHAPE[0], -1)[1, :5] = torch.tensor([3.0, -3.0, 0.5, float("nan"), 2.5])
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        kl, (g_mu, g_lv, g_pm, g_plv) = _kl_and_grads(
            (mu, logvar, prior_mu, prior_logvar), reduction="none", logvar_clamp=(-2.0, 2.0))
    assert fusion[-1]
    rows = g_lv.view(SHAPE[0], -1)
    assert rows[1, 0] == 0 and rows[1, 1] == 0 and rows[1, 4] == 0 and rows[1, 2] != 0
    assert torch.isnan(rows[1, 3]) and torch.isnan(kl[1])
    finite = [0] + list(range(2, SHAPE[0]))
    clean = [t[finite] for t in (mu, logvar)] + [prior_mu, prior_logvar]
    want = _reference(clean, "none", logvar_clamp=(-2.0, 2.0))[0]
    assert torch.allclose(kl[finite].double(), want, rtol=1e-6, atol=0)


def test_other_broadcasts_and_layouts_take_the_torch_ops(fusion):
    """A prior broadcast other than over the batch ((1, C, 1, 1), say) or
    non-contiguous latents: the torch ops, with the same values."""
    mu, logvar, _, _ = _latents(SHAPE, torch.float32, "none")
    prior_logvar = torch.linspace(-0.5, 0.5, SHAPE[1]).view(1, SHAPE[1], 1, 1)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        kl, _ = _kl_and_grads((mu, logvar, None, prior_logvar))
    assert fusion == [False] * _cpu_fusion.COMPILE_AT_CALL  # (refused by its shape)
    assert torch.allclose(kl.double(), _reference((mu, logvar, None, prior_logvar))[0],
                          rtol=1e-6, atol=0)
    transposed = [t.transpose(2, 3) for t in _latents(SHAPE, torch.bfloat16, "per_sample")]
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        kl, _ = _kl_and_grads(transposed)
    assert len(fusion) == _cpu_fusion.COMPILE_AT_CALL  # (not asked: applies_kl said no)
    assert torch.allclose(kl.double(), _reference(transposed)[0], rtol=1e-5, atol=0)


def test_no_gradient_and_the_switch(fusion):
    tensors = _latents(SHAPE, torch.float16, "per_sample")
    mu, logvar, prior_mu, prior_logvar = tensors
    with torch.no_grad():
        for _ in range(_cpu_fusion.COMPILE_AT_CALL):
            kl = fastvae.kl_divergence(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
    assert fusion[-1]
    assert torch.allclose(kl.double(), _reference(tensors)[0], rtol=1e-6, atol=0)
    previous = fastvae.set_cpu_fusion(False)
    try:
        fastvae.kl_divergence(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
    finally:
        fastvae.set_cpu_fusion(previous)
    assert len(fusion) == _cpu_fusion.COMPILE_AT_CALL  # off: not asked


def test_many_shapes_stay_fused(fusion, monkeypatch, recwarn):
    """A call whose sizes break its kernel's guards runs the torch ops: the key holds
    what a graph specializes on (a prior of (M,) or (1, M), short or long rows, sizes of
    1 and equal sizes, a batch equal to the row length), so each kind compiles once and
    every shape of it stays fused."""
    compilations = count_compilations(monkeypatch)
    # (all but the last three were one key before it held these: 10 graphs)
    cases = [((8, 300), 1), ((8, 3, 100), 1), ((8, 3, 10, 10), 1), ((8, 3, 2, 5, 10), 1),
             ((8, 3, 2, 5, 2, 5), 1), ((8, 2000), 1), ((300, 300), 1), ((8, 300), 2),
             ((8, 3, 100), 2), ((100, 1), 1), ((100, 7), 1), ((1, 4096), 1),
             ((4, 4, 8, 8), 1), ((8, 4, 8, 8), 1), ((8, 1, 8, 8), 1)]
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for shape, prior_rank_extra in cases:
        mu, logvar, prior_mu, prior_logvar = _latents(shape, torch.bfloat16, "learned")
        if prior_rank_extra == 2:  # the prior with a leading batch dim of 1
            prior_mu, prior_logvar = prior_mu.unsqueeze(0), prior_logvar.unsqueeze(0)
        tensors = (mu, logvar, prior_mu, prior_logvar)
        for _ in range(_cpu_fusion.COMPILE_AT_CALL):
            got, grads = _kl_and_grads(tensors)
        assert fusion[-1], shape
        want, want_grads = _reference(tensors)
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=0), shape
        _assert_grads_close(grads, want_grads, torch.bfloat16, math.prod(shape))
    with torch.inference_mode():
        for _ in range(_cpu_fusion.COMPILE_AT_CALL):
            fastvae.kl_divergence(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
    assert fusion[-1]
    assert not _cpu_fusion._failed and None not in _cpu_fusion._compiled.values()
    assert not [w for w in recwarn if "fastvae" in str(w.message)]
    assert len(compilations) == len(_cpu_fusion._compiled) < len(cases)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before  # (none)


def test_a_clamp_past_float32s_range_is_refused_on_every_call(fusion):
    """torch.clamp refuses a float32 bound it cannot hold; the loop must not turn it into
    inf on the third call (the outcome would depend on the call count)."""
    tensors = _latents(SHAPE, torch.float32, "learned")
    for _ in range(_cpu_fusion.COMPILE_AT_CALL + 1):
        with pytest.raises(RuntimeError, match="overflow"):
            _kl_and_grads(tensors, logvar_clamp=(-1e39, 1e39))


# ---- free bits: the columns' sums from the same loop ----


def _free_bits_between(tensors):
    """A floor between the smallest and largest batch-mean KL of the latent elements:
    some elements held at it (zero gradient), others above."""
    leaves = [None if t is None else t.double() for t in tensors]
    per_element = reference.kl_elementwise_prior(*leaves).mean(0)
    # (halfway between extremes: equal to none, where the reference's maximum would split
    # the gradient between the two sides)
    return float(per_element.min() + per_element.max()) / 2


def _free_bits_reference(tensors, free_bits, reduction):
    leaves = [None if t is None else t.double().requires_grad_() for t in tensors]
    terms = reference.kl_elementwise_prior(*leaves)
    want = reference.kl_free_bits(terms, free_bits, reduction)
    present = [t for t in leaves if t is not None]
    return want.detach(), torch.autograd.grad(want, present)


# each dtype, prior and branch of the column sums (a batch within one block of ROW_BLOCK
# rows; 300: padded blocks; 512: whole blocks); float32 latents against N(0, I) stay on
# the torch ops (applies_kl)
@pytest.mark.parametrize("dtype,prior,batch", [
    (torch.bfloat16, "none", 300), (torch.float16, "none", 6), (torch.float32, "learned", 512),
    (torch.bfloat16, "learned", 6), (torch.float32, "per_sample", 300),
    (torch.float16, "per_sample", 512)], ids=str)
def test_free_bits_take_the_loop_with_column_sums(fusion, dtype, prior, batch):
    tensors = _latents((batch, 4, 3, 3), dtype, prior)
    free_bits = _free_bits_between(tensors)
    calls = [_kl_and_grads(tensors, free_bits=free_bits, reduction="batchmean")
             for _ in range(_cpu_fusion.COMPILE_AT_CALL)]
    assert fusion == [False] * (_cpu_fusion.COMPILE_AT_CALL - 1) + [True]
    want, want_grads = _free_bits_reference(tensors, free_bits, "batchmean")
    for got, grads in calls:  # the torch ops (1, 2), the loop (3)
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)
        _assert_grads_close(grads, want_grads, dtype, tensors[0].numel())
    held = (reference.kl_elementwise_prior(*[None if t is None else t.double()
                                             for t in tensors]).mean(0) < free_bits)
    assert held.any() and (~held).any()
    assert (calls[-1][1][0][:, held] == 0).all()  # no gradient at the floor
    assert torch.equal(calls[-1][1][0][:, held], calls[0][1][0][:, held])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_free_bits_every_reduction_and_the_loss(fusion, reduction):
    tensors = _latents((6, 4, 8, 9), torch.bfloat16, "learned")
    free_bits = _free_bits_between(tensors)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        got, grads = _kl_and_grads(tensors, free_bits=free_bits, reduction=reduction)
    assert fusion[-1]
    want, want_grads = _free_bits_reference(tensors, free_bits, reduction)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0)
    _assert_grads_close(grads, want_grads, torch.bfloat16, tensors[0].numel())
    # in vae_loss, the KL term with free bits: the loop's too
    x_hat, x = torch.zeros(6, 5), torch.zeros(6, 5)
    mu, logvar, prior_mu, prior_logvar = (t.clone().requires_grad_() for t in tensors)
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, reduction=reduction, free_bits=free_bits,
                            prior_mu=prior_mu, prior_logvar=prior_logvar, beta=0.5)
    assert fusion[-1] and len(fusion) == _cpu_fusion.COMPILE_AT_CALL + 1
    assert torch.allclose(loss.double(), 0.5 * want, rtol=1e-6, atol=0)
    got_loss_grads = torch.autograd.grad(loss, (mu, logvar, prior_mu, prior_logvar))
    _assert_grads_close(got_loss_grads, [0.5 * w for w in want_grads], torch.bfloat16,
                        tensors[0].numel())
