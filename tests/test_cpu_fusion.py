"""Inductor's fused CPU loops for large reconstruction terms (fastvae/_cpu_fusion.py).

Held to the float64 formulas of tests/reference.py and to the chunked torch ops
they replace. MIN_NUMEL is lowered so that small tensors take the fused path (each
kernel still compiles once, ~1-2 s with Inductor's disk cache warm).
"""

import warnings

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

SHAPE = (3, 3, 151, 149)  # past SMALL_NUMEL (2^17), whose calls take few whole ops; rows of
# 67497 elements: not a multiple of _cpu_fusion.ROW_BLOCK (padded) nor of a vector's width
BLOCKED_SHAPE = (2, 3, 128, 192)  # rows of 288 whole ROW_BLOCKs (viewed, not padded)


@pytest.fixture
def fusion(monkeypatch):
    """Fusion on, from 64 elements, with its state restored afterwards; yields a list
    that records each call's outcome (True: the fused loop served it). Large float16
    losses stay on this loop too (it still serves them under saved-tensor hooks, with a
    prior or free bits; tests/test_cpu_fusion_small.py holds the small loops' split)."""
    monkeypatch.setattr(_torch_impl, "large_half_applies", lambda *args: False)
    return record_fused_calls(monkeypatch, "fused_recon", MIN_NUMEL=64)


