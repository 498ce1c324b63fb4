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
from fastvae import _cpu_fusion, _torch_impl
from tests import reference
from tests.fusion import (
    assert_the_loop_checks_the_targets,
    count_compilations,
    record_fused_calls,
)

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


def _upstream(loss):
    """The loss's output gradient: 1.5, or a different weight per sample (reduction
    "none": a weight applied to the wrong row would show)."""
    if loss.dim() == 0:
        return torch.tensor(1.5, dtype=loss.dtype)
    return torch.linspace(0.25, 2.0, loss.shape[0], dtype=loss.dtype)


def _loss_and_grads(inputs, recon, reduction, beta=0.75, **options):
    """(loss, its gradients for x_hat, mu and logvar); the target has none."""
    x_hat, x, mu, logvar = inputs
    wrt = [t.clone().requires_grad_() for t in (x_hat, mu, logvar)]
    loss = fastvae.vae_loss(wrt[0], x, wrt[1], wrt[2], recon=recon, reduction=reduction,
                            beta=beta, **options)
    grads = torch.autograd.grad(loss, wrt, _upstream(loss))
    return loss.detach(), grads


def _reference(inputs, recon, reduction, beta=0.75, logvar_clamp=None):
    """(loss, gradients for x_hat, x, mu, logvar) in float64, the same output gradient."""
    x_hat, x, mu, logvar = (t.double().requires_grad_() for t in inputs)
    loss, _, _ = reference.vae_loss(x_hat, x, mu, logvar, recon, beta, reduction, logvar_clamp)
    grads = torch.autograd.grad(loss, (x_hat, x, mu, logvar), _upstream(loss))
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
    # every call: torch ops (1, 2), the fused forward with the torch ops' backward from
    # the inputs as given (3, 4), both loops (5). Row sums in float32 (short rows:
    # Inductor's), totals in float64, then the scale
    for got, got_grads in calls:
        assert torch.allclose(got.double(), want, rtol=2e-6, atol=0)
        assert torch.allclose(got, calls[0][0], rtol=2e-6, atol=0)
        for g, wanted in zip(got_grads, want_grads[:1] + want_grads[2:], strict=True):
            _assert_close(g, wanted, dtype)


