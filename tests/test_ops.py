"""The custom ops: opcheck, and torch.compile(fullgraph=True) of a training step."""

import pytest
import torch
from backends import CPU_BACKENDS

import fastvae
from fastvae import _torch_impl, ops


def tensors(requires_grad, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x_hat = torch.randn(3, 2, 4, 4, generator=g).to(device).requires_grad_(requires_grad)
    x = torch.rand(3, 2, 4, 4, generator=g).to(device)
    mu = torch.randn(3, 5, generator=g).to(device).requires_grad_(requires_grad)
    logvar = torch.randn(3, 5, generator=g).to(device).requires_grad_(requires_grad)
    return x_hat, x, mu, logvar


@pytest.mark.parametrize("recon,reduction,beta,clamp,grad", [
    ("mse", "sum", None, None, True),
    ("l1", "none", torch.tensor(0.3), (-1.0, 1.0), True),
    ("bce_logits", "mean", None, None, True),
    ("bce_logits", "batchmean", torch.tensor(2.0), None, False),
])
def test_opcheck_vae_loss(device, recon, reduction, beta, clamp, grad):
    x_hat, x, mu, logvar = tensors(grad, device)
    beta = None if beta is None else beta.to(device)
    lo, hi = clamp or (None, None)
    torch.library.opcheck(ops.vae_loss_op, (x_hat, x, mu, logvar, beta, None, None, None, 0.5,
                                            recon, 0.0, False, reduction, lo, hi, 0.0, grad,
                                            grad, False))


@pytest.mark.parametrize("reduction,grad", [("sum", True), ("none", True), ("mean", False)])
def test_opcheck_kl(device, reduction, grad):
    _, _, mu, logvar = tensors(grad, device)
    torch.library.opcheck(ops.kl_divergence_op, (mu, logvar, None, None, reduction, -2.0, 2.0, 0.0,
                                                 grad, False))


@pytest.mark.parametrize("with_kl", [False, True])
def test_opcheck_reparameterize(device, with_kl):
    _, _, mu, logvar = tensors(True, device)
    seed = torch.tensor(1234)  # seeds stay on the CPU: no device sync to read them
    torch.library.opcheck(ops.reparameterize_op, (mu, logvar, None, None, seed, None, None, with_kl,
                                                 0))
    grad_kl = torch.randn(3, device=device) if with_kl else None
    torch.library.opcheck(ops.reparameterize_backward_op,
                          (torch.randn(3, 5, device=device), grad_kl, mu.detach(), logvar.detach(),
                           None, None, seed, -1.0, 1.0))


class TinyVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(12, 8)
        self.dec = torch.nn.Linear(4, 12)

    def forward(self, x, beta):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = fastvae.reparameterize(mu, logvar)
        loss = fastvae.vae_loss(self.dec(z), x, mu, logvar, recon="bce_logits", beta=beta,
                                reduction="batchmean")
        _, kl = fastvae.sample_and_kl(mu, logvar, logvar_clamp=(-30.0, 20.0))
        return loss + 0.0 * kl.sum()


def test_compiled_training_step_has_no_graph_break_and_no_recompile_for_beta(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyVAE().to(device)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.rand(6, 12, device=device)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step, beta in enumerate((0.1, 0.5, 0.9)):
        beta = torch.tensor(beta, device=device)
        torch.manual_seed(step)  # the noise seeds come from the global generator
        loss = compiled(x, beta)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        # the same step in eager mode (the autograd.Function path), same noise
        torch.manual_seed(step)
        eager_loss = model(x, beta)
        eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
        torch.testing.assert_close(loss, eager_loss)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before
    assert graphs == 1, f"beta as a tensor must not recompile; compiled {graphs} graphs"


def test_compiled_loss_equals_eager(device):
    torch._dynamo.reset()
    x_hat, x, mu, logvar = tensors(True, device)
    fn = torch.compile(lambda *a: fastvae.vae_loss(*a, recon="mse", reduction="none", beta=0.7),
                       fullgraph=True)
    eager = fastvae.vae_loss(x_hat, x, mu, logvar, recon="mse", reduction="none", beta=0.7)
    compiled = fn(x_hat, x, mu, logvar)
    torch.testing.assert_close(compiled, eager)
    g_eager = torch.autograd.grad(eager.sum(), (x_hat, mu, logvar))
    g_comp = torch.autograd.grad(compiled.sum(), (x_hat, mu, logvar))
    for a, b in zip(g_eager, g_comp):
        torch.testing.assert_close(a, b)


def test_double_backward_is_refused_not_silently_zero():
    x_hat, x, mu, logvar = tensors(True)
    loss = fastvae.vae_loss(x_hat, x, mu, logvar)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, x_hat, create_graph=True)
    kl = fastvae.kl_divergence(mu, logvar)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(kl, mu, create_graph=True)


class _Subclass(torch.Tensor):
    """A tensor subclass: fastvae's ops then run as torch.library custom ops."""


@pytest.mark.parametrize("rows", [3, _torch_impl.SMALL_NUMEL // 4 + 1, "custom_op"],
                         ids=["small", "general", "custom_op"])
@pytest.mark.parametrize("call", ["reparameterize", "sample_and_kl"])
def test_double_backward_through_sampling_names_both_sampling_functions(call, rows):
    """The message names the sampling functions (a user of sample_and_kl never called
    reparameterize) and gives the sampling's own reason, not the losses', on every entry
    point (the custom op's backward gave torch's "no autograd formula registered")."""
    if rows == "custom_op":
        mu, logvar = (torch.zeros(3, 4).as_subclass(_Subclass).requires_grad_() for _ in range(2))
    else:
        mu, logvar = (torch.zeros(rows, 4, requires_grad=True) for _ in range(2))
    out = getattr(fastvae, call)(mu, logvar)
    z = out if call == "reparameterize" else out[0]
    with pytest.raises(RuntimeError, match=r"fastvae\.reparameterize / fastvae\.sample_and_kl "
                                           r"does not support double backward.*reads the noise"):
        torch.autograd.grad(z.sum(), logvar, create_graph=True)


@pytest.mark.parametrize("recon,target_requires_grad,saves_x_hat", [
    ("mse", False, False), ("bce_logits", False, False), ("bce_logits", True, True)])
def test_decoder_output_is_saved_only_when_the_target_gradient_needs_it(
        recon, target_requires_grad, saves_x_hat):
    x_hat, x, mu, logvar = tensors(True)
    # a decoder output above SMALL_NUMEL elements (what the rule is for: smaller mse /
    # l1 losses keep their inputs, as eager PyTorch does, to compute the gradients
    # in the backward)
    cols = _torch_impl.SMALL_NUMEL // 3 + 1
    x_hat = torch.randn(3, cols, requires_grad=True)
    x = torch.rand(3, cols, requires_grad=target_requires_grad)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon)
    assert any(t is x_hat for t in saved) == saves_x_hat
    loss.backward()
    assert x_hat.grad is not None and (x.grad is not None) == target_requires_grad


def test_eager_calls_skip_the_dispatcher_and_tracing_sees_the_custom_ops():
    from torch.fx.experimental.proxy_tensor import make_fx

    x_hat, x, mu, logvar = tensors(True)
    eager = fastvae.vae_loss(x_hat, x, mu, logvar, recon="l1", reduction="none")
    assert "LossFunction" in type(eager.grad_fn).__name__  # _VAELossFunction or _SmallLossFunction
    graph = make_fx(lambda *a: fastvae.vae_loss(*a, recon="l1", reduction="none"))(
        x_hat.detach(), x, mu.detach(), logvar.detach())
    assert "fastvae.vae_loss" in str(graph.graph)
    traced = graph(x_hat.detach(), x, mu.detach(), logvar.detach())
    torch.testing.assert_close(traced, eager.detach(), rtol=0, atol=0)


def channels_last_latents(device="cpu"):
    """mu and logvar as conv encoders make them: halves of a channels_last tensor."""
    h = torch.randn(3, 8, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    h.requires_grad_()
    mu, logvar = h.chunk(2, dim=1)
    return h, mu, logvar


def test_opcheck_with_channels_last_latents(device):
    _, mu, logvar = channels_last_latents(device)
    x_hat = torch.randn(3, 2, 4, 4, device=device).contiguous(memory_format=torch.channels_last)
    x_hat.requires_grad_()
    x = torch.rand(3, 2, 4, 4, device=device)
    torch.library.opcheck(ops.kl_divergence_op, (mu, logvar, None, None, "none", -2.0, 2.0, 0.0,
                                                 True, False))
    torch.library.opcheck(ops.vae_loss_op, (x_hat, x, mu, logvar, None, None, None, None, 1.0,
                                            "mse", 0.0, False, "none", None, None, 0.0, True,
                                            True, False))
    seed = torch.tensor(7)
    torch.library.opcheck(ops.reparameterize_op, (mu, logvar, None, None, seed, None, None, True,
                                                 0))
    torch.library.opcheck(ops.reparameterize_backward_op,
                          (torch.randn(3, 4, 3, 3, device=device), torch.randn(3, device=device),
                           mu.detach(), logvar.detach(), None, None, seed, None, None))


def test_compile_with_channels_last_latents(device):
    torch._dynamo.reset()
    h, mu, logvar = channels_last_latents(device)

    def step(mu, logvar):
        z, kl = fastvae.sample_and_kl(mu, logvar, generator=None)
        return z.square().sum() + fastvae.kl_divergence(mu, logvar, reduction="none").sum() + kl.sum()

    torch.manual_seed(0)
    loss = torch.compile(step, fullgraph=True)(mu, logvar)
    (grad,) = torch.autograd.grad(loss, h)
    torch.manual_seed(0)  # eager, same noise
    eager_loss = step(mu, logvar)
    (eager_grad,) = torch.autograd.grad(eager_loss, h)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grad, eager_grad)


def test_meta_tensors_go_through_the_fake_implementations():
    x_hat, x, mu, logvar = (t.detach().to("meta").requires_grad_(t.requires_grad)
                            for t in tensors(True))
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, reduction="none")
    assert loss.device.type == "meta" and loss.shape == (3,)
    z, kl = fastvae.sample_and_kl(mu, logvar)
    assert z.shape == mu.shape and kl.shape == (3,)