def _inputs(recon, shape, x_hat_dtype, x_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if recon == "bce":
        x_hat = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    else:
        x_hat = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    return x_hat.to(x_hat_dtype), x.to(x_dtype)


def _loss_and_grad(x_hat, x, recon, reduction, beta=1.0, **options):
    x_hat = x_hat.clone().requires_grad_()
    latent = torch.zeros(x_hat.shape[0], 3)
    loss = fastvae.vae_loss(x_hat, x, latent, latent, recon=recon, reduction=reduction,
                            beta=beta, **options)
    grad, = torch.autograd.grad(loss.sum(), x_hat)
    return loss.detach(), grad


def _reference(x_hat, x, recon, reduction):
    x_hat = x_hat.double().requires_grad_()
    want = reference.reduce(reference.recon_elementwise(x_hat, x.double(), recon), reduction)
    grad, = torch.autograd.grad(want.sum(), x_hat)
    return want.detach(), grad


CASES = [("mse", torch.bfloat16, torch.bfloat16), ("mse", torch.float16, torch.float16),
         ("mse", torch.bfloat16, torch.float32), ("l1", torch.bfloat16, torch.bfloat16),
         ("bce_logits", torch.float32, torch.float32),
         ("bce_logits", torch.float16, torch.float16), ("bce", torch.bfloat16, torch.bfloat16),
         ("bce", torch.float32, torch.float32)]


@pytest.mark.parametrize("recon,x_hat_dtype,x_dtype", CASES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("shape", [SHAPE, BLOCKED_SHAPE], ids=str)
def test_fused_loss_matches_the_formula_and_the_chunked_ops(fusion, recon, x_hat_dtype, x_dtype,
                                                            reduction, shape):
    x_hat, x = _inputs(recon, shape, x_hat_dtype, x_dtype)
    calls = [_loss_and_grad(x_hat, x, recon, reduction) for _ in range(_cpu_fusion.COMPILE_AT_CALL)]
    assert fusion == [False] * (_cpu_fusion.COMPILE_AT_CALL - 1) + [True]
    (chunked, chunked_grad), (fused, fused_grad) = calls[0], calls[-1]

    want, want_grad = _reference(x_hat, x, recon, reduction)
    # float32 terms summed in float64: the float32 rounding of each term is what is left
    assert torch.allclose(fused.double(), want, rtol=2e-7, atol=0)
    assert torch.allclose(fused, chunked, rtol=1e-6, atol=0)
    # the gradient: float32 math rounded once into its buffer's dtype (float16's is
    # float32, rounded to float16 by the backward), the same bits as the chunked ops
    assert fused_grad.dtype == x_hat_dtype
    assert torch.equal(fused_grad, chunked_grad)
    # (a gradient that is a difference, sigmoid(l) - x, cancels: its error is relative
    # to the operands, so an absolute term on the scale of the largest gradient)
    eps = torch.finfo(x_hat_dtype).eps
    assert torch.allclose(fused_grad.double(), want_grad, rtol=eps,
                          atol=4 * eps * want_grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPE, BLOCKED_SHAPE], ids=str)
def test_fused_continuous_bernoulli(fusion, dtype, shape):
    # logits ~ N(0, 4): many below 0.5 in magnitude, where the normaliser's gradient
    # takes its series, and many above
    x_hat, x = _inputs("continuous_bernoulli", shape, dtype, dtype)
    calls = [_loss_and_grad(x_hat, x, "continuous_bernoulli", "sum")
             for _ in range(_cpu_fusion.COMPILE_AT_CALL)]
    assert fusion[-1] and not any(fusion[:-1])
    (chunked, chunked_grad), (fused, fused_grad) = calls[0], calls[-1]
    want, want_grad = _reference(x_hat, x, "continuous_bernoulli", "sum")
    # terms of both signs (a density above 1 has a negative log): relative to their scale
    scale = reference.recon_elementwise(x_hat, x, "continuous_bernoulli").abs().sum()
    assert abs(fused.double() - want) < 1e-6 * scale
    assert abs(fused.double() - chunked.double()) < 1e-6 * scale
    assert fused_grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    atol = 16 * torch.finfo(torch.float32).eps * want_grad.abs().max().item()
    assert torch.allclose(fused_grad.double(), want_grad, rtol=eps, atol=atol)
    assert torch.allclose(fused_grad, chunked_grad, rtol=eps, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_continuous_bernoulli_logits_at_and_near_zero(fusion, dtype):
    # a zero logit (a zero-initialised decoder, a ReLU) is common; Inductor's expm1 gave
    # 0 for -1e-8, which made log(a / m) NaN before the series took over below 0.5
    x_hat, x = _inputs("continuous_bernoulli", SHAPE, dtype, dtype)
    flat = x_hat.view(-1)
    flat[:8] = torch.tensor([0.0, 1e-30, -1e-30, 1e-8, -1e-7, 1e-3, 0.4999, -0.5001])
    flat[8:1000] *= 1e-2  # a row of small logits
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        got, grad = _loss_and_grad(x_hat, x, "continuous_bernoulli", "none")
    assert fusion[-1]
    want, want_grad = _reference(x_hat, x, "continuous_bernoulli", "none")
    # at l = 0 exactly autograd takes the formula's max(l, 0) and |l| at their kinks
    # (slopes 1 and 0): 1 - x; the derivative there is sigmoid(0) - x = 1/2 - x
    want_grad.view(-1)[0] = 0.5 - x.view(-1)[0].double()
    scale = reference.per_sample(
        reference.recon_elementwise(x_hat, x, "continuous_bernoulli").abs())
    assert ((got.double() - want).abs() < 1e-6 * scale).all()
    atol = 16 * torch.finfo(torch.float32).eps * want_grad.abs().max().item()
    assert torch.allclose(grad.double(), want_grad, rtol=torch.finfo(dtype).eps, atol=atol)


def test_many_shapes_stay_fused_and_compile_once_each(fusion, monkeypatch, recwarn):
    # a graph specializes on a batch of 1, rows a whole number of blocks and a batch
    # equal to the row length (one symbol); each is a key of its own, and every shape
    # of a key passes its graph's guards: each shape runs fused, each key compiled once
    compilations = count_compilations(monkeypatch)
    shapes = [(3, 50000), (1, 140000), (2, 3, 128, 192), (1, 3, 256, 256), (2, 70000),
              (4, 3, 100, 120), (2, 2, 3, 100, 120), (3, 4, 12800), (1, 131328), (5, 30000),
              (2, 3, 151, 149), (6, 25000), (300, 300)]
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for shape in shapes:
        x_hat, x = _inputs("mse", shape, torch.bfloat16, torch.bfloat16)
        for _ in range(_cpu_fusion.COMPILE_AT_CALL):
            got, grad = _loss_and_grad(x_hat, x, "mse", "sum")
        want, want_grad = _reference(x_hat, x, "mse", "sum")
        assert fusion[-1], shape
        assert torch.allclose(got.double(), want, rtol=2e-7)
        assert torch.allclose(grad.double(), want_grad, rtol=2**-8, atol=0)
    assert not _cpu_fusion._failed
    assert not [w for w in recwarn if "fastvae" in str(w.message)]
    assert len(compilations) == len(_cpu_fusion._compiled) < len(shapes)
    # and Dynamo saw none of it (its guards and wrappers cost ~17 us a call)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before


def _scaled_by_row_length(t, dtype):
    """A branch on a size: the traced graph keeps one side and guards on it."""
    return (t * 2 if t.shape[1] > 8 else t * 3).to(dtype)


def test_sizes_that_break_a_graphs_guards_run_the_torch_ops(fusion, monkeypatch):
    """No Dynamo checks what a compiled graph assumed about sizes: the kernel does, once
    per new set of sizes, and answers None (the torch ops) where it does not hold, as it
    does for arguments other than tensors that differ from the traced ones."""
    key = ("guards test",)
    wide = torch.arange(32.0).reshape(2, 16)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL - 1):
        assert _cpu_fusion._run(key, _scaled_by_row_length, wide, torch.float32) is None
    assert torch.equal(_cpu_fusion._run(key, _scaled_by_row_length, wide, torch.float32),
                       wide * 2)
    kernel = _cpu_fusion._compiled[key]
    evaluated = []
    evaluate = kernel.shape_env.evaluate_guards_expression
    monkeypatch.setattr(kernel.shape_env, "evaluate_guards_expression",
                        lambda code, args: evaluated.append(args) or evaluate(code, args))
    wider = torch.randn(3, 40)
    for _ in range(3):
        got = _cpu_fusion._run(key, _scaled_by_row_length, wider, torch.float32)
        assert torch.equal(got, wider * 2)
    assert len(evaluated) == 1  # the new sizes, checked once
    narrow = torch.randn(2, 4)  # the graph took the other side of the branch
    assert _cpu_fusion._run(key, _scaled_by_row_length, narrow, torch.float32) is None
    strided = torch.randn(3, 80)[:, ::2]  # traced contiguous
    assert _cpu_fusion._run(key, _scaled_by_row_length, strided, torch.float32) is None
    assert _cpu_fusion._run(key, _scaled_by_row_length, wide, torch.float64) is None
    assert len(evaluated) == 3 and _cpu_fusion._compiled[key] is kernel
    assert not _cpu_fusion._failed


def test_calls_while_another_thread_compiles_take_the_torch_ops(fusion):
    """One compilation at a time: a call that would compile while another is under way
    (here: the lock held, as by another thread) runs the torch ops and compiles later."""
    x_hat, x = _inputs("mse", SHAPE, torch.bfloat16, torch.bfloat16)
    want, _ = _reference(x_hat, x, "mse", "sum")
    with _cpu_fusion._compile_lock:
        for _ in range(_cpu_fusion.COMPILE_AT_CALL + 1):
            got, _ = _loss_and_grad(x_hat, x, "mse", "sum")
            assert torch.allclose(got.double(), want, rtol=1e-6)
    assert fusion == [False] * (_cpu_fusion.COMPILE_AT_CALL + 1)
    got, _ = _loss_and_grad(x_hat, x, "mse", "sum")
    assert fusion[-1] and torch.allclose(got.double(), want, rtol=1e-6)
    assert not _cpu_fusion._failed


def test_one_failing_kernel_leaves_the_others_fused(fusion, monkeypatch):
    x_hat, x = _inputs("mse", SHAPE, torch.bfloat16, torch.bfloat16)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        _loss_and_grad(x_hat, x, "mse", "sum")
    assert fusion[-1]
    real_kernel = _cpu_fusion._kernel

    def refusing_kernel(key, math_fn):
        if key[0] != "l1":
            return real_kernel(key, math_fn)

        def kernel(*args):
            raise RuntimeError("recompile refused")
        return kernel

    monkeypatch.setattr(_cpu_fusion, "_kernel", refusing_kernel)
    l1_hat, l1_x = _inputs("l1", SHAPE, torch.bfloat16, torch.bfloat16)
    _loss_and_grad(l1_hat, l1_x, "l1", "sum")
    _loss_and_grad(l1_hat, l1_x, "l1", "sum")
    with pytest.warns(RuntimeWarning, match="fused CPU loop .'l1'.*recompile refused"):
        got, _ = _loss_and_grad(l1_hat, l1_x, "l1", "sum")
    want, _ = _reference(l1_hat, l1_x, "l1", "sum")
    assert torch.allclose(got.double(), want, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loss_and_grad(l1_hat, l1_x, "l1", "sum")  # that kernel is not tried again
        _loss_and_grad(x_hat, x, "mse", "sum")
    assert fusion[-5:] == [False, False, False, False, True]
    assert not _cpu_fusion._failed


@pytest.mark.parametrize("shape,dtypes", [((20000, 8), (torch.bfloat16, torch.bfloat16)),
                                          (SHAPE, (torch.bfloat16, torch.float16))], ids=str)
def test_narrow_rows_and_mixed_half_types_keep_the_chunked_ops(fusion, shape, dtypes):
    # rows narrower than a block would be padded 32-fold (slower than the chunked ops);
    # a bf16/fp16 pair makes Inductor warn
    x_hat, x = _inputs("mse", shape, *dtypes)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        _loss_and_grad(x_hat, x, "mse", "sum")
    assert fusion == []


@pytest.mark.parametrize("recon,dtype", [("mse", torch.bfloat16), ("bce", torch.float32)])
def test_a_value_without_a_gradient(fusion, recon, dtype):
    x_hat, x = _inputs(recon, SHAPE, dtype, dtype)
    latent = torch.zeros(SHAPE[0], 3)
    with torch.no_grad():
        got = [fastvae.vae_loss(x_hat, x, latent, latent, recon=recon, reduction="none")
               for _ in range(_cpu_fusion.COMPILE_AT_CALL)]
    assert fusion[-1]
    want, _ = _reference(x_hat, x, recon, "none")
    assert torch.allclose(got[-1].double(), want, rtol=2e-7, atol=0)
    assert torch.allclose(got[-1], got[0], rtol=1e-6, atol=0)


def test_a_row_of_a_million_squares_is_summed_accurately(fusion, monkeypatch):
    # Inductor's own float32 row sum was 6e-6 off here; fastvae's rows sum in float64
    monkeypatch.setattr(_cpu_fusion, "MIN_NUMEL", 1 << 20)
    gen = torch.Generator().manual_seed(3)
    x_hat = (torch.randn(1, 1 << 21, generator=gen) + 3).bfloat16()
    x = torch.rand(1, 1 << 21, generator=gen).bfloat16()
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        got, _ = _loss_and_grad(x_hat, x, "mse", "sum", beta=0.0)
    assert fusion[-1]
    want = ((x_hat.double() - x.double()) ** 2).sum()
    assert abs(got.double() - want) / want < 2e-7


def test_a_batch_of_one_and_new_scales_compile_nothing_more(fusion):
    x_hat, x = _inputs("mse", (1, 140000), torch.bfloat16, torch.bfloat16)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        _loss_and_grad(x_hat, x, "mse", "sum")
    assert fusion[-1]
    counters = torch._dynamo.utils.counters
    graphs = counters["stats"]["unique_graphs"]
    # other reductions and betas scale the gradient by other numbers: a 0-dim tensor
    # argument, never a specialized float (one graph per value)
    for reduction, beta in [("mean", 1.0), ("batchmean", 0.5), ("sum", 3.0)]:
        got, grad = _loss_and_grad(x_hat, x, "mse", reduction, beta=beta)
        want, want_grad = _reference(x_hat, x, "mse", reduction)
        assert torch.allclose(got.double(), want, rtol=2e-7)
        assert torch.allclose(grad.double(), want_grad, rtol=2**-8, atol=0)
    assert fusion[-3:] == [True] * 3
    assert counters["stats"]["unique_graphs"] == graphs


def test_gaussian_with_a_float_scale_takes_the_fused_mse_pass(fusion):
    x_hat, x = _inputs("mse", SHAPE, torch.bfloat16, torch.bfloat16)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        got, grad = _loss_and_grad(x_hat, x, "gaussian", "sum", obs_logvar=-1.5)
    assert fusion[-1]
    x_hat64 = x_hat.double().requires_grad_()
    want = reference.recon_elementwise(x_hat64, x.double(), "gaussian", -1.5).sum()
    want_grad, = torch.autograd.grad(want, x_hat64)
    assert torch.allclose(got.double(), want.detach(), rtol=2e-7)
    assert torch.allclose(grad.double(), want_grad, rtol=2**-8, atol=0)


def test_nan_propagates(fusion):
    x_hat, x = _inputs("mse", SHAPE, torch.bfloat16, torch.bfloat16)
    x_hat[1, 0, 0, 0] = float("nan")
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        got, grad = _loss_and_grad(x_hat, x, "mse", "none")
    assert fusion[-1]
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2]]).all()
    assert torch.isnan(grad[1, 0, 0, 0]) and torch.isfinite(grad[0]).all()


