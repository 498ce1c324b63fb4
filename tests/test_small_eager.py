"""Small inputs in plain eager mode (issue 12): an mse / l1 loss against N(0, I),
and the KL, of at most SMALL_NUMEL elements on the PyTorch path compute their
values in the forward and their gradients in the backward, grad_output folded in
(ops._SmallLossFunction, ops._SmallKLFunction). Held to the float64 oracle in
tests/reference.py, written from the math."""

import pytest
import reference as ref
import torch

import fastvae
from fastvae import _torch_impl

TOL = {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
       torch.float64: dict(rtol=1e-12, atol=1e-12)}


def leaves(dtype, batch=3, cols=7, latent=4, seed=0, target_grad=False, recon="mse"):
    g = torch.Generator().manual_seed(seed)
    x_hat = torch.randn(batch, cols, generator=g, dtype=torch.float64)
    if recon == "bce":  # probabilities, away from 0 and 1
        x_hat = torch.rand(batch, cols, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x = torch.rand(batch, cols, generator=g, dtype=torch.float64)
    mu = torch.randn(batch, latent, generator=g, dtype=torch.float64)
    logvar = torch.randn(batch, latent, generator=g, dtype=torch.float64) * 2
    made = [t.to(dtype).requires_grad_(grad) for t, grad in
            ((x_hat, True), (x, target_grad), (mu, True), (logvar, True))]
    return made


def oracle(tensors, recon, beta, reduction, clamp):
    """float64 copies of ``tensors`` as leaves and ref.vae_loss's (loss, recon, kl) on them."""
    copies = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    return copies, ref.vae_loss(*copies, recon, beta, reduction, logvar_clamp=clamp)


def _weights(value, reduction, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(value.shape, generator=g, dtype=torch.float64) + 0.5 \
        if reduction == "none" else torch.tensor(1.75, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("recon", ["mse", "l1", "bce_logits"])
@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean", "none"])
@pytest.mark.parametrize("clamp", [None, (-1.0, 1.5)])
def test_values_and_gradients_match_the_formulas(dtype, recon, reduction, clamp):
    tensors = leaves(dtype, target_grad=True, recon=recon)
    loss, rec, kl = fastvae.vae_loss(*tensors, recon=recon, beta=0.7, reduction=reduction,
                                     logvar_clamp=clamp, return_parts=True)
    assert "_SmallLossFunction" in type(loss.grad_fn).__name__
    copies, (want_loss, want_rec, want_kl) = oracle(tensors, recon, 0.7, reduction, clamp)
    for got, want in ((loss, want_loss), (rec, want_rec), (kl, want_kl)):
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.detach().double(), want.detach(), **TOL[dtype])
    # every output used, each with its own weight (per sample for "none")
    weights = [_weights(want_loss, reduction, s) for s in range(3)]
    torch.autograd.backward([loss, rec, kl], [w.to(loss.dtype) for w in weights])
    torch.autograd.backward([want_loss, want_rec, want_kl], weights)
    for got, want in zip(tensors, copies):
        assert got.grad.dtype == got.dtype
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL[dtype])


@pytest.mark.parametrize("recon", ["mse", "l1", "bce_logits"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_the_loss_alone_matches_the_formulas(recon, reduction):
    """Without return_parts the Function has one output, the loss."""
    tensors = leaves(torch.float32, target_grad=True, recon=recon)
    loss = fastvae.vae_loss(*tensors, recon=recon, beta=0.7, reduction=reduction)
    assert "_SmallLossFunction" in type(loss.grad_fn).__name__
    copies, (want, _, _) = oracle(tensors, recon, 0.7, reduction, None)
    torch.testing.assert_close(loss.detach().double(), want.detach(), **TOL[torch.float32])
    weight = _weights(want, reduction, 3)
    loss.backward(weight.to(loss.dtype))
    want.backward(weight)
    for got, ref_t in zip(tensors, copies):
        torch.testing.assert_close(got.grad.double(), ref_t.grad, **TOL[torch.float32])


def test_a_tensor_beta_gets_its_gradient():
    tensors = leaves(torch.float32)
    beta = torch.tensor(0.3, requires_grad=True)
    loss = fastvae.vae_loss(*tensors, beta=beta)
    assert "_SmallLossFunction" in type(loss.grad_fn).__name__
    loss.backward()
    kl = ref.reduce(ref.kl_elementwise(tensors[2].detach(), tensors[3].detach()), "sum")
    torch.testing.assert_close(beta.grad.double(), kl, rtol=1e-6, atol=1e-6)
    copies, (want, _, _) = oracle(tensors, "mse", 0.3, "sum", None)
    want.backward()
    for got, ref_t in zip(tensors, copies):
        if got.requires_grad:
            torch.testing.assert_close(got.grad.double(), ref_t.grad, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_kl_divergence_alone(reduction):
    _, _, mu, logvar = leaves(torch.float32)
    kl = fastvae.kl_divergence(mu, logvar, reduction=reduction, logvar_clamp=(-1.0, 1.0))
    assert "_SmallKLFunction" in type(kl.grad_fn).__name__
    mu64, lv64 = (t.detach().double().requires_grad_() for t in (mu, logvar))
    want = ref.reduce(ref.kl_elementwise(mu64, lv64, (-1.0, 1.0)), reduction)
    torch.testing.assert_close(kl.detach().double(), want.detach(), rtol=2e-6, atol=1e-6)
    w = _weights(want, reduction, 4)
    kl.backward(w.float())
    want.backward(w)
    torch.testing.assert_close(mu.grad.double(), mu64.grad, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(logvar.grad.double(), lv64.grad, rtol=2e-6, atol=1e-6)
    assert (logvar.grad[(logvar.detach() < -1) | (logvar.detach() > 1)] == 0).all()


def test_gradcheck_in_float64():
    x_hat, x, mu, logvar = (t.detach().requires_grad_() for t in leaves(torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, m, lv: fastvae.vae_loss(a, x, m, lv, recon="l1", beta=0.5, reduction="none",
                                          logvar_clamp=(-1.0, 1.0), return_parts=True),
        (x_hat, mu, logvar))
    assert torch.autograd.gradcheck(
        lambda m, lv: fastvae.kl_divergence(m, lv, reduction="batchmean"), (mu, logvar))


def test_nan_propagates_to_the_values_and_gradients():
    x_hat, x, mu, logvar = leaves(torch.float32)
    with torch.no_grad():
        logvar[1, 2] = float("nan")
        x_hat[0, 3] = float("nan")
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[0]) and torch.isnan(loss[1]) and not torch.isnan(loss[2])
    assert torch.isnan(logvar.grad[1, 2]) and torch.isnan(x_hat.grad[0, 3])
    assert not torch.isnan(logvar.grad[0]).any()


@pytest.mark.parametrize("case", ["large", "prior", "free_bits", "bce", "continuous_bernoulli",
                                  "gaussian", "no_grad"])
def test_other_calls_keep_the_gradients_computed_in_the_forward(case):
    cols = _torch_impl.SMALL_NUMEL // 3 + 1 if case == "large" else 7
    x_hat, x, mu, logvar = leaves(torch.float32, cols=cols)
    kwargs = {"prior": dict(prior_mu=torch.zeros(4)), "free_bits": dict(free_bits=0.1),
              "bce": dict(recon="bce"), "continuous_bernoulli": dict(recon="continuous_bernoulli"),
              "gaussian": dict(recon="gaussian", obs_logvar=0.5)}
    if case == "bce":  # probabilities
        x_hat = torch.rand(x_hat.shape).requires_grad_()
    with torch.set_grad_enabled(case != "no_grad"):
        loss = fastvae.vae_loss(x_hat, x, mu, logvar, **kwargs.get(case, {}))
    name = type(loss.grad_fn).__name__ if loss.grad_fn is not None else ""
    assert "_SmallLossFunction" not in name
    assert ("_VAELossFunction" in name) == (case != "no_grad")


@pytest.mark.parametrize("with_kl,use", [(False, "z"), (True, "z"), (True, "kl"), (True, "both")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_sampling_equals_the_general_function_bit_for_bit(with_kl, use, dtype):
    """ops._SmallSampleFunction calls the PyTorch path's forward and backward
    directly: the same z, KL and gradients as the general autograd.Function."""
    from fastvae import ops

    _, _, mu, logvar = leaves(dtype)
    seed = torch.tensor([123456789])
    g = torch.Generator().manual_seed(9)
    grad_z = torch.randn(mu.shape, generator=g).to(dtype)
    grad_kl = torch.randn(mu.shape[0], generator=g)
    results = []
    for function, args in ((ops._SmallSampleFunction, (seed, -3.0, 1.0, with_kl)),
                           (ops._ReparameterizeFunction, (None, None, seed, -3.0, 1.0, with_kl, 0))):
        m, lv = (t.detach().clone().requires_grad_() for t in (mu, logvar))
        out = function.apply(m, lv, *args)
        # the small Function returns z alone without the KL
        z, kl = out if isinstance(out, tuple) else (out, None)
        outs, grads = [], []
        if use in ("z", "both"):
            outs.append(z), grads.append(grad_z)
        if use in ("kl", "both"):
            outs.append(kl), grads.append(grad_kl)
        torch.autograd.backward(outs, grads)
        results.append((z, kl if with_kl else None, m.grad, lv.grad))
    for a, b in zip(*results):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_small_sampling_is_what_the_public_api_runs_on_small_cpu_latents():
    _, _, mu, logvar = leaves(torch.float32)
    z, kl = fastvae.sample_and_kl(mu, logvar)
    assert "_SmallSampleFunction" in type(z.grad_fn).__name__
    big = torch.zeros(3, _torch_impl.SMALL_NUMEL // 3 + 1, requires_grad=True)
    assert "_ReparameterizeFunction" in type(fastvae.reparameterize(big, big).grad_fn).__name__
    prior = torch.zeros(4)
    z, _ = fastvae.sample_and_kl(mu, logvar, prior_mu=prior)
    assert "_ReparameterizeFunction" in type(z.grad_fn).__name__


@pytest.mark.parametrize("with_kl", [False, True], ids=["z", "z_and_kl"])
@pytest.mark.parametrize("clamp", [None, (-1.0, 0.5)], ids=["no_clamp", "clamp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_small_sampling_without_gradients_equals_the_general_op_bit_for_bit(with_kl, clamp,
                                                                            dtype):
    """A call without gradients runs the small path's arithmetic alone
    (ops._small_sample_value): the same z and KL, bits and dtypes, as the general op."""
    from fastvae import ops

    gen = torch.Generator().manual_seed(5)
    mu = torch.randn(6, 4, generator=gen).t().to(dtype)  # (a transposed layout)
    logvar = (torch.randn(4, 6, generator=gen) * 2).to(dtype)
    seed = torch.tensor([987654321])
    lo, hi = clamp or (None, None)
    z, kl = ops._small_sample_value(mu, logvar, seed, lo, hi, with_kl)
    want_z, want_kl = ops._reparameterize_impl(mu, logvar, None, None, seed, lo, hi, with_kl, 0)
    assert z.is_contiguous()
    torch.testing.assert_close(z, want_z, rtol=0, atol=0)
    torch.testing.assert_close(kl, want_kl, rtol=0, atol=0)  # (an empty one without the KL)


def test_the_public_api_samples_small_cpu_latents_without_gradients_on_the_small_path(
        monkeypatch):
    from fastvae import ops

    general = []
    real = ops._reparameterize_impl
    monkeypatch.setattr(ops, "_reparameterize_impl", lambda *a: general.append(1) or real(*a))
    _, _, mu, logvar = leaves(torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        z, kl = fastvae.sample_and_kl(mu, logvar)
    torch.manual_seed(0)
    z_grad, kl_grad = fastvae.sample_and_kl(mu, logvar)  # (the small Function: same bits)
    with torch.inference_mode():
        fastvae.reparameterize(mu, logvar)
    fastvae.reparameterize(mu.detach(), logvar.detach())
    assert general == []
    torch.testing.assert_close(z, z_grad.detach(), rtol=0, atol=0)
    torch.testing.assert_close(kl, kl_grad.detach(), rtol=0, atol=0)
    big = torch.zeros(3, _torch_impl.SMALL_NUMEL // 3 + 1)
    fastvae.reparameterize(big, big)
    fastvae.sample_and_kl(mu.detach(), logvar.detach(), prior_mu=torch.zeros(4))
    assert general == [1, 1]


@pytest.mark.parametrize("bad", [1.5, -0.25, float("nan")])
def test_bce_probabilities_outside_the_unit_interval_are_refused_by_name(bad):
    x_hat, x, mu, logvar = leaves(torch.float32, recon="bce")
    with torch.no_grad():
        x_hat[1, 2] = bad
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="x_hat"):
            fastvae.vae_loss(x_hat, x, mu, logvar, recon="bce")


def test_bce_logits_targets_outside_the_unit_interval_are_refused_by_name():
    x_hat, x, mu, logvar = leaves(torch.float32)
    with torch.no_grad():
        x[0, 0] = 1.5
    with pytest.raises(ValueError, match=r"\bx\b"):
        fastvae.vae_loss(x_hat, x, mu, logvar, recon="bce_logits")


def test_export_with_a_dynamic_batch_across_small_numel():
    """The size test of the small path runs only in plain eager mode: traced, it would
    become a guard that caps a dynamic batch below SMALL_NUMEL / row length."""
    from torch.export import Dim, export

    class Loss(torch.nn.Module):
        def forward(self, x_hat, x, mu, logvar):
            return fastvae.vae_loss(x_hat, x, mu, logvar) + fastvae.kl_divergence(mu, logvar)

    cols = 64
    batch = Dim("batch", min=2, max=4 * _torch_impl.SMALL_NUMEL // cols)
    inputs = [torch.rand(8, cols), torch.rand(8, cols), torch.randn(8, 4), torch.randn(8, 4)]
    program = export(Loss(), tuple(inputs), dynamic_shapes=({0: batch},) * 4)
    big = _torch_impl.SMALL_NUMEL // cols + 5  # past SMALL_NUMEL elements
    for rows in (8, big):
        args = [torch.rand(rows, cols), torch.rand(rows, cols), torch.randn(rows, 4),
                torch.randn(rows, 4)]
        want = Loss()(*args)
        torch.testing.assert_close(program.module()(*args), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_small_sampling_returns_a_contiguous_z_whatever_the_latents_layout(layout):
    """As the general path and the custom op's fake implementation do: z.view(-1) works in
    training as in eval."""
    gen = torch.Generator().manual_seed(3)
    if layout == "transposed":
        mu, logvar = (torch.randn(6, 4, generator=gen).t().requires_grad_() for _ in range(2))
    else:
        mu, logvar = (torch.randn(2, 3, 4, 5, generator=gen)
                      .to(memory_format=torch.channels_last).requires_grad_() for _ in range(2))
    for z in (fastvae.reparameterize(mu, logvar), fastvae.sample_and_kl(mu, logvar)[0]):
        assert "_SmallSampleFunction" in type(z.grad_fn).__name__
        assert z.is_contiguous()
        z.view(-1).sum().backward()


@pytest.mark.parametrize("shape", [(4, 3), (2, _torch_impl.SMALL_NUMEL // 2 + 1)],
                         ids=["small", "general"])
def test_sampling_of_cpu_latents_under_another_default_device(shape):
    """The seed and the noise are drawn for the latents' device, not torch's default one
    (a seed on the meta device held no value: z was garbage)."""
    mu, logvar = (torch.randn(shape, generator=torch.Generator().manual_seed(i)).requires_grad_()
                  for i in range(2))
    want = fastvae.sample_and_kl(mu, logvar, generator=torch.Generator().manual_seed(8))
    with torch.device("meta"):
        z, kl = fastvae.sample_and_kl(mu, logvar, generator=torch.Generator(device="cpu").manual_seed(8))
        z_only = fastvae.reparameterize(mu, logvar, generator=torch.Generator(device="cpu").manual_seed(8))
    assert z.device.type == z_only.device.type == "cpu"
    assert torch.equal(z, want[0]) and torch.equal(kl, want[1]) and torch.equal(z_only, want[0])
    (kl.sum()).backward()  # only the KL used: the backward's zero grad_z is made on the CPU too
    assert mu.grad.device.type == "cpu"
