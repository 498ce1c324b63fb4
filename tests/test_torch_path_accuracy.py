"""The PyTorch path's accuracy on long rows and extreme values (issue 11, items 3 and 4).

Every value is compared with the float64 formulas of tests/reference.py, or with
PyTorch's own loss where the question is "the same number as F.mse_loss".
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastvae
from tests import reference
from tests.backends import CPU_BACKENDS

# eager's float32 sums over millions of elements are ~1e-8 off; a naive float32
# running sum is ~1e-4 off; this bound lies between, far from both
LONG_ROW_RTOL = 1e-6

LONG_SHAPES = [(1, 2**22), (1, 3, 1024, 1024)]


def _relative_error(got, want):
    return (abs(got.double() - want) / abs(want)).item()


def _recon_value(x_hat, x, recon, reduction, requires_grad):
    x_hat = x_hat.clone().requires_grad_(requires_grad)
    latent = torch.zeros(x_hat.shape[0], 2)
    _, recon_value, _ = fastvae.vae_loss(x_hat, x, latent, latent, recon=recon, beta=0.0,
                                         reduction=reduction, return_parts=True)
    return recon_value.detach()


@pytest.mark.parametrize("shape", LONG_SHAPES, ids=str)
@pytest.mark.parametrize("recon", ["mse", "l1"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_recon_sum_over_a_long_row_is_accurate(shape, recon, requires_grad):
    gen = torch.Generator().manual_seed(1)
    x_hat, x = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    want = reference.reduce(reference.recon_elementwise(x_hat, x, recon), "sum")
    got = _recon_value(x_hat, x, recon, "sum", requires_grad)
    assert _relative_error(got, want) < LONG_ROW_RTOL


@pytest.mark.parametrize("shape", LONG_SHAPES, ids=str)
def test_kl_over_a_long_row_is_accurate(shape):
    gen = torch.Generator().manual_seed(2)
    mu, logvar = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    want = reference.reduce(reference.kl_elementwise(mu, logvar), "sum")
    assert _relative_error(fastvae.kl_divergence(mu, logvar), want) < LONG_ROW_RTOL
    assert _relative_error(fastvae.kl_divergence(mu, logvar, reduction="none")[0], want) \
        < LONG_ROW_RTOL


@pytest.mark.parametrize("shape", [(1, 4_000_000), (2000, 2000)], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_mse_mean_of_constant_differences_is_accurate(shape, requires_grad):
    # constant data is the worst case for a running sum: every rounding goes the same way
    x_hat, x = torch.full(shape, 0.3), torch.zeros(shape)
    want = reference.reduce(reference.recon_elementwise(x_hat, x, "mse"), "mean")
    got = _recon_value(x_hat, x, "mse", "mean", requires_grad)
    assert _relative_error(got, want) < LONG_ROW_RTOL


@pytest.mark.parametrize("shape", [(2000, 2000), (3, 2**19 + 5), (5, 7)], ids=str)
@pytest.mark.parametrize("recon", ["l1", "laplace"])
def test_per_sample_absolute_error_sums_are_accurate(shape, recon):
    """The per-sample sums of |x_hat - x| (l1, laplace with a gradient: written block by
    block into scratch and summed by cascade): row blocks, rows split into column blocks
    with a short last one, and a single block, each sum to float64's value."""
    gen = torch.Generator().manual_seed(2)
    x_hat, x = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    latent = torch.zeros(shape[0], 2)
    got = fastvae.vae_loss(x_hat.requires_grad_(), x, latent, latent, recon=recon, beta=0.0,
                           reduction="none", **({"obs_logvar": 0.0} if recon == "laplace" else {}))
    want = (x_hat.detach().double() - x.double()).abs().sum(dim=1)
    if recon == "laplace":  # + s + log 2 per element, s = 0
        want = want + shape[1] * math.log(2.0)
    assert ((got.detach().double() - want).abs() / want).max() < LONG_ROW_RTOL