def test_bce_probabilities_out_of_range_still_raise(fusion):
    x_hat, x = _inputs("bce", SHAPE, torch.float32, torch.float32)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        _loss_and_grad(x_hat, x, "bce", "sum")
    assert fusion[-1]
    x_hat[2, 1, 3, 4] = 1.5
    with pytest.raises(ValueError, match="x_hat"):
        _loss_and_grad(x_hat, x, "bce", "sum")
    assert fusion[-1]  # (the fused loop ran, then its NaN row sent the check)


@pytest.mark.parametrize("recon,dtype", [("bce_logits", torch.float32), ("bce", torch.bfloat16),
                                         ("continuous_bernoulli", torch.float32)], ids=str)
@pytest.mark.parametrize("shape", [SHAPE, BLOCKED_SHAPE], ids=str)
@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no_grad"])
def test_the_fused_loop_checks_the_targets_without_a_pass_of_its_own(
        fusion, monkeypatch, recon, dtype, shape, with_grad):
    x_hat, x = _inputs(recon, shape, dtype, dtype)
    latent = torch.zeros(shape[0], 3)

    def loss_of(target):
        if not with_grad:
            return fastvae.vae_loss(x_hat, target, latent, latent, recon=recon)
        return _loss_and_grad(x_hat, target, recon, "sum")

    assert_the_loop_checks_the_targets(monkeypatch, loss_of, x, fusion)


