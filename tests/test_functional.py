"""The public functions against the textbook formulas (tests/reference.py)."""

import itertools

import pytest
import reference as ref
import torch
import torch.nn.functional as F

import fastvae

RECONS = ("mse", "l1", "bce", "bce_logits")
REDUCTIONS = ("sum", "batchmean", "mean", "none")

# (x shape, latent shape): 1×1, odd flat sizes, 4-D images with 4-D latents
SHAPES = [((1, 1), (1, 1)), ((3, 7), (3, 5)), ((5, 3, 7, 9), (5, 4, 3, 3)), ((2, 300), (2, 17))]


def make_inputs(recon, x_shape, z_shape, dtype=torch.float32, device="cpu", seed=0,
                requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(x_shape, generator=g, dtype=torch.float64)
    if recon == "bce":
        x_hat = torch.sigmoid(raw)
    else:
        x_hat = raw
    if recon in ("bce", "bce_logits"):
        x = torch.rand(x_shape, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    mu = torch.randn(z_shape, generator=g, dtype=torch.float64)
    logvar = torch.randn(z_shape, generator=g, dtype=torch.float64)
    out = [t.to(device=device, dtype=dtype) for t in (x_hat, x, mu, logvar)]
    for t in (out[0], out[2], out[3]):
        t.requires_grad_(requires_grad)
    return out


def tolerances(dtype):
    return {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5),
            torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}[dtype]


@pytest.mark.parametrize("recon,reduction,beta",
                         list(itertools.product(RECONS, REDUCTIONS, (1.0, 0.25, 0.0))))
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0])))
def test_vae_loss_matches_formula(recon, reduction, beta, shapes, device):
    x_hat, x, mu, logvar = make_inputs(recon, *shapes, device=device)
    parts = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, beta=beta, reduction=reduction,
                             return_parts=True)
    expected = ref.vae_loss(x_hat.cpu(), x.cpu(), mu.cpu(), logvar.cpu(), recon, beta, reduction)
    for got, want in zip(parts, expected):
        assert got.dtype == torch.float32
        assert got.shape == want.shape
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)

    # gradients against autograd through the formula, with a random grad_output
    grad_out = torch.rand_like(parts.loss) + 0.5
    got_grads = torch.autograd.grad(parts.loss, (x_hat, mu, logvar), grad_out)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x_hat, mu, logvar)]
    want_loss = ref.vae_loss(leaves[0], x.cpu(), leaves[1], leaves[2], recon, beta, reduction)[0]
    if recon == "bce":  # PyTorch's gradient guards the denominator p(1 - p) with 1e-12
        want_loss = ref.reduce(F.binary_cross_entropy(leaves[0], x.double().cpu(), reduction="none"),
                               reduction) + beta * ref.reduce(ref.kl_elementwise(leaves[1], leaves[2]),
                                                             reduction)
    want_grads = torch.autograd.grad(want_loss, leaves, grad_out.double().cpu())
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("recon", RECONS)
def test_vae_loss_dtypes(recon, dtype, device):
    x_hat, x, mu, logvar = make_inputs(recon, (4, 3, 5, 5), (4, 2, 3, 3), dtype=dtype, device=device)
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, reduction="none")
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = ref.vae_loss(x_hat.cpu(), x.cpu(), mu.cpu(), logvar.cpu(), recon, 1.0, "none")[0]
    torch.testing.assert_close(loss.double().cpu(), want, rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    rtol, atol = tolerances(dtype)
    for t in (x_hat, mu, logvar):
        assert t.grad.dtype == dtype
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x_hat, mu, logvar)]
    if recon == "bce":
        r = F.binary_cross_entropy(leaves[0], x.double().cpu(), reduction="sum")
    else:
        r = ref.recon_elementwise(leaves[0], x.cpu(), recon).sum()
    (r + ref.kl_elementwise(leaves[1], leaves[2]).sum()).backward()
    for t, leaf in zip((x_hat, mu, logvar), leaves):
        torch.testing.assert_close(t.grad.double().cpu(), leaf.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("recon", RECONS)
def test_mixed_dtypes_like_autocast(recon):
    """Under autocast the data batch is float32 and the model output bf16."""
    x_hat, x, mu, logvar = make_inputs(recon, (3, 40), (3, 6))
    x_hat_bf16 = x_hat.detach().bfloat16().requires_grad_()
    loss = fastvae.vae_loss(x_hat_bf16, x, mu, logvar, recon=recon)
    assert loss.dtype == torch.float32
    want = ref.vae_loss(x_hat_bf16.detach(), x, mu.detach(), logvar.detach(), recon, 1.0, "sum")[0]
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert x_hat_bf16.grad.dtype == torch.bfloat16 and mu.grad.dtype == torch.float32


def test_works_inside_autocast():
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(20, 8), torch.nn.Linear(4, 20)
    x = torch.rand(6, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, logvar = enc(x).chunk(2, dim=1)
        z = fastvae.reparameterize(mu, logvar)
        x_hat = dec(z)
        assert x_hat.dtype == torch.bfloat16
        loss = fastvae.vae_loss(x_hat, x, mu, logvar, recon="bce_logits")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in (*enc.parameters(), *dec.parameters()))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_return_parts_gradients_are_separate(reduction):
    """Backpropagating through recon and kl with their own weights gives the weighted gradients."""
    x_hat, x, mu, logvar = make_inputs("mse", (4, 10), (4, 3))
    parts = fastvae.vae_loss(x_hat, x, mu, logvar, beta=0.5, reduction=reduction, return_parts=True)
    (2.0 * parts.recon + 3.0 * parts.kl + parts.loss).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (x_hat, mu, logvar)]
    loss, r, k = ref.vae_loss(leaves[0], x, leaves[1], leaves[2], "mse", 0.5, reduction)
    (2.0 * r + 3.0 * k + loss).sum().backward()
    for t, leaf in zip((x_hat, mu, logvar), leaves):
        torch.testing.assert_close(t.grad.double(), leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recon", RECONS)
def test_gradient_to_target(recon):
    x_hat, x, mu, logvar = make_inputs(recon, (3, 8), (3, 2))
    x.requires_grad_()
    fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, reduction="batchmean").backward()
    x_ref = x.detach().double().requires_grad_()
    ref.reduce(ref.recon_elementwise(x_hat.detach(), x_ref, recon), "batchmean").backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)