# ---- the mse value does not depend on requires_grad ------------------------

def _mse_cases():
    gen = torch.Generator().manual_seed(3)
    huge = torch.tensor([[1.2e19, -0.9e19]])  # (2 d)^2 overflows float32, d^2 does not
    tiny = torch.rand(8, 256, generator=gen)
    return [
        ("huge", huge, torch.zeros_like(huge), "sum"),
        ("huge_none", huge, torch.zeros_like(huge), "none"),
        ("tiny_mean_1e-16", tiny * 1e-16, torch.zeros_like(tiny), "mean"),
        ("tiny_mean_1e-18", tiny * 1e-18, torch.zeros_like(tiny), "mean"),
        ("batchmean_near_one", 1.0 + tiny * 1e-6, torch.ones_like(tiny), "batchmean"),
    ]


@pytest.mark.parametrize("name,x_hat,x,reduction", _mse_cases(), 
                         ids=[c[0] for c in _mse_cases()])
def test_mse_value_is_f_mse_loss_with_or_without_grad(name, x_hat, x, reduction):
    eager_reduction = "sum" if reduction in ("batchmean", "none") else reduction
    if reduction == "none":
        want = F.mse_loss(x_hat, x, reduction="none").sum(1)
    else:
        want = F.mse_loss(x_hat, x, reduction=eager_reduction)
        if reduction == "batchmean":
            want = want / x_hat.shape[0]
    assert torch.isfinite(want).all() and (want > 0).all()
    without = _recon_value(x_hat, x, "mse", reduction, requires_grad=False)
    with_grad = _recon_value(x_hat, x, "mse", reduction, requires_grad=True)
    assert torch.equal(with_grad, without)
    torch.testing.assert_close(with_grad, want, rtol=1e-6, atol=0)


def test_mse_gradient_with_huge_differences_matches_eager():
    x_hat, x = torch.tensor([[1.2e19, -0.9e19]]), torch.zeros(1, 2)
    leaf = x_hat.clone().requires_grad_(True)
    latent = torch.zeros(1, 2)
    fastvae.vae_loss(leaf, x, latent, latent, recon="mse", beta=0.0).backward()
    eager = x_hat.clone().requires_grad_(True)
    F.mse_loss(eager, x, reduction="sum").backward()
    torch.testing.assert_close(leaf.grad, eager.grad, rtol=1e-6, atol=0)


# ---- the chunked path (half-precision inputs, bce) ---------------------------

@pytest.mark.parametrize("shape", [(5, 150), (7, 20), (3, 2, 7, 9)], ids=str)
@pytest.mark.parametrize("recon", ["mse", "l1", "bce", "bce_logits"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_chunked_recon_matches_the_reference_across_chunk_edges(monkeypatch, shape, recon, dtype):
    from fastvae import _torch_impl

    # chunks of 64 elements: rows split into column pieces with a tail (150 = 2 * 64 + 22),
    # and several short rows per chunk with a partial last chunk (7 rows of 20, 3 per chunk)
    monkeypatch.setattr(_torch_impl, "RECON_CHUNK", 64)
    monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 0)  # not the whole-tensor path for small inputs
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(shape, generator=gen).to(dtype)
    x_hat = torch.rand(shape, generator=gen) * 0.98 + 0.01
    if recon in ("mse", "l1", "bce_logits"):
        x_hat = torch.randn(shape, generator=gen) * 2
    x_hat = x_hat.to(dtype)
    leaf = x_hat.clone().requires_grad_(True)
    latent = torch.zeros(shape[0], 2)
    recon_rows = fastvae.vae_loss(leaf, x, latent, latent, recon=recon, beta=0.0, reduction="none")
    recon_rows.backward(torch.arange(1.0, shape[0] + 1))
    # float64 reference from the same (rounded) input values
    ref_leaf = x_hat.double().requires_grad_(True)
    ref_rows = reference.reduce(reference.recon_elementwise(ref_leaf, x.double(), recon), "none")
    ref_rows.backward(torch.arange(1.0, shape[0] + 1, dtype=torch.float64))
    torch.testing.assert_close(recon_rows.double(), ref_rows.detach(), rtol=1e-5, atol=1e-5)
    grad_rtol = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=grad_rtol, atol=grad_rtol)