def test_loss_inputs_and_outputs_are_named_in_the_ops_order():
    import inspect

    assert ops.LossInputs._fields == tuple(inspect.signature(ops._vae_loss_impl).parameters)
    x_hat, x, mu, logvar = tensors(True)
    out = ops.vae_loss(x_hat, x, mu, logvar, None, None, None, None, 1.0, "mse", 0.0, False,
                       "sum", None, None, 0.0, True, True, False)
    named = ops.LossOutputs(*out)
    torch.testing.assert_close(named.loss, named.recon + named.kl)
    torch.testing.assert_close(named.grad_x_hat, 2 * (x_hat.detach() - x))
    torch.testing.assert_close(named.grad_mu, mu.detach())
    torch.testing.assert_close(named.grad_logvar, 0.5 * torch.expm1(logvar.detach()))


@pytest.mark.parametrize("options", ["prior", "free_bits", "num_samples"])
def test_kl_controls_keep_the_fake_strides_for_channels_last_latents(device, options):
    """Free bits, a prior and several samples return contiguous results whatever the latents'
    layout, as the fake implementations promise (Inductor asserts the strides it was promised)."""
    _, mu, logvar = channels_last_latents(device)  # halves of a channels_last tensor: not dense
    if options == "free_bits":  # dense channels_last latents
        mu, logvar = (t.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
                      for t in (mu, logvar))
    prior = torch.randn(4, 1, 1, device=device, requires_grad=True) if options == "prior" else None
    free_bits = 0.2 if options == "free_bits" else 0.0
    x_hat = torch.randn(3, 2, 4, 4, device=device, requires_grad=True)
    x = torch.rand(3, 2, 4, 4, device=device)
    torch.library.opcheck(ops.kl_divergence_op, (mu, logvar, prior, prior, "sum", None, None, free_bits,
                                                 True, prior is not None))
    torch.library.opcheck(ops.vae_loss_op, ops.LossInputs(
        x_hat, x, mu, logvar, None, None, prior, prior, 1.0, "mse", 0.0, False, "sum", None, None,
        free_bits, True, True, prior is not None))
    if options != "free_bits":
        samples = 2 if options == "num_samples" else 0
        seed = torch.tensor([7])
        torch.library.opcheck(ops.reparameterize_op, (mu, logvar, prior, prior, seed, None, None, True,
                                                      samples))
        grad_z = torch.randn((samples, 3, 4, 3, 3) if samples else (3, 4, 3, 3), device=device)
        torch.library.opcheck(ops.reparameterize_backward_op, (
            grad_z.transpose(-1, -2), torch.randn(3, device=device), mu.detach(), logvar.detach(),
            None if prior is None else prior.detach(), None if prior is None else prior.detach(), seed,
            None, None, samples))