def test_beta_tensor_equals_float_and_gets_gradient():
    x_hat, x, mu, logvar = make_inputs("mse", (4, 10), (4, 3))
    beta = torch.tensor(0.3, requires_grad=True)
    loss_t = fastvae.vae_loss(x_hat, x, mu, logvar, beta=beta)
    loss_f = fastvae.vae_loss(x_hat, x, mu, logvar, beta=0.3)
    torch.testing.assert_close(loss_t, loss_f)
    loss_t.backward()
    want = ref.kl_elementwise(mu.detach(), logvar.detach()).sum()
    torch.testing.assert_close(beta.grad.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_logvar_clamp(reduction):
    x_hat, x, mu, logvar = make_inputs("mse", (4, 10), (4, 6))
    with torch.no_grad():
        logvar.mul_(40)  # push many entries past the clamp
    clamp = (-30.0, 20.0)
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, reduction=reduction, logvar_clamp=clamp)
    want = ref.vae_loss(x_hat.detach(), x, mu.detach(), logvar.detach(), "mse", 1.0, reduction, clamp)[0]
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-4)
    loss.sum().backward()
    outside = (logvar < clamp[0]) | (logvar > clamp[1])
    assert outside.any() and (~outside).any()
    assert (logvar.grad[outside] == 0).all()
    assert (logvar.grad[~outside] != 0).all()