@pytest.mark.parametrize("bad,target", [(-1e-30, 0.0), (1.0 + 2**-23, 1.0), (float("nan"), 0.5),
                                        (float("inf"), 1.0), (-2.0, 0.0)])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_bce_probability_out_of_range_is_refused_by_the_loss_pass(monkeypatch, bad, target, requires_grad):
    # the PyTorch path checks x_hat in the pass that computes the loss: one bad
    # element, in the last chunk, where its target weight zeroes one of the logs
    from fastvae import _torch_impl

    monkeypatch.setattr(_torch_impl, "RECON_CHUNK", 64)
    x_hat, x = torch.full((3, 100), 0.5), torch.full((3, 100), target)
    x_hat[2, 97] = bad
    latent = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"x_hat must hold probabilities in \[0, 1\]"):
        fastvae.vae_loss(x_hat.requires_grad_(requires_grad), x, latent, latent, recon="bce")


# ---- small inputs: whole-tensor ops (_torch_impl.SMALL_NUMEL) ------------------

def _loss_and_grads(x_hat, x, mu, logvar, **options):
    leaves = [t.clone().requires_grad_(True) for t in (x_hat, mu, logvar)]
    parts = fastvae.vae_loss(leaves[0], x, leaves[1], leaves[2], return_parts=True, **options)
    weight = torch.arange(1.0, x_hat.shape[0] + 1) if options["reduction"] == "none" else None
    torch.autograd.backward(parts.loss, weight)
    return [t.detach() for t in parts] + [t.grad for t in leaves]


@pytest.mark.parametrize("recon", ["mse", "l1", "bce_logits"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clamp", [None, (-1.0, 1.0)])
def test_small_input_path_matches_the_reference_and_the_large_path(
        monkeypatch, recon, reduction, dtype, clamp):
    from fastvae import _torch_impl

    gen = torch.Generator().manual_seed(5)
    # a transposed x_hat and logvar: the gradient buffers are contiguous all the same
    x_hat = (torch.randn(40, 6, generator=gen) * 2).to(dtype).t()
    x = torch.rand(6, 40, generator=gen).to(dtype)
    mu = torch.randn(6, 3, generator=gen).to(dtype)
    logvar = (torch.randn(3, 6, generator=gen) * 1.5).to(dtype).t()
    options = dict(recon=recon, reduction=reduction, beta=0.7, logvar_clamp=clamp)
    assert x_hat.numel() <= _torch_impl.SMALL_NUMEL
    small = _loss_and_grads(x_hat, x, mu, logvar, **options)
    monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 0)
    large = _loss_and_grads(x_hat, x, mu, logvar, **options)
    ref_leaves = [t.double().requires_grad_(True) for t in (x_hat, mu, logvar)]
    recon_ref = reference.reduce(reference.recon_elementwise(ref_leaves[0], x.double(), recon),
                                 reduction)
    kl_ref = reference.reduce(reference.kl_elementwise(ref_leaves[1], ref_leaves[2], clamp),
                              reduction)
    loss_ref = recon_ref + 0.7 * kl_ref
    torch.autograd.backward(loss_ref, None if reduction != "none"
                            else torch.arange(1.0, x_hat.shape[0] + 1, dtype=torch.float64))
    ref = [t.detach() for t in (loss_ref, recon_ref, kl_ref)] + [t.grad for t in ref_leaves]
    grad_tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}[dtype]
    for got, other, want in zip(small, large, ref):
        assert got.dtype == other.dtype and got.is_contiguous() == other.is_contiguous()
        tol = 1e-5 if got.dtype == torch.float32 else grad_tol
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(got, other, rtol=tol, atol=tol)