def test_compile_with_dynamic_shapes_has_no_graph_break(device):
    """torch.compile(dynamic=True): Python floats (free_bits's default, beta) may be
    traced as symbolic floats, which the argument checks must handle without
    math.isfinite (untraceable there); several batch sizes, one graph each at most."""
    torch._dynamo.reset()

    def step(x_hat, x, mu, logvar):
        loss = fastvae.vae_loss(x_hat, x, mu, logvar, beta=0.5, logvar_clamp=(-5.0, 5.0))
        kl = fastvae.kl_divergence(mu, logvar, reduction="batchmean", free_bits=0.0)
        return loss + kl

    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    for batch in (4, 7, 3):
        args = [torch.randn(batch, 6, generator=g).to(device), torch.rand(batch, 6, generator=g).to(device),
                torch.randn(batch, 2, generator=g).to(device), torch.randn(batch, 2, generator=g).to(device)]
        leaves = [a.clone().requires_grad_() for a in args]
        got = compiled(*leaves)
        got.backward()
        want_leaves = [a.clone().requires_grad_() for a in args]
        want = step(*want_leaves)
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(leaves, want_leaves):
            if b.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("recon", ["mse", "l1", "bce", "bce_logits", "gaussian", "laplace",
                                   "continuous_bernoulli"])
