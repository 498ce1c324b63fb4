"""Inductor's fused CPU loops for small half-precision losses (fastvae/_cpu_fusion.py,
``fused_small_values`` and ``fused_small_grads``): the values of an mse, l1 or
bce_logits loss against N(0, I) in the forward, its gradients with grad_output
folded in in the backward (fastvae.ops._SmallLossFunction).

Held to the float64 formulas of tests/reference.py and to the torch ops they replace.
SMALL_MIN_NUMEL is lowered so that small tensors take them.
"""

import pytest
import torch

import fastvae
from fastvae import _cpu_fusion
from tests import reference
from tests.fusion import count_compilations, record_fused_calls

SHAPE, LATENTS = (6, 3, 10, 12), (6, 20)  # rows of 360 inputs and 20 latents
LONG_ROWS, LONG_LATENTS = (3, 1300), (3, 1100)  # rows past KL_SHORT_ROW (blocked sums)
HALF = [torch.bfloat16, torch.float16]
REDUCTIONS = ["sum", "mean", "batchmean", "none"]


@pytest.fixture
def fusion(monkeypatch):
    """The small loops from 64 elements, fresh state; yields (values, grads): lists
    recording each call of fused_small_values and fused_small_grads (True: served)."""
    grads = record_fused_calls(monkeypatch, "fused_small_grads", SMALL_MIN_NUMEL=64)
    values = record_fused_calls(monkeypatch, "fused_small_values", SMALL_MIN_NUMEL=64)
    return values, grads