@pytest.mark.parametrize("recon", ["mse", "l1", "bce_logits", "bce"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_recon_without_gradient_equals_the_values_with_it(monkeypatch, recon, dtype):
    """With or without a gradient, the chunked path gives the same per-sample sums,
    bit for bit (each recon checked)."""
    from fastvae import _torch_impl

    monkeypatch.setattr(_torch_impl, "RECON_CHUNK", 64)
    monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 0)
    gen = torch.Generator().manual_seed(6)
    x_hat = torch.randn(5, 150, generator=gen).to(dtype)
    x = torch.rand(5, 150, generator=gen).to(dtype)
    if recon == "bce":
        x_hat = (torch.rand(5, 150, generator=gen) * 0.98 + 0.01).to(dtype)
    latent = torch.zeros(5, 2)
    with torch.no_grad():
        plain = fastvae.vae_loss(x_hat, x, latent, latent, recon=recon, beta=0.0, reduction="none")
    with_grad = fastvae.vae_loss(x_hat.clone().requires_grad_(True), x, latent, latent,
                                 recon=recon, beta=0.0, reduction="none")
    assert torch.equal(plain, with_grad.detach())


@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_mse_gradient_is_the_scaled_difference_rounded_once(monkeypatch, reduction, dtype):
    """d/dx_hat of the reduced mse is 2 (x_hat - x) / (the reduction's divisor): computed
    in float32 from the half-precision inputs and rounded once to their dtype."""
    from fastvae import _torch_impl

    monkeypatch.setattr(_torch_impl, "RECON_CHUNK", 64)
    monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 0)
    gen = torch.Generator().manual_seed(7)
    x_hat = (torch.randn(6, 150, generator=gen) * 3).to(dtype)
    x = torch.rand(6, 150, generator=gen).to(dtype)
    leaf = x_hat.clone().requires_grad_(True)
    latent = torch.zeros(6, 2)
    fastvae.vae_loss(leaf, x, latent, latent, recon="mse", beta=0.0, reduction=reduction).backward()
    divisor = {"sum": 1, "mean": x.numel(), "batchmean": x.shape[0]}[reduction]
    want = ((x_hat.float() - x.float()) * (2.0 / divisor)).to(dtype)
    assert torch.equal(leaf.grad, want)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (x_hat - x)^2: inf
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("x_hat_dtype,x_dtype", [(torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.bfloat16),
                                                  (torch.float32, torch.float32)])
@pytest.mark.parametrize("small", [False, True], ids=["large_path", "small_path"])
def test_mse_gradient_near_the_largest_values_does_not_overflow(monkeypatch, x_hat_dtype,
                                                                 x_dtype, backend, small):
    """Differences beyond half of float32's range: 2 (x_hat - x) would overflow, the
    gradient of the mean does not (2 / numel times the difference, from float64).
    PyTorch path: bfloat16 targets with bfloat16 or float32 predictions (the chunked
    path), float32 with float32 (the whole-tensor pass), and the small inputs' path
    (its gradient computed in the backward), which all gave inf before, as did the
    kernels, interpreted here."""
    from fastvae import _torch_impl

    fastvae.set_backend(backend)
    monkeypatch.setattr(_torch_impl, "RECON_CHUNK", 64)
    if not small:
        monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 0)
    x_hat = torch.full((2, 100), 2.0e38).to(x_hat_dtype)
    x = torch.full((2, 100), -0.5e38).to(x_dtype)
    x_hat[1] = 0.5
    x[1] = 0.25
    leaf = x_hat.clone().requires_grad_(True)
    latent = torch.zeros(2, 2)
    fastvae.vae_loss(leaf, x, latent, latent, recon="mse", beta=0.0, reduction="mean").backward()
    want = ((x_hat.double() - x.double()) * (2.0 / x.numel())).to(x_hat_dtype)
    assert torch.isfinite(leaf.grad).all()
    # the difference times 2 / numel, rounded twice in float32: within 2 ulp (bfloat16: exact,
    # but Triton's interpreter truncates float32 to bfloat16: 1 ulp)
    ulps = torch.finfo(x_hat_dtype).eps if backend == "triton" and x_hat_dtype == torch.bfloat16 \
        else 2 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(leaf.grad, want, rtol=ulps, atol=0)