def test_a_compiler_failure_warns_once_and_falls_back(fusion, monkeypatch):
    def broken_kernel(key, math_fn):
        def kernel(*args):
            raise RuntimeError("no C++ compiler")
        return kernel

    monkeypatch.setattr(_cpu_fusion, "_kernel", broken_kernel)
    x_hat, x = _inputs("mse", SHAPE, torch.bfloat16, torch.bfloat16)
    first, first_grad = _loss_and_grad(x_hat, x, "mse", "sum")
    _loss_and_grad(x_hat, x, "mse", "sum")
    with pytest.warns(RuntimeWarning, match="no C.. compiler.*unfused torch ops"):
        got, grad = _loss_and_grad(x_hat, x, "mse", "sum")
    assert torch.equal(got, first) and torch.equal(grad, first_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loss_and_grad(x_hat, x, "mse", "sum")  # no second warning, no second attempt
    assert not any(fusion)


def test_float32_mse_and_l1_keep_their_torch_ops(fusion):
    x_hat, x = _inputs("mse", SHAPE, torch.float32, torch.float32)
    for recon in ("mse", "l1"):
        for _ in range(_cpu_fusion.COMPILE_AT_CALL):
            _loss_and_grad(x_hat, x, recon, "sum")
    assert fusion == []  # not even asked


def test_below_min_numel_nothing_compiles(fusion, monkeypatch):
    monkeypatch.setattr(_cpu_fusion, "MIN_NUMEL", 1 << 20)
    x_hat, x = _inputs("mse", SHAPE, torch.bfloat16, torch.bfloat16)
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        _loss_and_grad(x_hat, x, "mse", "sum")
    assert fusion == []


@pytest.mark.parametrize("how", ["config.disable", "force_eager stance"])
def test_with_dynamo_off_the_chunked_ops_run(fusion, how):
    # the "compiled" function would run as torch ops on whole float32 copies
    import torch._dynamo

    x_hat, x = _inputs("mse", SHAPE, torch.bfloat16, torch.bfloat16)
    # (config.patch, not monkeypatch: undoing a monkeypatch deletes a config entry)
    off = torch._dynamo.config.patch(disable=True) if how == "config.disable" \
        else torch.compiler.set_stance("force_eager")
    with off:
        for _ in range(_cpu_fusion.COMPILE_AT_CALL + 1):
            got, grad = _loss_and_grad(x_hat, x, "mse", "sum")
    assert fusion == [False] * (_cpu_fusion.COMPILE_AT_CALL + 1)
    assert not _cpu_fusion._failed  # (not taken for a broken toolchain)
    want, _ = _reference(x_hat, x, "mse", "sum")
    assert torch.allclose(got.double(), want, rtol=1e-6)


def test_switching_fusion_off(fusion, monkeypatch):
    x_hat, x = _inputs("l1", SHAPE, torch.float16, torch.float16)
    assert fastvae.set_cpu_fusion(False) is True
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):
        _loss_and_grad(x_hat, x, "l1", "sum")
    assert fusion == []
    assert fastvae.set_cpu_fusion(True) is False
    with pytest.raises(TypeError, match="enabled must be a bool, got str"):
        fastvae.set_cpu_fusion("off")


@pytest.mark.parametrize("value,enabled", [("0", False), ("off", False), ("1", True), ("", True)])
def test_the_environment_variable(monkeypatch, value, enabled):
    monkeypatch.setattr(_cpu_fusion, "_enabled", _cpu_fusion._NOT_READ)
    monkeypatch.setenv("FASTVAE_CPU_FUSION", value)
    assert _cpu_fusion._is_enabled() is enabled


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setattr(_cpu_fusion, "_enabled", _cpu_fusion._NOT_READ)
    monkeypatch.setenv("FASTVAE_CPU_FUSION", "maybe")
    with pytest.raises(ValueError, match="FASTVAE_CPU_FUSION must be 0 or 1, got 'maybe'"):
        _cpu_fusion._is_enabled()