def _inputs(dtype, recon="mse", shape=SHAPE, latents=LATENTS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_hat = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    mu = torch.randn(latents, generator=gen, dtype=torch.float64)
    logvar = torch.randn(latents, generator=gen, dtype=torch.float64) * 0.7
    return tuple(t.to(dtype) for t in (x_hat, x, mu, logvar))


def _loss_and_grads(inputs, recon, reduction, beta=0.75, upstream=1.5, **options):
    """(loss, its gradients for x_hat, mu and logvar); the target has none."""
    x_hat, x, mu, logvar = inputs
    wrt = [t.clone().requires_grad_() for t in (x_hat, mu, logvar)]
    loss = fastvae.vae_loss(wrt[0], x, wrt[1], wrt[2], recon=recon, reduction=reduction,
                            beta=beta, **options)
    grads = torch.autograd.grad(loss.sum() * upstream, wrt)
    return loss.detach(), grads


def _reference(inputs, recon, reduction, beta=0.75, upstream=1.5, logvar_clamp=None):
    x_hat, x, mu, logvar = (t.double().requires_grad_() for t in inputs)
    loss, _, _ = reference.vae_loss(x_hat, x, mu, logvar, recon, beta, reduction, logvar_clamp)
    grads = torch.autograd.grad(loss.sum() * upstream, (x_hat, x, mu, logvar))
    return loss.detach(), grads


def _assert_close(got, want, dtype):
    """float32 math, rounded once into ``dtype``: a relative ulp of it, and absolute
    terms at float32's scale for the terms that cancel and at the spacing of ``dtype``'s
    subnormals (a float16 mean's gradient reaches them)."""
    eps = torch.finfo(dtype).eps
    atol = 8 * torch.finfo(torch.float32).eps * want.abs().max().item() \
        + torch.finfo(dtype).tiny * eps
    assert got.dtype == dtype
    assert torch.allclose(got.double(), want, rtol=eps, atol=atol)


CALLS = _cpu_fusion.COMPILE_AT_CALL + 2  # the backward's loop runs from the forward's 3rd


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("recon", ["mse", "l1", "bce_logits"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_small_loss_matches_the_formula_and_the_torch_ops(fusion, dtype, recon,
                                                                reduction):
    values, grads = fusion
    inputs = _inputs(dtype, recon)
    calls = [_loss_and_grads(inputs, recon, reduction) for _ in range(CALLS)]
    assert values == [False, False] + [True] * (CALLS - 2)
    assert grads == [False, False, True]  # asked from the forward's first fused call
    want, want_grads = _reference(inputs, recon, reduction)
    (unfused, unfused_grads), (fused, fused_grads) = calls[0], calls[-1]
    # row sums in float32 (short rows: Inductor's), totals in float64, then the scale
    assert torch.allclose(fused.double(), want, rtol=2e-6, atol=0)
    assert torch.allclose(fused, unfused, rtol=2e-6, atol=0)
    for got, unfused_grad, wanted in zip(fused_grads, unfused_grads,
                                         want_grads[:1] + want_grads[2:], strict=True):
        _assert_close(got, wanted, dtype)
        _assert_close(unfused_grad, wanted, dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_long_rows_are_summed_in_blocks(fusion, reduction):
    values, grads = fusion
    inputs = _inputs(torch.bfloat16, shape=LONG_ROWS, latents=LONG_LATENTS)
    for _ in range(CALLS):
        got, got_grads = _loss_and_grads(inputs, "mse", reduction)
    assert values[-1] and grads[-1]
    want, want_grads = _reference(inputs, "mse", reduction)
    assert torch.allclose(got.double(), want, rtol=2e-6, atol=0)
    for g, w in zip(got_grads, want_grads[:1] + want_grads[2:]):
        _assert_close(g, w, torch.bfloat16)


def test_a_clamped_logvar_gets_no_gradient_and_nan_propagates(fusion):
    values, grads = fusion
    x_hat, x, mu, logvar = _inputs(torch.bfloat16)
    logvar = logvar.clone()
    logvar[0, :3] = torch.tensor([-12.0, 9.0, 0.5])
    logvar[1, 4] = float("nan")
    inputs = (x_hat, x, mu, logvar)
    for _ in range(CALLS):
        got, (_, _, g_lv) = _loss_and_grads(inputs, "mse", "none", logvar_clamp=(-6.0, 6.0))
    assert values[-1] and grads[-1]
    want, want_grads = _reference(inputs, "mse", "none", logvar_clamp=(-6.0, 6.0))
    assert torch.isnan(got[1]) and not torch.isnan(got[0]) and not torch.isnan(got[2:]).any()
    finite = ~torch.isnan(want)
    assert torch.allclose(got.double()[finite], want[finite], rtol=2e-6, atol=0)
    assert g_lv[0, 0] == 0 and g_lv[0, 1] == 0 and g_lv[0, 2] != 0
    assert torch.isnan(g_lv[1, 4])
    keep = torch.ones_like(g_lv, dtype=torch.bool)
    keep[1, 4] = False
    _assert_close(g_lv[keep], want_grads[3][keep], torch.bfloat16)


def test_what_the_loops_do_not_serve(fusion):
    values, _ = fusion
    for dtype in (torch.float32, torch.float64):  # float32: aten ops were faster
        _loss_and_grads(_inputs(dtype), "mse", "sum")
    assert values == []
    bf16 = _inputs(torch.bfloat16)
    strided = (bf16[0].transpose(2, 3), bf16[1].transpose(2, 3), bf16[2], bf16[3])
    mixed = (bf16[0], bf16[1].half(), bf16[2], bf16[3])  # (one loop, both half dtypes)
    for inputs in (strided, mixed):
        for _ in range(CALLS):
            got, _ = _loss_and_grads(inputs, "mse", "sum")
        want, _ = _reference(inputs, "mse", "sum")
        assert torch.allclose(got.double(), want, rtol=2e-6)
    assert values == []


def test_a_target_with_a_gradient_and_a_beta_tensor(fusion):
    """The target's gradient comes from the torch ops (the forward still fused), beta's
    from the KL value."""
    values, _ = fusion
    x_hat, x, mu, logvar = (t.clone().requires_grad_() for t in _inputs(torch.bfloat16))
    beta = torch.tensor(0.5, requires_grad=True)
    for _ in range(CALLS):
        loss = fastvae.vae_loss(x_hat, x, mu, logvar, recon="l1", beta=beta)
        got = torch.autograd.grad(loss, (x_hat, x, mu, logvar, beta))
    assert values[-1]
    ref = [t.detach().double().requires_grad_() for t in (x_hat, x, mu, logvar, beta)]
    _, recon, kl = reference.vae_loss(*ref[:4], "l1", 1.0, "sum")
    want = torch.autograd.grad(recon + ref[4] * kl, ref)
    for g, w in zip(got[:4], want[:4]):
        _assert_close(g, w, torch.bfloat16)
    assert torch.allclose(got[4].double(), want[4], rtol=2e-6)


def test_frozen_latents_and_no_gradient(fusion):
    """Latents made under inference mode (a frozen encoder) are copied to be saved;
    under no_grad the values alone are computed."""
    values, grads = fusion
    x_hat, x, mu, logvar = _inputs(torch.bfloat16)
    with torch.inference_mode():
        frozen_mu, frozen_logvar = mu.clone(), logvar.clone()
    x_hat = x_hat.clone().requires_grad_()
    for _ in range(CALLS):
        loss = fastvae.vae_loss(x_hat, x, frozen_mu, frozen_logvar, recon="mse")
        got, = torch.autograd.grad(loss, x_hat)
    assert values[-1] and grads[-1]
    want, want_grads = _reference((x_hat.detach(), x, mu, logvar), "mse", "sum", beta=1.0,
                                  upstream=1.0)
    _assert_close(got, want_grads[0], torch.bfloat16)
    with torch.no_grad():
        value = fastvae.vae_loss(x_hat, x, mu, logvar, recon="mse")
    assert values[-1] and torch.allclose(value.double(), want, rtol=2e-6)


def test_repeated_calls_take_the_fast_path_and_dynamo_sees_nothing(fusion, monkeypatch):
    """A call whose exact signature a kernel served before is served again without
    rebuilding its key or checking its guards (the fixed cost these loops are for),
    and no Dynamo graph is made on the way."""
    values, grads = fusion
    compilations = count_compilations(monkeypatch)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    inputs = _inputs(torch.float16, "bce_logits")
    for _ in range(CALLS):
        _loss_and_grads(inputs, "bce_logits", "batchmean")
    assert values[-1] and grads[-1] and len(compilations) == 2
    keys_built, checks = [], []
    guarded, sizes_hold = _cpu_fusion._guarded, _cpu_fusion._Kernel._sizes_hold
    monkeypatch.setattr(_cpu_fusion, "_guarded", lambda *t: keys_built.append(t) or guarded(*t))
    monkeypatch.setattr(_cpu_fusion._Kernel, "_sizes_hold",
                        lambda self, t: checks.append(t) or sizes_hold(self, t))
    for _ in range(3):
        _loss_and_grads(inputs, "bce_logits", "batchmean")
    assert values[-3:] == [True] * 3 and grads[-3:] == [True] * 3
    assert keys_built == [] and checks == []
    other_batch = _inputs(torch.float16, "bce_logits", shape=(5, 3, 10, 12), latents=(5, 20))
    got, _ = _loss_and_grads(other_batch, "bce_logits", "batchmean")  # a new signature:
    assert values[-1] and grads[-1] and len(checks) == 2  # its key and guards, once each
    want, _ = _reference(other_batch, "bce_logits", "batchmean")
    assert torch.allclose(got.double(), want, rtol=2e-6)
    assert len(compilations) == 2  # (the same kernels)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