def _refuse_host_reads(monkeypatch):
    """Make any read of a tensor's value on the host (a device sync on CUDA) an error."""
    def refuse(*_):
        raise AssertionError("a host read of a tensor value")

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("case", ["whole_float32", "chunked_bfloat16", "chunked_mixed"])
@pytest.mark.parametrize("rows", ["overflow", "no_overflow"])
def test_mse_pass_where_host_reads_cost_a_sync_decides_on_the_device(monkeypatch, case, rows):
    """On CUDA (float64, or a forced PyTorch backend) the mse pass must not read its
    sums on the host to find an overflowed gradient: that is a device sync and breaks
    CUDA-graph capture. Run here as the CUDA branch (host reads refused): the same
    values and gradients as the CPU branch, the overflowing rows included."""
    from fastvae import _torch_impl

    monkeypatch.setattr(_torch_impl, "RECON_CHUNK", 64)
    dtype = {"whole_float32": torch.float32, "chunked_bfloat16": torch.bfloat16,
             "chunked_mixed": torch.float32}[case]
    x_hat = torch.full((3, 100), 2.0e38 if rows == "overflow" else 3.0).to(dtype)
    x = torch.full((3, 100), -0.5e38 if rows == "overflow" else 1.0)
    x = x.to(torch.bfloat16 if case != "whole_float32" else torch.float32)
    x_hat[1], x[1] = 0.5, 0.25
    grad_scale = 1.0 / x.numel()  # "mean": the gradient 2 (x_hat - x) / numel stays finite
    want = [t.clone() for t in _torch_impl.recon_per_sample(x_hat, x, "mse", torch.float32,
                                                              grad_scale)]
    if rows == "overflow":  # the CPU branch's result, against float64
        assert torch.equal(want[1], ((x_hat.double() - x.double()) * (2 * grad_scale)).to(dtype))
    monkeypatch.setattr(_torch_impl, "host_reads_are_free", lambda t: False)
    _refuse_host_reads(monkeypatch)
    got = _torch_impl.recon_per_sample(x_hat, x, "mse", torch.float32, grad_scale)
    monkeypatch.undo()
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_small_inputs_gradient_in_the_forward_does_not_overflow_either():
    """The gradient computed in the forward for small inputs (the custom op's contract,
    under torch.compile and export) is (x_hat - x) (2 scale) too: finite for a mean."""
    from fastvae import _torch_impl

    x_hat, x = torch.full((2, 100), 2.0e38), torch.full((2, 100), -0.5e38)
    scale = 1.0 / x.numel()
    _, grad = _torch_impl._small_recon(x_hat, x, "mse", torch.float32, "mean", scale, True)
    want = ((x_hat.double() - x.double()) * (2 * scale)).float()
    torch.testing.assert_close(grad, want, rtol=2 * torch.finfo(torch.float32).eps, atol=0)


# ---- a large mse / l1 without a gradient: the difference never written whole -------