@pytest.mark.parametrize("rows", [(LONG_ROWS, LONG_LATENTS), ((3, 1280), (3, 1536))],
                         ids=["padded blocks", "whole blocks"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_long_rows_are_summed_in_blocks(fusion, reduction, rows):
    values, grads = fusion
    inputs = _inputs(torch.bfloat16, shape=rows[0], latents=rows[1])
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
    calls = [_loss_and_grads(inputs, "mse", "none", logvar_clamp=(-6.0, 6.0))
             for _ in range(CALLS)]
    assert values[-1] and grads[-1]
    want, want_grads = _reference(inputs, "mse", "none", logvar_clamp=(-6.0, 6.0))
    for got, (_, _, g_lv) in calls:  # (torch ops, mixed, fused)
        _assert_clamped_and_nan(got, g_lv, want, want_grads)


def _assert_clamped_and_nan(got, g_lv, want, want_grads):
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


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rows", [(SHAPE, LATENTS), (LONG_ROWS, LONG_LATENTS)],
                         ids=["whole rows", "blocked rows"])
@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no_grad"])
def test_the_values_loop_checks_bce_logits_targets_without_a_pass_of_its_own(
        fusion, monkeypatch, dtype, rows, with_grad):
    values, _ = fusion
    x_hat, x, mu, logvar = _inputs(dtype, "bce_logits", *rows)

    def loss_of(target):
        if not with_grad:
            return fastvae.vae_loss(x_hat, target, mu, logvar, recon="bce_logits")
        return _loss_and_grads((x_hat, target, mu, logvar), "bce_logits", "sum")

    assert_the_loop_checks_the_targets(monkeypatch, loss_of, x, values)


@pytest.mark.parametrize("wanted", ["latents", "x_hat", "all"])
def test_beta_tensor_parts_and_some_gradients_on_the_fused_backward(fusion, wanted):
    """The fused backward with a tensor beta (its gradient from the KL value), the recon
    and KL outputs used apart (return_parts), and only some inputs needing a gradient."""
    values, grads = fusion
    inputs = _inputs(torch.bfloat16, "bce_logits")
    needs = {"latents": (False, True, True), "x_hat": (True, False, False),
             "all": (True, True, True)}[wanted]
    results = []
    for _ in range(CALLS):
        x_hat, mu, logvar = (t.clone().requires_grad_(need)
                             for t, need in zip((inputs[0], inputs[2], inputs[3]), needs))
        beta = torch.tensor(0.5, requires_grad=True)
        parts = fastvae.vae_loss(x_hat, inputs[1], mu, logvar, recon="bce_logits",
                                 reduction="none", beta=beta, return_parts=True)
        weights = _upstream(parts.loss)
        out = parts.loss.dot(weights) + parts.recon.sum() * 0.25 + parts.kl.sum() * 2.0
        wrt = [t for t in (x_hat, mu, logvar) if t.requires_grad] + [beta]
        results.append(torch.autograd.grad(out, wrt))
    assert values[-1] and grads[-1]
    ref = [t.double().requires_grad_() for t in inputs] + [torch.tensor(0.5, dtype=torch.float64,
                                                                        requires_grad=True)]
    _, recon, kl = reference.vae_loss(*ref[:4], "bce_logits", 1.0, "none")
    want_out = (recon + ref[4] * kl).dot(weights.double()) + recon.sum() * 0.25 + kl.sum() * 2
    want_all = torch.autograd.grad(want_out, [ref[0], ref[2], ref[3], ref[4]])
    want = [w for w, need in zip(want_all[:3], needs) if need] + [want_all[3]]
    for got in results:  # (torch ops, mixed, fused)
        for g, w in zip(got[:-1], want[:-1], strict=True):
            _assert_close(g, w, torch.bfloat16)
        assert torch.allclose(got[-1].double(), want[-1], rtol=2e-6)


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
        got, = torch.autograd.grad(loss, x_hat, _upstream(loss))
    assert values[-1] and grads[-1]
    want, want_grads = _reference((x_hat.detach(), x, mu, logvar), "mse", "sum", beta=1.0)
    _assert_close(got, want_grads[0], torch.bfloat16)
    with torch.no_grad():
        value = fastvae.vae_loss(x_hat, x, mu, logvar, recon="mse")
    assert values[-1] and torch.allclose(value.double(), want, rtol=2e-6)


def test_saved_tensor_hooks_and_checkpointing_keep_the_torch_ops(fusion):
    """What the op saves must not depend on whether a loop has compiled yet: a forward
    recomputed by checkpointing saves what the first one did (else a CheckpointError)."""
    values, _ = fusion
    inputs = _inputs(torch.bfloat16)
    want, want_grads = _reference(inputs, "mse", "sum")

    def loss_of(x_hat, mu, logvar):
        return fastvae.vae_loss(x_hat, inputs[1], mu, logvar, recon="mse", beta=0.75)

    _loss_and_grads(inputs, "mse", "sum")  # (so that a forward and its recomputation
    for _ in range(CALLS):  # would be the calls before and at the loop's compilation)
        wrt = [t.clone().requires_grad_() for t in (inputs[0], inputs[2], inputs[3])]
        loss = torch.utils.checkpoint.checkpoint(loss_of, *wrt, use_reentrant=False)
        got = torch.autograd.grad(loss, wrt, _upstream(loss))
        assert torch.allclose(loss.detach().double(), want, rtol=2e-6)
        for g, w in zip(got, want_grads[:1] + want_grads[2:], strict=True):
            _assert_close(g, w, torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        for _ in range(CALLS):
            _loss_and_grads(inputs, "mse", "sum")
    assert values == [False]  # the plain call; under the hooks not even asked


def test_fusion_switched_off_before_the_backward(fusion):
    values, grads = fusion
    inputs = _inputs(torch.bfloat16)
    for _ in range(CALLS - 1):
        _loss_and_grads(inputs, "mse", "none")
    wrt = [t.clone().requires_grad_() for t in (inputs[0], inputs[2], inputs[3])]
    loss = fastvae.vae_loss(wrt[0], inputs[1], wrt[1], wrt[2], recon="mse", reduction="none",
                            beta=0.75)
    assert values[-1]
    asked = len(grads)
    previous = fastvae.set_cpu_fusion(False)
    try:
        got = torch.autograd.grad(loss, wrt, _upstream(loss))
    finally:
        fastvae.set_cpu_fusion(previous)
    assert len(grads) == asked  # not asked: the torch ops
    _, want_grads = _reference(inputs, "mse", "none")
    for g, w in zip(got, want_grads[:1] + want_grads[2:], strict=True):
        _assert_close(g, w, torch.bfloat16)


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


# ---- large float16 losses: the same two loops (_torch_impl.large_half_applies) ----


@pytest.fixture
def large_half(fusion, monkeypatch):
    """``fusion`` with SMALL_NUMEL lowered below SHAPE's 2160 elements: its float16 losses
    are large ones (the large path's own loop stays off: MIN_NUMEL is 2^20)."""
    monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 1024)
    return fusion


@pytest.mark.parametrize("recon,reduction", [("mse", "sum"), ("mse", "none"), ("l1", "mean"),
                                             ("bce_logits", "batchmean")])
def test_large_float16_loss_takes_both_loops_after_its_warm_up(large_half, monkeypatch, recon,
                                                               reduction):
    values, grads = large_half
    compilations = count_compilations(monkeypatch)
    inputs = _inputs(torch.float16, recon)
    calls = [_loss_and_grads(inputs, recon, reduction) for _ in range(CALLS)]
    # the first COMPILE_AT_CALL - 1 calls on the large path (chunked torch ops, float32
    # gradient buffers), then both loops, compiled at their first call there
    served = CALLS - _cpu_fusion.COMPILE_AT_CALL + 1
    assert values == [True] * served and grads == [True] * served
    assert len(compilations) == 2
    want, want_grads = _reference(inputs, recon, reduction)
    for got, got_grads in calls:  # one rounding into float16 (two on the large path)
        assert torch.allclose(got.double(), want, rtol=2e-6, atol=0)
        for g, wanted in zip(got_grads, want_grads[:1] + want_grads[2:], strict=True):
            _assert_close(g, wanted, torch.float16)


def test_what_keeps_a_large_float16_loss_on_the_large_path(large_half):
    """bfloat16 (its gradient buffer is its own dtype already), a target with a gradient,
    saved-tensor hooks, a prior: the large path, never the small loops."""
    values, grads = large_half
    inputs = _inputs(torch.float16)
    for _ in range(CALLS):
        _loss_and_grads(_inputs(torch.bfloat16), "mse", "sum")
        x_hat, x = (t.clone().requires_grad_() for t in inputs[:2])
        loss = fastvae.vae_loss(x_hat, x, *inputs[2:], recon="mse")
        got = torch.autograd.grad(loss, (x_hat, x))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            _loss_and_grads(inputs, "mse", "sum")
        _loss_and_grads(inputs, "mse", "sum", prior_mu=torch.zeros(20, dtype=torch.float16))
    assert values == [] and grads == []
    ref = [t.double().requires_grad_() for t in inputs[:2]]
    latents = (t.double() for t in inputs[2:])
    want = torch.autograd.grad(reference.vae_loss(*ref, *latents, "mse", 1.0, "sum")[0], ref)
    for g, w in zip(got, want, strict=True):
        _assert_close(g, w, torch.float16)


def test_where_the_loops_would_not_run_a_large_float16_loss_keeps_the_large_path(large_half,
                                                                                  monkeypatch):
    """Dynamo off, compiled code told to run eagerly, an inference-mode target, a small loop
    that failed: the split's forward would take whole-tensor torch ops (float32 copies of
    the inputs) on every call; the large path serves these instead."""
    values, grads = large_half
    inputs = _inputs(torch.float16)
    want, want_grads = _reference(inputs, "mse", "sum")

    def check():
        got, got_grads = _loss_and_grads(inputs, "mse", "sum")
        assert torch.allclose(got.double(), want, rtol=2e-6, atol=0)
        for g, w in zip(got_grads, want_grads[:1] + want_grads[2:], strict=True):
            _assert_close(g, w, torch.float16)

    with torch._dynamo.config.patch(disable=True):
        for _ in range(CALLS):
            check()
    with torch.compiler.set_stance("force_eager"):
        for _ in range(CALLS):
            check()
    with torch.inference_mode():
        frozen_target = inputs[1].clone()
    for _ in range(CALLS):
        x_hat = inputs[0].clone().requires_grad_()
        fastvae.vae_loss(x_hat, frozen_target, *inputs[2:], recon="mse").backward()
    assert values == [] and grads == []
    # a small loop that fails once another has worked: a warning, then the large path
    monkeypatch.setattr(_cpu_fusion, "_worked", {"another kernel"})

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(torch._inductor, "standalone_compile", broken)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL - 1):  # (the warm-up: nothing counted above)
        check()
    with pytest.warns(RuntimeWarning, match="no compiler today"):
        check()  # (the warm-up's last call: the values loop fails, its torch ops serve)
    asked = len(values)
    for _ in range(CALLS):
        check()
    assert len(values) == asked == 1 and values == [False]


def test_a_partly_imported_dynamo_reads_as_on(monkeypatch):
    """Another thread importing torch._dynamo leaves a module without its attributes for
    a moment: asking whether Dynamo is off must not raise."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch._dynamo", types.ModuleType("torch._dynamo"))
    assert _cpu_fusion._dynamo_disabled() is False