def test_the_gradient_buffer_is_contiguous_for_a_channels_last_x_hat(backend, recon):
    """The fake implementation promises contiguous gradient buffers (compiled graphs are
    built on their strides): the real ones must be, whatever x_hat's layout. The PyTorch
    path's continuous_bernoulli followed x_hat's layout for one commit. Values and
    gradients equal those of the contiguous input."""
    g = torch.Generator().manual_seed(1)
    x_hat = torch.rand(2, 3, 4, 5, generator=g) * 0.8 + 0.1  # probabilities for bce
    x = torch.rand(2, 3, 4, 5, generator=g)
    mu, logvar = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    results = []
    for layout in (torch.channels_last, torch.contiguous_format):
        args = (x_hat.contiguous(memory_format=layout), x, mu, logvar, None, None, None, None,
                1.0, recon, 0.0, False, "sum", None, None, 0.0, True, True, False)
        with fastvae.use_backend(backend):
            out = ops.vae_loss_op(*args)
        assert out[3].is_contiguous() and out[3].shape == x_hat.shape
        results.append(out)
    for got, want in zip(results[0][:4], results[1][:4]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dynamic", [None, True])
def test_logvar_clamp_bounds_that_torch_compile_makes_symbolic(dynamic):
    """Clamp bounds passed as arguments compile like any number: the TypeError's message,
    built before any check, repr'd a symbolic bound, which Dynamo cannot (a float's second
    value under the default dynamic, int bounds with dynamic=True). A tensor bound, read on
    the host, is refused under compile by a message naming the argument."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 2, generator=g), 3 * torch.randn(3, 2, generator=g)

    def kl(mu, logvar, lo, hi):
        return fastvae.kl_divergence(mu, logvar, logvar_clamp=(lo, hi))

    compiled = torch.compile(kl, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for lo, hi in ((-30.0, 20.0), (-2.0, 20.0), (-1.5, 0.5), (-3, 5)):
        assert torch.equal(compiled(mu, logvar, lo, hi), kl(mu, logvar, lo, hi)), (lo, hi)
    with pytest.raises(Exception, match="logvar_clamp: under torch.compile the bounds must be"):
        compiled(mu, logvar, torch.tensor(-1.0), torch.tensor(1.0))
    torch._dynamo.reset()


@pytest.mark.parametrize("recon", ["mse", "bce_logits", "gaussian"])
def test_a_float_beta_schedule_compiles_twice_not_once_per_value(recon):
    """A beta schedule of Python floats (the README's training loop) under
    torch.compile(fullgraph=True): two graphs, as for eager torch code (the first value
    specialized, then a symbolic float), not one per value until the recompile limit
    (the custom op's float argument was specialized: the 9th value raised
    FailOnRecompileLimitHit). Values and gradients are the eager ones."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(0)
    x_hat, mu, logvar = (torch.randn(3, n, generator=g) for n in (4, 2, 2))
    x = torch.rand(3, 4, generator=g)

    def loss(x_hat, mu, logvar, beta):
        return fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, beta=beta)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for step in range(10):
        beta = 0.1 * (step + 1)
        results = []
        for fn in (loss, compiled):
            leaves = [t.clone().requires_grad_() for t in (x_hat, mu, logvar)]
            value = fn(*leaves, beta)
            results.append((value, *torch.autograd.grad(value, leaves)))
        for want, got in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