@pytest.mark.parametrize("recon", ["mse", "l1"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("shape", [(7, 150), (3, 2, 7, 9), (4, 700)], ids=str)
def test_large_loss_without_gradient_never_writes_the_difference_and_keeps_its_value(
        monkeypatch, recon, reduction, shape):
    """From CHUNKED_NO_GRAD_NUMEL elements an mse or l1 without a gradient makes x_hat - x
    a block at a time (groups of rows; l1: column blocks of long rows too), neither
    writing it whole nor calling aten's summed loss (which writes the terms whole): the
    same value, bit for bit, as with a gradient, and float64's to float32 accuracy."""
    from fastvae import _torch_impl

    # small blocks: several row groups with a short last one, rows split into column
    # blocks (700 = 2 * 256 + 188) and rows longer than a group (4 x 700 against 512)
    monkeypatch.setattr(_torch_impl, "CHUNKED_NO_GRAD_NUMEL", 64)
    monkeypatch.setattr(_torch_impl, "RECON_CHUNK", 512)
    monkeypatch.setattr(_torch_impl, "ABS_BLOCK", 256)
    monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 0)
    gen = torch.Generator().manual_seed(8)
    x_hat, x = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    latent = torch.zeros(shape[0], 2)

    def with_grad():
        leaf = x_hat.clone().requires_grad_(True)
        return fastvae.vae_loss(leaf, x, latent, latent, recon=recon, beta=0.0,
                                reduction=reduction).detach()

    want_bits = with_grad()

    def refuse(*args, **kwargs):
        raise AssertionError("the difference, or the loss terms, written whole")

    monkeypatch.setattr(_torch_impl, "_difference", refuse)
    monkeypatch.setattr(_torch_impl, "_small_recon", refuse)
    with torch.no_grad():
        got = fastvae.vae_loss(x_hat, x, latent, latent, recon=recon, beta=0.0,
                               reduction=reduction)
    assert torch.equal(got, want_bits)
    want = reference.reduce(reference.recon_elementwise(x_hat.double(), x.double(), recon),
                            reduction)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("recon", ["mse", "l1"])
def test_large_loss_without_gradient_of_strided_inputs_has_the_contiguous_value(monkeypatch,
                                                                                 recon):
    """channels_last (or otherwise strided) inputs take the whole-difference path there
    (blocks of their rows would copy them whole): the same per-sample sums as contiguous."""
    from fastvae import _torch_impl

    monkeypatch.setattr(_torch_impl, "CHUNKED_NO_GRAD_NUMEL", 64)
    monkeypatch.setattr(_torch_impl, "RECON_CHUNK", 512)
    monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 0)
    gen = torch.Generator().manual_seed(9)
    x_hat, x = torch.randn(3, 4, 7, 9, generator=gen), torch.randn(3, 4, 7, 9, generator=gen)
    latent = torch.zeros(3, 2)
    with torch.no_grad():
        want = fastvae.vae_loss(x_hat, x, latent, latent, recon=recon, reduction="none")
        got = fastvae.vae_loss(x_hat.contiguous(memory_format=torch.channels_last),
                               x.contiguous(memory_format=torch.channels_last), latent, latent,
                               recon=recon, reduction="none")
    assert torch.equal(got, want)


def test_large_loss_without_gradient_keeps_no_row_sized_scratch(monkeypatch):
    """Rows longer than a block group: each row's difference is a temporary, not a kept
    scratch block that would hold a row's size for the thread's lifetime."""
    from fastvae import _torch_impl

    monkeypatch.setattr(_torch_impl, "CHUNKED_NO_GRAD_NUMEL", 64)
    monkeypatch.setattr(_torch_impl, "RECON_CHUNK", 512)
    monkeypatch.setattr(_torch_impl, "SMALL_NUMEL", 0)
    kept = getattr(_torch_impl._kept_scratch, "blocks", None)
    if kept is not None:
        monkeypatch.setattr(_torch_impl._kept_scratch, "blocks", {})
    gen = torch.Generator().manual_seed(10)
    x_hat, x = torch.randn(3, 2000, generator=gen), torch.randn(3, 2000, generator=gen)
    latent = torch.zeros(3, 2)
    with torch.no_grad():
        got = fastvae.vae_loss(x_hat, x, latent, latent, recon="mse", reduction="none")
    blocks = getattr(_torch_impl._kept_scratch, "blocks", {})
    assert all(buf.numel() <= _torch_impl.RECON_CHUNK for buf in blocks.values())
    want = reference.reduce(reference.recon_elementwise(x_hat.double(), x.double(), "mse"), "none")
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