def test_no_grad_and_eval_inputs_match():
    x_hat, x, mu, logvar = make_inputs("bce_logits", (4, 10), (4, 3))
    with_grad = fastvae.vae_loss(x_hat, x, mu, logvar, recon="bce_logits")
    with torch.no_grad():
        without = fastvae.vae_loss(x_hat, x, mu, logvar, recon="bce_logits")
    assert not without.requires_grad
    assert torch.equal(with_grad.detach(), without)


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "expanded", "sliced"])
def test_layouts_equal_contiguous(layout):
    x_hat, x, mu, logvar = make_inputs("mse", (4, 3, 6, 6), (4, 2, 3, 3), requires_grad=False)
    if layout == "transposed":
        views = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (x_hat, x, mu, logvar)]
    elif layout == "channels_last":
        views = [t.contiguous(memory_format=torch.channels_last) for t in (x_hat, x, mu, logvar)]
    elif layout == "expanded":  # every sample shares one target / one latent
        views = [x_hat, x[:1].expand_as(x), mu[:1].expand_as(mu), logvar[:1].expand_as(logvar)]
    else:
        views = [torch.cat([t, t], dim=-1)[..., ::2] for t in (x_hat, x, mu, logvar)]
    dense = [v.contiguous().requires_grad_() for v in views]
    strided = [v.requires_grad_() if v.is_leaf else v.detach().requires_grad_() for v in views]
    for recon in RECONS[:2]:
        a = fastvae.vae_loss(*dense, recon=recon, reduction="none")
        b = fastvae.vae_loss(*strided, recon=recon, reduction="none")
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        ga = torch.autograd.grad(a.sum(), [dense[0], dense[2], dense[3]])
        gb = torch.autograd.grad(b.sum(), [strided[0], strided[2], strided[3]])
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_inputs_are_not_modified():
    x_hat, x, mu, logvar = make_inputs("bce", (4, 10), (4, 3))
    before = [t.detach().clone() for t in (x_hat, x, mu, logvar)]
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, recon="bce", logvar_clamp=(-1, 1))
    loss.backward()
    z, kl = fastvae.sample_and_kl(mu, logvar)
    (z.sum() + kl.sum()).backward()
    for t, b in zip((x_hat, x, mu, logvar), before):
        assert torch.equal(t.detach(), b)


@pytest.mark.parametrize("recon,reduction", list(itertools.product(RECONS, REDUCTIONS)))
def test_gradcheck_float64(recon, reduction):
    x_hat, x, mu, logvar = make_inputs(recon, (3, 4), (3, 2), dtype=torch.float64)
    if recon == "bce":  # keep probabilities away from 0/1, where the -100 clamp kinks
        x_hat = (0.1 + 0.8 * x_hat.detach()).requires_grad_()
    x.requires_grad_(recon in ("mse", "l1", "bce_logits"))
    if recon == "l1":  # |d| has a kink at 0: keep x_hat - x away from it
        x = (x.detach() + 0.1 * torch.sign(x.detach() - x_hat.detach())).requires_grad_()
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def fn(x_hat, x, mu, logvar, beta):
        return fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, beta=beta, reduction=reduction,
                                logvar_clamp=(-3.0, 3.0), return_parts=True)

    assert torch.autograd.gradcheck(fn, (x_hat, x, mu, logvar, beta))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kl_divergence(reduction, device):
    _, _, mu, logvar = make_inputs("mse", (2, 1), (5, 3, 2, 2), device=device)
    got = fastvae.kl_divergence(mu, logvar, reduction=reduction)
    want = ref.reduce(ref.kl_elementwise(mu.cpu(), logvar.cpu()), reduction)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (mu, logvar)]
    grad_out = torch.rand_like(want) + 0.5
    torch.autograd.backward(ref.reduce(ref.kl_elementwise(*leaves), reduction), grad_out)
    got.backward(grad_out.to(got))
    for t, leaf in zip((mu, logvar), leaves):
        torch.testing.assert_close(t.grad.double().cpu(), leaf.grad, rtol=1e-5, atol=1e-6)


def test_kl_divergence_clamp_and_gradcheck():
    mu = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logvar = (torch.randn(3, 4, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, lv: fastvae.kl_divergence(m, lv, reduction="none", logvar_clamp=(-2.5, 2.5)),
        (mu, logvar))
    want = ref.reduce(ref.kl_elementwise(mu, logvar, (-1.0, 1.0)), "sum")
    got = fastvae.kl_divergence(mu, logvar, logvar_clamp=(-1.0, 1.0))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("grad_scale", [65536.0, 1 / 3])
def test_float16_gradients_survive_a_loss_scale(reduction, grad_scale):
    """GradScaler multiplies grad_output by 65536: the float16 gradient must be the
    float32 gradient times that scale, rounded once — not inf, not underflowed."""
    x_hat, x, mu, logvar = make_inputs("mse", (64, 1024), (64, 8))
    # data scaled so that even the scaled "sum" gradient fits in float16
    half = [(0.01 * t.detach()).half().requires_grad_(t.requires_grad) for t in (x_hat, x, mu, logvar)]
    loss = fastvae.vae_loss(*half, reduction=reduction)
    loss.backward(torch.full_like(loss, grad_scale))
    leaves = [t.detach().double().requires_grad_() for t in (half[0], half[2], half[3])]
    want = ref.vae_loss(leaves[0], half[1].double(), leaves[1], leaves[2], "mse", 1.0, reduction)[0]
    want.backward(torch.full_like(want, grad_scale))
    for t, leaf in zip((half[0], half[2], half[3]), leaves):
        assert torch.isfinite(t.grad).all()
        torch.testing.assert_close(t.grad.double(), leaf.grad.half().double(), rtol=1e-3, atol=1e-7)


def test_saved_tensor_hooks_that_keep_tensors_see_them_unchanged():
    x_hat, x, mu, logvar = make_inputs("mse", (4, 10), (4, 3))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        loss = fastvae.vae_loss(x_hat, x, mu, logvar)
    before = [t.clone() for t in kept]
    loss.backward(torch.tensor(3.0))
    assert all(torch.equal(a, b) for a, b in zip(kept, before))


def test_gradients_when_only_one_part_is_used():
    x_hat, x, mu, logvar = make_inputs("mse", (4, 10), (4, 3))
    parts = fastvae.vae_loss(x_hat, x, mu, logvar, beta=0.5, return_parts=True)
    parts.recon.backward()  # the loss and the kl outputs are unused
    assert mu.grad is None and logvar.grad is None
    torch.testing.assert_close(x_hat.grad, 2 * (x_hat - x).detach())
    parts = fastvae.vae_loss(x_hat, x, mu, logvar, beta=0.5, return_parts=True)
    parts.kl.backward()
    torch.testing.assert_close(mu.grad, mu.detach())


@pytest.mark.parametrize("rows", [4, 300])  # the small eager path and the general one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "none", "mean"])
def test_a_float_beta_and_a_tensor_beta_give_the_same_loss_bit_for_bit(rows, dtype, reduction):
    """Compiled code passes a float beta to the op as a tensor: the loss must not depend on
    which (a float was applied by add's alpha, rounded once; a tensor by a multiply and
    an add, rounded twice: 247 of 1920 losses differed in the last bit)."""
    g = torch.Generator().manual_seed(12)
    x_hat, x = (torch.randn(rows, 600, generator=g).to(dtype) for _ in range(2))
    mu = (3 * torch.randn(rows, 5, generator=g)).to(dtype)
    logvar = torch.randn(rows, 5, generator=g).to(dtype)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for beta in (0.1, 0.7777, 3.3):
        for grad in (False, True):
            leaves = [t.clone().requires_grad_(grad) for t in (x_hat, mu, logvar)]
            as_float = fastvae.vae_loss(leaves[0], x, *leaves[1:], beta=beta, reduction=reduction)
            as_tensor = fastvae.vae_loss(leaves[0], x, *leaves[1:], reduction=reduction,
                                         beta=torch.tensor(beta, dtype=loss_dtype))
            assert torch.equal(as_float, as_tensor), (beta, grad)
